"""The proxy's own health: ``/healthz`` and ``/livez`` with kube-proxy's
semantics (pkg/proxy/healthcheck/proxy_health.go).

* The proxy is *unhealthy* when an update has been queued (a Service or
  EndpointSlice change that needs new rules) and not synced for longer than
  the health timeout, which kube-proxy sets to 2 x ``--sync-period``.
* Starting up differs from upstream on purpose. kube-proxy is healthy until
  its first sync however long that takes, so one that cannot reach the API
  server reports healthy forever while it has programmed nothing. The agent
  calls ``started()`` instead, which counts the start itself as a queued
  update: the proxy is healthy for one health timeout (time to list a large
  cluster), then unhealthy until the first successful sync. Without
  ``started()``, updates queued before the first sync are ignored, which is
  upstream's behaviour.
* ``/healthz`` also fails when this node is not *eligible*: its Node has a
  deletion timestamp or the cluster autoscaler's ``ToBeDeletedByClusterAutoscaler``
  taint (or the Node is gone). Cloud load balancers probe /healthz to pick
  nodes, so a draining node leaves their pools before it disappears.
* ``/livez`` ignores node eligibility: it is for the kubelet's liveness
  probe, and restarting the proxy of a draining node would only hurt.

Bodies are what kube-proxy writes, including its time format, so tools that
parse them keep working; ``lastUpdated`` equals ``currentTime`` while healthy
(upstream keeps that for compatibility with older releases).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from agent.httpserver import QuietHandler, ServerThread

log = logging.getLogger(__name__)

TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

WallClock = Callable[[], float]
# time.Time{}.String(): what kube-proxy shows as lastUpdated before any sync.
GO_ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"


def go_time(ts: float) -> str:
    """A wall time as Go's time.Time.String() prints it (UTC, trailing zeros cut)."""
    dt = datetime.fromtimestamp(ts, UTC)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


def node_eligible(node: Mapping[str, Any] | None) -> bool:
    """Eligible = exists, not being deleted, not tainted for deletion."""
    if node is None:
        return False
    meta = node.get("metadata")
    if isinstance(meta, Mapping) and meta.get("deletionTimestamp"):
        return False
    spec = node.get("spec")
    taints = spec.get("taints") if isinstance(spec, Mapping) else None
    if isinstance(taints, list):
        for taint in taints:
            if isinstance(taint, Mapping) and taint.get("key") == TO_BE_DELETED_TAINT:
                return False
    return True


class ProxyHealth:
    """Queued/updated bookkeeping; thread-safe, clock injected."""

    def __init__(self, timeout: float, clock: WallClock = time.time) -> None:
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._last_updated: float | None = None
        self._oldest_queued: float | None = None
        # Whether the start itself is pending (see started()).
        self._start_queued = False
        # Eligible while starting, until a Node event says otherwise (upstream).
        self._node_eligible = True

    def queued_update(self, at: float | None = None) -> None:
        """A change needs syncing; only the oldest unsynced one matters."""
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = self._clock() if at is None else at

    def started(self, at: float | None = None) -> None:
        """The proxy started: every rule is still to be written.

        A queued update that, unlike the others, counts before the first
        successful sync, so that a proxy which never manages to list (API
        server unreachable) turns unhealthy after the timeout instead of
        looking healthy with nothing programmed.
        """
        with self._lock:
            now = self._clock() if at is None else at
            if self._oldest_queued is None or now < self._oldest_queued:
                self._oldest_queued = now
            self._start_queued = True

    def updated(self) -> None:
        """A sync succeeded: everything queued so far is in the kernel."""
        with self._lock:
            self._oldest_queued = None
            self._start_queued = False
            self._last_updated = self._clock()

    def set_node(self, node: Mapping[str, Any] | None) -> None:
        """This node's raw object (None once it is deleted)."""
        eligible = node_eligible(node)
        with self._lock:
            self._node_eligible = eligible

    @property
    def node_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def status(self) -> tuple[bool, float | None, float]:
        """(healthy ignoring the node, last updated, now)."""
        with self._lock:
            now = self._clock()
            if self._oldest_queued is None:
                return True, self._last_updated, now  # nothing pending
            if self._last_updated is None and not self._start_queued:
                # Upstream: healthy while starting, however long it takes.
                return True, self._last_updated, now
            healthy = now - self._oldest_queued < self.timeout
            return healthy, self._last_updated, now

    def is_healthy(self) -> bool:
        return self.status()[0]

    # ------------------------------------------------------------ HTTP

    def respond(self, path: str) -> tuple[int, str]:
        """(status code, JSON body) for /healthz or /livez."""
        healthy, last, now = self.status()
        eligible = self.node_eligible
        if path == "/healthz":
            healthy = healthy and eligible
        # Upstream: a healthy proxy reports lastUpdated = now; one that never
        # synced reports Go's zero time.
        if healthy:
            shown = go_time(now)
        elif last is None:
            shown = GO_ZERO_TIME
        else:
            shown = go_time(last)
        if path == "/healthz":
            body = (
                f'{{"lastUpdated": "{shown}","currentTime": "{go_time(now)}", '
                f'"nodeEligible": {str(eligible).lower()}}}'
            )
        else:
            body = f'{{"lastUpdated": "{shown}","currentTime": "{go_time(now)}"}}'
        return (200 if healthy else 503), body


def _handler_for(
    health: ProxyHealth, on_probe: Callable[[str, int], None] | None
) -> type[BaseHTTPRequestHandler]:
    # Probes arrive every few seconds: not logged (QuietHandler), counted
    # in metrics through on_probe.
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in ("/healthz", "/livez"):
                self.send_error(404)
                return
            code, body = health.respond(path)
            self.reply(code, body.encode())
            if on_probe is not None:
                on_probe(path, code)

    return Handler


def serve_health(
    health: ProxyHealth,
    host: str,
    port: int,
    on_probe: Callable[[str, int], None] | None = None,
) -> ServerThread:
    """/healthz and /livez on host:port from a daemon thread."""
    return ServerThread(host, port, _handler_for(health, on_probe), "healthz-http")
