"""A fake Kubernetes API server that speaks list/watch faithfully enough for
the real ``kubernetes`` client (and our reflector) not to notice.

What it models, because the reflector's correctness depends on each of these:

* one global, strictly increasing resourceVersion bumped on every write;
* lists served from the current state, carrying the list's resourceVersion;
* watches that replay history after a given resourceVersion and then stream
  live events as chunked, newline-delimited JSON;
* ``allowWatchBookmarks`` (periodic BOOKMARK events), ``timeoutSeconds``,
  label and field selectors (including the ADDED/DELETED synthesis the real
  watch cache does when an object starts or stops matching a selector);
* a compaction window: watching from a compacted resourceVersion yields an
  ``ERROR`` event carrying a ``410 Expired`` Status;
* failure modes driven by tests: abruptly dropped streams, stalled streams,
  restarts, injected HTTP errors and malformed stored objects.

It binds only 127.0.0.1. Every control method is thread-safe.
"""

from __future__ import annotations

import bisect
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

JSON = dict[str, Any]


@dataclass(frozen=True)
class ResourceInfo:
    """How one kind is addressed over HTTP."""

    kind: str
    api_version: str
    prefix: str  # "/api/v1" or "/apis/<group>/<version>"
    plural: str
    namespaced: bool


RESOURCES: dict[str, ResourceInfo] = {
    "Service": ResourceInfo("Service", "v1", "/api/v1", "services", True),
    "EndpointSlice": ResourceInfo(
        "EndpointSlice",
        "discovery.k8s.io/v1",
        "/apis/discovery.k8s.io/v1",
        "endpointslices",
        True,
    ),
    "Node": ResourceInfo("Node", "v1", "/api/v1", "nodes", False),
}
_BY_PATH = {(r.prefix, r.plural): r for r in RESOURCES.values()}

_ROUTE = re.compile(
    r"^(?P<prefix>/api/v1|/apis/discovery\.k8s\.io/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<plural>[a-z]+)"
    r"(?:/(?P<name>[^/]+))?/?$"
)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it, so tests can assert what a client asked."""

    verb: str  # "list", "watch", "get" or "other"
    kind: str  # "" for non-resource paths
    path: str
    query: Mapping[str, str]


@dataclass(frozen=True)
class _Event:
    """A history entry. ``old``/``new`` let each watcher apply its own
    selector and decide between ADDED, MODIFIED and DELETED."""

    rv: int
    kind: str
    type: str  # ADDED | MODIFIED | DELETED
    old: JSON | None
    new: JSON | None


class SelectorError(ValueError):
    """A selector this fake (or Kubernetes) cannot parse: answered with 400."""


# --------------------------------------------------------------------------
# selectors
# --------------------------------------------------------------------------


def _labels_of(obj: Any) -> Mapping[str, Any]:
    # Malformed objects (serve_raw) must not crash selector evaluation.
    if not isinstance(obj, Mapping):
        return {}
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return {}
    labels = meta.get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _field_of(obj: Any, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    return "" if cur is None else str(cur)


Predicate = Callable[[Any], bool]


def _split_terms(selector: str) -> list[str]:
    return [t.strip() for t in selector.split(",") if t.strip()]


def parse_label_selector(selector: str) -> Predicate:
    """Equality-based label selector: ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``."""
    preds: list[Predicate] = []
    for term in _split_terms(selector):
        if " in " in term or " notin " in term or "(" in term:
            raise SelectorError(f"set-based selector not supported by the fake: {term!r}")
        if not _key_ok(term):
            raise SelectorError(f"invalid label selector term {term!r}")
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            preds.append(lambda o, k=key, v=value: _labels_of(o).get(k) != v)
        elif "==" in term or "=" in term:
            key, value = (s.strip() for s in re.split("==?", term, maxsplit=1))
            preds.append(lambda o, k=key, v=value: _labels_of(o).get(k) == v)
        elif term.startswith("!"):
            key = term[1:].strip()
            preds.append(lambda o, k=key: k not in _labels_of(o))
        else:
            preds.append(lambda o, k=term: k in _labels_of(o))
    return lambda o: all(p(o) for p in preds)


def _key_ok(term: str) -> bool:
    key = re.split("!=|==|=", term.lstrip("!"), maxsplit=1)[0].strip()
    return bool(re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?", key))


def parse_field_selector(selector: str) -> Predicate:
    """Field selector on dotted paths: ``a.b=v``, ``a.b==v``, ``a.b!=v``."""
    preds: list[Predicate] = []
    for term in _split_terms(selector):
        if "!=" in term:
            path, value = (s.strip() for s in term.split("!=", 1))
            preds.append(lambda o, p=path, v=value: _field_of(o, p) != v)
        elif "=" in term:
            path, value = (s.strip() for s in re.split("==?", term, maxsplit=1))
            preds.append(lambda o, p=path, v=value: _field_of(o, p) == v)
        else:
            raise SelectorError(f"invalid field selector term {term!r}")
    return lambda o: all(p(o) for p in preds)


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------


@dataclass
class _Watch:
    """Book-keeping for one open watch stream (mutable, server-internal)."""

    sock: socket.socket
    kind: str
    dropped: bool = False


class _HTTPServer(ThreadingHTTPServer):
    # Daemon threads so a wedged handler can never keep the test process alive;
    # close() still shuts every connection down and joins what it can.
    daemon_threads = True
    fake: FakeApiServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfer encoding needs 1.1
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        with suppress(OSError):
            super().finish()
        self.server.fake._track(self.connection, add=False)

    def do_GET(self) -> None:
        try:
            self.server.fake._handle_get(self)
        except OSError:
            # The peer went away or a test dropped the stream: nothing to answer.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean


class FakeApiServer:
    """In-memory Kubernetes API server on 127.0.0.1.

    ``FakeApiServer(listen=False)`` reserves the port without listening, so a
    client sees "connection refused" until ``start()`` is called.
    """

    def __init__(self, *, listen: bool = True, bookmark_interval: float = 1.0) -> None:
        self.bookmark_interval = bookmark_interval
        self._cond = threading.Condition()
        self._rv = 1
        self._compacted_rv = 0
        self._objects: dict[tuple[str, str, str], JSON] = {}
        self._history: list[_Event] = []
        self._watches: list[_Watch] = []
        self._conns: set[socket.socket] = set()
        self._stall_until = 0.0
        self._stall_forever = False
        self._closing = False
        self._failures: list[tuple[str | None, str | None, int]] = []
        self.requests: Counter[str] = Counter()
        self.request_log: list[RequestRecord] = []
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        self._httpd.fake = self
        self._httpd.server_bind()
        self._thread: threading.Thread | None = None
        if listen:
            self.start()

    # ---------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Begin listening (idempotent)."""
        if self._thread is not None:
            return
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-apiserver-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, drop every connection and join the server thread."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._stall_forever = False
            conns = list(self._conns)
            self._cond.notify_all()
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> FakeApiServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def kubeconfig(self, path: str | Path) -> Path:
        """Write a kubeconfig pointing at this server (plain http, no auth)."""
        path = Path(path)
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # ---------------------------------------------------------- writes

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def create(self, kind: str, obj: Mapping[str, Any]) -> JSON:
        """Store a new object; returns the stored copy (with its resourceVersion)."""
        return self._write(kind, obj, mode="create")

    def update(self, kind: str, obj: Mapping[str, Any]) -> JSON:
        return self._write(kind, obj, mode="update")

    def apply(self, kind: str, obj: Mapping[str, Any]) -> JSON:
        """Create or update, whichever applies."""
        return self._write(kind, obj, mode="apply")

    def delete(self, kind: str, obj_or_name: Mapping[str, Any] | str, namespace: str = "") -> JSON:
        if isinstance(obj_or_name, str):
            name = obj_or_name
        else:
            meta = obj_or_name.get("metadata") or {}
            name = str(meta.get("name", ""))
            namespace = str(meta.get("namespace", namespace))
        info = RESOURCES[kind]
        if info.namespaced and not namespace:
            namespace = "default"
        key = (kind, namespace if info.namespaced else "", name)
        with self._cond:
            old = self._objects.pop(key, None)
            if old is None:
                raise KeyError(f"{kind} {namespace}/{name} not found")
            self._rv += 1
            gone = copy.deepcopy(old)
            # The real server reports the deletion's resourceVersion on the
            # deleted object, so a watcher's position advances past it.
            if isinstance(gone.get("metadata"), dict):
                gone["metadata"]["resourceVersion"] = str(self._rv)
            self._history.append(_Event(self._rv, kind, "DELETED", old, gone))
            self._cond.notify_all()
            return gone

    def serve_raw(self, kind: str, obj: Any) -> None:
        """Put ``obj`` in the store verbatim (it may be malformed) and emit ADDED.

        It is keyed by its name when it has one, otherwise by a fresh uuid, so
        a broken object can sit next to good ones.
        """
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        name = meta.get("name") if isinstance(meta, Mapping) else None
        ns = meta.get("namespace") if isinstance(meta, Mapping) else None
        key = (kind, str(ns or ""), str(name) if name else f"raw-{uuid.uuid4()}")
        with self._cond:
            self._rv += 1
            old = self._objects.get(key)
            self._objects[key] = obj
            typ = "MODIFIED" if old is not None else "ADDED"
            self._history.append(_Event(self._rv, kind, typ, old, obj))
            self._cond.notify_all()

    def _write(self, kind: str, obj: Mapping[str, Any], *, mode: str) -> JSON:
        info = RESOURCES[kind]
        new: JSON = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("metadata.name is required")
        if info.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        new["kind"] = info.kind
        new["apiVersion"] = info.api_version
        key = (kind, str(meta.get("namespace", "")), str(meta["name"]))
        with self._cond:
            old = self._objects.get(key)
            if mode == "create" and old is not None:
                raise ValueError(f"{kind} {key[1]}/{key[2]} already exists")
            if mode == "update" and old is None:
                raise KeyError(f"{kind} {key[1]}/{key[2]} not found")
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            if old is not None and isinstance(old.get("metadata"), Mapping):
                meta.setdefault("uid", old["metadata"].get("uid"))
                meta.setdefault("creationTimestamp", old["metadata"].get("creationTimestamp"))
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._objects[key] = new
            self._history.append(
                _Event(self._rv, kind, "ADDED" if old is None else "MODIFIED", old, new)
            )
            self._cond.notify_all()
            return copy.deepcopy(new)

    # ---------------------------------------------------------- failure controls

    def compact(self) -> None:
        """Forget history up to now: watches from older versions get 410 Expired."""
        with self._cond:
            self._compacted_rv = self._rv
            self._history.clear()
            self._cond.notify_all()

    def drop_watches(self) -> int:
        """Abruptly close every open watch stream (no terminating chunk)."""
        with self._cond:
            watches = list(self._watches)
            for w in watches:
                w.dropped = True
            # Forget them now, not when their handler threads notice, so
            # open_watches() is exact as soon as this returns.
            self._watches.clear()
            self._cond.notify_all()
        for w in watches:
            with suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
        return len(watches)

    def stall_watches(self, seconds: float | None = None) -> None:
        """Keep watch connections open but send nothing (not even bookmarks).

        ``None`` stalls until ``release_watches()``. Watches opened during the
        stall get their response headers, then nothing.
        """
        with self._cond:
            if seconds is None:
                self._stall_forever = True
            else:
                self._stall_until = time.monotonic() + seconds
            self._cond.notify_all()

    def release_watches(self) -> None:
        with self._cond:
            self._stall_forever = False
            self._stall_until = 0.0
            self._cond.notify_all()

    def restart(self, *, compact: bool = False) -> None:
        """Simulate an API server restart: every connection (watches and idle
        keep-alive ones) is cut, stalls end, and optionally history is lost."""
        with self._cond:
            self._stall_forever = False
            self._stall_until = 0.0
            for w in self._watches:
                w.dropped = True
            self._watches.clear()
            conns = list(self._conns)
            if compact:
                self._compacted_rv = self._rv
                self._history.clear()
            self._cond.notify_all()
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def fail_next(
        self, count: int, code: int = 500, *, verb: str | None = None, kind: str | None = None
    ) -> None:
        """Answer the next ``count`` matching requests with HTTP ``code``."""
        with self._cond:
            self._failures.extend([(verb, kind, code)] * count)

    def clear_failures(self) -> None:
        """Forget failures injected with ``fail_next`` that have not fired yet."""
        with self._cond:
            self._failures.clear()

    # ---------------------------------------------------------- introspection

    def open_watches(self, kind: str | None = None) -> int:
        with self._cond:
            return sum(1 for w in self._watches if kind is None or w.kind == kind)

    def request_count(self, verb: str, kind: str) -> int:
        with self._cond:
            return self.requests[f"{verb} {kind}"]

    def requests_for(self, verb: str, kind: str) -> list[RequestRecord]:
        with self._cond:
            return [r for r in self.request_log if r.verb == verb and r.kind == kind]

    def get(self, kind: str, name: str, namespace: str = "") -> JSON | None:
        info = RESOURCES[kind]
        if info.namespaced and not namespace:
            namespace = "default"
        with self._cond:
            obj = self._objects.get((kind, namespace if info.namespaced else "", name))
            return copy.deepcopy(obj)

    # ---------------------------------------------------------- HTTP

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _handle_get(self, h: _Handler) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        m = _ROUTE.match(path)
        info = _BY_PATH.get((m["prefix"], m["plural"])) if m else None
        if m is None or info is None or (m["ns"] and not info.namespaced):
            self._record(RequestRecord("other", "", path, query))
            self._handle_discovery(h, path)
            return
        is_watch = query.get("watch", "").lower() in ("true", "1")
        verb = "watch" if is_watch else ("get" if m["name"] else "list")
        self._record(RequestRecord(verb, info.kind, path, query))
        code = self._take_failure(verb, info.kind)
        if code:
            self._send_status(h, code, "InternalError" if code >= 500 else "Injected", "injected")
            return
        try:
            label_pred = parse_label_selector(query.get("labelSelector", ""))
            field_pred = parse_field_selector(query.get("fieldSelector", ""))
        except SelectorError as e:
            self._send_status(h, 400, "BadRequest", str(e))
            return
        ns = m["ns"] or ""

        def matches(obj: Any) -> bool:
            if ns and _field_of(obj, "metadata.namespace") != ns:
                return False
            return label_pred(obj) and field_pred(obj)

        if verb == "get":
            obj = self.get(info.kind, m["name"], ns)
            if obj is None:
                self._send_status(h, 404, "NotFound", f"{info.plural} {m['name']!r} not found")
            else:
                self._send_json(h, 200, obj)
        elif verb == "list":
            self._serve_list(h, info, matches)
        else:
            self._serve_watch(h, info, matches, query)

    def _record(self, rec: RequestRecord) -> None:
        with self._cond:
            self.requests[f"{rec.verb} {rec.kind}".strip()] += 1
            self.request_log.append(rec)

    def _take_failure(self, verb: str, kind: str) -> int:
        with self._cond:
            for i, (v, k, code) in enumerate(self._failures):
                if (v is None or v == verb) and (k is None or k == kind):
                    del self._failures[i]
                    return code
        return 0

    def _handle_discovery(self, h: _Handler, path: str) -> None:
        path = path.rstrip("/") or "/"
        if path == "/version":
            # Every field: the client's VersionInfo model rejects partial ones.
            body: JSON = {
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-fake",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        elif path == "/api":
            body = {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        elif path == "/apis":
            body = {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": "discovery.k8s.io",
                        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                        "preferredVersion": {
                            "groupVersion": "discovery.k8s.io/v1",
                            "version": "v1",
                        },
                    }
                ],
            }
        else:
            self._send_status(h, 404, "NotFound", f"the server could not find {path}")
            return
        self._send_json(h, 200, body)

    def _send_json(self, h: _Handler, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _send_status(self, h: _Handler, code: int, reason: str, message: str) -> None:
        self._send_json(h, code, _status(code, reason, message))

    def _serve_list(self, h: _Handler, info: ResourceInfo, matches: Predicate) -> None:
        with self._cond:
            items = [
                copy.deepcopy(o)
                for (kind, _, _), o in self._objects.items()
                if kind == info.kind and matches(o)
            ]
            rv = str(self._rv)
        items.sort(key=_sort_key)
        body = {
            "kind": f"{info.kind}List",
            "apiVersion": info.api_version,
            "metadata": {"resourceVersion": rv},
            "items": items,
        }
        self._send_json(h, 200, body)

    def _serve_watch(
        self, h: _Handler, info: ResourceInfo, matches: Predicate, query: Mapping[str, str]
    ) -> None:
        rv_param = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        try:
            start_rv = int(rv_param) if rv_param not in ("", "0") else None
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError:
            self._send_status(h, 400, "BadRequest", "invalid resourceVersion or timeoutSeconds")
            return
        w = _Watch(sock=h.connection, kind=info.kind)
        initial: list[JSON] = []
        with self._cond:
            self._watches.append(w)
            if start_rv is None:
                # Like the real server: a watch without a version starts with
                # synthetic ADDED events for everything that exists now.
                initial = [
                    copy.deepcopy(o)
                    for (kind, _, _), o in self._objects.items()
                    if kind == info.kind and matches(o)
                ]
                pos = self._rv
            else:
                pos = start_rv
        initial.sort(key=_sort_key)
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for obj in initial:
                _write_chunk(h, {"type": "ADDED", "object": obj})
            graceful = self._stream(h, w, info, matches, pos, bookmarks, timeout)
            if graceful:
                h.wfile.write(b"0\r\n\r\n")
            else:
                h.close_connection = True
        finally:
            with self._cond:
                if w in self._watches:
                    self._watches.remove(w)

    def _stream(
        self,
        h: _Handler,
        w: _Watch,
        info: ResourceInfo,
        matches: Predicate,
        pos: int,
        bookmarks: bool,
        timeout: float | None,
    ) -> bool:
        """Send events after ``pos`` until timeout/drop. True = end gracefully."""
        now = time.monotonic()
        deadline = now + timeout if timeout is not None else None
        next_bookmark = now + self.bookmark_interval
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if w.dropped or self._closing:
                        return False
                    if deadline is not None and now >= deadline:
                        return True
                    stalled = self._stall_forever or now < self._stall_until
                    waits = [0.5]
                    if deadline is not None:
                        waits.append(deadline - now)
                    if stalled:
                        if not self._stall_forever:
                            waits.append(self._stall_until - now)
                        self._cond.wait(max(0.0, min(waits)))
                        continue
                    if pos < self._compacted_rv:
                        expired = True
                        break
                    expired = False
                    idx = bisect.bisect_right(self._history, pos, key=lambda e: e.rv)
                    pending = self._history[idx:]
                    head = self._rv
                    if pending or (bookmarks and now >= next_bookmark):
                        break
                    waits.append(next_bookmark - now if bookmarks else 0.5)
                    self._cond.wait(max(0.0, min(waits)))
            if expired:
                _write_chunk(
                    h,
                    {
                        "type": "ERROR",
                        "object": _status(
                            410,
                            "Expired",
                            f"too old resource version: {pos} ({self._compacted_rv})",
                        ),
                    },
                )
                return True
            for ev in pending:
                if ev.kind == info.kind:
                    out = _filtered(ev, matches)
                    if out is not None:
                        _write_chunk(h, out)
            # Every event up to ``head`` has been considered (sent or filtered
            # out), so a bookmark at ``head`` is truthful.
            pos = head
            if bookmarks and time.monotonic() >= next_bookmark:
                _write_chunk(
                    h,
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": info.kind,
                            "apiVersion": info.api_version,
                            "metadata": {"resourceVersion": str(pos)},
                        },
                    },
                )
                next_bookmark = time.monotonic() + self.bookmark_interval


def _filtered(ev: _Event, matches: Predicate) -> JSON | None:
    """What a watcher with selector ``matches`` sees for ``ev`` (None = nothing).

    Mirrors the watch cache: an object that starts matching is ADDED, one that
    stops matching is DELETED (reported with its old content at the new RV).
    """
    old_ok = ev.old is not None and matches(ev.old)
    new_ok = ev.new is not None and ev.type != "DELETED" and matches(ev.new)
    if ev.type == "DELETED":
        return {"type": "DELETED", "object": ev.new} if old_ok else None
    if new_ok:
        return {"type": "MODIFIED" if old_ok else "ADDED", "object": ev.new}
    if old_ok and isinstance(ev.old, dict):
        gone = copy.deepcopy(ev.old)
        if isinstance(gone.get("metadata"), dict):
            gone["metadata"]["resourceVersion"] = str(ev.rv)
        return {"type": "DELETED", "object": gone}
    return None


def _write_chunk(h: _Handler, event: JSON) -> None:
    data = json.dumps(event).encode() + b"\n"
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _status(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _sort_key(obj: Any) -> tuple[str, str]:
    return (_field_of(obj, "metadata.namespace"), _field_of(obj, "metadata.name"))
