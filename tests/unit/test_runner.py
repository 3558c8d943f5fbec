"""The bounded-frequency runner and the agent's sync decisions, on a fake
clock: no test here sleeps."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from agent.agent import Agent, AgentOptions
from agent.runner import BoundedFrequencyRunner
from tests.support.agent_fakes import (
    NODE,
    FakeBackend,
    FakeClock,
    endpoint,
    eslice,
    node,
    service,
    spn,
    up,
)

# ---------------------------------------------------------------- runner


class Counter:
    """A sync function that records call times and can fail or take time."""

    def __init__(self, clock: FakeClock, takes: float = 0.0) -> None:
        self.clock = clock
        self.takes = takes
        self.calls: list[float] = []
        self.results: list[bool] = []

    def __call__(self) -> bool:
        self.calls.append(self.clock())
        self.clock.advance(self.takes)
        return self.results.pop(0) if self.results else True


def make_runner(
    clock: FakeClock, fn: Counter, min_: float = 1.0, retry: float = 30.0, max_: float = 3600.0
) -> BoundedFrequencyRunner:
    return BoundedFrequencyRunner(
        fn, min_interval=min_, retry_interval=retry, max_interval=max_, clock=clock
    )


def test_requests_within_min_interval_coalesce_into_one_run() -> None:
    clock = FakeClock()
    fn = Counter(clock)
    r = make_runner(clock, fn)
    for _ in range(5):
        r.run()
    r.tick()
    assert len(fn.calls) == 1
    for _ in range(5):
        r.run()
        clock.advance(0.1)
        assert r.tick() > 0  # still inside the 1 s window: nothing runs
    assert len(fn.calls) == 1
    clock.advance(0.5)  # 1.0 s after the first run ended
    r.tick()
    assert len(fn.calls) == 2  # the five requests became one run


def test_min_interval_counts_from_the_end_of_the_previous_run() -> None:
    clock = FakeClock()
    fn = Counter(clock, takes=5.0)
    r = make_runner(clock, fn)
    r.run()
    r.tick()
    ended = clock()
    r.run()
    assert r.next_due() == pytest.approx(ended + 1.0)
    clock.advance(0.99)
    r.tick()
    assert len(fn.calls) == 1
    clock.advance(0.01)
    r.tick()
    assert fn.calls[1] == pytest.approx(ended + 1.0)


def test_never_two_runs_closer_than_min_interval_under_a_stream_of_requests() -> None:
    clock = FakeClock()
    fn = Counter(clock, takes=0.05)
    r = make_runner(clock, fn, min_=1.0)
    for _ in range(400):  # a request every 25 ms for 10 s
        r.run()
        r.tick()
        clock.advance(0.025)
    gaps = [b - (a + 0.05) for a, b in zip(fn.calls, fn.calls[1:], strict=False)]
    assert len(fn.calls) >= 8
    assert min(gaps) >= 1.0 - 1e-9


def test_request_during_a_run_causes_one_more_run() -> None:
    clock = FakeClock()
    r: BoundedFrequencyRunner

    def fn() -> bool:
        calls.append(clock())
        if len(calls) == 1:
            r.run()  # an event arrives while syncing
        return True

    calls: list[float] = []
    r = BoundedFrequencyRunner(
        fn, min_interval=1.0, retry_interval=30.0, max_interval=3600.0, clock=clock
    )
    r.run()
    r.tick()
    assert r.pending
    clock.advance(1.0)
    r.tick()
    assert len(calls) == 2
    assert not r.pending


def test_periodic_run_after_max_interval_without_requests() -> None:
    clock = FakeClock()
    fn = Counter(clock)
    r = make_runner(clock, fn, max_=60.0)
    clock.advance(59.0)
    r.tick()
    assert fn.calls == []
    clock.advance(1.0)
    r.tick()
    assert len(fn.calls) == 1
    # The period restarts from the end of every run, requested or not.
    clock.advance(30.0)
    r.run()
    r.tick()
    assert r.next_due() == pytest.approx(clock() + 60.0)


def test_failure_is_retried_after_retry_interval_and_success_cancels_retry() -> None:
    clock = FakeClock()
    fn = Counter(clock)
    fn.results = [False, True]
    r = make_runner(clock, fn, retry=30.0)
    r.run()
    r.tick()
    assert r.failures == 1
    assert r.next_due() == pytest.approx(clock() + 30.0)
    clock.advance(29.9)
    r.tick()
    assert len(fn.calls) == 1
    clock.advance(0.1)
    r.tick()
    assert len(fn.calls) == 2
    # Succeeded: only the periodic timer is left.
    assert r.next_due() == pytest.approx(clock() + 3600.0)


def test_a_raising_function_counts_as_a_failure_and_is_retried() -> None:
    clock = FakeClock()

    def boom() -> bool:
        raise RuntimeError("backend bug")

    r = BoundedFrequencyRunner(
        boom, min_interval=1.0, retry_interval=5.0, max_interval=60.0, clock=clock
    )
    r.run()
    r.tick()
    assert r.failures == 1
    assert r.next_due() == pytest.approx(clock() + 5.0)


def test_max_interval_shorter_than_min_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="max_interval"):
        BoundedFrequencyRunner(
            lambda: True, min_interval=10.0, retry_interval=1.0, max_interval=5.0
        )


def test_loop_thread_runs_on_request_and_stops() -> None:
    # Real clock, tiny intervals: the thread wakes on run() and ends on stop().
    done = threading.Event()
    r = BoundedFrequencyRunner(
        lambda: done.set() or True, min_interval=0.0, retry_interval=1.0, max_interval=60.0
    )
    thread = r.start()
    try:
        r.run()
        assert done.wait(5.0)
    finally:
        r.stop()
        thread.join(5.0)
    assert not thread.is_alive()


# ---------------------------------------------------------------- the agent


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def agent(clock: FakeClock, backend: FakeBackend) -> Iterator[Agent]:
    a = Agent(
        AgentOptions(node_name=NODE, min_sync_period=1.0, sync_period=30.0, full_sync_period=600.0),
        backend,
        clock=clock,
        wall_clock=clock,
    )
    yield a
    a.stop(timeout=1.0)


def synced(agent: Agent) -> None:
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.source_synced(kind)


def settle(agent: Agent, clock: FakeClock) -> None:
    """Let the min interval pass and give the runner a chance to run."""
    clock.advance(1.0)
    agent.runner.tick()


def test_no_sync_before_every_resource_is_listed(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    agent.handle(up(eslice("web-1", "web", endpoint("10.0.0.1"))))
    agent.source_synced("Service")
    agent.source_synced("EndpointSlice")
    settle(agent, clock)
    clock.advance(700.0)  # even the periodic timer must not sync yet
    agent.runner.tick()
    assert backend.calls == []
    agent.source_synced("Node")
    settle(agent, clock)
    assert backend.kinds == ["full"]
    assert spn() in {k[0] for k in backend.calls[0].plan.entries}


def test_changes_after_the_first_sync_are_partial_with_the_changed_ports(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    agent.handle(up(service("api", ip="10.96.0.11")))
    synced(agent)
    settle(agent, clock)
    agent.handle(up(eslice("web-1", "web", endpoint("10.0.0.1"))))
    agent.handle(up(eslice("web-1", "web", endpoint("10.0.0.1"), endpoint("10.0.0.2"))))
    settle(agent, clock)
    assert backend.kinds == ["full", "partial"]
    assert backend.calls[1].changed == {spn()}
    # The partial plan equals a plan built from scratch.
    assert backend.calls[1].plan.entries == agent.current_plan().entries


def test_an_event_without_effect_does_not_trigger_a_sync(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    synced(agent)
    settle(agent, clock)
    agent.handle(up(service()))  # same object again (e.g. a relist)
    settle(agent, clock)
    assert backend.kinds == ["full"]
    assert not agent.runner.pending


def test_failed_sync_is_retried_as_a_full_sync_after_sync_period(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    synced(agent)
    settle(agent, clock)
    backend.fail_next = 1
    agent.handle(up(eslice("web-1", "web", endpoint("10.0.0.1"))))
    settle(agent, clock)
    assert backend.kinds == ["full", "partial"]
    clock.advance(29.0)
    agent.runner.tick()
    assert len(backend.calls) == 2  # retry waits for --sync-period
    clock.advance(1.0)
    agent.runner.tick()
    assert backend.kinds == ["full", "partial", "full"]
    assert [e.key for e in backend.calls[2].plan.entries[(spn(), 4)].decision.all_reachable] == [
        "10.0.0.1:8080"
    ]


def test_an_event_after_a_failure_syncs_early_and_full(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    synced(agent)
    settle(agent, clock)
    backend.fail_next = 1
    agent.handle(up(eslice("web-1", "web", endpoint("10.0.0.1"))))
    settle(agent, clock)
    agent.handle(up(service("api", ip="10.96.0.11")))
    settle(agent, clock)  # 1 s later, not 30 s: a new change does not wait for the retry
    assert backend.kinds == ["full", "partial", "full"]


def test_zone_label_change_forces_a_full_sync(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(node(zone="a")))
    agent.handle(up(service()))
    synced(agent)
    settle(agent, clock)
    agent.handle(up(node(zone="b")))
    settle(agent, clock)
    assert backend.kinds == ["full", "full"]
    assert backend.calls[1].plan.node.zone == "b"


def test_zone_change_with_no_services_still_syncs_full(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    synced(agent)
    settle(agent, clock)
    agent.handle(up(node(zone="b")))
    agent.handle(up(service()))
    settle(agent, clock)
    assert backend.kinds == ["full", "full"]


def test_periodic_timer_runs_a_full_resync(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    synced(agent)
    settle(agent, clock)
    clock.advance(599.0)
    agent.runner.tick()
    assert backend.kinds == ["full"]
    clock.advance(1.0)
    agent.runner.tick()
    assert backend.kinds == ["full", "full"]


def test_full_sync_when_full_sync_period_passed_even_with_partial_syncs_between(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    agent.handle(up(service()))
    synced(agent)
    settle(agent, clock)
    for i in range(12):  # a change every 50 s keeps the periodic timer from firing
        clock.advance(50.0)
        agent.handle(up(eslice("web-1", "web", endpoint(f"10.0.0.{i + 1}"))))
        agent.runner.tick()
    assert backend.kinds[0] == "full"
    assert "full" in backend.kinds[1:]  # the one after 600 s since the last full
    assert backend.kinds[1:11] == ["partial"] * 10


def test_request_full_sync(agent: Agent, backend: FakeBackend, clock: FakeClock) -> None:
    synced(agent)
    settle(agent, clock)
    agent.request_full_sync()
    settle(agent, clock)
    assert backend.kinds == ["full", "full"]


def test_events_during_a_slow_sync_are_synced_next(clock: FakeClock) -> None:
    backend = FakeBackend()
    agent = Agent(AgentOptions(node_name=NODE), backend, clock=clock, wall_clock=clock)
    original = backend.sync

    def sync_and_receive(plan, changed):  # type: ignore[no-untyped-def]
        result = original(plan, changed)
        if len(backend.calls) == 1:
            agent.handle(up(service("late", ip="10.96.0.99")))
        return result

    backend.sync = sync_and_receive  # type: ignore[method-assign]
    synced(agent)
    settle(agent, clock)
    settle(agent, clock)
    assert backend.kinds == ["full", "partial"]
    assert backend.calls[1].changed == {spn("late")}


def test_handle_is_thread_safe_against_concurrent_syncs(clock: FakeClock) -> None:
    backend = FakeBackend()
    agent = Agent(
        AgentOptions(node_name=NODE, min_sync_period=0.0), backend, clock=clock, wall_clock=clock
    )
    synced(agent)
    agent.handle(up(service()))

    def writer(base: int) -> None:
        for i in range(200):
            agent.handle(up(eslice(f"web-{base}", "web", endpoint(f"10.{base}.0.{i % 250}"))))

    threads = [threading.Thread(target=writer, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        agent.runner.tick()
    for t in threads:
        t.join()
    agent.runner.tick()
    agent.runner.tick()
    assert backend.calls[-1].plan.entries == agent.current_plan().entries


def test_derived_counts_kept_from_changed_entries_equal_a_full_recount(
    agent: Agent, backend: FakeBackend, clock: FakeClock
) -> None:
    """The agent keeps families and no-local-endpoint counts up to date from
    each partial sync's changed entries; they must equal a recount."""
    from agent.agent import _families_of, no_local_endpoints

    local = {"internalTrafficPolicy": "Local"}
    agent.handle(up(service("a", ip="10.96.0.1", **local)))
    agent.handle(up(eslice("a-1", "a", endpoint("10.0.0.1"))))  # remote only
    agent.handle(up(service("b", ip="10.96.0.2")))
    synced(agent)
    settle(agent, clock)
    steps = [
        up(eslice("a-1", "a", endpoint("10.0.0.1", node=NODE))),  # now local
        up(service("c", ip="fd00::3", **local)),
        up(eslice("c-1", "c", endpoint("10.0.0.3"))),  # wrong family: no endpoints
        up(service("a", ip="10.96.0.1")),  # Cluster policy now
        up(service("d", ip="10.96.0.4", **local)),
        up(eslice("d-1", "d", endpoint("10.0.0.4"))),
    ]
    for event in steps:
        agent.handle(event)
        settle(agent, clock)
        plan = agent.plan
        assert plan is not None and backend.kinds[-1] == "partial"
        assert agent._no_local == no_local_endpoints(plan)
        assert agent._families == _families_of(plan)
    assert agent._no_local == {
        ("IPv4", "internal"): 1,  # d: Local, its only endpoint elsewhere
        ("IPv4", "external"): 0,
        ("IPv6", "internal"): 0,  # c: no endpoints at all, so rejected, not counted
        ("IPv6", "external"): 0,
    }
