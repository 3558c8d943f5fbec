"""--nodeport-addresses, resolved once (agent/nodeports.py) for the iptables
and IPVS renderers and the healthCheckNodePort servers: per family, CIDRs of
that family, ``primary`` as the family's primary IP, and "match all" when
the family has no CIDR or a zero one (upstream NewNodePortAddresses)."""

from __future__ import annotations

import re

import pytest

from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.render import render
from agent.backends.ipvs.render import IPVSOptions, render_state
from agent.config import ConfigError
from agent.nodeports import NodePortAddresses, primary_ip
from agent.serve import nodeport_bind_addresses
from tests.golden.iptables_cases import NODE_IP4, NODE_IP6, THREE, plan, service

# Two IPv4 addresses (the first is the primary) and one IPv6 address.
NODE = ("192.168.0.10", "10.0.5.7", "fd00:192::10")
CANDIDATES = (*NODE, "127.0.0.1", "::1", "fd00:5::7")


@pytest.mark.parametrize(
    ("flag", "family", "expected"),
    [
        # No flag: every address (None = match all).
        ((), 4, None),
        ((), 6, None),
        # CIDRs filter their own family only; the other matches all.
        (("10.0.0.0/8",), 4, ("10.0.5.7",)),
        (("10.0.0.0/8",), 6, None),
        (("fd00:5::/64", "192.168.0.0/16"), 6, ("fd00:5::7",)),
        (("fd00:5::/64", "192.168.0.0/16"), 4, ("192.168.0.10",)),
        (("127.0.0.0/8",), 4, ("127.0.0.1",)),
        # A zero CIDR matches all, whatever else is given.
        (("10.0.0.0/8", "0.0.0.0/0"), 4, None),
        (("::/0",), 6, None),
        (("::/0",), 4, None),
        # primary: the first address of each family, not the first two.
        (("primary",), 4, ("192.168.0.10",)),
        (("primary",), 6, ("fd00:192::10",)),
        # primary mixed with CIDRs: the union.
        (("primary", "10.0.0.0/8"), 4, ("192.168.0.10", "10.0.5.7")),
        (("primary", "10.0.0.0/8"), 6, ("fd00:192::10",)),
        # Host bits are accepted (upstream ParseCIDRSloppy).
        (("10.0.5.1/24",), 4, ("10.0.5.7",)),
        # A CIDR matching nothing selects nothing (not "match all").
        (("172.16.0.0/12",), 4, ()),
    ],
)
def test_select(flag: tuple[str, ...], family: int, expected: tuple[str, ...] | None) -> None:
    npa = NodePortAddresses.parse(flag)
    assert npa.match_all(family, NODE) == (expected is None)
    selected = npa.select(CANDIDATES, NODE, family)
    if expected is None:
        assert selected == tuple(a for a in CANDIDATES if (":" in a) == (family == 6))
    else:
        assert selected == expected


def test_primary_without_an_address_of_the_family_matches_all() -> None:
    # server.go adds no host CIDR for a family without a (non-loopback)
    # node IP, so NewNodePortAddresses falls back to the zero CIDR.
    npa = NodePortAddresses.parse(("primary",))
    assert npa.match_all(6, ("192.168.0.10",))
    assert npa.match_all(4, ("127.0.0.1", "10.0.5.7"))
    assert not npa.match_all(4, NODE)


def test_primary_ip_is_the_first_address_of_the_family() -> None:
    assert primary_ip(NODE, 4) == "192.168.0.10"
    assert primary_ip(NODE, 6) == "fd00:192::10"
    assert primary_ip(("192.168.0.10", "not-an-ip"), 6) is None
    assert primary_ip(("::1", "fd00::1"), 6) is None  # loopback first: none


def test_parse_normalizes_and_flags() -> None:
    npa = NodePortAddresses.parse((" 10.0.5.1/24", "", "primary", "10.0.5.0/24"))
    assert npa == NodePortAddresses(cidrs=("10.0.5.0/24",), primary=True)
    assert npa.is_set
    assert not NodePortAddresses.parse(()).is_set


@pytest.mark.parametrize("bad", ["nope", "10.0.0.0/33", "Primary", "10.0.0.300"])
def test_parse_refuses_what_is_neither_a_cidr_nor_primary(bad: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"--nodeport-addresses: {re.escape(repr(bad))} is not a CIDR"
    ):
        NodePortAddresses.parse(("10.0.0.0/8", bad))


def test_ipvs_options_refuse_a_bad_value_up_front() -> None:
    with pytest.raises(ConfigError, match="not a CIDR"):
        IPVSOptions(nodeport_cidrs=("nope",))


# --- the iptables renderer: "primary" used to raise ConfigError ------------


def nodeports_rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.endswith("-j KUBE-NODEPORTS")]


def test_iptables_primary_renders_nodeports_on_the_primary_ip_of_each_family() -> None:
    opts = RenderOptions(nodeport_addresses=("primary",), node_ips=NODE)
    assert opts.nodeport_ips(4) == ("192.168.0.10",)
    assert opts.nodeport_ips(6) == ("fd00:192::10",)
    p = plan((service("np", ["10.96.0.11"], node_port=30080), THREE[:1]))
    rules = [r for r in nodeports_rules(render(p, opts)) if r.startswith("-A KUBE-SERVICES")]
    assert [r.split(" -d ")[1] for r in rules] == [
        "192.168.0.10 -j KUBE-NODEPORTS",
        "fd00:192::10 -j KUBE-NODEPORTS",
    ]
    assert not any("addrtype" in r for r in rules)


def test_iptables_primary_without_node_ips_matches_every_local_address() -> None:
    # `sliceproxy run` knows no node IP before the Node object arrives.
    opts = RenderOptions(nodeport_addresses=("primary",))
    assert opts.nodeport_ips(4) is None
    assert opts.nodeport_ips(6) is None


# --- IPVS: per family, as iptables mode and upstream ------------------------


def test_ipvs_a_family_without_cidrs_serves_nodeports_on_all_its_addresses() -> None:
    p = plan(
        (service("np", ["10.96.0.11"], node_port=30080), THREE),
        (service("np6", ["fd00:96::11"], node_port=30080), ()),
    )
    local = (NODE_IP4, "10.0.5.7", NODE_IP6, "fd00:5::7", "::1")
    state = render_state(p, IPVSOptions(nodeport_cidrs=("10.0.0.0/8",)), local)
    served = {addr for (_p, addr, port) in state.services if port == 30080}
    # Before: the IPv4-only flag also turned IPv6 NodePorts off.
    assert served == {"10.0.5.7", NODE_IP6, "fd00:5::7"}


# --- healthCheckNodePort bind addresses: "primary" used to be node_ips[:2] --


def test_serve_binds_primary_of_each_family_not_the_first_two_addresses() -> None:
    npa = NodePortAddresses.parse(("primary",))
    assert nodeport_bind_addresses(npa, NODE) == ("192.168.0.10", "fd00:192::10")


def test_serve_bind_addresses_follow_cidrs_in_node_order() -> None:
    npa = NodePortAddresses.parse(("10.0.0.0/8", "192.168.0.0/16"))
    # No IPv6 CIDR: every IPv6 node address, as the IPv6 proxier would.
    assert nodeport_bind_addresses(npa, NODE) == NODE
    assert nodeport_bind_addresses(NodePortAddresses.parse(("172.16.0.0/12",)), NODE[:2]) == ()
