"""IPVS backend with real traffic, inside the test VM (tests/vm/test_vm.py).

One topology for every scenario (tests run in file order and share it):
a node namespace holding the IPVS table, pods around it, an outside client.
The real applier (IPVSBackend) runs inside the node namespace through
`ip netns exec` (IPVS tables, ipsets, sysctls are per namespace), invoked as
``python -m tests.vm.inside.test_ipvs_traffic apply`` with the plan on stdin
and a state file carrying ownership and drain times between runs, as
`sliceproxy apply` does.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

IN_VM = os.environ.get("SLICEPROXY_IN_VM") == "1"

if __name__ != "__main__" and not IN_VM:
    pytest.skip(
        "runs only inside the test VM (tests/vm/test_vm.py boots it)", allow_module_level=True
    )

NODE = "node-a"
ZONE = "zone-a"
PODS = {  # label: (ip, node, zone)
    "pod-a": ("10.244.1.2", NODE, "zone-a"),
    "pod-b": ("10.244.2.2", "node-b", "zone-b"),
    "pod-c": ("10.244.3.2", "node-c", "zone-a"),
}
TCP, UDP = 8080, 5353
WEB, ZONAL, STICKY, DRAIN, DNS = (
    "10.96.0.10",
    "10.96.0.20",
    "10.96.0.30",
    "10.96.0.40",
    "10.96.0.53",
)
NODE_PORT = 30080


# -- the applier side (runs inside the node namespace) ------------------------


def _build_plan(spec: dict[str, Any]):
    from agent.model import Endpoint, NodeInfo, ServicePort, ServicePortName
    from agent.plan import NodePlan, plan_port
    from agent.state import ResolvedPort

    node = NodeInfo(spec["node"], zone=spec["zone"], addresses=tuple(spec["addresses"]))
    entries = {}
    for s in spec["services"]:
        svc = ServicePort(
            ServicePortName("default", s["name"], "p", s.get("protocol", "TCP")),
            (s["ip"],),
            s["port"],
            node_port=s.get("node_port"),
            affinity_timeout=s.get("affinity"),
        )
        eps = tuple(
            Endpoint(
                e["ip"],
                e["port"],
                ready=e.get("ready", True),
                serving=e.get("serving", True),
                terminating=e.get("terminating", False),
                node_name=e["node"],
                zone=e["zone"],
                zone_hints=frozenset(e.get("hints", ())),
                is_local=e["node"] == spec["node"],
            )
            for e in s["endpoints"]
        )
        for p in plan_port(ResolvedPort(svc, eps), node, True):
            entries[p.key] = p
    return NodePlan(node, entries)


def _apply_main(state_file: str) -> int:
    from agent.backends.ipvs.apply import IPVSBackend
    from agent.backends.ipvs.render import IPVSOptions

    spec = json.load(sys.stdin)
    backend = IPVSBackend(IPVSOptions(families=(4,)))
    try:
        with open(state_file) as f:
            backend.import_state(json.load(f))
    except FileNotFoundError:
        pass
    if spec.get("cleanup"):
        print(json.dumps({"removed": backend.cleanup()}))
        return 0
    result = backend.sync(_build_plan(spec), None)
    with open(state_file, "w") as f:
        json.dump(backend.export_state(), f)
    print(json.dumps({"ok": result.ok, "error": result.error, "ops": result.rules_written}))
    return 0 if result.ok else 1


def _dump_main() -> int:
    from agent.backends.ipvs.kernel import IPVSKernel

    k = IPVSKernel()
    out = {
        f"{p}/{a}:{n}": {f"{r.address}:{r.port}": [r.weight, r.active, r.inactive] for r in s.reals}
        for (p, a, n), s in k.dump().items()
    }
    print(json.dumps(out))
    return 0


# -- the test side -------------------------------------------------------------


def ep(label: str, port: int, **kw: Any) -> dict[str, Any]:
    ip, node, zone = PODS[label]
    return {"ip": ip, "port": port, "node": node, "zone": zone, **kw}


def services(drain_pods=("pod-a", "pod-b"), dns_pods=("pod-a", "pod-b")) -> list[dict]:
    all3 = [ep(p, TCP) for p in PODS]
    return [
        {"name": "web", "ip": WEB, "port": 80, "node_port": NODE_PORT, "endpoints": all3},
        {
            "name": "zonal",
            "ip": ZONAL,
            "port": 80,
            "endpoints": [ep(p, TCP, hints=[PODS[p][2]]) for p in PODS],
        },
        {"name": "sticky", "ip": STICKY, "port": 80, "affinity": 600, "endpoints": all3},
        {"name": "drain", "ip": DRAIN, "port": 80, "endpoints": [ep(p, TCP) for p in drain_pods]},
        {
            "name": "dns",
            "ip": DNS,
            "port": 53,
            "protocol": "UDP",
            "endpoints": [ep(p, UDP) for p in dns_pods],
        },
    ]


class Node:
    def __init__(self, topo, state_file: str) -> None:
        self.topo = topo
        self.state_file = state_file

    def apply(self, svcs: list[dict]) -> dict:
        spec = {"node": NODE, "zone": ZONE, "addresses": [self.topo.node_ip(4)], "services": svcs}
        proc = self.topo.node.python(
            ["-m", "tests.vm.inside.test_ipvs_traffic", "apply", self.state_file],
            input=json.dumps(spec),
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def cleanup(self) -> int:
        proc = self.topo.node.python(
            ["-m", "tests.vm.inside.test_ipvs_traffic", "apply", self.state_file],
            input=json.dumps({"cleanup": True}),
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])["removed"]

    def dump(self) -> dict[str, dict[str, list[int]]]:
        proc = self.topo.node.python(["-m", "tests.vm.inside.test_ipvs_traffic", "dump"])
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    from tests.support.netns import Topology

    with Topology() as topo:
        for label, (ip, _n, _z) in PODS.items():
            topo.add_pod(label, ipv4=ip, tcp=[TCP], udp=[UDP])
        topo.add_client("client")
        n = Node(topo, str(tmp_path_factory.mktemp("ipvs") / "state.json"))
        result = n.apply(services())
        assert result["ok"], result
        yield n
        removed = n.cleanup()
        assert removed > 0
        assert n.dump() == {}


def client(node: Node):
    return node.topo.clients["client"]


def test_cluster_ip_reaches_every_endpoint(node):
    result = client(node).connect_many(WEB, 80, attempts=9)
    assert set(result.pods) == set(PODS), result.errors


def test_nodeport_from_outside_client_reaches_every_endpoint_masqueraded(node):
    result = client(node).connect_many(node.topo.node_ip(4), NODE_PORT, attempts=9)
    assert set(result.pods) == set(PODS), result.errors
    assert set(result.client_ips) == {node.topo.node_ip(4)}


def test_same_zone_preference_uses_only_same_zone_endpoints(node):
    result = client(node).connect_many(ZONAL, 80, attempts=8)
    assert result.ok == 8, result.errors
    assert set(result.pods) == {"pod-a", "pod-c"}


def test_session_affinity_pins_a_client_to_one_endpoint(node):
    result = client(node).connect_many(STICKY, 80, attempts=8)
    assert result.ok == 8, result.errors
    assert len(result.pods) == 1


def test_terminating_tcp_endpoint_drains_then_disappears(node):
    conn = client(node).open_persistent(DRAIN, 80)
    try:
        first = conn.request()["pod"]
        other = "pod-b" if first == "pod-a" else "pod-a"
        # The endpoint turns terminating (not serving): it leaves the plan.
        left = [p for p in ("pod-a", "pod-b") if p != first]
        assert node.apply(services(drain_pods=left))["ok"]
        vs = node.dump()[f"TCP/{DRAIN}:80"]
        first_ip = f"{PODS[first][0]}:{TCP}"
        assert vs[first_ip][0] == 0, vs  # weight 0, still there
        assert conn.request()["pod"] == first  # the old connection keeps working
        fresh = client(node).connect_many(DRAIN, 80, attempts=4)
        assert set(fresh.pods) == {other}, fresh.errors
        # Close with RST: IPVS's CLOSE state expires after 10 s (FIN would
        # linger in FIN_WAIT/TIME_WAIT for minutes).
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        node.apply(services(drain_pods=left))  # each sync re-checks draining servers
        if first_ip not in node.dump()[f"TCP/{DRAIN}:80"]:
            break
        time.sleep(2)
    assert first_ip not in node.dump()[f"TCP/{DRAIN}:80"]


def test_removed_udp_endpoint_is_deleted_at_once_and_stops_receiving(node):
    before = client(node).connect_many(DNS, 53, "udp", attempts=6)
    assert set(before.pods) == {"pod-a", "pod-b"}, before.errors
    assert node.apply(services(dns_pods=("pod-a",)))["ok"]
    assert f"{PODS['pod-b'][0]}:{UDP}" not in node.dump()[f"UDP/{DNS}:53"]
    after = client(node).connect_many(DNS, 53, "udp", attempts=6)
    assert set(after.pods) == {"pod-a"}, after.errors


if __name__ == "__main__":
    if sys.argv[1] == "apply":
        sys.exit(_apply_main(sys.argv[2]))
    sys.exit(_dump_main())
