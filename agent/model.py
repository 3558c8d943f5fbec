"""The model: frozen, validated, backend-neutral facts about services,
endpoints and this node. Built only by agent/state.py from raw API objects.

The classes use ``slots=True``: a 100k-endpoint cluster holds hundreds of
thousands of these, and slots make each one smaller and cheaper to build
(bench/plan_scale.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# Kubernetes' default ClientIP affinity timeout (3 hours), as the API defaults it.
DEFAULT_AFFINITY_TIMEOUT = 10800

ZONE_LABEL = "topology.kubernetes.io/zone"

TRAFFIC_CLUSTER = "Cluster"
TRAFFIC_LOCAL = "Local"


def ip_family(ip: str) -> int:
    """4 or 6 for an address or CIDR string."""
    return 6 if ":" in ip else 4


def endpoint_key(ip: str, port: int) -> str:
    """kube-proxy's Endpoint.String(): ``ip:port``, ``[ip]:port`` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def normalize_ip(ip: str) -> str:
    """Canonical text of an address (raises ValueError when it is not one)."""
    return str(ipaddress.ip_address(ip))


@dataclass(frozen=True, order=True, slots=True)
class ServicePortName:
    """kube-proxy's ServicePortName: ``namespace/name:port`` plus protocol."""

    namespace: str
    name: str
    port: str
    protocol: str

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        # Upstream prints the port name only when there is one (types.go).
        return f"{self.service}:{self.port}" if self.port else self.service


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, with everything the rules depend on."""

    name: ServicePortName
    cluster_ips: tuple[str, ...]
    port: int
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    # Only ingress IPs whose ipMode is unset or "VIP" (kube-proxy ignores
    # "Proxy" ones: the load balancer delivers to the node, not to the VIP).
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    # None: no session affinity; else the ClientIP affinity timeout (s).
    affinity_timeout: int | None = None
    internal_traffic_policy: str = TRAFFIC_CLUSTER
    external_traffic_policy: str = TRAFFIC_CLUSTER
    health_check_node_port: int | None = None

    @property
    def protocol(self) -> str:
        return self.name.protocol

    @property
    def families(self) -> tuple[int, ...]:
        """The IP families this service port is programmed for, primary first."""
        seen: list[int] = []
        for ip in self.cluster_ips:
            fam = ip_family(ip)
            if fam not in seen:
                seen.append(fam)
        return tuple(seen)

    def cluster_ip(self, family: int) -> str | None:
        return next((ip for ip in self.cluster_ips if ip_family(ip) == family), None)

    def external_ips_of(self, family: int) -> tuple[str, ...]:
        return tuple(ip for ip in self.external_ips if ip_family(ip) == family)

    def load_balancer_ips_of(self, family: int) -> tuple[str, ...]:
        return tuple(ip for ip in self.load_balancer_ips if ip_family(ip) == family)

    def source_ranges_of(self, family: int) -> tuple[str, ...]:
        return tuple(c for c in self.load_balancer_source_ranges if ip_family(c) == family)

    @property
    def externally_accessible(self) -> bool:
        """NodePort, external IP or usable LB IP (topology.go's definition)."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def internal_policy_local(self) -> bool:
        return self.internal_traffic_policy == TRAFFIC_LOCAL

    @property
    def external_policy_local(self) -> bool:
        # externalTrafficPolicy only means something for external traffic.
        return self.externally_accessible and self.external_traffic_policy == TRAFFIC_LOCAL

    @property
    def uses_cluster_endpoints(self) -> bool:
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or self.external_policy_local


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """One endpoint of one service port, as kube-proxy's BaseEndpointInfo."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = field(default_factory=frozenset)
    node_hints: frozenset[str] = field(default_factory=frozenset)
    is_local: bool = False

    @property
    def key(self) -> str:
        return endpoint_key(self.ip, self.port)

    @property
    def family(self) -> int:
        return ip_family(self.ip)

    @property
    def serving_terminating(self) -> bool:
        return self.serving and self.terminating

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node, as far as service proxying cares."""

    name: str
    zone: str = ""
    addresses: tuple[str, ...] = ()
    # False when no Node object was found for this name.
    known: bool = True
