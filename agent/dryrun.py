"""`sliceproxy run --dry-run`: a backend that renders every sync and prints
the difference to the previous one, and never touches the kernel."""

from __future__ import annotations

import difflib
import threading
from collections.abc import Collection
from typing import Any, TextIO

from agent.backends.base import SyncKind, SyncResult
from agent.model import ServicePortName
from agent.plan import NodePlan


class PlanText:
    """Stand-in renderer when no backend renderer exists: the explain view."""

    name = "plan"

    def render(self, plan: NodePlan) -> str:
        from agent.explain import plan_text

        return plan_text(plan, None, color=False)


class DryRunBackend:
    """Renders every sync and prints the difference; never touches the kernel."""

    def __init__(self, renderer: Any, out: TextIO) -> None:
        self.name = f"dry-run({getattr(renderer, 'name', '?')})"
        self._renderer = renderer
        self._out = out
        self._previous = ""
        self._count = 0
        self._lock = threading.Lock()

    def render(self, plan: NodePlan) -> str:
        return str(self._renderer.render(plan))

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        text = self.render(plan)
        kind: SyncKind = "full" if changed is None else "partial"
        with self._lock:
            self._count += 1
            before = self._previous
            diff = list(
                difflib.unified_diff(
                    before.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    fromfile="rules before" if self._count > 1 else "no rules",
                    tofile=f"rules after sync {self._count} ({kind})",
                )
            )
            self._previous = text
            if diff:
                self._out.writelines(line if line.endswith("\n") else line + "\n" for line in diff)
                self._out.flush()
        written = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
        return SyncResult(
            kind=kind,
            ok=True,
            service_ports_changed=len(changed) if changed is not None else 0,
            rules_written=written,
        )

    def cleanup(self) -> int:
        return 0
