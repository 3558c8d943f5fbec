"""IPVS mode's iptables cleanup when a shared chain is still referenced by
someone else's rule (an iptables-mode proxy's jump to KUBE-MARK-MASQ): the
chains are flushed, every other one is deleted, and the referenced one is
left for `cleanup --backend iptables`. Fake iptables, no root."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from agent.backends.iptables.restore import IptablesError
from agent.backends.ipvs.iptables import IptablesRules
from agent.backends.ipvs.render import FILTER_CHAINS, NAT_CHAINS


class FakeIpt:
    def __init__(self, referenced: str | None) -> None:
        self.referenced = referenced
        self.chains = {("nat", c) for c in NAT_CHAINS} | {("filter", c) for c in FILTER_CHAINS}
        self.scripts: list[str] = []

    def runner(self, argv: Sequence[str], _input: str | None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), 1)  # no jump rules left

    def chain_exists(self, table: str, chain: str) -> bool:
        return (table, chain) in self.chains

    def restore(self, text: str) -> None:
        self.scripts.append(text)
        deleted = {line.split()[1] for line in text.splitlines() if line.startswith("-X ")}
        if self.referenced in deleted:
            raise IptablesError(f"chain {self.referenced} in use")
        self.chains = {(t, c) for t, c in self.chains if c not in deleted}


class Rules(IptablesRules):
    def __init__(self, fake: FakeIpt) -> None:
        super().__init__("nft")
        self.fake = fake

    def ipt(self, family: int) -> FakeIpt:  # type: ignore[override]
        return self.fake


def test_unreferenced_chains_go_in_one_restore() -> None:
    fake = FakeIpt(referenced=None)
    assert Rules(fake).cleanup(4) == len(NAT_CHAINS) + len(FILTER_CHAINS)
    assert len(fake.scripts) == 1
    assert fake.chains == set()


def test_a_chain_referenced_by_others_is_flushed_and_left_the_rest_deleted() -> None:
    fake = FakeIpt(referenced="KUBE-MARK-MASQ")
    removed = Rules(fake).cleanup(4)
    assert fake.chains == {("nat", "KUBE-MARK-MASQ")}
    assert removed == len(NAT_CHAINS) + len(FILTER_CHAINS) - 1
    # After the failed all-in-one restore: one flush of everything (no -X).
    flush = fake.scripts[1]
    assert ":KUBE-MARK-MASQ - [0:0]" in flush and "-X" not in flush
