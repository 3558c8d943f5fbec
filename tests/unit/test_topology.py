"""CategorizeEndpoints, table-driven: every branch of kube-proxy's decision.

Each case names the behaviour it pins; expected sets are written as
``ip:port`` keys (None = that kind of endpoints is not used).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from agent.topology import MODE_NONE, MODE_SAME_NODE, MODE_SAME_ZONE, categorize

NODE = NodeInfo(name="node-a", zone="zone-a")
NAME = ServicePortName("ns", "svc", "http", "TCP")


def svc(**kw: object) -> ServicePort:
    base: dict[str, object] = {"name": NAME, "cluster_ips": ("10.96.0.1",), "port": 80}
    base.update(kw)
    return ServicePort(**base)  # type: ignore[arg-type]


def ep(
    ip: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
    port: int = 80,
) -> Endpoint:
    return Endpoint(
        ip=ip,
        port=port,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name="node-a" if local else "node-x",
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
        is_local=local,
    )


def term(ip: str, *, local: bool = False, zones: tuple[str, ...] = ()) -> Endpoint:
    """Serving but terminating (graceful drain)."""
    return ep(ip, ready=False, serving=True, terminating=True, local=local, zones=zones)


def unready(ip: str, *, local: bool = False, zones: tuple[str, ...] = ()) -> Endpoint:
    return ep(ip, ready=False, serving=False, local=local, zones=zones)


CLUSTER = svc()
ITP_LOCAL = svc(internal_traffic_policy="Local")
ETP_LOCAL_NODEPORT = svc(node_port=30080, external_traffic_policy="Local")
ETP_LOCAL_NOT_EXTERNAL = svc(external_traffic_policy="Local")
BOTH_LOCAL = svc(node_port=30080, internal_traffic_policy="Local", external_traffic_policy="Local")


@dataclass(frozen=True)
class Case:
    id: str
    service: ServicePort
    endpoints: tuple[Endpoint, ...]
    cluster: tuple[str, ...] | None
    local: tuple[str, ...] | None
    reachable: tuple[str, ...]
    mode: str = MODE_NONE
    has_any: bool = True
    node: NodeInfo = NODE
    same_node: bool = True
    reason: str = ""  # a substring one of the reasons must contain
    extra: dict[str, object] = field(default_factory=dict)


A, B, C, D = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"


def k(*ips: str) -> tuple[str, ...]:
    return tuple(f"{ip}:80" if ":" not in ip else f"[{ip}]:80" for ip in ips)


CASES = [
    Case("no endpoints", CLUSTER, (), (), None, (), has_any=False, reason="no endpoints"),
    Case("all ready used", CLUSTER, (ep(A), ep(B)), k(A, B), None, k(A, B)),
    Case("unready endpoints excluded", CLUSTER, (ep(A), unready(B)), k(A), None, k(A)),
    Case(
        "only unready: nothing, has-any false",
        CLUSTER,
        (unready(A), unready(B)),
        (),
        None,
        (),
        has_any=False,
        reason="no ready or serving-terminating",
    ),
    Case(
        "terminating fallback when no ready endpoint",
        CLUSTER,
        (term(A), term(B), unready(C)),
        k(A, B),
        None,
        k(A, B),
        reason="using 2 serving-terminating endpoints",
    ),
    Case(
        "terminating ignored while any ready endpoint exists",
        CLUSTER,
        (ep(A), term(B)),
        k(A),
        None,
        k(A),
    ),
    Case(
        "terminating but not serving is never used",
        CLUSTER,
        (ep(A, ready=False, serving=False, terminating=True),),
        (),
        None,
        (),
        has_any=False,
    ),
    Case(
        "zone hints applied",
        CLUSTER,
        (ep(A, zones=("zone-a",)), ep(B, zones=("zone-b",)), ep(C, zones=("zone-a",))),
        k(A, C),
        None,
        k(A, C),
        mode=MODE_SAME_ZONE,
        reason="zone hints",
    ),
    Case(
        "zone hints ignored when one ready endpoint lacks them",
        CLUSTER,
        (ep(A, zones=("zone-a",)), ep(B)),
        k(A, B),
        None,
        k(A, B),
        reason=f"endpoint {B}:80 has no zone hint",
    ),
    Case(
        "terminating endpoints without hints do not disable hints",
        CLUSTER,
        (ep(A, zones=("zone-a",)), ep(B, zones=("zone-b",)), term(C)),
        k(A),
        None,
        k(A),
        mode=MODE_SAME_ZONE,
    ),
    Case(
        "unready endpoints without hints do not disable hints",
        CLUSTER,
        (ep(A, zones=("zone-a",)), unready(B)),
        k(A),
        None,
        k(A),
        mode=MODE_SAME_ZONE,
    ),
    Case(
        "only unready endpoints in our zone: hints ignored, all ready used",
        CLUSTER,
        (unready(A, zones=("zone-a",)), ep(B, zones=("zone-b",)), ep(C, zones=("zone-c",))),
        k(B, C),
        None,
        k(B, C),
        reason="no ready endpoint is hinted for zone zone-a",
    ),
    Case(
        "node without zone label: hints ignored",
        CLUSTER,
        (ep(A, zones=("zone-a",)), ep(B, zones=("zone-b",))),
        k(A, B),
        None,
        k(A, B),
        node=NodeInfo(name="node-a"),
        reason="node has no topology.kubernetes.io/zone label",
    ),
    Case(
        "multiple zone hints per endpoint",
        CLUSTER,
        (ep(A, zones=("zone-b", "zone-a")), ep(B, zones=("zone-b",)), ep(C, zones=("zone-c",))),
        k(A),
        None,
        k(A),
        mode=MODE_SAME_ZONE,
    ),
    Case(
        "no ready endpoint at all: zone hints moot, terminating fallback ignores topology",
        CLUSTER,
        (term(A, zones=("zone-b",)), term(B, zones=("zone-a",))),
        k(A, B),
        None,
        k(A, B),
    ),
    Case(
        "node hints: PreferSameNode",
        CLUSTER,
        (ep(A, nodes=("node-a",), zones=("zone-a",)), ep(B, nodes=("node-b",), zones=("zone-a",))),
        k(A),
        None,
        k(A),
        mode=MODE_SAME_NODE,
    ),
    Case(
        "node hints off by feature gate: zone hints apply instead",
        CLUSTER,
        (ep(A, nodes=("node-a",), zones=("zone-a",)), ep(B, nodes=("node-b",), zones=("zone-a",))),
        k(A, B),
        None,
        k(A, B),
        mode=MODE_SAME_ZONE,
        same_node=False,
    ),
    Case(
        "node hints for other nodes only: fall back to zone hints",
        CLUSTER,
        (ep(A, nodes=("node-b",), zones=("zone-a",)), ep(B, nodes=("node-c",), zones=("zone-b",))),
        k(A),
        None,
        k(A),
        mode=MODE_SAME_ZONE,
        reason="no ready endpoint is hinted for node node-a",
    ),
    Case(
        "one endpoint lacks a node hint: zone hints apply",
        CLUSTER,
        (ep(A, nodes=("node-a",), zones=("zone-a",)), ep(B, zones=("zone-a",))),
        k(A, B),
        None,
        k(A, B),
        mode=MODE_SAME_ZONE,
        reason="has no node hint",
    ),
    Case(
        "iTP Local: local ready endpoints only",
        ITP_LOCAL,
        (ep(A, local=True), ep(B)),
        None,
        k(A),
        k(A),
    ),
    Case(
        "iTP Local with only remote endpoints: has-any true, local empty",
        ITP_LOCAL,
        (ep(A), ep(B)),
        None,
        (),
        (),
        reason="no usable endpoint on node node-a",
    ),
    Case(
        "iTP Local falls back to local serving-terminating",
        ITP_LOCAL,
        (term(A, local=True), ep(B)),
        None,
        k(A),
        k(A),
        reason="local serving-terminating",
    ),
    Case(
        "iTP Local ignores local unready endpoints",
        ITP_LOCAL,
        (unready(A, local=True),),
        None,
        (),
        (),
        has_any=False,
    ),
    Case(
        "iTP Local ignores topology hints",
        ITP_LOCAL,
        (ep(A, local=True, zones=("zone-b",)), ep(B, zones=("zone-a",))),
        None,
        k(A),
        k(A),
    ),
    Case(
        "eTP Local without external access behaves as Cluster",
        ETP_LOCAL_NOT_EXTERNAL,
        (ep(A, local=True), ep(B)),
        k(A, B),
        None,
        k(A, B),
    ),
    Case(
        "eTP Local NodePort: cluster for internal, local for external",
        ETP_LOCAL_NODEPORT,
        (ep(A, local=True), ep(B)),
        k(A, B),
        k(A),
        k(A, B),
    ),
    Case(
        "eTP Local with only remote endpoints: local empty, has-any true",
        ETP_LOCAL_NODEPORT,
        (ep(A), ep(B)),
        k(A, B),
        (),
        k(A, B),
        reason="traffic is dropped",
    ),
    Case(
        "union: cluster topology plus external Local",
        ETP_LOCAL_NODEPORT,
        (ep(A, local=True, zones=("zone-b",)), ep(B, zones=("zone-a",))),
        k(B),
        k(A),
        k(A, B),
        mode=MODE_SAME_ZONE,
        reason="union",
    ),
    Case(
        "union: local terminating plus remote ready",
        ETP_LOCAL_NODEPORT,
        (term(A, local=True), ep(B)),
        k(B),
        k(A),
        k(A, B),
    ),
    Case(
        "eTP Local: only terminating anywhere",
        ETP_LOCAL_NODEPORT,
        (term(A, local=True), term(B)),
        k(A, B),
        k(A),
        k(A, B),
    ),
    Case(
        "both policies Local: cluster still used (externally accessible)",
        BOTH_LOCAL,
        (ep(A, local=True), ep(B)),
        k(A, B),
        k(A),
        k(A, B),
    ),
    Case(
        "has-any with Local policy counts remote terminating",
        ITP_LOCAL,
        (term(B),),
        None,
        (),
        (),
        has_any=True,
    ),
    Case(
        "IPv6 endpoints",
        svc(cluster_ips=("fd00::1",)),
        (ep("fd00::a", zones=("zone-a",)), ep("fd00::b", zones=("zone-b",))),
        k("fd00::a"),
        None,
        k("fd00::a"),
        mode=MODE_SAME_ZONE,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_categorize(case: Case) -> None:
    d = categorize(case.service, case.endpoints, case.node, prefer_same_node=case.same_node)
    keys = lambda eps: None if eps is None else tuple(sorted(e.key for e in eps))  # noqa: E731
    assert keys(d.cluster) == (None if case.cluster is None else tuple(sorted(case.cluster)))
    assert keys(d.local) == (None if case.local is None else tuple(sorted(case.local)))
    assert keys(d.all_reachable) == tuple(sorted(case.reachable))
    assert d.topology_mode == case.mode
    assert d.has_any_endpoints == case.has_any
    if case.reason:
        assert any(case.reason in r for r in d.reasons), d.reasons


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_cluster_empty_list_vs_not_used() -> None:
    """[] means "uses cluster endpoints but none usable"; None means "not used"."""
    used = categorize(CLUSTER, (unready(A),), NODE)
    assert used.cluster == ()
    not_used = categorize(ITP_LOCAL, (ep(A),), NODE)
    assert not_used.cluster is None
