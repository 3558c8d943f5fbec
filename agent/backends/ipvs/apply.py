"""IPVS mode applier: the only code of this backend with side effects.

One sync = render the plan, then bring the kernel to it in an order that
never leaves a hole: ipsets (the iptables rules reference them), addresses
added to kube-ipvs0, IPVS diff applied (diff.py: minimal operations,
graceful termination, foreign virtual servers untouched), iptables chains
restored together with any missing jumps into them, then addresses that
are no longer needed removed.

IPVS has no partial mode worth the name: a sync always diffs the whole
table, which costs one netlink dump and only the operations that changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent.backends.base import SyncResult
from agent.backends.ipvs import ipset as ipsets
from agent.backends.ipvs.diff import DEFAULT_MAX_DRAIN, DrainKey, Op, diff
from agent.backends.ipvs.iptables import IptablesError, IptablesRules
from agent.backends.ipvs.kernel import (
    DummyLink,
    IPVSKernel,
    NoIPVSError,
    ensure_sysctls,
    local_addresses,
)
from agent.backends.ipvs.model import DesiredState, VSKey
from agent.backends.ipvs.render import (
    DUMMY_LINK,
    NODE_PORT_TCP,
    NODE_PORT_UDP,
    SET_INFO,
    IPVSOptions,
    render_state,
    render_text,
    set_name,
)
from agent.model import ServicePortName
from agent.plan import NodePlan

log = logging.getLogger("sliceproxy.ipvs")


def node_local_addresses() -> list[str]:
    """Every address of this node except kube-ipvs0's: where upstream serves
    NodePorts when --nodeport-addresses is empty."""
    return local_addresses(DUMMY_LINK)


@dataclass(frozen=True)
class DrainStatus:
    draining: int
    deleted: int


class IPVSBackend:
    """The Backend protocol for IPVS mode (agent/backends/base.py)."""

    name = "ipvs"

    def __init__(
        self,
        options: IPVSOptions | None = None,
        *,
        max_drain: float | None = DEFAULT_MAX_DRAIN,
        clock: Callable[[], float] = time.monotonic,
        kernel_factory: Callable[[], IPVSKernel] = IPVSKernel,
        iptables: IptablesRules | None = None,
        local_addresses: Callable[[], Sequence[str]] | None = node_local_addresses,
    ) -> None:
        self.iptables = iptables or IptablesRules()
        # Read at every sync, so an address added to the node later gets its
        # NodePorts at the next sync; None = the plan's node addresses.
        self._local_addresses = local_addresses
        self.options = options or IPVSOptions()
        self.max_drain = max_drain
        self.clock = clock
        self._kernel_factory = kernel_factory
        self._kernel: IPVSKernel | None = None
        self.link = DummyLink(DUMMY_LINK)
        self._sysctls_done = False
        self._last: DesiredState | None = None
        # Virtual servers this process put in the kernel (ownership, diff.py).
        self._applied: set[VSKey] = set()
        self._draining: dict[DrainKey, float] = {}
        # Read at the start of each sync, before it changes them: addresses on
        # kube-ipvs0 and NodePorts in our ipsets both mark virtual servers as ours.
        self._bound_before: set[str] = set()
        self._nodeport_owned: set[tuple[str, int]] = set()

    # -- start-up ----------------------------------------------------------

    def check(self) -> None:
        """Fail early, with NoIPVSError's plain message, when there is no IPVS."""
        self.kernel()

    def kernel(self) -> IPVSKernel:
        if self._kernel is None:
            self._kernel = self._kernel_factory()
        return self._kernel

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None

    # -- Backend protocol --------------------------------------------------

    def render(self, plan: NodePlan) -> str:
        return render_text(render_state(plan, self.options))

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        try:
            desired = render_state(plan, self.options, self._nodeport_addresses())
            ops, failed = self._sync(desired)
        except NoIPVSError as err:
            # Checked before anything is touched; the caller prints the message.
            return SyncResult("full", False, error=str(err))
        except (OSError, NetlinkError, ipsets.IPSetError, IptablesError) as err:
            log.error("IPVS sync failed: %s", err)
            return SyncResult("full", False, error=str(err))
        counts = _rule_counts(desired)
        return SyncResult(
            "full",
            not failed,
            service_ports_changed=len(plan.entries) if changed is None else len(changed),
            chains_written=sum(1 for o in ops if o.kind.endswith("service")),
            rules_written=len(ops),
            rule_counts=counts,
            error="; ".join(failed),
        )

    def _nodeport_addresses(self) -> Sequence[str] | None:
        if self.options.nodeport_addresses is not None or self._local_addresses is None:
            return None  # --node-ip given, or the caller wants the plan's addresses
        return self._local_addresses()

    def tick(self) -> None:
        """The runtime's periodic call (Agent, every ``tick_period``): finish
        graceful terminations between syncs, as upstream's one-minute loop does.
        Never raises: a failed check is retried at the next tick or sync."""
        try:
            status = self.drain_tick()
        except (OSError, NetlinkError) as err:
            log.error("IPVS drain check failed: %s", err)
            return
        if status.deleted:
            log.info(
                "ipvs: %d drained real server(s) deleted, %d still draining",
                status.deleted,
                status.draining,
            )

    def drain_tick(self) -> DrainStatus:
        """Re-check draining real servers (the runtime calls this periodically,
        e.g. every minute like upstream's graceful termination loop)."""
        if self._last is None or not self._draining:
            return DrainStatus(len(self._draining), 0)
        ops, _failed = self._sync_ipvs(self._last)
        return DrainStatus(len(self._draining), sum(1 for o in ops if o.kind == "del-dest"))

    def cleanup(self) -> int:
        """Remove our virtual servers, kube-ipvs0, our ipsets and iptables rules."""
        removed = 0
        for fam in (4, 6):
            if self.iptables.available(fam):
                removed += self.iptables.cleanup(fam)
        bound = self.link.addresses()
        try:
            kernel = self.kernel()
        except NoIPVSError:
            kernel = None
        if kernel is not None:
            nodeports = _nodeport_members(ipsets.save())
            for key, cur in kernel.dump().items():
                if key in self._applied or cur.vs.address in bound or (key[0], key[2]) in nodeports:
                    kernel.del_service(cur.vs)
                    removed += 1
        if self.link.delete():
            removed += 1
        names = [set_name(base, fam) for fam in (4, 6) for base in SET_INFO]
        removed += ipsets.destroy(names)
        self._applied.clear()
        self._draining.clear()
        self._last = None
        return removed

    # -- between runs of `sliceproxy apply` ---------------------------------

    def export_state(self) -> dict[str, Any]:
        """What a later process needs: the virtual servers we own and when each
        draining real server began to drain (CLOCK_MONOTONIC: one boot)."""
        return {
            "backend": self.name,
            "applied": sorted([list(k) for k in self._applied]),
            "draining": sorted([[*vk, *rk, since] for (vk, rk), since in self._draining.items()]),
        }

    def import_state(self, data: dict[str, Any]) -> str | None:
        """Adopt export_state()'s output; a reason string when it does not fit."""
        if data.get("backend") != self.name:
            return "state file is not from the ipvs backend"
        try:
            self._applied = {(str(p), str(a), int(n)) for p, a, n in data.get("applied", [])}
            self._draining = {
                ((str(p), str(a), int(n)), (str(ra), int(rn))): float(since)
                for p, a, n, ra, rn, since in data.get("draining", [])
            }
        except (TypeError, ValueError) as err:
            self._applied, self._draining = set(), {}
            return f"unreadable ipvs state: {err}"
        return None

    # -- steps -------------------------------------------------------------

    def _sync(self, desired: DesiredState) -> tuple[list[Op], list[str]]:
        kernel = self.kernel()  # NoIPVSError before anything is touched
        if not self._sysctls_done:
            ensure_sysctls()
            self._sysctls_done = True
        current_sets = ipsets.save()
        self._nodeport_owned = _nodeport_members(current_sets)
        ipsets.restore(ipsets.sync_script(desired.ipsets, current_sets))
        self.link.ensure()
        self._bound_before = self.link.addresses()
        # Bind new service IPs first: a virtual server on an address the node
        # does not accept would get no traffic.
        self.link.sync(self._bound_before | desired.bind_addresses)
        ops, failed = self._sync_ipvs(desired, kernel)
        for fam in desired.families:
            # Our chains and the missing jumps into them in one transaction:
            # a failure leaves neither half-applied, and the jumps cost one
            # iptables-save per table instead of a -C (and -I) per jump.
            inserted = self.iptables.restore(fam, desired.iptables[fam], desired.jumps)
            if inserted:
                log.info("inserted %d jump(s) from built-in chains (IPv%d)", inserted, fam)
        _added, removed = self.link.sync(desired.bind_addresses)
        if removed:
            log.info("unbound %d address(es) from %s", removed, DUMMY_LINK)
        return ops, failed

    def _sync_ipvs(
        self, desired: DesiredState, kernel: IPVSKernel | None = None
    ) -> tuple[list[Op], list[str]]:
        kernel = kernel or self.kernel()
        current = kernel.dump()
        bound = self._bound_before | self.link.addresses()
        owned = set(self._applied) | {k for k in current if (k[0], k[2]) in self._nodeport_owned}
        result = diff(
            desired.services,
            current,
            owned_keys=owned,
            owned_addresses=bound,
            draining_since=self._draining,
            now=self.clock(),
            max_drain=self.max_drain,
        )
        failed: list[str] = []
        done: list[Op] = []
        for op in result.ops:
            try:
                _apply_op(kernel, op)
                done.append(op)
                log.info("ipvs: %s", op)
            except NetlinkError as err:
                # One bad virtual server must not stop the others; the next
                # sync retries it.
                failed.append(f"{op}: {err}")
                log.error("ipvs: %s failed: %s", op, err)
        self._draining = dict(result.draining)
        self._applied = set(desired.services) | {
            o.vs.key for o in result.ops if o.kind == "del-service" and o not in done
        }
        self._last = desired
        return done, failed


def _apply_op(kernel: IPVSKernel, op: Op) -> None:
    if op.kind == "add-service":
        kernel.add_service(op.vs)
    elif op.kind == "update-service":
        kernel.update_service(op.vs)
    elif op.kind == "del-service":
        kernel.del_service(op.vs)
    elif op.dest is None:
        raise ValueError(f"{op.kind} without a real server")
    elif op.kind == "add-dest":
        kernel.add_dest(op.vs, op.dest)
    elif op.kind == "update-dest":
        kernel.update_dest(op.vs, op.dest)
    elif op.kind == "del-dest":
        kernel.del_dest(op.vs, op.dest)


def _nodeport_members(sets: dict[str, set[str]]) -> set[tuple[str, int]]:
    """(protocol, port) of every NodePort in our bitmap sets, both families."""
    out = set()
    for proto, base in (("TCP", NODE_PORT_TCP), ("UDP", NODE_PORT_UDP)):
        for fam in (4, 6):
            for member in sets.get(set_name(base, fam), set()):
                if member.isdigit():
                    out.add((proto, int(member)))
    return out


def _rule_counts(desired: DesiredState) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for fam, text in desired.iptables.items():
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A "):
                key = (table, f"IPv{fam}")
                counts[key] = counts.get(key, 0) + 1
    return counts
