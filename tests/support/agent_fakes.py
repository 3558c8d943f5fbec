"""Fakes for the agent runtime tests: a clock that moves only when told, a
backend that records what it was asked, and small API object builders."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from agent.backends.base import SyncResult
from agent.model import ServicePortName
from agent.plan import NodePlan
from agent.sources.events import ObjectEvent

NODE = "node-a"
ZONE_LABEL = "topology.kubernetes.io/zone"


class FakeClock:
    """Monotonic or wall seconds, advanced explicitly."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class SyncCall:
    plan: NodePlan
    changed: frozenset[ServicePortName] | None


@dataclass
class FakeBackend:
    """Records every sync; ``fail_next`` makes the next N syncs fail."""

    name: str = "fake"
    calls: list[SyncCall] = field(default_factory=list)
    fail_next: int = 0
    rule_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    # Advanced by ``sync_seconds`` during each sync, to model a slow kernel.
    clock: FakeClock | None = None
    sync_seconds: float = 0.0

    def render(self, plan: NodePlan) -> str:
        lines = []
        for key in sorted(plan.entries):
            entry = plan.entries[key]
            eps = ",".join(e.key for e in entry.decision.all_reachable)
            lines.append(f"{entry.name} IPv{entry.family} -> {eps or '-'}\n")
        return "".join(lines)

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        self.calls.append(SyncCall(plan, None if changed is None else frozenset(changed)))
        if self.clock is not None:
            self.clock.advance(self.sync_seconds)
        kind = "full" if changed is None else "partial"
        if self.fail_next > 0:
            self.fail_next -= 1
            return SyncResult(kind=kind, ok=False, error="injected failure")
        return SyncResult(
            kind=kind,
            ok=True,
            service_ports_changed=len(changed or ()),
            rules_written=len(plan.entries),
            rule_counts=dict(self.rule_counts),
        )

    def cleanup(self) -> int:
        return 0

    @property
    def kinds(self) -> list[str]:
        return ["full" if c.changed is None else "partial" for c in self.calls]


# ---------------------------------------------------------------- objects


def service(
    name: str = "web",
    ns: str = "default",
    ip: str = "10.96.0.10",
    port: int = 80,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIPs": [ip],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            **spec,
        },
    }


def lb_local_service(
    name: str = "lb", ns: str = "default", ip: str = "10.96.0.20", hc_port: int = 32000
) -> dict[str, Any]:
    """A LoadBalancer with externalTrafficPolicy Local and a healthCheckNodePort."""
    svc = service(
        name,
        ns,
        ip,
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=hc_port,
    )
    svc["spec"]["ports"][0]["nodePort"] = 31000
    return svc


def endpoint(ip: str, node: str = "node-b", ready: bool = True, **cond: bool) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node, "conditions": {"ready": ready, **cond}}


def eslice(
    name: str,
    service_name: str,
    *endpoints: dict[str, Any],
    ns: str = "default",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
            "annotations": annotations or {},
        },
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str = NODE, zone: str = "", **extra: Any) -> dict[str, Any]:
    labels = {ZONE_LABEL: zone} if zone else {}
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]},
    }
    obj.update(extra)
    return obj


def up(obj: dict[str, Any]) -> ObjectEvent:
    return ObjectEvent("upsert", obj["kind"], obj, "test")


def down(obj: dict[str, Any]) -> ObjectEvent:
    return ObjectEvent("delete", obj["kind"], obj, "test")


def spn(name: str = "web", ns: str = "default") -> ServicePortName:
    return ServicePortName(ns, name, "http", "TCP")


# ---------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: str


# No proxy, whatever the environment says: test traffic stays on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5.0) -> Response:
    """GET that returns 4xx/5xx responses instead of raising."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return Response(resp.status, dict(resp.headers), resp.read().decode())
    except urllib.error.HTTPError as err:
        with err:
            return Response(err.code, dict(err.headers), err.read().decode())
