"""diff(desired, current) -> IPVS operations: minimal, ordered, draining TCP
real servers gracefully, deleting UDP/SCTP ones at once, leaving foreign
virtual servers alone."""

from __future__ import annotations

from agent.backends.ipvs.diff import diff
from agent.backends.ipvs.model import (
    FLAG_HASHED,
    FLAG_PERSISTENT,
    CurrentRealServer,
    CurrentService,
    DesiredService,
    RealServer,
    VirtualServer,
)

VS = VirtualServer("TCP", "10.96.0.10", 80)
UDP_VS = VirtualServer("UDP", "10.96.0.53", 53)
SCTP_VS = VirtualServer("SCTP", "10.96.0.54", 9)
A = RealServer("10.244.1.2", 8080)
B = RealServer("10.244.2.2", 8080)


def want(vs: VirtualServer, *reals: RealServer) -> dict:
    return {vs.key: DesiredService(vs, tuple(reals))}


def have(vs: VirtualServer, *reals: CurrentRealServer) -> dict:
    return {vs.key: CurrentService(vs, tuple(reals))}


def cur(rs: RealServer, weight: int = 1, active: int = 0, inactive: int = 0) -> CurrentRealServer:
    return CurrentRealServer(rs.address, rs.port, weight, active, inactive)


def kinds(result) -> list[str]:
    return [op.kind for op in result.ops]


def test_new_virtual_server_is_added_before_its_real_servers():
    result = diff(want(VS, A, B), {})
    assert kinds(result) == ["add-service", "add-dest", "add-dest"]
    assert [op.dest for op in result.ops[1:]] == [A, B]


def test_identical_state_needs_no_operation():
    result = diff(want(VS, A, B), have(VS, cur(A), cur(B)))
    assert result.ops == ()
    assert result.draining == {}


def test_only_the_new_real_server_is_added():
    result = diff(want(VS, A, B), have(VS, cur(A)))
    assert [(op.kind, op.dest) for op in result.ops] == [("add-dest", B)]


def test_tcp_real_server_with_connections_is_set_to_weight_zero_and_tracked():
    result = diff(want(VS, A), have(VS, cur(A), cur(B, active=2, inactive=1)), now=100.0)
    assert [(op.kind, op.dest) for op in result.ops] == [("update-dest", RealServer(*B.key, 0))]
    assert result.draining == {(VS.key, B.key): 100.0}


def test_draining_real_server_already_at_weight_zero_is_left_alone_and_keeps_its_start():
    result = diff(
        want(VS, A),
        have(VS, cur(A), cur(B, weight=0, active=1)),
        draining_since={(VS.key, B.key): 50.0},
        now=200.0,
    )
    assert result.ops == ()
    assert result.draining == {(VS.key, B.key): 50.0}


def test_drained_real_server_is_deleted_once_connections_reach_zero():
    result = diff(
        want(VS, A),
        have(VS, cur(A), cur(B, weight=0)),
        draining_since={(VS.key, B.key): 50.0},
        now=60.0,
    )
    assert [(op.kind, op.dest.key) for op in result.ops] == [("del-dest", B.key)]
    assert result.draining == {}


def test_tcp_real_server_without_connections_is_deleted_at_once():
    result = diff(want(VS, A), have(VS, cur(A), cur(B)))
    assert [(op.kind, op.dest.key) for op in result.ops] == [("del-dest", B.key)]


def test_drain_timeout_deletes_a_real_server_that_still_has_connections():
    result = diff(
        want(VS, A),
        have(VS, cur(A), cur(B, weight=0, active=1)),
        draining_since={(VS.key, B.key): 0.0},
        now=901.0,
        max_drain=900.0,
    )
    assert [(op.kind, op.dest.key) for op in result.ops] == [("del-dest", B.key)]
    assert "timeout" in result.ops[0].reason
    assert result.draining == {}


def test_no_drain_bound_waits_for_connections_like_upstream():
    result = diff(
        want(VS, A),
        have(VS, cur(A), cur(B, weight=0, active=1)),
        draining_since={(VS.key, B.key): 0.0},
        now=10**9,
        max_drain=None,
    )
    assert result.ops == ()
    assert (VS.key, B.key) in result.draining


def test_udp_real_server_is_deleted_at_once_even_with_connections():
    result = diff(want(UDP_VS, A), have(UDP_VS, cur(A), cur(B, active=0, inactive=7)))
    assert [(op.kind, op.dest.key) for op in result.ops] == [("del-dest", B.key)]
    assert result.draining == {}


def test_sctp_real_server_is_deleted_at_once_even_with_connections():
    result = diff(want(SCTP_VS, A), have(SCTP_VS, cur(A), cur(B, active=3)))
    assert [(op.kind, op.dest.key) for op in result.ops] == [("del-dest", B.key)]


def test_draining_real_server_back_in_the_plan_gets_its_weight_back():
    result = diff(
        want(VS, A, B),
        have(VS, cur(A), cur(B, weight=0, active=1)),
        draining_since={(VS.key, B.key): 5.0},
    )
    assert [(op.kind, op.dest) for op in result.ops] == [("update-dest", B)]
    assert result.ops[0].reason == "back in the plan"
    assert result.draining == {}


def test_scheduler_change_updates_the_service_in_place():
    wrr = VirtualServer("TCP", "10.96.0.10", 80, "wrr")
    result = diff(want(wrr, A), have(VS, cur(A)))
    assert kinds(result) == ["update-service"]
    assert result.ops[0].vs.scheduler == "wrr"
    assert "scheduler rr -> wrr" in result.ops[0].reason


def test_persistence_added_and_timeout_changed_update_the_service():
    sticky = VirtualServer("TCP", "10.96.0.10", 80, "rr", FLAG_PERSISTENT, 600)
    added = diff(want(sticky, A), have(VS, cur(A)))
    assert kinds(added) == ["update-service"]
    assert "not persistent -> persistent 600s" in added.ops[0].reason

    longer = VirtualServer("TCP", "10.96.0.10", 80, "rr", FLAG_PERSISTENT, 10800)
    changed = diff(want(longer, A), have(sticky, cur(A)))
    assert kinds(changed) == ["update-service"]
    assert "persistent 600s -> persistent 10800s" in changed.ops[0].reason

    removed = diff(want(VS, A), have(sticky, cur(A)))
    assert kinds(removed) == ["update-service"]
    assert removed.ops[0].vs.flags == 0


def test_kernel_hashed_flag_is_not_a_difference():
    hashed = VirtualServer("TCP", "10.96.0.10", 80, "rr", FLAG_HASHED)
    assert diff(want(VS, A), have(hashed, cur(A))).ops == ()


def test_foreign_virtual_server_is_never_touched():
    foreign = VirtualServer("TCP", "192.168.1.1", 443)
    result = diff(want(VS, A), {**have(VS, cur(A)), **have(foreign, cur(B, active=4))})
    assert result.ops == ()


def test_virtual_server_on_kube_ipvs0_address_that_left_the_plan_is_deleted():
    gone = VirtualServer("TCP", "10.96.0.99", 80)
    result = diff({}, have(gone, cur(A)), owned_addresses={"10.96.0.99"})
    assert [(op.kind, op.vs.key) for op in result.ops] == [("del-service", gone.key)]


def test_previously_applied_nodeport_virtual_server_is_deleted():
    nodeport = VirtualServer("TCP", "172.18.0.2", 30080)
    foreign = VirtualServer("TCP", "172.18.0.2", 443)
    current = {**have(nodeport, cur(A)), **have(foreign)}
    result = diff({}, current, owned_keys={nodeport.key}, owned_addresses={"10.96.0.10"})
    assert [(op.kind, op.vs.key) for op in result.ops] == [("del-service", nodeport.key)]


def test_operations_are_ordered_adds_then_drains_then_service_deletions():
    new = VirtualServer("TCP", "10.96.0.11", 80)
    old = VirtualServer("TCP", "10.96.0.12", 80)
    desired = {**want(VS, A), **want(new, B)}
    current = {**have(VS, cur(A), cur(B, active=1)), **have(old)}
    result = diff(desired, current, owned_addresses={"10.96.0.12"})
    assert kinds(result) == ["add-service", "add-dest", "update-dest", "del-service"]
