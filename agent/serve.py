"""The running agent behind `sliceproxy run`: settings, the pluggable parts
(source, backend), and ``serve()``, which wires them and runs until stopped.

Wiring: the API source (three list/watch reflectors) calls ``agent.handle``
for every object event and ``agent.source_synced`` once per resource after
its first list; the agent feeds ClusterState, accumulates the changed
service ports, and its runner thread syncs the backend. /metrics, /healthz,
/livez and the healthCheckNodePort servers run beside it. Stopping leaves
the rules in place (as kube-proxy does: a restarting proxy must not
black-hole Service traffic).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from agent.agent import Agent, AgentOptions
from agent.backends.base import Backend
from agent.config import ConfigError
from agent.conntrack_apply import ConntrackCleaner
from agent.dryrun import DryRunBackend, PlanText
from agent.health import ProxyHealth, serve_health
from agent.healthcheck import ServiceHealthServers
from agent.httpserver import ServerThread
from agent.logfmt import kv
from agent.metrics import Metrics
from agent.nodeports import NodePortAddresses
from agent.sources.events import ObjectEvent

log = logging.getLogger("agent.run")


@dataclass(frozen=True)
class RunSettings:
    node_name: str
    proxy_mode: str = "iptables"
    kubeconfig: str | None = None
    master: str | None = None
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    nodeport_addresses: tuple[str, ...] = ()
    metrics_bind: tuple[str, int] | None = ("127.0.0.1", 10249)
    healthz_bind: tuple[str, int] | None = ("0.0.0.0", 10256)
    feature_gates: Mapping[str, bool] = field(default_factory=dict)
    proxy_name: str = ""
    verbosity: int = 0
    iptables_backend: str = "auto"
    masquerade_bit: int = 14
    ipvs_scheduler: str = "rr"
    # None: wait for a draining real server's connections however long.
    ipvs_max_drain: float | None = 900.0
    dry_run: bool = False
    conntrack_cleanup: bool = True


class Source(Protocol):
    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> bool: ...


SourceFactory = Callable[
    [RunSettings, Callable[[ObjectEvent], None], Callable[[str], None]], Source
]
BackendFactory = Callable[[RunSettings], Backend]


def kube_source(
    settings: RunSettings,
    sink: Callable[[ObjectEvent], None],
    on_synced: Callable[[str], None],
) -> Source:
    """The API server source; the only place `run` touches the reflector."""
    from agent.sources.kube import KubeSource, make_api_client

    try:
        api = make_api_client(kubeconfig=settings.kubeconfig, master=settings.master)
    except Exception as err:  # kubeconfig unreadable, not in a cluster, ...
        raise ConfigError(f"cannot configure the API client: {err}") from None
    return KubeSource(
        api,
        sink,
        node_name=settings.node_name,
        proxy_name=settings.proxy_name or None,
        on_synced=on_synced,
    )


def registry_backend(settings: RunSettings) -> Backend:
    """The backend for --proxy-mode, from agent.backends.registry.

    Expected there: ``create(mode: str, settings: RunSettings) -> Backend``.
    """
    try:
        registry = importlib.import_module("agent.backends.registry")
    except ModuleNotFoundError:
        raise ConfigError(
            f"--proxy-mode {settings.proxy_mode}: no backend registry in this build"
        ) from None
    try:
        backend: Backend = registry.create(settings.proxy_mode, settings)
    except (ValueError, OSError, ImportError) as err:
        raise ConfigError(f"--proxy-mode {settings.proxy_mode}: {err}") from None
    return backend


def dry_run_backend(settings: RunSettings, out: TextIO) -> DryRunBackend:
    try:
        renderer: Any = registry_backend(settings)
    except ConfigError as err:
        log.warning(
            "no_renderer %s",
            kv(reason=str(err), showing="the plan (sliceproxy explain) instead of rules"),
        )
        renderer = PlanText()
    return DryRunBackend(renderer, out)


@dataclass(frozen=True)
class Running:
    """What ``serve`` started, handed to ``Deps.on_started`` (tests use it to
    find the agent and the ports a ``:0`` bind address picked)."""

    agent: Agent
    health: ProxyHealth
    metrics: Metrics
    healthz_port: int | None
    metrics_port: int | None


@dataclass(frozen=True)
class Deps:
    source: SourceFactory = kube_source
    backend: BackendFactory | None = None
    out: TextIO | None = None
    on_started: Callable[[Running], None] | None = None
    # The stale-UDP-conntrack cleaner. None: the real one (``conntrack`` on
    # this host) with a registry backend, none with an injected backend, so
    # tests with fake backends never touch the host's conntrack table.
    conntrack: Callable[[Metrics], ConntrackCleaner | None] | None = None


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def nodeport_bind_addresses(
    nodeport_addresses: NodePortAddresses, node_addresses: Sequence[str]
) -> tuple[str, ...]:
    """The node's addresses that accept NodePorts, in the node's order
    (empty when none does). ``primary`` is the first address of *each*
    family (upstream server.go), so a node with two IPv4 addresses and an
    IPv6 one binds the first IPv4 and the IPv6 address."""
    chosen = {
        ip
        for fam in (4, 6)
        for ip in nodeport_addresses.select(node_addresses, node_addresses, fam)
    }
    return tuple(ip for ip in dict.fromkeys(node_addresses) if ip in chosen)


def _nodeport_bind_addresses(settings: RunSettings, agent: Agent) -> Callable[[], Sequence[str]]:
    """healthCheckNodePort bind addresses: the node's addresses inside
    --nodeport-addresses, or every address when that flag is unset (upstream)."""
    npa = NodePortAddresses.parse(settings.nodeport_addresses)

    def addresses() -> Sequence[str]:
        if not npa.is_set:
            return ("0.0.0.0",)
        chosen = nodeport_bind_addresses(npa, agent.state.node.addresses)
        if not chosen:
            log.warning(
                "healthcheck_bind %s",
                kv(reason="no node address matches --nodeport-addresses", using="0.0.0.0"),
            )
        return chosen or ("0.0.0.0",)

    return addresses


def _conntrack_cleaner(
    settings: RunSettings, deps: Deps, metrics: Metrics
) -> ConntrackCleaner | None:
    """Dry run changes nothing, so it deletes no flows either and prints
    nothing about them (the deletions depend on the live conntrack table,
    not on the rules being diffed)."""
    if settings.dry_run or not settings.conntrack_cleanup:
        return None
    if deps.conntrack is not None:
        return deps.conntrack(metrics)
    if deps.backend is not None:
        return None
    return ConntrackCleaner(metrics=metrics)


def serve(settings: RunSettings, stop: threading.Event, deps: Deps | None = None) -> int:
    """Run until ``stop`` is set; returns the exit status."""
    deps = deps or Deps()
    out = deps.out or sys.stdout
    if deps.backend is not None:
        backend: Backend = deps.backend(settings)
        if settings.dry_run:
            backend = DryRunBackend(backend, out)
    elif settings.dry_run:
        backend = dry_run_backend(settings, out)
    else:
        backend = registry_backend(settings)

    metrics = Metrics()
    health = ProxyHealth(timeout=2 * settings.sync_period)
    servers: list[ServerThread] = []
    service_health: ServiceHealthServers | None = None
    agent: Agent | None = None
    source: Source | None = None
    metrics_server: ServerThread | None = None
    health_server: ServerThread | None = None
    try:
        if settings.metrics_bind is not None:
            metrics_server = metrics.serve(*settings.metrics_bind)
            servers.append(metrics_server)
        if settings.healthz_bind is not None:
            health_server = serve_health(health, *settings.healthz_bind, metrics.record_probe)
            servers.append(health_server)
        agent = Agent(
            AgentOptions(
                node_name=settings.node_name,
                proxy_name=settings.proxy_name,
                prefer_same_node=bool(
                    settings.feature_gates.get("PreferSameTrafficDistribution", True)
                ),
                min_sync_period=settings.min_sync_period,
                sync_period=settings.sync_period,
            ),
            backend,
            metrics=metrics,
            health=health,
            conntrack=_conntrack_cleaner(settings, deps, metrics),
        )
        if not settings.dry_run:
            service_health = ServiceHealthServers(
                health.is_healthy,
                _nodeport_bind_addresses(settings, agent),
                on_listen_error=lambda *_: metrics.healthcheck_listen_failures.inc(),
            )
            agent.service_health = service_health
        log.info(
            "starting %s",
            kv(
                node=settings.node_name,
                backend=backend.name,
                dry_run=settings.dry_run,
                min_sync_period=f"{settings.min_sync_period}s",
                sync_period=f"{settings.sync_period}s",
                metrics=":".join(map(str, settings.metrics_bind or ())) or None,
                healthz=":".join(map(str, settings.healthz_bind or ())) or None,
            ),
        )
        agent.start()
        source = deps.source(settings, agent.handle, agent.source_synced)
        source.start()
        if deps.on_started is not None:
            deps.on_started(
                Running(
                    agent,
                    health,
                    metrics,
                    health_server.port if health_server is not None else None,
                    metrics_server.port if metrics_server is not None else None,
                )
            )
        stop.wait()
        log.info("stopping %s", kv(reason="signal", rules="left in place"))
    except OSError as err:
        # A bind failure of our own servers is a configuration problem.
        raise ConfigError(f"cannot start: {err}") from None
    finally:
        if source is not None and not source.stop(timeout=5.0):
            log.warning("stopping %s", kv(reason="watch threads still running"))
        if agent is not None and not agent.stop(timeout=10.0):
            log.warning("stopping %s", kv(reason="sync in progress abandoned"))
        if service_health is not None:
            service_health.close()
        for server in servers:
            server.close()
    return 0
