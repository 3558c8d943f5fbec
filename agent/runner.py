"""A bounded-frequency runner: kube-proxy's BoundedFrequencyRunner
(pkg/proxy/runner/bounded_frequency_runner.go), with the clock injected.

It calls one function (the sync) when asked to, but

* never sooner than ``min_interval`` after the previous call *finished*:
  requests arriving meanwhile are coalesced into one call (a burst of 500
  EndpointSlice updates becomes one sync, not 500);
* at least every ``max_interval`` even if nobody asks (the periodic resync);
* ``retry_interval`` after a failed call, unless another trigger comes first;
  a successful call cancels the pending retry.

The decision logic lives in ``tick()``, a pure function of the injected
clock and the runner's state, so tests drive it step by step without threads
or sleeping; ``loop()`` is only "tick, then wait until the next due time or
a ``run()`` request".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class BoundedFrequencyRunner:
    """Run ``fn`` (returns True on success) under the three bounds above."""

    def __init__(
        self,
        fn: Callable[[], bool],
        *,
        min_interval: float,
        retry_interval: float,
        max_interval: float,
        clock: Clock = time.monotonic,
        name: str = "sync",
    ) -> None:
        if min_interval < 0 or retry_interval <= 0 or max_interval <= 0:
            raise ValueError(f"{name}: intervals must be positive (min may be 0)")
        if max_interval < min_interval:
            # Upstream panics here too: a period shorter than the coalescing
            # window could never be honoured.
            raise ValueError(f"{name}: max_interval {max_interval} < min_interval {min_interval}")
        self.name = name
        self._fn = fn
        self._min = min_interval
        self._retry = retry_interval
        self._max = max_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._pending = False
        self._stopped = False
        self._running = False
        # Time the last call finished (None: never ran, no min-interval wait).
        self._last_end: float | None = None
        self._retry_at: float | None = None
        # The periodic timer starts when the runner is created, as upstream's
        # starts when Loop starts.
        self._max_at = clock() + max_interval
        self.runs = 0
        self.failures = 0

    # ------------------------------------------------------------ requests

    def run(self) -> None:
        """Ask for a call as soon as the bounds allow; never blocks.

        Many requests before the call starts make one call; a request that
        arrives *during* a call makes one more call after it.
        """
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Make ``loop()`` return after the call in progress, if any."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        with self._cond:
            return self._pending

    @property
    def running(self) -> bool:
        with self._cond:
            return self._running

    # ------------------------------------------------------------ schedule

    def next_due(self) -> float:
        """The clock time at which the next call may happen."""
        with self._cond:
            return self._next_due_locked()

    def _next_due_locked(self) -> float:
        trigger = self._max_at
        if self._retry_at is not None:
            trigger = min(trigger, self._retry_at)
        if self._pending:
            trigger = float("-inf")
        earliest = float("-inf") if self._last_end is None else self._last_end + self._min
        return max(trigger, earliest)

    def tick(self) -> float:
        """Call ``fn`` once if it is due now; return seconds until the next due time."""
        with self._cond:
            now = self._clock()
            if self._stopped or self._next_due_locked() > now:
                return max(0.0, self._next_due_locked() - now)
            # Cleared before the call, so a request during the call is kept.
            self._pending = False
            self._running = True
        ok = False
        try:
            ok = bool(self._fn())
        except Exception:
            # A crashing sync must not kill the loop (upstream: HandleCrash);
            # it counts as a failure and is retried.
            log.exception("%s: sync function raised", self.name)
        with self._cond:
            end = self._clock()
            self._running = False
            self.runs += 1
            self._last_end = end
            self._max_at = end + self._max
            if ok:
                self._retry_at = None
            else:
                self.failures += 1
                # Keep an earlier retry if one is already set: a failure loop
                # must not keep pushing its own retry into the future.
                retry = end + self._retry
                self._retry_at = retry if self._retry_at is None else min(self._retry_at, retry)
            return max(0.0, self._next_due_locked() - self._clock())

    # ------------------------------------------------------------ thread

    def loop(self) -> None:
        """Run until ``stop()``; meant to be a thread's target."""
        while True:
            self.tick()
            with self._cond:
                if self._stopped:
                    return
                # Re-check under the lock: a run() between tick() and here
                # must not be slept through.
                due = self._next_due_locked() - self._clock()
                if due > 0:
                    self._cond.wait(timeout=due)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.loop, name=f"runner-{self.name}", daemon=True)
        thread.start()
        return thread
