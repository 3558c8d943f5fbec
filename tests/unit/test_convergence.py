"""Convergence under faults: the agent (real reflectors, real runner, a
rendering fake backend) against the fake API server while random writes,
dropped watches, compactions and restarts happen. At the end the agent's
last synced rules must equal the rules computed from the server's final
state. Seeded, loopback only."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_fakes import FakeBackend
from tests.support.convergence import Key, expected_plan, faulty_writes, random_op, running_agent
from tests.support.fake_apiserver import FakeApiServer
from tests.support.runtime import wait_for


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_agent_converges_to_the_server_state_under_faults(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    world: dict[Key, dict[str, Any]] = {}
    backend = FakeBackend()
    with FakeApiServer(bookmark_interval=0.2) as api:
        # Some state exists before the agent starts (a restarting agent).
        for _ in range(20):
            random_op(rng, api, world)
        with running_agent(api, backend, seed, tmp_path) as run:
            agent, kinds = run.agent, run.kinds
            faulty_writes(rng, api, world, pause=0.01)
            want_plan = expected_plan(world)
            want = backend.render(want_plan)
            assert ":8080" in want  # the final world has endpoints to program

            def done() -> bool:
                # The entries too, not only the rendering: the fake's text
                # leaves out cluster IPs, so it can match while a last
                # Service update is still on its way.
                plan = agent.plan
                return (
                    plan is not None
                    and plan.node == want_plan.node
                    and plan.entries == want_plan.entries
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
    assert kinds[0] == "full"
    assert "partial" in kinds  # the run exercised partial syncs, not only full ones
