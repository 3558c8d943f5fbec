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
        present = {
            table: [c for c in chains if ipt.chain_exists(table, c)]
            for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS))
        }
        if not any(present.values()):
            return n
        try:
            ipt.restore(_script(present, delete=True))
        except IptablesError:
            # A chain is still referenced by a rule that is not ours to know,
            # e.g. an iptables-mode proxy's jump to the shared KUBE-MARK-MASQ:
            # empty them all, delete those that can go, leave the rest to
            # `cleanup --backend iptables` (which `cleanup` runs next).
            ipt.restore(_script(present, delete=False))
            for table, chains in present.items():
                for chain in chains:
                    try:
                        ipt.restore(_script({table: [chain]}, delete=True))
                    except IptablesError:
                        n -= 1
        return n + sum(len(c) for c in present.values())


def _script(chains: dict[str, list[str]], *, delete: bool) -> str:
    """iptables-restore input that flushes (and deletes) the given chains."""
    lines = []
    for table, names in chains.items():
        if not names:
            continue
        lines.append(f"*{table}")
        lines.extend(f":{c} - [0:0]" for c in names)  # flushes them first
        if delete:
            lines.extend(f"-X {c}" for c in names)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"
