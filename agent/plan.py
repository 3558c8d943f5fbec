"""NodePlan: the complete, backend-neutral description of what this node
does with Service traffic. Every backend renders the same plan; none of them
looks at API objects or re-decides topology.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent.model import ZONE_LABEL, Endpoint, NodeInfo, ServicePort, ServicePortName
from agent.state import ClusterState, ResolvedPort, Skipped
from agent.topology import Decision, categorize

PlanKey = tuple[ServicePortName, int]  # (service port, IP family)


@dataclass(frozen=True)
class ServicePortPlan:
    """The decision for one service port in one IP family."""

    service: ServicePort
    family: int
    decision: Decision
    # Every serving endpoint of this family, whatever the decision chose:
    # the stale-UDP-conntrack cleanup keeps flows to any of them, as
    # upstream does (agent/conntrack.py). Empty in hand-built plans.
    serving: tuple[Endpoint, ...] = ()

    @property
    def name(self) -> ServicePortName:
        return self.service.name

    @property
    def key(self) -> PlanKey:
        return (self.service.name, self.family)


@dataclass(frozen=True)
class NodePlan:
    node: NodeInfo
    entries: Mapping[PlanKey, ServicePortPlan]
    skipped: tuple[Skipped, ...] = ()
    node_reasons: tuple[str, ...] = field(default=())
    # The service ports recomputed by update_plan from the plan it was given;
    # None when built from scratch. It lets per-sync consumers (metrics,
    # conntrack cleanup) look at what changed instead of every entry. Not
    # part of the plan's meaning, hence not compared.
    changed: frozenset[ServicePortName] | None = field(default=None, compare=False)

    def for_family(self, family: int) -> list[ServicePortPlan]:
        """The entries of one family, sorted by service port name."""
        return [self.entries[k] for k in sorted(self.entries) if k[1] == family]

    def by_name(self) -> dict[ServicePortName, list[ServicePortPlan]]:
        out: dict[ServicePortName, list[ServicePortPlan]] = {}
        for key in sorted(self.entries):
            out.setdefault(key[0], []).append(self.entries[key])
        return out


def plan_port(
    resolved: ResolvedPort, node: NodeInfo, prefer_same_node: bool
) -> list[ServicePortPlan]:
    """Plans for every family the service port has a cluster IP in.

    Each family is decided on its own, from that family's endpoints only,
    as kube-proxy runs one proxier per family.
    """
    out = []
    for family in resolved.service.families:
        endpoints = [e for e in resolved.endpoints if e.family == family]
        decision = categorize(resolved.service, endpoints, node, prefer_same_node=prefer_same_node)
        serving = tuple(e for e in endpoints if e.serving)
        out.append(ServicePortPlan(resolved.service, family, decision, serving))
    return out


def node_reasons(node: NodeInfo) -> tuple[str, ...]:
    if not node.known:
        return (f"no Node object named {node.name}: zone unknown, zone hints cannot apply",)
    if not node.zone:
        return (f"node {node.name} has no {ZONE_LABEL} label",)
    return ()


def build_plan(state: ClusterState, *, prefer_same_node: bool = True) -> NodePlan:
    node = state.node
    entries: dict[PlanKey, ServicePortPlan] = {}
    for resolved in state.service_ports():
        for p in plan_port(resolved, node, prefer_same_node):
            entries[p.key] = p
    return NodePlan(node, entries, tuple(state.skipped()), node_reasons(node))


def update_plan(
    plan: NodePlan,
    state: ClusterState,
    changed: Iterable[ServicePortName],
    *,
    prefer_same_node: bool = True,
) -> NodePlan:
    """A new plan recomputing only the changed service ports.

    Cost grows with the number of changed ports, not with the cluster size
    (the entry mapping is copied, which is a cheap dict copy).
    """
    changed = set(changed)
    node = state.node
    # dict() copies with the stored hashes; filtering with a comprehension
    # re-hashed every key (a Python-level dataclass hash) and made one
    # endpoint change cost 7 ms at 10k services (bench/plan_scale.py).
    entries = dict(plan.entries)
    for name in changed:
        for family in (4, 6):
            entries.pop((name, family), None)
    for name in changed:
        resolved = state.service_port(name)
        if resolved is not None:
            for p in plan_port(resolved, node, prefer_same_node):
                entries[p.key] = p
    return NodePlan(
        node, entries, tuple(state.skipped()), node_reasons(node), changed=frozenset(changed)
    )


@dataclass(frozen=True)
class EntryChanges:
    """The entries of the service ports that changed, in the old and the new plan."""

    before: tuple[ServicePortPlan, ...]
    after: tuple[ServicePortPlan, ...]


def entry_changes(old: NodePlan | None, new: NodePlan) -> EntryChanges | None:
    """What differs from ``old`` to ``new``, when ``new`` was made by
    ``update_plan(old, ...)``; None when that is unknown (no old plan, or a
    plan built from scratch): the caller then looks at every entry.
    """
    if old is None or new.changed is None:
        return None
    keys = [(name, family) for name in new.changed for family in (4, 6)]
    return EntryChanges(
        before=tuple(old.entries[k] for k in keys if k in old.entries),
        after=tuple(new.entries[k] for k in keys if k in new.entries),
    )
