"""`sliceproxy cleanup`: remove every rule and chain sliceproxy created.

sliceproxy uses kube-proxy's chain names (KUBE-SERVICES, KUBE-SVC-*, ...), so
the two coincide: cleaning up sliceproxy's iptables rules also removes those
of a kube-proxy in iptables mode, and kube-proxy's --cleanup removes ours.
``--kube-proxy`` also removes chains only older kube-proxy releases made
(KUBE-XLB-*, KUBE-MARK-DROP). kubelet's KUBE-FIREWALL chain, of which
sliceproxy (like kube-proxy) keeps a copy of one rule, is left in place.
Rules and chains of anyone else are never touched.
"""

from __future__ import annotations

import argparse
import sys

from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.restore import IptablesError

NAME = "cleanup"
HELP = "remove every rule and chain sliceproxy created (needs root)"
FAMILY_CHOICES = {"4": (4,), "6": (6,), "both": (4, 6)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help=HELP, description=__doc__)
    p.add_argument(
        "--iptables-backend",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables flavour to clean (default auto: detect as kube-proxy's image does)",
    )
    p.add_argument("--family", choices=tuple(FAMILY_CHOICES), default="both")
    p.add_argument(
        "--kube-proxy",
        action="store_true",
        help="also remove chains that only older kube-proxy releases created",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mode = None if args.iptables_backend == "auto" else args.iptables_backend
    backend = IptablesBackend(RenderOptions(), mode=mode, families=FAMILY_CHOICES[args.family])
    try:
        removed = backend.cleanup(kube_proxy=args.kube_proxy)
    except IptablesError as exc:
        print(f"sliceproxy: cleanup failed: {exc}", file=sys.stderr)
        return 1
    print(f"iptables ({backend.mode}): removed {removed} rules and chains")
    return 0
