"""Partial syncs: the restore input that turns the previous rules into the new ones
by touching only the service ports that changed. Pure (no I/O).

kube-proxy rewrites KUBE-SERVICES, KUBE-NODEPORTS, ... whole on every
partial sync, so its cost grows with the number of services. Here a service
port's lines in those shared chains are removed with ``-D CHAIN spec`` and
added with ``-I CHAIN N spec`` at the position a full sync would give them
(services in key order), so after any series of partial syncs the chains
hold exactly what a fresh full sync writes, and the input size depends only
on what changed. Positions come from :class:`DispatchIndex`, our record of
how many lines each service has in each shared chain.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.backends.iptables import chains as c
from agent.backends.iptables.rules import (
    DISPATCH_REFS,
    FILTER,
    NAT,
    Ref,
    ServiceKey,
    ServiceRules,
    chain_line,
)


class DispatchIndex:
    """Per shared chain: the services with lines in it, in order, and how many."""

    def __init__(self, services: Iterable[ServiceRules] = ()) -> None:
        self._keys: dict[Ref, list[ServiceKey]] = {ref: [] for ref in DISPATCH_REFS}
        self._counts: dict[Ref, dict[ServiceKey, int]] = {ref: {} for ref in DISPATCH_REFS}
        for svc in sorted(services, key=lambda s: s.key):
            for ref in DISPATCH_REFS:
                n = len(svc.dispatch_in(ref))
                if n:
                    self._keys[ref].append(svc.key)
                    self._counts[ref][svc.key] = n

    def position(self, ref: Ref, key: ServiceKey) -> int:
        """1-based rule number at which ``key``'s lines start (or would)."""
        keys = self._keys[ref]
        counts = self._counts[ref]
        before = bisect.bisect_left(keys, key)
        # A sum over the services before this one: microseconds for
        # thousands of services, and nothing is sent to the kernel for it.
        return 1 + sum(counts[k] for k in keys[:before])

    def remove(self, ref: Ref, key: ServiceKey) -> None:
        if self._counts[ref].pop(key, None) is not None:
            keys = self._keys[ref]
            del keys[bisect.bisect_left(keys, key)]

    def add(self, ref: Ref, key: ServiceKey, count: int) -> None:
        if count:
            bisect.insort(self._keys[ref], key)
            self._counts[ref][key] = count

    def count(self, ref: Ref, key: ServiceKey) -> int:
        return self._counts[ref].get(key, 0)


@dataclass(frozen=True)
class PartialText:
    text: str  # "" when nothing changed
    chains_written: int
    rules_written: int


Change = tuple[ServiceRules | None, ServiceRules | None]  # (before, after)


def partial_restore(changes: Sequence[Change], index: DispatchIndex) -> PartialText:
    """The restore input for ``changes`` (updates ``index`` to the result).

    Order inside each table: chain declarations (creating or flushing the
    chains being rewritten or deleted), the canary guard, dispatch deletions,
    dispatch insertions, the rewritten chains' rules, and last the deletion
    of chains no longer used (once nothing refers to them).
    """
    declare: list[str] = []
    delete_chains: list[str] = []
    chain_rules: list[str] = []
    removals: dict[str, list[str]] = {FILTER: [], NAT: []}
    inserts: list[tuple[Ref, ServiceKey, tuple[str, ...]]] = []

    for before, after in sorted(changes, key=lambda ch: (ch[0] or ch[1]).key):  # type: ignore[union-attr]
        svc = after or before
        assert svc is not None
        key = svc.key
        for ref in DISPATCH_REFS:
            old = before.dispatch_in(ref) if before else ()
            new = after.dispatch_in(ref) if after else ()
            if old == new:
                continue
            table, chain = ref
            removals[table] += [f"-D {chain} {spec}" for spec in old]
            index.remove(ref, key)
            if new:
                inserts.append((ref, key, new))
        old_chains = before.chains if before else ()
        new_chains = after.chains if after else ()
        if (
            before is None
            or after is None
            or before.chains != after.chains
            or (before.rules != after.rules)
        ):
            declare += [chain_line(ch) for ch in new_chains]
            chain_rules += list(after.rules) if after else []
            gone = [ch for ch in old_chains if ch not in set(new_chains)]
            declare += [chain_line(ch) for ch in gone]
            delete_chains += gone

    additions: dict[str, list[str]] = {FILTER: [], NAT: []}
    # Insert in key order so each position accounts for the lines inserted
    # before it in this same transaction.
    for ref, key, specs in sorted(inserts, key=lambda item: (item[0], item[1])):
        table, chain = ref
        pos = index.position(ref, key)
        additions[table] += [f"-I {chain} {pos + i} {spec}" for i, spec in enumerate(specs)]
        index.add(ref, key, len(specs))

    out: list[str] = []
    rules_written = 0
    for table in (FILTER, NAT):
        body: list[str] = []
        if table == NAT:
            body += declare
        if removals[table] or additions[table] or (table == NAT and (declare or chain_rules)):
            # The guard fails (and the whole transaction with it) if the
            # table was reset since our last full sync, so the rules below
            # are never applied on top of a table that lost ours.
            body.append(f"-F {c.KUBE_PROXY_CANARY}")
        body += removals[table]
        body += additions[table]
        if table == NAT:
            body += chain_rules
            body += [f"-X {ch}" for ch in delete_chains]
        if body:
            out.append(f"*{table}")
            out += body
            out.append("COMMIT")
        rules_written += len(additions[table]) + (len(chain_rules) if table == NAT else 0)
    text = "\n".join(out) + "\n" if out else ""
    return PartialText(text, chains_written=len(declare), rules_written=rules_written)
