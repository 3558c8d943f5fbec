"""The API-server source: list + watch reflectors for Services, EndpointSlices
and this node's Node, emitting raw-dict ``ObjectEvent``s.

Each resource gets one ``Reflector`` thread that lists, then watches from the
list's resourceVersion with bookmarks, resumes from the last resourceVersion it
saw (events *and* bookmarks) after any interruption, and re-lists when the API
server says that version has expired (410), emitting ``delete`` for objects that
vanished meanwhile.

Why the watch loop does not use ``kubernetes.watch.Watch.stream``: that helper
ends silently when the server closes a stream, retries 410 once on its own from
a version it tracks only for deserialised objects, lets read timeouts escape as
urllib3 exceptions, and deserialises every object into client models (slow, and
the rest of the agent wants raw dicts). We still call the generated API
methods, with ``_preload_content=False``, so the URL, query encoding and auth
come from the client; only the reading of the response (newline-delimited JSON
over chunked HTTP) is ours, which lets every way a stream can end be told apart:
graceful close, ``ERROR`` event, broken connection, read timeout or ``stop()``.

Relist policy: after a 410 the reflector lists again and emits ``upsert`` only
for objects whose resourceVersion differs from the one it last delivered (new
or changed), and ``delete`` (carrying the last delivered object) for objects
that are gone. Downstream therefore sees exactly the changes it missed.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from agent.sources.events import Action, ObjectEvent

log = logging.getLogger(__name__)

# Well-known labels (k8s.io/api/core/v1 and k8s.io/kubernetes/pkg/proxy/apis).
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"

# Every counter a reflector keeps; stats() reports them all, zeros included.
COUNTERS = (
    "lists",
    "relists",
    "watches",
    "watch_restarts",
    "expired",
    "errors",
    "read_timeouts",
    "events",
    "bookmarks",
)

JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)
EventSink = Callable[[ObjectEvent], None] | queue.Queue[ObjectEvent]
CountHook = Callable[[str, str], None]  # (kind, counter name)


class _Expired(Exception):
    """The API server no longer has the history we want to resume from."""


class _StreamError(Exception):
    """The server sent something on the watch stream we cannot trust."""


# --------------------------------------------------------------------------
# configuration and selectors
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReflectorOptions:
    """Timing knobs; the defaults suit a real cluster, tests shrink them."""

    # Base watch timeoutSeconds; each watch asks for a random value in
    # [base, 2*base) like client-go, so a fleet of agents does not reconnect
    # in lockstep after an API server restart.
    watch_timeout: float = 300.0
    # No byte (event or bookmark) for this long means the stream is stalled
    # (e.g. a half-open TCP connection after a network partition).
    read_timeout: float = 120.0
    connect_timeout: float = 10.0
    # Read timeout for a list; a large cluster's EndpointSlice list is big.
    list_timeout: float = 120.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # A watch that delivered something, or stayed up this long, counts as
    # healthy and resets the backoff.
    healthy_stream_seconds: float = 10.0


@dataclass(frozen=True)
class ResourceSpec:
    """One watched resource: its kind and the server-side selectors used."""

    kind: str
    label_selector: str = ""
    field_selector: str = ""


def service_spec(proxy_name: str | None = None) -> ResourceSpec:
    """Services this proxy owns, filtered server-side like kube-proxy.

    Upstream (cmd/kube-proxy/app/server.go) lists services with
    ``!service-proxy-name`` and ``spec.clusterIP!=None``. We also exclude the
    ``headless`` label as older kube-proxy releases did (harmless: the label
    normally sits on EndpointSlices). With a proxy name configured we own
    exactly the services whose label equals that name.
    """
    owner = (
        f"{LABEL_SERVICE_PROXY_NAME}={proxy_name}" if proxy_name else f"!{LABEL_SERVICE_PROXY_NAME}"
    )
    return ResourceSpec(
        kind="Service",
        label_selector=f"!{LABEL_HEADLESS},{owner}",
        field_selector="spec.clusterIP!=None",
    )


def endpoint_slice_spec() -> ResourceSpec:
    # Upstream filters EndpointSlices of headless services out server-side;
    # DNS serves those, the proxy has nothing to program for them.
    return ResourceSpec(kind="EndpointSlice", label_selector=f"!{LABEL_HEADLESS}")


def node_spec(node_name: str) -> ResourceSpec:
    return ResourceSpec(kind="Node", field_selector=f"metadata.name={node_name}")


def _list_function(api_client: k8s_client.ApiClient, kind: str) -> Callable[..., Any]:
    if kind == "Service":
        return k8s_client.CoreV1Api(api_client).list_service_for_all_namespaces
    if kind == "EndpointSlice":
        return k8s_client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces
    if kind == "Node":
        return k8s_client.CoreV1Api(api_client).list_node
    raise ValueError(f"unsupported kind {kind!r}")


# Where the kubelet mounts a pod's service-account credentials.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def make_api_client(
    *,
    kubeconfig: str | None = None,
    master: str | None = None,
    service_account_dir: str | Path = SERVICE_ACCOUNT_DIR,
) -> k8s_client.ApiClient:
    """Build a client the way kube-proxy does: ``--kubeconfig`` (with
    ``--master`` overriding its server), else ``--master`` alone, else the
    in-cluster service account.

    ``--master`` alone inside a pod (deploy/daemonset.yaml) still
    authenticates with the pod's service account, as client-go's
    ``BuildConfigFromFlags`` does there: the flag only replaces the address,
    which must not be the ``kubernetes`` Service's ClusterIP (docs/running.md).
    """
    sa_dir = Path(service_account_dir)
    cfg = k8s_client.Configuration()
    if kubeconfig:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        if master:
            cfg.host = master
    elif master:
        cfg.host = master
        _use_service_account(cfg, sa_dir)
    else:
        InClusterConfigLoader(
            token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt")
        ).load_and_set(cfg)
    # urllib3's own retries would hide failures from our backoff and, for a
    # stalled server, multiply the time before we notice; we retry ourselves.
    cfg.retries = False
    return k8s_client.ApiClient(cfg)


def _use_service_account(cfg: k8s_client.Configuration, sa_dir: Path) -> None:
    """Authenticate ``cfg`` (whose host is set) with the mounted service account.

    Outside a pod there is nothing mounted and the client stays anonymous, as
    before (a local test server). The token is re-read whenever the file
    changes: the kubelet rotates projected tokens (about hourly) by swapping
    the mount's symlink, and a long-running agent must follow.
    """
    token_file, ca_file = sa_dir / "token", sa_dir / "ca.crt"
    if not token_file.is_file():
        return
    if ca_file.is_file() and ca_file.stat().st_size > 0:
        cfg.ssl_ca_cert = str(ca_file)
    else:
        # client-go logs this and goes on with the system's CAs; so do we.
        log.warning("service account: %s missing or empty, using the system CAs", ca_file)
    if not cfg.host.startswith("https://"):
        # A bearer token over plain HTTP would be readable on the wire.
        log.warning("service account: not sending the token to %s (not HTTPS)", cfg.host)
        return
    seen: list[tuple[int, int, int]] = []

    def refresh(c: k8s_client.Configuration) -> None:
        # Called by the client before every request: one stat() is cheap,
        # and only a changed file is read again.
        try:
            st = token_file.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen and seen[0] == stamp:
                return
            token = token_file.read_text().strip()
        except OSError as err:
            # Keep the last good token: the file may be mid-rotation.
            log.warning("service account: cannot read %s: %s", token_file, err)
            return
        if token:
            c.api_key["BearerToken"] = f"Bearer {token}"
            seen[:] = [stamp]

    refresh(cfg)
    # The client types the hook attribute as None (its default); setattr
    # keeps the assignment honest for type checkers.
    setattr(cfg, "refresh_api_key_hook", refresh)  # noqa: B010


# --------------------------------------------------------------------------
# backoff
# --------------------------------------------------------------------------


class Backoff:
    """Jittered exponential backoff: initial, x2 per failure, capped."""

    def __init__(self, initial: float, cap: float, rng: random.Random) -> None:
        self._initial = initial
        self._cap = cap
        self._rng = rng
        self._failures = 0

    def next(self) -> float:
        base = min(self._cap, self._initial * (2**self._failures))
        self._failures = min(self._failures + 1, 32)  # 2**32 * 0.2 s is cap anyway
        # Up to +50 % jitter spreads reconnects of many agents over time.
        return min(self._cap, base * (1.0 + 0.5 * self._rng.random()))

    def reset(self) -> None:
        self._failures = 0


# --------------------------------------------------------------------------
# the reflector
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReflectorStats:
    """A snapshot of one reflector's counters (for metrics and tests)."""

    kind: str
    synced: bool
    resource_version: str | None
    counts: Mapping[str, int] = field(default_factory=dict)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _rv_of(obj: Mapping[str, Any]) -> str | None:
    rv = _meta(obj).get("resourceVersion")
    if isinstance(rv, str) and rv:
        return rv
    if isinstance(rv, int) and not isinstance(rv, bool):
        return str(rv)
    return None


def _key_of(obj: Mapping[str, Any]) -> Key | None:
    meta = _meta(obj)
    name, ns = meta.get("name"), meta.get("namespace") or ""
    if isinstance(name, str) and name and isinstance(ns, str):
        return (ns, name)
    return None  # malformed: delivered, but cannot be tracked for relists


def _iter_lines(resp: Any) -> Iterator[bytes]:
    buf = bytearray()
    for chunk in resp.stream(amt=None, decode_content=False):
        buf.extend(chunk)
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                yield line
    if buf.strip():
        yield bytes(buf)


class Reflector:
    """List+watch one resource in a thread, pushing ``ObjectEvent``s to ``sink``.

    ``on_synced(kind)`` is called once, after every object of the first
    successful list has been handed to the sink. ``on_count(kind, name)`` is
    called for every counter increment (names in ``COUNTERS``) so the caller
    can feed its metrics.
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        spec: ResourceSpec,
        sink: EventSink,
        *,
        options: ReflectorOptions | None = None,
        on_synced: Callable[[str], None] | None = None,
        on_count: CountHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.kind = spec.kind
        self._list_fn = _list_function(api_client, spec.kind)
        self._sink = sink
        self._opts = options or ReflectorOptions()
        self._on_synced = on_synced
        self._on_count = on_count
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._lock = threading.Lock()
        self._resp: Any = None  # the in-flight urllib3 response, for stop()
        self._counts: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._rv: str | None = None
        # Last delivered object per key: needed to emit deletes after a relist
        # (the delete carries the object, e.g. a slice's service-name label).
        self._known: dict[Key, Mapping[str, Any]] = {}
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"reflector-{self.kind}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and cut the in-flight request (non-blocking)."""
        self._stop.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            _abort(resp)

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    @property
    def resource_version(self) -> str | None:
        with self._lock:
            return self._rv

    def stats(self) -> ReflectorStats:
        with self._lock:
            return ReflectorStats(self.kind, self.synced, self._rv, dict(self._counts))

    # ------------------------------------------------------------ loop

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
        if self._on_count is not None:
            try:
                self._on_count(self.kind, name)
            except Exception:
                log.exception("count hook failed")

    def _run(self) -> None:
        backoff = Backoff(self._opts.backoff_initial, self._opts.backoff_max, self._rng)
        need_list = True
        consistent = False  # after 410, list with RV "" (never go back in time)
        expired_in_a_row = 0
        while not self._stop.is_set():
            delay = 0.0
            try:
                if need_list:
                    self._list(consistent=consistent)
                    need_list = False
                    backoff.reset()
                healthy = self._watch(backoff)
                expired_in_a_row = 0
                if not healthy:
                    delay = backoff.next()
            except Exception as exc:  # every transport/HTTP/protocol failure
                if self._stop.is_set():
                    break
                if isinstance(exc, _Expired) or (
                    isinstance(exc, ApiException) and exc.status == 410
                ):
                    # Either an ERROR event or a 410 answer to the watch request.
                    self._count("expired")
                    need_list, consistent = True, True
                    expired_in_a_row += 1
                    # Relist at once, but never spin if the server keeps expiring us.
                    delay = backoff.next() if expired_in_a_row > 1 else 0.0
                    if delay > 0:
                        self._stop.wait(delay)
                    continue
                self._count("errors")
                if _is_read_timeout(exc):
                    self._count("read_timeouts")
                delay = backoff.next()
                log.warning("%s reflector: %s; retrying in %.2fs", self.kind, _describe(exc), delay)
            if delay > 0:
                self._stop.wait(delay)

    def _request(self, **kwargs: Any) -> Any:
        if self.spec.label_selector:
            kwargs["label_selector"] = self.spec.label_selector
        if self.spec.field_selector:
            kwargs["field_selector"] = self.spec.field_selector
        resp = self._list_fn(_preload_content=False, **kwargs)
        with self._lock:
            self._resp = resp
        if self._stop.is_set():  # stop() ran before we published resp
            _abort(resp)
        return resp

    def _done(self, resp: Any) -> None:
        with self._lock:
            self._resp = None
        with suppress(Exception):
            resp.release_conn()

    def _list(self, *, consistent: bool) -> None:
        first = not self._synced.is_set()
        self._count("lists")
        if not first:
            self._count("relists")
        # RV "0" lets the API server answer from its watch cache (cheap at
        # fleet scale); after a 410 we ask for a consistent read instead.
        rv_arg = {} if consistent else {"resource_version": "0"}
        resp = self._request(
            _request_timeout=(self._opts.connect_timeout, self._opts.list_timeout), **rv_arg
        )
        try:
            body = json.loads(resp.read())
        finally:
            self._done(resp)
        if not isinstance(body, dict):
            raise _StreamError("list body is not an object")
        list_rv = _rv_of(body)
        items = body.get("items") or []
        if list_rv is None or not isinstance(items, list):
            raise _StreamError("list without metadata.resourceVersion or items")
        self._replace(items)
        with self._lock:
            self._rv = list_rv
        if first:
            self._synced.set()
            if self._on_synced is not None:
                try:
                    self._on_synced(self.kind)
                except Exception:
                    log.exception("%s reflector: on_synced hook failed", self.kind)

    def _replace(self, items: list[Any]) -> None:
        first = not self._synced.is_set()
        listed: dict[Key, Mapping[str, Any]] = {}
        upserts: list[Mapping[str, Any]] = []
        for item in items:
            if not isinstance(item, Mapping):
                self._count("errors")  # not even an object: nothing to hand on
                continue
            key = _key_of(item)
            if key is None:
                upserts.append(item)
                continue
            listed[key] = item
            old = self._known.get(key)
            if first or old is None or _rv_of(old) is None or _rv_of(old) != _rv_of(item):
                upserts.append(item)
        for key, old in self._known.items():
            if key not in listed:
                self._emit("delete", old)
        for item in upserts:
            self._emit("upsert", item)
        self._known = listed

    def _watch(self, backoff: Backoff) -> bool:
        """One watch stream. Returns whether it was healthy; raises on failure."""
        with self._lock:
            restart = self._counts["watches"] > 0
        self._count("watches")
        if restart:
            self._count("watch_restarts")
        timeout = max(1, int(self._opts.watch_timeout * (1.0 + self._rng.random())))
        started = time.monotonic()
        delivered = False
        resp = self._request(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(self._opts.connect_timeout, self._opts.read_timeout),
        )
        try:
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    return True
                self._handle_line(line)
                if not delivered:
                    delivered = True
                    backoff.reset()
        finally:
            self._done(resp)
        return delivered or time.monotonic() - started >= self._opts.healthy_stream_seconds

    def _handle_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError as exc:
            # A torn line means we may have lost an event: resume from the last
            # good resourceVersion rather than guess.
            raise _StreamError(f"undecodable watch event: {exc}") from exc
        if not isinstance(event, dict):
            raise _StreamError("watch event is not an object")
        typ, obj = event.get("type"), event.get("object")
        if typ == "ERROR":
            code = obj.get("code") if isinstance(obj, Mapping) else None
            if code == 410:
                raise _Expired()
            msg = obj.get("message") if isinstance(obj, Mapping) else obj
            raise _StreamError(f"watch ERROR event (code {code}): {msg}")
        if not isinstance(obj, Mapping):
            self._count("errors")  # nothing we could hand on; keep streaming
            return
        rv = _rv_of(obj)
        if typ == "BOOKMARK":
            self._count("bookmarks")
        elif typ in ("ADDED", "MODIFIED"):
            key = _key_of(obj)
            if key is not None:
                self._known[key] = obj
            self._emit("upsert", obj)
        elif typ == "DELETED":
            key = _key_of(obj)
            if key is not None:
                self._known.pop(key, None)
            self._emit("delete", obj)
        else:
            self._count("errors")
            log.warning("%s reflector: unknown watch event type %r", self.kind, typ)
        if rv is not None:
            with self._lock:
                self._rv = rv

    def _emit(self, action: Action, obj: Mapping[str, Any]) -> None:
        self._count("events")
        event = ObjectEvent(action, self.kind, obj, "api")
        try:
            if isinstance(self._sink, queue.Queue):
                self._sink.put(event)
            else:
                self._sink(event)
        except Exception:
            # A consumer bug must not kill the watch; the state is
            # reconciled by later events or the next relist.
            self._count("errors")
            log.exception("%s reflector: event sink failed", self.kind)


def _abort(resp: Any) -> None:
    """Unblock a thread reading ``resp`` right now."""
    shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3
    if callable(shutdown):
        with suppress(Exception):
            shutdown()
            return
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _is_read_timeout(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError) or type(cur).__name__ == "ReadTimeoutError":
            return True
        nxt = getattr(cur, "reason", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------
# the source: three reflectors
# --------------------------------------------------------------------------


class KubeSource:
    """Services, EndpointSlices and (when ``node_name`` is set) this Node.

    ``synced()`` is true once every reflector's first list has been delivered.
    """

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        sink: EventSink,
        *,
        node_name: str = "",
        proxy_name: str | None = None,
        options: ReflectorOptions | None = None,
        on_synced: Callable[[str], None] | None = None,
        on_count: CountHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        specs = [service_spec(proxy_name), endpoint_slice_spec()]
        if node_name:
            specs.append(node_spec(node_name))
        self.reflectors: dict[str, Reflector] = {
            s.kind: Reflector(
                api_client,
                s,
                sink,
                options=options,
                on_synced=on_synced,
                on_count=on_count,
                rng=rng,
            )
            for s in specs
        }

    def start(self) -> None:
        for r in self.reflectors.values():
            r.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop every reflector; True when all threads ended within ``timeout``."""
        for r in self.reflectors.values():
            r.stop()
        deadline = time.monotonic() + timeout
        return all(r.join(max(0.0, deadline - time.monotonic())) for r in self.reflectors.values())

    def synced(self) -> bool:
        return all(r.synced for r in self.reflectors.values())

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.reflectors.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.wait_synced(left):
                return False
        return True

    def stats(self) -> dict[str, ReflectorStats]:
        return {k: r.stats() for k, r in self.reflectors.items()}

    def __enter__(self) -> KubeSource:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
