"""Golden files: rendered rule sets reviewed like code (`make golden`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_golden(directory: Path, suffix: str, wanted: Mapping[str, str]) -> int:
    """Make ``directory`` hold exactly ``wanted`` (name -> text) among its
    ``*<suffix>`` files: stale ones removed, changed ones rewritten, each
    change printed. Returns 0 (an exit status)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"*{suffix}"):
        if stale.name not in wanted:
            stale.unlink()
            print(f"removed {stale.relative_to(ROOT)}")
    for name, text in wanted.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0
