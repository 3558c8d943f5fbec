"""Entry point: `sliceproxy COMMAND ...`.

Each command lives in agent/commands/<name>.py and provides
``add_parser(subparsers)``; the parser's ``func`` runs it and returns the
exit status. Nothing a user types or feeds in ends in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__
from agent.config import ConfigError

# Command modules under agent.commands, in the order `--help` lists them.
COMMANDS = ("explain", "run", "render", "apply", "cleanup")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sliceproxy",
        description="A node-level Kubernetes service proxy: kube-proxy's behaviour, "
        "with visibility.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"agent.commands.{name}").add_parser(sub)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(f"sliceproxy {__version__}") or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"sliceproxy: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `sliceproxy render ... | head` is normal use, not an error.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
