"""The decision: which endpoints this node uses for one service port.

A faithful port of kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go),
plus the reasons in plain words so that `sliceproxy explain` can say *why*.
Pure: no state, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.model import ZONE_LABEL, Endpoint, NodeInfo, ServicePort

MODE_NONE = ""
MODE_SAME_ZONE = "PreferSameZone"
MODE_SAME_NODE = "PreferSameNode"


@dataclass(frozen=True)
class Decision:
    """The outcome for one service port and one IP family.

    ``cluster``/``local`` are None when the service port does not use that
    kind of endpoints, and empty when it does but none are usable.
    """

    cluster: tuple[Endpoint, ...] | None
    local: tuple[Endpoint, ...] | None
    all_reachable: tuple[Endpoint, ...]
    topology_mode: str
    has_any_endpoints: bool
    reasons: tuple[str, ...]


def _keys(endpoints: Sequence[Endpoint]) -> str:
    return ", ".join(e.key for e in endpoints)


def _filter(
    endpoints: Sequence[Endpoint], keep: Callable[[Endpoint], bool]
) -> tuple[Endpoint, ...]:
    return tuple(e for e in endpoints if keep(e))


def topology_mode(
    endpoints: Sequence[Endpoint], node: NodeInfo, prefer_same_node: bool, reasons: list[str]
) -> str:
    """topologyModeFromHints: only Ready endpoints are looked at."""
    ready = [e for e in endpoints if e.ready]
    if not ready:
        return MODE_NONE
    without_node_hint = [e for e in ready if not e.node_hints]
    without_zone_hint = [e for e in ready if not e.zone_hints]
    for_node = any(node.name in e.node_hints for e in ready)
    for_zone = bool(node.zone) and any(node.zone in e.zone_hints for e in ready)

    if prefer_same_node:
        if not without_node_hint and for_node:
            reasons.append(f"node hints: every ready endpoint has one, some name {node.name}")
            return MODE_SAME_NODE
        if not without_node_hint:
            reasons.append(f"node hints ignored: no ready endpoint is hinted for node {node.name}")
        elif len(without_node_hint) < len(ready):
            reasons.append(
                f"node hints ignored: endpoint {without_node_hint[0].key} has no node hint"
            )

    has_any_zone_hint = len(without_zone_hint) < len(ready)
    if not without_zone_hint:
        if for_zone:
            reasons.append(f"zone hints: every ready endpoint has one, some name zone {node.zone}")
            return MODE_SAME_ZONE
        if not node.zone:
            reasons.append(f"zone hints ignored: node has no {ZONE_LABEL} label")
        else:
            reasons.append(f"zone hints ignored: no ready endpoint is hinted for zone {node.zone}")
    elif has_any_zone_hint:
        reasons.append(f"zone hints ignored: endpoint {without_zone_hint[0].key} has no zone hint")
    return MODE_NONE


def _available(ep: Endpoint, mode: str, node: NodeInfo) -> bool:
    if mode == MODE_SAME_NODE:
        return node.name in ep.node_hints
    if mode == MODE_SAME_ZONE:
        return node.zone in ep.zone_hints
    return True


def categorize(
    service: ServicePort,
    endpoints: Sequence[Endpoint],
    node: NodeInfo,
    *,
    prefer_same_node: bool = True,
) -> Decision:
    """kube-proxy's CategorizeEndpoints for the endpoints of one family."""
    reasons: list[str] = []
    mode = MODE_NONE
    cluster: tuple[Endpoint, ...] | None = None
    local: tuple[Endpoint, ...] | None = None
    has_any = False

    if not endpoints:
        reasons.append("no endpoints")

    if service.uses_cluster_endpoints:
        mode = topology_mode(endpoints, node, prefer_same_node, reasons)
        cluster = _filter(endpoints, lambda e: e.ready and _available(e, mode, node))
        if not cluster:
            # No per-endpoint topology fallback: the fallback lives in the mode
            # choice. Here there is no ready endpoint anywhere.
            cluster = _filter(endpoints, lambda e: e.serving_terminating)
            if cluster:
                reasons.append(
                    f"no ready endpoints: using {len(cluster)} serving-terminating "
                    f"endpoint{'s' if len(cluster) != 1 else ''}"
                )
            elif endpoints:
                reasons.append("no ready or serving-terminating endpoints")
        elif mode == MODE_NONE:
            reasons.append(f"using all {len(cluster)} ready endpoint(s)")
        has_any = bool(cluster)
    else:
        reasons.append(
            "internalTrafficPolicy Local and not externally accessible: cluster endpoints not used"
        )

    if not service.uses_local_endpoints:
        return Decision(cluster, None, cluster or (), mode, has_any, tuple(reasons))

    why_local = (
        "internalTrafficPolicy Local"
        if service.internal_policy_local
        else "externalTrafficPolicy Local"
    )
    has_local_ready = has_local_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            has_local_ready = has_local_ready or ep.is_local
        elif ep.serving_terminating:
            has_any = True
            has_local_terminating = has_local_terminating or ep.is_local

    using_terminating = False
    if has_local_ready:
        local = _filter(endpoints, lambda e: e.is_local and e.ready)
        reasons.append(f"{why_local}: {len(local)} ready endpoint(s) on node {node.name}")
    elif has_local_terminating:
        using_terminating = True
        local = _filter(endpoints, lambda e: e.is_local and e.serving_terminating)
        reasons.append(
            f"{why_local}: no ready endpoint on node {node.name}, "
            f"using {len(local)} local serving-terminating endpoint(s)"
        )
    else:
        local = ()
        tail = " (traffic is dropped)" if has_any else ""
        reasons.append(f"{why_local}: no usable endpoint on node {node.name}{tail}")

    if cluster is None:
        return Decision(None, local, local, mode, has_any, tuple(reasons))

    if mode == MODE_NONE and not using_terminating:
        # cluster holds every ready endpoint and local only ready ones, so
        # cluster is already a superset of local.
        return Decision(cluster, local, cluster, mode, has_any, tuple(reasons))

    union = {e.key: e for e in cluster}
    union.update({e.key: e for e in local})
    merged = tuple(sorted(union.values(), key=lambda e: e.key))
    reasons.append(f"reachable: union of cluster and local endpoints ({_keys(merged)})")
    return Decision(cluster, local, merged, mode, has_any, tuple(reasons))
