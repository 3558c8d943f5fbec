"""update_plan (recompute only the changed service ports) must always equal
build_plan (recompute everything) for the same state."""

from __future__ import annotations

import random

from agent.plan import build_plan, update_plan
from agent.sources.events import ObjectEvent
from agent.state import ClusterState
from bench.plan_scale import eslice, service


def test_incremental_plan_equals_full_plan_after_random_changes() -> None:
    rng = random.Random(42)
    state = ClusterState("node-1")
    plan = build_plan(state)
    for _ in range(400):
        i = rng.randrange(30)
        kind = rng.choice(["Service", "EndpointSlice", "EndpointSlice"])
        obj = service(i) if kind == "Service" else eslice(i, rng.randrange(1, 5), rng.randrange(5))
        action = "delete" if rng.random() < 0.2 else "upsert"
        changed = state.apply(ObjectEvent(action, kind, obj))
        plan = update_plan(plan, state, changed)
        assert plan.entries == build_plan(state).entries
    assert plan.entries, "the walk should end with some service ports"


def test_dual_stack_entries_are_replaced_and_removed_per_family() -> None:
    state = ClusterState("node-1")
    svc = service(1)
    svc["spec"]["clusterIPs"] = ["10.96.0.1", "fd00::1"]
    changed = state.apply(ObjectEvent("upsert", "Service", svc))
    plan = update_plan(build_plan(state), state, changed)
    assert sorted(f for _, f in plan.entries) == [4, 6]
    svc["spec"]["clusterIPs"] = ["10.96.0.1"]
    plan = update_plan(plan, state, state.apply(ObjectEvent("upsert", "Service", svc)))
    assert sorted(f for _, f in plan.entries) == [4]
