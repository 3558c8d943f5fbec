"""/healthz and /livez with kube-proxy's semantics on an injected clock, and
the healthCheckNodePort servers following the plan. Loopback only."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from agent.agent import Agent, AgentOptions
from agent.health import ProxyHealth, go_time, serve_health
from agent.healthcheck import HealthCheckTarget, ServiceHealthServers, targets_from_plan
from agent.httpserver import ServerThread
from agent.metrics import Metrics
from tests.support.agent_fakes import (
    NODE,
    FakeBackend,
    FakeClock,
    down,
    endpoint,
    eslice,
    http_get,
    lb_local_service,
    node,
    up,
)

TIMEOUT = 60.0  # 2 x the default 30 s sync period


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_000.0)


@pytest.fixture
def health(clock: FakeClock) -> ProxyHealth:
    return ProxyHealth(TIMEOUT, clock=clock)


@pytest.fixture
def server(health: ProxyHealth) -> Iterator[ServerThread]:
    srv = serve_health(health, "127.0.0.1", 0)
    yield srv
    srv.close()


def get(server: ServerThread, path: str) -> tuple[int, dict[str, object]]:
    resp = http_get(f"http://127.0.0.1:{server.port}{path}")
    assert resp.headers["Content-Type"] == "application/json"
    return resp.status, json.loads(resp.body)


def test_healthy_while_starting_even_with_old_queued_updates(
    health: ProxyHealth, clock: FakeClock, server: ServerThread
) -> None:
    health.queued_update()
    clock.advance(10 * TIMEOUT)  # never synced yet: upstream reports healthy
    assert get(server, "/healthz")[0] == 200
    assert get(server, "/livez")[0] == 200


def test_unhealthy_when_a_queued_update_is_older_than_the_timeout(
    health: ProxyHealth, clock: FakeClock, server: ServerThread
) -> None:
    health.updated()
    clock.advance(5.0)
    health.queued_update()
    clock.advance(TIMEOUT - 0.001)
    assert get(server, "/healthz")[0] == 200
    clock.advance(0.001)
    status, body = get(server, "/healthz")
    assert status == 503
    # lastUpdated is the real last sync when unhealthy.
    assert body["lastUpdated"] == go_time(1_700_000_000.0)
    assert body["currentTime"] == go_time(clock())
    assert get(server, "/livez")[0] == 503
    health.updated()
    assert get(server, "/healthz")[0] == 200


def test_idle_proxy_stays_healthy_and_reports_now_as_last_updated(
    health: ProxyHealth, clock: FakeClock, server: ServerThread
) -> None:
    health.updated()
    clock.advance(3600.0)  # nothing queued: no reason to sync
    status, body = get(server, "/healthz")
    assert status == 200
    assert body == {
        "lastUpdated": go_time(clock()),
        "currentTime": go_time(clock()),
        "nodeEligible": True,
    }


def test_node_being_deleted_fails_healthz_but_not_livez(
    health: ProxyHealth, server: ServerThread
) -> None:
    health.updated()
    health.set_node(node(metadata={"name": NODE, "deletionTimestamp": "2024-01-01T00:00:00Z"}))
    status, body = get(server, "/healthz")
    assert status == 503 and body["nodeEligible"] is False
    status, body = get(server, "/livez")
    assert status == 200 and "nodeEligible" not in body


def test_autoscaler_taint_and_deleted_node_make_the_node_ineligible(health: ProxyHealth) -> None:
    health.set_node(
        node(spec={"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]})
    )
    assert not health.node_eligible
    health.set_node(node())
    assert health.node_eligible
    health.set_node(None)
    assert not health.node_eligible


def test_agent_feeds_node_eligibility_and_probe_metrics(clock: FakeClock) -> None:
    health = ProxyHealth(TIMEOUT, clock=clock)
    metrics = Metrics()
    agent = Agent(AgentOptions(node_name=NODE), FakeBackend(), health=health, clock=clock)
    srv = serve_health(health, "127.0.0.1", 0, metrics.record_probe)
    try:
        agent.handle(up(node()))
        assert get(srv, "/healthz")[0] == 200
        agent.handle(down(node()))
        assert get(srv, "/healthz")[0] == 503
        get(srv, "/livez")
    finally:
        srv.close()
    assert metrics.healthz_total.labels("200")._value.get() == 1
    assert metrics.healthz_total.labels("503")._value.get() == 1
    assert metrics.livez_total.labels("200")._value.get() == 1


def test_unknown_path_is_404(server: ServerThread) -> None:
    assert http_get(f"http://127.0.0.1:{server.port}/metrics").status == 404


def test_go_time_format() -> None:
    assert go_time(0.0) == "1970-01-01 00:00:00 +0000 UTC"
    assert go_time(1.5) == "1970-01-01 00:00:01.5 +0000 UTC"


# ---------------------------------------------------------------- healthCheckNodePort


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hc_agent(clock: FakeClock) -> Iterator[tuple[Agent, ServiceHealthServers, ProxyHealth]]:
    health = ProxyHealth(TIMEOUT, clock=clock)
    servers = ServiceHealthServers(health.is_healthy, ("127.0.0.1",))
    agent = Agent(
        AgentOptions(node_name=NODE),
        FakeBackend(),
        health=health,
        service_health=servers,
        clock=clock,
        wall_clock=clock,
    )
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.source_synced(kind)
    yield agent, servers, health
    servers.close()


def sync(agent: Agent, clock: FakeClock) -> None:
    clock.advance(1.0)
    agent.runner.tick()


def test_healthcheck_server_opens_reports_and_closes_with_the_plan(
    hc_agent: tuple[Agent, ServiceHealthServers, ProxyHealth], clock: FakeClock
) -> None:
    agent, servers, _ = hc_agent
    port = free_port()
    svc = lb_local_service(hc_port=port)
    agent.handle(up(svc))
    agent.handle(
        up(
            eslice(
                "lb-1",
                "lb",
                endpoint("10.0.0.1", node=NODE),
                endpoint("10.0.0.2", node=NODE),
                endpoint("10.0.0.3", node=NODE, ready=False, serving=True, terminating=True),
                endpoint("10.0.0.4", node="node-b"),
            )
        )
    )
    sync(agent, clock)
    assert servers.open_ports() == {("default", "lb"): [port]}
    resp = http_get(f"http://127.0.0.1:{port}/")
    assert resp.status == 200
    # Only local *ready* endpoints count (upstream), not the terminating one.
    assert resp.headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert json.loads(resp.body) == {
        "service": {"namespace": "default", "name": "lb"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }

    # Only a terminating endpoint left here: 503 so the LB drains this node.
    agent.handle(
        up(
            eslice(
                "lb-1",
                "lb",
                endpoint("10.0.0.3", node=NODE, ready=False, serving=True, terminating=True),
            )
        )
    )
    sync(agent, clock)
    resp = http_get(f"http://127.0.0.1:{port}/")
    assert resp.status == 503
    assert resp.headers["X-Load-Balancing-Endpoint-Weight"] == "0"
    assert json.loads(resp.body)["localEndpoints"] == 0

    agent.handle(down(svc))
    sync(agent, clock)
    assert servers.open_ports() == {}
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{port}/", timeout=1.0)


def test_healthcheck_reports_503_when_the_proxy_is_unhealthy(
    hc_agent: tuple[Agent, ServiceHealthServers, ProxyHealth], clock: FakeClock
) -> None:
    agent, _, health = hc_agent
    port = free_port()
    agent.handle(up(lb_local_service(hc_port=port)))
    agent.handle(up(eslice("lb-1", "lb", endpoint("10.0.0.1", node=NODE))))
    sync(agent, clock)
    health.queued_update()
    clock.advance(TIMEOUT)
    resp = http_get(f"http://127.0.0.1:{port}/")
    assert resp.status == 503
    body = json.loads(resp.body)
    assert body["localEndpoints"] == 1 and body["serviceProxyHealthy"] is False


def test_healthcheck_port_change_reopens_on_the_new_port(clock: FakeClock) -> None:
    servers = ServiceHealthServers(lambda: True, ("127.0.0.1",))
    a, b = free_port(), free_port()
    try:
        servers.sync_targets({("ns", "x"): HealthCheckTarget(a, 1)})
        servers.sync_targets({("ns", "x"): HealthCheckTarget(b, 1)})
        assert servers.open_ports() == {("ns", "x"): [b]}
        assert http_get(f"http://127.0.0.1:{b}/").status == 200
    finally:
        servers.close()


def test_port_in_use_is_logged_counted_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    failures: list[int] = []
    servers = ServiceHealthServers(
        lambda: True, ("127.0.0.1",), on_listen_error=lambda _k, port, _e: failures.append(port)
    )
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        servers.sync_targets({("ns", "x"): HealthCheckTarget(port, 1)})
        assert servers.open_ports() == {}
        assert failures == [port]
        assert "healthcheck_listen_failed" in caplog.text
        blocker.close()
        servers.sync_targets({("ns", "x"): HealthCheckTarget(port, 1)})  # next sync retries
        assert servers.open_ports() == {("ns", "x"): [port]}
    finally:
        blocker.close()
        servers.close()


def test_targets_only_for_services_with_a_health_check_node_port(clock: FakeClock) -> None:
    agent = Agent(AgentOptions(node_name=NODE), FakeBackend(), clock=clock)
    agent.handle(up(lb_local_service(hc_port=30999)))
    agent.handle(
        up(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "plain", "namespace": "default"},
                "spec": {"clusterIPs": ["10.96.0.50"], "ports": [{"port": 80}]},
            }
        )
    )
    assert targets_from_plan(agent.current_plan()) == {
        ("default", "lb"): HealthCheckTarget(30999, 0)
    }
