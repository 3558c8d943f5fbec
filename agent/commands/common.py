"""Arguments and loading shared by the commands that read manifests."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from agent.config import ConfigError, parse_feature_gates
from agent.parse import Problem
from agent.plan import NodePlan, build_plan
from agent.sources.files import ReadProblem, load
from agent.state import ClusterState

EXIT_USAGE = 2


def add_state_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        action="append",
        required=True,
        metavar="PATH",
        help="manifest file, directory of *.yaml/*.yml/*.json, or - for stdin (repeatable)",
    )
    parser.add_argument("--node", required=True, help="the node to decide for")
    parser.add_argument(
        "--feature-gates",
        default="",
        metavar="GATES",
        help="e.g. PreferSameTrafficDistribution=false",
    )
    parser.add_argument(
        "--service-proxy-name",
        default="",
        help="own the services whose service.kubernetes.io/service-proxy-name label "
        "equals this (default: own the services without the label)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 2 if any input is invalid"
    )


@dataclass
class LoadedState:
    state: ClusterState
    plan: NodePlan
    problems: list[ReadProblem | Problem]


def load_state(args: argparse.Namespace) -> LoadedState:
    """Read the manifests, report every problem on stderr, build the plan.

    Raises ConfigError for unusable settings; SystemExit(2) under --strict.
    """
    gates = parse_feature_gates(args.feature_gates)
    loaded = load(args.state)
    state = ClusterState(args.node, proxy_name=args.service_proxy_name)
    for event in loaded.events:
        state.apply(event)
    problems: list[ReadProblem | Problem] = [*loaded.problems, *state.problems]
    for problem in problems:
        print(f"sliceproxy: {problem}", file=sys.stderr)
    if problems and args.strict:
        print(
            f"sliceproxy: --strict: {len(problems)} invalid input(s), stopping",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)
    plan = build_plan(state, prefer_same_node=gates["PreferSameTrafficDistribution"])
    return LoadedState(state, plan, problems)


__all__ = ["EXIT_USAGE", "ConfigError", "LoadedState", "add_state_args", "load_state"]


def _bool_arg(text: str) -> bool:
    """Go's strconv.ParseBool, as kube-proxy's boolean flags take it."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (true or false)")


def add_conntrack_cleanup_arg(parser: argparse.ArgumentParser) -> None:
    """``--conntrack-cleanup[=BOOL]`` (default true), shared by run and apply."""
    parser.add_argument(
        "--conntrack-cleanup",
        type=_bool_arg,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="after each successful sync, delete UDP conntrack flows to a service whose "
        "reply source is no longer a serving endpoint, as kube-proxy does (default true; "
        "needs the conntrack binary)",
    )
