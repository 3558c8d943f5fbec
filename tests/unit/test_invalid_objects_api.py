"""Malformed objects served by the API server: the running agent (``serve``,
real reflectors) skips them, counts them in
``sliceproxy_invalid_objects_total{kind,reason}`` (scraped over HTTP on
127.0.0.1), keeps syncing the valid ones, and never drops a service's
working rules because a later version of it is broken."""

from __future__ import annotations

import copy
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.model import ServicePortName
from agent.plan import NodePlan
from agent.serve import RunSettings
from tests.support.agent_fakes import NODE, FakeBackend, endpoint, eslice, http_get, node, service
from tests.support.fake_apiserver import FakeApiServer
from tests.support.runtime import Served, serving, wait_for

INVALID = "sliceproxy_invalid_objects_total"


def scrape(port: int | None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = http_get(f"http://127.0.0.1:{port}/metrics")
    assert resp.status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.body)
        for s in family.samples
    }


def invalid(served: Served, kind: str, reason: str) -> float:
    samples = scrape(served.running.metrics_port)
    return samples.get((INVALID, frozenset({("kind", kind), ("reason", reason)})), 0.0)


def endpoints_of(plan: NodePlan | None, name: str) -> list[str]:
    if plan is None:
        return []
    entry = plan.entries.get((ServicePortName("default", name, "http", "TCP"), 4))
    return [] if entry is None else [e.key for e in entry.decision.all_reachable]


def test_malformed_objects_are_skipped_and_counted_and_the_agent_keeps_going() -> None:
    web = service("web")
    bad_port: dict[str, Any] = service("bad-port", ip="10.96.0.30")
    bad_port["spec"]["ports"][0]["port"] = 70000
    banana = eslice("web-banana", "web", endpoint("10.0.0.9"))
    banana["addressType"] = "Banana"
    listed_meta = {"kind": "Service", "metadata": ["not", "a", "map"], "spec": {}}
    backend = FakeBackend()
    with FakeApiServer(bookmark_interval=0.2) as api:
        api.create("Node", node())
        api.create("Service", web)
        api.create("EndpointSlice", eslice("web-1", "web", endpoint("10.0.0.1")))
        api.serve_raw("Service", bad_port)
        api.serve_raw("EndpointSlice", banana)
        api.serve_raw("Service", listed_meta)
        settings = RunSettings(
            node_name=NODE,
            master=api.url,
            min_sync_period=0.02,
            sync_period=1.0,
            metrics_bind=("127.0.0.1", 0),
            healthz_bind=None,
        )
        with serving(settings, backend) as served:
            agent = served.running.agent
            assert wait_for(lambda: endpoints_of(agent.plan, "web") == ["10.0.0.1:8080"], 10.0)
            plan = agent.plan
            assert plan is not None
            # Only the valid service made it into the rules.
            assert {key[0].name for key in plan.entries} == {"web"}
            assert invalid(served, "Service", "invalid-port") == 1
            assert invalid(served, "EndpointSlice", "invalid-value") == 1
            assert invalid(served, "Service", "wrong-type") == 1

            # A broken update of a working service keeps its rules...
            broken_web = copy.deepcopy(web)
            broken_web["spec"]["ports"][0]["port"] = 70000
            api.serve_raw("Service", broken_web)
            assert wait_for(lambda: invalid(served, "Service", "invalid-port") == 2, 10.0)
            # ...and the agent is still running: later valid changes sync.
            api.create("Service", service("api", ip="10.96.0.11"))
            api.create("EndpointSlice", eslice("api-1", "api", endpoint("10.0.0.2")))
            assert wait_for(lambda: endpoints_of(agent.plan, "api") == ["10.0.0.2:8080"], 10.0)
            assert endpoints_of(agent.plan, "web") == ["10.0.0.1:8080"]
