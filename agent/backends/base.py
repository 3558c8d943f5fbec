"""What every backend offers the sync loop and the commands.

A backend = a pure renderer (plan -> text or operations) + an applier (the
only side effects). The sync loop talks to this protocol only, so a new
backend is one folder under agent/backends/.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from agent.model import ServicePortName
from agent.plan import NodePlan

SyncKind = Literal["full", "partial"]


@dataclass(frozen=True)
class SyncResult:
    """What one sync did; feeds the log line and the metrics."""

    kind: SyncKind
    ok: bool
    service_ports_changed: int = 0
    # Chains (or virtual servers) and rules sent to the kernel in this sync.
    chains_written: int = 0
    rules_written: int = 0
    # Rules now in place per (table, family), e.g. {("nat", "IPv4"): 120}:
    # kubeproxy_sync_proxy_rules_iptables_total / _last.
    rule_counts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # Rules sent to the kernel per (table, family) by this sync:
    # kubeproxy_sync_proxy_rules_iptables_last. Optional because a partial
    # sync's per-table breakdown is not known to every backend; empty means
    # "not reported" and the metrics fall back (agent.metrics.written_counts).
    written_counts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # Chains (or virtual servers) written per family, e.g. {"IPv4": 12}.
    chains_per_family: Mapping[str, int] = field(default_factory=dict)
    # Human-readable reason when ok is False (with the failing line, if any).
    error: str = ""
    # A partial sync that failed and was redone as a full one.
    fell_back: bool = False


class Backend(Protocol):
    name: str

    def render(self, plan: NodePlan) -> str:
        """The complete rule set for the plan, as the `render` command prints it.

        Deterministic: the same plan gives byte-identical text.
        """
        ...

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        """Make the kernel match the plan.

        ``changed=None`` asks for a full sync; otherwise only those service
        ports changed since the last successful sync and the backend may do a
        partial one (it falls back to full on failure or when unsure).
        """
        ...

    def cleanup(self) -> int:
        """Remove everything this backend created; return the number of objects removed."""
        ...


class TickingBackend(Backend, Protocol):
    """A backend with periodic housekeeping between syncs (optional: the agent
    looks for ``tick`` with getattr, so other backends need nothing)."""

    def tick(self) -> None:
        """Called every ``AgentOptions.tick_period`` after the first sync, never
        at the same time as ``sync``; must not raise (log and retry next time).
        IPVS: delete drained real servers whose connections are gone."""
        ...
