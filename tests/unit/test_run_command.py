"""`sliceproxy run`: flags, durations, errors without tracebacks, and
--dry-run against the fake API server (loopback only)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import build_parser, main
from agent.commands.run import default_hostname, settings_from_args
from agent.config import ConfigError
from agent.durations import parse_duration
from agent.model import NodeInfo
from agent.plan import NodePlan
from agent.serve import Deps, RunSettings, serve
from tests.support.agent_fakes import FakeBackend, endpoint, eslice, node, service
from tests.support.fake_apiserver import FakeApiServer

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> RunSettings:
    args = build_parser().parse_args(["run", *argv])
    return settings_from_args(args, env={})


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition driven by other threads/processes (20 ms steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("2h22m", 2 * 3600 + 22 * 60),
        ("1.5s", 1.5),
        ("300us", 0.0003),
        ("0", 0.0),
        ("-1s", -1.0),
    ],
)
def test_go_style_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "why"), [("30", "missing unit"), ("1x", "unknown unit"), ("s", "invalid duration")]
)
def test_bad_durations_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


# ---------------------------------------------------------------- flags


def test_defaults_match_kube_proxy() -> None:
    s = parse("--hostname-override", "Node-A ")
    assert s.node_name == "node-a"  # trimmed and lower-cased like kube-proxy
    assert s.proxy_mode == "iptables"
    assert (s.min_sync_period, s.sync_period) == (1.0, 30.0)
    assert s.metrics_bind == ("127.0.0.1", 10249)
    assert s.healthz_bind == ("0.0.0.0", 10256)
    assert s.feature_gates["PreferSameTrafficDistribution"] is True


def test_all_flags_parse() -> None:
    s = parse(
        "--kubeconfig=/etc/kc",
        "--master=https://10.0.0.1:6443",
        "--hostname-override=n1",
        "--proxy-mode=ipvs",
        "--cluster-cidr=10.244.0.0/16,fd00::/48",
        "--masquerade-all",
        "--min-sync-period=500ms",
        "--sync-period=1m",
        "--nodeport-addresses=192.168.0.0/24,primary",
        "--metrics-bind-address=[::1]:9999",
        "--healthz-bind-address=",
        "--feature-gates=PreferSameTrafficDistribution=false",
        "--service-proxy-name=sliceproxy",
        "-v",
        "4",
        "--iptables-backend=nft",
        "--iptables-masquerade-bit=15",
        "--ipvs-scheduler=wlc",
        "--ipvs-max-drain=0",
        "--dry-run",
    )
    assert s.kubeconfig == "/etc/kc" and s.master == "https://10.0.0.1:6443"
    assert s.proxy_mode == "ipvs"
    assert s.cluster_cidrs == ("10.244.0.0/16", "fd00::/48")
    assert s.masquerade_all
    assert (s.min_sync_period, s.sync_period) == (0.5, 60.0)
    assert s.nodeport_addresses == ("192.168.0.0/24", "primary")
    assert s.metrics_bind == ("::1", 9999)
    assert s.healthz_bind is None  # empty disables
    assert s.feature_gates["PreferSameTrafficDistribution"] is False
    assert s.proxy_name == "sliceproxy" and s.verbosity == 4
    assert s.iptables_backend == "nft" and s.dry_run
    assert s.masquerade_bit == 15
    assert s.ipvs_scheduler == "wlc" and s.ipvs_max_drain is None  # 0: no limit


def test_dry_run_keeps_servers_off_unless_asked() -> None:
    s = parse("--hostname-override=n1", "--dry-run")
    assert s.metrics_bind is None and s.healthz_bind is None
    s = parse("--hostname-override=n1", "--dry-run", "--metrics-bind-address=127.0.0.1:0")
    assert s.metrics_bind == ("127.0.0.1", 0)


def test_hostname_falls_back_to_node_name_env_then_host_name() -> None:
    assert default_hostname("", {"NODE_NAME": "Worker-7"}) == "worker-7"
    assert default_hostname("explicit", {"NODE_NAME": "worker-7"}) == "explicit"
    assert default_hostname("", {}) == default_hostname("", {}).lower() != ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--sync-period", "30"], "missing unit"),
        (["--proxy-mode", "userspace"], "invalid choice"),
        (["--cluster-cidr", "10.0.0.0/33"], "invalid CIDR"),
        (["--metrics-bind-address", "localhost"], "expected IP:PORT"),
        (["--min-sync-period=-1s"], "negative duration"),
    ],
)
def test_bad_flags_exit_2_without_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-sync-period=1m", "--sync-period=30s"], "--min-sync-period must not be longer"),
        (["--sync-period=0"], "--sync-period must be greater than 0"),
        (["--feature-gates=Nope=true"], "unknown feature gate"),
        (["--iptables-masquerade-bit=32"], "--iptables-masquerade-bit must be between 0 and 31"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--hostname-override=n1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_settings_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        parse("--hostname-override=n1", "--sync-period=0")


# ---------------------------------------------------------------- --dry-run


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as server:
        yield server


def test_dry_run_prints_the_rule_diff_of_each_sync(api: FakeApiServer) -> None:
    api.create("Node", node("node-a"))
    api.create("Service", service())
    api.create("EndpointSlice", eslice("web-1", "web", endpoint("10.0.0.1")))
    out = io.StringIO()
    settings = RunSettings(
        node_name="node-a",
        master=api.url,
        min_sync_period=0.05,
        sync_period=1.0,
        metrics_bind=None,
        healthz_bind=None,
        dry_run=True,
    )
    backend = FakeBackend()
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            serve(settings, stop, Deps(backend=lambda _s: backend, out=out))
        )
    )
    thread.start()
    try:
        assert wait_for(lambda: "rules after sync 1 (full)" in out.getvalue())
        first = out.getvalue()
        assert "--- no rules" in first
        assert "+default/web:http IPv4 -> 10.0.0.1:8080" in first
        api.apply("EndpointSlice", eslice("web-1", "web", endpoint("10.0.0.2")))
        assert wait_for(lambda: "rules after sync 2 (partial)" in out.getvalue())
        second = out.getvalue()[len(first) :]
        assert "-default/web:http IPv4 -> 10.0.0.1:8080" in second
        assert "+default/web:http IPv4 -> 10.0.0.2:8080" in second
    finally:
        stop.set()
        thread.join(15.0)
    assert result == [0]
    assert backend.calls == []  # dry-run never asks the real backend to sync


def test_sigterm_stops_the_agent_with_status_0_and_no_traceback(
    api: FakeApiServer, tmp_path: Path
) -> None:
    api.create("Service", service())
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--dry-run",
            f"--kubeconfig={kubeconfig}",
            "--hostname-override=node-a",
            "--min-sync-period=10ms",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # One reader per pipe: a full pipe would block the agent.
    err_lines: list[str] = []
    out_lines: list[str] = []
    readers = [
        threading.Thread(target=lambda: err_lines.extend(proc.stderr or ())),
        threading.Thread(target=lambda: out_lines.extend(proc.stdout or ())),
    ]
    for r in readers:
        r.start()
    try:
        # The first sync's log line appears once everything is listed.
        assert wait_for(lambda: any("msg=sync " in line for line in err_lines), timeout=20.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(5.0)
    stdout = "".join(out_lines)
    lines = err_lines
    assert proc.returncode == 0
    log = "".join(lines)
    assert "Traceback" not in log
    assert "signal=SIGTERM" in log and 'rules="left in place"' in log
    assert "kind=full ok=true" in log
    assert "+++ rules after sync 1 (full)" in stdout


EMPTY_PLAN = NodePlan(NodeInfo("n1"), {})


def test_backends_built_from_run_settings_honour_the_flags() -> None:
    from agent.backends import registry

    s = parse("--hostname-override=n1", "--dry-run", "--iptables-masquerade-bit=15")
    iptables = registry.create("iptables", s)
    assert "--or-mark 0x8000" in iptables.render(EMPTY_PLAN)
    s = parse("--hostname-override=n1", "--dry-run", "--proxy-mode=ipvs", "--ipvs-max-drain=1m")
    ipvs = registry.create("ipvs", s)
    assert ipvs.max_drain == 60.0  # type: ignore[attr-defined]


def test_unknown_ipvs_scheduler_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.backends import registry

    s = parse("--hostname-override=n1", "--dry-run", "--proxy-mode=ipvs", "--ipvs-scheduler=xx")
    with pytest.raises(ConfigError, match="xx"):
        registry.create("ipvs", s)
