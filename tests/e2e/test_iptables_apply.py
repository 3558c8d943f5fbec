"""The iptables applier against the real kernel, legacy and nft (root).

Each test creates its own network namespace (`ip netns add`), applies rules
only there through `ip netns exec`, and deletes it even when the test fails.
The root namespace's tables are never touched.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent.backends.iptables import chains
from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.restore import Mode, binary, subprocess_runner
from agent.plan import NodePlan
from tests.golden.iptables_cases import OPTIONS, THREE, endpoint, plan, service
from tests.support.fake_iptables import normalise

pytestmark = pytest.mark.root
_counter = itertools.count()


@pytest.fixture(params=["legacy", "nft"])
def mode(request: pytest.FixtureRequest) -> Mode:
    m: Mode = request.param
    for family in (4, 6):
        for tool in ("restore", "save", ""):
            if shutil.which(binary(tool, family, m)) is None:
                pytest.skip(f"{binary(tool, family, m)} is not installed")
    return m


@pytest.fixture
def netns() -> Iterator[str]:
    # The "sp<pid>-<n>-" scheme lets tests/support/netns.sweep_stale remove
    # the namespace if this run is killed before the finally below.
    name = f"sp{os.getpid()}-{next(_counter)}-ipt"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns_run(netns: str, *argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def backend(netns: str, mode: Mode) -> IptablesBackend:
    return IptablesBackend(
        OPTIONS, mode=mode, runner=subprocess_runner(["ip", "netns", "exec", netns])
    )


def saved(netns: str, mode: Mode) -> dict[int, object]:
    return {f: normalise(ns_run(netns, binary("save", f, mode))) for f in (4, 6)}


def names(*plans: NodePlan) -> set:  # type: ignore[type-arg]
    return {key[0] for p in plans for key in p.entries}


def services(n: int, endpoints: int = 2) -> NodePlan:
    ports = []
    for i in range(n):
        eps = [endpoint(f"10.{100 + i // 250}.{i % 250}.{e + 1}") for e in range(endpoints)]
        ports.append((service(f"svc{i:05d}", [f"10.96.{i // 250}.{i % 250 + 1}"]), eps))
    return plan(*ports)


BASE = plan(
    (service("a", ["10.96.0.1"], node_port=30001), THREE),
    (service("c", ["10.96.0.3"], external_ips=("192.0.2.3",)), THREE),
    (service("v6", ["fd00:10:96::6"]), (endpoint("fd00:10:244:1::6", local=True),)),
)


def test_full_sync_applies_and_foreign_rules_survive_sync_and_cleanup(
    netns: str, mode: Mode
) -> None:
    foreign = "*nat\n:FOREIGN - [0:0]\n-A FOREIGN -j RETURN\n-A PREROUTING -j FOREIGN\nCOMMIT\n"
    ns_run(netns, binary("restore", 4, mode), "--noflush", stdin=foreign)
    b = backend(netns, mode)
    result = b.sync(BASE, None)
    assert result.ok and result.kind == "full" and result.rules_written > 0
    nat = saved(netns, mode)[4]["nat"]  # type: ignore[index]
    assert nat["FOREIGN"] == ["-j RETURN"] and "-j FOREIGN" in nat["PREROUTING"]
    assert any("KUBE-SERVICES" in r for r in nat["PREROUTING"])
    # A second full sync adds no duplicate jump rules.
    assert b.sync(BASE, None).ok
    assert (
        saved(netns, mode)[4]["nat"]["PREROUTING"].count(  # type: ignore[index]
            '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
        )
        == 1
    )
    assert b.cleanup() > 0
    after = saved(netns, mode)
    nat = after[4]["nat"]  # type: ignore[index]
    assert nat["FOREIGN"] == ["-j RETURN"] and nat["PREROUTING"] == ["-j FOREIGN"]
    for family in (4, 6):
        for table, chs in after[family].items():  # type: ignore[attr-defined]
            ours = [ch for ch in chs if ch.startswith("KUBE-") and ch != chains.KUBELET_FIREWALL]
            assert ours == [], f"IPv{family} {table} still has {ours}"


def test_endpoint_change_sends_only_that_services_chains(netns: str, mode: Mode) -> None:
    b = backend(netns, mode)
    assert b.sync(BASE, None).ok
    changed = plan(
        (service("a", ["10.96.0.1"], node_port=30001), THREE[:2]),
        (service("c", ["10.96.0.3"], external_ips=("192.0.2.3",)), THREE),
        (service("v6", ["fd00:10:96::6"]), (endpoint("fd00:10:244:1::6", local=True),)),
    )
    result = b.sync(changed, names(changed))
    assert result.ok and result.kind == "partial"
    sent = [r for r in b.restores if r.kind == "partial"]
    assert [r.family for r in sent] == [4]
    text = sent[0].text
    assert "default/a:http" in text and "default/c:http" not in text
    # Only a's own chains are declared; no dispatch chain is rewritten.
    declared = [line for line in text.splitlines() if line.startswith(":")]
    assert declared and all(
        line.startswith((":KUBE-SVC-", ":KUBE-SEP-", ":KUBE-EXT-")) for line in declared
    )
    assert not any(
        line.startswith(("-A KUBE-SERVICES", "-A KUBE-NODEPORTS")) for line in text.splitlines()
    )
    assert saved(netns, mode) == fresh_full(mode, changed)


def fresh_full(mode: Mode, p: NodePlan) -> dict[int, object]:
    name = f"sp{os.getpid()}-{next(_counter)}-ipt"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert backend(name, mode).sync(p, None).ok
        return saved(name, mode)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_adding_and_removing_a_service_edits_only_its_dispatch_lines(
    netns: str, mode: Mode
) -> None:
    b = backend(netns, mode)
    assert b.sync(BASE, None).ok
    added = plan(
        *[(e.service, e.decision.all_reachable) for e in BASE.entries.values() if e.family == 4],
        (service("b", ["10.96.0.2"], node_port=30002), THREE[:1]),
        (service("v6", ["fd00:10:96::6"]), (endpoint("fd00:10:244:1::6", local=True),)),
    )
    assert b.sync(added, names(added)).kind == "partial"
    text = b.restores[-1].text
    shared = [
        line
        for line in text.splitlines()
        if " KUBE-SERVICES " in line or " KUBE-NODEPORTS " in line
    ]
    assert shared and all(line.startswith("-I ") for line in shared)
    assert ":KUBE-SERVICES" not in text and ":KUBE-NODEPORTS" not in text
    assert saved(netns, mode) == fresh_full(mode, added)

    assert b.sync(BASE, names(added)).kind == "partial"
    text = b.restores[-1].text
    shared = [
        line
        for line in text.splitlines()
        if " KUBE-SERVICES " in line or " KUBE-NODEPORTS " in line
    ]
    assert shared and all(line.startswith("-D ") for line in shared)
    assert saved(netns, mode) == fresh_full(mode, BASE)


def test_series_of_partial_syncs_equals_a_fresh_full_sync(netns: str, mode: Mode) -> None:
    b = backend(netns, mode)
    steps = [
        BASE,
        plan((service("c", ["10.96.0.3"], external_ips=("192.0.2.3",)), ())),
        plan(
            (service("a", ["10.96.0.1"], node_port=30001, external_traffic_policy="Local"), THREE),
            (service("c", ["10.96.0.3"], external_ips=("192.0.2.3",)), THREE[1:]),
            (
                service("v6", ["fd00:10:96::6"], affinity_timeout=60),
                (endpoint("fd00:10:244:1::6"),),
            ),
        ),
        BASE,
    ]
    assert b.sync(steps[0], None).ok
    for before, after in itertools.pairwise(steps):
        result = b.sync(after, names(before, after))
        assert result.ok and result.kind == "partial"
    assert saved(netns, mode) == fresh_full(mode, steps[-1])


def test_partial_sync_input_does_not_grow_with_service_count(netns: str, mode: Mode) -> None:
    # Both sizes are above kube-proxy's 1000-endpoint "large cluster"
    # threshold, so both render without endpoint comments.
    sizes = {}
    for n in (1000, 3000):
        b = backend(netns, mode)
        big = services(n)
        start = time.monotonic()
        assert b.sync(big, None).ok
        full_seconds = time.monotonic() - start
        key = next(k for k in big.entries if k[0].name == "svc00050")
        entry = big.entries[key]
        one_less = dict(big.entries)
        one_less[key] = type(entry)(
            entry.service,
            entry.family,
            type(entry.decision)(
                entry.decision.cluster[:1],  # type: ignore[index]
                None,
                entry.decision.all_reachable[:1],
                "",
                True,
                (),
            ),
        )
        start = time.monotonic()
        result = b.sync(NodePlan(big.node, one_less), {key[0]})
        partial_seconds = time.monotonic() - start
        assert result.ok and result.kind == "partial"
        sizes[n] = len(b.restores[-1].text)
        print(f"{mode} n={n}: full {full_seconds:.3f}s partial {partial_seconds:.3f}s")
        print(f"{mode} n={n}: partial input {sizes[n]} bytes")
        assert b.cleanup() > 0
    assert sizes[1000] == sizes[3000]


def test_rejected_rule_keeps_previous_rules_and_quotes_the_line(netns: str, mode: Mode) -> None:
    b = backend(netns, mode)
    assert b.sync(BASE, None).ok
    before = saved(netns, mode)
    bad = plan(
        (service("a", ["10.96.0.1"], port=99999), THREE),  # --dport 99999: rejected
        (service("c", ["10.96.0.3"], external_ips=("192.0.2.3",)), THREE),
        (service("v6", ["fd00:10:96::6"]), (endpoint("fd00:10:244:1::6", local=True),)),
    )
    result = b.sync(bad, names(BASE, bad))
    assert not result.ok
    assert "--dport 99999" in result.error and "line" in result.error
    v4 = [(r.kind, r.ok) for r in b.restores if r.family == 4][-2:]
    assert v4 == [("partial", False), ("full", False)]  # the fallback full sync was tried
    assert saved(netns, mode) == before


def test_partial_rejected_by_kernel_falls_back_to_a_full_sync(netns: str, mode: Mode) -> None:
    b = backend(netns, mode)
    assert b.sync(BASE, None).ok
    # Someone deletes one of our dispatch rules: the partial sync's -D fails.
    ns_run(netns, binary("", 4, mode), "-t", "nat", "-F", "KUBE-NODEPORTS")
    gone = plan(
        *[
            (e.service, e.decision.all_reachable)
            for e in BASE.entries.values()
            if e.service.name.name != "a"
        ]
    )
    result = b.sync(gone, names(BASE))
    assert result.ok and result.fell_back and result.kind == "full"
    assert "-D KUBE-NODEPORTS" in result.error
    assert saved(netns, mode) == fresh_full(mode, gone)


def test_missing_canary_forces_a_full_sync(netns: str, mode: Mode) -> None:
    b = backend(netns, mode)
    assert b.sync(BASE, None).ok
    assert b.sync(BASE, set()).kind == "partial"
    ns_run(netns, binary("", 6, mode), "-t", "mangle", "-X", chains.KUBE_PROXY_CANARY)
    result = b.sync(BASE, set())
    assert result.ok and result.kind == "full"
