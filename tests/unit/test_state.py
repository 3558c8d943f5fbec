"""ClusterState: slice merging as kube-proxy does it, validation, and the
changed-keys contract that partial syncs depend on."""

from __future__ import annotations

from typing import Any

import pytest

from agent.model import ServicePortName
from agent.sources.events import ObjectEvent
from agent.state import ClusterState

NODE = "node-a"


def service(
    name: str = "web",
    ns: str = "default",
    ips: tuple[str, ...] = ("10.96.0.10",),
    ports: tuple[dict[str, Any], ...] = ({"name": "http", "port": 80},),
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIPs": list(ips), "ports": list(ports), **spec},
    }


def endpoint(ip: str, node: str = "node-b", **conditions: bool) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node, "conditions": conditions}


def eslice(
    name: str,
    service_name: str | None = "web",
    endpoints: tuple[dict[str, Any], ...] = (),
    ports: tuple[dict[str, Any], ...] = ({"name": "http", "port": 8080, "protocol": "TCP"},),
    address_type: str = "IPv4",
    ns: str = "default",
) -> dict[str, Any]:
    labels = {} if service_name is None else {"kubernetes.io/service-name": service_name}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": list(ports),
    }


def up(obj: dict[str, Any]) -> ObjectEvent:
    return ObjectEvent("upsert", obj["kind"], obj, "test")


def down(obj: dict[str, Any]) -> ObjectEvent:
    return ObjectEvent("delete", obj["kind"], obj, "test")


HTTP = ServicePortName("default", "web", "http", "TCP")


def keys(state: ClusterState, name: ServicePortName = HTTP) -> list[str]:
    resolved = state.service_port(name)
    assert resolved is not None
    return [e.key for e in resolved.endpoints]


@pytest.fixture
def state() -> ClusterState:
    s = ClusterState(NODE)
    s.apply(up(service()))
    return s


def test_slices_of_one_service_are_merged(state: ClusterState) -> None:
    state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1"),))))
    state.apply(up(eslice("web-2", endpoints=(endpoint("10.0.0.2"),))))
    assert keys(state) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_duplicate_endpoint_across_slices_first_kept(state: ClusterState) -> None:
    state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1", "node-b"),))))
    state.apply(up(eslice("web-2", endpoints=(endpoint("10.0.0.1", "node-c"),))))
    resolved = state.service_port(HTTP)
    assert resolved is not None
    assert [(e.key, e.node_name) for e in resolved.endpoints] == [("10.0.0.1:8080", "node-b")]


def test_duplicate_later_running_copy_beats_terminating(state: ClusterState) -> None:
    old = endpoint("10.0.0.1", "node-b", ready=False, serving=True, terminating=True)
    new = endpoint("10.0.0.1", "node-c", ready=True)
    state.apply(up(eslice("web-1", endpoints=(old,))))
    state.apply(up(eslice("web-2", endpoints=(new,))))
    resolved = state.service_port(HTTP)
    assert resolved is not None
    (only,) = resolved.endpoints
    assert (only.node_name, only.ready, only.terminating) == ("node-c", True, False)


def test_merge_does_not_depend_on_arrival_order() -> None:
    a = eslice("web-1", endpoints=(endpoint("10.0.0.1", "node-b"),))
    b = eslice("web-2", endpoints=(endpoint("10.0.0.1", "node-c"),))
    one, two = ClusterState(NODE), ClusterState(NODE)
    for s, order in ((one, (a, b)), (two, (b, a))):
        s.apply(up(service()))
        for sl in order:
            s.apply(up(sl))
    assert one.service_port(HTTP) == two.service_port(HTTP)


def test_slice_of_another_service_ignored(state: ClusterState) -> None:
    state.apply(up(eslice("api-1", service_name="api", endpoints=(endpoint("10.0.0.9"),))))
    assert keys(state) == []


def test_slice_in_another_namespace_ignored(state: ClusterState) -> None:
    state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.9"),), ns="other")))
    assert keys(state) == []


def test_slice_without_service_label_ignored_and_listed(state: ClusterState) -> None:
    changed = state.apply(up(eslice("stray", service_name=None, endpoints=(endpoint("10.0.0.9"),))))
    assert changed == set()
    assert keys(state) == []
    assert [s.object for s in state.skipped()] == ["EndpointSlice default/stray"]


def test_port_matched_by_name_and_protocol(state: ClusterState) -> None:
    ports = (
        {"name": "http", "port": 8080, "protocol": "UDP"},
        {"name": "other", "port": 9090, "protocol": "TCP"},
    )
    state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1"),), ports=ports)))
    assert keys(state) == []


def test_slice_port_without_number_ignored(state: ClusterState) -> None:
    ports = ({"name": "http", "protocol": "TCP"},)
    state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1"),), ports=ports)))
    assert keys(state) == []


def test_only_first_address_used(state: ClusterState) -> None:
    e = {"addresses": ["10.0.0.1", "10.0.0.2"], "conditions": {}}
    state.apply(up(eslice("web-1", endpoints=(e,))))
    assert keys(state) == ["10.0.0.1:8080"]


def test_condition_defaults() -> None:
    s = ClusterState(NODE)
    s.apply(up(service()))
    s.apply(up(eslice("web-1", endpoints=({"addresses": ["10.0.0.1"]},))))
    resolved = s.service_port(HTTP)
    assert resolved is not None
    (e,) = resolved.endpoints
    assert (e.ready, e.serving, e.terminating) == (True, True, False)


def test_is_local_from_node_name(state: ClusterState) -> None:
    state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1", NODE), endpoint("10.0.0.2")))))
    resolved = state.service_port(HTTP)
    assert resolved is not None
    assert [e.is_local for e in resolved.endpoints] == [True, False]


def test_hints_read() -> None:
    s = ClusterState(NODE)
    s.apply(up(service()))
    e = endpoint("10.0.0.1")
    e["hints"] = {"forZones": [{"name": "z1"}, {"name": "z2"}], "forNodes": [{"name": "n1"}]}
    s.apply(up(eslice("web-1", endpoints=(e,))))
    resolved = s.service_port(HTTP)
    assert resolved is not None
    (got,) = resolved.endpoints
    assert got.zone_hints == {"z1", "z2"} and got.node_hints == {"n1"}


def test_ipv6_slices_kept_fqdn_ignored() -> None:
    s = ClusterState(NODE)
    s.apply(up(service(ips=("10.96.0.10", "fd00::10"))))
    s.apply(up(eslice("web-v6", endpoints=(endpoint("fd00::1"),), address_type="IPv6")))
    s.apply(up(eslice("web-fqdn", endpoints=({"addresses": ["a.example"]},), address_type="FQDN")))
    assert keys(s) == ["[fd00::1]:8080"]
    assert s.problems == []


def test_apply_reports_changed_service_ports(state: ClusterState) -> None:
    two_ports = service(ports=({"name": "http", "port": 80}, {"name": "admin", "port": 81}))
    changed = state.apply(up(two_ports))
    assert changed == {ServicePortName("default", "web", "admin", "TCP")}
    changed = state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1"),))))
    assert changed == {HTTP}
    # The same slice again changes nothing.
    assert state.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1"),)))) == set()
    assert state.apply(down(eslice("web-1"))) == {HTTP}
    assert state.apply(down(two_ports)) == {HTTP, ServicePortName("default", "web", "admin", "TCP")}
    assert state.all_names() == set()


def test_slice_before_service_counts_when_service_arrives() -> None:
    s = ClusterState(NODE)
    assert s.apply(up(eslice("web-1", endpoints=(endpoint("10.0.0.1"),)))) == set()
    assert s.apply(up(service())) == {HTTP}
    assert keys(s) == ["10.0.0.1:8080"]


def test_slice_moving_to_another_service_changes_both() -> None:
    s = ClusterState(NODE)
    s.apply(up(service()))
    s.apply(up(service(name="api", ips=("10.96.0.11",))))
    s.apply(up(eslice("x-1", service_name="web", endpoints=(endpoint("10.0.0.1"),))))
    changed = s.apply(up(eslice("x-1", service_name="api", endpoints=(endpoint("10.0.0.1"),))))
    assert changed == {HTTP, ServicePortName("default", "api", "http", "TCP")}


def test_node_zone_change_changes_every_service_port(state: ClusterState) -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {}}}
    assert state.apply(up(node)) == set()  # no zone before, none now
    node["metadata"]["labels"] = {"topology.kubernetes.io/zone": "z1"}
    assert state.apply(up(node)) == {HTTP}
    assert state.node.zone == "z1"
    other = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b", "labels": {}}}
    assert state.apply(up(other)) == set()
    assert state.node.zone == "z1"


@pytest.mark.parametrize(
    ("labels", "spec", "proxy_name", "reason"),
    [
        ({}, {"clusterIPs": ["None"]}, "", "headless (clusterIP None)"),
        ({}, {"type": "ExternalName", "externalName": "x.example"}, "", "type ExternalName"),
        ({"service.kubernetes.io/headless": ""}, {}, "", "headless"),
        ({"service.kubernetes.io/service-proxy-name": "other"}, {}, "", "owned by service proxy"),
        ({}, {}, "sliceproxy", "no service.kubernetes.io/service-proxy-name label"),
    ],
)
def test_skipped_services(
    labels: dict[str, str], spec: dict[str, Any], proxy_name: str, reason: str
) -> None:
    s = ClusterState(NODE, proxy_name=proxy_name)
    obj = service(labels=labels)
    obj["spec"].update(spec)
    assert s.apply(up(obj)) == set()
    (skip,) = s.skipped()
    assert skip.object == "Service default/web"
    assert reason in skip.reason


def test_own_proxy_name_is_owned() -> None:
    s = ClusterState(NODE, proxy_name="sliceproxy")
    labels = {"service.kubernetes.io/service-proxy-name": "sliceproxy"}
    assert s.apply(up(service(labels=labels))) == {HTTP}


def test_load_balancer_ip_mode_respected() -> None:
    s = ClusterState(NODE)
    obj = service(type="LoadBalancer")
    obj["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "203.0.113.1"},
                {"ip": "203.0.113.2", "ipMode": "VIP"},
                {"ip": "203.0.113.3", "ipMode": "Proxy"},
                {"hostname": "lb.example"},
            ]
        }
    }
    s.apply(up(obj))
    resolved = s.service_port(HTTP)
    assert resolved is not None
    assert resolved.service.load_balancer_ips == ("203.0.113.1", "203.0.113.2")


def test_affinity_default_timeout() -> None:
    s = ClusterState(NODE)
    s.apply(up(service(sessionAffinity="ClientIP")))
    resolved = s.service_port(HTTP)
    assert resolved is not None and resolved.service.affinity_timeout == 10800


def test_invalid_update_keeps_previous_version(state: ClusterState) -> None:
    bad = service(ports=({"name": "http", "port": 70000},))
    assert state.apply(up(bad)) == set()
    assert state.service_port(HTTP) is not None
    (problem,) = state.problems
    assert (
        str(problem)
        == "test Service default/web: spec.ports[0].port: port 70000 out of range 1-65535"
    )


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (service(ips=("10.96.0.300",)), "spec.clusterIPs[0]"),
        (service(ports=({"name": "http", "port": "eighty"},)), "spec.ports[0].port"),
        (
            service(ports=({"name": "http", "port": 80, "protocol": "ICMP"},)),
            "spec.ports[0].protocol",
        ),
        (service(externalIPs=["not-an-ip"]), "spec.externalIPs[0]"),
        (service(loadBalancerSourceRanges=["10.0.0.0/33"]), "spec.loadBalancerSourceRanges[0]"),
        ({"kind": "Service", "apiVersion": "v1", "metadata": {}}, "metadata.name"),
        (eslice("web-1", address_type="IPX"), "addressType"),
        (eslice("web-1", ports=({"name": "http", "port": 0x10000},)), "ports[0].port"),
    ],
)
def test_invalid_objects_reported_and_skipped(obj: dict[str, Any], field: str) -> None:
    s = ClusterState(NODE)
    assert s.apply(up(obj)) == set()
    (problem,) = s.problems
    assert problem.field == field


def test_bad_endpoint_skipped_rest_of_slice_kept(state: ClusterState) -> None:
    bad = ({"addresses": []}, {"addresses": ["300.1.1.1"]}, endpoint("fd00::1"))
    state.apply(up(eslice("web-1", endpoints=(*bad, endpoint("10.0.0.1")))))
    assert keys(state) == ["10.0.0.1:8080"]
    assert [p.field for p in state.problems] == [
        "endpoints[0].addresses",
        "endpoints[1].addresses[0]",
        "endpoints[2].addresses[0]",
    ]
    assert [p.reason for p in state.problems] == ["no-address", "invalid-ip", "wrong-family"]


def test_problem_callback_called() -> None:
    seen = []
    s = ClusterState(NODE, on_problem=seen.append)
    s.apply(up(service(ips=("bogus",))))
    assert [p.reason for p in seen] == ["invalid-ip"]


def test_problems_are_bounded_to_the_newest() -> None:
    s = ClusterState(NODE, max_problems=3)
    for i in range(5):
        s.apply(up(service(ips=(f"bogus-{i}",))))
    # A stream of bad updates keeps only the newest few, and says how many
    # there were in all.
    assert [p.message for p in s.problems] == [f"invalid IP address 'bogus-{i}'" for i in (2, 3, 4)]
    assert s.problems_total == 5
