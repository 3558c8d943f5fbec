"""IPVS mode's few iptables rules, through the iptables backend's helper
(agent/backends/iptables/restore.py): our chains are restored with
--noflush (others' rules stay), and the jumps from the built-in chains, which
are shared with everybody, are ensured one by one (check, then insert).

The thin part added here: -C/-I/-D of single rules, which the helper does not
offer (it only restores, saves and lists).
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.backends.iptables.detect import detect_mode
from agent.backends.iptables.restore import BinaryMissing, Iptables, IptablesError, Mode, binary
from agent.backends.ipvs.model import JumpRule
from agent.backends.ipvs.render import FILTER_CHAINS, JUMPS, NAT_CHAINS

__all__ = ["IptablesError", "IptablesRules"]


class IptablesRules:
    """One iptables flavour (legacy or nft, detected as kube-proxy does) for
    both families."""

    def __init__(self, mode: Mode | None = None) -> None:
        self._mode = mode

    @property
    def mode(self) -> Mode:
        if self._mode is None:
            self._mode, _why = detect_mode()
        return self._mode

    def ipt(self, family: int) -> Iptables:
        return Iptables(self.mode, family)

    def _rule(self, op: str, rule: JumpRule) -> bool:
        ipt = self.ipt(rule.family)
        argv = [binary("", rule.family, self.mode), "-w", "-t", rule.table, op, rule.chain]
        return ipt.runner([*argv, *rule.args()], None).returncode == 0

    def restore(self, family: int, text: str) -> None:
        self.ipt(family).restore(text)

    def ensure_jumps(self, rules: Iterable[JumpRule]) -> int:
        """Insert the missing jump rules; the number inserted."""
        n = 0
        for rule in rules:
            if self._rule("-C", rule):
                continue
            if not self._rule("-I", rule):
                raise IptablesError(f"cannot insert into {rule.table}/{rule.chain}: {rule.text()}")
            n += 1
        return n

    def available(self, family: int) -> bool:
        try:
            return self.ipt(family).chain_exists("nat", "POSTROUTING")
        except (BinaryMissing, IptablesError):
            return False

    def cleanup(self, family: int) -> int:
        """Remove our jumps and chains in one family; the number of objects removed."""
        n = 0
        for table, chain, target, comment in JUMPS:
            rule = JumpRule(family, table, chain, target, comment)
            while self._rule("-D", rule):
                n += 1
        ipt = self.ipt(family)
        lines = []
        for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
            present = [c for c in chains if ipt.chain_exists(table, c)]
            if not present:
                continue
            lines.append(f"*{table}")
            lines.extend(f":{c} - [0:0]" for c in present)  # flushes them first
            lines.extend(f"-X {c}" for c in present)
            lines.append("COMMIT")
            n += len(present)
        if lines:
            ipt.restore("\n".join(lines) + "\n")
        return n
