"""Convergence under faults: the agent (real reflectors, real runner, a
rendering fake backend) against the fake API server while random writes,
dropped watches, compactions and restarts happen. At the end the agent's
last synced rules must equal the rules computed from the server's final
state. Seeded, loopback only."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent, AgentOptions
from agent.plan import NodePlan, build_plan
from agent.sources.events import ObjectEvent
from agent.sources.kube import KubeSource, ReflectorOptions, make_api_client
from agent.state import ClusterState
from tests.support.agent_fakes import NODE, FakeBackend, endpoint, eslice, node, service
from tests.support.fake_apiserver import FakeApiServer

FAST = ReflectorOptions(
    watch_timeout=30.0,
    read_timeout=5.0,
    connect_timeout=1.0,
    list_timeout=5.0,
    backoff_initial=0.02,
    backoff_max=0.2,
    healthy_stream_seconds=1.0,
)

Key = tuple[str, str, str]  # kind, namespace, name


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def random_op(rng: random.Random, api: FakeApiServer, world: dict[Key, dict[str, Any]]) -> None:
    services = [k for k in world if k[0] == "Service"]
    slices = [k for k in world if k[0] == "EndpointSlice"]
    roll = rng.random()
    if roll < 0.15 or not services:
        name = f"svc-{rng.randrange(8)}"
        obj = service(name, ip=f"10.96.0.{rng.randrange(1, 250)}")
        api.apply("Service", obj)
        world[("Service", "default", name)] = obj
    elif roll < 0.25:
        key = rng.choice(services)
        api.delete("Service", key[2], key[1])
        del world[key]
    elif roll < 0.75:
        svc = rng.choice(services)[2]
        name = f"{svc}-{rng.randrange(2)}"
        eps = [
            endpoint(
                f"10.1.{rng.randrange(4)}.{rng.randrange(1, 250)}",
                node=rng.choice([NODE, "node-b"]),
                ready=rng.random() < 0.8,
            )
            for _ in range(rng.randrange(0, 4))
        ]
        obj = eslice(name, svc, *eps)
        api.apply("EndpointSlice", obj)
        world[("EndpointSlice", "default", name)] = obj
    elif roll < 0.9 and slices:
        key = rng.choice(slices)
        api.delete("EndpointSlice", key[2], key[1])
        del world[key]
    else:
        obj = node(zone=rng.choice(["", "zone-a", "zone-b"]))
        api.apply("Node", obj)
        world[("Node", "", NODE)] = obj


def expected_plan(world: dict[Key, dict[str, Any]]) -> NodePlan:
    state = ClusterState(NODE)
    for (kind, _, _), obj in sorted(world.items()):
        state.apply(ObjectEvent("upsert", kind, obj, "expected"))
    return build_plan(state)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_agent_converges_to_the_server_state_under_faults(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    world: dict[Key, dict[str, Any]] = {}
    backend = FakeBackend()
    with FakeApiServer(bookmark_interval=0.2) as api:
        # Some state exists before the agent starts (a restarting agent).
        for _ in range(20):
            random_op(rng, api, world)
        kinds: list[str] = []
        agent = Agent(
            AgentOptions(node_name=NODE, min_sync_period=0.02, sync_period=0.5),
            backend,
            on_sync=lambda report: kinds.append(report.kind),
        )
        client = make_api_client(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")))
        source = KubeSource(
            client,
            agent.handle,
            node_name=NODE,
            options=FAST,
            on_synced=agent.source_synced,
            rng=random.Random(seed),
        )
        agent.start()
        source.start()
        try:
            for i in range(150):
                random_op(rng, api, world)
                if i % 25 == 10:
                    api.drop_watches()
                elif i % 25 == 17:
                    api.compact()
                    api.drop_watches()  # the resume now hits 410 and relists
                elif i == 120:
                    api.restart(compact=True)
                if i % 10 == 0:
                    time.sleep(0.01)  # let watches and syncs interleave with writes
            want_plan = expected_plan(world)
            want = backend.render(want_plan)
            assert ":8080" in want  # the final world has endpoints to program

            def done() -> bool:
                plan = agent.plan
                return (
                    plan is not None
                    and plan.node == want_plan.node
                    and backend.render(plan) == want
                )

            converged = wait_for(done, 20.0)
            assert converged, "agent rules differ from the server's final state"
            # The synced plan (built by partial updates) equals a plan built
            # from scratch from the server's objects, decisions and all.
            plan = agent.plan
            assert plan is not None
            assert plan.entries == want_plan.entries
            assert plan.node == want_plan.node
        finally:
            source.stop(timeout=5.0)
            agent.stop(timeout=5.0)
            client.close()
    assert kinds[0] == "full"
    assert "partial" in kinds  # the run exercised partial syncs, not only full ones
