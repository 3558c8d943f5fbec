"""Convergence under faults with the real iptables applier (root).

The scenario of tests/unit/test_convergence.py (seeded random writes to the
fake API server, dropped watches, compactions, a restart), but the agent's
backend is ``IptablesBackend`` writing, through ``ip netns exec``, into a
network namespace this test created; another program flushing the nat table
is one more fault. At the end the namespace's nat and filter tables must be
exactly what a fresh full sync of the server's final state writes into a
second fresh namespace: same chains, same rules, same rule order in every
chain (a partial sync that appends where a full sync would insert is a bug
here, not noise). Counters are dropped.

Both namespaces are deleted even when the test fails (and a killed run's
are swept by tests/e2e/conftest.py).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.backends.iptables import chains
from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.render import FAMILIES
from agent.backends.iptables.restore import Mode, binary, subprocess_runner
from tests.support.convergence import World, expected_plan, faulty_writes, random_op, running_agent
from tests.support.fake_apiserver import FakeApiServer
from tests.support.fake_iptables import normalise
from tests.support.netns import delete_namespace, run
from tests.support.runtime import wait_for

pytestmark = pytest.mark.root

OPTIONS = RenderOptions(cluster_cidrs=("10.244.0.0/16",), random_fully=False)
_counter = itertools.count()

Tables = dict[int, dict[str, dict[str, list[str]]]]


@pytest.fixture(params=["legacy", "nft"])
def mode(request: pytest.FixtureRequest) -> Mode:
    m: Mode = request.param
    for family in FAMILIES:
        for tool in ("restore", "save", ""):
            if shutil.which(binary(tool, family, m)) is None:
                pytest.skip(f"{binary(tool, family, m)} is not installed (package iptables)")
    return m


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Fresh, empty network namespaces; every one is deleted at the end."""
    made: list[str] = []

    def make() -> str:
        # "sp<pid>-<n>-" lets tests/support/netns.sweep_stale find it later.
        name = f"sp{os.getpid()}-{next(_counter)}-conv"
        run(["ip", "netns", "add", name])
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            delete_namespace(name)


def backend_in(netns: str, mode: Mode) -> IptablesBackend:
    return IptablesBackend(
        OPTIONS, mode=mode, runner=subprocess_runner(["ip", "netns", "exec", netns])
    )


def tables(netns: str, mode: Mode) -> Tables:
    """nat and filter of every family: chain -> rules in kernel order."""
    out: Tables = {}
    for family in FAMILIES:
        per_table: dict[str, dict[str, list[str]]] = {}
        for table in ("nat", "filter"):
            save = run(["ip", "netns", "exec", netns, binary("save", family, mode), "-t", table])
            per_table.update(normalise(save.stdout))
        out[family] = per_table
    return out


def flush_nat(netns: str, mode: Mode) -> None:
    """Another program resets the tables: nat emptied, the canary gone."""
    ipt = ["ip", "netns", "exec", netns, binary("", 4, mode), "-w"]
    run([*ipt, "-t", "nat", "-F"])
    run([*ipt, "-t", "mangle", "-F", chains.KUBE_PROXY_CANARY])
    run([*ipt, "-t", "mangle", "-X", chains.KUBE_PROXY_CANARY])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kernel_rules_converge_to_a_fresh_full_sync(
    seed: int, mode: Mode, make_netns: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    world: World = {}
    node_ns = make_netns()
    backend = backend_in(node_ns, mode)
    with FakeApiServer(bookmark_interval=0.2) as api:
        for _ in range(20):  # a restarting agent: state exists already
            random_op(rng, api, world)
        with running_agent(api, backend, seed, tmp_path, stop_timeout=10.0) as run:
            agent, kinds = run.agent, run.kinds
            assert wait_for(lambda: agent.plan is not None, 20.0), "no first sync"
            # Real restores take milliseconds: pause longer so syncs
            # interleave with the writes instead of coalescing them all.
            faulty_writes(
                rng,
                api,
                world,
                pause=0.05,
                extra=lambda i: flush_nat(node_ns, mode) if i == 60 else None,
            )
            want_plan = expected_plan(world)

            def done() -> bool:
                plan = agent.plan
                return (
                    plan is not None
                    and plan.node == want_plan.node
                    and plan.entries == want_plan.entries
                )

            assert wait_for(done, 20.0), "the agent's plan differs from the server's final state"
    got = tables(node_ns, mode)

    fresh_ns = make_netns()
    result = backend_in(fresh_ns, mode).sync(want_plan, None)
    assert result.ok, result.error
    want = tables(fresh_ns, mode)
    assert any(ch.startswith("KUBE-SVC-") for ch in want[4]["nat"]), "nothing to compare"

    # Table by table and chain by chain first, for a readable failure.
    for family in FAMILIES:
        for table, want_chains in want[family].items():
            got_chains = got[family][table]
            where = f"IPv{family} {table}"
            assert sorted(got_chains) == sorted(want_chains), f"{where}: chains differ"
            for chain, rules in want_chains.items():
                assert got_chains[chain] == rules, f"{where} {chain}: rules or their order differ"
    assert got == want
    assert kinds[0] == "full"
    assert "partial" in kinds  # partial syncs were exercised, not only full ones
    assert time.monotonic() - started < 60.0
