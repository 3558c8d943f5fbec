"""`sliceproxy run`: the node agent, with kube-proxy's flag names.

Wiring: the API source (three list/watch reflectors) calls ``agent.handle``
for every object event and ``agent.source_synced`` once per resource after
its first list; the agent feeds ClusterState, accumulates the changed
service ports, and its runner thread syncs the backend. /metrics, /healthz,
/livez and the healthCheckNodePort servers run beside it. SIGTERM/SIGINT
stop the watches and the loop and exit 0, leaving the rules in place (as
kube-proxy does: a restarting proxy must not black-hole Service traffic).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from agent import logfmt
from agent.agent import Agent, AgentOptions
from agent.backends.base import Backend, SyncKind, SyncResult
from agent.commands.common import add_conntrack_cleanup_arg
from agent.config import ConfigError, parse_feature_gates
from agent.conntrack_apply import ConntrackCleaner
from agent.health import ProxyHealth, serve_health
from agent.healthcheck import ServiceHealthServers
from agent.httpserver import ServerThread, split_host_port
from agent.logfmt import kv
from agent.metrics import Metrics
from agent.model import ServicePortName
from agent.plan import NodePlan
from agent.sources.events import ObjectEvent

NAME = "run"
HELP = "run the node proxy: watch the API server and program this node's rules"
log = logging.getLogger("agent.run")

DESCRIPTION = """\
Run the node proxy: watch Services, EndpointSlices and this Node, and keep the
node's data plane in step with them.

API server address: without --kubeconfig or --master, the in-cluster service
account is used, which reaches the API server through the `kubernetes`
Service's ClusterIP. On a fresh node that ClusterIP is programmed by this very
proxy, so it cannot connect until it has synced: a chicken-and-egg problem.
Give a node proxy the API server's real address (--master or a kubeconfig
pointing at the load balancer / control-plane IP), as kube-proxy's DaemonSet
does. --master alone, inside a pod, still authenticates with the pod's
service account. See docs/running.md.
"""

# --------------------------------------------------------------------------
# durations
# --------------------------------------------------------------------------

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-zµμ]+)")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (``1s``, ``500ms``, ``1m30s``, ``1.5h``) -> seconds.

    Like Go, a bare number is refused (except ``0``): ``--sync-period=30``
    would otherwise silently mean 30 s to one reader and 30 ns to another.
    """
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            if re.fullmatch(r"[\d.]+", s[pos:]):
                raise ValueError(f"invalid duration {text!r}: missing unit (e.g. {s[pos:]}s)")
            raise ValueError(f"invalid duration {text!r}")
        unit = m.group(2)
        if unit not in _UNITS:
            raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r}")
        total += float(m.group(1)) * _UNITS[unit]
        pos = m.end()
    return sign * total


def _duration_arg(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative duration {text!r}")
    return value


def _bind_arg(text: str) -> tuple[str, int] | None:
    if text == "":
        return None  # empty disables the server, as for kube-proxy
    try:
        host, port = split_host_port(text)
        if host != "0.0.0.0":
            ipaddress.ip_address(host)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (expected IP:PORT)") from None
    return host, port


def _cidrs_arg(text: str) -> tuple[str, ...]:
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if item == "primary":
            out.append(item)
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid CIDR {item!r}") from None
    return tuple(out)


def default_hostname(override: str = "", env: Mapping[str, str] | None = None) -> str:
    """kube-proxy's node name: the override, else (ours) $NODE_NAME, else the
    host name; trimmed and lower-cased as kube-proxy does."""
    env = os.environ if env is None else env
    name = override.strip() or env.get("NODE_NAME", "").strip() or socket.gethostname()
    return name.strip().lower()


# --------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------


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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME, help=HELP, description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--kubeconfig", help="path to a kubeconfig (default: in-cluster config)")
    p.add_argument(
        "--master",
        help="API server address, overriding the kubeconfig's\n"
        "(use the real address, not the `kubernetes` Service: see above)",
    )
    p.add_argument(
        "--hostname-override",
        default="",
        help="this node's name (default: $NODE_NAME, else the host name, lower-cased)",
    )
    p.add_argument("--proxy-mode", choices=("iptables", "ipvs"), default="iptables")
    p.add_argument(
        "--cluster-cidr",
        type=_cidrs_arg,
        default=(),
        metavar="CIDRS",
        help="pod CIDR(s), comma-separated; traffic to a ClusterIP from outside is masqueraded",
    )
    p.add_argument("--masquerade-all", action="store_true", help="masquerade all Service traffic")
    p.add_argument(
        "--min-sync-period",
        type=_duration_arg,
        default=1.0,
        metavar="DURATION",
        help="least time between two syncs; bursts are coalesced (default 1s)",
    )
    p.add_argument(
        "--sync-period",
        type=_duration_arg,
        default=30.0,
        metavar="DURATION",
        help="retry interval after a failed sync; health timeout is twice this (default 30s)",
    )
    p.add_argument(
        "--nodeport-addresses",
        type=_cidrs_arg,
        default=(),
        metavar="CIDRS",
        help="node addresses NodePorts (and healthCheckNodePorts) accept, as CIDRs or 'primary'",
    )
    p.add_argument(
        "--metrics-bind-address",
        type=_bind_arg,
        default=None,
        metavar="IP:PORT",
        help="/metrics address (default 127.0.0.1:10249; empty disables)",
    )
    p.add_argument(
        "--healthz-bind-address",
        type=_bind_arg,
        default=None,
        metavar="IP:PORT",
        help="/healthz and /livez address (default 0.0.0.0:10256; empty disables)",
    )
    p.add_argument("--feature-gates", default="", metavar="GATES", help="e.g. A=true,B=false")
    p.add_argument(
        "--service-proxy-name",
        default="",
        help="own the services whose service.kubernetes.io/service-proxy-name label\n"
        "equals this (default: the services without the label)",
    )
    p.add_argument(
        "-v", "--v", dest="verbosity", type=int, default=0, metavar="N", help="log verbosity"
    )
    p.add_argument(
        "--iptables-backend",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables flavour (default: detect what the node already uses)",
    )
    p.add_argument(
        "--iptables-masquerade-bit",
        type=int,
        default=14,
        metavar="BIT",
        help="fwmark bit marking packets to masquerade, 0-31 (default 14: 0x4000)",
    )
    p.add_argument(
        "--ipvs-scheduler",
        default="rr",
        metavar="NAME",
        help="IPVS scheduler with --proxy-mode ipvs: rr (default), wrr, lc, wlc, sh, mh, ...",
    )
    p.add_argument(
        "--ipvs-max-drain",
        type=_duration_arg,
        default=900.0,
        metavar="DURATION",
        help="delete a weight-0 TCP real server after this long even with open\n"
        "connections (default 15m; 0 waits for them, as upstream)",
    )
    add_conntrack_cleanup_arg(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="watch the cluster but change nothing: print each sync as a unified diff\n"
        "of the rendered rules (first sync: the whole set). No root needed.\n"
        "Health and healthCheckNodePort servers stay off (they would collide with\n"
        "a running kube-proxy's) unless their addresses are given explicitly.",
    )
    p.set_defaults(func=run)


def settings_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> RunSettings:
    """Validate what argparse cannot; raises ConfigError (exit 2)."""
    if args.sync_period <= 0:
        raise ConfigError("--sync-period must be greater than 0")
    if args.min_sync_period > args.sync_period:
        raise ConfigError(
            "--min-sync-period must not be longer than --sync-period "
            f"({args.min_sync_period}s > {args.sync_period}s)"
        )
    if not 0 <= args.iptables_masquerade_bit <= 31:
        raise ConfigError("--iptables-masquerade-bit must be between 0 and 31")
    node = default_hostname(args.hostname_override, env)
    if not node:
        raise ConfigError("cannot tell this node's name: give --hostname-override")
    gates = parse_feature_gates(args.feature_gates)
    # In dry-run the servers default to off: on a node still running
    # kube-proxy their ports are taken, and a healthCheckNodePort answering
    # for rules that are not programmed would mislead load balancers.
    metrics_bind = args.metrics_bind_address
    healthz_bind = args.healthz_bind_address
    if not args.dry_run:
        metrics_bind = metrics_bind or ("127.0.0.1", 10249)
        healthz_bind = healthz_bind or ("0.0.0.0", 10256)
    return RunSettings(
        node_name=node,
        proxy_mode=args.proxy_mode,
        kubeconfig=args.kubeconfig,
        master=args.master,
        cluster_cidrs=args.cluster_cidr,
        masquerade_all=args.masquerade_all,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        nodeport_addresses=args.nodeport_addresses,
        metrics_bind=metrics_bind,
        healthz_bind=healthz_bind,
        feature_gates=gates,
        proxy_name=args.service_proxy_name,
        verbosity=args.verbosity,
        iptables_backend=args.iptables_backend,
        masquerade_bit=args.iptables_masquerade_bit,
        ipvs_scheduler=args.ipvs_scheduler,
        ipvs_max_drain=args.ipvs_max_drain or None,
        dry_run=args.dry_run,
        conntrack_cleanup=getattr(args, "conntrack_cleanup", True),
    )


# --------------------------------------------------------------------------
# pluggable parts (tests replace them)
# --------------------------------------------------------------------------


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


class _PlanText:
    """Stand-in renderer when no backend renderer exists: the explain view."""

    name = "plan"

    def render(self, plan: NodePlan) -> str:
        from agent.explain import plan_text

        return plan_text(plan, None, color=False)


class DryRunBackend:
    """Renders every sync and prints the difference; never touches the kernel."""

    def __init__(self, renderer: Any, out: TextIO) -> None:
        self.name = f"dry-run({getattr(renderer, 'name', '?')})"
        self._renderer = renderer
        self._out = out
        self._previous = ""
        self._count = 0
        self._lock = threading.Lock()

    def render(self, plan: NodePlan) -> str:
        return str(self._renderer.render(plan))

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        text = self.render(plan)
        kind: SyncKind = "full" if changed is None else "partial"
        with self._lock:
            self._count += 1
            before = self._previous
            diff = list(
                difflib.unified_diff(
                    before.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    fromfile="rules before" if self._count > 1 else "no rules",
                    tofile=f"rules after sync {self._count} ({kind})",
                )
            )
            self._previous = text
            if diff:
                self._out.writelines(line if line.endswith("\n") else line + "\n" for line in diff)
                self._out.flush()
        written = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
        return SyncResult(
            kind=kind,
            ok=True,
            service_ports_changed=len(changed) if changed is not None else 0,
            rules_written=written,
        )

    def cleanup(self) -> int:
        return 0


def dry_run_backend(settings: RunSettings, out: TextIO) -> DryRunBackend:
    try:
        renderer: Any = registry_backend(settings)
    except ConfigError as err:
        log.warning(
            "no_renderer %s",
            kv(reason=str(err), showing="the plan (sliceproxy explain) instead of rules"),
        )
        renderer = _PlanText()
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


def _nodeport_bind_addresses(settings: RunSettings, agent: Agent) -> Callable[[], Sequence[str]]:
    """healthCheckNodePort bind addresses: the node's addresses inside
    --nodeport-addresses, or every address when that flag is unset (upstream)."""

    def addresses() -> Sequence[str]:
        if not settings.nodeport_addresses:
            return ("0.0.0.0",)
        node_ips = list(agent.state.node.addresses)
        chosen: list[str] = []
        for item in settings.nodeport_addresses:
            if item == "primary":
                chosen += [ip for ip in node_ips[:2] if ip not in chosen]
                continue
            net = ipaddress.ip_network(item)
            chosen += [
                ip for ip in node_ips if ipaddress.ip_address(ip) in net and ip not in chosen
            ]
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


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logfmt.setup(settings.verbosity)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s", kv(signal=signal.Signals(signum).name))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return serve(settings, stop)
