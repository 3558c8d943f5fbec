"""The seeded random-operations scenario shared by the convergence tests
(tests/unit/test_convergence.py with a rendering fake backend,
tests/e2e/test_convergence_netns.py with the real iptables applier).

``random_op`` writes one random change to the fake API server and mirrors
it in ``world`` (the objects the server holds, by kind/namespace/name);
``expected_plan`` is the plan a fresh agent would build from that world.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.agent import Agent, AgentOptions
from agent.backends.base import Backend
from agent.plan import NodePlan, build_plan
from agent.sources.events import ObjectEvent
from agent.sources.kube import KubeSource, make_api_client
from agent.state import ClusterState
from tests.support.agent_fakes import NODE, endpoint, eslice, node, service
from tests.support.fake_apiserver import FakeApiServer
from tests.support.runtime import FAST

Key = tuple[str, str, str]  # kind, namespace, name
World = dict[Key, dict[str, Any]]


def random_op(rng: random.Random, api: FakeApiServer, world: World) -> None:
    """One write: services come and go, slices change often, the zone rarely."""
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


def expected_plan(world: World) -> NodePlan:
    """The plan built from scratch from the server's objects."""
    state = ClusterState(NODE)
    for (kind, _, _), obj in sorted(world.items()):
        state.apply(ObjectEvent("upsert", kind, obj, "expected"))
    return build_plan(state)


@dataclass
class Running:
    """An Agent fed by real reflectors from a fake API server."""

    agent: Agent
    source: KubeSource
    kinds: list[str] = field(default_factory=list)  # "full"/"partial", per sync


@contextmanager
def running_agent(
    api: FakeApiServer, backend: Backend, seed: int, tmp_path: Path, stop_timeout: float = 5.0
) -> Iterator[Running]:
    """Start an Agent (fast runner timings) with a KubeSource on ``api``;
    stop both, and close the client, when the block ends."""
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
        yield Running(agent, source, kinds)
    finally:
        source.stop(timeout=5.0)
        agent.stop(timeout=stop_timeout)
        client.close()


def faulty_writes(
    rng: random.Random,
    api: FakeApiServer,
    world: World,
    *,
    pause: float,
    extra: Callable[[int], None] = lambda _i: None,
) -> None:
    """150 random writes with the faults the reflector must survive:
    dropped watches, compaction while disconnected (deletions happen
    unseen: the resume hits 410 and relists), a server restart."""
    for i in range(150):
        random_op(rng, api, world)
        if i % 25 == 10:
            api.drop_watches()
        elif i % 25 == 17:
            api.compact()
            api.drop_watches()
        elif i == 120:
            api.restart(compact=True)
        extra(i)
        if i % 10 == 0:
            time.sleep(pause)  # let watches and syncs interleave with the writes
