"""The iptables backend's command-line face (see agent/backends/registry.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.restore import BinaryMissing, Mode
from agent.backends.registry import BackendAbsent, split_list
from agent.model import NodeInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--iptables-backend",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables flavour (default auto: the one holding kubelet's chains, "
        "as kube-proxy's image decides)",
    )
    parser.add_argument(
        "--no-random-fully",
        action="store_true",
        help="render MASQUERADE without --random-fully (apply probes support itself)",
    )
    parser.add_argument(
        "--no-localhost-nodeports",
        action="store_true",
        help="do not accept NodePorts on 127.0.0.1 (--iptables-localhost-nodeports=false)",
    )


def options_from_args(args: argparse.Namespace, node: NodeInfo) -> RenderOptions:
    node_ips = split_list(args.node_ip) or node.addresses
    return RenderOptions(
        cluster_cidrs=split_list(args.cluster_cidr),
        masquerade_all=args.masquerade_all,
        masquerade_bit=args.iptables_masquerade_bit,
        nodeport_addresses=split_list(args.nodeport_addresses),
        node_ips=tuple(node_ips),
        random_fully=not args.no_random_fully,
        localhost_nodeports=not args.no_localhost_nodeports,
    )


def make_backend(
    args: argparse.Namespace, node: NodeInfo, families: Sequence[int]
) -> IptablesBackend:
    mode = None if args.iptables_backend == "auto" else args.iptables_backend
    return IptablesBackend(
        options_from_args(args, node),
        mode=mode,
        families=families,
        probe_random_fully=not args.no_random_fully,
    )


def from_settings(settings: Any) -> IptablesBackend:
    """For `sliceproxy run`: kube-proxy's flags as RunSettings carries them.

    The node's addresses are not known before the Node object arrives, so
    NodePort addresses fall back to every local address and the LB
    allow-from-node rule is not written (kube-proxy takes --bind-address).
    """
    mode = getattr(settings, "iptables_backend", "auto")
    options = RenderOptions(
        cluster_cidrs=tuple(getattr(settings, "cluster_cidrs", ())),
        masquerade_all=bool(getattr(settings, "masquerade_all", False)),
        masquerade_bit=int(getattr(settings, "masquerade_bit", 14)),
        nodeport_addresses=tuple(getattr(settings, "nodeport_addresses", ())),
        node_ips=tuple(getattr(settings, "node_ips", ())),
    )
    return IptablesBackend(options, mode=_mode(mode), probe_random_fully=True)


def _mode(flag: str) -> Mode | None:
    """--iptables-backend: None for "auto" (detect), else the flavour."""
    if flag == "legacy":
        return "legacy"
    if flag == "nft":
        return "nft"
    return None


FAMILY_CHOICES = {"4": (4,), "6": (6,), "both": (4, 6)}


def cleanup(args: argparse.Namespace) -> str:
    """`sliceproxy cleanup --backend iptables`: one summary line.

    Raises BackendAbsent when no iptables binary exists: nothing of ours can
    be in tables nobody can write.
    """
    mode = None if args.iptables_backend == "auto" else args.iptables_backend
    backend = IptablesBackend(RenderOptions(), mode=mode, families=FAMILY_CHOICES[args.family])
    try:
        removed = backend.cleanup(kube_proxy=args.kube_proxy)
    except BinaryMissing as exc:
        raise BackendAbsent(f"no iptables binaries: {exc}") from None
    return f"iptables ({backend.mode}): removed {removed} rules and chains"
