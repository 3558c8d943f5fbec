"""The fake API server, exercised with the real kubernetes client: if these
hold, tests built on the fake test the protocol the real server speaks."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from tests.support.fake_apiserver import FakeApiServer


def svc(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
    }


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as s:
        yield s


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Iterator[k8s_client.ApiClient]:
    c = k8s_config.new_client_from_config(str(server.kubeconfig(tmp_path / "kubeconfig")))
    c.configuration.retries = False
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def core(api: k8s_client.ApiClient) -> k8s_client.CoreV1Api:
    return k8s_client.CoreV1Api(api)


def raw_watch(core: k8s_client.CoreV1Api, read_timeout: float = 5.0, **kw: Any) -> Any:
    return core.list_service_for_all_namespaces(
        watch=True, _preload_content=False, _request_timeout=(2, read_timeout), **kw
    )


def read_events(resp: Any) -> list[dict[str, Any]]:
    out = []
    for line in k8s_watch.watch.iter_resp_lines(resp):
        if line:
            out.append(json.loads(line))
    return out


def test_lists_carry_kinds_and_a_strictly_increasing_resource_version(
    server: FakeApiServer, api: k8s_client.ApiClient, core: k8s_client.CoreV1Api
) -> None:
    rvs = [
        int(server.create("Service", svc(f"s{i}", ns=f"ns{i % 2}"))["metadata"]["resourceVersion"])
        for i in range(4)
    ]
    assert rvs == sorted(set(rvs))
    server.create(
        "EndpointSlice",
        {"metadata": {"name": "e", "namespace": "ns0"}, "addressType": "IPv4", "endpoints": []},
    )
    server.create("Node", {"metadata": {"name": "n1"}})

    lst = core.list_service_for_all_namespaces()
    assert lst.kind == "ServiceList"
    assert lst.metadata.resource_version == server.resource_version
    assert [s.metadata.name for s in lst.items] == ["s0", "s2", "s1", "s3"]
    assert {s.kind for s in lst.items} == {"Service"}
    assert [s.metadata.name for s in core.list_namespaced_service("ns1").items] == ["s1", "s3"]

    disc = k8s_client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces()
    assert disc.kind == "EndpointSliceList"
    assert disc.items[0].api_version == "discovery.k8s.io/v1"
    assert k8s_client.DiscoveryV1Api(api).list_namespaced_endpoint_slice("ns1").items == []
    assert core.read_node("n1").metadata.name == "n1"
    with pytest.raises(ApiException) as err:
        core.read_node("nope")
    assert err.value.status == 404
    assert k8s_client.VersionApi(api).get_code().git_version.startswith("v1.")
    assert server.request_count("list", "Service") == 2

    raw = core.list_service_for_all_namespaces(_preload_content=False)
    body = json.loads(raw.data)
    assert body["apiVersion"] == "v1"
    assert body["items"][0]["metadata"]["resourceVersion"] == str(rvs[0])


def test_watch_replays_history_after_resource_version(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    server.create("Service", svc("a"))
    rv = server.resource_version
    server.update("Service", svc("a", changed="yes"))
    server.create("Service", svc("b"))
    server.delete("Service", "a", "default")
    w = k8s_watch.Watch()
    got = [
        (e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
        for e in w.stream(
            core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=1
        )
    ]
    assert got == [
        ("MODIFIED", "a", str(int(rv) + 1)),
        ("ADDED", "b", str(int(rv) + 2)),
        ("DELETED", "a", str(int(rv) + 3)),
    ]


def test_watch_without_version_starts_with_synthetic_added_then_streams_live(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    server.create("Service", svc("old"))

    def later() -> None:
        time.sleep(0.2)
        server.create("Service", svc("new"))

    t = threading.Thread(target=later)
    t.start()
    try:
        w = k8s_watch.Watch()
        got = [
            (e["type"], e["object"].metadata.name)
            for e in w.stream(core.list_service_for_all_namespaces, timeout_seconds=1)
        ]
    finally:
        t.join()
    assert got == [("ADDED", "old"), ("ADDED", "new")]


def test_bookmarks_only_when_asked_and_carry_only_the_version(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    server.create("Service", svc("a"))
    rv = server.resource_version
    server.create("Node", {"metadata": {"name": "n1"}})  # moves the global version
    resp = raw_watch(core, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=1)
    events = read_events(resp)
    marks = [e for e in events if e["type"] == "BOOKMARK"]
    assert len(marks) >= 2  # interval 0.2 s over 1 s
    assert marks[0]["object"] == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": server.resource_version},
    }
    plain = read_events(raw_watch(core, resource_version=rv, timeout_seconds=1))
    assert plain == []


def test_timeout_seconds_closes_the_stream(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    t0 = time.monotonic()
    assert (
        read_events(raw_watch(core, resource_version=server.resource_version, timeout_seconds=1))
        == []
    )
    assert 0.9 <= time.monotonic() - t0 < 2.5


def test_label_and_field_selectors_on_list_and_watch(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    server.create("Service", svc("a", app="x", tier="web"))
    server.create("Service", svc("b", app="y"))
    server.create("Service", svc("c"))

    def names(**kw: str) -> list[str]:
        return [s.metadata.name for s in core.list_service_for_all_namespaces(**kw).items]

    assert names(label_selector="app") == ["a", "b"]
    assert names(label_selector="!app") == ["c"]
    assert names(label_selector="app=x") == ["a"]
    assert names(label_selector="app!=x") == ["b", "c"]
    assert names(label_selector="app,!tier") == ["b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b", label_selector="app") == ["a"]
    with pytest.raises(ApiException) as err:
        names(label_selector="app in (x)")
    assert err.value.status == 400

    rv = server.resource_version
    server.update("Service", svc("c", app="x"))  # starts matching -> ADDED
    server.update("Service", svc("a", app="z"))  # stops matching -> DELETED
    server.create("Service", svc("d", app="y"))  # never matches -> nothing
    events = read_events(
        raw_watch(core, resource_version=rv, label_selector="app=x", timeout_seconds=1)
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "c"),
        ("DELETED", "a"),
    ]
    events = read_events(
        raw_watch(core, resource_version=rv, field_selector="metadata.name=d", timeout_seconds=1)
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "d")]


def test_compaction_gives_410_expired_then_closes(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    server.create("Service", svc("a"))
    old = server.resource_version
    server.create("Service", svc("b"))
    server.compact()
    t0 = time.monotonic()
    events = read_events(raw_watch(core, resource_version=old, timeout_seconds=30))
    assert time.monotonic() - t0 < 2, "the stream closes right after the error"
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    # The client's own Watch gives up with 410 (no retry when a timeout is set).
    with pytest.raises(ApiException) as err:
        list(
            k8s_watch.Watch().stream(
                core.list_service_for_all_namespaces, resource_version=old, timeout_seconds=5
            )
        )
    assert err.value.status == 410
    # Lists come from the current state; watching from the present is fine.
    assert len(core.list_service_for_all_namespaces().items) == 2
    assert (
        read_events(raw_watch(core, resource_version=server.resource_version, timeout_seconds=1))
        == []
    )


def test_drop_watches_breaks_streams_abruptly(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    resp = raw_watch(core, resource_version=server.resource_version)
    deadline = time.monotonic() + 2
    while server.open_watches() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.drop_watches() == 1
    with pytest.raises(urllib3.exceptions.ProtocolError):
        read_events(resp)
    assert server.open_watches() == 0


def test_stall_sends_nothing_until_released(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    rv = server.resource_version
    server.stall_watches()
    server.create("Service", svc("a"))
    resp = raw_watch(core, read_timeout=0.3, resource_version=rv, allow_watch_bookmarks=True)
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        read_events(resp)
    server.release_watches()
    events = read_events(raw_watch(core, resource_version=rv, timeout_seconds=1))
    assert [e["object"]["metadata"]["name"] for e in events] == ["a"]
    # A timed stall ends on its own.
    server.stall_watches(0.3)
    t0 = time.monotonic()
    events = read_events(raw_watch(core, resource_version=rv, timeout_seconds=1))
    assert [e["object"]["metadata"]["name"] for e in events] == ["a"]
    assert time.monotonic() - t0 >= 0.25


def test_restart_cuts_every_connection_and_can_lose_history(
    server: FakeApiServer, core: k8s_client.CoreV1Api
) -> None:
    server.create("Service", svc("a"))
    rv = server.resource_version
    server.create("Service", svc("b"))
    resp = raw_watch(core, resource_version=server.resource_version)
    deadline = time.monotonic() + 2
    while server.open_watches() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.restart()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        read_events(resp)
    assert server.open_watches() == 0
    # Still serving, history intact.
    events = read_events(raw_watch(core, resource_version=rv, timeout_seconds=1))
    assert [e["object"]["metadata"]["name"] for e in events] == ["b"]
    server.restart(compact=True)
    events = read_events(raw_watch(core, resource_version=rv, timeout_seconds=1))
    assert events[0]["object"]["code"] == 410


def test_serve_raw_and_injected_failures(server: FakeApiServer, core: k8s_client.CoreV1Api) -> None:
    server.serve_raw("Service", {"metadata": {"name": "odd", "labels": "x"}, "spec": 3})
    body = json.loads(core.list_service_for_all_namespaces(_preload_content=False).data)
    assert body["items"] == [{"metadata": {"name": "odd", "labels": "x"}, "spec": 3}]
    server.fail_next(1, 503, verb="list", kind="Service")
    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces()
    assert err.value.status == 503
    assert core.list_service_for_all_namespaces(_preload_content=False).status == 200


def test_close_stops_listening(tmp_path: Path) -> None:
    server = FakeApiServer()
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_not_listening_until_started() -> None:
    with FakeApiServer(listen=False) as server:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        server.start()
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
