"""Flags shared by the commands that build a backend: kube-proxy's names."""

from __future__ import annotations

import argparse

from agent.backends import registry

FAMILY_CHOICES = {"4": (4,), "6": (6,), "both": (4, 6)}


def add_backend_args(parser: argparse.ArgumentParser, *, default_backend: str = "iptables") -> None:
    parser.add_argument(
        "--backend", choices=registry.names(), default=default_backend, help="data plane"
    )
    parser.add_argument(
        "--family",
        choices=tuple(FAMILY_CHOICES),
        default="both",
        help="IP family to program (default: both)",
    )
    parser.add_argument(
        "--cluster-cidr",
        action="append",
        default=[],
        metavar="CIDR[,CIDR]",
        help="pod CIDR(s), one per family: traffic from outside them to a ClusterIP is "
        "masqueraded (repeatable or comma-separated)",
    )
    parser.add_argument(
        "--masquerade-all", action="store_true", help="masquerade all traffic to ClusterIPs"
    )
    parser.add_argument(
        "--iptables-masquerade-bit",
        type=int,
        default=14,
        metavar="BIT",
        help="the fwmark bit marking packets to masquerade (default 14: 0x4000)",
    )
    parser.add_argument(
        "--nodeport-addresses",
        action="append",
        default=[],
        metavar="CIDR[,CIDR]",
        help="accept NodePorts only on node addresses in these CIDRs (default: all)",
    )
    parser.add_argument(
        "--node-ip",
        action="append",
        default=[],
        metavar="IP[,IP]",
        help="this node's addresses (default: the Node object's addresses)",
    )
    registry.add_all_arguments(parser)


def families(args: argparse.Namespace) -> tuple[int, ...]:
    return FAMILY_CHOICES[args.family]
