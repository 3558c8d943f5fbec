"""The iptables applier: the only code that changes the node's iptables rules.

Every change is one ``iptables-restore --noflush -w`` transaction per IP
family per sync; nothing else writes the tables (``iptables-save -t TABLE``
and ``iptables -S CHAIN`` only read). A full sync rewrites every chain we
own, adds missing jump rules from the built-in chains and deletes our
per-service chains that are no longer wanted; a partial sync sends only the
service ports whose rendered rules changed (see partial.py). Kernel or
binary problems never raise to the caller: they come back in SyncResult.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.backends.base import SyncResult
from agent.backends.iptables import chains as c
from agent.backends.iptables.detect import detect_mode
from agent.backends.iptables.nftcache import (
    jump_prelude,
    nat_section_size,
    wants_full_chain_cache,
    with_full_chain_cache,
)
from agent.backends.iptables.options import LARGE_CLUSTER_ENDPOINTS, RenderOptions
from agent.backends.iptables.partial import Change, DispatchIndex, partial_restore
from agent.backends.iptables.render import FAMILIES, FamilyRules, IptablesRenderer, fixed_rules
from agent.backends.iptables.restore import (
    Iptables,
    IptablesError,
    Mode,
    RestoreError,
    RestoreRecord,
    Runner,
    subprocess_runner,
    timed_restore,
    written_per_table,
)
from agent.backends.iptables.rules import (
    FILTER,
    FIXED_CHAINS,
    JUMPS,
    MANGLE,
    NAT,
    ServiceKey,
    ServiceRules,
    chain_line,
)
from agent.model import ServicePortName
from agent.plan import NodePlan

log = logging.getLogger("sliceproxy.iptables")

STATE_VERSION = 1
_CHAIN_RE = re.compile(r"^:(\S+) ", re.M)


def family_label(family: int) -> str:
    return f"IPv{family}"


def service_key(name: ServicePortName) -> ServiceKey:
    return (name.namespace, name.name, name.port, name.protocol)


def chains_in(save: str) -> set[str]:
    return set(_CHAIN_RE.findall(save))


@dataclass
class FamilyState:
    """What we believe is in the kernel for one family since our last successful sync."""

    services: dict[ServiceKey, ServiceRules]
    index: DispatchIndex
    large: bool
    endpoint_chains: int
    rules: dict[str, int]  # per table

    @classmethod
    def from_rules(cls, fr: FamilyRules) -> FamilyState:
        return cls(
            services={s.key: s for s in fr.services},
            index=DispatchIndex(fr.services),
            large=fr.large,
            endpoint_chains=sum(s.endpoint_chains for s in fr.services),
            rules=fr.rule_counts(),
        )

    def apply(self, changes: Iterable[Change]) -> None:
        """Record a successful partial sync (the index was updated while rendering)."""
        for before, after in changes:
            for svc, sign in ((before, -1), (after, 1)):
                if svc is None:
                    continue
                self.endpoint_chains += sign * svc.endpoint_chains
                self.rules[NAT] += sign * len(svc.rules)
                for (table, _), _spec in svc.dispatch:
                    self.rules[table] += sign
            if after is None:
                self.services.pop(before.key, None)  # type: ignore[union-attr]
            else:
                self.services[after.key] = after


@dataclass
class _PartialPlan:
    family: int
    changes: list[Change] = field(default_factory=list)
    text: str = ""
    chains: int = 0
    rules: int = 0


class IptablesBackend:
    """kube-proxy's iptables mode, applied with iptables-restore.

    ``mode``: "legacy" or "nft"; None detects it on first use (detect.py).
    ``runner``: how commands run (tests pass one running inside a network
    namespace, or capturing the input). ``random_fully``: None probes the
    binary once and overrides ``options.random_fully``.
    """

    name = "iptables"

    def __init__(
        self,
        options: RenderOptions,
        *,
        mode: Mode | None = None,
        families: Sequence[int] = FAMILIES,
        runner: Runner | None = None,
        probe_random_fully: bool = False,
    ) -> None:
        self.runner = runner or subprocess_runner()
        self.families = tuple(families)
        self._mode: Mode | None = mode
        self._probe = probe_random_fully
        self.options = options
        self.renderer = IptablesRenderer(options)
        self.applied: dict[int, FamilyState] = {}
        self.need_full = True
        # The restores sent, newest last (tests assert on them).
        self.restores: collections.deque[RestoreRecord] = collections.deque(maxlen=64)

    # ------------------------------------------------------------------ setup

    @property
    def mode(self) -> Mode:
        if self._mode is None:
            self._mode, why = detect_mode(self.runner, self.families)
            log.info("iptables mode %s: %s", self._mode, why)
        if self._probe:
            self._probe = False
            fully = self.ipt(self.families[0]).has_random_fully()
            if fully != self.options.random_fully:
                self.options = _replace_random_fully(self.options, fully)
                self.renderer = IptablesRenderer(self.options)
        return self._mode

    def ipt(self, family: int) -> Iptables:
        return Iptables(self._mode or self.mode, family, self.runner)

    # ------------------------------------------------------------------ Backend protocol

    def render(self, plan: NodePlan) -> str:
        return self.renderer.render(plan, self.families)

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        try:
            _ = self.mode
            if changed is None or self.need_full or set(self.applied) != set(self.families):
                return self._full(plan, len(changed) if changed is not None else len(plan.entries))
            missing = [
                f
                for f in self.families
                if not self.ipt(f).chain_exists(MANGLE, c.KUBE_PROXY_CANARY)
            ]
            if missing:
                log.warning(
                    "%s missing for %s: the tables were reset, doing a full sync",
                    c.KUBE_PROXY_CANARY,
                    ", ".join(family_label(f) for f in missing),
                )
                return self._full(plan, len(changed))
            return self._partial(plan, changed)
        except IptablesError as exc:
            self.need_full = True
            log.error("iptables sync failed: %s", exc)
            return SyncResult("full", ok=False, error=str(exc))

    def cleanup(self, *, kube_proxy: bool = False) -> int:
        """Remove our jump rules and chains (kube-proxy's too: the names are the same).

        Raises IptablesError when a binary fails; returns the number of rules
        and chains removed.
        """
        removed = 0
        for family in self.families:
            ipt = self.ipt(family)
            out: list[str] = []
            for table in (FILTER, NAT, MANGLE):
                save = ipt.save(table)
                existing = chains_in(save)
                lines = save.splitlines()
                deletes = []
                for jump in JUMPS:
                    found = jump.table == table and jump.found_in(lines)
                    if found:
                        deletes.append("-D" + found[2:])
                doomed = [ch for ch in FIXED_CHAINS[table] if ch in existing]
                doomed += sorted(ch for ch in existing if table == NAT and c.is_service_chain(ch))
                if kube_proxy:
                    doomed += sorted(
                        ch
                        for ch in existing
                        if ch in c.LEGACY_KUBE_PROXY_CHAINS
                        or ch.startswith(c.LEGACY_KUBE_PROXY_PREFIXES)
                    )
                if not deletes and not doomed:
                    continue
                out.append(f"*{table}")
                out += [chain_line(ch) for ch in doomed]  # flush first: drops references
                out += deletes
                out += [f"-X {ch}" for ch in doomed]
                out.append("COMMIT")
                removed += len(deletes) + len(doomed)
            if out:
                timed_restore(ipt, "\n".join(out) + "\n", "cleanup", self.restores)
            self.applied.pop(family, None)
        self.need_full = True
        return removed

    # ------------------------------------------------------------------ full

    def _full(self, plan: NodePlan, changed_count: int, *, fell_back: bool = False) -> SyncResult:
        chains = rules = 0
        counts: dict[tuple[str, str], int] = {}
        written: dict[tuple[str, str], int] = {}
        per_family: dict[str, int] = {}
        errors: list[str] = []
        for family in self.families:
            ipt = self.ipt(family)
            fr = self.renderer.family(plan, family)
            try:
                saves = {table: ipt.save(table) for table in (FILTER, NAT)}
                missing = [
                    j for j in fr.fixed.jumps if j.found_in(saves[j.table].splitlines()) is None
                ]
                wanted = fr.owned_chains()
                existing = chains_in(saves[NAT])
                stale = sorted(ch for ch in existing if c.is_service_chain(ch) and ch not in wanted)
                sent = ""
                text = fr.restore_text(missing_jumps=missing, stale_chains=stale)
                if wants_full_chain_cache(self.mode, *nat_section_size(text), len(existing)):
                    # See nftcache.py: without this, iptables-nft-restore
                    # --noflush grows as commands x chains (15 s at 3k services).
                    prelude = jump_prelude(missing, existing)
                    if prelude:
                        sent += prelude
                        timed_restore(ipt, prelude, "full-jumps", self.restores)
                        missing = [j for j in missing if j.table != NAT]
                        text = fr.restore_text(missing_jumps=missing, stale_chains=stale)
                    text = with_full_chain_cache(text)
                timed_restore(ipt, text, "full", self.restores)
            except RestoreError as exc:
                log.error("full sync of %s rejected: %s", family_label(family), exc)
                errors.append(f"{family_label(family)}: {exc}")
                self.applied.pop(family, None)
                continue
            self.applied[family] = FamilyState.from_rules(fr)
            sent += text
            fam_chains, per_table = written_per_table(sent)
            chains += fam_chains
            rules += sum(per_table.values())
            per_family[family_label(family)] = fam_chains
            for table, n in per_table.items():
                written[(table, family_label(family))] = n
            for table, n in fr.rule_counts().items():
                counts[(table, family_label(family))] = n
        self.need_full = bool(errors)
        return SyncResult(
            "full",
            ok=not errors,
            service_ports_changed=changed_count,
            chains_written=chains,
            rules_written=rules,
            rule_counts=counts,
            written_counts=written,
            chains_per_family=per_family,
            error="; ".join(errors),
            fell_back=fell_back,
        )

    # ------------------------------------------------------------------ partial

    def _partial(self, plan: NodePlan, changed: Collection[ServicePortName]) -> SyncResult:
        plans: list[_PartialPlan] = []
        for family in self.families:
            state = self.applied[family]
            pp = _PartialPlan(family)
            keys: dict[ServiceKey, Any] = {}
            for name in changed:
                keys[service_key(name)] = plan.entries.get((name, family))
            # Large-cluster mode changes every SEP rule's comment: decide it
            # from the running total first; a flip needs a full sync.
            after_total = state.endpoint_chains
            for key, entry in keys.items():
                old = state.services.get(key)
                after_total += (len(entry.decision.all_reachable) if entry else 0) - (
                    old.endpoint_chains if old else 0
                )
            large = after_total > LARGE_CLUSTER_ENDPOINTS
            if large != state.large:
                log.info("large-cluster mode %s: full sync", "on" if large else "off")
                return self._full(plan, len(changed))
            for key, entry in keys.items():
                old = state.services.get(key)
                new = self.renderer.service(entry, large) if entry is not None else None
                if old != new:
                    pp.changes.append((old, new))
            if pp.changes:
                result = partial_restore(pp.changes, state.index)
                pp.text, pp.chains, pp.rules = (
                    result.text,
                    result.chains_written,
                    result.rules_written,
                )
                # Only a partial sync touching thousands of services gets
                # here: reading back the whole table usually costs more.
                owned = sum(len(s.chains) for s in state.services.values())
                if wants_full_chain_cache(self.mode, *nat_section_size(pp.text), owned):
                    pp.text = with_full_chain_cache(pp.text)
            plans.append(pp)

        for pp in plans:
            if not pp.text:
                continue
            try:
                timed_restore(self.ipt(pp.family), pp.text, "partial", self.restores)
            except RestoreError as exc:
                # The index was advanced while rendering: only a full sync
                # brings our record and the kernel back in step.
                log.error(
                    "partial sync of %s rejected, falling back to a full sync: %s",
                    family_label(pp.family),
                    exc,
                )
                self.need_full = True
                full = self._full(plan, len(changed), fell_back=True)
                if not full.ok:
                    return full
                return _with_error(full, f"partial sync rejected: {exc}")
            self.applied[pp.family].apply(pp.changes)

        counts = {
            (table, family_label(f)): n
            for f in self.families
            for table, n in self.applied[f].rules.items()
        }
        written: dict[tuple[str, str], int] = {}
        per_family: dict[str, int] = {}
        for pp in plans:
            fam_chains, per_table = written_per_table(pp.text)
            per_family[family_label(pp.family)] = fam_chains
            for table in (FILTER, NAT):
                written[(table, family_label(pp.family))] = per_table.get(table, 0)
        return SyncResult(
            "partial",
            ok=True,
            service_ports_changed=len(changed),
            chains_written=sum(pp.chains for pp in plans),
            rules_written=sum(pp.rules for pp in plans),
            rule_counts=counts,
            written_counts=written,
            chains_per_family=per_family,
        )

    # ------------------------------------------------------------------ persistence

    def options_digest(self) -> str:
        return hashlib.sha256(repr(self.options).encode()).hexdigest()[:16]

    def export_state(self) -> dict[str, Any]:
        """What a later process needs to continue with partial syncs."""
        return {
            "version": STATE_VERSION,
            "backend": self.name,
            "mode": self._mode,
            "options": self.options_digest(),
            "families": {
                str(f): [s.to_json() for s in sorted(st.services.values(), key=lambda s: s.key)]
                for f, st in self.applied.items()
            },
            "large": {str(f): st.large for f, st in self.applied.items()},
        }

    def import_state(self, raw: dict[str, Any]) -> str | None:
        """Adopt a previous process's record; returns why not, or None when adopted."""
        if raw.get("version") != STATE_VERSION or raw.get("backend") != self.name:
            return "state file from another version or backend"
        if raw.get("mode") != self.mode:
            return f"state file is for iptables-{raw.get('mode')}, not iptables-{self.mode}"
        if raw.get("options") != self.options_digest():
            return "renderer options changed"
        fams = raw.get("families") or {}
        if set(fams) != {str(f) for f in self.families}:
            return "IP families changed"
        try:
            for f in self.families:
                services = [ServiceRules.from_json(s) for s in fams[str(f)]]
                fr_services = tuple(sorted(services, key=lambda s: s.key))
                fr = FamilyRules(f, fixed_rules(f, self.options), fr_services, raw["large"][str(f)])
                self.applied[f] = FamilyState.from_rules(fr)
        except (KeyError, TypeError, ValueError) as exc:
            self.applied.clear()
            return f"unreadable state file ({exc})"
        self.need_full = False
        return None


def _replace_random_fully(options: RenderOptions, value: bool) -> RenderOptions:
    return replace(options, random_fully=value)


def _with_error(result: SyncResult, note: str) -> SyncResult:
    return replace(result, error=note)


def dumps_state(backend: IptablesBackend) -> str:
    return json.dumps(backend.export_state(), sort_keys=True)
