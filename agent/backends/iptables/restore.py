"""Running the iptables binaries: the only code that executes them.

Reusable by any backend that needs a few iptables rules (the IPVS backend):
``Iptables(mode, family).restore(text)`` runs one ``iptables-restore
--noflush -w`` transaction and, when the kernel rejects it, raises
:class:`RestoreError` quoting the failing line of ``text``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["legacy", "nft"]
MODES: tuple[Mode, ...] = ("legacy", "nft")

# A command runner: argv and stdin text -> completed process. Tests inject
# one to capture or fake what would run; `prefix` runs inside a namespace.
Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]

# iptables-restore names the failing line in one of two ways:
#   "iptables-restore: line 5 failed" / "...: line 5 failed: No chain..."
#   "Error occurred at line: 5"
_LINE_RE = re.compile(r"line (\d+) failed|Error occurred at line: (\d+)")

DEFAULT_TIMEOUT = 120.0


class IptablesError(Exception):
    """An iptables binary could not run or failed; the message is for people."""


class BinaryMissing(IptablesError):
    pass


class RestoreError(IptablesError):
    """The kernel (or the parser) rejected a restore; nothing was applied."""

    def __init__(self, message: str, line_number: int | None, line: str | None, stderr: str):
        super().__init__(message)
        self.line_number = line_number
        self.line = line
        self.stderr = stderr


def subprocess_runner(prefix: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT) -> Runner:
    """Runs commands for real, optionally behind a prefix such as ``ip netns exec NS``."""

    def run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        full = [*prefix, *argv]
        for exe in {full[0], argv[0]}:
            if shutil.which(exe) is None:
                raise BinaryMissing(f"{exe}: not found (is the iptables package installed?)")
        try:
            return subprocess.run(
                full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except FileNotFoundError as exc:
            raise BinaryMissing(f"{argv[0]}: not found ({exc.strerror})") from None
        except subprocess.TimeoutExpired:
            raise IptablesError(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from None

    return run


def binary(tool: str, family: int, mode: Mode) -> str:
    """e.g. ("restore", 6, "nft") -> "ip6tables-nft-restore"; tool "" is iptables itself."""
    base = "iptables" if family == 4 else "ip6tables"
    name = f"{base}-{mode}"
    return f"{name}-{tool}" if tool else name


def quote_failing_line(text: str, stderr: str) -> tuple[int | None, str | None]:
    """Map iptables-restore's "line N" back to the text that was sent."""
    m = _LINE_RE.search(stderr)
    if not m:
        return None, None
    number = int(m.group(1) or m.group(2))
    lines = text.splitlines()
    if 1 <= number <= len(lines):
        return number, lines[number - 1]
    return number, None


@dataclass(frozen=True)
class RestoreRecord:
    """One restore that was attempted: what was sent, and how it went."""

    family: int
    kind: str
    text: str
    ok: bool
    seconds: float


@dataclass
class Iptables:
    """One iptables flavour (legacy or nft) for one family, behind a runner."""

    mode: Mode
    family: int
    runner: Runner = field(default_factory=subprocess_runner)

    def _run(
        self, argv: Sequence[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return self.runner(argv, stdin)
        except OSError as exc:
            raise IptablesError(f"{argv[0]}: {exc}") from None

    def restore(self, text: str, *, noflush: bool = True, counters: bool = False) -> None:
        """One atomic transaction. Raises RestoreError quoting the failing line."""
        argv = [binary("restore", self.family, self.mode), "-w"]
        if noflush:
            argv.append("--noflush")
        if counters:
            argv.append("--counters")
        proc = self._run(argv, text)
        if proc.returncode == 0:
            return
        stderr = proc.stderr.strip()
        number, line = quote_failing_line(text, stderr)
        where = f" at line {number}: {line}" if line is not None else ""
        first = stderr.splitlines()[0] if stderr else f"exit status {proc.returncode}"
        raise RestoreError(f"{argv[0]} failed{where} ({first})", number, line, stderr)

    def save(self, table: str) -> str:
        argv = [binary("save", self.family, self.mode), "-t", table]
        proc = self._run(argv)
        if proc.returncode != 0:
            raise IptablesError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def chain_exists(self, table: str, chain: str) -> bool:
        """Cheap check of one chain (-S lists just that chain)."""
        argv = [binary("", self.family, self.mode), "-w", "-t", table, "-S", chain]
        return self._run(argv).returncode == 0

    def version(self) -> tuple[int, ...] | None:
        proc = self._run([binary("", self.family, self.mode), "--version"])
        m = re.search(r"v(\d+)\.(\d+)\.(\d+)", proc.stdout + proc.stderr)
        return tuple(int(x) for x in m.groups()) if m else None

    def has_random_fully(self) -> bool:
        """MASQUERADE --random-fully needs iptables >= 1.6.2 (HasRandomFully upstream)."""
        v = self.version()
        return v is not None and v >= (1, 6, 2)


def timed_restore(ipt: Iptables, text: str, kind: str, log: MutableSequence[RestoreRecord]) -> None:
    """restore() that records what was sent (tests assert on it) and how long it took."""
    start = time.monotonic()
    try:
        ipt.restore(text)
    except IptablesError:
        log.append(RestoreRecord(ipt.family, kind, text, False, time.monotonic() - start))
        raise
    log.append(RestoreRecord(ipt.family, kind, text, True, time.monotonic() - start))


def written_per_table(text: str) -> tuple[int, dict[str, int]]:
    """(chains declared, rules added per table) in an iptables-restore input.

    Feeds kubeproxy_sync_proxy_rules_iptables_last and the `apply` summary:
    what a sync actually sent, not what is in place.
    """
    chains = 0
    rules: dict[str, int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            rules.setdefault(table, 0)
        elif line.startswith(":"):
            chains += 1
        elif line.startswith(("-A ", "-I ")) and table:
            rules[table] += 1
    return chains, rules
