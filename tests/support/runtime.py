"""Running the agent for runtime tests: fast reflector timings, polling, and
`sliceproxy run`'s ``serve()`` in a thread against a fake API server."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from agent.backends.base import Backend
from agent.serve import Deps, Running, RunSettings, Source, serve
from agent.sources.events import ObjectEvent
from agent.sources.kube import KubeSource, ReflectorOptions, make_api_client

# Reflector timings shrunk so that reconnects and relists take milliseconds.
FAST = ReflectorOptions(
    watch_timeout=30.0,
    read_timeout=5.0,
    connect_timeout=1.0,
    list_timeout=5.0,
    backoff_initial=0.02,
    backoff_max=0.2,
    healthy_stream_seconds=1.0,
)


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll a condition other threads make true; one last check at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@dataclass
class Served:
    """A ``serve()`` running in a thread, and what it started."""

    running: Running
    sources: list[KubeSource] = field(default_factory=list)

    @property
    def source(self) -> KubeSource:
        return self.sources[0]


@contextmanager
def serving(
    settings: RunSettings, backend: Backend, *, seed: int = 0, timeout: float = 10.0
) -> Iterator[Served]:
    """Run ``serve(settings)`` with ``backend`` and FAST reflectors until the block ends.

    The source is built like ``run``'s own (``make_api_client(master=...)``)
    but with an empty service-account directory, so a machine that happens
    to have one mounted cannot change what the test sends.
    """
    sources: list[KubeSource] = []
    started = threading.Event()
    holder: list[Running] = []
    result: list[int] = []
    errors: list[BaseException] = []

    def source(
        s: RunSettings, sink: Callable[[ObjectEvent], None], on_synced: Callable[[str], None]
    ) -> Source:
        api = make_api_client(master=s.master, service_account_dir="/nonexistent/sliceproxy-sa")
        src = KubeSource(
            api,
            sink,
            node_name=s.node_name,
            options=FAST,
            on_synced=on_synced,
            rng=random.Random(seed),
        )
        sources.append(src)
        return src

    def on_started(running: Running) -> None:
        holder.append(running)
        started.set()

    def target() -> None:
        try:
            result.append(serve(settings, stop, deps))
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)
            started.set()

    stop = threading.Event()
    deps = Deps(source=source, backend=lambda _s: backend, on_started=on_started)
    thread = threading.Thread(target=target, name="serve", daemon=True)
    thread.start()
    try:
        assert started.wait(timeout), "serve() did not start"
        if errors:
            raise errors[0]
        yield Served(holder[0], sources)
    finally:
        stop.set()
        thread.join(15.0)
    assert not thread.is_alive(), "serve() did not stop"
    if errors:
        raise errors[0]
    assert result == [0]
