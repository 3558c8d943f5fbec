"""Partial syncs under load: traffic to untouched services never breaks.

About 200 services are applied to a node namespace with the real ``sliceproxy
apply`` command. Two of them ("steady-1", "steady-2") carry traffic from a
pod without pause while several partial syncs run (an endpoint change of a
third service, a service added, a service removed), each a separate ``apply``
run continuing from the previous run's ``--state-file``. A partial sync
edits the shared dispatch chains (KUBE-SERVICES ...) rule by rule; an
off-by-one there would delete or shadow another service's rule, and this is
where it would show as failed connections.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.backends.iptables.chains import sep_chain, svc_chain
from tests.e2e.conftest import BACKENDS, iptables_missing
from tests.support.iptables_scene import (
    NAMESPACE,
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
from tests.support.netns import NODE_IPV4, NODE_IPV6, Pod, ProbeResult, Topology

FILLERS = 200
STEADY = {"steady-1": ("10.96.0.1", ("a1", "b1")), "steady-2": ("10.96.0.2", ("a2", "b2"))}
MOVING_IP = "10.96.0.3"
ADDED_IP = "10.96.0.4"
# Per background batch: many attempts per probe process so that the gaps
# between processes (interpreter start-up in the namespace) stay short
# compared with the time the batch spends connecting.
BATCH = 250
# Bounds the whole test: the background loop stops at this age whatever happens.
LOAD_LIMIT = 60.0


def filler_ip(i: int) -> str:
    return f"10.96.{1 + i // 250}.{1 + i % 250}"


def manifests(*, moving: tuple[str, ...], added: bool, removed: int | None) -> dict[str, Any]:
    """The whole cluster; one file per service so a change touches one file."""
    out: dict[str, list[dict[str, Any]]] = {
        "node": [node_manifest(NODE, ZONE, [NODE_IPV4, NODE_IPV6])]
    }
    for name, (ip, pods) in STEADY.items():
        out[name] = [service_manifest(name, ip), slice_manifest(name, [endpoint(p) for p in pods])]
    out["moving"] = [
        service_manifest("moving", MOVING_IP),
        slice_manifest("moving", [endpoint(p) for p in moving]),
    ]
    if added:
        out["added"] = [
            service_manifest("added", ADDED_IP),
            slice_manifest("added", [endpoint("c1")]),
        ]
    labels = list(PODS)
    for i in range(FILLERS):
        if i == removed:
            continue
        # Real pod addresses (two per service, rotating), so each filler is a
        # valid, reachable service like the ones around it in a real cluster.
        pods = (labels[i % len(labels)], labels[(i + 1) % len(labels)])
        name = f"filler-{i:03d}"
        out[name] = [
            service_manifest(name, filler_ip(i)),
            slice_manifest(name, [endpoint(p) for p in pods]),
        ]
    return out


@dataclass
class Load:
    """Connections to the steady services from a pod, batch after batch."""

    pod: Pod
    stop: threading.Event = field(default_factory=threading.Event)
    results: dict[str, list[ProbeResult]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        started = time.monotonic()
        for name, (ip, _pods) in STEADY.items():
            self.results[name] = []
            thread = threading.Thread(
                target=self._loop, args=(name, ip, started), name=f"load-{name}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def _loop(self, name: str, ip: str, started: float) -> None:
        try:
            while not self.stop.is_set() and time.monotonic() - started < LOAD_LIMIT:
                self.results[name].append(
                    self.pod.connect_many(ip, 80, attempts=BATCH, timeout=2.0)
                )
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.errors.append(exc)

    def batches(self) -> int:
        return min(len(r) for r in self.results.values())

    def wait_batches(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.batches() < n and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    reason = iptables_missing(request.param) or iptables_missing(request.param, 6)
    if reason:
        pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as topo:
        yield topo


def test_partial_syncs_under_load_break_nothing_and_apply_the_change(
    topo: Topology, backend: str, tmp_path: Path
) -> None:
    for label, (ipv4, ipv6, _node, _zone) in PODS.items():
        topo.add_pod(label, ipv4, ipv6, tcp=[POD_TCP], udp=[POD_UDP])
    client = topo.add_pod("client-pod", "10.244.1.99")
    applier = Applier(topo, backend, tmp_path / "applied.json")
    state = tmp_path / "state"

    initial = manifests(moving=("a1", "a2"), added=False, removed=None)
    first = applier.apply(write_state(state, initial))
    assert f"({backend}): full sync ok" in first
    before = client.connect_many(MOVING_IP, 80, attempts=30)
    assert set(before.pods) == {"a1", "a2"}

    load = Load(client)
    load.start()
    try:
        load.wait_batches(1)
        logs = []
        # Each step rewrites the manifests; the applier compares with its
        # state file and sends only what changed.
        for step in (
            dict(moving=("b2", "c1"), added=False, removed=None),  # endpoint change
            dict(moving=("b2", "c1"), added=True, removed=None),  # a service added
            dict(moving=("b2", "c1"), added=True, removed=17),  # a service removed
        ):
            logs.append(applier.apply(write_state(state, manifests(**step))))
        # Keep the load on until a whole batch ran after the last sync (+2:
        # the batch in flight may have started before it).
        load.wait_batches(load.batches() + 2)
    finally:
        load.finish()

    assert not load.errors, load.errors
    for name, results in load.results.items():
        failures = sum((r.failures for r in results), start=ProbeResult().failures)
        ok = sum(r.ok for r in results)
        assert failures == {}, (name, [e for r in results for e in r.errors][:3])
        assert ok >= 3 * BATCH, (name, ok)
        assert set().union(*(r.pods for r in results)) == set(STEADY[name][1])
    # Each run continued from the state file: partial syncs, not full ones.
    for log in logs:
        assert f"({backend}): partial sync ok" in log, log

    after = client.connect_many(MOVING_IP, 80, attempts=40)
    assert after.failures == {}
    assert set(after.pods) == {"b2", "c1"}
    added = client.connect_many(ADDED_IP, 80, attempts=5)
    assert set(added.pods) == {"c1"}
    # The removed service's VIP no longer goes anywhere: unrouted, it times out.
    gone = client.connect_many(filler_ip(17), 80, attempts=1, timeout=0.5)
    assert gone.failures == {"timeout": 1}
    neighbour = client.connect_many(filler_ip(18), 80, attempts=10)
    assert neighbour.failures == {}

    # Traffic samples a handful of services; the kernel's rules show all of
    # them. After the partial syncs every service still has exactly one
    # cluster-IP rule, into its own chain, and the removed one has none.
    final = manifests(moving=("b2", "c1"), added=True, removed=17)
    expected = {
        items[0]["spec"]["clusterIP"]: svc_chain(f"{NAMESPACE}/{name}:p", "tcp")
        for name, items in final.items()
        if name != "node"
    }
    nat = topo.node.iptables_save(backend=backend, table="nat")  # type: ignore[arg-type]
    assert cluster_ip_rules(nat) == {ip: [chain] for ip, chain in expected.items()}
    # The moving service's old endpoint chains were deleted, not left behind.
    for pod in ("a1", "a2"):
        old = sep_chain(f"{NAMESPACE}/moving:p", "tcp", f"{PODS[pod][0]}:{POD_TCP}")
        assert f":{old} " not in nat
    assert f":{svc_chain(f'{NAMESPACE}/filler-017:p', 'tcp')} " not in nat


def cluster_ip_rules(nat_save: str) -> dict[str, list[str]]:
    """ClusterIP -> the chains KUBE-SERVICES sends it to, from iptables-save."""
    out: dict[str, list[str]] = {}
    for line in nat_save.splitlines():
        match = _SERVICE_RULE.match(line)
        if match:
            out.setdefault(match["ip"], []).append(match["target"])
    return out


_SERVICE_RULE = re.compile(r"^-A KUBE-SERVICES -d (?P<ip>[\d.]+)/32 .* -j (?P<target>\S+)$")
