"""An in-memory stand-in for the iptables binaries, for unit tests of the applier.

It understands what the applier sends (``iptables-restore --noflush`` with
chain lines, -A/-I/-D/-F/-X, COMMIT), ``iptables-save -t TABLE`` and
``iptables -S CHAIN``, applies each restore atomically, and answers
failures the way iptables-restore does ("line N failed"). ``reject``
makes it refuse any line containing that text, like a kernel refusing a rule.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
from collections.abc import Sequence

BUILTIN = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}


class _Fail(Exception):
    pass


def _norm(spec: str) -> str:
    return " ".join(shlex.split(spec))


class FakeIptables:
    """One kernel: tables[family][table][chain] -> rule specs (normalised)."""

    def __init__(self) -> None:
        self.tables: dict[int, dict[str, dict[str, list[str]]]] = {
            f: {t: {ch: [] for ch in chs} for t, chs in BUILTIN.items()} for f in (4, 6)
        }
        self.reject: str | None = None
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append((argv, stdin))
        family = 6 if argv[0].startswith("ip6") else 4
        if argv[0].endswith("-restore"):
            return self._restore(argv, family, stdin or "")
        if argv[0].endswith("-save"):
            return self._save(argv, family)
        if "--version" in argv:
            return subprocess.CompletedProcess(argv, 0, "iptables v1.8.9 (fake)\n", "")
        if "-S" in argv:
            table = argv[argv.index("-t") + 1]
            chain = argv[argv.index("-S") + 1]
            ok = chain in self.tables[family][table]
            return subprocess.CompletedProcess(argv, 0 if ok else 1, "", "")
        return subprocess.CompletedProcess(argv, 2, "", f"fake: unsupported {argv}")

    def _save(self, argv: list[str], family: int) -> subprocess.CompletedProcess[str]:
        wanted = [argv[argv.index("-t") + 1]] if "-t" in argv else list(BUILTIN)
        out = []
        for table in wanted:
            chains = self.tables[family][table]
            out.append(f"*{table}")
            for ch in chains:
                policy = "ACCEPT" if ch in BUILTIN[table] else "-"
                out.append(f":{ch} {policy} [0:0]")
            for ch, rules in chains.items():
                out += [f"-A {ch} {r}" for r in rules]
            out.append("COMMIT")
        return subprocess.CompletedProcess(argv, 0, "\n".join(out) + "\n", "")

    def save_text(self, family: int) -> str:
        return self._save(["iptables-save"], family).stdout

    def _restore(self, argv: list[str], family: int, text: str) -> subprocess.CompletedProcess[str]:
        work = copy.deepcopy(self.tables[family])
        table: dict[str, list[str]] | None = None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            try:
                if not line or line.startswith("#"):
                    continue
                if self.reject and self.reject in line:
                    raise _Fail("rejected by fake kernel")
                if line.startswith("*"):
                    table = work[line[1:]]
                elif line == "COMMIT":
                    table = None
                elif table is None:
                    raise _Fail("no table")
                elif line.startswith(":"):
                    table.setdefault(line[1:].split()[0], []).clear()
                else:
                    self._command(table, line)
            except _Fail as exc:
                name = argv[0]
                return subprocess.CompletedProcess(
                    argv, 1, "", f"{name}: line {number} failed: {exc}\n"
                )
        self.tables[family] = work
        return subprocess.CompletedProcess(argv, 0, "", "")

    @staticmethod
    def _command(table: dict[str, list[str]], line: str) -> None:
        op, _, rest = line.partition(" ")
        chain, _, spec = rest.partition(" ")
        if chain not in table:
            raise _Fail("No chain/target/match by that name.")
        rules = table[chain]
        if op == "-A":
            rules.append(_norm(spec))
        elif op == "-I":
            head, _, tail = spec.partition(" ")
            if head.isdigit():
                pos, spec = int(head), tail
            else:
                pos = 1
            if pos > len(rules) + 1:
                raise _Fail("Index of insertion too big.")
            rules.insert(pos - 1, _norm(spec))
        elif op == "-D":
            try:
                rules.remove(_norm(spec))
            except ValueError:
                raise _Fail("Bad rule (does a matching rule exist in that chain?).") from None
        elif op == "-F":
            rules.clear()
        elif op == "-X":
            if rules or any(r.endswith(f"-j {chain}") for rs in table.values() for r in rs):
                raise _Fail("Directory not empty / chain in use")
            del table[chain]
        else:
            raise _Fail(f"unknown command {op}")


def normalise(save: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save output as table -> chain -> rules (rule order kept).

    Chain listing order differs between legacy and nft and with creation
    order; the rules' order inside a chain is what matters, so it is kept.
    Comments and counters are dropped.
    """
    out: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] = {}
    for raw in save.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = out.setdefault(line[1:], {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            table.setdefault(chain, []).append(spec)
    return out
