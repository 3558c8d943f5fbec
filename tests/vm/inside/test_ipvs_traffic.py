"""IPVS backend with real traffic, inside the test VM (tests/vm/test_vm.py).

One topology for every scenario (tests run in file order and share it): a
node namespace holding the IPVS table, dual-stack pods around it, two outside
clients. The real applier (IPVSBackend) runs inside the node namespace in one
long-lived process (applier_server.py: IPVS tables, ipsets and sysctls are
per namespace, and a Python start-up per command costs seconds under
emulation). Like the agent, that process keeps ownership and drain times in
memory across syncs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

if os.environ.get("SLICEPROXY_IN_VM") != "1":
    pytest.skip(
        "runs only inside the test VM (tests/vm/test_vm.py boots it)", allow_module_level=True
    )

from pyroute2 import IPVS, IPVSService

from tests.support.netns import Topology
from tests.vm.inside.applier_server import Applier

NODE = "node-a"
ZONE = "zone-a"
PODS = {  # label: (ipv4, ipv6, node, zone)
    "pod-a": ("10.244.1.2", "fd00:10:244:1::2", NODE, "zone-a"),
    "pod-b": ("10.244.2.2", "fd00:10:244:2::2", "node-b", "zone-b"),
    "pod-c": ("10.244.3.2", "fd00:10:244:3::2", "node-c", "zone-a"),
}
TCP, UDP = 8080, 5353
WEB, ZONAL, STICKY, DRAIN, DNS = (
    "10.96.0.10",
    "10.96.0.20",
    "10.96.0.30",
    "10.96.0.40",
    "10.96.0.53",
)
WEB6 = "fd00:96::10"
LB_SVC, LB_IP = "10.96.0.60", "203.0.113.10"
EXT_SVC, EXT_IP = "10.96.0.70", "203.0.113.20"
NODE_PORT = 30080
LOCAL_SVC, LOCAL_NODE_PORT = "10.96.0.100", 30081
# The uplink's address: a local address that is not the Node object's, so
# a NodePort there shows that NodePorts follow the kernel's addresses.
UPLINK_IP = "198.18.0.1"
# A virtual server somebody else made (keepalived, an admin): never ours.
FOREIGN = ("10.99.0.1", 443)
ALLOWED, BLOCKED = "client", "client-2"


def ep(label: str, port: int, family: int = 4, **kw: Any) -> dict[str, Any]:
    ip4, ip6, node, zone = PODS[label]
    return {"ip": ip4 if family == 4 else ip6, "port": port, "node": node, "zone": zone, **kw}


def services(drain_pods=("pod-a", "pod-b"), dns_pods=("pod-a", "pod-b")) -> list[dict]:
    all3 = [ep(p, TCP) for p in PODS]
    return [
        {"name": "web", "ips": [WEB], "port": 80, "node_port": NODE_PORT, "endpoints": all3},
        {
            "name": "web6",
            "ips": [WEB6],
            "port": 80,
            "endpoints": [ep(p, TCP, 6) for p in ("pod-a", "pod-b")],
        },
        {
            "name": "zonal",
            "ips": [ZONAL],
            "port": 80,
            "endpoints": [ep(p, TCP, hints=[PODS[p][3]]) for p in PODS],
        },
        {"name": "sticky", "ips": [STICKY], "port": 80, "affinity": 600, "endpoints": all3},
        {
            "name": "drain",
            "ips": [DRAIN],
            "port": 80,
            "endpoints": [ep(p, TCP) for p in drain_pods],
        },
        {
            "name": "dns",
            "ips": [DNS],
            "port": 53,
            "protocol": "UDP",
            "endpoints": [ep(p, UDP) for p in dns_pods],
        },
        {
            "name": "lb",
            "ips": [LB_SVC],
            "port": 80,
            "lb_ips": [LB_IP],
            "source_ranges": ["192.168.100.10/32"],  # the first client only
            "endpoints": all3,
        },
        {"name": "ext", "ips": [EXT_SVC], "port": 80, "external_ips": [EXT_IP], "endpoints": all3},
        {
            # externalTrafficPolicy Local: pod-a is on this node, pod-b is not.
            "name": "local",
            "ips": [LOCAL_SVC],
            "port": 80,
            "node_port": LOCAL_NODE_PORT,
            "etp": "Local",
            "endpoints": [ep(p, TCP) for p in ("pod-a", "pod-b")],
        },
    ]


@dataclass
class Node:
    topo: Topology
    applier: Applier

    def apply(self, svcs: list[dict]) -> dict:
        spec = {
            "node": NODE,
            "zone": ZONE,
            "addresses": [self.topo.node_ip(4), self.topo.node_ip(6)],
            "services": svcs,
        }
        result = self.applier.call("apply", spec=spec)
        assert result["ok"], f"{result}\n{self.applier.log_tail()}"
        return result

    def dump(self) -> dict[str, dict[str, list[int]]]:
        return self.applier.call("dump")["table"]

    def cli(self, *argv: str) -> dict[str, Any]:
        return self.applier.call("cli", argv=list(argv))


def _foreign_service() -> IPVSService:
    return IPVSService(
        addr=FOREIGN[0], port=FOREIGN[1], protocol=socket.IPPROTO_TCP, sched_name="wrr"
    )


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with Topology() as topo:
        for label, (ip4, ip6, _n, _z) in PODS.items():
            topo.add_pod(label, ipv4=ip4, ipv6=ip6, tcp=[TCP], udp=[UDP])
        topo.add_client(ALLOWED)
        topo.add_client(BLOCKED)
        applier = Applier(topo.node.exec_argv([]))
        try:
            # Made directly over netlink in the node namespace, before our
            # first sync: the applier must leave it alone throughout.
            with IPVS(netns=topo.node.name) as ipvs:
                ipvs.service("add", service=_foreign_service())
            n = Node(topo, applier)
            n.apply(services())
            yield n
        finally:
            # Deleting the node namespace (Topology) takes its IPVS table,
            # ipsets and rules with it; this is only for a tidy log.
            with contextlib.suppress(Exception):
                applier.call("cleanup")
            applier.close()


def client(node: Node, label: str = ALLOWED):
    return node.topo.clients[label]


def test_cluster_ip_reaches_every_endpoint(node):
    result = client(node).connect_many(WEB, 80, attempts=9)
    assert set(result.pods) == set(PODS), result.errors


def test_ipv6_cluster_ip_reaches_every_ipv6_endpoint(node):
    assert set(node.dump()[f"TCP/{WEB6}:80"]) == {f"{PODS[p][1]}:{TCP}" for p in ("pod-a", "pod-b")}
    result = client(node).connect_many(WEB6, 80, attempts=8)
    assert set(result.pods) == {"pod-a", "pod-b"}, result.errors


def test_nodeport_from_outside_client_reaches_every_endpoint_masqueraded(node):
    result = client(node).connect_many(node.topo.node_ip(4), NODE_PORT, attempts=9)
    assert set(result.pods) == set(PODS), result.errors
    assert set(result.client_ips) == {node.topo.node_ip(4)}


def test_external_policy_local_nodeport_keeps_the_client_ip_and_stays_local(node):
    outside = client(node)
    result = outside.connect_many(node.topo.node_ip(4), LOCAL_NODE_PORT, attempts=6)
    assert set(result.pods) == {"pod-a"}, result.errors  # only this node's endpoint
    # Not masqueraded: the pod sees the outside client's own address.
    assert set(result.client_ips) == set(result.source_ips), (result.client_ips, result.source_ips)
    assert node.topo.node_ip(4) not in result.client_ips
    # Internal traffic to the ClusterIP still uses every endpoint.
    inside = client(node).connect_many(LOCAL_SVC, 80, attempts=8)
    assert set(inside.pods) == {"pod-a", "pod-b"}, inside.errors


def test_nodeport_is_served_on_every_local_address_but_kube_ipvs0s(node):
    table = node.dump()
    # Upstream's default (--nodeport-addresses empty): every local address,
    # including the uplink's, which the Node object does not list.
    for addr in (node.topo.node_ip(4), UPLINK_IP):
        assert f"TCP/{addr}:{NODE_PORT}" in table, sorted(table)
    assert f"TCP/{WEB}:{NODE_PORT}" not in table  # a kube-ipvs0 address
    assert f"TCP/127.0.0.1:{NODE_PORT}" not in table
    result = client(node).connect_many(UPLINK_IP, NODE_PORT, attempts=6)
    assert set(result.pods) == set(PODS), result.errors


def test_same_zone_preference_uses_only_same_zone_endpoints(node):
    result = client(node).connect_many(ZONAL, 80, attempts=8)
    assert result.ok == 8, result.errors
    assert set(result.pods) == {"pod-a", "pod-c"}


def test_session_affinity_pins_a_client_to_one_endpoint(node):
    result = client(node).connect_many(STICKY, 80, attempts=8)
    assert result.ok == 8, result.errors
    assert len(result.pods) == 1


def test_external_ip_from_outside_client_reaches_every_endpoint(node):
    result = client(node).connect_many(EXT_IP, 80, attempts=9)
    assert set(result.pods) == set(PODS), result.errors


def test_lb_source_ranges_let_the_allowed_client_in_and_drop_the_other(node):
    allowed = client(node, ALLOWED).connect_many(LB_IP, 80, attempts=6)
    assert set(allowed.pods) == set(PODS), allowed.errors
    blocked = client(node, BLOCKED).connect_many(LB_IP, 80, attempts=2, timeout=1.0)
    assert blocked.ok == 0, blocked.replies
    assert set(blocked.failures) == {"timeout"}, blocked.failures  # DROP, not REJECT


def test_terminating_tcp_endpoint_drains_then_the_tick_deletes_it(node):
    conn = client(node).open_persistent(DRAIN, 80)
    try:
        first = conn.request()["pod"]
        other = "pod-b" if first == "pod-a" else "pod-a"
        # The endpoint turns terminating (not serving): it leaves the plan.
        left = [p for p in ("pod-a", "pod-b") if p != first]
        node.apply(services(drain_pods=left))
        vs = node.dump()[f"TCP/{DRAIN}:80"]
        first_ip = f"{PODS[first][0]}:{TCP}"
        assert vs[first_ip][0] == 0, vs  # weight 0, still there
        assert conn.request()["pod"] == first  # the old connection keeps working
        fresh = client(node).connect_many(DRAIN, 80, attempts=4)
        assert set(fresh.pods) == {other}, fresh.errors
        assert node.applier.call("drain_tick")["draining"] == 1
        # Close with RST: IPVS's CLOSE state expires after 10 s (FIN would
        # linger in FIN_WAIT/TIME_WAIT for minutes).
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()
    deadline = time.monotonic() + 40
    # No sync from here on: the runtime's periodic tick alone finishes the drain.
    while time.monotonic() < deadline:
        node.applier.call("tick")
        if first_ip not in node.dump()[f"TCP/{DRAIN}:80"]:
            break
        time.sleep(1)
    assert first_ip not in node.dump()[f"TCP/{DRAIN}:80"]
    assert node.applier.call("drain_tick") == {"draining": 0, "deleted": 0}


def test_removed_udp_endpoint_is_deleted_at_once_and_stops_receiving(node):
    before = client(node).connect_many(DNS, 53, "udp", attempts=6)
    assert set(before.pods) == {"pod-a", "pod-b"}, before.errors
    node.apply(services(dns_pods=("pod-a",)))
    assert f"{PODS['pod-b'][0]}:{UDP}" not in node.dump()[f"UDP/{DNS}:53"]
    after = client(node).connect_many(DNS, 53, "udp", attempts=6)
    assert set(after.pods) == {"pod-a"}, after.errors


def test_foreign_virtual_server_survives_syncs_and_ticks(node):
    # Made before the first sync; since then: three syncs (start-up, drain,
    # UDP) and the drain test's ticks. Untouched, scheduler included.
    table = node.dump()
    assert table[f"TCP/{FOREIGN[0]}:{FOREIGN[1]}"] == {}
    with IPVS(netns=node.topo.node.name) as ipvs:
        (msg,) = [
            m
            for m in ipvs.service("dump")
            if m.get("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_ADDR") == FOREIGN[0]
        ]
    assert msg.get("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_SCHED_NAME") == "wrr"


APPLY_VIP = "10.96.0.90"


def _manifests(path, ready: dict[str, bool]) -> str:
    """A Node, a Service and its EndpointSlice, as `kubectl get -o json` prints them."""
    endpoints = [
        {
            "addresses": [PODS[p][0]],
            "nodeName": PODS[p][2],
            "conditions": {"ready": r, "serving": r, "terminating": not r},
        }
        for p, r in ready.items()
    ]
    items = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": ZONE}},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "applied", "namespace": "default"},
            "spec": {"clusterIP": APPLY_VIP, "ports": [{"name": "http", "port": 80}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "applied-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "applied"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": TCP, "protocol": "TCP"}],
            "endpoints": endpoints,
        },
    ]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return str(path)


def test_apply_command_twice_applies_the_diff_and_drains_what_left(node, tmp_path):
    """`sliceproxy apply --backend ipvs` (the one-shot sync from manifests),
    run again with a changed state, applies the diff and drains the real
    server that left; a later run deletes it once its connection is gone.
    (It owns everything on kube-ipvs0, so the shared services are gone
    after this: it runs just before the cleanup test.)"""
    state_file = str(tmp_path / "apply-ipvs.json")
    both = _manifests(tmp_path / "both.json", {"pod-a": True, "pod-b": True})
    only_b = _manifests(tmp_path / "only-b.json", {"pod-a": False, "pod-b": True})

    def apply(path: str) -> dict[str, Any]:
        argv = ["apply", "--state", path, "--node", NODE, "--backend", "ipvs"]
        result = node.cli(*argv, "--state-file", state_file, "--strict")
        assert result["rc"] == 0, result
        return result

    assert "sync ok" in apply(both)["stdout"]
    vs_key = f"TCP/{APPLY_VIP}:80"
    a_ip = f"{PODS['pod-a'][0]}:{TCP}"
    # rr alternates: a connection to pod-a turns up within a few tries.
    conn = None
    for _ in range(6):
        candidate = client(node).open_persistent(APPLY_VIP, 80)
        if candidate.request()["pod"] == "pod-a":
            conn = candidate
            break
        candidate.close()
    assert conn is not None, "no connection reached pod-a"
    try:
        assert "sync ok" in apply(only_b)["stdout"]
        assert node.dump()[vs_key][a_ip][0] == 0  # weight 0: draining
        assert conn.request()["pod"] == "pod-a"  # the open connection still works
        fresh = client(node).connect_many(APPLY_VIP, 80, attempts=4)
        assert set(fresh.pods) == {"pod-b"}, fresh.errors
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and a_ip in node.dump()[vs_key]:
        time.sleep(2)
        apply(only_b)  # each run re-checks what drains (state file)
    assert a_ip not in node.dump()[vs_key]


def test_cleanup_command_removes_everything_ours_and_keeps_the_foreign_server(node):
    ipvs_only = node.cli("cleanup", "--backend", "ipvs")
    assert ipvs_only["rc"] == 0, ipvs_only
    assert ipvs_only["stdout"].startswith("ipvs: removed "), ipvs_only
    assert node.dump() == {f"TCP/{FOREIGN[0]}:{FOREIGN[1]}": {}}
    assert node.topo.node.ip("link", "show", "kube-ipvs0", check=False).returncode != 0
    assert "KUBE-" not in node.topo.node.run(["ipset", "list", "-n"]).stdout
    for family in (4, 6):
        for flavour in ("nft", "legacy"):
            saved = node.topo.node.iptables_save(family=family, backend=flavour)
            assert "KUBE-" not in saved, saved
    # The default (every backend present) runs clean on what is left, and
    # still leaves the foreign virtual server alone.
    everything = node.cli("cleanup")
    assert everything["rc"] == 0, everything
    assert "ipvs: removed 0 " in everything["stdout"], everything
    assert "iptables (" in everything["stdout"], everything
    assert node.dump() == {f"TCP/{FOREIGN[0]}:{FOREIGN[1]}": {}}
    with IPVS(netns=node.topo.node.name) as ipvs:
        ipvs.service("del", service=_foreign_service())
    assert node.dump() == {}
