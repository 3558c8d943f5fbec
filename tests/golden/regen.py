"""Regenerate the golden files: `.venv/bin/python -m tests.golden.regen`.

Writes tests/golden/iptables/*.rules: one per case in iptables_cases.py and
one for examples/cluster.yaml seen from worker-a, each holding both
families' full-sync restore input exactly as `sliceproxy render` prints it.
Review the diff before committing: a golden file changes only when the
rules are meant to change.
"""

from __future__ import annotations

import sys

from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.render import render
from agent.plan import NodePlan, build_plan
from agent.sources.files import load
from agent.state import ClusterState
from tests.golden import ROOT, write_golden
from tests.golden.iptables_cases import CASES

GOLDEN = ROOT / "tests/golden/iptables"
EXAMPLE = ROOT / "examples/cluster.yaml"
EXAMPLE_NODE = "worker-a"
# What `sliceproxy render --state examples/cluster.yaml --node worker-a
# --cluster-cidr 10.244.0.0/16,fd00:10:244::/48` uses.
EXAMPLE_CIDRS = ("10.244.0.0/16", "fd00:10:244::/48")


def example_plan() -> NodePlan:
    state = ClusterState(EXAMPLE_NODE)
    for event in load([str(EXAMPLE)]).events:
        state.apply(event)
    return build_plan(state)


def expected() -> dict[str, str]:
    """File name -> content, for every golden file."""
    plan = example_plan()
    out = {
        f"example-{EXAMPLE_NODE}.rules": render(
            plan, RenderOptions(cluster_cidrs=EXAMPLE_CIDRS, node_ips=plan.node.addresses)
        )
    }
    for case in CASES:
        out[f"{case.name}.rules"] = render(case.build(), case.options)
    return out


def main() -> int:
    write_golden(GOLDEN, ".rules", expected())
    from tests.golden import regen_ipvs  # the IPVS backend's golden files

    return regen_ipvs.main()


if __name__ == "__main__":
    sys.exit(main())
