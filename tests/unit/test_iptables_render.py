"""The iptables renderer and applier without root: golden files, hashing,
caching, partial-sync text, and the applier against an in-memory iptables.

Golden files: regenerate with `.venv/bin/python -m tests.golden.regen`.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import subprocess
from collections.abc import Sequence
from contextlib import redirect_stdout

import pytest

from agent.backends.iptables import chains
from agent.backends.iptables.apply import IptablesBackend
from agent.backends.iptables.detect import detect_mode
from agent.backends.iptables.options import RenderOptions
from agent.backends.iptables.render import (
    IptablesRenderer,
    probability,
    render,
    render_service,
)
from agent.backends.iptables.restore import BinaryMissing, quote_failing_line
from agent.cli import main
from agent.config import ConfigError
from agent.plan import NodePlan
from tests.golden import regen
from tests.golden.iptables_cases import (
    CASES_BY_NAME,
    OPTIONS,
    THREE,
    endpoint,
    plan,
    service,
)
from tests.support.fake_iptables import FakeIptables, normalise

GOLDEN = regen.expected()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_file_matches_render(name: str) -> None:
    path = regen.GOLDEN / name
    assert path.exists(), f"{path} missing: run .venv/bin/python -m tests.golden.regen"
    assert path.read_text() == GOLDEN[name], (
        f"{name} differs from the renderer: review, then .venv/bin/python -m tests.golden.regen"
    )


def test_render_command_prints_the_example_golden_file() -> None:
    out = io.StringIO()
    argv = ["render", "--state", str(regen.EXAMPLE), "--node", "worker-a"]
    argv += ["--cluster-cidr", ",".join(regen.EXAMPLE_CIDRS)]
    with redirect_stdout(out):
        assert main(argv) == 0
    assert out.getvalue() == (regen.GOLDEN / "example-worker-a.rules").read_text()


def test_chain_names_hash_like_kube_proxy() -> None:
    # Names from kube-proxy's proxier_test.go fixtures.
    assert chains.svc_chain("ns1/svc1:p80", "tcp") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert chains.sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert chains.ext_chain("ns1/svc1:p80", "tcp") == "KUBE-EXT-XPGD46QRK7WJZT7O"


def test_probability_has_ten_decimals() -> None:
    assert probability(3) == "0.3333333333"
    assert probability(2) == "0.5000000000"


def test_same_plan_renders_byte_identical_text_whatever_the_entry_order() -> None:
    p = CASES_BY_NAME["ipv6"].build()
    reversed_plan = NodePlan(p.node, dict(reversed(list(p.entries.items()))))
    assert render(p, OPTIONS) == render(reversed_plan, OPTIONS)


def test_each_family_is_rendered_from_its_own_entries() -> None:
    p = CASES_BY_NAME["ipv6"].build()
    r = IptablesRenderer(OPTIONS)
    v4, v6 = r.family(p, 4).restore_text(), r.family(p, 6).restore_text()
    assert "fd00:" not in v4 and "10.96.0.70" in v4
    assert "10.96.0.70" not in v6 and "fd00:10:96::a" in v6
    assert "! -d ::1/128" in v6


def test_unchanged_service_is_not_rendered_again() -> None:
    r = IptablesRenderer(OPTIONS)
    p = plan((service("a", ["10.96.0.1"]), THREE), (service("b", ["10.96.0.2"]), THREE))
    r.family(p, 4)
    assert r.renders == 2
    changed = plan((service("a", ["10.96.0.1"]), THREE), (service("b", ["10.96.0.2"]), THREE[:1]))
    r.family(changed, 4)
    assert r.renders == 3  # only b again


def test_large_cluster_mode_drops_endpoint_comments_above_1000_endpoints() -> None:
    eps = tuple(endpoint(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(1001))
    big = render(plan((service("big", ["10.96.0.1"]), eps)), OPTIONS)
    small = render(plan((service("big", ["10.96.0.1"]), eps[:1000])), OPTIONS)
    sep_lines = [line for line in big.splitlines() if line.startswith("-A KUBE-SEP-")]
    assert sep_lines and all("--comment" not in line for line in sep_lines)
    assert '"default/big:http cluster IP"' in big  # dispatch comments stay, as upstream
    assert "-m comment --comment default/big:http -s" in small


def test_no_endpoints_rejects_every_destination_in_filter() -> None:
    text = IptablesRenderer(OPTIONS).family(CASES_BY_NAME["no-endpoints"].build(), 4)
    rules = "\n".join(text.restore_text().splitlines())
    assert rules.count('"default/reports:http has no endpoints"') == 4
    assert "KUBE-SVC-" not in rules


def test_renderer_renders_the_plan_decision_not_its_own() -> None:
    # A decision that topology would not make (cluster = one remote endpoint
    # only) is written as given: the renderer never re-decides.
    p = CASES_BY_NAME["clusterip"].build()
    key = next(iter(p.entries))
    entry = p.entries[key]
    decision = dataclasses.replace(
        entry.decision, cluster=THREE[2:], all_reachable=THREE[2:], has_any_endpoints=True
    )
    rules = render_service(dataclasses.replace(entry, decision=decision), OPTIONS, False)
    assert [r for r in rules.rules if "DNAT" in r] == [
        r for r in rules.rules if "--to-destination 10.244.3.2:8080" in r
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_cidrs": ("10.0.0.0/8", "10.1.0.0/16")}, "one CIDR per IP family"),
        ({"masquerade_bit": 32}, "0..31"),
        ({"nodeport_addresses": ("nope",)}, "not a CIDR"),
    ],
)
def test_bad_options_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RenderOptions(**kwargs)  # type: ignore[arg-type]


def test_quote_failing_line_maps_line_number_to_text() -> None:
    text = "*nat\n-A FOO -j BAR\nCOMMIT\n"
    assert quote_failing_line(text, "iptables-restore: line 2 failed") == (2, "-A FOO -j BAR")
    assert quote_failing_line(text, "Error occurred at line: 3") == (3, "COMMIT")
    assert quote_failing_line(text, "something else") == (None, None)


# --------------------------------------------------------------------------- detection


def _fake_saves(outputs: dict[str, str]):  # type: ignore[no-untyped-def]
    def run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        key = " ".join(argv)
        return subprocess.CompletedProcess(list(argv), 0, outputs.get(key, ""), "")

    return run


@pytest.mark.parametrize(
    ("outputs", "mode", "why"),
    [
        ({"iptables-nft-save -t mangle": ":KUBE-IPTABLES-HINT - [0:0]\n"}, "nft", "kubelet"),
        ({"iptables-legacy-save": ":KUBE-KUBELET-CANARY - [0:0]\n"}, "legacy", "kubelet"),
        ({"ip6tables-legacy-save": ":KUBE-SERVICES - [0:0]\n"}, "legacy", "kube-proxy"),
        ({"iptables-legacy-save": "-A INPUT -j X\n-A INPUT -j Y\n"}, "legacy", "more rules"),
        ({}, "nft", "default"),
    ],
)
def test_detect_mode_follows_the_wrapper_order(
    outputs: dict[str, str], mode: str, why: str
) -> None:
    got, reason = detect_mode(_fake_saves(outputs))
    assert got == mode and why in reason


# --------------------------------------------------------------------------- applier


def _backend(fake: FakeIptables, **kw: object) -> IptablesBackend:
    return IptablesBackend(OPTIONS, mode="nft", runner=fake, **kw)  # type: ignore[arg-type]


def _saves(fake: FakeIptables) -> dict[int, object]:
    return {f: normalise(fake.save_text(f)) for f in (4, 6)}


def _full_save(p: NodePlan) -> dict[int, object]:
    fake = FakeIptables()
    assert _backend(fake).sync(p, None).ok
    return _saves(fake)


def test_partial_syncs_end_where_a_fresh_full_sync_ends() -> None:
    fake = FakeIptables()
    b = _backend(fake)
    steps = [
        plan((service("a", ["10.96.0.1"]), THREE), (service("c", ["10.96.0.3"]), THREE)),
        # b appears between a and c: its lines go between theirs.
        plan(
            (service("a", ["10.96.0.1"]), THREE),
            (service("b", ["10.96.0.2"], node_port=30002), THREE),
            (service("c", ["10.96.0.3"]), THREE),
        ),
        # endpoint change, then b loses all endpoints (nat -> filter REJECT).
        plan(
            (service("a", ["10.96.0.1"]), THREE[:1]),
            (service("b", ["10.96.0.2"], node_port=30002), ()),
            (service("c", ["10.96.0.3"]), THREE),
        ),
        plan((service("c", ["10.96.0.3"]), THREE)),
    ]
    assert b.sync(steps[0], None).ok
    for before, after in itertools.pairwise(steps):
        names = {k[0] for k in before.entries} | {k[0] for k in after.entries}
        result = b.sync(after, names)
        assert result.ok and result.kind == "partial"
        assert _saves(fake) == _full_save(after)


def test_endpoint_change_sends_only_that_service() -> None:
    fake = FakeIptables()
    b = _backend(fake)
    p1 = plan((service("a", ["10.96.0.1"]), THREE), (service("b", ["10.96.0.2"]), THREE))
    b.sync(p1, None)
    p2 = plan((service("a", ["10.96.0.1"]), THREE), (service("b", ["10.96.0.2"]), THREE[:2]))
    result = b.sync(p2, {k[0] for k in p2.entries})
    sent = [r for r in b.restores if r.kind == "partial"]
    assert result.kind == "partial" and len(sent) == 1 and sent[0].family == 4
    assert "default/b:http" in sent[0].text and "default/a:http" not in sent[0].text
    assert "-A KUBE-SERVICES" not in sent[0].text and "-I KUBE-SERVICES" not in sent[0].text


def test_rejected_partial_falls_back_to_full_and_quotes_the_line() -> None:
    fake = FakeIptables()
    b = _backend(fake)
    p1 = plan((service("a", ["10.96.0.1"]), THREE))
    b.sync(p1, None)
    p2 = plan((service("a", ["10.96.0.1"]), THREE[:2]))
    fake.reject = "-m statistic --mode random --probability 0.5000000000 -j"
    result = b.sync(p2, {k[0] for k in p2.entries})
    assert not result.ok and result.kind == "full"
    assert "statistic" in result.error and "line" in result.error
    fake.reject = None
    v4 = [(r.kind, r.ok) for r in b.restores if r.family == 4][-2:]
    assert v4 == [("partial", False), ("full", False)]
    assert _saves(fake)[4] == _full_save(p1)[4]  # the previous rules stay
    # The next sync is full (and works), whatever it is asked for.
    assert b.sync(p2, set()).kind == "full"


def test_rejected_partial_with_good_full_sync_reports_fallback() -> None:
    fake = FakeIptables()
    b = _backend(fake)
    p1 = plan((service("a", ["10.96.0.1"]), THREE))
    b.sync(p1, None)
    fake.tables[4]["nat"]["KUBE-SERVICES"].clear()  # someone removed our dispatch rule
    p2 = plan()
    result = b.sync(p2, {k[0] for k in p1.entries})
    assert result.ok and result.fell_back and "line" in result.error
    assert _saves(fake) == _full_save(p2)


def test_missing_canary_forces_full_sync() -> None:
    fake = FakeIptables()
    b = _backend(fake)
    p1 = plan((service("a", ["10.96.0.1"]), THREE))
    b.sync(p1, None)
    del fake.tables[4]["mangle"][chains.KUBE_PROXY_CANARY]
    assert b.sync(p1, set()).kind == "full"


def test_missing_binary_is_an_error_result_not_an_exception() -> None:
    def missing(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        raise BinaryMissing(f"{argv[0]}: not found")

    b = IptablesBackend(OPTIONS, mode="legacy", runner=missing)
    result = b.sync(plan(), None)
    assert not result.ok and "iptables-legacy-save: not found" in result.error


def test_state_round_trip_allows_partial_sync_in_a_new_process() -> None:
    fake = FakeIptables()
    b1 = _backend(fake)
    p1 = plan((service("a", ["10.96.0.1"]), THREE))
    b1.sync(p1, None)
    b2 = _backend(fake)
    assert b2.import_state(b1.export_state()) is None
    p2 = plan((service("a", ["10.96.0.1"]), THREE[:1]))
    assert b2.sync(p2, {k[0] for k in p2.entries}).kind == "partial"
    assert _saves(fake) == _full_save(p2)
    other = IptablesBackend(RenderOptions(masquerade_all=True), mode="nft", runner=fake)
    assert other.import_state(b1.export_state()) == "renderer options changed"


def test_cleanup_removes_ours_and_keeps_foreign_rules() -> None:
    fake = FakeIptables()
    fake.tables[4]["nat"]["FOREIGN"] = ["-j RETURN"]
    fake.tables[4]["nat"]["PREROUTING"].append("-j FOREIGN")
    b = _backend(fake)
    b.sync(CASES_BY_NAME["lb-source-ranges"].build(), None)
    assert b.cleanup() > 0
    nat = fake.tables[4]["nat"]
    assert nat["PREROUTING"] == ["-j FOREIGN"] and nat["FOREIGN"] == ["-j RETURN"]
    assert not [ch for ch in nat if ch.startswith("KUBE-")]
    assert set(fake.tables[4]["filter"]) == {"INPUT", "FORWARD", "OUTPUT", "KUBE-FIREWALL"}
