"""Small plans, one per iptables feature: shared by the golden files, the
tracer tests and the e2e tests. Built from model objects (not manifests) so
each case states exactly the decision it feeds the renderer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.backends.iptables.options import RenderOptions
from agent.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from agent.plan import NodePlan, plan_port
from agent.state import ResolvedPort

NODE = "node-a"
NODE_IP4 = "192.168.0.10"
NODE_IP6 = "fd00:192::10"
CLUSTER_CIDR4 = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd00:10:244::/48"
POD_LOCAL4 = "10.244.1.5"  # a pod on this node
REMOTE4 = "198.51.100.7"  # a client outside the cluster

NODE_INFO = NodeInfo(NODE, zone="zone-a", addresses=(NODE_IP4, NODE_IP6))
OPTIONS = RenderOptions(cluster_cidrs=(CLUSTER_CIDR4, CLUSTER_CIDR6), node_ips=(NODE_IP4, NODE_IP6))


def service(
    name: str,
    cluster_ips: Sequence[str],
    *,
    port: int = 80,
    port_name: str = "http",
    protocol: str = "TCP",
    namespace: str = "default",
    **kw: object,
) -> ServicePort:
    return ServicePort(
        ServicePortName(namespace, name, port_name, protocol), tuple(cluster_ips), port, **kw
    )  # type: ignore[arg-type]


def endpoint(ip: str, port: int = 8080, *, local: bool = False, ready: bool = True) -> Endpoint:
    return Endpoint(
        ip, port, ready=ready, serving=ready, node_name=NODE if local else "node-b", is_local=local
    )


def plan(*ports: tuple[ServicePort, Sequence[Endpoint]], node: NodeInfo = NODE_INFO) -> NodePlan:
    entries = {}
    for svc, eps in ports:
        for p in plan_port(ResolvedPort(svc, tuple(eps)), node, True):
            entries[p.key] = p
    return NodePlan(node, entries)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], NodePlan]
    options: RenderOptions = OPTIONS


THREE = (endpoint("10.244.1.2", local=True), endpoint("10.244.2.2"), endpoint("10.244.3.2"))

CASES: tuple[Case, ...] = (
    Case("clusterip", lambda: plan((service("web", ["10.96.0.10"]), THREE))),
    Case(
        "nodeport",
        lambda: plan((service("np", ["10.96.0.11"], node_port=30080), THREE)),
    ),
    Case(
        "etp-local",
        lambda: plan(
            (
                service(
                    "ingress",
                    ["10.96.0.12"],
                    node_port=30443,
                    load_balancer_ips=("203.0.113.20",),
                    external_traffic_policy="Local",
                    health_check_node_port=32000,
                ),
                THREE,
            )
        ),
    ),
    Case(
        "etp-local-no-local-endpoints",
        lambda: plan(
            (
                service(
                    "ingress",
                    ["10.96.0.12"],
                    node_port=30443,
                    load_balancer_ips=("203.0.113.20",),
                    external_traffic_policy="Local",
                ),
                THREE[1:],
            )
        ),
    ),
    Case(
        "itp-local",
        lambda: plan(
            (service("dns", ["10.96.0.53"], port=53, internal_traffic_policy="Local"), THREE),
            (
                service("dns-none", ["10.96.0.54"], port=53, internal_traffic_policy="Local"),
                THREE[1:],
            ),
        ),
    ),
    Case(
        "no-endpoints",
        lambda: plan(
            (
                service(
                    "reports",
                    ["10.96.0.110"],
                    node_port=30110,
                    external_ips=("192.0.2.50",),
                    load_balancer_ips=("203.0.113.30",),
                ),
                (),
            )
        ),
    ),
    Case(
        "lb-source-ranges",
        lambda: plan(
            (
                service(
                    "shop",
                    ["10.96.0.30"],
                    port=443,
                    node_port=31443,
                    load_balancer_ips=("203.0.113.10",),
                    load_balancer_source_ranges=("198.51.100.0/24", "192.168.0.0/24"),
                ),
                THREE[1:],
            )
        ),
    ),
    Case(
        "external-ips",
        lambda: plan(
            (service("gw", ["10.96.0.40"], port=8080, external_ips=("192.0.2.50",)), THREE[:2])
        ),
    ),
    Case(
        "affinity",
        lambda: plan((service("session", ["10.96.0.50"], affinity_timeout=600), THREE[:2])),
    ),
    Case(
        "ipv6",
        lambda: plan(
            (
                service("web6", ["fd00:10:96::a"], node_port=30606),
                (
                    endpoint("fd00:10:244:1::2", local=True),
                    endpoint("fd00:10:244:2::2"),
                ),
            ),
            (
                service("dual", ["10.96.0.70", "fd00:10:96::46"], protocol="UDP", port=53),
                (endpoint("10.244.1.14", 53, local=True), endpoint("fd00:10:244:1::e", 53)),
            ),
        ),
    ),
    Case(
        "masquerade-all",
        lambda: plan((service("web", ["10.96.0.10"], node_port=30081), THREE[:1])),
        RenderOptions(masquerade_all=True, masquerade_bit=13, node_ips=(NODE_IP4,)),
    ),
    Case(
        "nodeport-addresses",
        lambda: plan((service("np", ["10.96.0.11"], node_port=30080), THREE[:1])),
        RenderOptions(
            cluster_cidrs=(CLUSTER_CIDR4,),
            node_ips=(NODE_IP4, NODE_IP6),
            nodeport_addresses=("192.168.0.0/16", "127.0.0.0/8"),
            random_fully=False,
        ),
    ),
)

CASES_BY_NAME = {case.name: case for case in CASES}
