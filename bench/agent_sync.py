"""The agent's own cost per event and per partial sync, backend excluded.

    .venv/bin/python -m bench.agent_sync [--services 10000] [--changes 200]

Loads a cluster into an Agent with a no-op backend and metrics on, does a
first (full) sync, then times ``handle()`` of one EndpointSlice change and
the partial ``sync()`` that follows, and prints the medians. Neither may
grow with the number of services (docs/architecture.md, "Incremental").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Collection

from agent.agent import Agent, AgentOptions
from agent.backends.base import SyncResult
from agent.metrics import Metrics
from agent.model import ServicePortName
from agent.plan import NodePlan
from agent.sources.events import ObjectEvent
from bench.plan_scale import eslice, service


class NoopBackend:
    name = "noop"

    def render(self, plan: NodePlan) -> str:
        return ""

    def sync(self, plan: NodePlan, changed: Collection[ServicePortName] | None) -> SyncResult:
        return SyncResult("full" if changed is None else "partial", ok=True)

    def cleanup(self) -> int:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--changes", type=int, default=200)
    args = ap.parse_args()
    agent = Agent(AgentOptions(node_name="node-1"), NoopBackend(), metrics=Metrics())
    for i in range(args.services):
        agent.handle(ObjectEvent("upsert", "Service", service(i)))
        agent.handle(ObjectEvent("upsert", "EndpointSlice", eslice(i, 10)))
    for kind in ("Service", "EndpointSlice", "Node"):
        agent.source_synced(kind)
    agent.sync()
    handle, sync = [], []
    for n in range(args.changes):
        event = ObjectEvent("upsert", "EndpointSlice", eslice(n, 10, gen=n % 7))
        t0 = time.perf_counter()
        agent.handle(event)
        t1 = time.perf_counter()
        agent.sync()
        t2 = time.perf_counter()
        handle.append(t1 - t0)
        sync.append(t2 - t1)
    agent.stop(timeout=1.0)
    print(
        f"services={args.services} handle() median {statistics.median(handle) * 1000:.2f} ms, "
        f"partial sync() median {statistics.median(sync) * 1000:.2f} ms (no-op backend)"
    )


if __name__ == "__main__":
    main()
