"""The iptables backend against a real kernel: real rules, real packets.

One node namespace gets the rules from the real ``sliceproxy apply`` command
(run inside it, as the DaemonSet would run on a node); pod namespaces around
it serve HTTP and UDP at the EndpointSlice addresses; client namespaces stand
outside the cluster. Every reply names the pod that answered and the source
address it saw, so a test can tell which endpoints a service reaches and
whether the path was masqueraded.

Cost: one topology per iptables backend (legacy, nft), shared by the whole
module, with every feature's service applied in one go: each feature is a
small manifest file of its own, and the state directory holds them all.
Conntrack is flushed before each test so that no test inherits another's
flows.

Addresses (see tests/support/netns.py for the routing):

* node ``node-a`` in ``zone-a``: 192.168.100.1 / fd00:100::1
* pods 10.244.x.y / fd00:10:244:x::y (pod CIDR 10.244.0.0/16, fd00:10:244::/48);
  only ``nodeName`` says which are "local" - every pod is a real namespace
  reachable from the node;
* services 10.96.0.x / fd00:96::x; external IP 198.51.100.22; LB IP 203.0.113.19;
* clients 192.168.100.10 (inside the LB source range) and 172.31.0.20 (outside).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.conftest import BACKENDS, iptables_missing
from tests.support.iptables_scene import (
    NODE,
    POD_TCP,
    POD_UDP,
    PODS,
    ZONE,
    Applier,
    endpoint,
    node_manifest,
    service_manifest,
    slice_manifest,
    write_state,
)
from tests.support.netns import (
    NODE_IPV4,
    NODE_IPV6,
    Client,
    Namespace,
    Pod,
    ProbeResult,
    Topology,
)

# A local pod without a server: the in-cluster client.
CLIENT_POD = ("10.244.1.99", "fd00:10:244:1::99")
INSIDE_CLIENT = ("192.168.100.10", "fd00:100::10")
OUTSIDE_CLIENT = ("172.31.0.20", "fd00:31::20")

EXTERNAL_IP = "198.51.100.22"
LB_IP = "203.0.113.19"
LB_SOURCE_RANGE = "192.168.100.0/24"

# Bounded attempts: with n equally likely endpoints, the chance that one of
# them is never hit in k attempts is at most n * (1 - 1/n)**k; for n <= 5 and
# k = 60 that is below 1e-5.
SPREAD_ATTEMPTS = 60
# Timeouts for probes expected to fail: a DROP costs the whole timeout per
# attempt, so keep both small.
DROP_TIMEOUT = 0.5


# --------------------------------------------------------------------- the scene


def feature_manifests() -> dict[str, list[dict[str, Any]]]:
    """Every feature under test, one manifest each (file name = feature)."""
    all5 = ["a1", "a2", "b1", "b2", "c1"]
    lb_status = {"loadBalancer": {"ingress": [{"ip": LB_IP, "ipMode": "VIP"}]}}
    return {
        "00-node": [node_manifest(NODE, ZONE, [NODE_IPV4, NODE_IPV6])],
        "01-clusterip": [
            service_manifest("all", "10.96.0.11"),
            slice_manifest("all", [endpoint(p) for p in all5]),
        ],
        "02-zone-hints": [
            service_manifest("zoned", "10.96.0.12"),
            slice_manifest(
                "zoned",
                [endpoint(p, hint=PODS[p][3]) for p in ("a1", "d1", "b1", "b2", "c1")],
            ),
        ],
        "03-terminating": [
            service_manifest("term", "10.96.0.13"),
            slice_manifest(
                "term",
                [
                    endpoint("a2", ready=False, serving=True, terminating=True),
                    endpoint("b2", ready=False, serving=True, terminating=True),
                    endpoint("c1", ready=False, serving=False, terminating=True),
                ],
            ),
        ],
        "04-internal-local": [
            service_manifest("itp", "10.96.0.14", internalTrafficPolicy="Local"),
            slice_manifest("itp", [endpoint(p) for p in ("a1", "b1", "c1")]),
        ],
        "05-external-local": [
            service_manifest(
                "etp-local", "10.96.0.15", node_port=30015, externalTrafficPolicy="Local"
            ),
            slice_manifest("etp-local", [endpoint(p) for p in ("a1", "b1")]),
        ],
        "06-external-cluster": [
            service_manifest(
                "etp-cluster", "10.96.0.16", node_port=30016, externalTrafficPolicy="Cluster"
            ),
            slice_manifest("etp-cluster", [endpoint(p) for p in ("a1", "b1")]),
        ],
        "07-affinity": [
            service_manifest(
                "sticky",
                "10.96.0.17",
                sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
            ),
            slice_manifest("sticky", [endpoint(p) for p in all5]),
        ],
        # No EndpointSlice at all: the service has no endpoints.
        "08-no-endpoints": [service_manifest("empty", "10.96.0.18")],
        "09-loadbalancer": [
            service_manifest(
                "lb",
                "10.96.0.19",
                node_port=30019,
                type_="LoadBalancer",
                externalTrafficPolicy="Cluster",
                loadBalancerSourceRanges=[LB_SOURCE_RANGE],
                status=lb_status,
            ),
            slice_manifest("lb", [endpoint(p) for p in ("a1", "b1")]),
        ],
        "10-hairpin": [
            service_manifest("hairpin", "10.96.0.20"),
            slice_manifest("hairpin", [endpoint(p) for p in ("a1", "b1")]),
        ],
        "11-udp": [
            service_manifest("dns", "10.96.0.21", port=53, target_port=POD_UDP, protocol="UDP"),
            slice_manifest("dns", [endpoint(p) for p in all5], port=POD_UDP, protocol="UDP"),
        ],
        "12-external-ip": [
            service_manifest("extip", "10.96.0.22", externalIPs=[EXTERNAL_IP]),
            slice_manifest("extip", [endpoint(p) for p in ("a1", "b1")]),
        ],
        "13-external-local-none": [
            service_manifest(
                "etp-remote", "10.96.0.23", node_port=30023, externalTrafficPolicy="Local"
            ),
            slice_manifest("etp-remote", [endpoint(p) for p in ("b1", "c1")]),
        ],
        "14-ipv6": [
            service_manifest("v6", "fd00:96::24"),
            slice_manifest("v6", [endpoint(p, family=6) for p in ("a1", "b1", "c1")], family=6),
        ],
    }


@dataclass
class Scene:
    topo: Topology
    backend: str
    summary: str  # what the apply command printed
    pods: dict[str, Pod]
    pod_client: Pod
    inside: Client
    outside: Client

    @property
    def node(self) -> Namespace:
        return self.topo.node

    def node_ip(self, family: int = 4) -> str:
        return self.topo.node_ipv4 if family == 4 else self.topo.node_ipv6


def add_pods(topo: Topology) -> tuple[dict[str, Pod], Pod]:
    """One serving pod per :data:`PODS` entry, and the (serverless) client pod."""
    pods = {
        label: topo.add_pod(label, ipv4, ipv6, tcp=[POD_TCP], udp=[POD_UDP])
        for label, (ipv4, ipv6, _node, _zone) in PODS.items()
    }
    return pods, topo.add_pod("client-pod", *CLIENT_POD)


@pytest.fixture(scope="module", params=BACKENDS)
def scene(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    backend: str = request.param
    for family in (4, 6):
        reason = iptables_missing(backend, family)
        if reason:
            pytest.skip(reason)
    # Built here rather than through module_topology_factory: that one lives
    # until the module ends, and one backend's topology is useless (and
    # holds a dozen pod servers) once the other backend's tests run.
    with Topology() as topo:
        pods, pod_client = add_pods(topo)
        inside = topo.add_client("inside", *INSIDE_CLIENT)
        outside = topo.add_client("outside", *OUTSIDE_CLIENT)
        tmp = tmp_path_factory.mktemp(f"traffic-{backend}")
        applier = Applier(topo, backend, tmp / "applied.json")
        summary = applier.apply(write_state(tmp / "state", feature_manifests()))
        yield Scene(topo, backend, summary, pods, pod_client, inside, outside)


@pytest.fixture
def s(scene: Scene) -> Iterator[Scene]:
    # Each test starts without flows: an earlier test's conntrack entry would
    # decide where a reused 5-tuple goes, not the rules.
    scene.node.conntrack_flush()
    yield scene


def ips(result: ProbeResult) -> set[str]:
    return set(result.client_ips)


def assert_all_ok(result: ProbeResult) -> None:
    assert result.failures == {}, result.errors[:3]


# --------------------------------------------------------------------- scenarios


def test_clusterip_reaches_every_endpoint_from_pod_and_node(s: Scene) -> None:
    every = {"a1", "a2", "b1", "b2", "c1"}
    from_pod = s.pod_client.connect_many("10.96.0.11", 80, attempts=SPREAD_ATTEMPTS)
    assert_all_ok(from_pod)
    assert set(from_pod.pods) == every
    # Pod-to-service traffic keeps the pod's address (it is in the cluster CIDR).
    assert ips(from_pod) == {CLIENT_POD[0]}
    from_node = s.node.connect_many("10.96.0.11", 80, attempts=SPREAD_ATTEMPTS)
    assert_all_ok(from_node)
    assert set(from_node.pods) == every


def test_zone_hints_keep_traffic_in_the_node_zone(s: Scene) -> None:
    result = s.pod_client.connect_many("10.96.0.12", 80, attempts=40)
    assert_all_ok(result)
    # a1 is on this node, d1 on another node of the same zone: both count.
    assert set(result.pods) == {"a1", "d1"}


def test_only_serving_terminating_endpoints_used_when_none_ready(s: Scene) -> None:
    result = s.pod_client.connect_many("10.96.0.13", 80, attempts=40)
    assert_all_ok(result)
    assert set(result.pods) == {"a2", "b2"}
    assert "c1" not in result.pods  # terminating and not serving


def test_internal_traffic_policy_local_reaches_only_local_endpoint(s: Scene) -> None:
    result = s.pod_client.connect_many("10.96.0.14", 80, attempts=30)
    assert_all_ok(result)
    assert set(result.pods) == {"a1"}


def test_external_policy_local_nodeport_keeps_client_ip(s: Scene) -> None:
    result = s.inside.connect_many(s.node_ip(), 30015, attempts=30)
    assert_all_ok(result)
    assert set(result.pods) == {"a1"}
    assert ips(result) == {INSIDE_CLIENT[0]}


def test_external_policy_cluster_nodeport_is_masqueraded(s: Scene) -> None:
    result = s.inside.connect_many(s.node_ip(), 30016, attempts=40)
    assert_all_ok(result)
    assert set(result.pods) == {"a1", "b1"}
    assert ips(result) == {s.node_ip()}
    assert set(result.source_ips) == {INSIDE_CLIENT[0]}


def test_session_affinity_pins_each_client_to_one_endpoint(s: Scene) -> None:
    for source in (s.pod_client, s.node):
        result = source.connect_many("10.96.0.17", 80, attempts=30)
        assert_all_ok(result)
        assert len(result.pods) == 1, (source, result.pods)


def test_service_without_endpoints_is_refused_at_once(s: Scene) -> None:
    timeout = 3.0
    for source in (s.pod_client, s.node):
        result = source.connect_many("10.96.0.18", 80, attempts=3, timeout=timeout)
        assert result.failures == {"refused": 3}
        # An ICMP reject, not a timeout running out.
        assert max(e["elapsed"] for e in result.errors) < timeout / 6


def test_load_balancer_source_ranges_admit_inside_and_drop_outside(s: Scene) -> None:
    allowed = s.inside.connect_many(LB_IP, 80, attempts=30)
    assert_all_ok(allowed)
    assert set(allowed.pods) == {"a1", "b1"}
    denied = s.outside.connect_many(LB_IP, 80, attempts=2, timeout=DROP_TIMEOUT)
    assert denied.failures == {"timeout": 2}
    # The same client is not blocked in general: the NodePort ignores
    # loadBalancerSourceRanges (as upstream), which proves the drop above
    # came from the source-range firewall and not from routing.
    via_nodeport = s.outside.connect_many(s.node_ip(), 30019, attempts=5)
    assert_all_ok(via_nodeport)


def test_hairpin_pod_reaches_itself_masqueraded(s: Scene) -> None:
    a1 = s.pods["a1"]
    result = a1.connect_many("10.96.0.20", 80, attempts=40)
    assert_all_ok(result)
    assert set(result.pods) == {"a1", "b1"}
    seen_by = {
        pod: {r["client"].rpartition(":")[0] for r in result.replies if r["pod"] == pod}
        for pod in ("a1", "b1")
    }
    # To itself: masqueraded to the node's address, else a1 would answer its
    # own address directly and the reply would skip the reverse DNAT.
    assert seen_by["a1"] == {s.node_ip()}
    # To another pod: the pod's own address, no masquerade.
    assert seen_by["b1"] == {PODS["a1"][0]}


def test_udp_service_reaches_every_endpoint(s: Scene) -> None:
    result = s.pod_client.connect_many("10.96.0.21", 53, "udp", attempts=SPREAD_ATTEMPTS)
    assert_all_ok(result)
    assert set(result.pods) == {"a1", "a2", "b1", "b2", "c1"}
    assert ips(result) == {CLIENT_POD[0]}


def test_external_ip_reachable_from_outside_client(s: Scene) -> None:
    result = s.inside.connect_many(EXTERNAL_IP, 80, attempts=40)
    assert_all_ok(result)
    assert set(result.pods) == {"a1", "b1"}
    # Cluster policy: masqueraded like a NodePort.
    assert ips(result) == {s.node_ip()}


def test_external_policy_local_without_local_endpoints_drops(s: Scene) -> None:
    dropped = s.inside.connect_many(s.node_ip(), 30023, attempts=2, timeout=DROP_TIMEOUT)
    assert dropped.failures == {"timeout": 2}
    # Internal traffic uses the cluster policy and still works.
    internal = s.pod_client.connect_many("10.96.0.23", 80, attempts=30)
    assert_all_ok(internal)
    assert set(internal.pods) == {"b1", "c1"}


def test_ipv6_clusterip_reaches_every_endpoint(s: Scene) -> None:
    from_pod = s.pod_client.connect_many("fd00:96::24", 80, attempts=40)
    assert_all_ok(from_pod)
    assert set(from_pod.pods) == {"a1", "b1", "c1"}
    assert ips(from_pod) == {CLIENT_POD[1]}
    from_node = s.node.connect_many("fd00:96::24", 80, attempts=40)
    assert_all_ok(from_node)
    assert set(from_node.pods) == {"a1", "b1", "c1"}


def test_rules_were_written_by_the_requested_backend(s: Scene) -> None:
    """The apply command used the iptables variant it was told to use."""
    assert f"iptables ({s.backend}): full sync ok" in s.summary
    other = "nft" if s.backend == "legacy" else "legacy"
    ours = s.node.iptables_save(backend=s.backend, table="nat")  # type: ignore[arg-type]
    assert "KUBE-SERVICES" in ours
    if iptables_missing(other) is None:
        theirs = s.node.iptables_save(backend=other, table="nat")  # type: ignore[arg-type]
        assert "KUBE-SVC-" not in theirs
