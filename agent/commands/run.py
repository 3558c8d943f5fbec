"""`sliceproxy run`: the node agent, with kube-proxy's flag names.

This module turns flags into RunSettings and signals into a stop; the agent
itself (wiring, servers, shutdown) is agent/serve.py. SIGTERM/SIGINT stop
the watches and the loop and exit 0, leaving the rules in place.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping

from agent import logfmt
from agent.commands.common import add_conntrack_cleanup_arg
from agent.config import ConfigError, parse_feature_gates
from agent.durations import parse_duration
from agent.httpserver import split_host_port
from agent.logfmt import kv
from agent.serve import RunSettings, serve

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
# flag values
# --------------------------------------------------------------------------


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
# flags -> settings
# --------------------------------------------------------------------------


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
