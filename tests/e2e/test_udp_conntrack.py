"""Stale UDP conntrack flows are deleted after a sync (root; legacy and nft).

A UDP client that keeps one socket (a resolver) sends every datagram in one
conntrack flow, and the flow keeps the NAT decision of its first packet. The
tests change a UDP service's endpoints with the real ``sliceproxy apply``
inside a node namespace they built, and check that the *same* client socket
reaches the new endpoint after the sync; with ``--conntrack-cleanup=false``
it keeps reaching the old pod, which is what kubernetes/kubernetes #19029 /
#48370 / #125467 complain about and what shows these tests can fail.

The old pod keeps serving on purpose: a stale flow then shows up as an
answer from the wrong pod instead of an anonymous timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BACKENDS, TopologyFactory, iptables_missing
from tests.support.iptables_scene import (
    NODE,
    PODS,
    ZONE,
    Applier,
    endpoint,
    node_manifest,
    service_manifest,
    slice_manifest,
    write_state,
)
from tests.support.netns import NODE_IPV4, NODE_IPV6, Client, Topology, UdpClient

pytestmark = pytest.mark.root

OLD, NEW = "a1", "a2"  # both local pods of tests/support/iptables_scene.PODS
VIP = {4: "10.96.0.53", 6: "fd00:96::53"}
PORT, POD_UDP = 53, 5353
CLIENT_PORT = 41053  # the one source port the client socket keeps
# Enough datagrams that a flaky single exchange cannot decide a test.
TRIES = 3


def manifests(family: int, pods: list[str] | None) -> dict[str, list[dict[str, Any]]]:
    """The node and a UDP service with ``pods`` as endpoints (None: no service)."""
    out: dict[str, list[dict[str, Any]]] = {
        "00-node": [node_manifest(NODE, ZONE, [NODE_IPV4, NODE_IPV6])]
    }
    if pods is not None:
        out["10-dns"] = [
            service_manifest("dns", VIP[family], port=PORT, target_port=POD_UDP, protocol="UDP"),
            slice_manifest(
                "dns",
                [endpoint(p, family=family) for p in pods],
                port=POD_UDP,
                protocol="UDP",
                family=family,
            ),
        ]
    return out


class Scene:
    def __init__(self, topo: Topology, backend: str, family: int, tmp: Path) -> None:
        self.topo = topo
        self.family = family
        self.applier = Applier(topo, backend, tmp / "apply-state.json")
        self.state_dir = tmp / "manifests"
        for label in (OLD, NEW):
            ipv4, ipv6, _node, _zone = PODS[label]
            topo.add_pod(label, ipv4=ipv4, ipv6=ipv6, udp=[POD_UDP])
        self.client: Client = topo.add_client("client")

    def apply(self, pods: list[str] | None, *extra: str) -> str:
        write_state(self.state_dir, manifests(self.family, pods))
        argv = [*self.applier.argv(self.state_dir), *extra]
        return self.topo.node.python(argv, check=True, timeout=60).stdout

    def socket(self) -> UdpClient:
        return self.client.open_udp(VIP[self.family], PORT, source_port=CLIENT_PORT)

    def answers(self, sock: UdpClient, timeout: float = 1.0) -> list[str]:
        return [sock.exchange(timeout) for _ in range(TRIES)]

    def flows(self) -> list[str]:
        fam = "ipv6" if self.family == 6 else "ipv4"
        return self.topo.node.conntrack_entries("-f", fam, "-p", "udp", "--dport", str(PORT))

    def pod_ip(self, label: str) -> str:
        ipv4, ipv6, _node, _zone = PODS[label]
        return ipv6 if self.family == 6 else ipv4


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    reason = iptables_missing(name, 4) or iptables_missing(name, 6)
    if reason:
        pytest.skip(reason)
    return name


@pytest.fixture
def scene_factory(topology_factory: TopologyFactory, backend: str, tmp_path: Path) -> Iterator[Any]:
    def make(family: int = 4) -> Scene:
        return Scene(topology_factory(), backend, family, tmp_path)

    yield make


@pytest.mark.parametrize("family", [4, 6])
def test_same_client_socket_reaches_the_new_pod_after_the_endpoint_switch(
    scene_factory: Any, family: int
) -> None:
    scene: Scene = scene_factory(family)
    scene.apply([OLD])
    with scene.socket() as sock:
        assert scene.answers(sock) == [OLD] * TRIES
        flows = scene.flows()
        assert len(flows) == 1 and f"src={scene.pod_ip(OLD)} " in flows[0], flows

        out = scene.apply([NEW])

        assert "stale UDP flows deleted" in out
        assert scene.answers(sock) == [NEW] * TRIES
        assert sock.local_address[1] == CLIENT_PORT  # the very same flow key
        flows = scene.flows()
        assert len(flows) == 1 and f"src={scene.pod_ip(NEW)} " in flows[0], flows


def test_without_cleanup_the_client_stays_on_the_old_pod_until_a_cleanup_runs(
    scene_factory: Any,
) -> None:
    scene: Scene = scene_factory()
    scene.apply([OLD])
    with scene.socket() as sock:
        assert scene.answers(sock) == [OLD] * TRIES

        out = scene.apply([NEW], "--conntrack-cleanup=false")

        assert "stale UDP flows deleted" not in out
        # The rules send new flows to the new pod ...
        fresh = scene.client.connect_many(VIP[4], PORT, "udp", attempts=5)
        assert dict(fresh.pods) == {NEW: 5}
        # ... but the long-lived socket is pinned to the old one: the bug.
        assert scene.answers(sock) == [OLD] * TRIES

        # The next apply with the cleanup on repairs it, although nothing
        # changed in between (the disabled run left no record, so every UDP
        # service port is checked).
        out = scene.apply([NEW])
        assert "stale UDP flows deleted" in out
        assert scene.answers(sock) == [NEW] * TRIES


def test_same_client_socket_reaches_the_first_endpoint_after_none(scene_factory: Any) -> None:
    scene: Scene = scene_factory()
    scene.apply([])
    with scene.socket() as sock:
        # No endpoints: REJECTed with an ICMP port unreachable.
        assert scene.answers(sock) == ["refused"] * TRIES
        scene.apply([OLD])
        assert scene.answers(sock) == [OLD] * TRIES


def test_same_client_socket_reaches_a_service_it_was_sending_to_before_the_rules_existed(
    scene_factory: Any,
) -> None:
    scene: Scene = scene_factory()
    scene.apply(None)  # the node is programmed, the service is not known yet
    with scene.socket() as sock:
        # Routed to the node's silent upstream: an un-NATed flow whose reply
        # source is the VIP itself.
        assert scene.answers(sock, timeout=0.3) == ["timeout"] * TRIES
        flows = scene.flows()
        assert len(flows) == 1 and f"src={VIP[4]} " in flows[0].split("dport=")[1], flows

        out = scene.apply([OLD])

        assert "stale UDP flows deleted" in out
        assert scene.answers(sock) == [OLD] * TRIES


def test_before_the_rules_existed_without_cleanup_the_client_stays_lost(
    scene_factory: Any,
) -> None:
    scene: Scene = scene_factory()
    scene.apply(None)
    with scene.socket() as sock:
        assert scene.answers(sock, timeout=0.3) == ["timeout"] * TRIES
        scene.apply([OLD], "--conntrack-cleanup=false")
        assert scene.client.connect_many(VIP[4], PORT, "udp", attempts=3).pods == {OLD: 3}
        assert scene.answers(sock, timeout=0.3) == ["timeout"] * TRIES
