"""NodePlan -> what `sliceproxy explain` prints: a stable JSON document for
tools, and a text view for people. Pure functions of the plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.model import Endpoint, ServicePort, endpoint_key
from agent.plan import NodePlan, ServicePortPlan


def _endpoint_list(endpoints: Iterable[Endpoint] | None) -> list[str] | None:
    return None if endpoints is None else sorted({e.key for e in endpoints})


def _union(parts: list[tuple[Endpoint, ...] | None]) -> list[str] | None:
    """Union over families; None only when no family uses that kind."""
    used = [p for p in parts if p is not None]
    if not used:
        return None
    return sorted({e.key for p in used for e in p})


def _affinity(service: ServicePort) -> dict[str, Any]:
    if service.affinity_timeout is None:
        return {"type": "None"}
    return {"type": "ClientIP", "timeoutSeconds": service.affinity_timeout}


def service_port_json(plans: list[ServicePortPlan]) -> dict[str, Any]:
    """One entry per service port; dual-stack families are merged.

    The topology mode is the primary family's; reasons of the secondary
    family are prefixed with it so nothing is lost.
    """
    primary = plans[0]
    svc = primary.service
    reasons: list[str] = []
    for p in plans:
        prefix = f"IPv{p.family}: " if len(plans) > 1 else ""
        reasons += [prefix + r for r in p.decision.reasons]
    return {
        "name": str(svc.name),
        "protocol": svc.protocol,
        "clusterIPs": list(svc.cluster_ips),
        "port": svc.port,
        "nodePort": svc.node_port,
        "externalIPs": list(svc.external_ips),
        "loadBalancerIPs": list(svc.load_balancer_ips),
        "internalTrafficPolicy": svc.internal_traffic_policy,
        "externalTrafficPolicy": svc.external_traffic_policy,
        "sessionAffinity": _affinity(svc),
        "topologyMode": primary.decision.topology_mode,
        "clusterEndpoints": _union([p.decision.cluster for p in plans]),
        "localEndpoints": _union([p.decision.local for p in plans]),
        "allReachableEndpoints": _union([p.decision.all_reachable for p in plans]) or [],
        "hasAnyEndpoints": any(p.decision.has_any_endpoints for p in plans),
        "reasons": reasons,
    }


def _selected(plan: NodePlan, service: str | None) -> list[list[ServicePortPlan]]:
    groups = plan.by_name()
    names = sorted(groups, key=lambda n: (str(n), n.protocol))
    return [groups[n] for n in names if service is None or n.service == service]


def plan_json(plan: NodePlan, service: str | None = None) -> dict[str, Any]:
    skipped = [
        {"object": s.object, "reason": s.reason}
        for s in plan.skipped
        if service is None or s.object.split(" ", 1)[1] == service
    ]
    return {
        "node": {"name": plan.node.name, "zone": plan.node.zone},
        "servicePorts": [service_port_json(g) for g in _selected(plan, service)],
        "skipped": skipped,
    }


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)


def _endpoint_line(label: str, keys: list[str] | None, style: _Style) -> str:
    if keys is None:
        return f"  {label:<10} {style.dim('(not used)')}"
    if not keys:
        return f"  {label:<10} {style.red('(none)')}"
    return f"  {label:<10} {style.green(', '.join(keys))}"


def plan_text(plan: NodePlan, service: str | None = None, color: bool = False) -> str:
    style = _Style(color)
    doc = plan_json(plan, service)
    zone = plan.node.zone or "(no zone label)"
    lines = [style.bold(f"node {plan.node.name}") + f"  zone {zone}"]
    lines += [style.yellow(f"  ! {r}") for r in plan.node_reasons]
    for sp in doc["servicePorts"]:
        lines.append("")
        lines.append(style.bold(f"{sp['name']} {sp['protocol']}"))
        addrs = [endpoint_key(ip, sp["port"]) for ip in sp["clusterIPs"]]
        if sp["nodePort"]:
            addrs.append(f"nodePort {sp['nodePort']}")
        addrs += [f"external {ip}" for ip in sp["externalIPs"]]
        addrs += [f"lb {ip}" for ip in sp["loadBalancerIPs"]]
        lines.append(f"  {'address':<10} {', '.join(addrs)}")
        policy = f"internal {sp['internalTrafficPolicy']}, external {sp['externalTrafficPolicy']}"
        aff = sp["sessionAffinity"]
        if aff["type"] == "ClientIP":
            policy += f", affinity ClientIP {aff['timeoutSeconds']}s"
        lines.append(f"  {'policy':<10} {policy}")
        lines.append(f"  {'topology':<10} {sp['topologyMode'] or '(none)'}")
        lines.append(_endpoint_line("cluster", sp["clusterEndpoints"], style))
        lines.append(_endpoint_line("local", sp["localEndpoints"], style))
        lines.append(_endpoint_line("reachable", sp["allReachableEndpoints"], style))
        if not sp["hasAnyEndpoints"]:
            lines.append(f"  {'':<10} {style.red('no usable endpoints anywhere: rejected')}")
        for reason in sp["reasons"]:
            lines.append(style.dim(f"  - {reason}"))
    if doc["skipped"]:
        lines.append("")
        lines.append(style.bold("skipped"))
        lines += [f"  {s['object']}: {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"
