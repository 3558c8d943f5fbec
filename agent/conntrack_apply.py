"""Deleting stale UDP conntrack flows: the side effects of agent/conntrack.py.

Runs the ``conntrack`` binary (conntrack-tools) through an injectable runner,
so tests run it inside a network namespace (``ip netns exec NS``) and unit
tests fake it. One cleanup after a successful sync:

1. the UDP frontends in scope (agent.conntrack.in_scope: those that changed
   since the previous sync, or all of them without a previous plan or after
   a failed cleanup);
2. per family with something in scope: ``conntrack -L -f FAMILY -p udp``;
3. the stale-flow filters (agent.conntrack.stale_deletions), each one
   ``conntrack -D ...``.

Never fatal: the rules are already in place when this runs, and a stale flow
is a degraded client, not a broken node. ``conntrack`` exits 1 with
"0 flow entries have been deleted" when a flow expired between the dump and
the delete: not an error. A missing binary is logged once, counted on
every cleanup it prevents (``sliceproxy_conntrack_cleanup_errors_total
{reason="missing-binary"}``) and the sync still succeeds, as upstream, which
logs and carries on when conntrack calls fail.

Metrics are upstream's (pkg/proxy/metrics, v1.33+):
``kubeproxy_conntrack_reconciler_sync_duration_seconds{ip_family}`` and
``kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family}``, recorded
for each family that was reconciled.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.conntrack import (
    CONNTRACK_FAMILY,
    Deletion,
    UdpFrontends,
    frontends_of,
    in_scope,
    parse_flows,
    stale_deletions,
    udp_frontends,
)
from agent.logfmt import kv
from agent.plan import NodePlan, PlanKey, entry_changes

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger(__name__)

# argv and stdin -> completed process (the shape of
# agent.backends.iptables.restore.Runner, without depending on a backend).
Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]

DEFAULT_TIMEOUT = 30.0
_DELETED_RE = re.compile(r"(\d+) flow entries have been deleted")
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


class ConntrackMissing(OSError):
    """The conntrack binary is not installed (package conntrack)."""


def subprocess_runner(prefix: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT) -> Runner:
    """Runs commands for real, optionally behind a prefix such as ``ip netns exec NS``."""

    def run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        full = [*prefix, *argv]
        for exe in dict.fromkeys((full[0], argv[0])):
            if shutil.which(exe) is None:
                raise ConntrackMissing(f"{exe}: not found (package conntrack)")
        return subprocess.run(
            full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )

    return run


@dataclass(frozen=True)
class CleanupReport:
    """What one cleanup did (for the log line, the apply summary and tests)."""

    in_scope: int
    deletions: tuple[Deletion, ...] = ()
    # Flows the kernel reported deleted, per family (4/6).
    deleted: Mapping[int, int] = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def total_deleted(self) -> int:
        return sum(self.deleted.values())


class ConntrackCleaner:
    """Deletes the stale UDP flows of one node after each successful sync.

    Not thread-safe: the agent calls it from its sync thread only.
    """

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner or subprocess_runner()
        self.metrics = metrics
        self._clock = clock
        # After a failed cleanup the next one looks at every frontend: the
        # old/new difference no longer says where stale flows may be.
        self._retry_all = False
        self._missing_logged = False

    def cleanup_plans(self, old: NodePlan | None, new: NodePlan) -> CleanupReport:
        """After a sync from ``old`` (None: unknown) to ``new``.

        When ``new`` was updated from ``old``, only its changed service ports
        can hold new stale flows: those alone are compared, and the whole
        frontend map is built only if one of them needs cleaning. A partial
        sync's cost must not grow with the number of services.
        """
        changes = None if self._retry_all else entry_changes(old, new)
        if changes is None:
            return self.cleanup(None if old is None else udp_frontends(old), udp_frontends(new))
        scope = in_scope(frontends_of(changes.before), frontends_of(changes.after))
        return self._clean(scope, udp_frontends(new)) if scope else CleanupReport(0)

    def cleanup(
        self,
        old: Mapping[PlanKey, UdpFrontends] | None,
        new: Mapping[PlanKey, UdpFrontends],
    ) -> CleanupReport:
        scope = in_scope(None if self._retry_all else old, new)
        if not scope:
            return CleanupReport(0)
        return self._clean(scope, new)

    def _clean(
        self, scope: Sequence[UdpFrontends], new: Mapping[PlanKey, UdpFrontends]
    ) -> CleanupReport:
        """Delete the stale flows of the frontends in ``scope``; ``new`` is
        every frontend (a flow is judged against its own service port's)."""
        deletions: list[Deletion] = []
        deleted: dict[int, int] = {}
        errors: list[str] = []
        for family in sorted({f.family for f in scope}):
            started = self._clock()
            try:
                found, n = self._family(
                    family,
                    [f for f in new.values() if f.family == family],
                    [f for f in scope if f.family == family],
                )
            except ConntrackMissing as exc:
                self._count_error("missing-binary")
                if not self._missing_logged:
                    self._missing_logged = True
                    log.warning(
                        "conntrack_cleanup_skipped %s",
                        kv(reason=str(exc), effect="stale UDP flows are not deleted"),
                    )
                errors.append(str(exc))
                break  # same binary for the other family
            except (OSError, subprocess.SubprocessError, _Failed) as exc:
                self._count_error("failed")
                log.warning("conntrack_cleanup_failed %s", kv(family=family, error=str(exc)))
                errors.append(str(exc))
                continue
            deletions += found
            deleted[family] = n
            if self.metrics is not None:
                name = FAMILY_NAMES[family]
                self.metrics.conntrack_reconcile_duration.labels(name).observe(
                    max(0.0, self._clock() - started)
                )
                self.metrics.conntrack_deleted.labels(name).inc(n)
        self._retry_all = bool(errors)
        report = CleanupReport(len(scope), tuple(deletions), deleted, tuple(errors))
        if report.deletions:
            log.info(
                "conntrack_cleanup %s",
                kv(
                    service_ports=report.in_scope,
                    filters=len(report.deletions),
                    deleted=report.total_deleted,
                ),
            )
        return report

    def _family(
        self, family: int, frontends: list[UdpFrontends], scope: list[UdpFrontends]
    ) -> tuple[list[Deletion], int]:
        argv = ["conntrack", "-L", "-f", CONNTRACK_FAMILY[family], "-p", "udp"]
        proc = self.runner(argv, None)
        # An empty table: exit 0 on some versions, 1 on others; both say
        # "0 flow entries have been shown" on stderr.
        if proc.returncode != 0 and "flow entries have been shown" not in proc.stderr:
            raise _Failed(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
        deletions = list(stale_deletions(frontends, parse_flows(proc.stdout, family), scope))
        total = 0
        for deletion in deletions:
            proc = self.runner(deletion.argv(), None)
            m = _DELETED_RE.search(proc.stderr)
            if proc.returncode != 0 and not (m and m.group(1) == "0"):
                raise _Failed(f"{' '.join(deletion.argv())}: {proc.stderr.strip()}")
            total += int(m.group(1)) if m else 0
            log.debug("conntrack_deleted %s", kv(filter=str(deletion), flows=m and m.group(1)))
        return deletions, total

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.conntrack_cleanup_errors.labels(reason).inc()


class _Failed(Exception):
    pass
