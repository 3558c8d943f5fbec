# ruff: noqa: E501 - the fixtures are verbatim iptables-restore lines; wrapping would change them
"""Tests for the iptables packet tracer (tests/support/iptables_tracer.py).

The fixtures are hand-written in kube-proxy's iptables layout: node 192.168.0.10,
pod CIDR 10.244.0.0/16, services in 10.96.0.0/16.  Chain names use readable
suffixes instead of kube-proxy's hashes; the tracer does not care about names.
"""

from __future__ import annotations

import pytest

from tests.support.iptables_tracer import (
    CommentMatch,
    Ruleset,
    TraceError,
    parse_rules,
    trace,
)

NODE_IP = "192.168.0.10"
NODE_IPS = (NODE_IP,)
EXTERNAL_CLIENT = "203.0.113.7"
POD_CLIENT = "10.244.5.5"
WEB_ENDPOINTS = ["10.244.1.2:8080", "10.244.2.3:8080", "10.244.3.4:8080"]

FILTER = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -s 10.244.0.0/16 -m comment --comment "pod egress, stands in for the CNI" -j ACCEPT
-A FORWARD -d 10.244.0.0/24 -m comment --comment "to this node's pods, stands in for the CNI" -j ACCEPT
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-SERVICES -d 10.96.0.30/32 -p tcp -m comment --comment "default/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/empty:http has no endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30030 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/nolocal:http has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30082 -j DROP
-A KUBE-PROXY-FIREWALL -d 198.51.100.50/32 -p tcp -m comment --comment "default/web:http traffic not accepted by KUBE-FW-WEB" -m tcp --dport 80 -j DROP
COMMIT
"""

NAT = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-EXT-LOCAL - [0:0]
:KUBE-EXT-WEB - [0:0]
:KUBE-FW-WEB - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-L1 - [0:0]
:KUBE-SEP-L2 - [0:0]
:KUBE-SEP-S1 - [0:0]
:KUBE-SEP-S2 - [0:0]
:KUBE-SEP-W1 - [0:0]
:KUBE-SEP-W2 - [0:0]
:KUBE-SEP-W3 - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-LOCAL - [0:0]
:KUBE-SVC-STICKY - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-SVL-LOCAL - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SERVICES -d 198.51.100.50/32 -p tcp -m comment --comment "default/web:http loadbalancer IP" -m tcp --dport 80 -j KUBE-FW-WEB
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "default/local:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-LOCAL
-A KUBE-SERVICES -d 10.96.0.40/32 -p tcp -m comment --comment "default/sticky:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-STICKY
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-WEB
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/local:http" -m tcp --dport 30081 -j KUBE-EXT-LOCAL
-A KUBE-FW-WEB -s 203.0.113.0/24 -m comment --comment "default/web:http loadbalancer IP" -j KUBE-EXT-WEB
-A KUBE-FW-WEB -m comment --comment "other traffic to default/web:http will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-EXT-WEB -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-WEB -j KUBE-SVC-WEB
-A KUBE-SVC-WEB ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.1.2:8080" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-W1
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.2.3:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-W2
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.3.4:8080" -j KUBE-SEP-W3
-A KUBE-SEP-W1 -s 10.244.1.2/32 -m comment --comment default/web:http -j KUBE-MARK-MASQ
-A KUBE-SEP-W1 -p tcp -m comment --comment default/web:http -m tcp -j DNAT --to-destination 10.244.1.2:8080
-A KUBE-SEP-W2 -s 10.244.2.3/32 -m comment --comment default/web:http -j KUBE-MARK-MASQ
-A KUBE-SEP-W2 -p tcp -m comment --comment default/web:http -m tcp -j DNAT --to-destination 10.244.2.3:8080
-A KUBE-SEP-W3 -s 10.244.3.4/32 -m comment --comment default/web:http -j KUBE-MARK-MASQ
-A KUBE-SEP-W3 -p tcp -m comment --comment default/web:http -m tcp -j DNAT --to-destination 10.244.3.4:8080
-A KUBE-EXT-LOCAL -s 10.244.0.0/16 -m comment --comment "pod traffic for default/local:http external destinations" -j KUBE-SVC-LOCAL
-A KUBE-EXT-LOCAL -m comment --comment "masquerade LOCAL traffic for default/local:http external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-LOCAL -m comment --comment "route LOCAL traffic for default/local:http external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-LOCAL
-A KUBE-EXT-LOCAL -j KUBE-SVL-LOCAL
-A KUBE-SVC-LOCAL ! -s 10.244.0.0/16 -d 10.96.0.20/32 -p tcp -m comment --comment "default/local:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-LOCAL -m comment --comment "default/local:http -> 10.244.0.5:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-L1
-A KUBE-SVC-LOCAL -m comment --comment "default/local:http -> 10.244.2.6:8080" -j KUBE-SEP-L2
-A KUBE-SVL-LOCAL -m comment --comment "default/local:http -> 10.244.0.5:8080" -j KUBE-SEP-L1
-A KUBE-SEP-L1 -s 10.244.0.5/32 -m comment --comment default/local:http -j KUBE-MARK-MASQ
-A KUBE-SEP-L1 -p tcp -m comment --comment default/local:http -m tcp -j DNAT --to-destination 10.244.0.5:8080
-A KUBE-SEP-L2 -s 10.244.2.6/32 -m comment --comment default/local:http -j KUBE-MARK-MASQ
-A KUBE-SEP-L2 -p tcp -m comment --comment default/local:http -m tcp -j DNAT --to-destination 10.244.2.6:8080
-A KUBE-SVC-STICKY ! -s 10.244.0.0/16 -d 10.96.0.40/32 -p tcp -m comment --comment "default/sticky:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-STICKY -m comment --comment "default/sticky:http -> 10.244.1.7:80" -m recent --name KUBE-SEP-S1 --mask 255.255.255.255 --rsource --rcheck --seconds 10800 --reap -j KUBE-SEP-S1
-A KUBE-SVC-STICKY -m comment --comment "default/sticky:http -> 10.244.2.8:80" -m recent --name KUBE-SEP-S2 --mask 255.255.255.255 --rsource --rcheck --seconds 10800 --reap -j KUBE-SEP-S2
-A KUBE-SVC-STICKY -m comment --comment "default/sticky:http -> 10.244.1.7:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-S1
-A KUBE-SVC-STICKY -m comment --comment "default/sticky:http -> 10.244.2.8:80" -j KUBE-SEP-S2
-A KUBE-SEP-S1 -s 10.244.1.7/32 -m comment --comment default/sticky:http -j KUBE-MARK-MASQ
-A KUBE-SEP-S1 -p tcp -m comment --comment default/sticky:http -m recent --set --name KUBE-SEP-S1 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.7:80
-A KUBE-SEP-S2 -s 10.244.2.8/32 -m comment --comment default/sticky:http -j KUBE-MARK-MASQ
-A KUBE-SEP-S2 -p tcp -m comment --comment default/sticky:http -m recent --set --name KUBE-SEP-S2 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.2.8:80
COMMIT
"""

RULES = FILTER + NAT


@pytest.fixture(scope="module")
def ruleset() -> Ruleset:
    return parse_rules(RULES)


# --------------------------------------------------------------------------- services


def test_cluster_ip_spreads_evenly_over_three_endpoints(ruleset: Ruleset) -> None:
    result = trace(ruleset, source=POD_CLIENT, dest="10.96.0.10", port=80, node_ips=NODE_IPS)

    assert result.endpoints == WEB_ENDPOINTS
    assert result.verdicts == {"ACCEPT"}
    probabilities = result.probabilities()
    assert set(probabilities) == set(WEB_ENDPOINTS)
    for endpoint in WEB_ENDPOINTS:
        assert probabilities[endpoint] == pytest.approx(1 / 3, abs=1e-9)
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert all(o.dnat for o in result.outcomes)
    assert result.visited("nat:KUBE-SVC-WEB")
    assert result.visited("KUBE-SEP-W3")


def test_outcome_lists_chains_in_traversal_order(ruleset: Ruleset) -> None:
    result = trace(ruleset, source=POD_CLIENT, dest="10.96.0.10", port=80, node_ips=NODE_IPS)

    (last,) = [o for o in result.outcomes if o.destination == "10.244.3.4:8080"]
    # A pod's packet is not marked, so filter FORWARD lets it through via the
    # pod-egress rule, after KUBE-FORWARD and KUBE-SERVICES found nothing.
    assert last.chains == (
        "nat:PREROUTING",
        "nat:KUBE-SERVICES",
        "nat:KUBE-SVC-WEB",
        "nat:KUBE-SEP-W3",
        "filter:FORWARD",
        "filter:KUBE-PROXY-FIREWALL",
        "filter:KUBE-FORWARD",
        "filter:KUBE-SERVICES",
        "filter:KUBE-EXTERNAL-SERVICES",
        "nat:POSTROUTING",
        "nat:KUBE-POSTROUTING",
    )
    assert len(last.conditions) == 2  # two statistic coins, both skipped


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("192.168.0.20", True, id="non-pod-source-masqueraded"),
        pytest.param(POD_CLIENT, False, id="pod-source-keeps-address"),
        # A pod reaching itself through the service is hairpinned: masqueraded
        # only on the path that picks its own endpoint.
        pytest.param("10.244.1.2", "mixed", id="hairpin-only-own-endpoint"),
    ],
)
def test_cluster_ip_masquerade_depends_on_source(
    ruleset: Ruleset, source: str, expected: bool | str
) -> None:
    result = trace(ruleset, source=source, dest="10.96.0.10", port=80, node_ips=NODE_IPS)

    assert result.masqueraded == expected
    assert result.endpoints == WEB_ENDPOINTS
    if expected == "mixed":
        masqueraded = {o.destination for o in result.outcomes if o.masquerade}
        assert masqueraded == {"10.244.1.2:8080"}


def test_masquerade_clears_the_mark_in_postrouting(ruleset: Ruleset) -> None:
    result = trace(ruleset, source="192.168.0.20", dest="10.96.0.10", port=80, node_ips=NODE_IPS)

    # KUBE-POSTROUTING xors 0x4000 away before MASQUERADE.
    assert {o.mark for o in result.outcomes} == {0}


@pytest.mark.parametrize(
    ("source", "dest", "local_source"),
    [
        pytest.param(EXTERNAL_CLIENT, NODE_IP, False, id="external-to-node-ip"),
        pytest.param(NODE_IP, NODE_IP, True, id="node-to-own-ip"),
        pytest.param("127.0.0.1", "127.0.0.1", True, id="localhost-is-always-local"),
    ],
)
def test_node_port_reaches_endpoints_via_dst_type_local(
    ruleset: Ruleset, source: str, dest: str, local_source: bool
) -> None:
    result = trace(
        ruleset,
        source=source,
        dest=dest,
        port=30080,
        node_ips=NODE_IPS,
        local_source=local_source,
    )

    assert result.endpoints == WEB_ENDPOINTS
    assert result.masqueraded is True
    assert result.visited("nat:KUBE-NODEPORTS")
    assert result.visited("nat:KUBE-EXT-WEB")


def test_node_port_on_a_foreign_address_is_not_translated(ruleset: Ruleset) -> None:
    # 192.168.0.99 is not this node's address, so `--dst-type LOCAL` fails and
    # the packet is simply forwarded; FORWARD's DROP policy then applies.
    result = trace(
        ruleset, source=EXTERNAL_CLIENT, dest="192.168.0.99", port=30080, node_ips=NODE_IPS
    )

    assert not result.visited("nat:KUBE-NODEPORTS")
    assert [(o.verdict, o.destination, o.dnat) for o in result.outcomes] == [
        ("DROP", "192.168.0.99:30080", False)
    ]


@pytest.mark.parametrize(
    ("source", "local_source", "endpoints", "masqueraded"),
    [
        # External clients keep their source address and only see local endpoints.
        pytest.param(EXTERNAL_CLIENT, False, ["10.244.0.5:8080"], False, id="external"),
        # Pods short-circuit to the cluster-wide chain, unmasqueraded.
        pytest.param(POD_CLIENT, False, ["10.244.0.5:8080", "10.244.2.6:8080"], False, id="pod"),
        # The node itself is masqueraded and also goes cluster-wide.
        pytest.param(NODE_IP, True, ["10.244.0.5:8080", "10.244.2.6:8080"], True, id="node-local"),
    ],
)
def test_external_traffic_policy_local(
    ruleset: Ruleset,
    source: str,
    local_source: bool,
    endpoints: list[str],
    masqueraded: bool,
) -> None:
    result = trace(
        ruleset,
        source=source,
        dest=NODE_IP,
        port=30081,
        node_ips=NODE_IPS,
        local_source=local_source,
    )

    assert result.endpoints == endpoints
    assert result.masqueraded is masqueraded
    assert result.visited("KUBE-EXT-LOCAL")
    assert result.visited("KUBE-SVL-LOCAL") == (source == EXTERNAL_CLIENT)


def test_external_traffic_policy_local_external_path_is_deterministic(ruleset: Ruleset) -> None:
    result = trace(ruleset, source=EXTERNAL_CLIENT, dest=NODE_IP, port=30081, node_ips=NODE_IPS)

    assert result.probabilities() == {"10.244.0.5:8080": pytest.approx(1.0)}
    (only,) = result.outcomes
    assert only.conditions == ()


@pytest.mark.parametrize(
    ("source", "dest", "port", "local_source", "chain"),
    [
        pytest.param(POD_CLIENT, "10.96.0.30", 80, False, "filter:KUBE-SERVICES", id="cluster-ip"),
        pytest.param(
            NODE_IP, "10.96.0.30", 80, True, "filter:KUBE-SERVICES", id="cluster-ip-from-node"
        ),
        pytest.param(
            EXTERNAL_CLIENT, NODE_IP, 30030, False, "filter:KUBE-EXTERNAL-SERVICES", id="nodeport"
        ),
    ],
)
def test_service_without_endpoints_is_rejected_in_filter(
    ruleset: Ruleset, source: str, dest: str, port: int, local_source: bool, chain: str
) -> None:
    result = trace(
        ruleset,
        source=source,
        dest=dest,
        port=port,
        node_ips=NODE_IPS,
        local_source=local_source,
    )

    assert result.verdicts == {"REJECT"}
    assert result.endpoints == []
    assert result.masqueraded is False
    assert result.probabilities() == {"REJECT": pytest.approx(1.0)}
    (outcome,) = result.outcomes
    assert outcome.chains[-1] == chain
    assert not outcome.dnat


def test_local_policy_without_local_endpoints_is_dropped(ruleset: Ruleset) -> None:
    result = trace(ruleset, source=EXTERNAL_CLIENT, dest=NODE_IP, port=30082, node_ips=NODE_IPS)

    assert result.verdicts == {"DROP"}
    assert result.endpoints == []
    # The destination is the node itself, so filter INPUT (not FORWARD) decides.
    (outcome,) = result.outcomes
    assert "filter:INPUT" in outcome.chains
    assert "filter:FORWARD" not in outcome.chains
    assert outcome.chains[-1] == "filter:KUBE-EXTERNAL-SERVICES"


@pytest.mark.parametrize(
    ("source", "verdicts", "endpoints"),
    [
        pytest.param("203.0.113.9", {"ACCEPT"}, WEB_ENDPOINTS, id="allowed-source-range"),
        pytest.param("192.0.2.9", {"DROP"}, [], id="other-source-dropped-by-firewall"),
    ],
)
def test_load_balancer_source_ranges(
    ruleset: Ruleset, source: str, verdicts: set[str], endpoints: list[str]
) -> None:
    result = trace(ruleset, source=source, dest="198.51.100.50", port=80, node_ips=NODE_IPS)

    assert result.verdicts == verdicts
    assert result.endpoints == endpoints


def test_forward_accepts_only_marked_service_traffic(ruleset: Ruleset) -> None:
    # FORWARD's policy is DROP: a NodePort connection from outside is forwarded
    # only because KUBE-MARK-MASQ set 0x4000 and KUBE-FORWARD accepts that mark.
    result = trace(ruleset, source=EXTERNAL_CLIENT, dest=NODE_IP, port=30080, node_ips=NODE_IPS)
    assert result.verdicts == {"ACCEPT"}
    assert all("filter:KUBE-FORWARD" in o.chains for o in result.outcomes)

    unmarked = trace(
        ruleset, source=EXTERNAL_CLIENT, dest="10.244.1.2", port=8080, node_ips=NODE_IPS
    )
    assert unmarked.verdicts == {"DROP"}

    premarked = trace(
        ruleset,
        source=EXTERNAL_CLIENT,
        dest="10.244.1.2",
        port=8080,
        node_ips=NODE_IPS,
        mark=0x4000,
    )
    assert premarked.verdicts == {"ACCEPT"}
    assert premarked.masqueraded is True  # the initial mark reaches KUBE-POSTROUTING too


def test_session_affinity_explores_recent_branches(ruleset: Ruleset) -> None:
    result = trace(ruleset, source=POD_CLIENT, dest="10.96.0.40", port=80, node_ips=NODE_IPS)

    assert result.endpoints == ["10.244.1.7:80", "10.244.2.8:80"]
    by_affinity = {o.affinity: o.destination for o in result.outcomes if o.affinity}
    assert by_affinity == {("KUBE-SEP-S1",): "10.244.1.7:80", ("KUBE-SEP-S2",): "10.244.2.8:80"}
    # A fresh client is balanced 50/50; a returning one is pinned.
    assert result.probabilities() == {
        "10.244.1.7:80": pytest.approx(0.5),
        "10.244.2.8:80": pytest.approx(0.5),
    }
    assert len(result.outcomes) == 4


# --------------------------------------------------------------------------- mechanics


JUMP_VS_GOTO = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CALLER - [0:0]
:CALLEE - [0:0]
-A FORWARD -j CALLER
-A FORWARD -j ACCEPT
-A CALLER {how} CALLEE
-A CALLER -j DROP
-A CALLEE -j RETURN
COMMIT
"""


@pytest.mark.parametrize(
    ("how", "verdict"),
    [
        # -j: RETURN in CALLEE resumes CALLER, which drops.
        pytest.param("-j", "DROP", id="jump-returns-to-caller"),
        # -g: RETURN in CALLEE skips CALLER's remaining rules and resumes FORWARD.
        pytest.param("-g", "ACCEPT", id="goto-returns-past-caller"),
    ],
)
def test_jump_versus_goto(how: str, verdict: str) -> None:
    result = trace(
        JUMP_VS_GOTO.format(how=how),
        source="10.0.0.1",
        dest="10.0.0.2",
        port=80,
        node_ips=NODE_IPS,
    )

    assert result.verdicts == {verdict}


def test_builtin_chain_falls_to_its_policy() -> None:
    rules = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:EMPTY - [0:0]
-A FORWARD -g EMPTY
COMMIT
"""
    result = trace(rules, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=NODE_IPS)

    assert result.verdicts == {"DROP"}
    assert result.outcomes[0].chains == ("filter:FORWARD", "filter:EMPTY")


def test_mark_targets_compose_like_the_kernel() -> None:
    rules = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -j MARK --or-mark 0x4000
-A FORWARD -j MARK --set-xmark 0x10/0xff
-A FORWARD -j MARK --xor-mark 0x1
-A FORWARD -j MARK --and-mark 0xffff00ff
-A FORWARD -m mark --mark 0x4000 -j DROP
COMMIT
"""
    result = trace(rules, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=NODE_IPS, mark=0x3)

    # 0x3 | 0x4000 = 0x4003; low byte set to 0x10 -> 0x4010; ^ 0x1 -> 0x4011;
    # & 0xffff00ff clears bit 0x4000 -> 0x11, so the exact-mark DROP does not fire.
    assert result.verdicts == {"ACCEPT"}
    assert result.outcomes[0].mark == 0x0011


def test_noflush_texts_apply_in_order_with_delete_and_chain_removal(ruleset: Ruleset) -> None:
    # A partial sync: endpoint 10.244.3.4 goes away.  KUBE-SVC-WEB is rewritten
    # whole, KUBE-SEP-W3 is flushed and deleted, and a stale rule is removed.
    partial = """\
*nat
:KUBE-SVC-WEB - [0:0]
:KUBE-SEP-W3 - [0:0]
-X KUBE-SEP-W3
-A KUBE-SVC-WEB ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.1.2:8080" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-W1
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.2.3:8080" -j KUBE-SEP-W2
-D KUBE-SERVICES -d 10.96.0.40/32 -p tcp -m comment --comment "default/sticky:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-STICKY
COMMIT
"""
    after = parse_rules([FILTER + NAT, partial])

    web = trace(after, source=POD_CLIENT, dest="10.96.0.10", port=80, node_ips=NODE_IPS)
    assert web.endpoints == ["10.244.1.2:8080", "10.244.2.3:8080"]
    assert web.probabilities() == {
        "10.244.1.2:8080": pytest.approx(0.5),
        "10.244.2.3:8080": pytest.approx(0.5),
    }
    assert after.chain("nat", "KUBE-SEP-W3") is None
    # The sticky service's dispatch rule is gone: no DNAT, plain forwarding.
    sticky = trace(after, source=POD_CLIENT, dest="10.96.0.40", port=80, node_ips=NODE_IPS)
    assert [(o.destination, o.dnat) for o in sticky.outcomes] == [("10.96.0.40:80", False)]
    # The filter table, untouched by the partial text, is still in force.
    assert after.chain("filter", "FORWARD") == ruleset.chain("filter", "FORWARD")


def test_builtin_declaration_does_not_flush_under_noflush() -> None:
    first = "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -j DROP\nCOMMIT\n"
    second = "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"

    result = trace([first, second], source="10.0.0.1", dest="10.0.0.2", port=1, node_ips=())

    assert result.verdicts == {"DROP"}


def test_uncommitted_changes_are_not_applied() -> None:
    with pytest.raises(TraceError, match="no COMMIT"):
        parse_rules("*filter\n-A FORWARD -j DROP\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j ACCEPT\n-X KUBE-A\nCOMMIT\n",
            "not empty",
            id="delete-non-empty-chain",
        ),
        pytest.param(
            "*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n-X KUBE-B\nCOMMIT\n",
            "still referenced",
            id="delete-referenced-chain",
        ),
        pytest.param(
            "*nat\n:KUBE-A - [0:0]\n-D KUBE-A -j ACCEPT\nCOMMIT\n",
            "no matching rule",
            id="delete-missing-rule",
        ),
        pytest.param(
            "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j KUBE-NOPE\nCOMMIT\n",
            "unknown chain 'KUBE-NOPE'",
            id="jump-to-undeclared-chain",
        ),
        pytest.param(
            "*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n"
            "-A KUBE-B -g KUBE-A\nCOMMIT\n",
            "jump loop",
            id="loop",
        ),
    ],
)
def test_restore_errors_like_iptables_restore(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_rules(text)


def test_delete_matches_rules_by_content_not_spelling() -> None:
    # `-d 10.0.0.1` and `--destination 10.0.0.1/32` are the same rule to the kernel.
    text = """\
*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -d 10.0.0.1 -p tcp --dport 80 -j DROP
-D FORWARD --destination 10.0.0.1/32 -p tcp -m tcp --destination-port 80 -j DROP
COMMIT
"""
    result = trace(text, source="10.0.0.9", dest="10.0.0.1", port=80, node_ips=())

    assert result.verdicts == {"ACCEPT"}


# --------------------------------------------------------------------------- IPv6


NAT6 = """\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXT-WEB6 - [0:0]
:KUBE-SVC-WEB6 - [0:0]
:KUBE-SEP-A6 - [0:0]
:KUBE-SEP-B6 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d fd00:10:96::10/128 -p udp -m comment --comment "kube-system/dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-WEB6
-A KUBE-SERVICES ! -d ::1/128 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p udp -m udp --dport 30053 -j KUBE-EXT-WEB6
-A KUBE-EXT-WEB6 -j KUBE-MARK-MASQ
-A KUBE-EXT-WEB6 -j KUBE-SVC-WEB6
-A KUBE-SVC-WEB6 ! -s fd00:10:244::/48 -d fd00:10:96::10/128 -p udp -m udp --dport 53 -j KUBE-MARK-MASQ
-A KUBE-SVC-WEB6 -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A6
-A KUBE-SVC-WEB6 -j KUBE-SEP-B6
-A KUBE-SEP-A6 -p udp -m udp -j DNAT --to-destination [fd00:10:244:1::2]:5353
-A KUBE-SEP-B6 -p udp -m udp -j DNAT --to-destination [fd00:10:244:2::3]:5353
COMMIT
"""


@pytest.mark.parametrize(
    ("source", "dest", "port", "masqueraded"),
    [
        pytest.param("fd00:10:244:5::5", "fd00:10:96::10", 53, False, id="cluster-ip-from-pod"),
        pytest.param("2001:db8::7", "2001:db8::10", 30053, True, id="nodeport-from-outside"),
    ],
)
def test_ipv6_service(source: str, dest: str, port: int, masqueraded: bool) -> None:
    result = trace(
        NAT6,
        source=source,
        dest=dest,
        port=port,
        protocol="udp",
        node_ips=["192.168.0.10", "2001:db8::10"],
    )

    assert result.endpoints == ["[fd00:10:244:1::2]:5353", "[fd00:10:244:2::3]:5353"]
    assert result.masqueraded is masqueraded


def test_ipv6_loopback_is_excluded_from_nodeports_by_negation() -> None:
    result = trace(
        NAT6, source="::1", dest="::1", port=30053, protocol="udp", node_ips=(), local_source=True
    )

    assert [(o.destination, o.dnat) for o in result.outcomes] == [("[::1]:30053", False)]


def test_protocol_must_match() -> None:
    result = trace(
        NAT6, source="fd00:10:244:5::5", dest="fd00:10:96::10", port=53, node_ips=()
    )  # tcp by default; the service is udp

    assert [o.dnat for o in result.outcomes] == [False]


def test_family_mismatch_is_an_error() -> None:
    with pytest.raises(TraceError, match="IPv4 packet traced through IPv6 rules"):
        trace(NAT6, source="10.0.0.1", dest="10.0.0.2", port=53, node_ips=())


# --------------------------------------------------------------------------- errors


def _one_rule(rule: str, table: str = "filter") -> str:
    chains = "FORWARD" if table == "filter" else "PREROUTING"
    return f"*{table}\n:{chains} ACCEPT [0:0]\n:KUBE-X - [0:0]\n-A {chains} {rule}\nCOMMIT\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(_one_rule("-j CONNMARK --set-mark 1"), "unsupported target 'CONNMARK'",
                     id="unknown-target"),
        pytest.param(_one_rule("-j NOSUCHCHAIN"), "unknown chain 'NOSUCHCHAIN'",
                     id="undefined-chain"),
        pytest.param(_one_rule('-m string --string "GET" -j DROP'),
                     "unsupported match module 'string'", id="unknown-match"),
        pytest.param(_one_rule("-m mark --mark 1 --bogus -j DROP"), "unknown option --bogus",
                     id="unknown-option"),
        pytest.param(_one_rule("--dport 80 -j DROP"), "port options need -p",
                     id="port-without-protocol"),
        pytest.param(_one_rule("-p tcp -m udp --dport 80 -j DROP"), "-m udp needs -p udp",
                     id="module-protocol-mismatch"),
        pytest.param(_one_rule("-j REJECT", table="nat"), "REJECT is not valid in table nat",
                     id="reject-in-nat"),
        pytest.param(_one_rule("-j DNAT --to-destination 10.0.0.1:80"),
                     "DNAT is not valid in table filter", id="dnat-in-filter"),
        pytest.param(_one_rule('-m comment --comment "unterminated -j DROP'),
                     "unterminated quote", id="unterminated-quote"),
        pytest.param(_one_rule("-m conntrack --ctstate NEWISH -j DROP"),
                     "unknown conntrack state", id="bad-ctstate"),
        pytest.param("*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j ACCEPT\nCOMMIT\n",
                     "only the filter and nat tables", id="untraced-table"),
    ],
)  # fmt: skip
def test_unsupported_input_raises_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message) as err:
        parse_rules(text)

    assert "rules[0] line" in str(err.value)


def test_error_names_the_text_and_line_number() -> None:
    good = _one_rule("-j ACCEPT")
    bad = "*filter\n\n# a comment\n-A FORWARD -m frobnicate -j DROP\nCOMMIT\n"

    with pytest.raises(TraceError, match=r"rules\[1\] line 4: .*'-A FORWARD -m frobnicate"):
        parse_rules([good, bad])


def test_dnat_in_postrouting_is_reported_at_trace_time() -> None:
    text = """\
*nat
:POSTROUTING ACCEPT [0:0]
:KUBE-X - [0:0]
-A POSTROUTING -j KUBE-X
-A KUBE-X -j DNAT --to-destination 10.0.0.9:80
COMMIT
"""
    with pytest.raises(TraceError, match="DNAT reached from nat POSTROUTING"):
        trace(text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=())


def test_ipset_is_required_when_a_rule_uses_one() -> None:
    text = _one_rule("-m set --match-set KUBE-CLUSTER-IP dst,dst -j DROP")

    with pytest.raises(TraceError, match="KUBE-CLUSTER-IP"):
        trace(text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=())


# --------------------------------------------------------------------------- parsing


def test_quoted_comments_are_parsed_as_one_argument(ruleset: Ruleset) -> None:
    chain = ruleset.chain("nat", "KUBE-SERVICES")
    assert chain is not None
    comments = [m.text for m in chain.rules[0].matches if isinstance(m, CommentMatch)]
    assert comments == ["default/web:http cluster IP"]


def test_escaped_quote_inside_a_comment() -> None:
    text = _one_rule('-m comment --comment "say \\"hi\\" -j DROP" -j ACCEPT')
    chain = parse_rules(text).chain("filter", "FORWARD")
    assert chain is not None

    (rule,) = chain.rules
    assert [m.text for m in rule.matches if isinstance(m, CommentMatch)] == ['say "hi" -j DROP']
    assert trace(text, source="10.0.0.1", dest="10.0.0.2", port=1, node_ips=()).verdicts == {
        "ACCEPT"
    }


IPTABLES_SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [1204:72240]
:INPUT ACCEPT [12:720]
:OUTPUT ACCEPT [3301:198060]
:POSTROUTING ACCEPT [3301:198060]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-DNS - [0:0]
:KUBE-SEP-DNS1 - [0:0]
[1204:72240] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
[7:420] -A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-DNS
[7:420] -A KUBE-SVC-DNS -m comment --comment "kube-system/kube-dns:dns -> 10.244.0.3:53" -j KUBE-SEP-DNS1
-A KUBE-SEP-DNS1 -p udp -m comment --comment kube-system/kube-dns:dns -m udp -j DNAT --to-destination 10.244.0.3:53 -c 7 420
COMMIT
# Completed on Mon Jan  1 00:00:00 2024
"""


def test_iptables_save_output_with_counters() -> None:
    result = trace(
        IPTABLES_SAVE,
        source=POD_CLIENT,
        dest="10.96.0.10",
        port=53,
        protocol="udp",
        node_ips=NODE_IPS,
    )

    assert result.endpoints == ["10.244.0.3:53"]
    assert result.verdicts == {"ACCEPT"}


def test_negations_and_port_forms() -> None:
    text = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD ! -s 10.0.0.0/8 -j DROP
-A FORWARD -p tcp -m multiport --dports 20:22,80,443 -j REJECT
-A FORWARD -p tcp ! --sport 1000:2000 -j DROP
-A FORWARD -m addrtype ! --src-type LOCAL -m conntrack ! --ctstate NEW -j DROP
COMMIT
"""

    def verdicts(source: str, port: int, source_port: int = 1500) -> frozenset[str]:
        return trace(
            text,
            source=source,
            dest="10.1.1.1",
            port=port,
            node_ips=(),
            source_port=source_port,
        ).verdicts

    assert verdicts("192.0.2.1", 8080) == {"DROP"}  # ! -s
    assert verdicts("10.0.0.1", 21) == {"REJECT"}  # multiport range
    assert verdicts("10.0.0.1", 443) == {"REJECT"}  # multiport list
    assert verdicts("10.0.0.1", 8080, source_port=3000) == {"DROP"}  # ! --sport
    assert verdicts("10.0.0.1", 8080) == {"ACCEPT"}  # NEW: the ctstate rule passes


# --------------------------------------------------------------------------- matches


@pytest.mark.parametrize(
    ("in_iface", "verdict"),
    [
        pytest.param("eth0", "DROP", id="named-interface-matches"),
        pytest.param("eth1", "ACCEPT", id="other-interface"),
        pytest.param(None, "ACCEPT", id="unknown-interface-never-matches"),
    ],
)
def test_in_interface(in_iface: str | None, verdict: str) -> None:
    text = _one_rule("-i eth0 -j DROP")

    result = trace(
        text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=(), in_iface=in_iface
    )

    assert result.verdicts == {verdict}


def test_interface_wildcard_and_negation() -> None:
    text = _one_rule("! -o cni+ -j DROP")

    def verdicts(out_iface: str | None) -> frozenset[str]:
        return trace(
            text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=(), out_iface=out_iface
        ).verdicts

    assert verdicts("cni0") == {"ACCEPT"}
    assert verdicts("eth0") == {"DROP"}
    assert verdicts(None) == {"DROP"}


def test_physdev_never_matches_unless_negated() -> None:
    text = """\
*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m physdev --physdev-is-bridged -j DROP
-A FORWARD -m physdev ! --physdev-is-in -j REJECT
COMMIT
"""
    result = trace(text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=())

    assert result.verdicts == {"REJECT"}


@pytest.mark.parametrize(
    ("dest", "port", "protocol", "verdict"),
    [
        pytest.param("10.96.0.10", 80, "tcp", "DROP", id="ip-port-member"),
        pytest.param("10.96.0.10", 80, "udp", "ACCEPT", id="wrong-protocol"),
        pytest.param("10.96.0.10", 81, "tcp", "ACCEPT", id="wrong-port"),
        pytest.param("10.96.0.11", 53, "udp", "DROP", id="second-member"),
    ],
)
def test_ipset_match_with_dst_dst_flags(dest: str, port: int, protocol: str, verdict: str) -> None:
    text = _one_rule("-m set --match-set KUBE-CLUSTER-IP dst,dst -j DROP")

    result = trace(
        text,
        source="10.0.0.1",
        dest=dest,
        port=port,
        protocol=protocol,
        node_ips=(),
        ipsets={"KUBE-CLUSTER-IP": {"10.96.0.10,tcp:80", "10.96.0.11,udp:53"}},
    )

    assert result.verdicts == {verdict}


def test_ipset_bitmap_port_and_negation() -> None:
    text = _one_rule("-p tcp -m set ! --match-set KUBE-NODE-PORT-TCP dst -j DROP")
    sets = {"KUBE-NODE-PORT-TCP": ["30000-30010", "31000"]}

    def verdicts(port: int) -> frozenset[str]:
        return trace(
            text, source="10.0.0.1", dest="10.0.0.2", port=port, node_ips=(), ipsets=sets
        ).verdicts

    assert verdicts(30005) == {"ACCEPT"}
    assert verdicts(31000) == {"ACCEPT"}
    assert verdicts(32000) == {"DROP"}


def test_statistic_nth_mode_and_zero_probability_branches() -> None:
    text = """\
*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m statistic --mode nth --every 4 --packet 0 -j DROP
-A FORWARD -m statistic --mode random --probability 1.0 -j REJECT
COMMIT
"""
    result = trace(text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=())

    # probability 1.0 leaves no "not taken" path to ACCEPT.
    assert result.probabilities() == {"DROP": pytest.approx(0.25), "REJECT": pytest.approx(0.75)}


def test_recent_set_then_rcheck_on_the_same_path_is_consistent() -> None:
    text = """\
*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m recent --name SEEN --set
-A FORWARD -m recent --name SEEN --rcheck --seconds 60 -j DROP
COMMIT
"""
    result = trace(text, source="10.0.0.1", dest="10.0.0.2", port=80, node_ips=())

    # --set just recorded the client, so --rcheck cannot take the "absent" branch.
    assert [(o.verdict, o.affinity) for o in result.outcomes] == [("DROP", ())]


LOCALNET = """\
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
-A PREROUTING -d 192.168.0.10/32 -p tcp -m tcp --dport 9000 -j DNAT --to-destination 127.0.0.1:8080
-A INPUT -p tcp -m tcp --dport 22 -j SNAT --to-source 192.168.0.10
COMMIT
"""


@pytest.mark.parametrize(
    ("source", "dest", "port", "local_source", "verdict"),
    [
        pytest.param("192.0.2.1", "127.0.0.1", 8080, False, "DROP", id="spoofed-localnet"),
        pytest.param("127.0.0.1", "127.0.0.1", 8080, True, "ACCEPT", id="loopback-via-lo"),
        # conntrack's virtual DNAT state lets the translated connection through.
        pytest.param("192.0.2.1", NODE_IP, 9000, False, "ACCEPT", id="dnat-to-localhost"),
    ],
)
def test_ctstate_dnat_and_local_delivery(
    source: str, dest: str, port: int, local_source: bool, verdict: str
) -> None:
    result = trace(
        LOCALNET,
        source=source,
        dest=dest,
        port=port,
        node_ips=NODE_IPS,
        local_source=local_source,
    )

    assert result.verdicts == {verdict}
    assert all("filter:INPUT" in o.chains for o in result.outcomes)


def test_snat_in_nat_input_counts_as_source_rewrite() -> None:
    result = trace(LOCALNET, source="192.0.2.1", dest=NODE_IP, port=22, node_ips=NODE_IPS)

    assert result.masqueraded is True
    assert result.outcomes[0].chains[-1] == "nat:INPUT"
