"""The agent: ClusterState + the current NodePlan + a backend, driven by a
bounded-frequency runner.

Events from any source (the API reflectors' threads, files, tests) go to
``handle(event)``: the state takes them and reports the changed service
ports, which are accumulated until the next sync. The runner's thread calls
``sync()``, which recomputes the plan for those ports only (or all of them
for a full sync) and hands it to ``backend.sync``.

Which syncs are full (``changed=None``):

* the first one (nothing is known about the kernel's rules yet);
* the one after any failed sync: the accumulated changes were consumed by
  the failed attempt, so only a full rewrite is known to be right
  (upstream's ``needFullSync``);
* after this node's zone label changed: every topology decision may flip;
* when ``full_sync_period`` (1 h, upstream's ``FullSyncPeriod``) has passed
  since the last full sync, which the periodic timer guarantees happens;
* when someone calls ``request_full_sync()`` (e.g. a backend that noticed its
  rules were flushed by another program).

Everything else is partial. ``--sync-period`` is, as upstream since
partial syncs exist, the retry interval after a failure and the base of the
health timeout (2 x sync period), not a full-resync period.

No sync runs before the source has delivered its first complete list of
every resource: a restarting agent that synced an empty state would wipe a
working node's rules.

Thread-safety: one lock guards the state, the pending changes and the plan.
``sync()`` holds it only while it snapshots the changes and computes the
plan; the slow kernel write runs without it, so watcher threads never wait
for iptables-restore. The runner guarantees a single ``sync()`` at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from agent.backends.base import Backend, SyncKind, SyncResult
from agent.conntrack_apply import ConntrackCleaner
from agent.health import ProxyHealth
from agent.healthcheck import ServiceHealthServers
from agent.logfmt import kv
from agent.metrics import FAMILY_NAMES, Metrics
from agent.model import ServicePortName
from agent.parse import SERVICE_NAME_LABEL, Problem
from agent.plan import (
    EntryChanges,
    NodePlan,
    ServicePortPlan,
    build_plan,
    entry_changes,
    update_plan,
)
from agent.runner import BoundedFrequencyRunner
from agent.sources.events import KINDS, ObjectEvent
from agent.state import ClusterState, Skipped

log = logging.getLogger(__name__)

# Upstream's proxyutil.FullSyncPeriod.
FULL_SYNC_PERIOD = 3600.0
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass(frozen=True)
class AgentOptions:
    node_name: str
    proxy_name: str = ""
    prefer_same_node: bool = True
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    full_sync_period: float = FULL_SYNC_PERIOD
    # How often the backend's optional tick() runs (IPVS: finish graceful
    # terminations between syncs; upstream checks every minute).
    tick_period: float = 60.0
    # Kinds whose first full list must arrive before the first sync.
    wait_for: frozenset[str] = frozenset(KINDS)


@dataclass(frozen=True)
class SyncReport:
    """One sync attempt, for the log line, tests and the dry-run printer."""

    kind: SyncKind
    ok: bool
    service_ports_changed: int
    rules_written: int
    duration: float
    error: str = ""
    fell_back: bool = False
    plan: NodePlan | None = field(default=None, compare=False, repr=False)


def _parse_trigger_time(text: str) -> float | None:
    """RFC 3339 (``2024-05-01T12:00:00Z``) -> epoch seconds, None if unusable."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _families_of(plan: NodePlan | None) -> set[str]:
    if plan is None:
        return set()
    return {FAMILY_NAMES.get(k[1], f"IPv{k[1]}") for k in plan.entries}


class Agent:
    """Owns the state, the plan, the backend and the sync runner."""

    def __init__(
        self,
        options: AgentOptions,
        backend: Backend,
        *,
        metrics: Metrics | None = None,
        health: ProxyHealth | None = None,
        service_health: ServiceHealthServers | None = None,
        conntrack: ConntrackCleaner | None = None,
        on_sync: Callable[[SyncReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.backend = backend
        self.metrics = metrics
        self.health = health
        self.service_health = service_health
        # Stale UDP conntrack cleanup after each successful sync; None (dry
        # run, tests with fake backends) skips it.
        self.conntrack = conntrack
        self._on_sync = on_sync
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self.state = ClusterState(
            options.node_name, proxy_name=options.proxy_name, on_problem=self._problem
        )
        self._plan: NodePlan | None = None
        self._synced_kinds: set[str] = set()
        self._pending: set[ServicePortName] = set()
        self._pending_services: set[tuple[str, str]] = set()
        self._pending_endpoints: set[tuple[str, str]] = set()
        self._trigger_times: list[tuple[float, str]] = []  # (epoch, ip family)
        self._need_full = True
        self._last_full: float | None = None
        self._skipped_seen: set[Skipped] = set()
        # Derived from the synced plan, kept up to date from each sync's
        # changed entries (plan.entry_changes): scanning every entry per
        # event or per sync cost milliseconds at 10k services.
        self._families: frozenset[str] = frozenset()
        self._no_local: dict[tuple[str, str], int] | None = None
        self._started_wall = wall_clock()
        self.runner = BoundedFrequencyRunner(
            self.sync,
            min_interval=options.min_sync_period,
            retry_interval=options.sync_period,
            max_interval=max(options.full_sync_period, options.min_sync_period),
            clock=clock,
        )
        self._thread: threading.Thread | None = None
        # backend.sync and backend.tick run on different threads; backends
        # are not thread-safe, so one lock serializes them.
        self._backend_lock = threading.Lock()
        self._next_tick: float | None = None
        self._tick_stop = threading.Event()
        self._tick_thread: threading.Thread | None = None
        self.reports: list[SyncReport] = []  # the last few, newest last
        self.max_reports = 50

    # ------------------------------------------------------------ inputs

    def handle(self, event: ObjectEvent) -> None:
        """Take one event from any source; safe to call from any thread."""
        with self._lock:
            zone_before = self.state.node.zone
            changed = self.state.apply(event)
            zone_changed = self.state.node.zone != zone_before
            if (
                event.kind == "Node"
                and event.name == self.options.node_name
                and self.health is not None
            ):
                self.health.set_node(None if event.action == "delete" else event.obj)
            if zone_changed:
                log.info("node_zone_changed %s", kv(zone=self.state.node.zone, next_sync="full"))
                self._need_full = True
            if not changed and not zone_changed:
                return
            self._pending |= changed
            self._note_change(event)
            synced = self._all_synced()
            families = self._families or {"IPv4"}
        if self.health is not None:
            self.health.queued_update()
        if self.metrics is not None:
            self.metrics.record_queued(families, self._wall())
        if synced:
            self.runner.run()

    def _note_change(self, event: ObjectEvent) -> None:
        """Change counters and network-programming trigger times (lock held)."""
        raw_meta = event.obj.get("metadata") if isinstance(event.obj, Mapping) else None
        meta: Mapping[str, object] = raw_meta if isinstance(raw_meta, Mapping) else {}
        if event.kind == "Service":
            self._pending_services.add((event.namespace, event.name))
            if self.metrics is not None:
                self.metrics.service_changes_total.inc()
        elif event.kind == "EndpointSlice":
            labels = meta.get("labels")
            service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
            self._pending_endpoints.add((event.namespace, str(service or event.name)))
            if self.metrics is not None:
                self.metrics.endpoint_changes_total.inc()
            annotations = meta.get("annotations")
            trigger = (
                annotations.get(TRIGGER_TIME_ANNOTATION)
                if isinstance(annotations, Mapping)
                else None
            )
            # Upstream ignores deletions (their trigger time is the previous
            # update's) and changes older than the agent (the initial list
            # would report the age of every slice as latency).
            if event.action == "upsert" and isinstance(trigger, str):
                at = _parse_trigger_time(trigger)
                if at is not None and at > self._started_wall:
                    family = "IPv6" if event.obj.get("addressType") == "IPv6" else "IPv4"
                    self._trigger_times.append((at, family))
        if self.metrics is not None:
            self.metrics.set_pending(
                services=len(self._pending_services), endpoints=len(self._pending_endpoints)
            )

    def source_synced(self, kind: str) -> None:
        """A source delivered its first complete list of ``kind``."""
        with self._lock:
            self._synced_kinds.add(kind)
            ready = self._all_synced()
        if ready:
            log.info("source_synced %s", kv(kinds=",".join(sorted(self._synced_kinds))))
            self.runner.run()

    def request_full_sync(self) -> None:
        """Make the next sync full, and soon."""
        with self._lock:
            self._need_full = True
            ready = self._all_synced()
        if ready:
            self.runner.run()

    def _all_synced(self) -> bool:
        return self.options.wait_for <= self._synced_kinds

    def _problem(self, problem: Problem) -> None:
        # Called by the state with the lock held: log and count only.
        obj = f"{problem.namespace}/{problem.name}" if problem.namespace else problem.name
        log.warning(
            "invalid_object %s",
            kv(
                kind=problem.kind,
                object=obj,
                field=problem.field,
                reason=problem.reason,
                message=problem.message,
                origin=problem.origin or None,
            ),
        )
        if self.metrics is not None:
            self.metrics.invalid_objects.labels(problem.kind, problem.reason).inc()

    # ------------------------------------------------------------ queries

    @property
    def plan(self) -> NodePlan | None:
        """The plan of the last successful sync."""
        with self._lock:
            return self._plan

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._all_synced()

    def current_plan(self) -> NodePlan:
        """A full plan from the current state (for comparisons, not for syncing)."""
        with self._lock:
            return build_plan(self.state, prefer_same_node=self.options.prefer_same_node)

    # ------------------------------------------------------------ the sync

    def sync(self) -> bool:
        """One sync; the runner's function. True when the kernel matches the plan."""
        start = self._clock()
        with self._lock:
            if not self._all_synced():
                return True  # nothing may be written before every list arrived
            full = (
                self._need_full
                or self._plan is None
                or self._last_full is None
                or start - self._last_full >= self.options.full_sync_period
            )
            changed = self._pending
            self._pending = set()
            pending_services, pending_endpoints = self._pending_services, self._pending_endpoints
            self._pending_services, self._pending_endpoints = set(), set()
            triggers, self._trigger_times = self._trigger_times, []
            old_plan = self._plan
            if full or self._plan is None:
                plan = build_plan(self.state, prefer_same_node=self.options.prefer_same_node)
            else:
                plan = update_plan(
                    self._plan,
                    self.state,
                    changed,
                    prefer_same_node=self.options.prefer_same_node,
                )
            skipped_new = [s for s in plan.skipped if s not in self._skipped_seen]
            self._skipped_seen = set(plan.skipped)
        if self.metrics is not None:
            self.metrics.set_pending(services=0, endpoints=0)
        for skipped in skipped_new:
            log.warning("object_skipped %s", kv(object=skipped.object, reason=skipped.reason))

        kind: SyncKind = "full" if full else "partial"
        try:
            with self._backend_lock:
                result = self.backend.sync(plan, None if full else frozenset(changed))
        except Exception as exc:  # a backend bug must not stop the loop
            log.exception("backend sync raised")
            result = SyncResult(kind=kind, ok=False, error=f"{type(exc).__name__}: {exc}")
        if result.ok and self.conntrack is not None:
            self._clean_conntrack(old_plan, plan)
        duration = self._clock() - start
        changes = entry_changes(old_plan, plan) if result.ok else None
        self._after_sync(
            plan, changes, result, full, changed, pending_services, pending_endpoints, triggers
        )
        report = SyncReport(
            kind=result.kind,
            ok=result.ok,
            service_ports_changed=len(changed) if changed else result.service_ports_changed,
            rules_written=result.rules_written,
            duration=duration,
            error=result.error,
            fell_back=result.fell_back,
            plan=plan,
        )
        self._record(report, result, plan, triggers)
        return result.ok

    def _clean_conntrack(self, old: NodePlan | None, new: NodePlan) -> None:
        """Delete stale UDP flows, once the new rules are in place (as
        upstream's syncProxyRules ends with conntrack.CleanStaleEntries).

        ``old`` is the plan of the previous successful sync (None on the
        first: every UDP service port is then checked, which also repairs
        flows left from before a restart). Full and partial syncs alike.
        Never fails the sync: the rules are right, only some clients lag.
        """
        assert self.conntrack is not None
        try:
            self.conntrack.cleanup_plans(old, new)
        except Exception:  # a cleanup bug must not stop the loop
            log.exception("conntrack cleanup raised")

    def _after_sync(
        self,
        plan: NodePlan,
        changes: EntryChanges | None,
        result: SyncResult,
        full: bool,
        changed: set[ServicePortName],
        pending_services: set[tuple[str, str]],
        pending_endpoints: set[tuple[str, str]],
        triggers: list[tuple[float, str]],
    ) -> None:
        with self._lock:
            if result.ok:
                self._plan = plan
                self._update_derived(plan, changes)
                if full or result.kind == "full":
                    self._last_full = self._clock()
                    self._need_full = False
                still_pending = bool(self._pending)
            else:
                # The changes were consumed by the failed attempt: the next
                # sync must be full. Keep them pending for the metrics and
                # the network-programming latency of the retry.
                self._need_full = True
                self._pending |= changed
                self._pending_services |= pending_services
                self._pending_endpoints |= pending_endpoints
                self._trigger_times = triggers + self._trigger_times
                still_pending = True
            n_services, n_endpoints = len(self._pending_services), len(self._pending_endpoints)
        if self.metrics is not None:
            self.metrics.set_pending(services=n_services, endpoints=n_endpoints)
        if result.ok and self.health is not None:
            self.health.updated()
            if still_pending:
                # Changes that arrived during this sync are still unsynced.
                self.health.queued_update()

    def _update_derived(self, plan: NodePlan, changes: EntryChanges | None) -> None:
        """Families and no-local-endpoint counts of the newly synced plan:
        from its changed entries when known, else from every entry."""
        if changes is None or self._no_local is None:
            self._families = frozenset(_families_of(plan))
            self._no_local = no_local_endpoints(plan)
            return
        # A family only joins here (a counter at zero stays, as a proxier of
        # that family would keep reporting it); a full sync recounts.
        added = {FAMILY_NAMES.get(e.family, f"IPv{e.family}") for e in changes.after}
        for name in added - self._families:
            for policy in ("internal", "external"):
                self._no_local.setdefault((name, policy), 0)
        self._families |= added
        for entry in changes.before:
            for key in _no_local_keys(entry):
                self._no_local[key] -= 1
        for entry in changes.after:
            for key in _no_local_keys(entry):
                self._no_local[key] = self._no_local.get(key, 0) + 1

    def _record(
        self,
        report: SyncReport,
        result: SyncResult,
        plan: NodePlan,
        triggers: list[tuple[float, str]],
    ) -> None:
        level = logging.INFO if report.ok else logging.WARNING
        log.log(
            level,
            "sync %s",
            kv(
                kind=report.kind,
                ok=report.ok,
                service_ports_changed=report.service_ports_changed,
                rules_written=report.rules_written,
                duration=f"{report.duration:.3f}s",
                fell_back=report.fell_back or None,
                error=report.error or None,
            ),
        )
        if self.metrics is not None:
            families = {fam for _, fam in result.rule_counts} | self._families
            wall_now = self._wall()
            self.metrics.record_sync(result, report.duration, families, wall_now)
            if result.ok:
                for at, fam in triggers:
                    self.metrics.network_programming.labels(fam).observe(max(0.0, wall_now - at))
                self.metrics.record_no_local_endpoints(dict(self._no_local or {}))
        if result.ok and self.service_health is not None:
            self.service_health.sync(plan)
        self.reports.append(report)
        del self.reports[: -self.max_reports]
        if self._on_sync is not None:
            self._on_sync(report)

    # ------------------------------------------------------------ lifecycle

    def tick(self) -> float:
        """Call the backend's optional ``tick()`` once ``tick_period`` has
        passed (counted from the first call); return the seconds until the
        next one is due. Nothing happens before the first successful sync.
        """
        fn = getattr(self.backend, "tick", None)
        period = self.options.tick_period
        if fn is None:
            return period
        now = self._clock()
        if self._next_tick is None:
            self._next_tick = now + period
        if now < self._next_tick:
            return max(0.0, self._next_tick - now)
        if self.plan is not None:
            with self._backend_lock:
                try:
                    fn()
                except Exception:  # a backend bug must not stop the ticks
                    log.exception("backend tick raised")
        self._next_tick = self._clock() + period
        return period

    def _tick_loop(self) -> None:
        while not self._tick_stop.wait(self.tick()):
            pass

    def start(self) -> None:
        """Run the sync loop in a thread (syncs begin once the source is synced)."""
        if self._tick_thread is None and getattr(self.backend, "tick", None) is not None:
            self._tick_thread = threading.Thread(
                target=self._tick_loop, name="backend-tick", daemon=True
            )
            self._tick_thread.start()
        if self._thread is None:
            if self.health is not None:
                # Nothing is programmed yet: the start is an update waiting
                # to be synced, so an agent that cannot list (API server
                # unreachable) turns unhealthy after the health timeout.
                # Upstream stays healthy until its first sync (health.py).
                self.health.started()
            self._thread = self.runner.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the loop; wait up to ``timeout`` for a sync in progress.

        Returns False when the sync was abandoned (still running): that is
        safe, the kernel applies a restore atomically, and the rules stay in
        place either way, as kube-proxy leaves them on exit.
        """
        self.runner.stop()
        self._tick_stop.set()
        if self._tick_thread is not None:
            self._tick_thread.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


def no_local_endpoints(plan: NodePlan) -> dict[tuple[str, str], int]:
    """kubeproxy_sync_proxy_rules_no_local_endpoints_total, as upstream counts it.

    A service port with endpoints somewhere, a Local policy and no local
    endpoint: its internal (ClusterIP) or external traffic is dropped here.
    """
    counts: dict[tuple[str, str], int] = {}
    for fam in {k[1] for k in plan.entries} or {4}:
        name = FAMILY_NAMES.get(fam, f"IPv{fam}")
        counts[(name, "internal")] = 0
        counts[(name, "external")] = 0
    for entry in plan.entries.values():
        for key in _no_local_keys(entry):
            counts[key] = counts.get(key, 0) + 1
    return counts


def _no_local_keys(entry: ServicePortPlan) -> list[tuple[str, str]]:
    """The (family, traffic policy) counters one plan entry adds to."""
    decision = entry.decision
    if not decision.has_any_endpoints or decision.local:
        return []  # REJECTed as "no endpoints", or has a local endpoint
    name = FAMILY_NAMES.get(entry.family, f"IPv{entry.family}")
    keys = []
    if entry.service.internal_policy_local:
        keys.append((name, "internal"))
    if entry.service.external_policy_local:
        keys.append((name, "external"))
    return keys
