"""`sliceproxy cleanup`: remove every rule, chain and IPVS object sliceproxy created.

``--backend`` picks the data plane(s) to clean; the default, ``all``, cleans
every backend that can be present on this node (IPVS only where the kernel
has it) and goes on after a failure, exiting 1 if any failed.

sliceproxy uses kube-proxy's names (KUBE-SERVICES, KUBE-SVC-*, kube-ipvs0,
KUBE-CLUSTER-IP, ...), so the two coincide: cleaning up sliceproxy's rules
also removes those of a kube-proxy, and kube-proxy's --cleanup removes ours.
``--kube-proxy`` also removes iptables chains only older kube-proxy releases
made (KUBE-XLB-*, KUBE-MARK-DROP). kubelet's KUBE-FIREWALL chain, of which
sliceproxy (like kube-proxy) keeps a copy of one rule, is left in place.
IPVS virtual servers of anyone else (keepalived, an admin's ipvsadm) are
never touched, nor are other rules and chains.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from agent.backends import registry
from agent.backends.iptables.cli import FAMILY_CHOICES
from agent.backends.iptables.restore import IptablesError

NAME = "cleanup"
HELP = "remove every rule, chain and IPVS object sliceproxy created (needs root)"

# IPVS first: iptables mode's cleanup cannot delete a chain IPVS mode still
# jumps to (KUBE-PROXY-FIREWALL from INPUT, with another rule text), while
# IPVS mode's cleanup removes its own jumps before its chains.
ORDER = ("ipvs", "iptables")

# Returns the summary line to print, starting with the backend's name.
Cleaner = Callable[[argparse.Namespace], str]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help=HELP, description=__doc__)
    p.add_argument(
        "--backend",
        choices=(*registry.names(), "all"),
        default="all",
        help="data plane to clean (default all: every one present on this node)",
    )
    p.add_argument(
        "--iptables-backend",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables flavour to clean (default auto: detect as kube-proxy's image does)",
    )
    p.add_argument(
        "--family", choices=tuple(FAMILY_CHOICES), default="both", help="iptables mode only"
    )
    p.add_argument(
        "--kube-proxy",
        action="store_true",
        help="also remove chains that only older kube-proxy releases created",
    )
    p.set_defaults(func=run)


def cleaner(name: str) -> Cleaner:
    """The backend module's ``cleanup(args)`` (see agent/backends/registry.py)."""
    fn: Cleaner = registry.module(name).cleanup
    return fn


def chosen(backend: str) -> list[str]:
    names = registry.names() if backend == "all" else (backend,)
    return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def run(args: argparse.Namespace) -> int:
    failed = False
    for name in chosen(args.backend):
        # After a failure the others still run: a half-cleaned node is worse.
        try:
            line = cleaner(name)(args)
        except registry.BackendAbsent as exc:
            print(f"{name}: skipped: {exc}")
            continue
        except (IptablesError, OSError) as exc:
            print(f"sliceproxy: {name} cleanup failed: {exc}", file=sys.stderr)
            failed = True
            continue
        except Exception as exc:  # netlink, ipset: still a message, not a traceback
            print(
                f"sliceproxy: {name} cleanup failed: {type(exc).__name__}: {exc}", file=sys.stderr
            )
            failed = True
            continue
        print(line)
    return 1 if failed else 0
