"""Backends by name, for the commands (`render`, `apply`, `cleanup`, `run`).

Each entry names a module that provides:

* ``add_arguments(parser)``: its own flags (distinct from every other
  backend's; the shared kube-proxy flags live in agent/commands/backend_args.py);
* ``make_backend(args, node, families)``: a configured ``Backend``
  (agent/backends/base.py) for the one-shot commands;
* ``from_settings(settings)``: the same for `sliceproxy run` (its
  RunSettings: cluster_cidrs, masquerade_all, nodeport_addresses,
  iptables_backend, dry_run, ...);
* ``cleanup(args)``: for `sliceproxy cleanup`, remove what the backend
  created on this node and return a one-line summary; raise
  ``BackendAbsent`` when it cannot be present here (e.g. no IPVS).

Adding a backend is one line here.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any, Protocol

from agent.backends.base import Backend
from agent.model import NodeInfo


class BackendAbsent(Exception):
    """This node cannot hold the backend's objects: nothing to clean up."""


BACKENDS: dict[str, str] = {
    "iptables": "agent.backends.iptables.cli",
    "ipvs": "agent.backends.ipvs.cli",
}


class BackendModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def make_backend(
        self, args: argparse.Namespace, node: NodeInfo, families: Sequence[int]
    ) -> Backend: ...

    def from_settings(self, settings: Any) -> Backend: ...

    def cleanup(self, args: argparse.Namespace) -> str: ...


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def module(name: str) -> BackendModule:
    return importlib.import_module(BACKENDS[name])  # type: ignore[return-value]


def create(mode: str, settings: Any) -> Backend:
    """The backend for `sliceproxy run --proxy-mode MODE` (ValueError if unknown)."""
    if mode not in BACKENDS:
        raise ValueError(f"unknown backend {mode!r} (known: {', '.join(BACKENDS)})")
    return module(mode).from_settings(settings)


def add_all_arguments(parser: argparse.ArgumentParser) -> None:
    for name in BACKENDS:
        module(name).add_arguments(parser)


def split_list(values: Sequence[str]) -> tuple[str, ...]:
    """Repeatable and comma-separated flag values, flattened, blanks dropped."""
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())
