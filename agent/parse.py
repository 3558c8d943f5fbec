"""Raw API objects (JSON-decoded dicts) -> validated model values.

Every source hands the state raw dicts; this module is the one place that
trusts nothing about them. A problem that makes an object unusable raises
``Invalid``; a problem confined to one endpoint is collected and that
endpoint alone is skipped, as kube-proxy's endpointslicecache.go does.
"""

from __future__ import annotations

import ipaddress
import operator
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    TRAFFIC_CLUSTER,
    TRAFFIC_LOCAL,
    ZONE_LABEL,
    Endpoint,
    NodeInfo,
    ServicePort,
    ServicePortName,
    ip_family,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input object, in the user-facing form
    ``origin kind namespace/name: field: problem``."""

    origin: str
    kind: str
    namespace: str
    name: str
    field: str
    message: str
    # A short, stable label for the metric (e.g. "invalid-ip").
    reason: str = "invalid"

    def __str__(self) -> str:
        obj = f"{self.namespace}/{self.name}" if self.namespace else (self.name or "?")
        where = f"{self.origin} " if self.origin else ""
        return f"{where}{self.kind} {obj}: {self.field}: {self.message}"


class Invalid(Exception):
    """The object cannot be used at all."""

    def __init__(self, field: str, message: str, reason: str = "invalid") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


# ---------------------------------------------------------------- helpers


def _map(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Invalid(field, f"expected an object, got {type(value).__name__}", "wrong-type")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(field, f"expected a list, got {type(value).__name__}", "wrong-type")
    return value


def _str(value: Any, field: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise Invalid(field, f"expected a string, got {value!r}", "wrong-type")
    return value


def canonical_ip(text: str) -> str | None:
    """The canonical form of an address, or None when it is not one.

    inet_pton/inet_ntop first: on 100k-endpoint clusters the ipaddress
    module was the largest cost of loading state (measured with
    bench/plan_scale.py); it remains the judge for anything unusual.
    """
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        canonical = socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        canonical = None
    if canonical == text:
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _ip(value: Any, field: str) -> str:
    text = _str(value, field)
    canonical = canonical_ip(text)
    if canonical is None:
        raise Invalid(field, f"invalid IP address {text!r}", "invalid-ip")
    return canonical


def _cidr(value: Any, field: str) -> str:
    text = _str(value, field).strip()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise Invalid(field, f"invalid CIDR {text!r}", "invalid-cidr") from None


def _port(value: Any, field: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(field, f"expected a port number, got {value!r}", "invalid-port")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise Invalid(field, f"port {value} out of range {low}-65535", "invalid-port")
    return value


def _bool(value: Any, field: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Invalid(field, f"expected true or false, got {value!r}", "wrong-type")
    return value


def _protocol(value: Any, field: str) -> str:
    proto = _str(value, field, "TCP")
    if proto not in PROTOCOLS:
        raise Invalid(field, f"unknown protocol {proto!r}", "invalid-protocol")
    return proto


def metadata(obj: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any]]:
    """(namespace, name, labels), raising Invalid when the name is missing."""
    meta = _map(obj.get("metadata"), "metadata")
    name = _str(meta.get("name"), "metadata.name")
    if not name:
        raise Invalid("metadata.name", "missing", "missing-field")
    namespace = _str(meta.get("namespace"), "metadata.namespace", "default")
    labels = _map(meta.get("labels"), "metadata.labels")
    return namespace, name, labels


# ---------------------------------------------------------------- services


@dataclass(frozen=True)
class ParsedService:
    """A Service reduced to its ports, or the reason it is not ours."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...] = ()
    skip_reason: str = ""


def owner_skip_reason(labels: Mapping[str, Any], proxy_name: str) -> str:
    """Why a service is left to someone else (kube-proxy's label selector)."""
    if HEADLESS_LABEL in labels:
        return f"headless ({HEADLESS_LABEL} label)"
    owner = labels.get(PROXY_NAME_LABEL)
    if owner is None:
        return "" if not proxy_name else f"no {PROXY_NAME_LABEL} label (we are {proxy_name!r})"
    if owner != proxy_name:
        return f"owned by service proxy {owner!r} ({PROXY_NAME_LABEL} label)"
    return ""


def parse_service(obj: Mapping[str, Any], proxy_name: str = "") -> ParsedService:
    namespace, name, labels = metadata(obj)
    spec = _map(obj.get("spec"), "spec")
    svc_type = _str(spec.get("type"), "spec.type", "ClusterIP")

    reason = owner_skip_reason(labels, proxy_name)
    if not reason and svc_type == "ExternalName":
        reason = "type ExternalName"
    if reason:
        return ParsedService(namespace, name, skip_reason=reason)

    cluster_ips = _cluster_ips(spec)
    if not cluster_ips or cluster_ips[0] == "None":
        return ParsedService(namespace, name, skip_reason="headless (clusterIP None)")
    ips = tuple(_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(cluster_ips))

    external_ips = tuple(
        _ip(ip, f"spec.externalIPs[{i}]")
        for i, ip in enumerate(_list(spec.get("externalIPs"), "spec.externalIPs"))
    )
    ranges = tuple(
        _cidr(c, f"spec.loadBalancerSourceRanges[{i}]")
        for i, c in enumerate(
            _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
        )
    )
    lb_ips = _load_balancer_ips(obj)
    affinity = _affinity(spec)
    itp = _policy(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy")
    etp = _policy(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy")
    hc_port: int | None = None
    if spec.get("healthCheckNodePort") not in (None, 0):
        hc_port = _port(spec.get("healthCheckNodePort"), "spec.healthCheckNodePort")
    # Upstream serves a health check only for LoadBalancer + Local
    # (apiservice.NeedsHealthCheck).
    if not (svc_type == "LoadBalancer" and etp == TRAFFIC_LOCAL):
        hc_port = None

    ports = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(_list(spec.get("ports"), "spec.ports")):
        field = f"spec.ports[{i}]"
        raw = _map(raw, field)
        port_name = _str(raw.get("name"), f"{field}.name")
        protocol = _protocol(raw.get("protocol"), f"{field}.protocol")
        if (port_name, protocol) in seen:
            raise Invalid(f"{field}.name", f"duplicate port {port_name!r}/{protocol}", "duplicate")
        seen.add((port_name, protocol))
        node_port = raw.get("nodePort")
        ports.append(
            ServicePort(
                name=ServicePortName(namespace, name, port_name, protocol),
                cluster_ips=ips,
                port=_port(raw.get("port"), f"{field}.port"),
                node_port=_port(node_port, f"{field}.nodePort") if node_port else None,
                external_ips=external_ips,
                load_balancer_ips=lb_ips,
                load_balancer_source_ranges=ranges,
                affinity_timeout=affinity,
                internal_traffic_policy=itp,
                external_traffic_policy=etp,
                health_check_node_port=hc_port,
            )
        )
    return ParsedService(namespace, name, tuple(ports))


def _cluster_ips(spec: Mapping[str, Any]) -> list[str]:
    ips = [_str(ip, "spec.clusterIPs") for ip in _list(spec.get("clusterIPs"), "spec.clusterIPs")]
    if not ips:
        single = _str(spec.get("clusterIP"), "spec.clusterIP")
        ips = [single] if single else []
    return ips


def _load_balancer_ips(obj: Mapping[str, Any]) -> tuple[str, ...]:
    status = _map(obj.get("status"), "status")
    lb = _map(status.get("loadBalancer"), "status.loadBalancer")
    ips = []
    for i, ing in enumerate(_list(lb.get("ingress"), "status.loadBalancer.ingress")):
        field = f"status.loadBalancer.ingress[{i}]"
        ing = _map(ing, field)
        if not ing.get("ip"):
            continue  # hostname-only ingress: nothing to program
        # ipMode "Proxy": the load balancer delivers to the node itself, so
        # kube-proxy must not capture the VIP (KEP-1860).
        if _str(ing.get("ipMode"), f"{field}.ipMode", "VIP") != "VIP":
            continue
        ips.append(_ip(ing.get("ip"), f"{field}.ip"))
    return tuple(ips)


def _affinity(spec: Mapping[str, Any]) -> int | None:
    kind = _str(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    if kind == "None":
        return None
    if kind != "ClientIP":
        raise Invalid("spec.sessionAffinity", f"unknown value {kind!r}", "invalid-value")
    config = _map(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client = _map(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= 86400:
        raise Invalid(field, f"expected 1-86400 seconds, got {timeout!r}", "invalid-value")
    return timeout


def _policy(value: Any, field: str) -> str:
    policy = _str(value, field, TRAFFIC_CLUSTER)
    if policy not in (TRAFFIC_CLUSTER, TRAFFIC_LOCAL):
        raise Invalid(field, f"unknown traffic policy {policy!r}", "invalid-value")
    return policy


# ---------------------------------------------------------------- slices


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """One endpoint of a slice, before it is bound to a port and a node."""

    ip: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str
    zone: str
    zone_hints: frozenset[str]
    node_hints: frozenset[str]

    def bind(self, port: int, node_name: str) -> Endpoint:
        # Positional: called once per (endpoint, port) on every merge, and
        # keyword passing is measurably slower at 100k endpoints.
        return Endpoint(
            self.ip,
            port,
            self.ready,
            self.serving,
            self.terminating,
            self.node_name,
            self.zone,
            self.zone_hints,
            self.node_hints,
            bool(node_name) and self.node_name == node_name,
        )


@dataclass(frozen=True, slots=True)
class ParsedSlice:
    namespace: str
    name: str
    # "" when the slice has no kubernetes.io/service-name label.
    service: str
    family: int  # 4, 6, or 0 for FQDN (ignored)
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    # Per-endpoint problems; those endpoints are left out.
    problems: tuple[tuple[str, str, str], ...] = ()
    # endpoints.kubernetes.io/last-change-trigger-time, for the metric.
    trigger_time: str = ""


def parse_slice(obj: Mapping[str, Any]) -> ParsedSlice:
    namespace, name, labels = metadata(obj)
    service = _str(labels.get(SERVICE_NAME_LABEL), f"metadata.labels[{SERVICE_NAME_LABEL}]")
    meta = _map(obj.get("metadata"), "metadata")
    annotations = _map(meta.get("annotations"), "metadata.annotations")
    trigger = annotations.get("endpoints.kubernetes.io/last-change-trigger-time")
    trigger_time = trigger if isinstance(trigger, str) else ""
    address_type = _str(obj.get("addressType"), "addressType")
    if address_type == "FQDN":
        return ParsedSlice(namespace, name, service, 0, (), ())
    if address_type not in ADDRESS_TYPES:
        raise Invalid("addressType", f"unknown address type {address_type!r}", "invalid-value")
    family = ADDRESS_TYPES[address_type]

    ports = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        field = f"ports[{i}]"
        raw = _map(raw, field)
        # A port without a number means "all ports", which kube-proxy does
        # not implement: it skips such ports (endpointslicecache.go).
        if raw.get("port") in (None, 0):
            continue
        ports.append(
            SlicePort(
                name=_str(raw.get("name"), f"{field}.name"),
                protocol=_protocol(raw.get("protocol"), f"{field}.protocol"),
                port=_port(raw.get("port"), f"{field}.port"),
            )
        )

    endpoints = []
    problems = []
    for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        # Nearly every endpoint is well formed: take the cheap path, and
        # only for the rest build field names and run the careful checks,
        # which alone decide the error (tests pin the messages).
        fast = _slice_endpoint_fast(raw, family)
        if fast is not None:
            endpoints.append(fast)
            continue
        try:
            endpoints.append(
                _slice_endpoint(_map(raw, f"endpoints[{i}]"), f"endpoints[{i}]", family)
            )
        except Invalid as bad:
            problems.append((bad.field, bad.message, bad.reason))
    # Sorted by address, as upstream sorts slice endpoints, so the merge
    # below never depends on the order a controller happened to write.
    endpoints.sort(key=_by_ip)
    return ParsedSlice(
        namespace,
        name,
        service,
        family,
        tuple(ports),
        tuple(endpoints),
        tuple(problems),
        trigger_time,
    )


_by_ip = operator.attrgetter("ip")

# Shared by every endpoint without hints (most of them): one object instead
# of two new frozensets per endpoint.
_NO_HINTS: frozenset[str] = frozenset()


def _slice_endpoint_fast(raw: Any, family: int) -> SliceEndpoint | None:
    """``_slice_endpoint`` for the common shape, or None to take the careful path.

    Accepts only what the careful path accepts and returns what it returns
    (tests/unit/test_parse_fast.py pins that); anything unusual (a missing
    or mistyped field, a non-canonical address, a Mapping that is not a
    dict) is left to ``_slice_endpoint``, which owns every error message.
    """
    if type(raw) is not dict:
        return None
    addresses = raw.get("addresses")
    if type(addresses) is not list or not addresses:
        return None
    ip = addresses[0]
    if type(ip) is not str or canonical_ip(ip) != ip or (":" in ip) != (family == 6):
        return None
    cond = raw.get("conditions")
    if cond is None:
        ready = serving = True
        terminating = False
    elif type(cond) is dict:
        ready = cond.get("ready", True)
        serving = cond.get("serving", True)
        terminating = cond.get("terminating", False)
        # ``is True/False`` because bool cannot be subclassed; None (an
        # explicit null) means the default, and the careful path handles it.
        if (
            (ready is not True and ready is not False)
            or (serving is not True and serving is not False)
            or (terminating is not True and terminating is not False)
        ):
            return None
    else:
        return None
    node_name = raw.get("nodeName", "")
    zone = raw.get("zone", "")
    if type(node_name) is not str or type(zone) is not str:
        return None
    hints = raw.get("hints")
    if hints is None:
        zone_hints = node_hints = _NO_HINTS
    else:
        if type(hints) is not dict:
            return None
        fz = _hint_names_fast(hints.get("forZones"))
        fn = _hint_names_fast(hints.get("forNodes"))
        if fz is None or fn is None:
            return None
        zone_hints, node_hints = fz, fn
    return SliceEndpoint(ip, ready, serving, terminating, node_name, zone, zone_hints, node_hints)


def _hint_names_fast(value: Any) -> frozenset[str] | None:
    """``_hint_names`` for well-formed hints, or None for the careful path."""
    if value is None:
        return _NO_HINTS
    if type(value) is not list:
        return None
    names = set()
    for hint in value:
        if type(hint) is not dict:
            return None
        name = hint.get("name", "")
        if type(name) is not str:
            return None
        if name:
            names.add(name)
    return frozenset(names) if names else _NO_HINTS


def _slice_endpoint(raw: Mapping[str, Any], field: str, family: int) -> SliceEndpoint:
    addresses = _list(raw.get("addresses"), f"{field}.addresses")
    if not addresses:
        raise Invalid(f"{field}.addresses", "endpoint has no address", "no-address")
    # Only the first address counts (API contract; kube-proxy does the same).
    ip = _ip(addresses[0], f"{field}.addresses[0]")
    if ip_family(ip) != family:
        raise Invalid(
            f"{field}.addresses[0]", f"{ip} is not an IPv{family} address", "wrong-family"
        )
    cond = _map(raw.get("conditions"), f"{field}.conditions")
    hints = _map(raw.get("hints"), f"{field}.hints")
    return SliceEndpoint(
        ip=ip,
        ready=_bool(cond.get("ready"), f"{field}.conditions.ready", True),
        serving=_bool(cond.get("serving"), f"{field}.conditions.serving", True),
        terminating=_bool(cond.get("terminating"), f"{field}.conditions.terminating", False),
        node_name=_str(raw.get("nodeName"), f"{field}.nodeName"),
        zone=_str(raw.get("zone"), f"{field}.zone"),
        zone_hints=_hint_names(hints.get("forZones"), f"{field}.hints.forZones"),
        node_hints=_hint_names(hints.get("forNodes"), f"{field}.hints.forNodes"),
    )


def _hint_names(value: Any, field: str) -> frozenset[str]:
    names = set()
    for i, hint in enumerate(_list(value, field)):
        name = _str(_map(hint, f"{field}[{i}]").get("name"), f"{field}[{i}].name")
        if name:
            names.add(name)
    return frozenset(names)


# ---------------------------------------------------------------- nodes


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    meta = _map(obj.get("metadata"), "metadata")
    name = _str(meta.get("name"), "metadata.name")
    if not name:
        raise Invalid("metadata.name", "missing", "missing-field")
    labels = _map(meta.get("labels"), "metadata.labels")
    zone = _str(labels.get(ZONE_LABEL), f"metadata.labels[{ZONE_LABEL}]")
    status = _map(obj.get("status"), "status")
    addresses = []
    for i, addr in enumerate(_list(status.get("addresses"), "status.addresses")):
        addr = _map(addr, f"status.addresses[{i}]")
        if addr.get("type") in ("InternalIP", "ExternalIP"):
            addresses.append(_ip(addr.get("address"), f"status.addresses[{i}].address"))
    return NodeInfo(name=name, zone=zone, addresses=tuple(addresses))
