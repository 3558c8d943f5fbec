"""IPVS renderer: NodePlan -> virtual/real servers, kube-ipvs0 addresses,
ipsets and iptables rules, following kube-proxy's IPVS proxier."""

from __future__ import annotations

import pytest

from agent.backends.ipvs.model import FLAG_PERSISTENT, FLAG_SCHED_PORT, SchedulerError
from agent.backends.ipvs.render import IPVSOptions, render, render_state
from tests.golden import iptables_cases as cases
from tests.golden import regen_ipvs
from tests.golden.iptables_cases import NODE_IP4, THREE, endpoint, plan, service

OPTS = regen_ipvs.BASE


def reals(state, proto: str, addr: str, port: int) -> list[str]:
    return [str(r) for r in state.services[(proto, addr, port)].reals]


def entries(state, name: str) -> tuple[str, ...]:
    return next(s.entries for s in state.ipsets if s.name == name)


@pytest.mark.parametrize("name", sorted(regen_ipvs.expected()))
def test_golden_file_matches_render(name):
    path = regen_ipvs.GOLDEN / name
    assert path.exists(), f"missing {path}: run .venv/bin/python -m tests.golden.regen"
    assert path.read_text() == regen_ipvs.expected()[name], (
        f"{name} differs: run .venv/bin/python -m tests.golden.regen and review the diff"
    )


def test_render_is_deterministic():
    p = regen_ipvs.example_plan()
    assert render(p, OPTS) == render(p, OPTS)


def test_cluster_ip_gets_every_cluster_endpoint_in_masquerade_mode_and_is_bound():
    state = render_state(plan((service("web", ["10.96.0.10"]), THREE)), OPTS)
    assert reals(state, "TCP", "10.96.0.10", 80) == [
        "10.244.1.2:8080",
        "10.244.2.2:8080",
        "10.244.3.2:8080",
    ]
    assert "10.96.0.10" in state.bind_addresses
    assert entries(state, "KUBE-CLUSTER-IP") == ("10.96.0.10,tcp:80",)
    assert entries(state, "KUBE-IPVS-IPS") == ("10.96.0.10",)
    # Hairpin SNAT only for the endpoint on this node.
    assert entries(state, "KUBE-LOOP-BACK") == ("10.244.1.2,tcp:8080,10.244.1.2",)
    assert "-a -t 10.96.0.10:80 -r 10.244.2.2:8080 -m -w 1" in render(
        plan((service("web", ["10.96.0.10"]), THREE)), OPTS
    )


def test_default_scheduler_is_rr_and_others_pass_through():
    p = plan((service("web", ["10.96.0.10"]), THREE))
    assert render_state(p, OPTS).services[("TCP", "10.96.0.10", 80)].vs.scheduler == "rr"
    for name in ("wrr", "lc", "wlc", "sh", "dh", "sed", "nq"):
        vs = render_state(p, IPVSOptions(scheduler=name)).services[("TCP", "10.96.0.10", 80)].vs
        assert vs.scheduler == name


def test_unknown_scheduler_is_rejected_with_the_known_names():
    with pytest.raises(SchedulerError, match=r"unknown IPVS scheduler 'roundrobin'.*rr, sed"):
        IPVSOptions(scheduler="roundrobin")


def test_mh_scheduler_sets_the_source_port_hash_flag():
    vs = render_state(plan((service("web", ["10.96.0.10"]), THREE)), IPVSOptions(scheduler="mh"))
    assert vs.services[("TCP", "10.96.0.10", 80)].vs.flags & FLAG_SCHED_PORT


def test_client_ip_affinity_is_persistence_with_the_affinity_timeout():
    p = plan((service("s", ["10.96.0.10"], node_port=30080, affinity_timeout=600), THREE))
    state = render_state(p, OPTS)
    for key in (("TCP", "10.96.0.10", 80), ("TCP", NODE_IP4, 30080)):
        vs = state.services[key].vs
        assert vs.flags & FLAG_PERSISTENT
        assert vs.timeout == 600
    assert "-A -t 10.96.0.10:80 -s rr -p 600" in render(p, OPTS)


def test_nodeport_has_one_virtual_server_per_node_address_never_bound():
    p = plan((service("np", ["10.96.0.11"], node_port=30080), THREE))
    state = render_state(p, IPVSOptions(nodeport_addresses=(NODE_IP4, "192.168.1.10")))
    assert ("TCP", NODE_IP4, 30080) in state.services
    assert ("TCP", "192.168.1.10", 30080) in state.services
    assert NODE_IP4 not in state.bind_addresses
    assert entries(state, "KUBE-NODE-PORT-TCP") == ("30080",)
    assert entries(state, "KUBE-NODE-PORT-LOCAL-TCP") == ()


def test_etp_local_uses_local_endpoints_for_external_and_cluster_set_for_cluster_ip():
    state = render_state(cases.CASES[2].build(), OPTS)  # etp-local
    assert cases.CASES[2].name == "etp-local"
    assert reals(state, "TCP", "10.96.0.12", 80) == [
        "10.244.1.2:8080",
        "10.244.2.2:8080",
        "10.244.3.2:8080",
    ]
    assert reals(state, "TCP", "203.0.113.20", 80) == ["10.244.1.2:8080"]
    assert reals(state, "TCP", NODE_IP4, 30443) == ["10.244.1.2:8080"]
    assert entries(state, "KUBE-NODE-PORT-LOCAL-TCP") == ("30443",)
    assert entries(state, "KUBE-LOAD-BALANCER-LOCAL") == ("203.0.113.20,tcp:80",)


def test_etp_local_without_local_endpoint_falls_back_to_cluster_set_like_upstream():
    p = plan(
        (
            service("i", ["10.96.0.12"], node_port=30443, external_traffic_policy="Local"),
            (endpoint("10.244.2.2"), endpoint("10.244.3.2")),
        )
    )
    state = render_state(p, OPTS)
    assert reals(state, "TCP", NODE_IP4, 30443) == ["10.244.2.2:8080", "10.244.3.2:8080"]
    assert "no local endpoint" in state.services[("TCP", NODE_IP4, 30443)].source


def test_itp_local_cluster_ip_gets_only_local_endpoints_or_none():
    with_local = render_state(
        plan((service("d", ["10.96.0.53"], internal_traffic_policy="Local"), THREE)), OPTS
    )
    assert reals(with_local, "TCP", "10.96.0.53", 80) == ["10.244.1.2:8080"]
    without = render_state(
        plan(
            (
                service("d", ["10.96.0.53"], internal_traffic_policy="Local"),
                (endpoint("10.244.2.2"),),
            )
        ),
        OPTS,
    )
    assert reals(without, "TCP", "10.96.0.53", 80) == []


def test_service_without_endpoints_keeps_its_virtual_server_so_ipvs_refuses_connections():
    state = render_state(plan((service("r", ["10.96.0.13"]), ())), OPTS)
    assert reals(state, "TCP", "10.96.0.13", 80) == []
    assert (
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW "
        "-m set --match-set KUBE-IPVS-IPS dst -j REJECT" in state.iptables[4]
    )


def test_terminating_fallback_comes_from_the_plan():
    build, opts = regen_ipvs.EXTRA["terminating-fallback"]
    state = render_state(build(), opts)
    assert reals(state, "TCP", "10.96.0.90", 80) == ["10.244.1.10:8080", "10.244.2.10:8080"]


def test_lb_source_ranges_fill_the_firewall_sets_and_block_node_access_when_not_covered():
    p = plan(
        (
            service(
                "shop",
                ["10.96.0.30"],
                load_balancer_ips=("203.0.113.10",),
                load_balancer_source_ranges=("198.51.100.0/24", "192.0.2.7/32"),
            ),
            THREE,
        )
    )
    state = render_state(p, OPTS)
    assert entries(state, "KUBE-LOAD-BALANCER-FW") == ("203.0.113.10,tcp:80",)
    assert entries(state, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == (
        "203.0.113.10,tcp:80,192.0.2.7",
        "203.0.113.10,tcp:80,198.51.100.0/24",
    )
    assert entries(state, "KUBE-LOAD-BALANCER-SOURCE-IP") == ()
    assert (
        "-A KUBE-IPVS-OUT-FILTER -s 203.0.113.10 -m ipvs --vaddr 203.0.113.10 --vproto tcp "
        "--vport 80 -j DROP" in state.iptables[4]
    )
    assert (
        "--match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL"
        in (state.iptables[4])
    )


def test_lb_source_range_covering_the_node_allows_node_access():
    p = plan(
        (
            service(
                "shop",
                ["10.96.0.30"],
                load_balancer_ips=("203.0.113.10",),
                load_balancer_source_ranges=("192.168.0.0/16",),
            ),
            THREE,
        )
    )
    state = render_state(p, OPTS)
    assert entries(state, "KUBE-LOAD-BALANCER-SOURCE-IP") == ("203.0.113.10,tcp:80,203.0.113.10",)
    assert "KUBE-IPVS-OUT-FILTER -s" not in state.iptables[4]


def test_external_ip_that_is_a_node_address_is_not_bound():
    p = plan((service("x", ["10.96.0.14"], external_ips=(NODE_IP4, "192.0.2.50")), THREE))
    state = render_state(p, OPTS)
    assert ("TCP", NODE_IP4, 80) in state.services
    assert NODE_IP4 not in state.bind_addresses
    assert "192.0.2.50" in state.bind_addresses
    assert entries(state, "KUBE-EXTERNAL-IP") == ("192.0.2.50,tcp:80", f"{NODE_IP4},tcp:80")


def test_udp_service_uses_udp_virtual_servers_and_nodeport_set():
    build, opts = regen_ipvs.EXTRA["udp-nodeport"]
    state = render_state(build(), opts)
    assert ("UDP", "10.96.0.53", 53) in state.services
    assert entries(state, "KUBE-NODE-PORT-UDP") == ("30053",)
    assert "-A -u 10.96.0.53:53 -s rr" in render(build(), opts)


def test_ipv6_uses_kube_6_sets_inet6_and_ip6tables_text():
    state = render_state(cases.CASES[9].build(), OPTS)
    assert cases.CASES[9].name == "ipv6"
    six = [s for s in state.ipsets if s.family == 6]
    assert all(s.name.startswith("KUBE-6-") and len(s.name) <= 31 for s in six)
    assert any("family inet6" in s.create_line() for s in six)
    assert "-s ::1/128 -j RETURN" in state.iptables[6]


def test_masquerade_rule_follows_cluster_cidr_and_masquerade_all():
    p = plan((service("web", ["10.96.0.10"]), THREE))
    no_cidr = render_state(p, IPVSOptions()).iptables[4]
    assert "--match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ" in no_cidr
    cidr = render_state(p, IPVSOptions(cluster_cidrs=("10.244.0.0/16",))).iptables[4]
    assert "--match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in cidr
    every = render_state(p, IPVSOptions(masquerade_all=True)).iptables[4]
    assert "--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in every


def test_iptables_text_replaces_only_our_chains_and_jumps_are_listed_separately():
    state = render_state(plan((service("web", ["10.96.0.10"]), THREE)), OPTS)
    text = state.iptables[4]
    assert "-A PREROUTING" not in text and "-A INPUT" not in text
    # One list for every family (each family's restore inserts those it lacks).
    assert {(j.table, j.source, j.target) for j in state.jumps} >= {
        ("nat", "PREROUTING", "KUBE-SERVICES"),
        ("nat", "OUTPUT", "KUBE-SERVICES"),
        ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
        ("filter", "INPUT", "KUBE-IPVS-FILTER"),
        ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER"),
    }
