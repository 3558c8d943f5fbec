"""`sliceproxy explain`: what this node does with each service port, and why."""

from __future__ import annotations

import argparse
import json
import sys

from agent.commands.common import add_state_args, load_state
from agent.explain import plan_json, plan_text

NAME = "explain"
HELP = "show the endpoint decision for each service port on a node, with reasons"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help=HELP, description=HELP)
    add_state_args(p)
    p.add_argument("--service", metavar="NAMESPACE/NAME", help="only this service")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_state(args)
    if args.output == "json":
        json.dump(plan_json(loaded.plan, args.service), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(plan_text(loaded.plan, args.service, color=sys.stdout.isatty()))
    return 0
