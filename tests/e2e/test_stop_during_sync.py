"""Stopping the agent (what SIGTERM/SIGINT do) while a sync is running, with the
real iptables applier writing into a network namespace this test created.

`sliceproxy run`'s signal handler only sets the stop event that ``serve()``
waits on (tests/unit/test_run_command.py sends a real SIGTERM to a dry-run
agent); this test sets that event at the worst moment: while the backend is
inside a sync. ``serve()`` must return 0 and the kernel must hold a complete
rule set, never a half-written one, and it must stay in place (like
kube-proxy, stopping never removes rules).
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections.abc import Collection, Iterator

import pytest

from agent.backends.base import SyncResult
from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.restore import binary, subprocess_runner
from agent.model import ServicePortName
from agent.plan import NodePlan
from agent.serve import RunSettings
from tests.support.agent_fakes import NODE, endpoint, eslice, node, service
from tests.support.fake_apiserver import FakeApiServer
from tests.support.netns import delete_namespace, run
from tests.support.runtime import serving, wait_for

pytestmark = pytest.mark.root

SERVICES = 150
_counter = itertools.count()


class SignalledDuringSync:
    """The real backend, with the second sync held at its start until the
    test has asked the agent to stop: the stop lands mid-sync, every time."""

    name = "iptables"

    def __init__(self, inner: IptablesBackend) -> None:
        self.inner = inner
        self.second_started = threading.Event()
        self.proceed = threading.Event()
        self.calls = 0
        self.results: list[SyncResult] = []
        self.plans: list[NodePlan] = []

    def render(self, plan: NodePlan) -> str:
        return self.inner.render(plan)

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        self.calls += 1
        self.plans.append(plan)
        if self.calls == 2:
            self.second_started.set()
            self.proceed.wait(10.0)
        result = self.inner.sync(plan, changed)
        self.results.append(result)
        return result

    def cleanup(self) -> int:
        return self.inner.cleanup()


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which(binary("restore", 4, "nft")) is None:
        pytest.skip("iptables-nft-restore is not installed (package iptables)")
    name = f"sp{os.getpid()}-{next(_counter)}-stop"  # swept by conftest if we crash
    run(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        delete_namespace(name)


def kube_services_targets(netns: str) -> list[str]:
    save = run(["ip", "netns", "exec", netns, "iptables-nft-save", "-t", "nat"]).stdout
    return [
        line.split("-d ", 1)[1].split()[0]
        for line in save.splitlines()
        if line.startswith("-A KUBE-SERVICES ") and " -d " in line
    ]


def test_stop_during_a_sync_finishes_it_and_leaves_the_rules(netns: str) -> None:
    inner = IptablesBackend(
        RenderOptions(cluster_cidrs=("10.244.0.0/16",), random_fully=False),
        mode="nft",
        runner=subprocess_runner(["ip", "netns", "exec", netns]),
    )
    backend = SignalledDuringSync(inner)
    with FakeApiServer() as api:
        api.create("Node", node())
        for i in range(SERVICES):
            api.create("Service", service(f"svc-{i}", ip=f"10.96.{i // 250}.{i % 250 + 1}"))
            ip = f"10.244.{i // 250}.{i % 250 + 1}"
            api.create("EndpointSlice", eslice(f"svc-{i}-x", f"svc-{i}", endpoint(ip)))
        settings = RunSettings(
            node_name=NODE,
            master=api.url,
            min_sync_period=0.01,
            sync_period=5.0,
            metrics_bind=None,
            healthz_bind=None,
        )
        with serving(settings, backend, timeout=20.0):
            assert wait_for(lambda: backend.calls >= 1 and backend.results, 30.0)
            assert backend.results[0].ok and backend.results[0].kind == "full"
            # A burst of changes; the next sync is the one we interrupt.
            for i in range(0, SERVICES, 3):
                ip = f"10.245.{i // 250}.{i % 250 + 1}"
                api.update("EndpointSlice", eslice(f"svc-{i}-x", f"svc-{i}", endpoint(ip)))
            assert backend.second_started.wait(30.0), "the second sync never started"
            # Leaving the block sets serve()'s stop event while the sync is
            # held; it is released half a second later and must complete.
            # serving() asserts that serve() then returned 0.
            threading.Timer(0.5, backend.proceed.set).start()
    assert backend.calls == 2, "no sync may start after the stop"
    assert len(backend.results) == 2 and backend.results[1].ok, "the running sync must finish"
    targets = kube_services_targets(netns)
    assert len(targets) == SERVICES, "every service keeps its rule after the stop"
    canary = run(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "iptables-nft",
            "-w",
            "-t",
            "mangle",
            "-S",
            "KUBE-PROXY-CANARY",
        ],
        check=False,
    )
    assert canary.returncode == 0, "our tables are intact (canary present)"
    save = run(["ip", "netns", "exec", netns, "iptables-nft-save", "-t", "nat"]).stdout
    in_kernel = {
        line.split("--to-destination ", 1)[1].strip()
        for line in save.splitlines()
        if "--to-destination" in line
    }
    # The interrupted sync completed: the kernel holds exactly its plan.
    planned = {
        e.key for entry in backend.plans[1].entries.values() for e in entry.decision.all_reachable
    }
    assert in_kernel == planned
    assert any(key.startswith("10.245.") for key in planned), "the second sync changed rules"
