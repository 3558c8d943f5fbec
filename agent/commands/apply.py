"""`sliceproxy apply`: one sync of the node's data plane from manifests (root).

Run it again with changed manifests and it does the partial sync the agent
would: the last applied rules are kept in a small state file, and only what
differs is sent. A state file that does not match (other options, other
iptables flavour, tables flushed since) leads to a full sync.

After a successful sync, stale UDP conntrack flows are deleted as the agent
does (agent/conntrack.py; ``--conntrack-cleanup=false`` turns it off). The
state file also keeps the UDP service ports of the last run, so only those
that changed are checked. Without it (first run, ``--full``, unreadable
file) every UDP service port is checked instead of none: the check lists the
kernel's flows, so it needs no history to be right, only to be cheap.
Cleanup problems (no ``conntrack`` binary) are reported on stderr and never
change the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.backends import registry
from agent.backends.base import SyncResult
from agent.commands.backend_args import add_backend_args, families
from agent.commands.common import add_conntrack_cleanup_arg, add_state_args, load_state
from agent.conntrack import frontends_from_json, frontends_to_json, udp_frontends
from agent.conntrack_apply import ConntrackCleaner
from agent.model import ServicePortName

NAME = "apply"
HELP = "program the node's data plane once from manifests (needs root)"
STATE_DIR = Path("/run/sliceproxy")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help=HELP, description=__doc__)
    add_state_args(p)
    add_backend_args(p)
    p.add_argument(
        "--state-file",
        type=Path,
        metavar="PATH",
        help=f"where the last applied rules are kept (default {STATE_DIR}/apply-BACKEND.json)",
    )
    p.add_argument("--full", action="store_true", help="force a full sync")
    add_conntrack_cleanup_arg(p)
    p.set_defaults(func=run)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"sliceproxy: ignoring state file {path}: {exc}", file=sys.stderr)
        return None
    return raw if isinstance(raw, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def summary(backend_name: str, detail: str, result: SyncResult) -> str:
    """One line: what the sync wrote, per family, and what is now in place."""
    status = "ok" if result.ok else "FAILED"
    if result.fell_back:
        status += " (after a rejected partial sync)"
    line = f"{backend_name}{detail}: {result.kind} sync {status}"
    families = sorted(set(result.chains_per_family) | {fam for _, fam in result.written_counts})
    if families:
        written = [
            f"{fam} {result.chains_per_family.get(fam, 0)} chains "
            f"{sum(n for (_, f), n in result.written_counts.items() if f == fam)} rules"
            for fam in families
        ]
        line += "; written: " + ", ".join(written)
    else:
        line += f"; {result.chains_written} chains and {result.rules_written} rules written"
    counts = ", ".join(
        f"{fam} {table} {n}" for (table, fam), n in sorted(result.rule_counts.items(), key=str)
    )
    return line + (f"; rules in place: {counts}" if counts else "")


def run(args: argparse.Namespace) -> int:
    loaded = load_state(args)
    plan = loaded.plan
    backend = registry.module(args.backend).make_backend(args, plan.node, families(args))
    path = args.state_file or STATE_DIR / f"apply-{args.backend}.json"
    changed: set[ServicePortName] | None = None
    previous = None if args.full else _read(path)
    adopt = getattr(backend, "import_state", None)
    if previous is not None and adopt is not None:
        why = adopt(previous)
        if why is None:
            # Every name, old and new: the backend renders them all and sends
            # only those whose rules differ from what it applied last time.
            changed = {name for name, _family in plan.entries}
            for entry in previous.get("families", {}).values():
                changed |= {ServicePortName(*s["key"]) for s in entry}
        else:
            print(f"sliceproxy: full sync: {why}", file=sys.stderr)
    result = backend.sync(plan, changed)
    mode = getattr(backend, "_mode", None)
    print(summary(backend.name, f" ({mode})" if mode else "", result))
    cleaned = False
    if result.ok and getattr(args, "conntrack_cleanup", True):
        old = frontends_from_json(previous.get("conntrack")) if previous is not None else None
        report = ConntrackCleaner().cleanup(old, udp_frontends(plan))
        cleaned = report.ok
        if report.deletions:
            print(
                f"conntrack: {report.total_deleted} stale UDP flows deleted "
                f"({len(report.deletions)} filters)"
            )
        for error in report.errors:
            print(f"sliceproxy: conntrack cleanup: {error}", file=sys.stderr)
    export = getattr(backend, "export_state", None)
    if result.ok and export is not None:
        try:
            state = export()
            if cleaned:
                # Only after a cleanup that ran: a skipped or failed one
                # leaves no record, so the next run checks every UDP port.
                state["conntrack"] = frontends_to_json(udp_frontends(plan))
            _write(path, state)
        except OSError as exc:
            print(f"sliceproxy: cannot write state file {path}: {exc}", file=sys.stderr)
    elif not result.ok:
        print(f"sliceproxy: {result.error}", file=sys.stderr)
        with contextlib.suppress(OSError):
            path.unlink()
    return 0 if result.ok else 1
