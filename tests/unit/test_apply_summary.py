"""What a sync wrote, per family: the restore-text counter and the one-line
summary `sliceproxy apply` prints."""

from __future__ import annotations

from agent.backends.base import SyncResult
from agent.backends.iptables.restore import written_per_table
from agent.commands.apply import summary

TEXT = """\
*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -j RETURN
COMMIT
*nat
:KUBE-SVC-X - [0:0]
:KUBE-SEP-Y - [0:0]
-I KUBE-SERVICES 3 -d 10.96.0.1/32 -j KUBE-SVC-X
-A KUBE-SVC-X -j KUBE-SEP-Y
-A KUBE-SEP-Y -j DNAT --to-destination 10.0.0.1:80
-D KUBE-SERVICES -d 10.96.0.2/32 -j KUBE-SVC-Z
-X KUBE-SVC-Z
COMMIT
"""


def test_written_per_table_counts_declarations_and_added_rules() -> None:
    assert written_per_table(TEXT) == (3, {"filter": 1, "nat": 3})


def test_summary_per_family() -> None:
    result = SyncResult(
        "partial",
        ok=True,
        chains_written=3,
        rules_written=4,
        rule_counts={("nat", "IPv4"): 10},
        written_counts={("filter", "IPv4"): 1, ("nat", "IPv4"): 3, ("nat", "IPv6"): 0},
        chains_per_family={"IPv4": 3, "IPv6": 0},
    )
    line = summary("iptables", " (nft)", result)
    assert line == (
        "iptables (nft): partial sync ok; written: IPv4 3 chains 4 rules, "
        "IPv6 0 chains 0 rules; rules in place: IPv4 nat 10"
    )


def test_summary_without_per_family_detail() -> None:
    result = SyncResult("full", ok=False, chains_written=2, rules_written=5, fell_back=True)
    assert summary("ipvs", "", result) == (
        "ipvs: full sync FAILED (after a rejected partial sync); 2 chains and 5 rules written"
    )
