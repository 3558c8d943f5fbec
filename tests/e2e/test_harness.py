"""The e2e harness itself: topology, pod servers, probes, iptables helpers.

A hand-written, kube-proxy-shaped rule set (KUBE-SERVICES -> KUBE-SVC ->
KUBE-SEP with ``-m statistic``) balances a VIP over two pods; real traffic
shows that the harness routes, counts and classifies correctly before the
real renderers are tested on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import TopologyFactory, require_iptables
from tests.support.netns import (
    REPO_ROOT,
    Client,
    CommandError,
    Pod,
    Topology,
    list_namespaces,
    sweep_stale,
)

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
VPORT_TCP, VPORT_UDP = 80, 53
POD_TCP, POD_UDP = 8080, 5353
POD_A = ("10.244.1.2", "fd00:10:244:1::2")
POD_B = ("10.244.2.3", "fd00:10:244:2::3")
POD_C = ("10.244.3.4", "fd00:10:244:3::4")


def dest(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


BASE_NAT = [
    ":KUBE-SERVICES - [0:0]",
    ":KUBE-MARK-MASQ - [0:0]",
    ":KUBE-POSTROUTING - [0:0]",
    '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    "-A POSTROUTING -j KUBE-POSTROUTING",
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    "-A KUBE-POSTROUTING -j MASQUERADE",
]


def service_nat_rules(
    name: str,
    vip: str,
    vport: int,
    proto: str,
    endpoints: list[tuple[str, int]],
    *,
    masquerade_all: bool = False,
) -> list[str]:
    """kube-proxy-like nat rules for one service port (chains KUBE-SVC-<name>...)."""
    plen = 128 if ":" in vip else 32
    svc = f"KUBE-SVC-{name}"
    seps = [f"KUBE-SEP-{name}{i}" for i in range(len(endpoints))]
    lines = [f":{chain} - [0:0]" for chain in (svc, *seps)]
    lines.append(f"-A KUBE-SERVICES -d {vip}/{plen} -p {proto} -m {proto} --dport {vport} -j {svc}")
    if masquerade_all:
        lines.append(f"-A {svc} -d {vip}/{plen} -p {proto} -j KUBE-MARK-MASQ")
    for i, sep in enumerate(seps):
        remaining = len(seps) - i
        if remaining > 1:
            lines.append(
                f"-A {svc} -m statistic --mode random --probability {1 / remaining:.10f} -j {sep}"
            )
        else:
            lines.append(f"-A {svc} -j {sep}")
    for sep, (ip, port) in zip(seps, endpoints, strict=True):
        # Hairpin: a pod reaching itself through the VIP must be
        # masqueraded, or it receives a packet from its own address and drops
        # it as a martian.
        lines.append(f"-A {sep} -s {ip}/{plen} -j KUBE-MARK-MASQ")
        lines.append(f"-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {dest(ip, port)}")
    return lines


def reject_rules(vip: str, ports: list[tuple[int, str]]) -> str:
    """kube-proxy's "has no endpoints" REJECTs in the filter table."""
    plen = 128 if ":" in vip else 32
    lines = [
        "*filter",
        ":KUBE-SERVICES - [0:0]",
        "-A INPUT -m conntrack --ctstate NEW -j KUBE-SERVICES",
        "-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES",
        "-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES",
    ]
    for port, proto in ports:
        lines.append(
            f"-A KUBE-SERVICES -d {vip}/{plen} -p {proto} -m {proto} --dport {port} -j REJECT"
        )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass
class Scene:
    topo: Topology
    a: Pod
    b: Pod
    c: Pod  # a pod without a server, used as an in-cluster client
    client: Client


@pytest.fixture
def scene(topology: Topology) -> Scene:
    ports = {"tcp": [POD_TCP], "udp": [POD_UDP]}
    a = topology.add_pod("pod-a", *POD_A, **ports)
    b = topology.add_pod("pod-b", *POD_B, **ports)
    c = topology.add_pod("pod-c", *POD_C)
    client = topology.add_client("client", "192.168.100.10", "fd00:100::10")
    return Scene(topology, a, b, c, client)


def apply_service(
    scene: Scene, backend: str, family: int = 4, masquerade_all: bool = False
) -> None:
    """Balance VIP:80/tcp and VIP:53/udp over pod-a and pod-b (one restore)."""
    vip = VIP4 if family == 4 else VIP6
    idx = 0 if family == 4 else 1
    eps = [POD_A[idx], POD_B[idx]]
    text = [
        "*nat",
        *BASE_NAT,
        *service_nat_rules(
            "T", vip, VPORT_TCP, "tcp", [(ip, POD_TCP) for ip in eps], masquerade_all=masquerade_all
        ),
        *service_nat_rules(
            "U", vip, VPORT_UDP, "udp", [(ip, POD_UDP) for ip in eps], masquerade_all=masquerade_all
        ),
        "COMMIT",
    ]
    scene.topo.node.iptables_restore("\n".join(text) + "\n", family=family, backend=backend)  # type: ignore[arg-type]


# ------------------------------------------------------------------- traffic


def test_client_outside_reaches_both_pods_through_vip(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    result = scene.client.connect_many(VIP4, VPORT_TCP, attempts=40)
    assert result.failures == {}
    assert set(result.pods) == {"pod-a", "pod-b"}
    assert result.ok == 40
    # No masquerade for traffic from outside in this rule set: source kept.
    assert result.client_ips == {"192.168.100.10": 40}


def test_pod_reaches_vip(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    result = scene.c.connect_many(VIP4, VPORT_TCP, attempts=30)
    assert result.failures == {}
    assert set(result.pods) == {"pod-a", "pod-b"}
    assert result.client_ips == {POD_C[0]: 30}


def test_hairpin_pod_reaches_itself_masqueraded(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    result = scene.a.connect_many(VIP4, VPORT_TCP, attempts=30)
    assert result.failures == {}
    assert set(result.pods) == {"pod-a", "pod-b"}
    seen_by_a = {r["client"].rsplit(":", 1)[0] for r in result.replies if r["pod"] == "pod-a"}
    assert seen_by_a == {scene.topo.node_ipv4}


def test_node_reaches_vip_through_output_chain(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    result = scene.topo.node.connect_many(VIP4, VPORT_TCP, attempts=30)
    assert result.failures == {}
    assert set(result.pods) == {"pod-a", "pod-b"}
    # Node-originated traffic to a pod leaves with the node IP as source.
    assert result.client_ips == {scene.topo.node_ipv4: 30}


def test_masquerade_rule_changes_source_seen_by_pod(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    before = scene.client.connect_many(VIP4, VPORT_TCP, attempts=10)
    assert before.client_ips == {"192.168.100.10": 10}
    # Like kube-proxy's masqueradeAll: mark every VIP connection, first in
    # the service chain so it runs before the endpoint choice.
    scene.topo.node.iptables_restore(
        f"*nat\n-I KUBE-SVC-T 1 -d {VIP4}/32 -p tcp -j KUBE-MARK-MASQ\nCOMMIT\n",
        backend=iptables_backend,
    )
    after = scene.client.connect_many(VIP4, VPORT_TCP, attempts=10)
    assert after.failures == {}
    assert after.client_ips == {scene.topo.node_ipv4: 10}
    assert after.source_ips == {"192.168.100.10": 10}


def test_udp_through_vip_reaches_both_pods(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    result = scene.client.connect_many(VIP4, VPORT_UDP, "udp", attempts=40)
    assert result.failures == {}
    assert set(result.pods) == {"pod-a", "pod-b"}
    assert result.client_ips == {"192.168.100.10": 40}
    # Every attempt used its own source port, so conntrack could not pin them.
    assert len({r["source"] for r in result.replies}) == 40


def test_ipv6_client_and_pod_reach_both_pods(scene: Scene, iptables_backend: str) -> None:
    require_iptables(iptables_backend, family=6)
    apply_service(scene, iptables_backend, family=6)
    for source, source_ip in ((scene.client, "fd00:100::10"), (scene.c, POD_C[1])):
        tcp = source.connect_many(VIP6, VPORT_TCP, attempts=30)
        assert tcp.failures == {}
        assert set(tcp.pods) == {"pod-a", "pod-b"}
        assert tcp.client_ips == {source_ip: 30}
    udp = scene.client.connect_many(VIP6, VPORT_UDP, "udp", attempts=20)
    assert udp.failures == {}
    assert set(udp.pods) == {"pod-a", "pod-b"}


def test_persistent_connection_stays_on_one_pod(scene: Scene) -> None:
    require_iptables("nft")
    apply_service(scene, "nft")
    with scene.client.open_persistent(VIP4, VPORT_TCP) as conn:
        replies = [conn.request() for _ in range(3)]
        local_port = conn.local_address[1]
    assert len({r["pod"] for r in replies}) == 1
    assert [r["request"] for r in replies] == [1, 2, 3]
    assert {r["client"] for r in replies} == {f"192.168.100.10:{local_port}"}


# ------------------------------------------------------------------ failures


def test_vip_without_rules_times_out(scene: Scene) -> None:
    # Unrouted VIP traffic goes to the silent upstream and is dropped there.
    tcp = scene.client.connect_many(VIP4, VPORT_TCP, attempts=2, timeout=0.3)
    udp = scene.c.connect_many(VIP4, VPORT_UDP, "udp", attempts=2, timeout=0.3)
    assert tcp.failures == {"timeout": 2}
    assert udp.failures == {"timeout": 2}
    assert tcp.ok == udp.ok == 0


def test_closed_pod_port_is_refused(scene: Scene) -> None:
    result = scene.client.connect_many(POD_A[0], 9999, attempts=3)
    assert result.failures == {"refused": 3}


def test_reject_rule_refuses_quickly(scene: Scene, iptables_backend: str) -> None:
    node = scene.topo.node
    # One restore: with --noflush, a second ":KUBE-SERVICES" line would flush
    # the chain the first restore filled.
    node.iptables_restore(
        reject_rules(VIP4, [(VPORT_TCP, "tcp"), (VPORT_UDP, "udp")]), backend=iptables_backend
    )
    tcp = scene.client.connect_many(VIP4, VPORT_TCP, attempts=5, timeout=2.0)
    udp = scene.client.connect_many(VIP4, VPORT_UDP, "udp", attempts=5, timeout=2.0)
    assert tcp.failures == {"refused": 5}
    assert udp.failures == {"refused": 5}
    # Refused by an ICMP error, not by waiting out the timeout.
    assert max(e["elapsed"] for e in tcp.errors + udp.errors) < 0.5


# --------------------------------------------------------------- iptables io


def test_iptables_save_shows_restored_rules(scene: Scene, iptables_backend: str) -> None:
    apply_service(scene, iptables_backend)
    saved = scene.topo.node.iptables_save(backend=iptables_backend, table="nat")
    assert "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-T" in saved
    assert "--to-destination 10.244.2.3:8080" in saved


def test_iptables_restore_failure_carries_stderr(topology: Topology) -> None:
    bad = "*nat\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n"
    proc = topology.node.iptables_restore(bad, check=False)
    assert proc.returncode != 0
    assert "line 2" in proc.stderr or "NO-SUCH-CHAIN" in proc.stderr
    with pytest.raises(CommandError) as info:
        topology.node.iptables_restore(bad)
    assert info.value.stderr == proc.stderr


def test_node_has_kube_proxy_sysctls(topology: Topology) -> None:
    node = topology.node
    assert node.read_sysctl("net.ipv4.ip_forward") == "1"
    assert node.read_sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert node.read_sysctl("net.ipv4.conf.all.route_localnet") == "1"


# ------------------------------------------------------------------- cleanup


def test_close_removes_everything_when_body_raises(topology_factory: TopologyFactory) -> None:
    with pytest.raises(RuntimeError, match="boom"), topology_factory() as topo:
        pod = topo.add_pod("pod-a", *POD_A, tcp=[POD_TCP])
        topo.add_client()
        names = topo.namespaces
        assert pod.server is not None
        server = pod.server.proc
        raise RuntimeError("boom")
    assert len(names) == 4
    assert not set(names) & set(list_namespaces())
    assert server.poll() is not None


def test_sweep_stale_removes_only_dead_runs() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    stale, live = f"sp{dead.pid}-0-node", f"sp{alive.pid}-0-node"
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True)
        swept = sweep_stale()
        present = set(list_namespaces())
        assert stale in swept
        assert stale not in present
        assert live in present
    finally:
        alive.kill()
        alive.wait()
        for name in (stale, live):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def test_topology_builds_fast(topology_factory: TopologyFactory) -> None:
    started = time.monotonic()
    topo = topology_factory()
    topo.add_pod("pod-a", *POD_A, tcp=[POD_TCP])
    topo.add_client()
    assert time.monotonic() - started < 5.0


def test_run_and_python_execute_inside_namespace(scene: Scene) -> None:
    addrs = scene.a.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {POD_A[0]}/32" in addrs
    code = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    assert scene.a.python(["-c", code]).stdout.strip() == "['eth0', 'lo']"


def test_open_persistent_reports_failure(scene: Scene) -> None:
    with pytest.raises(ConnectionError, match="timeout"):
        scene.client.open_persistent(VIP4, VPORT_TCP, timeout=0.3)


INNER_TESTS = """
import json, pathlib
from tests.support.netns import list_namespaces

NAMES = pathlib.Path(__file__).with_name("names.json")

def test_body_raises(topology):
    topology.add_pod("pod-a", "10.244.1.2", tcp=[8080])
    topology.add_client()
    NAMES.write_text(json.dumps(topology.namespaces))
    raise RuntimeError("test body fails")

def test_previous_topology_is_gone():
    # Same process, so atexit has not run: only the fixture finalizer can
    # have removed them.
    names = json.loads(NAMES.read_text())
    assert len(names) == 4
    assert not set(names) & set(list_namespaces())
"""


def test_fixture_removes_namespaces_when_test_body_raises(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("-p", "tests.e2e.conftest", "--rootdir", str(tmp_path), str(tmp_path)),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "test body fails" in proc.stdout
