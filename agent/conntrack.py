"""Stale UDP conntrack flows: which ones to delete after a sync (pure).

Why: UDP has no connection close. A client that keeps sending from one
socket reuses one conntrack entry, and the entry keeps the NAT decision of
its first packet for as long as packets keep coming (nf_conntrack_udp_timeout
is refreshed by every datagram). When the endpoint it was DNATed to goes
away, or when its first packet was sent while the service had no rules and
went out un-NATed, the client is pinned to a dead target and never reaches
the new endpoints (kubernetes/kubernetes #19029, #48370, #125467). kube-proxy
repairs this after every sync; so do we.

The semantics are upstream's current ones (pkg/proxy/conntrack/cleanup.go,
``CleanStaleEntries``; v1.33):

* only UDP service ports are looked at (SCTP and TCP are not: upstream skips
  them, TCP flows end on their own with an RST from the dead path);
* a service port's *serving* endpoints count, whatever topology, traffic
  policy or terminating state say: "changes to the service should not affect
  existing flows", so a flow to a serving-terminating or other-zone endpoint
  is left alone, as a TCP connection would be;
* a service port without serving endpoints is skipped: nothing better to
  send its flows to;
* a UDP flow is stale when its original destination is one of the service
  port's frontends - cluster IP, external IP or load-balancer IP with the
  service port, or any address with the NodePort - and its reply source
  ``ip:port`` is not a serving endpoint. That covers both the dead-endpoint
  case and flows that were never DNATed (their reply source is the VIP or
  the node itself);
* services that disappear are not cleaned (upstream neither).

Dump-and-filter, not targeted deletion by plan difference. The older
kube-proxy (pkg/proxy/iptables/proxier.go ``deleteUDPEndpointConnections``
and the cluster-IP clearing for services that gained endpoints) derived
``conntrack -D`` filters from the old/new difference alone. That misses what
happened while no difference was being watched: flows left by a previous
run of the agent, a cleanup that failed, or ``sliceproxy apply`` without a
state file. Upstream moved to listing flows and deleting the ones whose
reply source is not serving, which repairs all of those; we do the same
with ``conntrack -L`` (one dump per family). The old/new plan difference is
still used, but only to *scope* the work: a UDP service port whose frontends
and serving endpoints did not change cannot have gained stale flows, so a
sync that touched no UDP service port costs nothing (upstream dumps on every
sync; at our min-sync-period on a node with a big conntrack table that
would be the dominant cost). Without an old plan everything is in scope.

Deletion goes through ``conntrack -D`` filters, one per distinct stale
(frontend, reply source) pair, not one per flow: conntrack-tools has no
delete-by-exact-tuple list, and one filter removes every client of one dead
endpoint at once. A filter can only match flows the dump would also call
stale (its reply source is not serving), so a flow created between the dump
and the delete is never wrongly removed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.model import ServicePortName, endpoint_key
from agent.plan import NodePlan, PlanKey, ServicePortPlan

# What conntrack calls the families (``-f``).
CONNTRACK_FAMILY = {4: "ipv4", 6: "ipv6"}


@dataclass(frozen=True, order=True)
class UdpFrontends:
    """One UDP service port in one family, as the cleanup sees it."""

    family: int
    # Cluster IP, external IPs, load-balancer IPs (this family only).
    ips: tuple[str, ...]
    port: int
    node_port: int | None
    # Serving endpoints as ``ip:port`` (``[ip]:port`` for IPv6).
    serving: frozenset[str]


@dataclass(frozen=True)
class Flow:
    """The parts of one conntrack entry the decision needs."""

    family: int
    protocol: str
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_sport: int


@dataclass(frozen=True, order=True)
class Deletion:
    """One ``conntrack -D`` filter: UDP flows to a frontend whose reply
    source is ``reply_src:reply_port``. ``orig_dst`` None = any destination
    with ``orig_port`` (a NodePort)."""

    family: int
    orig_dst: str | None
    orig_port: int
    reply_src: str
    reply_port: int

    def argv(self) -> list[str]:
        argv = ["conntrack", "-D", "-f", CONNTRACK_FAMILY[self.family], "-p", "udp"]
        if self.orig_dst is not None:
            argv += ["--orig-dst", self.orig_dst]
        argv += ["--orig-port-dst", str(self.orig_port)]
        argv += ["--reply-src", self.reply_src, "--reply-port-src", str(self.reply_port)]
        return argv

    def __str__(self) -> str:
        dst = (
            endpoint_key(self.orig_dst, self.orig_port) if self.orig_dst else f"*:{self.orig_port}"
        )
        return f"udp {dst} reply-src {endpoint_key(self.reply_src, self.reply_port)}"


# ---------------------------------------------------------------- the plan side


def serving_keys(entry: ServicePortPlan) -> frozenset[str]:
    """The serving endpoints of a plan entry, as ``ip:port`` keys.

    Plans built without the serving list (hand-made ones in tests) fall back
    to the reachable endpoints, which are always serving.
    """
    endpoints = entry.serving or entry.decision.all_reachable
    return frozenset(e.key for e in endpoints if e.serving)


def udp_frontends(plan: NodePlan | None) -> dict[PlanKey, UdpFrontends]:
    """Every UDP service port (per family) that has serving endpoints."""
    return {} if plan is None else frontends_of(plan.entries.values())


def frontends_of(entries: Iterable[ServicePortPlan]) -> dict[PlanKey, UdpFrontends]:
    """The UDP frontends of some plan entries (those with serving endpoints)."""
    out: dict[PlanKey, UdpFrontends] = {}
    for entry in entries:
        key = entry.key
        svc = entry.service
        if svc.protocol.upper() != "UDP":
            continue
        serving = serving_keys(entry)
        if not serving:
            continue  # upstream: nothing better to send these flows to
        cluster_ip = svc.cluster_ip(entry.family)
        ips = tuple(
            dict.fromkeys(
                ([cluster_ip] if cluster_ip else [])
                + list(svc.external_ips_of(entry.family))
                + list(svc.load_balancer_ips_of(entry.family))
            )
        )
        out[key] = UdpFrontends(entry.family, ips, svc.port, svc.node_port, serving)
    return out


def in_scope(
    old: Mapping[PlanKey, UdpFrontends] | None, new: Mapping[PlanKey, UdpFrontends]
) -> tuple[UdpFrontends, ...]:
    """The frontends that may have stale flows after going from ``old`` to ``new``.

    ``old`` None (first sync, restart, apply without state): all of them.
    Otherwise the ones that are new or differ in any way (an endpoint gone,
    endpoints after none, an IP or NodePort added).
    """
    if old is None:
        return tuple(sorted(new.values()))
    return tuple(sorted(f for key, f in new.items() if old.get(key) != f))


# ---------------------------------------------------------------- the kernel side


def parse_flows(text: str, family: int) -> list[Flow]:
    """``conntrack -L`` output (default or ``-o extended``) -> flows.

    Each line carries the original tuple's ``src= dst= sport= dport=`` first
    and the reply tuple's after it; flags (``[UNREPLIED]``) and counters are
    ignored. Lines that are not flows (the trailing summary goes to stderr,
    but be lenient) are skipped.
    """
    flows = []
    for line in text.splitlines():
        words = line.split()
        proto = next((w for w in words if w in ("udp", "tcp", "sctp", "icmp", "icmpv6")), None)
        if proto is None:
            continue
        tuples: list[dict[str, str]] = [{}, {}]
        side = 0
        for word in words:
            name, eq, value = word.partition("=")
            if not eq or name not in ("src", "dst", "sport", "dport"):
                continue
            if name in tuples[side] and side == 0:
                side = 1
            tuples[side].setdefault(name, value)
        orig, reply = tuples
        if family == 6:
            # Compare as the plan writes addresses (normalize_ip).
            for t in tuples:
                for k in ("src", "dst"):
                    if k in t:
                        t[k] = _canonical(t[k])
        try:
            flows.append(
                Flow(
                    family=family,
                    protocol=proto,
                    orig_src=orig["src"],
                    orig_dst=orig["dst"],
                    orig_sport=int(orig.get("sport", 0)),
                    orig_dport=int(orig.get("dport", 0)),
                    reply_src=reply["src"],
                    reply_sport=int(reply.get("sport", 0)),
                )
            )
        except (KeyError, ValueError):
            continue
    return flows


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def stale_deletions(
    frontends: Iterable[UdpFrontends],
    flows: Iterable[Flow],
    scope: Iterable[UdpFrontends] | None = None,
) -> tuple[Deletion, ...]:
    """The ``conntrack -D`` filters that remove every stale flow (sorted, deduplicated).

    ``frontends`` classify the flows (pass all of them); only flows of a
    frontend in ``scope`` (default: all) are deleted.

    A flow to a frontend IP:port is judged by that service port alone.
    Upstream falls through to the NodePort check when the reply source *is*
    serving, so a flow to a service port numbered like another service's
    NodePort would be deleted on every sync; we do not copy that.
    """
    by_ip: dict[tuple[int, str, int], UdpFrontends] = {}
    by_node_port: dict[tuple[int, int], UdpFrontends] = {}
    for f in frontends:
        for ip in f.ips:
            by_ip[(f.family, ip, f.port)] = f
        if f.node_port:
            by_node_port[(f.family, f.node_port)] = f
    wanted = None if scope is None else set(scope)
    out: set[Deletion] = set()
    for flow in flows:
        if flow.protocol != "udp":
            continue
        reply = endpoint_key(flow.reply_src, flow.reply_sport)
        dst: str | None = flow.orig_dst
        front = by_ip.get((flow.family, flow.orig_dst, flow.orig_dport))
        if front is None:
            dst, front = None, by_node_port.get((flow.family, flow.orig_dport))
        if front is None or reply in front.serving:
            continue
        if wanted is None or front in wanted:
            out.add(Deletion(flow.family, dst, flow.orig_dport, flow.reply_src, flow.reply_sport))
    return tuple(sorted(out, key=_deletion_order))


def _deletion_order(d: Deletion) -> tuple[int, str, int, str, int]:
    return (d.family, d.orig_dst or "", d.orig_port, d.reply_src, d.reply_port)


# ---------------------------------------------------------------- state file


def frontends_to_json(frontends: Mapping[PlanKey, UdpFrontends]) -> list[dict[str, object]]:
    """For ``sliceproxy apply``'s state file: the previous run's frontends."""
    return [
        {
            "key": [key[0].namespace, key[0].name, key[0].port, key[0].protocol, key[1]],
            "ips": list(f.ips),
            "port": f.port,
            "node_port": f.node_port,
            "serving": sorted(f.serving),
        }
        for key, f in sorted(frontends.items())
    ]


def frontends_from_json(raw: object) -> dict[PlanKey, UdpFrontends] | None:
    """The inverse of :func:`frontends_to_json`; None when unreadable."""
    if not isinstance(raw, list):
        return None
    out: dict[PlanKey, UdpFrontends] = {}
    try:
        for item in raw:
            *name, family = item["key"]
            key = (ServicePortName(*map(str, name)), int(family))
            node_port = item.get("node_port")
            out[key] = UdpFrontends(
                int(family),
                tuple(str(ip) for ip in item["ips"]),
                int(item["port"]),
                int(node_port) if node_port else None,
                frozenset(str(s) for s in item["serving"]),
            )
    except (KeyError, TypeError, ValueError):
        return None
    return out
