"""/metrics over HTTP on loopback after fake syncs: kube-proxy's names,
labels, values and buckets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.agent import Agent, AgentOptions
from agent.backends.base import SyncResult
from agent.httpserver import ServerThread
from agent.metrics import NETWORK_PROGRAMMING_BUCKETS, SYNC_BUCKETS, Metrics
from tests.support.agent_fakes import (
    NODE,
    FakeBackend,
    FakeClock,
    endpoint,
    eslice,
    http_get,
    lb_local_service,
    service,
    up,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerThread) -> Samples:
    resp = http_get(f"http://127.0.0.1:{server.port}/metrics")
    assert resp.status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(resp.body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[ServerThread]:
    srv = metrics.serve("127.0.0.1", 0)
    yield srv
    srv.close()


def test_sync_metrics_after_fake_syncs(metrics: Metrics, server: ServerThread) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    backend = FakeBackend(
        rule_counts={("nat", "IPv4"): 12, ("filter", "IPv4"): 3}, clock=clock, sync_seconds=0.003
    )
    agent = Agent(
        AgentOptions(node_name=NODE), backend, metrics=metrics, clock=clock, wall_clock=clock
    )
    agent.handle(up(service()))
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.source_synced(kind)
    clock.advance(1.0)
    agent.runner.tick()  # full
    agent.handle(up(eslice("web-1", "web", endpoint("10.0.0.1"))))
    agent.handle(up(service("api", ip="10.96.0.11")))
    before = scrape(server)
    assert value(before, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    assert value(before, "kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    assert value(
        before, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", ip_family="IPv4"
    ) == pytest.approx(clock())
    clock.advance(1.0)
    agent.runner.tick()  # partial

    s = scrape(server)
    v4 = {"ip_family": "IPv4"}
    assert value(s, "kubeproxy_sync_proxy_rules_duration_seconds_count", **v4) == 2
    assert value(s, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", **v4) == 1
    assert value(s, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count", **v4) == 1
    assert value(s, "kubeproxy_sync_proxy_rules_duration_seconds_sum", **v4) == pytest.approx(
        0.006, abs=1e-6
    )
    # 3 ms falls in the 4 ms bucket, not the 2 ms one.
    assert value(s, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", le="0.002", **v4) == 0
    assert value(s, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", le="0.004", **v4) == 2
    assert value(s, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", **v4) == pytest.approx(
        clock()
    )
    assert value(s, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
    assert value(s, "kubeproxy_sync_proxy_rules_service_changes_total") == 2
    assert value(s, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert value(s, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_total", table="nat", **v4) == 12
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_total", table="filter", **v4) == 3
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_last", table="nat", **v4) == 12


def test_histogram_buckets_match_upstream(metrics: Metrics, server: ServerThread) -> None:
    assert SYNC_BUCKETS[0] == 0.001 and len(SYNC_BUCKETS) == 15
    assert SYNC_BUCKETS[-1] == pytest.approx(0.001 * 2**14)
    assert NETWORK_PROGRAMMING_BUCKETS[:3] == (0.25, 0.5, 1.0)
    assert NETWORK_PROGRAMMING_BUCKETS[-1] == 300.0
    metrics.record_sync(SyncResult("full", True), 0.5, ["IPv4"], 0.0)
    s = scrape(server)
    les = sorted(
        float(dict(labels)["le"])
        for (name, labels) in s
        if name == "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket"
    )
    assert les[:-1] == pytest.approx(list(SYNC_BUCKETS))
    assert les[-1] == float("inf")


def test_failures_count_restore_and_partial_restore_failures(
    metrics: Metrics, server: ServerThread
) -> None:
    metrics.record_sync(SyncResult("partial", False, error="x"), 0.01, ["IPv4"], 0.0)
    metrics.record_sync(SyncResult("full", True, fell_back=True), 0.01, ["IPv4"], 0.0)
    metrics.record_sync(SyncResult("full", False, error="x"), 0.01, ["IPv4"], 0.0)
    s = scrape(server)
    v4 = {"ip_family": "IPv4"}
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", **v4) == 3
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", **v4) == 2


def test_network_programming_latency_from_trigger_time(
    metrics: Metrics, server: ServerThread
) -> None:
    clock = FakeClock(start=1_700_000_000.0)  # 2023-11-14T22:13:20Z
    agent = Agent(
        AgentOptions(node_name=NODE),
        FakeBackend(),
        metrics=metrics,
        clock=clock,
        wall_clock=clock,
    )
    agent.handle(up(service()))
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.source_synced(kind)
    clock.advance(1.0)
    agent.runner.tick()
    clock.advance(10.0)  # now 22:13:31
    agent.handle(
        up(
            eslice(
                "web-1",
                "web",
                endpoint("10.0.0.1"),
                annotations={
                    "endpoints.kubernetes.io/last-change-trigger-time": "2023-11-14T22:13:28Z"
                },
            )
        )
    )
    agent.runner.tick()
    s = scrape(server)
    v4 = {"ip_family": "IPv4"}
    assert value(s, "kubeproxy_network_programming_duration_seconds_count", **v4) == 1
    assert value(s, "kubeproxy_network_programming_duration_seconds_sum", **v4) == pytest.approx(
        3.0
    )


def test_invalid_objects_and_no_local_endpoints(metrics: Metrics, server: ServerThread) -> None:
    clock = FakeClock()
    agent = Agent(
        AgentOptions(node_name=NODE), FakeBackend(), metrics=metrics, clock=clock, wall_clock=clock
    )
    bad = service("bad")
    bad["spec"]["clusterIPs"] = ["not-an-ip"]
    agent.handle(up(bad))
    # eTP=Local with endpoints only on another node: external traffic dropped here.
    agent.handle(up(lb_local_service()))
    agent.handle(up(eslice("lb-1", "lb", endpoint("10.0.0.5", node="node-b"))))
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.source_synced(kind)
    clock.advance(1.0)
    agent.runner.tick()
    s = scrape(server)
    assert value(s, "sliceproxy_invalid_objects_total", kind="Service", reason="invalid-ip") == 1
    assert (
        value(
            s,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            ip_family="IPv4",
            traffic_policy="external",
        )
        == 1
    )
    assert (
        value(
            s,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            ip_family="IPv4",
            traffic_policy="internal",
        )
        == 0
    )


def test_process_and_platform_collectors_and_404(server: ServerThread) -> None:
    body = http_get(f"http://127.0.0.1:{server.port}/metrics").body
    assert "process_cpu_seconds_total" in body
    assert "python_info" in body
    assert "python_gc_objects_collected_total" in body
    assert http_get(f"http://127.0.0.1:{server.port}/other").status == 404


def test_iptables_last_uses_written_counts_and_falls_back_without_them(
    metrics: Metrics, server: ServerThread
) -> None:
    nat, flt = ("nat", "IPv4"), ("filter", "IPv4")
    last = "kubeproxy_sync_proxy_rules_iptables_last"
    v4 = {"ip_family": "IPv4"}
    # A full sync without a breakdown wrote everything that is in place.
    metrics.record_sync(
        SyncResult("full", True, rules_written=15, rule_counts={nat: 12, flt: 3}), 0.01, [], 0.0
    )
    s = scrape(server)
    assert (value(s, last, table="nat", **v4), value(s, last, table="filter", **v4)) == (12, 3)
    # A partial sync that reports its breakdown is taken at its word.
    metrics.record_sync(
        SyncResult(
            "partial",
            True,
            rules_written=4,
            rule_counts={nat: 14, flt: 3},
            written_counts={nat: 4, flt: 0},
        ),
        0.01,
        [],
        0.0,
    )
    s = scrape(server)
    assert (value(s, last, table="nat", **v4), value(s, last, table="filter", **v4)) == (4, 0)
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_total", table="nat", **v4) == 14
    # A partial sync that wrote nothing wrote zero everywhere...
    metrics.record_sync(SyncResult("partial", True, rule_counts={nat: 14, flt: 3}), 0.01, [], 0.0)
    s = scrape(server)
    assert (value(s, last, table="nat", **v4), value(s, last, table="filter", **v4)) == (0, 0)
    # ...but one that wrote rules without saying where leaves the gauges be.
    metrics.record_sync(
        SyncResult("partial", True, rules_written=7, rule_counts={nat: 16, flt: 3}), 0.01, [], 0.0
    )
    s = scrape(server)
    assert (value(s, last, table="nat", **v4), value(s, last, table="filter", **v4)) == (0, 0)
    assert value(s, "kubeproxy_sync_proxy_rules_iptables_total", table="nat", **v4) == 16
