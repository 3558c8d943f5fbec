"""Shared fixtures for e2e tests: real kernel, network namespaces, root.

Everything here skips (never fails) when the machine cannot run e2e tests,
and says which requirement is missing. Where the requirements are present
(CI runs as root) the tests run.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.netns import CommandError, Namespace, Topology, sweep_stale

TopologyFactory = Callable[..., Topology]

BACKENDS = ("legacy", "nft")


@functools.cache
def missing_requirement() -> str | None:
    """Why e2e tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces, veth, iptables)"
    for tool in ("ip", "sysctl"):
        if shutil.which(tool) is None:
            return f"e2e tests need the '{tool}' binary (package iproute2 / procps)"
    if not any(shutil.which(f"iptables-{backend}-restore") for backend in BACKENDS):
        return "e2e tests need iptables-legacy-restore or iptables-nft-restore (package iptables)"
    # Building a bare topology exercises exactly what every test needs:
    # "ip netns add", sysctls inside a namespace and a veth pair.
    try:
        Topology().close()
    except (CommandError, OSError) as exc:
        return f"cannot build a network namespace with a veth pair: {exc}"
    return None


def iptables_missing(backend: str, family: int = 4) -> str | None:
    binary = Namespace.iptables_binary("restore", family, backend)  # type: ignore[arg-type]
    if shutil.which(binary) is None:
        return f"{binary} is not installed"
    return None


def require_iptables(backend: str, family: int = 4) -> None:
    """Skip the calling test when the backend's binary for ``family`` is absent."""
    reason = iptables_missing(backend, family)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _e2e_environment() -> Iterator[None]:
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    # Leftovers of runs that were killed before their finalizers ran.
    sweep_stale()
    yield


def _factory() -> tuple[TopologyFactory, list[Topology]]:
    built: list[Topology] = []

    def make(**kwargs: Any) -> Topology:
        topo = Topology(**kwargs)
        built.append(topo)
        return topo

    return make, built


@pytest.fixture
def topology_factory() -> Iterator[TopologyFactory]:
    """Build any number of topologies; all are removed after the test."""
    make, built = _factory()
    yield make
    for topo in built:
        topo.close()


@pytest.fixture(scope="module")
def module_topology_factory() -> Iterator[TopologyFactory]:
    """Like ``topology_factory`` but shared by a module (faster, less isolated)."""
    make, built = _factory()
    yield make
    for topo in built:
        topo.close()


@pytest.fixture
def topology(topology_factory: TopologyFactory) -> Topology:
    """A node namespace (plus its silent upstream); add pods and clients."""
    return topology_factory()


@pytest.fixture(params=BACKENDS)
def iptables_backend(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over iptables-legacy and iptables-nft."""
    backend: str = request.param
    require_iptables(backend)
    return backend
