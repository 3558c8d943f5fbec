"""`sliceproxy render`: the rules a backend would program, without touching the node."""

from __future__ import annotations

import argparse
import sys

from agent.backends import registry
from agent.commands.backend_args import add_backend_args, families
from agent.commands.common import add_state_args, load_state

NAME = "render"
HELP = "print the rules a backend would program for a node (iptables: iptables-restore input)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help=HELP,
        description=HELP + ". For iptables this is the full-sync input as sent on a fresh "
        "node: on a node that already has the jump rules, the applier leaves those out.",
    )
    add_state_args(p)
    add_backend_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_state(args)
    backend = registry.module(args.backend).make_backend(args, loaded.plan.node, families(args))
    sys.stdout.write(backend.render(loaded.plan))
    return 0
