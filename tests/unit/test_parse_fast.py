"""The fast path of slice parsing and merging must be invisible: the same
results and the same errors as the careful path, on the example cluster,
on the fuzz corpus of test_state_fuzz.py and on hand-picked odd shapes."""

from __future__ import annotations

import copy
import random
from collections import OrderedDict
from typing import Any

import pytest
import yaml

from agent import parse
from agent.model import ServicePortName
from agent.parse import Invalid, ParsedSlice, parse_slice
from agent.sources.events import ObjectEvent
from agent.state import ClusterState
from tests.unit.test_state_fuzz import EXAMPLE, ODD_VALUES, _mutate, _paths

# Values aimed at the fast path's checks, on top of the fuzzer's.
EXTRA_VALUES: list[Any] = [
    False,
    "fd00::1",
    "FD00:0:0::1",
    "10.0.0.01",
    " 10.0.0.1",
    "10.1.2.3",
    {"name": None},
    {"name": 3},
    [{"name": "zone-a"}, {"name": ""}],
    [{"name": "zone-a"}, None],
    OrderedDict(ready=True),
]


def _careful(obj: Any) -> ParsedSlice | tuple[str, str, str]:
    """parse_slice with the fast path switched off."""
    saved = parse._slice_endpoint_fast
    parse._slice_endpoint_fast = lambda raw, family: None  # type: ignore[assignment]
    try:
        return _outcome(obj)
    finally:
        parse._slice_endpoint_fast = saved


def _outcome(obj: Any) -> ParsedSlice | tuple[str, str, str]:
    try:
        return parse_slice(obj)
    except Invalid as bad:
        return (bad.field, bad.message, bad.reason)


def _slices() -> list[dict[str, Any]]:
    items = yaml.safe_load(EXAMPLE.read_text())["items"]
    return [i for i in items if i["kind"] == "EndpointSlice"]


def test_example_slices_parse_the_same_on_both_paths() -> None:
    slices = _slices()
    assert slices
    for obj in slices:
        assert _outcome(obj) == _careful(obj)


def test_fuzzed_slices_parse_the_same_on_both_paths() -> None:
    slices = _slices()
    rng = random.Random(1234)
    fast_taken = 0
    for _ in range(4000):
        item = copy.deepcopy(rng.choice(slices))
        # Mostly inside the endpoints, where the fast path lives.
        paths = [p for p in _paths(item) if p[:1] == ("endpoints",)] or _paths(item)
        value = copy.deepcopy(rng.choice(ODD_VALUES + EXTRA_VALUES))
        mutated = _mutate(item, rng.choice(paths), value)
        if not isinstance(mutated, dict):
            continue
        if rng.random() < 0.2:
            mutated["addressType"] = "IPv6"
        fast = _outcome(mutated)
        assert fast == _careful(mutated), mutated
        fast_taken += isinstance(fast, ParsedSlice) and bool(fast.endpoints)
    assert fast_taken > 100, "the corpus should exercise the fast path"


@pytest.mark.parametrize(
    "endpoint",
    [
        {"addresses": ["10.0.0.1"]},
        {"addresses": ["10.0.0.1"], "conditions": {"ready": None, "serving": False}},
        {"addresses": ["10.0.0.1"], "conditions": {"terminating": 1}},
        {"addresses": ["10.0.0.1"], "nodeName": None, "zone": None},
        {"addresses": ["10.0.0.1"], "hints": {"forZones": [{"name": "a"}, {"name": None}]}},
        {"addresses": ["10.0.0.1"], "hints": {"forNodes": [{"name": 1}]}},
        {"addresses": ["10.0.0.1"], "hints": None},
        {"addresses": ["10.0.0.1"], "hints": {}},
        {"addresses": ["10.0.0.010"]},
        {"addresses": ["fd00::1"]},
        {"addresses": [None]},
        {"addresses": "10.0.0.1"},
        OrderedDict(addresses=["10.0.0.1"], conditions=OrderedDict(ready=False)),
    ],
)
def test_odd_endpoints_match_the_careful_path(endpoint: dict[str, Any]) -> None:
    obj = {
        "metadata": {"name": "s", "namespace": "ns", "labels": {parse.SERVICE_NAME_LABEL: "w"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80}],
        "endpoints": [endpoint, {"addresses": ["10.0.0.2"]}],
    }
    assert _outcome(obj) == _careful(obj)


def test_merged_endpoints_sort_by_family_then_key() -> None:
    state = ClusterState("node-a")
    svc = {
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIPs": ["10.96.0.1", "fd00::10"], "ports": [{"name": "http", "port": 80}]},
    }
    state.apply(ObjectEvent("upsert", "Service", svc))
    for name, family, ips in [
        ("v6", "IPv6", ["fd00::9", "fd00::10", "2001:db8::1"]),
        ("v4", "IPv4", ["10.0.0.9", "10.0.0.10", "9.0.0.1"]),
    ]:
        state.apply(
            ObjectEvent(
                "upsert",
                "EndpointSlice",
                {
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": name,
                        "namespace": "default",
                        "labels": {parse.SERVICE_NAME_LABEL: "web"},
                    },
                    "addressType": family,
                    "ports": [{"name": "http", "port": 8080}],
                    "endpoints": [{"addresses": [ip]} for ip in ips],
                },
            )
        )
    resolved = state.service_port(ServicePortName("default", "web", "http", "TCP"))
    assert resolved is not None
    got = [e.key for e in resolved.endpoints]
    assert got == [e.key for e in sorted(resolved.endpoints, key=lambda e: (e.family, e.key))]
    assert got[0] == "10.0.0.10:8080" and got[-1] == "[fd00::9]:8080"
