"""The IPVS backend's command-line face (see agent/backends/registry.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from agent.backends.ipvs.apply import IPVSBackend
from agent.backends.ipvs.diff import DEFAULT_MAX_DRAIN
from agent.backends.ipvs.kernel import ipvs_available
from agent.backends.ipvs.model import DEFAULT_SCHEDULER, SchedulerError
from agent.backends.ipvs.render import IPVSOptions
from agent.backends.registry import BackendAbsent, split_list
from agent.config import ConfigError
from agent.model import NodeInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ipvs-scheduler",
        default=DEFAULT_SCHEDULER,
        metavar="NAME",
        help="IPVS scheduler: rr (default), wrr, lc, wlc, lblc, lblcr, sh, mh, dh, sed, nq, ...",
    )
    parser.add_argument(
        "--ipvs-max-drain",
        type=float,
        default=DEFAULT_MAX_DRAIN,
        metavar="SECONDS",
        help="delete a weight-0 TCP real server after this long even if it still has "
        "connections (default 900; 0 = wait for the connections, as upstream)",
    )


def _options(
    scheduler: str,
    cluster_cidrs: Sequence[str],
    masquerade_all: bool,
    masquerade_bit: int,
    nodeport_cidrs: Sequence[str],
    node_ips: Sequence[str],
    families: Sequence[int] | None,
) -> IPVSOptions:
    try:
        return IPVSOptions(
            scheduler=scheduler,
            masquerade_all=masquerade_all,
            cluster_cidrs=tuple(cluster_cidrs),
            nodeport_addresses=tuple(node_ips) or None,
            nodeport_cidrs=tuple(nodeport_cidrs),
            masquerade_bit=masquerade_bit,
            families=tuple(families) if families else None,
        )
    except SchedulerError as err:
        raise ConfigError(str(err)) from None


def make_backend(args: argparse.Namespace, node: NodeInfo, families: Sequence[int]) -> IPVSBackend:
    opts = _options(
        args.ipvs_scheduler,
        split_list(args.cluster_cidr),
        args.masquerade_all,
        args.iptables_masquerade_bit,
        split_list(args.nodeport_addresses),
        split_list(args.node_ip),
        families,
    )
    return IPVSBackend(opts, max_drain=args.ipvs_max_drain or None)


def from_settings(settings: Any) -> IPVSBackend:
    """For `sliceproxy run --proxy-mode ipvs`: checks for IPVS at once, so the
    agent stops at start with NoIPVSError's message (an OSError) when the
    kernel has none. Not in dry-run (``settings.dry_run``): that only renders,
    which needs no IPVS, so a user can preview IPVS mode on any node."""
    opts = _options(
        str(getattr(settings, "ipvs_scheduler", DEFAULT_SCHEDULER) or DEFAULT_SCHEDULER),
        tuple(getattr(settings, "cluster_cidrs", ())),
        bool(getattr(settings, "masquerade_all", False)),
        int(getattr(settings, "masquerade_bit", 14)),
        tuple(getattr(settings, "nodeport_addresses", ())),
        tuple(getattr(settings, "node_ips", ())),
        None,
    )
    max_drain = getattr(settings, "ipvs_max_drain", DEFAULT_MAX_DRAIN)
    backend = IPVSBackend(opts, max_drain=max_drain or None)
    if not getattr(settings, "dry_run", False):
        backend.check()
    return backend


def cleanup(args: argparse.Namespace) -> str:
    """`sliceproxy cleanup --backend ipvs`: one summary line.

    Raises BackendAbsent on a kernel without IPVS: IPVS mode cannot have run
    there, and its iptables chains share names with iptables mode's, so
    "cleaning" them would only break a working iptables-mode node.
    """
    if not ipvs_available():
        raise BackendAbsent("IPVS is not available in this kernel: nothing to clean")
    backend = IPVSBackend(local_addresses=None)
    try:
        removed = backend.cleanup()
    finally:
        backend.close()
    return f"ipvs: removed {removed} virtual servers, links, ipsets, rules and chains"
