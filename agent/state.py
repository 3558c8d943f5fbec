"""ClusterState: Services, merged EndpointSlices and this Node.

``apply(event)`` validates the object, updates the cache and returns the
service ports whose inputs changed: the hook that lets the sync loop
recompute and rewrite only those.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from agent.parse import (
    Invalid,
    ParsedService,
    ParsedSlice,
    Problem,
    metadata,
    parse_node,
    parse_service,
    parse_slice,
)
from agent.sources.events import ObjectEvent

ServiceKey = tuple[str, str]  # (namespace, name)

# Problems kept for `explain` and tests. A long-running agent fed a stream
# of bad updates (a controller rewriting the same broken object) must not
# grow without bound; the newest ones are the useful ones, and every
# problem is also logged and counted when it happens.
MAX_PROBLEMS = 1000


@dataclass(frozen=True)
class ResolvedPort:
    """A service port with the merged endpoints of all its slices."""

    service: ServicePort
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Skipped:
    object: str  # e.g. "Service default/legacy"
    reason: str


class ClusterState:
    """The cache of everything the decision needs, for one node."""

    def __init__(
        self,
        node_name: str,
        proxy_name: str = "",
        on_problem: Callable[[Problem], None] | None = None,
        max_problems: int = MAX_PROBLEMS,
    ) -> None:
        self.node_name = node_name
        self.proxy_name = proxy_name
        self._on_problem = on_problem
        self._problems: deque[Problem] = deque(maxlen=max_problems)
        # Every problem ever reported, including those the bound dropped.
        self.problems_total = 0
        self._services: dict[ServiceKey, ParsedService] = {}
        self._slices: dict[ServiceKey, ParsedSlice] = {}  # (namespace, slice name)
        self._slices_of: dict[ServiceKey, set[str]] = {}  # service -> slice names
        self._resolved: dict[ServiceKey, dict[ServicePortName, ResolvedPort]] = {}
        self._node: NodeInfo | None = None
        # Kept up to date on every event so that listing skips never costs a
        # walk over every service (partial syncs must not grow with size).
        self._skipped: dict[str, Skipped] = {}

    # ------------------------------------------------------------ queries

    @property
    def node(self) -> NodeInfo:
        """This node; an unknown node has no zone (and ``known=False``)."""
        return self._node or NodeInfo(name=self.node_name, known=False)

    @property
    def problems(self) -> list[Problem]:
        """The most recent problems (at most ``max_problems``), oldest first.

        A copy: callers may keep or sort it while events keep arriving.
        """
        return list(self._problems)

    def service_ports(self) -> Iterator[ResolvedPort]:
        """Every owned service port, in name order."""
        ports = [p for by_name in self._resolved.values() for p in by_name.values()]
        yield from sorted(ports, key=lambda p: p.service.name)

    def service_port(self, name: ServicePortName) -> ResolvedPort | None:
        return self._resolved.get((name.namespace, name.name), {}).get(name)

    def all_names(self) -> set[ServicePortName]:
        return {n for by_name in self._resolved.values() for n in by_name}

    def skipped(self) -> list[Skipped]:
        return sorted(self._skipped.values(), key=lambda s: (s.object, s.reason))

    def _note_skip(self, obj: str, reason: str) -> None:
        if reason:
            self._skipped[obj] = Skipped(obj, reason)
        else:
            self._skipped.pop(obj, None)

    def slices_of(self, namespace: str, service: str) -> list[ParsedSlice]:
        names = sorted(self._slices_of.get((namespace, service), ()))
        return [self._slices[(namespace, n)] for n in names]

    # ------------------------------------------------------------ updates

    def apply(self, event: ObjectEvent) -> set[ServicePortName]:
        """Take one event; return the service ports whose inputs changed.

        An invalid object is reported and ignored: the previous valid version
        (if any) stays in force, so bad input never removes working rules.
        """
        try:
            if event.kind == "Service":
                return self._apply_service(event)
            if event.kind == "EndpointSlice":
                return self._apply_slice(event)
            if event.kind == "Node":
                return self._apply_node(event)
        except Invalid as bad:
            self._report(event, bad.field, bad.message, bad.reason)
        return set()

    def _apply_service(self, event: ObjectEvent) -> set[ServicePortName]:
        namespace, name, _ = metadata(event.obj)
        key = (namespace, name)
        if event.action == "delete":
            self._services.pop(key, None)
            self._note_skip(f"Service {namespace}/{name}", "")
        else:
            parsed = parse_service(event.obj, self.proxy_name)
            self._services[key] = parsed
            self._note_skip(f"Service {namespace}/{name}", parsed.skip_reason)
        return self._resolve(key)

    def _apply_slice(self, event: ObjectEvent) -> set[ServicePortName]:
        namespace, name, _ = metadata(event.obj)
        key = (namespace, name)
        old = self._slices.get(key)
        if event.action == "delete":
            new = None
        else:
            new = parse_slice(event.obj)
            for field, message, reason in new.problems:
                self._report(event, field, message, reason)
        touched: set[ServiceKey] = set()
        if old is not None:
            self._slices.pop(key)
            if old.service:
                self._slices_of.get((namespace, old.service), set()).discard(name)
                touched.add((namespace, old.service))
        unlabelled = new is not None and not new.service
        reason = "no kubernetes.io/service-name label" if unlabelled else ""
        self._note_skip(f"EndpointSlice {namespace}/{name}", reason)
        if new is not None:
            self._slices[key] = new
            if new.service:
                self._slices_of.setdefault((namespace, new.service), set()).add(name)
                touched.add((namespace, new.service))
        changed: set[ServicePortName] = set()
        for svc in touched:
            changed |= self._resolve(svc)
            if not self._slices_of.get(svc):
                self._slices_of.pop(svc, None)
        return changed

    def _apply_node(self, event: ObjectEvent) -> set[ServicePortName]:
        if event.action == "delete":
            if event.name != self.node_name:
                return set()
            new = None
        else:
            node = parse_node(event.obj)
            if node.name != self.node_name:
                return set()
            new = node
        before = self.node
        self._node = new
        # The zone feeds every topology decision: all service ports change.
        return self.all_names() if before.zone != self.node.zone else set()

    def _resolve(self, key: ServiceKey) -> set[ServicePortName]:
        """Recompute one service's ports and endpoints; return what changed."""
        before = self._resolved.get(key, {})
        svc = self._services.get(key)
        after: dict[ServicePortName, ResolvedPort] = {}
        if svc is not None and not svc.skip_reason:
            slices = self.slices_of(*key)
            for port in svc.ports:
                after[port.name] = ResolvedPort(port, merge_endpoints(port.name, slices, self))
        if after:
            self._resolved[key] = after
        else:
            self._resolved.pop(key, None)
        return {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}

    def _report(self, event: ObjectEvent, field: str, message: str, reason: str) -> None:
        problem = Problem(
            origin=event.origin,
            kind=event.kind,
            namespace=event.namespace if event.kind != "Node" else "",
            name=event.name,
            field=field,
            message=message,
            reason=reason,
        )
        self._problems.append(problem)
        self.problems_total += 1
        if self._on_problem is not None:
            self._on_problem(problem)


def merge_endpoints(
    name: ServicePortName, slices: list[ParsedSlice], state: ClusterState
) -> tuple[Endpoint, ...]:
    """The endpoints of one service port across all of its slices.

    Slices are visited in name order so the result never depends on arrival
    order. A slice port matches by name and protocol. The same ``ip:port`` in
    several slices keeps the first copy, unless a later copy is not
    terminating while the kept one is: a running pod that reused the IP of a
    terminating one wins (shared/reference/kube-proxy.md).
    """
    merged: dict[str, Endpoint] = {}
    node_name = state.node_name
    for sl in slices:
        if sl.family == 0:
            continue  # FQDN slices are not proxied
        for sp in sl.ports:
            if sp.name != name.port or sp.protocol != name.protocol:
                continue
            port = sp.port
            for raw in sl.endpoints:
                ep = raw.bind(port, node_name)
                # endpoint_key inline: this loop runs once per endpoint and
                # port on a full load (100k times at bench scale).
                key = f"[{ep.ip}]:{port}" if ":" in ep.ip else f"{ep.ip}:{port}"
                kept = merged.get(key)
                if kept is None or (kept.terminating and not ep.terminating):
                    merged[key] = ep
    # Sorting the keys alone is sorting by (family, key): IPv4 keys begin
    # with a digit and IPv6 keys with "[", which sorts after every digit.
    return tuple([merged[k] for k in sorted(merged)])
