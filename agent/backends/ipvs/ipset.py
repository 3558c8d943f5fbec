"""ipsets through `ipset restore`: read members back with `ipset save`, send
only the adds and deletes (pure ``sync_script``), like upstream's
syncIPSetEntries, so a set is never empty while it is being rewritten."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping

from agent.backends.ipvs.model import IPSet


class IPSetError(RuntimeError):
    pass


def parse_save(text: str) -> dict[str, set[str]]:
    """`ipset save` output -> {set name: members} (comments dropped)."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "create":
            out.setdefault(parts[1], set())
        elif len(parts) >= 3 and parts[0] == "add":
            out.setdefault(parts[1], set()).add(parts[2])
    return out


def sync_script(desired: Iterable[IPSet], current: Mapping[str, set[str]]) -> str:
    """ipset restore input that makes each desired set hold exactly its entries."""
    lines: list[str] = []
    for st in desired:
        have = current.get(st.name)
        if have is None:
            lines.append(st.create_line())
            have = set()
        want = set(st.entries)
        lines.extend(f"add {st.name} {e}" for e in st.entries if e not in have)
        lines.extend(f"del {st.name} {e}" for e in sorted(have - want))
    return "\n".join(lines) + ("\n" if lines else "")


def save() -> dict[str, set[str]]:
    proc = subprocess.run(["ipset", "save"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise IPSetError(f"ipset save: {proc.stderr.strip()}")
    return parse_save(proc.stdout)


def restore(script: str) -> None:
    if not script:
        return
    proc = subprocess.run(
        ["ipset", "restore", "-exist"], input=script, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise IPSetError(f"ipset restore: {proc.stderr.strip()}")


def destroy(names: Iterable[str]) -> int:
    """Destroy the named sets that exist; the number destroyed."""
    existing = save()
    n = 0
    for name in names:
        if name in existing:
            proc = subprocess.run(
                ["ipset", "destroy", name], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise IPSetError(f"ipset destroy {name}: {proc.stderr.strip()}")
            n += 1
    return n
