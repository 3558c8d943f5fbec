"""How the decision scales: full plan vs one endpoint change.

    .venv/bin/python -m bench.plan_scale [--services 10000] [--endpoints 10]

Prints the time of a full ClusterState load + build_plan, and of one
endpoint change (state.apply + update_plan), and their ratio, measured in
one run. The incremental path must not grow with the number of services.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.plan import build_plan, update_plan
from agent.sources.events import ObjectEvent
from agent.state import ClusterState


def service(i: int) -> dict[str, Any]:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": f"svc-{i}", "namespace": "bench"},
        "spec": {
            "clusterIPs": [f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"],
            "ports": [{"name": "http", "port": 80}],
        },
    }


def pod_ip(k: int) -> str:
    return f"10.{128 + k // 65536}.{k // 256 % 256}.{k % 256}"


def eslice(i: int, n: int, gen: int = 0) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"svc-{i}-abc",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [pod_ip(i * n + j)],
                "nodeName": f"node-{j % 50}",
                "conditions": {"ready": j != gen},
            }
            for j in range(n)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    args = ap.parse_args()
    events = []
    for i in range(args.services):
        events.append(ObjectEvent("upsert", "Service", service(i)))
        events.append(ObjectEvent("upsert", "EndpointSlice", eslice(i, args.endpoints)))

    t0 = time.perf_counter()
    state = ClusterState("node-1")
    for ev in events:
        state.apply(ev)
    plan = build_plan(state)
    full = time.perf_counter() - t0

    change = ObjectEvent("upsert", "EndpointSlice", eslice(7, args.endpoints, gen=3))
    t0 = time.perf_counter()
    changed = state.apply(change)
    plan = update_plan(plan, state, changed)
    one = time.perf_counter() - t0
    print(
        f"services={args.services} endpoints={args.services * args.endpoints} "
        f"full_load_and_plan={full:.3f}s one_change={one * 1000:.2f}ms "
        f"ratio={full / one:.0f}x entries={len(plan.entries)}"
    )


if __name__ == "__main__":
    main()
