"""The iptables-nft cache hint (nftcache.py): where it goes and when it is used."""

from __future__ import annotations

from agent.backends.iptables import chains as c
from agent.backends.iptables.nftcache import (
    FULL_CACHE_LINE,
    jump_prelude,
    nat_section_size,
    wants_full_chain_cache,
    with_full_chain_cache,
)
from agent.backends.iptables.rules import JUMPS, NAT

TEXT = "*filter\n:KUBE-FORWARD - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A X -j Y\nCOMMIT\n"


def test_hint_is_the_first_line_of_the_nat_section_only() -> None:
    lines = with_full_chain_cache(TEXT).splitlines()
    assert lines.count(FULL_CACHE_LINE) == 1
    assert lines[lines.index("*nat") + 1] == FULL_CACHE_LINE
    assert with_full_chain_cache("*nat\n-A X -j Y\nCOMMIT\n").startswith("*nat\n-S\n")


def test_nat_section_size_counts_commands_and_declarations() -> None:
    assert nat_section_size(TEXT) == (2, 1)


def test_hint_only_for_nft_and_only_when_the_quadratic_term_dominates() -> None:
    assert not wants_full_chain_cache("legacy", 100_000, 30_000, 0)
    assert wants_full_chain_cache("nft", 33_000, 9_000, 0)  # first sync, 3k services
    assert wants_full_chain_cache("nft", 33_000, 9_000, 9_000)  # steady state, 3k services
    assert not wants_full_chain_cache("nft", 11, 3, 30_000)  # small partial, big table


def test_prelude_creates_only_missing_targets_and_only_nat_jumps() -> None:
    text = jump_prelude(JUMPS, existing_chains={c.KUBE_POSTROUTING})
    lines = text.splitlines()
    assert lines[0] == f"*{NAT}" and lines[-1] == "COMMIT"
    assert f"-N {c.KUBE_SERVICES}" in lines and f"-N {c.KUBE_POSTROUTING}" not in lines
    assert all(" FORWARD " not in line and " INPUT " not in line for line in lines)
    assert sum(line.startswith("-I ") for line in lines) == sum(j.table == NAT for j in JUMPS)
    assert jump_prelude([j for j in JUMPS if j.table != NAT], set()) == ""
