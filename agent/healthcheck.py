"""healthCheckNodePort servers (pkg/proxy/healthcheck/service_health.go).

A LoadBalancer Service with ``externalTrafficPolicy: Local`` gets a
``healthCheckNodePort``; the cloud load balancer probes it on every node and
sends traffic only to nodes answering 200, i.e. nodes with a local endpoint.
After each successful sync the agent hands the plan to ``sync(plan)``, which
opens servers for new services, closes servers of services that are gone (or
whose port changed), and updates the counts the handlers report.

The count is upstream's: local endpoints that are **ready**, counted once per
IP across all ports of the service. Terminating endpoints may still serve,
but the probe must fail on a node that only has terminating ones, so the
load balancer drains it during a rolling update.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from agent.httpserver import QuietHandler, ServerThread
from agent.logfmt import kv
from agent.plan import NodePlan

log = logging.getLogger(__name__)

ServiceKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class HealthCheckTarget:
    port: int
    local_endpoints: int


def targets_from_plan(plan: NodePlan) -> dict[ServiceKey, HealthCheckTarget]:
    """Every service with a healthCheckNodePort, and its local ready endpoint count."""
    ports: dict[ServiceKey, int] = {}
    ips: dict[ServiceKey, set[str]] = {}
    primary: dict[ServiceKey, int] = {}
    for entry in plan.entries.values():
        svc = entry.service
        if not svc.health_check_node_port:
            continue
        key = (svc.name.namespace, svc.name.name)
        ports[key] = svc.health_check_node_port
        # Upstream runs one proxier per family; count in the primary family
        # so a dual-stack pod is one endpoint, not two.
        fam = svc.families[0] if svc.families else entry.family
        primary[key] = fam
        if entry.family != fam:
            continue
        local = entry.decision.local or ()
        ips.setdefault(key, set()).update(e.ip for e in local if e.ready)
    return {k: HealthCheckTarget(p, len(ips.get(k, ()))) for k, p in ports.items()}


class ServiceHealthServers:
    """The set of open healthCheckNodePort servers, reconciled from plans."""

    def __init__(
        self,
        proxy_healthy: Callable[[], bool],
        addresses: Sequence[str] | Callable[[], Sequence[str]] = ("0.0.0.0",),
        on_listen_error: Callable[[ServiceKey, int, OSError], None] | None = None,
    ) -> None:
        self._proxy_healthy = proxy_healthy
        self._addresses = addresses
        self._on_listen_error = on_listen_error
        self._lock = threading.Lock()
        self._servers: dict[ServiceKey, tuple[int, list[ServerThread]]] = {}
        self._counts: dict[ServiceKey, int] = {}

    def _bind_addresses(self) -> Sequence[str]:
        addrs = self._addresses() if callable(self._addresses) else self._addresses
        return addrs or ("0.0.0.0",)

    def open_ports(self) -> dict[ServiceKey, list[int]]:
        """What is listening now: service -> the ports actually bound."""
        with self._lock:
            return {k: [s.port for s in servers] for k, (_, servers) in self._servers.items()}

    def sync(self, plan: NodePlan) -> None:
        self.sync_targets(targets_from_plan(plan))

    def sync_targets(self, targets: dict[ServiceKey, HealthCheckTarget]) -> None:
        with self._lock:
            self._counts = {k: t.local_endpoints for k, t in targets.items()}
            stale = [
                k
                for k, (port, _) in self._servers.items()
                if k not in targets or targets[k].port != port
            ]
            to_close = [self._servers.pop(k) for k in stale]
            missing = sorted(k for k in targets if k not in self._servers)
        for key, (port, servers) in zip(stale, to_close, strict=True):
            log.info("healthcheck_closed %s", kv(service=f"{key[0]}/{key[1]}", port=port))
            for server in servers:
                server.close()
        for key in missing:
            port = targets[key].port
            opened = self._listen(key, port)
            if opened is None:
                continue  # retried on the next sync, as upstream does
            log.info("healthcheck_opened %s", kv(service=f"{key[0]}/{key[1]}", port=port))
            with self._lock:
                self._servers[key] = (port, opened)

    def _listen(self, key: ServiceKey, port: int) -> list[ServerThread] | None:
        servers: list[ServerThread] = []
        for addr in self._bind_addresses():
            try:
                servers.append(
                    ServerThread(addr, port, self._handler(key), f"hc-{key[0]}/{key[1]}")
                )
            except OSError as err:
                # Another process holds the port: a warning and a metric, never
                # a crash; close what opened so a later retry starts clean.
                log.warning(
                    "healthcheck_listen_failed %s",
                    kv(service=f"{key[0]}/{key[1]}", address=addr, port=port, error=str(err)),
                )
                for s in servers:
                    s.close()
                if self._on_listen_error is not None:
                    self._on_listen_error(key, port, err)
                return None
        return servers

    def count(self, key: ServiceKey) -> int | None:
        with self._lock:
            return self._counts.get(key) if key in self._servers else None

    def close(self) -> None:
        with self._lock:
            servers = [s for _, group in self._servers.values() for s in group]
            self._servers.clear()
        for server in servers:
            server.close()

    def _handler(self, key: ServiceKey) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                count = owner.count(key)
                if count is None:
                    # Closing races a probe: say nothing useful, like upstream.
                    self.send_error(503)
                    return
                healthy = owner._proxy_healthy()
                body = json.dumps(
                    {
                        "service": {"namespace": key[0], "name": key[1]},
                        "localEndpoints": count,
                        "serviceProxyHealthy": healthy,
                    },
                    indent="\t",
                ).encode()
                self.reply(
                    200 if count > 0 and healthy else 503,
                    body,
                    headers={"X-Load-Balancing-Endpoint-Weight": str(count)},
                )

        return Handler
