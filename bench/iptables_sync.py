"""iptables sync cost against a real kernel, in a network namespace of its own (root).

    .venv/bin/python -m bench.iptables_sync [--services 1000,3000,10000] \
        [--backend nft,legacy] [--endpoints 2] [--compare]

For each backend and size (services with ``--endpoints`` endpoints each, one
fresh namespace per size), it times:

- the first full sync (empty tables) and a second one (steady state, every
  chain already there), as ``IptablesBackend.sync`` runs them;
- with ``--compare``: the same second full sync without the nft cache hint
  (nftcache.py), i.e. what the applier sent before; slow on nft by design;
- a kube-proxy-shaped full restore (chains, then rules, no jump rules) over
  the existing rules, as kube-proxy sends it;
- sliceproxy's partial sync after one service loses an endpoint;
- a kube-proxy-style partial restore for the same change: the dispatch
  chains rewritten whole plus the changed service's chains.

Times are wall-clock seconds; ratios are taken within one run. Nothing
outside the namespace is touched; the namespace is deleted at the end even
on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator

from agent.backends.iptables import chains as c
from agent.backends.iptables import nftcache
from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.render import FamilyRules
from agent.backends.iptables.restore import Iptables, Mode, binary, subprocess_runner
from agent.backends.iptables.rules import FILTER, NAT, chain_line
from agent.plan import NodePlan, PlanKey, ServicePortPlan
from tests.golden.iptables_cases import OPTIONS, endpoint, plan, service

_counter = itertools.count()


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"sp-bench-ipt-{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def services(n: int, endpoints: int) -> NodePlan:
    ports = []
    for i in range(n):
        eps = [endpoint(f"10.{100 + i // 250}.{i % 250}.{e + 1}") for e in range(endpoints)]
        # Every tenth service is a NodePort, so KUBE-NODEPORTS is not empty.
        np = 30000 + i % 2000 if i % 10 == 0 else None
        ports.append(
            (service(f"svc{i:05d}", [f"10.96.{i // 250}.{i % 250 + 1}"], node_port=np), eps)
        )
    return plan(*ports)


def one_endpoint_less(p: NodePlan) -> tuple[NodePlan, PlanKey]:
    key = next(k for k in sorted(p.entries, key=str) if k[1] == 4)
    entry = p.entries[key]
    d = entry.decision
    fewer = dataclasses.replace(
        d, cluster=d.cluster[:1] if d.cluster else d.cluster, all_reachable=d.all_reachable[:1]
    )
    entries = dict(p.entries)
    entries[key] = ServicePortPlan(entry.service, entry.family, fewer)
    return NodePlan(p.node, entries), key


def kube_proxy_full(fr: FamilyRules) -> str:
    """syncProxyRules' full input: chains, then rules; jumps are ensured separately."""
    text = fr.restore_text(missing_jumps=())
    return text[: text.index("*mangle")]


def kube_proxy_partial(fr: FamilyRules, changed: tuple[str, str, str, str]) -> str:
    """A partial restore as kube-proxy writes one: shared chains whole, one service's chains."""
    svc = next(s for s in fr.services if s.key == changed)
    out = ["*filter"]
    out += [chain_line(ch) for ch in fr.fixed.filter_chains if ch != c.KUBE_PROXY_CANARY]
    out += list(fr.fixed.filter_rules)
    for s in fr.services:
        out += s.dispatch_lines(FILTER)
    out += list(fr.fixed.filter_tail)
    out += ["COMMIT", "*nat"]
    out += [chain_line(ch) for ch in fr.fixed.nat_chains if ch != c.KUBE_PROXY_CANARY]
    out += [chain_line(ch) for ch in svc.chains]
    out += list(fr.fixed.nat_rules)
    for s in fr.services:
        out += s.dispatch_lines(NAT)
    out += list(svc.rules)
    out += list(fr.fixed.nat_tail)
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"bench: {what} failed")


def run_one(mode: Mode, n: int, endpoints: int, compare: bool) -> dict[str, float]:
    big = services(n, endpoints)
    changed_plan, key = one_endpoint_less(big)
    out: dict[str, float] = {}
    with netns() as ns:
        runner = subprocess_runner(["ip", "netns", "exec", ns], timeout=1800)
        b = IptablesBackend(OPTIONS, mode=mode, families=(4,), runner=runner)
        out["first full"] = timed(lambda: check(b.sync(big, None).ok, "first full sync"))
        out["second full"] = timed(lambda: check(b.sync(big, None).ok, "second full sync"))
        if compare and mode == "nft":
            saved = nftcache.COST_RATIO
            nftcache.COST_RATIO = 10**18  # never worth it: the applier as it was
            try:
                out["second full, no hint"] = timed(
                    lambda: check(b.sync(big, None).ok, "unhinted full sync")
                )
            finally:
                nftcache.COST_RATIO = saved
        ipt = Iptables(mode, 4, runner)
        fr = b.renderer.family(big, 4)
        kp_full = kube_proxy_full(fr)
        out["kube-proxy full"] = timed(lambda: ipt.restore(kp_full))
        out["partial"] = timed(lambda: check(b.sync(changed_plan, {key[0]}).ok, "partial sync"))
        check(b.restores[-1].kind == "partial", "partial sync (it was not partial)")
        out["partial bytes"] = len(b.restores[-1].text)
        n_ = key[0]
        kp = kube_proxy_partial(
            b.renderer.family(changed_plan, 4), (n_.namespace, n_.name, n_.port, n_.protocol)
        )
        out["kube-proxy partial"] = timed(lambda: ipt.restore(kp))
        out["kube-proxy partial bytes"] = len(kp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--services", default="1000,3000,10000")
    ap.add_argument("--backend", default="nft,legacy")
    ap.add_argument("--endpoints", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="also time the unhinted nft full sync")
    args = ap.parse_args()
    sizes = [int(x) for x in args.services.split(",")]
    modes: list[Mode] = [m for m in ("nft", "legacy") if m in args.backend.split(",")]
    for mode in modes:
        tool = binary("restore", 4, mode)
        if subprocess.run(["which", tool], capture_output=True).returncode:
            print(f"{tool}: not installed, skipping {mode}")
            continue
        version = Iptables(mode, 4).version()
        print(f"== iptables-{mode} {'.'.join(map(str, version or ()))}")
        for n in sizes:
            r = run_one(mode, n, args.endpoints, args.compare)
            print(
                f"{mode} {n:>6} services: first full {r['first full']:.3f}s, "
                f"second full {r['second full']:.3f}s"
                + (
                    f" (without the hint {r['second full, no hint']:.3f}s, "
                    f"x{r['second full, no hint'] / r['second full']:.1f})"
                    if "second full, no hint" in r
                    else ""
                )
                + f", kube-proxy-shaped full {r['kube-proxy full']:.3f}s",
                flush=True,
            )
            print(
                f"{mode} {n:>6} services: partial {r['partial']:.3f}s "
                f"({r['partial bytes']:.0f} bytes), kube-proxy-style partial "
                f"{r['kube-proxy partial']:.3f}s ({r['kube-proxy partial bytes']:.0f} bytes); "
                f"full/partial x{r['second full'] / r['partial']:.0f}, "
                f"kube-proxy partial/ours x{r['kube-proxy partial'] / r['partial']:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
