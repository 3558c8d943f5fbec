"""IPVS mode's few iptables rules, through the iptables backend's helper
(agent/backends/iptables/restore.py): our chains are restored with
--noflush (others' rules stay), and the jumps from the built-in chains, which
are shared with everybody, are inserted only where iptables-save does not
show them, as ``-I CHAIN 1`` lines of that same restore: one transaction per
family, as the iptables backend's full sync does.

The thin part added here: -D of single rules for cleanup, which the helper
does not offer (it only restores, saves and lists).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from agent.backends.iptables.detect import detect_mode
from agent.backends.iptables.restore import BinaryMissing, Iptables, IptablesError, Mode, binary
from agent.backends.iptables.rules import Jump
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

    def _delete(self, family: int, jump: Jump) -> bool:
        ipt = self.ipt(family)
        argv = [binary("", family, self.mode), "-w", "-t", jump.table, "-D", jump.source]
        return ipt.runner([*argv, *shlex.split(jump.spec)], None).returncode == 0

    def restore(self, family: int, text: str, jumps: Sequence[Jump] = ()) -> int:
        """Restore our chains and, in the same transaction, whichever of
        ``jumps`` are missing; the number of jumps inserted.

        One iptables-save per table the jumps live in, then one restore:
        1 + tables subprocesses however many jumps, and a jump never points
        at a chain that the same restore has not just declared.
        """
        ipt = self.ipt(family)
        # dict: each table once, in the order the jumps name them.
        saves = {t: ipt.save(t).splitlines() for t in dict.fromkeys(j.table for j in jumps)}
        missing = missing_jumps(jumps, saves)
        ipt.restore(with_jumps(text, missing))
        return len(missing)

    def available(self, family: int) -> bool:
        try:
            return self.ipt(family).chain_exists("nat", "POSTROUTING")
        except (BinaryMissing, IptablesError):
            return False

    def cleanup(self, family: int) -> int:
        """Remove our jumps and chains in one family; the number of objects removed."""
        n = 0
        for jump in JUMPS:
            while self._delete(family, jump):
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


def missing_jumps(jumps: Iterable[Jump], saves: dict[str, list[str]]) -> list[Jump]:
    """The jumps that the iptables-save lines of their table do not show
    (Jump.found_in: same chains and our comment)."""
    return [jump for jump in jumps if jump.found_in(saves[jump.table]) is None]


def with_jumps(text: str, jumps: Sequence[Jump]) -> str:
    """iptables-restore input ``text`` plus ``-I CHAIN 1 ...`` for each jump,
    at the end of its table's section (after our chains are declared).

    Each goes to the top of its built-in chain, as upstream's
    EnsureRule(Prepend) does; in order, so the last one ends up first.
    """
    if not jumps:
        return text
    out: list[str] = []
    table = ""
    done: set[str] = set()
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line == "COMMIT":
            out += [f"-I {j.source} 1 {j.spec}" for j in jumps if j.table == table]
            done.add(table)
        out.append(line)
    # A table our chains do not use: its own section (render always has both).
    for t in dict.fromkeys(j.table for j in jumps if j.table not in done):
        out += [f"*{t}", *(f"-I {j.source} 1 {j.spec}" for j in jumps if j.table == t), "COMMIT"]
    return "\n".join(out) + "\n"


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
