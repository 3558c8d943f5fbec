"""Start-up with an unreachable API server: no sync (no rules written), the
proxy turns unhealthy once the health timeout passes without a first sync,
and it lists, syncs and turns healthy as soon as the server answers.

Deliberately unlike kube-proxy, which stays healthy until its first sync
however long that takes (agent/health.py). Loopback only."""

from __future__ import annotations

import json

import pytest

from agent.health import GO_ZERO_TIME, ProxyHealth, go_time
from agent.serve import RunSettings
from tests.support.agent_fakes import (
    NODE,
    FakeBackend,
    FakeClock,
    endpoint,
    eslice,
    http_get,
    node,
    service,
)
from tests.support.convergence import World, expected_plan
from tests.support.fake_apiserver import FakeApiServer
from tests.support.runtime import serving, wait_for

TIMEOUT = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_000.0)


def test_start_counts_as_a_queued_update_until_the_first_sync(clock: FakeClock) -> None:
    health = ProxyHealth(TIMEOUT, clock=clock)
    health.started()
    clock.advance(TIMEOUT - 0.001)
    assert health.respond("/livez")[0] == 200  # time to list a large cluster
    clock.advance(0.001)
    code, body = health.respond("/healthz")
    assert code == 503
    # Never synced: Go's zero time, as kube-proxy prints an unset time.
    assert json.loads(body)["lastUpdated"] == GO_ZERO_TIME
    assert health.respond("/livez")[0] == 503
    health.updated()
    code, body = health.respond("/healthz")
    assert code == 200 and json.loads(body)["lastUpdated"] == go_time(clock())


def test_updates_queued_before_the_start_keep_their_age(clock: FakeClock) -> None:
    health = ProxyHealth(TIMEOUT, clock=clock)
    health.queued_update()
    clock.advance(TIMEOUT / 2)
    health.started()  # must not make the older update look younger
    clock.advance(TIMEOUT / 2)
    assert not health.is_healthy()


def test_after_the_first_sync_start_up_no_longer_counts(clock: FakeClock) -> None:
    health = ProxyHealth(TIMEOUT, clock=clock)
    health.started()
    clock.advance(1.0)
    health.updated()
    clock.advance(10 * TIMEOUT)  # idle: nothing queued since the sync
    assert health.is_healthy()


def test_unreachable_api_server_writes_nothing_reports_unhealthy_then_converges() -> None:
    backend = FakeBackend()
    world: World = {
        ("Node", "", NODE): node(),
        ("Service", "default", "web"): service(),
        ("EndpointSlice", "default", "web-1"): eslice(
            "web-1", "web", endpoint("10.0.0.1", node=NODE), endpoint("10.0.0.2")
        ),
    }
    # Port reserved but not listening: every connection is refused.
    with FakeApiServer(listen=False, bookmark_interval=0.2) as api:
        for (kind, _, _), obj in world.items():
            api.create(kind, obj)
        settings = RunSettings(
            node_name=NODE,
            master=api.url,
            min_sync_period=0.02,
            sync_period=0.25,  # health timeout 0.5 s
            metrics_bind=None,
            healthz_bind=("127.0.0.1", 0),
        )
        with serving(settings, backend) as served:
            port = served.running.healthz_port

            def status(path: str) -> int:
                return http_get(f"http://127.0.0.1:{port}{path}").status

            assert wait_for(lambda: status("/healthz") == 503, 5.0), "never turned unhealthy"
            assert status("/livez") == 503  # the kubelet may restart us: nothing works
            # The reflectors did try (and were refused); nothing was synced.
            stats = served.source.stats()
            assert all(s.counts["errors"] > 0 and not s.synced for s in stats.values())
            assert backend.calls == []
            assert served.running.agent.plan is None

            api.start()
            want = backend.render(expected_plan(world))
            assert "10.0.0.1:8080" in want

            def converged() -> bool:
                plan = served.running.agent.plan
                return plan is not None and backend.render(plan) == want

            assert wait_for(converged, 10.0), "did not converge once the server answered"
            assert backend.kinds[0] == "full"
            assert wait_for(lambda: status("/healthz") == 200, 5.0)
            assert status("/livez") == 200
