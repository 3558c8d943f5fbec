"""Stale UDP conntrack cleanup: the pure decision (agent/conntrack.py), the
applier against a fake ``conntrack`` (agent/conntrack_apply.py), and the
agent's wiring. No root, no kernel: the real thing is
tests/e2e/test_udp_conntrack.py.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from agent.agent import Agent, AgentOptions
from agent.conntrack import (
    Deletion,
    Flow,
    UdpFrontends,
    frontends_from_json,
    frontends_to_json,
    in_scope,
    parse_flows,
    stale_deletions,
    udp_frontends,
)
from agent.conntrack_apply import CleanupReport, ConntrackCleaner, ConntrackMissing
from agent.metrics import Metrics
from agent.model import Endpoint, NodeInfo, ServicePort, ServicePortName
from agent.plan import NodePlan, ServicePortPlan, plan_port
from agent.sources.events import ObjectEvent
from agent.state import ResolvedPort
from tests.support.agent_fakes import NODE, FakeBackend, FakeClock, endpoint, eslice, service, up

VIP = "10.96.0.10"
VIP6 = "fd00:96::10"
NODE_INFO = NodeInfo(NODE, zone="zone-a")


def svc_port(
    *,
    protocol: str = "UDP",
    ips: tuple[str, ...] = (VIP,),
    port: int = 53,
    node_port: int | None = None,
    external_ips: tuple[str, ...] = (),
    lb_ips: tuple[str, ...] = (),
    name: str = "dns",
    **kw: object,
) -> ServicePort:
    return ServicePort(
        ServicePortName("kube-system", name, "p", protocol),
        ips,
        port,
        node_port=node_port,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        **kw,  # type: ignore[arg-type]
    )


def ep(ip: str, port: int = 5353, **kw: object) -> Endpoint:
    return Endpoint(ip, port, **kw)  # type: ignore[arg-type]


def plan_of(*ports: tuple[ServicePort, Sequence[Endpoint]]) -> NodePlan:
    entries = {}
    for svc, eps in ports:
        for p in plan_port(ResolvedPort(svc, tuple(eps)), NODE_INFO, True):
            entries[p.key] = p
    return NodePlan(NODE_INFO, entries)


def flow(
    dst: str,
    dport: int,
    reply_src: str,
    reply_sport: int,
    *,
    src: str = "192.168.100.10",
    sport: int = 40000,
    family: int = 4,
    protocol: str = "udp",
) -> Flow:
    return Flow(family, protocol, src, dst, sport, dport, reply_src, reply_sport)


# ------------------------------------------------------------------ frontends


def test_udp_frontends_cover_cluster_external_and_lb_ips_and_the_node_port() -> None:
    svc = svc_port(node_port=30053, external_ips=("198.51.100.1",), lb_ips=("203.0.113.9",))
    got = udp_frontends(plan_of((svc, [ep("10.244.1.2")])))
    assert list(got.values()) == [
        UdpFrontends(
            4, (VIP, "198.51.100.1", "203.0.113.9"), 53, 30053, frozenset({"10.244.1.2:5353"})
        )
    ]


@pytest.mark.parametrize(
    ("why", "svc", "endpoints"),
    [
        ("TCP is not cleaned", svc_port(protocol="TCP"), [ep("10.244.1.2")]),
        ("SCTP is not cleaned (upstream neither)", svc_port(protocol="SCTP"), [ep("10.244.1.2")]),
        ("no endpoints: nothing better to send to", svc_port(), []),
        (
            "no serving endpoints: same",
            svc_port(),
            [ep("10.244.1.2", ready=False, serving=False, terminating=True)],
        ),
    ],
)
def test_service_ports_without_cleanup(
    why: str, svc: ServicePort, endpoints: list[Endpoint]
) -> None:
    assert udp_frontends(plan_of((svc, endpoints))) == {}, why


def test_serving_means_serving_whatever_topology_and_termination_say() -> None:
    # Zone hints keep only a1 in the rules; b1 is in another zone and t1 is
    # terminating but serving. Upstream keeps flows to all three.
    hinted = dict(zone_hints=frozenset({"zone-a"}))
    eps = [
        ep("10.244.1.2", **hinted),
        ep("10.244.2.2", zone_hints=frozenset({"zone-b"})),
        ep("10.244.3.2", ready=False, serving=True, terminating=True),
        ep("10.244.4.2", ready=False, serving=False),
    ]
    plan = plan_of((svc_port(), eps))
    (entry,) = plan.entries.values()
    assert [e.ip for e in entry.decision.all_reachable] == ["10.244.1.2"]
    (front,) = udp_frontends(plan).values()
    assert front.serving == {"10.244.1.2:5353", "10.244.2.2:5353", "10.244.3.2:5353"}


def test_dual_stack_service_port_gives_one_frontend_per_family() -> None:
    svc = svc_port(ips=(VIP, VIP6), node_port=30053)
    got = udp_frontends(plan_of((svc, [ep("10.244.1.2"), ep("fd00:10:244::2")])))
    assert sorted((f.family, f.ips, f.serving) for f in got.values()) == [
        (4, (VIP,), frozenset({"10.244.1.2:5353"})),
        (6, (VIP6,), frozenset({"[fd00:10:244::2]:5353"})),
    ]


def test_hand_built_plan_entries_fall_back_to_reachable_endpoints() -> None:
    svc = svc_port()
    (built,) = plan_port(ResolvedPort(svc, (ep("10.244.1.2"),)), NODE_INFO, True)
    bare = ServicePortPlan(built.service, built.family, built.decision)  # no serving list
    got = udp_frontends(NodePlan(NODE_INFO, {bare.key: bare}))
    assert [f.serving for f in got.values()] == [frozenset({"10.244.1.2:5353"})]


# ------------------------------------------------------------------ scope

A = UdpFrontends(4, (VIP,), 53, None, frozenset({"10.244.1.2:5353"}))
A_MOVED = UdpFrontends(4, (VIP,), 53, None, frozenset({"10.244.1.3:5353"}))
B = UdpFrontends(4, ("10.96.0.11",), 53, None, frozenset({"10.244.1.4:5353"}))
KA = (ServicePortName("kube-system", "a", "p", "UDP"), 4)
KB = (ServicePortName("kube-system", "b", "p", "UDP"), 4)


@pytest.mark.parametrize(
    ("why", "old", "new", "want"),
    [
        ("no previous plan: everything", None, {KA: A, KB: B}, (A, B)),
        ("nothing changed: nothing to look at", {KA: A, KB: B}, {KA: A, KB: B}, ()),
        ("endpoint replaced: that port only", {KA: A, KB: B}, {KA: A_MOVED, KB: B}, (A_MOVED,)),
        ("endpoints after none (absent before)", {KB: B}, {KA: A, KB: B}, (A,)),
        ("a port gone: nothing (upstream keeps its flows)", {KA: A, KB: B}, {KB: B}, ()),
    ],
)
def test_in_scope(
    why: str,
    old: dict[tuple[ServicePortName, int], UdpFrontends] | None,
    new: dict[tuple[ServicePortName, int], UdpFrontends],
    want: tuple[UdpFrontends, ...],
) -> None:
    assert in_scope(old, new) == want, why


# ------------------------------------------------------------------ the filter

FRONT = UdpFrontends(
    4, (VIP, "198.51.100.1"), 53, 30053, frozenset({"10.244.1.3:5353", "10.244.1.4:5353"})
)


@pytest.mark.parametrize(
    ("why", "flows", "want"),
    [
        ("DNATed to a serving endpoint: kept", [flow(VIP, 53, "10.244.1.3", 5353)], ()),
        (
            "DNATed to a gone endpoint: deleted",
            [flow(VIP, 53, "10.244.1.2", 5353)],
            (Deletion(4, VIP, 53, "10.244.1.2", 5353),),
        ),
        (
            "same endpoint IP, old target port: deleted (upstream compares ip:port)",
            [flow(VIP, 53, "10.244.1.3", 9999)],
            (Deletion(4, VIP, 53, "10.244.1.3", 9999),),
        ),
        (
            "never DNATed (sent before the rules): reply source is the VIP, deleted",
            [flow(VIP, 53, VIP, 53)],
            (Deletion(4, VIP, 53, VIP, 53),),
        ),
        (
            "external IP frontend",
            [flow("198.51.100.1", 53, "10.244.1.2", 5353)],
            (Deletion(4, "198.51.100.1", 53, "10.244.1.2", 5353),),
        ),
        (
            "NodePort on any node address: filter without a destination",
            [
                flow("192.168.100.1", 30053, "10.244.1.2", 5353),
                flow("10.0.0.1", 30053, "10.0.0.1", 30053),
            ],
            (
                Deletion(4, None, 30053, "10.0.0.1", 30053),
                Deletion(4, None, 30053, "10.244.1.2", 5353),
            ),
        ),
        (
            "NodePort to a serving endpoint: kept",
            [flow("192.168.100.1", 30053, "10.244.1.4", 5353)],
            (),
        ),
        ("another port of the VIP: not ours", [flow(VIP, 54, "10.244.1.2", 5353)], ()),
        ("TCP flows are never touched", [flow(VIP, 53, "10.244.1.2", 5353, protocol="tcp")], ()),
        ("other family: not matched", [flow(VIP, 53, "10.244.1.2", 5353, family=6)], ()),
        (
            "many clients of one dead endpoint: one filter",
            [flow(VIP, 53, "10.244.1.2", 5353, sport=p) for p in (40000, 40001, 40002)],
            (Deletion(4, VIP, 53, "10.244.1.2", 5353),),
        ),
    ],
)
def test_stale_deletions(why: str, flows: list[Flow], want: tuple[Deletion, ...]) -> None:
    assert stale_deletions([FRONT], flows) == want, why


def test_service_port_numbered_like_a_node_port_is_judged_by_its_own_endpoints() -> None:
    other = UdpFrontends(4, ("10.96.0.99",), 30053, None, frozenset({"10.244.9.9:30053"}))
    # Serving for "other": kept, although FRONT's NodePort is 30053 too.
    assert stale_deletions([FRONT, other], [flow("10.96.0.99", 30053, "10.244.9.9", 30053)]) == ()


def test_only_flows_of_frontends_in_scope_are_deleted() -> None:
    other = UdpFrontends(4, ("10.96.0.99",), 53, None, frozenset({"10.244.9.9:5353"}))
    flows = [flow(VIP, 53, "10.244.1.2", 5353), flow("10.96.0.99", 53, "10.244.1.2", 5353)]
    assert stale_deletions([FRONT, other], flows, scope=[other]) == (
        Deletion(4, "10.96.0.99", 53, "10.244.1.2", 5353),
    )


def test_deletion_argv_and_text() -> None:
    d4 = Deletion(4, VIP, 53, "10.244.1.2", 5353)
    assert d4.argv() == [
        "conntrack", "-D", "-f", "ipv4", "-p", "udp", "--orig-dst", VIP,
        "--orig-port-dst", "53", "--reply-src", "10.244.1.2", "--reply-port-src", "5353",
    ]  # fmt: skip
    d6 = Deletion(6, None, 30053, "fd00:10:244::2", 5353)
    assert d6.argv()[:6] == ["conntrack", "-D", "-f", "ipv6", "-p", "udp"]
    assert "--orig-dst" not in d6.argv()
    assert str(d4) == "udp 10.96.0.10:53 reply-src 10.244.1.2:5353"
    assert str(d6) == "udp *:30053 reply-src [fd00:10:244::2]:5353"


# ------------------------------------------------------------------ parsing

LISTING = "\n".join(
    [
        "udp      17 27 src=192.168.100.10 dst=10.96.0.10 sport=40000 dport=53 "
        "src=10.244.1.2 dst=192.168.100.10 sport=5353 dport=40000 [ASSURED] mark=0 use=1",
        "udp      17 29 src=192.168.100.10 dst=10.96.0.10 sport=40001 dport=53 [UNREPLIED] "
        "src=10.96.0.10 dst=192.168.100.10 sport=53 dport=40001 mark=0 zone=3 use=1",
        "tcp      6 431999 ESTABLISHED src=1.1.1.1 dst=2.2.2.2 sport=1 dport=2 "
        "src=2.2.2.2 dst=1.1.1.1 sport=2 dport=1 [ASSURED] mark=0 use=1",
        # -o extended puts the family first.
        "ipv4     2 udp      17 29 src=1.2.3.4 dst=5.6.7.8 sport=1000 dport=2000 "
        "src=5.6.7.8 dst=1.2.3.4 sport=2000 dport=1000 mark=0 use=1",
        "garbage line",
    ]
)


def test_parse_flows_reads_both_tuples_of_default_and_extended_output() -> None:
    flows = parse_flows(LISTING, 4)
    assert flows == [
        Flow(4, "udp", "192.168.100.10", VIP, 40000, 53, "10.244.1.2", 5353),
        Flow(4, "udp", "192.168.100.10", VIP, 40001, 53, VIP, 53),
        Flow(4, "tcp", "1.1.1.1", "2.2.2.2", 1, 2, "2.2.2.2", 2),
        Flow(4, "udp", "1.2.3.4", "5.6.7.8", 1000, 2000, "5.6.7.8", 2000),
    ]


def test_parse_flows_writes_ipv6_as_the_plan_does() -> None:
    line = (
        "udp      17 29 src=fd00:100:0:0::10 dst=fd00:96:0::10 sport=1 dport=53 "
        "src=fd00:10:244:0::2 dst=fd00:100::10 sport=5353 dport=1 mark=0 use=1\n"
    )
    assert parse_flows(line, 6) == [
        Flow(6, "udp", "fd00:100::10", VIP6, 1, 53, "fd00:10:244::2", 5353)
    ]


def test_state_file_round_trip() -> None:
    svc = svc_port(ips=(VIP, VIP6), node_port=30053, external_ips=("198.51.100.1",))
    got = udp_frontends(plan_of((svc, [ep("10.244.1.2"), ep("fd00:10:244::2")])))
    assert frontends_from_json(frontends_to_json(got)) == got
    assert frontends_from_json("nonsense") is None
    assert frontends_from_json([{"key": [1]}]) is None


# ------------------------------------------------------------------ the applier


@dataclass
class FakeConntrack:
    """Answers like conntrack-tools 1.4.7 and records every command."""

    listing: dict[str, str] = field(default_factory=dict)  # family -> stdout
    deleted: dict[str, int] = field(default_factory=dict)  # str(argv) -> count
    calls: list[list[str]] = field(default_factory=list)
    missing: bool = False
    list_fails: bool = False

    def __call__(self, argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        if self.missing:
            raise ConntrackMissing("conntrack: not found (package conntrack)")
        argv = list(argv)
        self.calls.append(argv)
        if argv[1] == "-L":
            if self.list_fails:
                return subprocess.CompletedProcess(
                    argv, 1, "", "conntrack v1.4.7: Operation failed"
                )
            out = self.listing.get(argv[3], "")
            n = len(out.splitlines())
            return subprocess.CompletedProcess(
                argv,
                0,
                out,
                f"conntrack v1.4.7 (conntrack-tools): {n} flow entries have been shown.\n",
            )
        n = self.deleted.get(" ".join(argv), 0)
        return subprocess.CompletedProcess(
            argv,
            0 if n else 1,
            "",
            f"conntrack v1.4.7 (conntrack-tools): {n} flow entries have been deleted.\n",
        )


def _line(dst: str, reply_src: str, reply_sport: int, sport: int = 40000) -> str:
    return (
        f"udp      17 29 src=192.168.100.10 dst={dst} sport={sport} dport=53 "
        f"src={reply_src} dst=192.168.100.10 sport={reply_sport} dport={sport} mark=0 use=1\n"
    )


OLD = plan_of((svc_port(), [ep("10.244.1.2")]))
NEW = plan_of((svc_port(), [ep("10.244.1.3")]))
STALE = Deletion(4, VIP, 53, "10.244.1.2", 5353)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_cleaner_lists_deletes_and_counts_with_upstream_metric_names() -> None:
    fake = FakeConntrack(
        listing={"ipv4": _line(VIP, "10.244.1.2", 5353) + _line(VIP, "10.244.1.3", 5353, 40001)},
        deleted={" ".join(STALE.argv()): 1},
    )
    metrics = Metrics()
    report = ConntrackCleaner(fake, metrics=metrics).cleanup_plans(OLD, NEW)
    assert report.ok and report.in_scope == 1
    assert report.deletions == (STALE,)
    assert report.deleted == {4: 1}
    assert fake.calls == [["conntrack", "-L", "-f", "ipv4", "-p", "udp"], STALE.argv()]
    assert (
        sample(metrics, "kubeproxy_conntrack_reconciler_deleted_entries_total", ip_family="IPv4")
        == 1
    )
    assert (
        sample(
            metrics, "kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4"
        )
        == 1
    )


def test_nothing_deleted_is_not_an_error() -> None:
    # The flow expired between the dump and the delete: exit 1, "0 flow entries".
    fake = FakeConntrack(listing={"ipv4": _line(VIP, "10.244.1.2", 5353)})
    report = ConntrackCleaner(fake).cleanup_plans(OLD, NEW)
    assert report.ok and report.deletions == (STALE,) and report.deleted == {4: 0}


def test_an_unchanged_plan_costs_no_conntrack_call() -> None:
    fake = FakeConntrack()
    report = ConntrackCleaner(fake).cleanup_plans(NEW, NEW)
    assert report.in_scope == 0 and fake.calls == []


def test_a_missing_binary_is_logged_once_counted_each_time_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    cleaner = ConntrackCleaner(FakeConntrack(missing=True), metrics=metrics)
    with caplog.at_level(logging.WARNING, logger="agent.conntrack_apply"):
        first = cleaner.cleanup_plans(None, NEW)
        second = cleaner.cleanup_plans(None, NEW)
    assert not first.ok and not second.ok
    assert "not found" in first.errors[0]
    assert [r.getMessage().split()[0] for r in caplog.records] == ["conntrack_cleanup_skipped"]
    assert (
        sample(metrics, "sliceproxy_conntrack_cleanup_errors_total", reason="missing-binary") == 2
    )


def test_after_a_failed_cleanup_the_next_one_looks_at_everything() -> None:
    fake = FakeConntrack(list_fails=True)
    metrics = Metrics()
    cleaner = ConntrackCleaner(fake, metrics=metrics)
    assert not cleaner.cleanup_plans(OLD, NEW).ok
    assert sample(metrics, "sliceproxy_conntrack_cleanup_errors_total", reason="failed") == 1
    fake.list_fails = False
    # No change between these plans, yet the failed port is checked again.
    assert cleaner.cleanup_plans(NEW, NEW).in_scope == 1
    assert cleaner.cleanup_plans(NEW, NEW).in_scope == 0


def test_ipv6_is_listed_and_deleted_with_family_ipv6() -> None:
    svc = svc_port(ips=(VIP6,))
    old = plan_of((svc, [ep("fd00:10:244::2")]))
    new = plan_of((svc, [ep("fd00:10:244::3")]))
    line = (
        f"udp      17 29 src=fd00:100::10 dst={VIP6} sport=1 dport=53 "
        "src=fd00:10:244::2 dst=fd00:100::10 sport=5353 dport=1 mark=0 use=1\n"
    )
    fake = FakeConntrack(listing={"ipv6": line})
    report = ConntrackCleaner(fake).cleanup_plans(old, new)
    assert fake.calls[0] == ["conntrack", "-L", "-f", "ipv6", "-p", "udp"]
    assert report.deletions == (Deletion(6, VIP6, 53, "fd00:10:244::2", 5353),)
    assert fake.calls[1][:4] == ["conntrack", "-D", "-f", "ipv6"]


# ------------------------------------------------------------------ the agent


class RecordingCleaner(ConntrackCleaner):
    def __init__(self) -> None:
        super().__init__(FakeConntrack())
        self.seen: list[tuple[NodePlan | None, NodePlan]] = []

    def cleanup_plans(self, old: NodePlan | None, new: NodePlan) -> CleanupReport:
        self.seen.append((old, new))
        return super().cleanup_plans(old, new)


def _agent(backend: FakeBackend, cleaner: ConntrackCleaner) -> Agent:
    agent = Agent(
        AgentOptions(node_name=NODE, wait_for=frozenset()),
        backend,
        conntrack=cleaner,
        clock=FakeClock(),
        wall_clock=FakeClock(),
    )
    return agent


def _dns(ip: str) -> list[ObjectEvent]:
    svc = service("dns", ip=VIP)
    svc["spec"]["ports"] = [{"name": "p", "port": 53, "protocol": "UDP", "targetPort": 5353}]
    sl = eslice("dns", [endpoint(ip)])
    sl["ports"] = [{"name": "p", "port": 5353, "protocol": "UDP"}]
    return [up(svc), up(sl)]


def test_agent_cleans_after_successful_syncs_full_and_partial_with_old_and_new_plan() -> None:
    backend, cleaner = FakeBackend(), RecordingCleaner()
    agent = _agent(backend, cleaner)
    for event in _dns("10.244.1.2"):
        agent.handle(event)
    assert agent.sync()
    first_plan = agent.plan
    for event in _dns("10.244.1.3"):
        agent.handle(event)
    assert agent.sync()
    assert [c.changed is None for c in backend.calls] == [True, False]  # full, then partial
    assert [(old, new) for old, new in cleaner.seen] == [
        (None, first_plan),
        (first_plan, agent.plan),
    ]


def test_agent_does_not_clean_after_a_failed_sync() -> None:
    backend, cleaner = FakeBackend(fail_next=1), RecordingCleaner()
    agent = _agent(backend, cleaner)
    for event in _dns("10.244.1.2"):
        agent.handle(event)
    assert not agent.sync()
    assert cleaner.seen == []
    assert agent.sync()
    assert cleaner.seen == [(None, agent.plan)]


def test_a_cleaner_that_raises_does_not_fail_the_sync() -> None:
    class Broken(ConntrackCleaner):
        def cleanup_plans(self, old: NodePlan | None, new: NodePlan) -> CleanupReport:
            raise RuntimeError("bug")

    agent = _agent(FakeBackend(), Broken(FakeConntrack()))
    for event in _dns("10.244.1.2"):
        agent.handle(event)
    assert agent.sync()
    assert agent.plan is not None


# ------------------------------------------------------------------ flags and wiring


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], True),
        (["--conntrack-cleanup"], True),
        (["--conntrack-cleanup=false"], False),
        (["--conntrack-cleanup=0"], False),
        (["--conntrack-cleanup", "true"], True),
    ],
)
def test_conntrack_cleanup_flag_of_run_and_apply(argv: list[str], want: bool) -> None:
    from agent.cli import build_parser
    from agent.commands.run import settings_from_args

    parser = build_parser()
    run_args = parser.parse_args(["run", *argv])
    assert settings_from_args(run_args, env={"NODE_NAME": NODE}).conntrack_cleanup is want
    apply_args = parser.parse_args(["apply", "--state", "-", "--node", NODE, *argv])
    assert apply_args.conntrack_cleanup is want


def test_conntrack_cleanup_flag_refuses_non_booleans() -> None:
    from agent.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--conntrack-cleanup=maybe"])


def test_serve_gives_the_agent_a_cleaner_only_when_it_may_touch_the_kernel() -> None:
    from agent.serve import Deps, RunSettings, _conntrack_cleaner

    metrics = Metrics()
    fake = ConntrackCleaner(FakeConntrack())
    real = RunSettings(node_name=NODE)
    # A registry backend on a real node: the real cleaner.
    assert isinstance(_conntrack_cleaner(real, Deps(), metrics), ConntrackCleaner)
    # Injected (fake) backends never touch the host's conntrack table ...
    assert _conntrack_cleaner(real, Deps(backend=lambda s: FakeBackend()), metrics) is None
    # ... unless a cleaner is injected too.
    assert _conntrack_cleaner(real, Deps(conntrack=lambda m: fake), metrics) is fake
    off = RunSettings(node_name=NODE, conntrack_cleanup=False)
    dry = RunSettings(node_name=NODE, dry_run=True)
    assert _conntrack_cleaner(off, Deps(conntrack=lambda m: fake), metrics) is None
    assert _conntrack_cleaner(dry, Deps(conntrack=lambda m: fake), metrics) is None


def test_an_updated_plan_is_compared_only_on_its_changed_service_ports() -> None:
    """update_plan records what it recomputed; the cleaner then looks at those
    entries alone (a partial sync's cost must not grow with the service
    count) and finds the same stale flow as a comparison of whole plans."""
    from dataclasses import replace

    from agent.plan import entry_changes

    other = svc_port(name="other", ips=("10.96.0.99",))
    old = plan_of((svc_port(), [ep("10.244.1.2")]), (other, [ep("10.244.9.9")]))
    moved = plan_of((svc_port(), [ep("10.244.1.3")]), (other, [ep("10.244.9.9")]))
    new = replace(moved, changed=frozenset({svc_port().name}))
    changes = entry_changes(old, new)
    assert changes is not None and [e.name for e in changes.after] == [svc_port().name]

    listing = {"ipv4": _line(VIP, "10.244.1.2", 5353) + _line(VIP, "10.244.1.3", 5353, 40001)}
    incremental = ConntrackCleaner(FakeConntrack(listing=listing)).cleanup_plans(old, new)
    whole = ConntrackCleaner(FakeConntrack(listing=listing)).cleanup_plans(old, moved)
    assert incremental.in_scope == whole.in_scope == 1
    assert incremental.deletions == whole.deletions == (STALE,)

    fake = FakeConntrack()
    untouched = replace(old, changed=frozenset({other.name}))
    assert ConntrackCleaner(fake).cleanup_plans(old, untouched).in_scope == 0
    assert fake.calls == []
