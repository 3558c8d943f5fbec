"""Prometheus metrics with kube-proxy's names, so existing dashboards and
alerts keep working when sliceproxy replaces kube-proxy.

Names, types, labels and buckets follow upstream pkg/proxy/metrics/metrics.go
(v1.33+, where most sync metrics carry an ``ip_family`` label). One
sliceproxy sync programs both families at once, so a sync's duration and
timestamps are recorded under every family that sync covered.

Everything lives in a private ``CollectorRegistry``: tests can build as many
``Metrics`` as they like, and nothing else in the process (the kubernetes
client, libraries) leaks series onto /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from agent.backends.base import SyncResult
from agent.httpserver import QuietHandler, ServerThread

log = logging.getLogger(__name__)

PREFIX = "kubeproxy_"
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


def exponential_buckets(start: float, factor: float, count: int) -> tuple[float, ...]:
    """prometheus.ExponentialBuckets: start, start*factor, ... (count values)."""
    return tuple(start * factor**i for i in range(count))


def linear_buckets(start: float, width: float, count: int) -> tuple[float, ...]:
    return tuple(start + width * i for i in range(count))


# Sync durations: 1 ms .. ~16 s (ExponentialBuckets(0.001, 2, 15)).
SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)
# Network programming latency is measured from the EndpointSlice
# controller's trigger time, so it spans seconds to minutes: upstream merges
# linear ranges (0.25 s steps, then 1 s to 59 s, 5 s to 115 s, 30 s to 5 min).
NETWORK_PROGRAMMING_BUCKETS = (
    linear_buckets(0.25, 0.25, 2)
    + linear_buckets(1, 1, 59)
    + linear_buckets(60, 5, 12)
    + linear_buckets(120, 30, 7)
)


def written_counts(result: SyncResult) -> Mapping[tuple[str, str], int]:
    """Rules written per (table, family) by a successful sync, for ``_last``.

    The backend's own ``written_counts`` when it reports them. Otherwise: a
    full sync rewrote everything it owns, so what is in place
    (``rule_counts``) is what was written; a partial sync that wrote nothing
    wrote zero to every table. A partial sync that wrote rules without a
    per-table breakdown leaves the gauges alone: a guess would be a wrong
    number on a dashboard, an unchanged one is merely stale.
    """
    if result.written_counts:
        return result.written_counts
    if result.kind == "full":
        return result.rule_counts
    if result.rules_written == 0:
        return dict.fromkeys(result.rule_counts, 0)
    return {}


class Metrics:
    """Every series sliceproxy exports, and the recording helpers the agent uses."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # Like any Go binary's /metrics: process_*, python_info, python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...] = SYNC_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, ["ip_family"], buckets=buckets, registry=r)

        self.sync_duration = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"
        )
        self.sync_full_duration = hist(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
        )
        self.sync_partial_duration = hist(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
        )
        self.network_programming = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        self.last_timestamp = Gauge(
            PREFIX + "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            ["ip_family"],
            registry=r,
        )
        self.last_queued_timestamp = Gauge(
            PREFIX + "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            ["ip_family"],
            registry=r,
        )
        # Counter names are given without _total: prometheus_client appends it.
        self.endpoint_changes_pending = Gauge(
            PREFIX + "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            registry=r,
        )
        self.endpoint_changes_total = Counter(
            PREFIX + "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            registry=r,
        )
        self.service_changes_pending = Gauge(
            PREFIX + "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            registry=r,
        )
        self.service_changes_total = Counter(
            PREFIX + "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            registry=r,
        )
        self.rules_total = Gauge(
            PREFIX + "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ["table", "ip_family"],
            registry=r,
        )
        self.rules_last = Gauge(
            PREFIX + "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ["table", "ip_family"],
            registry=r,
        )
        self.restore_failures = Counter(
            PREFIX + "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            ["ip_family"],
            registry=r,
        )
        self.partial_restore_failures = Counter(
            PREFIX + "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            ["ip_family"],
            registry=r,
        )
        # A gauge despite the _total name: upstream sets it to the current
        # count after each sync.
        self.no_local_endpoints = Gauge(
            PREFIX + "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["ip_family", "traffic_policy"],
            registry=r,
        )
        self.healthz_total = Counter(
            PREFIX + "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            ["code"],
            registry=r,
        )
        self.livez_total = Counter(
            PREFIX + "proxy_livez",
            "Cumulative proxy livez HTTP status",
            ["code"],
            registry=r,
        )
        # sliceproxy's own: what kube-proxy silently drops, we count.
        self.invalid_objects = Counter(
            "sliceproxy_invalid_objects",
            "API objects (or parts of them) skipped as invalid, by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        # Stale UDP conntrack cleanup (agent/conntrack_apply.py): upstream's
        # names (pkg/proxy/metrics, ReconcileConntrackFlowsLatency and
        # ReconcileConntrackFlowsDeletedEntriesTotal, v1.33).
        self.conntrack_reconcile_duration = hist(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
        )
        self.conntrack_deleted = Counter(
            PREFIX + "conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            ["ip_family"],
            registry=r,
        )
        # Ours: cleanups that could not run (no conntrack binary) or failed.
        self.conntrack_cleanup_errors = Counter(
            "sliceproxy_conntrack_cleanup_errors",
            "Stale UDP conntrack cleanups that could not run or failed, by reason",
            ["reason"],
            registry=r,
        )
        self.healthcheck_listen_failures = Counter(
            "sliceproxy_healthcheck_node_port_listen_failures",
            "healthCheckNodePort servers that could not be opened (e.g. port in use)",
            registry=r,
        )

    # ------------------------------------------------------------ recording

    def record_sync(
        self,
        result: SyncResult,
        duration: float,
        families: Iterable[str],
        wall_now: float,
    ) -> None:
        """One finished sync (successful or not)."""
        fams = sorted(set(families)) or ["IPv4"]
        by_kind = self.sync_full_duration if result.kind == "full" else self.sync_partial_duration
        for fam in fams:
            self.sync_duration.labels(fam).observe(duration)
            by_kind.labels(fam).observe(duration)
            # Upstream counts a failed partial restore in both counters; a
            # backend that fell back to full within the same call had one.
            if result.fell_back:
                self.restore_failures.labels(fam).inc()
                self.partial_restore_failures.labels(fam).inc()
            if not result.ok:
                self.restore_failures.labels(fam).inc()
                if result.kind == "partial" and not result.fell_back:
                    self.partial_restore_failures.labels(fam).inc()
            else:
                self.last_timestamp.labels(fam).set(wall_now)
        if result.ok:
            self._record_rule_counts(result)

    def _record_rule_counts(self, result: SyncResult) -> None:
        for (table, fam), n in result.rule_counts.items():
            self.rules_total.labels(table, fam).set(n)
        for (table, fam), n in written_counts(result).items():
            self.rules_last.labels(table, fam).set(n)

    def record_queued(self, families: Iterable[str], wall_now: float) -> None:
        for fam in set(families) or {"IPv4"}:
            self.last_queued_timestamp.labels(fam).set(wall_now)

    def set_pending(self, *, services: int, endpoints: int) -> None:
        self.service_changes_pending.set(services)
        self.endpoint_changes_pending.set(endpoints)

    def record_no_local_endpoints(self, counts: Mapping[tuple[str, str], int]) -> None:
        """counts[(ip_family, "internal"|"external")] after a successful sync."""
        for (fam, policy), n in counts.items():
            self.no_local_endpoints.labels(fam, policy).set(n)

    def record_probe(self, path: str, code: int) -> None:
        counter = self.livez_total if path == "/livez" else self.healthz_total
        counter.labels(str(code)).inc()

    # ------------------------------------------------------------ serving

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> ServerThread:
        """Serve /metrics on host:port from a daemon thread (port 0: any free port)."""
        return ServerThread(host, port, _handler_for(self), "metrics-http")


def _handler_for(metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            self.reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)

    return Handler
