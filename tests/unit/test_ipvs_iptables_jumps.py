"""IPVS mode's jumps from the built-in chains: found in one iptables-save per
table and inserted, only when missing, in the same iptables-restore as our
chains. A fake runner stands in for the binaries and counts the calls."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from agent.backends.iptables.restore import Iptables, IptablesError
from agent.backends.iptables.rules import Jump
from agent.backends.ipvs.iptables import IptablesRules, missing_jumps, with_jumps
from agent.backends.ipvs.render import JUMPS, render_state
from tests.golden.iptables_cases import THREE, plan, service

FOREIGN = "-A INPUT -s 192.0.2.1/32 -j ACCEPT"


class FakeRunner:
    """Just enough of iptables-save/-restore for jumps: a restore's ``-I X 1``
    lines land at the top of X, and a save lists the table's rules."""

    def __init__(self) -> None:
        self.rules: dict[str, list[str]] = {"nat": [], "filter": [FOREIGN]}
        self.calls: list[list[str]] = []
        self.restored: list[str] = []
        self.fail_restore = False

    def __call__(self, argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if argv[0].endswith("-save"):
            table = argv[argv.index("-t") + 1]
            out = "".join(f"{line}\n" for line in self.rules[table])
            return subprocess.CompletedProcess(list(argv), 0, out, "")
        if argv[0].endswith("-restore"):
            assert stdin is not None
            self.restored.append(stdin)
            if self.fail_restore:
                return subprocess.CompletedProcess(list(argv), 1, "", "line 3 failed")
            table = ""
            for line in stdin.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith("-I "):
                    _i, chain, _pos, spec = line.split(" ", 3)
                    self.rules[table].insert(0, f"-A {chain} {spec}")
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        raise AssertionError(f"unexpected command {argv}")  # e.g. the old -C/-I


class Rules(IptablesRules):
    def __init__(self, runner: FakeRunner) -> None:
        super().__init__("nft")
        self.runner = runner

    def ipt(self, family: int) -> Iptables:
        return Iptables(self.mode, family, runner=self.runner)


def _state_text() -> str:
    return render_state(plan((service("web", ["10.96.0.10"]), THREE))).iptables[4]


def test_missing_jumps_go_in_the_chains_restore_and_are_not_duplicated() -> None:
    runner = FakeRunner()
    rules = Rules(runner)
    text = _state_text()
    assert rules.restore(4, text, JUMPS) == len(JUMPS)
    # One save per table and one restore: no per-jump subprocess.
    assert [c[0] for c in runner.calls] == [
        "iptables-nft-save",
        "iptables-nft-save",
        "iptables-nft-restore",
    ]
    sent = runner.restored[0]
    assert sent.startswith(text.rstrip("\n").split("COMMIT")[0])  # our chains, unchanged
    for jump in JUMPS:
        assert sent.count(f"-I {jump.source} 1 {jump.spec}\n") == 1
    # Each jump sits in its own table's section, before that COMMIT.
    nat, filt = sent.split("COMMIT\n")[:2]
    assert nat.startswith("*nat") and filt.startswith("*filter")
    assert all(f"-I {j.source} 1 " in (nat if j.table == "nat" else filt) for j in JUMPS)

    # Next sync: all present, nothing inserted, the restore is exactly ours.
    runner.calls.clear()
    assert rules.restore(4, text, JUMPS) == 0
    assert len(runner.calls) == 3
    assert runner.restored[1] == text
    assert FOREIGN in runner.rules["filter"]
    assert sum(line.startswith("-A INPUT") for line in runner.rules["filter"]) == 1 + sum(
        j.table == "filter" and j.source == "INPUT" for j in JUMPS
    )


def test_only_the_missing_ones_are_inserted() -> None:
    runner = FakeRunner()
    present = JUMPS[0]
    runner.rules[present.table].append(f"-A {present.source} {present.spec}")
    assert Rules(runner).restore(6, _state_text(), JUMPS) == len(JUMPS) - 1
    assert f"-I {present.source} 1 " not in runner.restored[0].split("COMMIT")[0]
    assert runner.calls[0][0] == "ip6tables-nft-save"


def test_a_foreign_jump_to_the_same_chain_is_not_taken_for_ours() -> None:
    # An iptables-mode leftover: same source and target, another comment,
    # listed first, so found_in alone would stop at it.
    ours = next(j for j in JUMPS if j.target == "KUBE-PROXY-FIREWALL" and j.source == "INPUT")
    theirs = Jump("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall")
    saves = {"nat": [], "filter": [f"-A INPUT {theirs.spec}", f"-A INPUT {ours.spec}"]}
    assert ours not in missing_jumps(JUMPS, saves)
    assert ours in missing_jumps(JUMPS, {"nat": [], "filter": [f"-A INPUT {theirs.spec}"]})


def test_with_jumps_adds_a_section_for_a_table_the_text_lacks() -> None:
    jump = Jump("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter")
    out = with_jumps("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", [jump])
    assert out == (
        f"*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*filter\n-I INPUT 1 {jump.spec}\nCOMMIT\n"
    )
    assert with_jumps("*nat\nCOMMIT\n", []) == "*nat\nCOMMIT\n"


def test_a_failed_restore_raises() -> None:
    runner = FakeRunner()
    runner.fail_restore = True
    with pytest.raises(IptablesError):
        Rules(runner).restore(4, _state_text(), JUMPS)
