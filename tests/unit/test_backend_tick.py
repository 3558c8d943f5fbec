"""The agent calls a backend's optional tick() every tick_period (IPVS:
graceful termination between syncs), never before the first sync, never
for backends without one, and a raising tick does not stop the ticks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from agent.agent import Agent, AgentOptions
from agent.sources.events import KINDS
from tests.support.agent_fakes import NODE, FakeBackend, FakeClock, node, service, up


@dataclass
class TickingBackend(FakeBackend):
    ticks: list[float] = field(default_factory=list)
    raise_on_tick: bool = False

    def tick(self) -> None:
        assert self.clock is not None
        self.ticks.append(self.clock())
        if self.raise_on_tick:
            raise RuntimeError("injected tick failure")


def synced_agent(backend: FakeBackend, clock: FakeClock, period: float = 60.0) -> Agent:
    agent = Agent(AgentOptions(node_name=NODE, tick_period=period), backend, clock=clock)
    agent.handle(up(node()))
    agent.handle(up(service()))
    for kind in KINDS:
        agent.source_synced(kind)
    assert agent.sync()
    return agent


def test_tick_runs_once_per_period_after_the_first_sync() -> None:
    clock = FakeClock()
    backend = TickingBackend(clock=clock)
    agent = synced_agent(backend, clock, period=60.0)
    start = clock()
    assert agent.tick() == 60.0  # first call starts the period
    clock.advance(59.0)
    assert agent.tick() == pytest.approx(1.0)
    assert backend.ticks == []
    clock.advance(1.0)
    assert agent.tick() == 60.0
    assert backend.ticks == [start + 60.0]
    clock.advance(30.0)
    agent.tick()
    clock.advance(30.0)
    agent.tick()
    assert backend.ticks == [start + 60.0, start + 120.0]


def test_tick_period_is_a_parameter() -> None:
    clock = FakeClock()
    backend = TickingBackend(clock=clock)
    agent = synced_agent(backend, clock, period=5.0)
    agent.tick()
    for _ in range(3):
        clock.advance(5.0)
        agent.tick()
    assert len(backend.ticks) == 3


def test_no_tick_before_the_first_sync() -> None:
    clock = FakeClock()
    backend = TickingBackend(clock=clock)
    agent = Agent(AgentOptions(node_name=NODE, tick_period=10.0), backend, clock=clock)
    agent.tick()
    clock.advance(10.0)
    agent.tick()
    assert backend.ticks == []  # nothing programmed yet: nothing to drain


def test_backend_without_tick_needs_nothing() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock=clock)
    agent = synced_agent(backend, clock, period=10.0)
    assert not hasattr(backend, "tick")
    agent.tick()
    clock.advance(10.0)
    assert agent.tick() == pytest.approx(10.0)


def test_a_raising_tick_is_logged_and_the_next_one_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    backend = TickingBackend(clock=clock, raise_on_tick=True)
    agent = synced_agent(backend, clock, period=10.0)
    agent.tick()
    clock.advance(10.0)
    agent.tick()
    clock.advance(10.0)
    agent.tick()
    assert len(backend.ticks) == 2
    assert "backend tick raised" in caplog.text


class SlowSyncTickingBackend(TickingBackend):
    """Records whether tick() ever ran while a sync was in progress."""

    def __init__(self) -> None:
        super().__init__(clock=FakeClock())
        self.in_sync = False
        self.overlap = False

    def sync(self, plan, changed):  # type: ignore[no-untyped-def]
        self.in_sync = True
        time.sleep(0.05)
        self.in_sync = False
        return super().sync(plan, changed)

    def tick(self) -> None:
        self.overlap |= self.in_sync
        super().tick()


def test_the_tick_thread_runs_ticks_and_never_during_a_sync() -> None:
    backend = SlowSyncTickingBackend()
    agent = Agent(AgentOptions(node_name=NODE, min_sync_period=0.0, tick_period=0.01), backend)
    agent.handle(up(node()))
    for kind in KINDS:
        agent.source_synced(kind)
    agent.start()
    try:
        for i in range(5):
            agent.handle(up(service(ip=f"10.96.0.{10 + i}")))
            time.sleep(0.06)
        deadline = time.monotonic() + 5
        while len(backend.ticks) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        assert agent.stop(timeout=5.0)
    assert len(backend.ticks) >= 5
    assert not backend.overlap
    assert not [t for t in threading.enumerate() if t.name == "backend-tick"]
