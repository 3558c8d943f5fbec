"""IPVS golden files: `.venv/bin/python -m tests.golden.regen` (which runs this
too) or `.venv/bin/python -m tests.golden.regen_ipvs` alone.

Writes tests/golden/ipvs/*.txt exactly as `sliceproxy render --backend ipvs`
prints them: one for examples/cluster.yaml seen from worker-a, one per
shared feature case of iptables_cases.py (the same plans, so the two
backends can be compared), and a few IPVS-only ones (schedulers, UDP,
SCTP, terminating fallback).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from agent.backends.iptables.options import RenderOptions
from agent.backends.ipvs.render import IPVSOptions, render
from agent.model import Endpoint
from agent.plan import NodePlan
from tests.golden import ROOT, write_golden
from tests.golden import iptables_cases as cases
from tests.golden.iptables_cases import NODE, THREE, endpoint, plan, service

GOLDEN = ROOT / "tests/golden/ipvs"
EXAMPLE_CIDRS = ("10.244.0.0/16", "fd00:10:244::/48")


def from_iptables(o: RenderOptions) -> IPVSOptions:
    """The same kube-proxy flags, as IPVS mode takes them."""
    return IPVSOptions(
        cluster_cidrs=tuple(o.cluster_cidrs),
        masquerade_all=o.masquerade_all,
        nodeport_cidrs=tuple(o.nodeport_addresses),
        nodeport_addresses=tuple(o.node_ips) or None,
    )


def terminating(ip: str, *, local: bool = False) -> Endpoint:
    return Endpoint(
        ip, 8080, ready=False, serving=True, terminating=True,
        node_name=NODE if local else "node-b", is_local=local,
    )  # fmt: skip


BASE = from_iptables(cases.OPTIONS)

# IPVS-only cases: name -> (plan builder, options).
EXTRA: dict[str, tuple[Callable[[], NodePlan], IPVSOptions]] = {
    "scheduler-mh": (
        lambda: plan((service("web", ["10.96.0.10"], affinity_timeout=600), THREE)),
        IPVSOptions(
            scheduler="mh",
            cluster_cidrs=BASE.cluster_cidrs,
            nodeport_addresses=BASE.nodeport_addresses,
        ),
    ),
    "scheduler-wlc": (
        lambda: plan((service("web", ["10.96.0.10"]), THREE)),
        IPVSOptions(
            scheduler="wlc",
            cluster_cidrs=BASE.cluster_cidrs,
            nodeport_addresses=BASE.nodeport_addresses,
        ),
    ),
    "udp-nodeport": (
        lambda: plan(
            (
                service(
                    "dns", ["10.96.0.53"], port=53, port_name="dns", protocol="UDP", node_port=30053
                ),
                (endpoint("10.244.1.53", 53, local=True), endpoint("10.244.2.53", 53)),
            )
        ),
        BASE,
    ),
    "sctp-nodeport-etp-local": (
        lambda: plan(
            (
                service(
                    "sig",
                    ["10.96.0.70"],
                    port=9,
                    port_name="sig",
                    protocol="SCTP",
                    node_port=30009,
                    external_traffic_policy="Local",
                ),
                (endpoint("10.244.1.7", 9, local=True), endpoint("10.244.2.7", 9)),
            )
        ),
        BASE,
    ),
    "terminating-fallback": (
        lambda: plan(
            (
                service("checkout", ["10.96.0.90"]),
                (
                    terminating("10.244.1.10", local=True),
                    terminating("10.244.2.10"),
                    Endpoint("10.244.3.11", 8080, ready=False, serving=False, node_name="node-c"),
                ),
            )
        ),
        BASE,
    ),
}


def example_plan() -> NodePlan:
    from tests.golden.regen import example_plan as iptables_example

    return iptables_example()


def expected() -> dict[str, str]:
    """File name -> content, for every IPVS golden file."""
    p = example_plan()
    out = {
        "example-worker-a.txt": render(
            p, IPVSOptions(cluster_cidrs=EXAMPLE_CIDRS, nodeport_addresses=p.node.addresses)
        )
    }
    for case in cases.CASES:
        out[f"{case.name}.txt"] = render(case.build(), from_iptables(case.options))
    for name, (build, opts) in EXTRA.items():
        out[f"{name}.txt"] = render(build(), opts)
    return out


def main() -> int:
    return write_golden(GOLDEN, ".txt", expected())


if __name__ == "__main__":
    sys.exit(main())
