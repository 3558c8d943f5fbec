"""Malformed objects never crash the state: every mutation of a valid object
is either accepted or reported as a Problem (seeded, reproducible)."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import yaml

from agent.sources.events import ObjectEvent
from agent.state import ClusterState

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
ODD_VALUES: list[Any] = [
    None,
    0,
    -1,
    70000,
    "",
    "x",
    "10.0.0.999",
    [],
    {},
    [1],
    {"a": 1},
    True,
    1.5,
]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def test_mutated_objects_never_crash() -> None:
    items = yaml.safe_load(EXAMPLE.read_text())["items"]
    rng = random.Random(1234)
    state = ClusterState("worker-a")
    for item in items:
        state.apply(ObjectEvent("upsert", item["kind"], item, "example"))
    baseline = state.all_names()
    for _ in range(3000):
        item = copy.deepcopy(rng.choice(items))
        path = rng.choice(_paths(item))
        mutated = _mutate(item, path, copy.deepcopy(rng.choice(ODD_VALUES)))
        kind = item.get("kind") if isinstance(item, dict) else "Service"
        action = rng.choice(["upsert", "upsert", "upsert", "delete"])
        if not isinstance(mutated, dict):
            mutated = {"metadata": mutated}
        state.apply(ObjectEvent(action, str(kind), mutated, "fuzz"))  # must not raise
    assert state.problems, "the fuzzer should have produced invalid objects"
    assert all(str(p) for p in state.problems)
    assert baseline  # the example had service ports to start with
