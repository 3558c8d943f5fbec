"""Where IPVS mode serves NodePorts: upstream's default is every local address
except kube-ipvs0's (no loopback, no IPv6 link-local). The renderer stays
pure: the applier reads the addresses and passes them in; --node-ip wins;
without either (render, dry-run) the Node object's addresses are used."""

from __future__ import annotations

from collections.abc import Sequence

from agent.backends.ipvs.apply import IPVSBackend
from agent.backends.ipvs.render import IPVSOptions, render_state
from tests.golden.iptables_cases import NODE_IP4, NODE_IP6, THREE, plan, service

LOCAL = ("127.0.0.1", NODE_IP4, "10.0.5.7", "::1", "fe80::1", NODE_IP6, "fd00:5::7")


def nodeport_addresses(state, port: int = 30080) -> set[str]:
    return {addr for (_p, addr, p) in state.services if p == port}


def np_plan():
    return plan(
        (service("np", ["10.96.0.11"], node_port=30080), THREE),
        (service("np6", ["fd00:96::11"], node_port=30080), ()),
    )


def test_local_addresses_passed_in_serve_nodeports_without_loopback_or_link_local() -> None:
    state = render_state(np_plan(), IPVSOptions(), LOCAL)
    assert nodeport_addresses(state) == {NODE_IP4, "10.0.5.7", NODE_IP6, "fd00:5::7"}
    # Node addresses are already local: never bound to kube-ipvs0.
    assert not {NODE_IP4, "10.0.5.7"} & state.bind_addresses


def test_without_local_addresses_the_node_objects_addresses_are_used() -> None:
    state = render_state(np_plan(), IPVSOptions())
    assert nodeport_addresses(state) == {NODE_IP4, NODE_IP6}


def test_node_ip_flag_wins_over_local_addresses() -> None:
    state = render_state(np_plan(), IPVSOptions(nodeport_addresses=("10.0.5.7",)), LOCAL)
    assert nodeport_addresses(state) == {"10.0.5.7"}


def test_nodeport_cidrs_filter_the_local_addresses() -> None:
    opts = IPVSOptions(nodeport_cidrs=("10.0.0.0/8", "fd00:5::/64"))
    assert nodeport_addresses(render_state(np_plan(), opts, LOCAL)) == {"10.0.5.7", "fd00:5::7"}


def test_primary_means_the_nodes_first_address_of_each_family() -> None:
    opts = IPVSOptions(nodeport_cidrs=("primary",))
    assert nodeport_addresses(render_state(np_plan(), opts, LOCAL)) == {NODE_IP4, NODE_IP6}
    opts = IPVSOptions(nodeport_cidrs=("primary", "10.0.0.0/8"))
    assert nodeport_addresses(render_state(np_plan(), opts, LOCAL)) == {
        NODE_IP4,
        NODE_IP6,
        "10.0.5.7",
    }


def test_external_ip_that_is_a_local_address_is_not_bound() -> None:
    p = plan((service("ext", ["10.96.0.12"], external_ips=("10.0.5.7", "203.0.113.9")), THREE))
    state = render_state(p, IPVSOptions(), LOCAL)
    assert "10.0.5.7" not in state.bind_addresses
    assert "203.0.113.9" in state.bind_addresses


class AddressSource:
    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = addresses
        self.calls = 0

    def __call__(self) -> Sequence[str]:
        self.calls += 1
        return self.addresses


def test_the_applier_reads_local_addresses_unless_node_ip_is_given() -> None:
    source = AddressSource(LOCAL)
    backend = IPVSBackend(IPVSOptions(), local_addresses=source)
    assert backend._nodeport_addresses() == LOCAL
    assert source.calls == 1
    pinned = IPVSBackend(IPVSOptions(nodeport_addresses=(NODE_IP4,)), local_addresses=source)
    assert pinned._nodeport_addresses() is None
    assert source.calls == 1  # not even read


def test_render_stays_pure_and_uses_the_node_objects_addresses() -> None:
    source = AddressSource(LOCAL)
    backend = IPVSBackend(IPVSOptions(), local_addresses=source)
    text = backend.render(np_plan())
    assert f"-A -t {NODE_IP4}:30080 -s rr" in text
    assert "10.0.5.7:30080" not in text
    assert source.calls == 0
