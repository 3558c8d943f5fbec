"""The reflector against the fake API server: list, watch, resume, relist,
backoff and stop, each asserted on the events the agent would receive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

from agent.sources.events import ObjectEvent
from agent.sources.kube import (
    LABEL_HEADLESS,
    LABEL_SERVICE_PROXY_NAME,
    KubeSource,
    ReflectorOptions,
    make_api_client,
)
from tests.support.fake_apiserver import FakeApiServer

FAST = ReflectorOptions(
    watch_timeout=30.0,
    read_timeout=5.0,
    connect_timeout=1.0,
    list_timeout=5.0,
    backoff_initial=0.05,
    backoff_max=0.3,
    healthy_stream_seconds=1.0,
)


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Recorder:
    """A thread-safe event sink."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[ObjectEvent] = []
        self.synced: list[str] = []

    def __call__(self, ev: ObjectEvent) -> None:
        with self._lock:
            self.events.append(ev)

    def on_synced(self, kind: str) -> None:
        with self._lock:
            self.synced.append(kind)

    def seen(self, kind: str | None = None) -> list[tuple[str, str, str]]:
        with self._lock:
            return [(e.action, e.kind, e.name) for e in self.events if kind in (None, e.kind)]

    def clear(self) -> None:
        with self._lock:
            self.events.clear()


def svc(name: str, ns: str = "default", labels: dict[str, str] | None = None, **spec: Any) -> dict:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}], **spec},
    }


def eps(name: str, service: str, ns: str = "default", **labels: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service, **labels},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1"}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def node(name: str) -> dict:
    return {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1"}}}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    # Set up first, torn down last: every other fixture has cleaned up by now.
    wait_for(
        lambda: (
            not [
                t
                for t in threading.enumerate()
                if t.name.startswith(("reflector-", "fake-apiserver-"))
            ]
        ),
        what="reflector and server threads to end",
    )


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as s:
        yield s


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Iterator[k8s_client.ApiClient]:
    c = make_api_client(kubeconfig=str(server.kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def start_source(api: k8s_client.ApiClient, rec: Recorder) -> Iterator[Callable[..., KubeSource]]:
    started: list[KubeSource] = []

    def start(**kw: Any) -> KubeSource:
        kw.setdefault("options", FAST)
        kw.setdefault("node_name", "n1")
        src = KubeSource(kw.pop("api", api), rec, on_synced=rec.on_synced, **kw)
        started.append(src)
        src.start()
        return src

    yield start
    for src in started:
        assert src.stop(timeout=5.0), "reflector threads did not stop"


def test_initial_list_filters_like_kube_proxy_and_signals_sync(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    server.create("Service", svc("web"))
    server.create("Service", svc("other-proxy", labels={LABEL_SERVICE_PROXY_NAME: "x"}))
    server.create("Service", svc("headless", clusterIP="None"))
    server.create("Service", svc("headless-label", labels={LABEL_HEADLESS: ""}))
    server.create("EndpointSlice", eps("web-abc", "web"))
    server.create("EndpointSlice", eps("hl-abc", "headless", **{LABEL_HEADLESS: ""}))
    server.create("Node", node("n1"))
    server.create("Node", node("n2"))

    src = start_source()
    assert src.wait_synced(5.0)
    assert src.synced()
    assert sorted(rec.synced) == ["EndpointSlice", "Node", "Service"]
    assert sorted(rec.seen()) == [
        ("upsert", "EndpointSlice", "web-abc"),
        ("upsert", "Node", "n1"),
        ("upsert", "Service", "web"),
    ]
    # Raw dicts, exactly as served, not client models.
    ev = next(e for e in rec.events if e.kind == "Service")
    assert type(ev.obj) is dict
    assert ev.obj["spec"]["clusterIP"] == "10.96.0.10"
    assert ev.origin == "api"
    q = server.requests_for("list", "Service")[0].query
    assert q["labelSelector"] == f"!{LABEL_HEADLESS},!{LABEL_SERVICE_PROXY_NAME}"
    assert q["fieldSelector"] == "spec.clusterIP!=None"
    assert server.requests_for("list", "Node")[0].query["fieldSelector"] == "metadata.name=n1"


def test_proxy_name_selects_only_own_services(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    server.create("Service", svc("mine", labels={LABEL_SERVICE_PROXY_NAME: "sliceproxy"}))
    server.create("Service", svc("theirs", labels={LABEL_SERVICE_PROXY_NAME: "other"}))
    server.create("Service", svc("unlabelled"))
    src = start_source(proxy_name="sliceproxy")
    assert src.wait_synced(5.0)
    assert rec.seen("Service") == [("upsert", "Service", "mine")]


def test_live_create_update_delete_in_order(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    server.create("Service", svc("a"))
    server.update("Service", svc("a", clusterIP="10.96.0.11"))
    server.delete("Service", "a", "default")
    wait_for(lambda: len(rec.seen("Service")) == 3, what="three events")
    assert rec.seen("Service") == [
        ("upsert", "Service", "a"),
        ("upsert", "Service", "a"),
        ("delete", "Service", "a"),
    ]
    svc_events = [e for e in rec.events if e.kind == "Service"]
    assert svc_events[1].obj["spec"]["clusterIP"] == "10.96.0.11"
    assert src.reflectors["Service"].resource_version == server.resource_version


def test_resume_after_dropped_watch_without_missing_or_duplicating(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    server.create("Service", svc("before"))
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    # Keep the reflector away for a moment so the writes land while disconnected.
    server.fail_next(2, 503, verb="watch", kind="Service")
    assert server.drop_watches() >= 1
    rv_before = src.reflectors["Service"].resource_version
    for i in range(5):
        server.create("Service", svc(f"s{i}"))
    server.delete("Service", "before", "default")
    wait_for(lambda: len(rec.seen("Service")) == 7, what="seven events")
    time.sleep(0.3)  # any duplicate would arrive in this window
    assert rec.seen("Service") == [
        ("upsert", "Service", "before"),
        *[("upsert", "Service", f"s{i}") for i in range(5)],
        ("delete", "Service", "before"),
    ]
    stats = src.stats()["Service"].counts
    assert stats["lists"] == 1, "a resume must not relist"
    assert stats["errors"] >= 1
    resumed = [r.query.get("resourceVersion") for r in server.requests_for("watch", "Service")]
    assert rv_before in resumed[1:], "the watch resumed from the last seen resourceVersion"


def test_relist_after_compaction_emits_deletes_for_unseen_deletions(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    for name in ("a", "b", "c"):
        server.create("Service", svc(name))
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    rec.clear()
    server.fail_next(10_000, 503, verb="watch", kind="Service")
    server.drop_watches()
    n = server.request_count("watch", "Service")
    wait_for(lambda: server.request_count("watch", "Service") > n, what="a failed re-watch")
    server.delete("Service", "b", "default")
    server.update("Service", svc("c", clusterIP="10.96.0.99"))
    server.create("Service", svc("d"))
    server.compact()
    server.clear_failures()
    wait_for(lambda: len(rec.seen("Service")) == 3, what="relist events")
    time.sleep(0.2)
    assert sorted(rec.seen("Service")) == [
        ("delete", "Service", "b"),
        ("upsert", "Service", "c"),
        ("upsert", "Service", "d"),
    ], "unchanged 'a' is not re-sent; vanished 'b' is deleted"
    deleted = next(e for e in rec.events if e.action == "delete")
    assert deleted.obj["spec"]["clusterIP"] == "10.96.0.10", "delete carries the last object"
    counts = src.stats()["Service"].counts
    assert counts["expired"] == 1
    assert counts["relists"] == 1
    # Still live after the relist.
    server.create("Service", svc("e"))
    wait_for(lambda: ("upsert", "Service", "e") in rec.seen("Service"), what="live event")


def test_410_answer_to_watch_request_relists(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    server.create("Service", svc("a"))
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    server.fail_next(1, 410, verb="watch", kind="Service")
    server.drop_watches()
    wait_for(lambda: src.stats()["Service"].counts["relists"] == 1, what="relist")
    assert src.stats()["Service"].counts["expired"] == 1
    assert rec.seen("Service") == [("upsert", "Service", "a")], "unchanged object not re-sent"


def test_stalled_stream_is_detected_by_read_timeout(
    server: FakeApiServer,
    rec: Recorder,
    start_source: Callable[..., KubeSource],
) -> None:
    opts = ReflectorOptions(
        watch_timeout=30.0,
        read_timeout=0.4,
        connect_timeout=1.0,
        list_timeout=5.0,
        backoff_initial=0.05,
        backoff_max=0.2,
        healthy_stream_seconds=1.0,
    )
    src = start_source(options=opts)
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    server.stall_watches()
    server.create("Service", svc("late"))
    wait_for(lambda: src.stats()["Service"].counts["read_timeouts"] >= 1, what="a read timeout")
    assert rec.seen("Service") == []
    server.release_watches()
    wait_for(lambda: rec.seen("Service") == [("upsert", "Service", "late")], what="event")
    time.sleep(0.2)
    assert rec.seen("Service") == [("upsert", "Service", "late")], "delivered exactly once"
    assert src.stats()["Service"].counts["lists"] == 1


def test_survives_server_restart(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    server.create("Service", svc("a"))
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches() == 3, what="three watches open")
    server.restart()
    server.create("Service", svc("b"))
    wait_for(lambda: ("upsert", "Service", "b") in rec.seen(), what="event after restart")
    wait_for(lambda: server.open_watches() == 3, what="watches re-opened")
    # Restart that also loses history while the reflector is caught up: the
    # resume version is not older than the compaction, so no relist needed.
    server.restart(compact=True)
    server.create("Service", svc("c"))
    wait_for(lambda: ("upsert", "Service", "c") in rec.seen(), what="event after 2nd restart")
    assert rec.seen("Service") == [
        ("upsert", "Service", "a"),
        ("upsert", "Service", "b"),
        ("upsert", "Service", "c"),
    ]


def test_unreachable_at_start_backs_off_then_syncs(tmp_path: Path, rec: Recorder) -> None:
    with FakeApiServer(listen=False) as server:
        server.create("Service", svc("a"))
        api = make_api_client(kubeconfig=str(server.kubeconfig(tmp_path / "kc")))
        src = KubeSource(api, rec, node_name="n1", options=FAST, on_synced=rec.on_synced)
        src.start()
        try:
            time.sleep(0.5)
            assert not src.synced()
            assert not src.wait_synced(0.01)
            errors = src.stats()["Service"].counts["errors"]
            # Backoff, not a hot loop: 0.05 s doubling to 0.3 s gives a handful.
            assert 2 <= errors <= 12
            server.start()
            assert src.wait_synced(5.0)
            assert rec.seen("Service") == [("upsert", "Service", "a")]
        finally:
            assert src.stop(timeout=5.0)
            api.close()


def test_bookmarks_advance_resource_version(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    # Writes to another kind move the global version; only bookmarks tell
    # the Service reflector about it.
    for i in range(3):
        server.create("EndpointSlice", eps(f"s{i}", "x"))
    target = server.resource_version
    refl = src.reflectors["Service"]
    wait_for(lambda: refl.resource_version == target, what="bookmark")
    assert refl.stats().counts["bookmarks"] >= 1
    assert rec.seen("Service") == []
    server.drop_watches()
    wait_for(lambda: len(server.requests_for("watch", "Service")) >= 2, what="re-watch")
    assert server.requests_for("watch", "Service")[-1].query["resourceVersion"] == target
    assert server.requests_for("watch", "Service")[-1].query["allowWatchBookmarks"] == "true"


def test_malformed_objects_are_delivered_raw_and_do_not_stop_the_reflector(
    server: FakeApiServer, rec: Recorder, start_source: Callable[..., KubeSource]
) -> None:
    server.serve_raw(
        "Service", {"metadata": {"name": "odd", "namespace": "d", "labels": "x"}, "spec": 7}
    )
    src = start_source()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches("Service") == 1, what="watch open")
    server.serve_raw("Service", {"kind": "Service", "spec": {"ports": "many"}})  # no metadata
    server.create("Service", svc("fine"))
    wait_for(lambda: len(rec.seen("Service")) == 3, what="three events")
    objs = [e.obj for e in rec.events if e.kind == "Service"]
    assert objs[0]["spec"] == 7
    assert objs[1] == {"kind": "Service", "spec": {"ports": "many"}}
    assert objs[2]["metadata"]["name"] == "fine"


def test_events_can_go_to_a_queue(server: FakeApiServer, api: k8s_client.ApiClient) -> None:
    import queue

    q: queue.Queue[ObjectEvent] = queue.Queue()
    server.create("Node", node("n1"))
    src = KubeSource(api, q, node_name="n1", options=FAST)
    src.start()
    try:
        assert src.wait_synced(5.0)
        ev = q.get(timeout=1)
        assert (ev.action, ev.kind, ev.name) == ("upsert", "Node", "n1")
    finally:
        assert src.stop(timeout=5.0)


def test_stop_is_quick_while_watching_and_while_backing_off(
    server: FakeApiServer, api: k8s_client.ApiClient, rec: Recorder, tmp_path: Path
) -> None:
    slow = ReflectorOptions(watch_timeout=600.0, read_timeout=60.0, backoff_initial=20.0)
    src = KubeSource(api, rec, node_name="n1", options=slow)
    src.start()
    assert src.wait_synced(5.0)
    wait_for(lambda: server.open_watches() == 3, what="watches open")
    t0 = time.monotonic()
    assert src.stop(timeout=5.0)
    assert time.monotonic() - t0 < 1.0

    with FakeApiServer(listen=False) as down:
        api2 = make_api_client(master=down.url)
        src2 = KubeSource(api2, rec, node_name="n1", options=slow)
        src2.start()
        try:
            wait_for(lambda: src2.stats()["Service"].counts["errors"] >= 1, what="first error")
            t0 = time.monotonic()
            assert src2.stop(timeout=5.0)
            assert time.monotonic() - t0 < 1.0
        finally:
            src2.stop()
            api2.close()


def test_master_overrides_kubeconfig_server(server: FakeApiServer, tmp_path: Path) -> None:
    with FakeApiServer(listen=False) as wrong:
        kc = wrong.kubeconfig(tmp_path / "kc")
        api = make_api_client(kubeconfig=str(kc), master=server.url)
        try:
            assert api.configuration.host == server.url
            assert k8s_client.CoreV1Api(api).list_node().kind == "NodeList"
        finally:
            api.close()
