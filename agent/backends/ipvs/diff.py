"""diff(desired, current) -> the minimal IPVS operations (pure).

Ownership rule: a virtual server in the kernel is ours when
  - it is in the desired state, or
  - its address is bound to kube-ipvs0 (only we put addresses there), or
  - its key is in ``owned_keys``: what this process applied before, plus the
    NodePort virtual servers whose port is in our KUBE-NODE-PORT-* ipsets
    (the applier reads those back, so ownership survives a restart).
Anything else (virtual servers on node addresses made by keepalived, an
admin's ipvsadm, another proxy) is never touched.

Graceful termination (upstream graceful_termination.go): a TCP real server
that leaves the plan is set to weight 0, so IPVS sends it no new connections
while established ones continue; it is deleted once its active + inactive
connection count is 0, or after ``max_drain`` seconds (upstream waits without
a bound; a bound keeps a single never-ending connection from pinning a dead
endpoint forever, kubernetes #81308). UDP and SCTP real servers are deleted
at once: with expire_nodest_conn=1 their flows move on at the next packet.
A draining real server that comes back into the plan gets its weight back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.backends.ipvs.model import (
    CurrentRealServer,
    CurrentService,
    DesiredService,
    RealServer,
    RSKey,
    VirtualServer,
    VSKey,
    graceful_termination_needed,
)

OpKind = Literal[
    "add-service", "update-service", "del-service", "add-dest", "update-dest", "del-dest"
]

# Upstream has no bound; 15 minutes is IPVS's own TCP established timeout, so
# an idle connection would have expired by then anyway.
DEFAULT_MAX_DRAIN = 15 * 60.0

DrainKey = tuple[VSKey, RSKey]


@dataclass(frozen=True)
class Op:
    kind: OpKind
    vs: VirtualServer
    dest: RealServer | None = None
    reason: str = ""

    def __str__(self) -> str:
        target = f"{self.vs} -> {self.dest}" if self.dest else str(self.vs)
        weight = f" weight {self.dest.weight}" if self.dest and self.kind != "del-dest" else ""
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.kind} {target}{weight}{why}"


@dataclass(frozen=True)
class DiffResult:
    ops: tuple[Op, ...]
    # Real servers now draining, with the time their drain began.
    draining: Mapping[DrainKey, float] = field(default_factory=dict)


def _drain(
    vs: VirtualServer,
    rs: CurrentRealServer,
    since: float | None,
    now: float,
    max_drain: float | None,
) -> tuple[Op | None, float | None]:
    """What to do with a real server that left the plan: (op, drain start or None)."""
    dest = RealServer(rs.address, rs.port, 0)
    if not graceful_termination_needed(vs.protocol):
        return Op("del-dest", vs, dest, f"{vs.protocol} real server: deleted at once"), None
    if rs.connections == 0:
        return Op("del-dest", vs, dest, "no connections left"), None
    start = now if since is None else since
    if max_drain is not None and now - start >= max_drain:
        return Op(
            "del-dest", vs, dest, f"drain timeout ({max_drain:.0f}s) with {rs.connections} conns"
        ), None
    if rs.weight != 0:
        why = f"draining: {rs.active} active, {rs.inactive} inactive connection(s)"
        return Op("update-dest", vs, dest, why), start
    return None, start


def diff(
    desired: Mapping[VSKey, DesiredService],
    current: Mapping[VSKey, CurrentService],
    *,
    owned_keys: Collection[VSKey] = (),
    owned_addresses: Collection[str] = (),
    draining_since: Mapping[DrainKey, float] | None = None,
    now: float = 0.0,
    max_drain: float | None = DEFAULT_MAX_DRAIN,
) -> DiffResult:
    """Operations that turn ``current`` into ``desired``, in a safe order:
    services first (so their real servers can be added), then real servers,
    then drains and deletions, then services we no longer want."""
    draining_since = draining_since or {}
    adds: list[Op] = []
    dests: list[Op] = []
    removals: list[Op] = []
    del_services: list[Op] = []
    draining: dict[DrainKey, float] = {}

    for key in sorted(desired):
        want = desired[key]
        have = current.get(key)
        if have is None:
            adds.append(Op("add-service", want.vs))
            dests.extend(Op("add-dest", want.vs, r) for r in want.reals)
            continue
        if not want.vs.same_settings(have.vs):
            adds.append(Op("update-service", want.vs, None, _what_changed(have.vs, want.vs)))
        have_rs = {r.key: r for r in have.reals}
        want_keys = set()
        for r in want.reals:
            want_keys.add(r.key)
            cur = have_rs.get(r.key)
            if cur is None:
                dests.append(Op("add-dest", want.vs, r))
            elif cur.weight != r.weight:
                why = "back in the plan" if cur.weight == 0 else "weight"
                dests.append(Op("update-dest", want.vs, r, why))
        for rkey in sorted(set(have_rs) - want_keys):
            op, start = _drain(
                want.vs, have_rs[rkey], draining_since.get((key, rkey)), now, max_drain
            )
            if op is not None:
                removals.append(op)
            if start is not None:
                draining[(key, rkey)] = start

    owned_keys = set(owned_keys)
    owned_addresses = set(owned_addresses)
    for key in sorted(set(current) - set(desired)):
        have = current[key]
        if key not in owned_keys and have.vs.address not in owned_addresses:
            continue  # not ours: never touched
        del_services.append(Op("del-service", have.vs, None, "no longer in the plan"))

    return DiffResult(tuple(adds + dests + removals + del_services), draining)


def _what_changed(old: VirtualServer, new: VirtualServer) -> str:
    parts = []
    if old.scheduler != new.scheduler:
        parts.append(f"scheduler {old.scheduler} -> {new.scheduler}")
    if old.persistent != new.persistent or old.timeout != new.timeout:
        a = f"persistent {old.timeout}s" if old.persistent else "not persistent"
        b = f"persistent {new.timeout}s" if new.persistent else "not persistent"
        parts.append(f"{a} -> {b}")
    if not parts:
        parts.append(f"flags {old.flags:#x} -> {new.flags:#x}")
    return ", ".join(parts)
