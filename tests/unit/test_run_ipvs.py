"""`sliceproxy run --proxy-mode ipvs` on this host (no IPVS in its kernel):
--dry-run renders through the IPVS backend's renderer (rendering needs no
IPVS), and without --dry-run the agent refuses to start with exit 2 and the
plain "IPVS is not available" message. Both through agent.cli.main against
the fake API server (loopback only)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from agent.backends.ipvs.kernel import ipvs_available
from agent.cli import main
from tests.support.agent_fakes import endpoint, eslice, node, service
from tests.support.fake_apiserver import FakeApiServer

pytestmark = pytest.mark.skipif(
    ipvs_available(), reason="this kernel has IPVS: the no-IPVS paths cannot be seen here"
)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as server:
        server.create("Node", node("node-a"))
        server.create("Service", service())
        server.create("EndpointSlice", eslice("web-1", "web", endpoint("10.0.0.1")))
        yield server


@contextlib.contextmanager
def restored_signal_handlers() -> Iterator[None]:
    # `run` installs SIGTERM/SIGINT handlers in this (the main) thread.
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_dry_run_renders_ipvs_virtual_servers_without_kernel_ipvs(api: FakeApiServer) -> None:
    out = io.StringIO()
    seen = threading.Event()

    def stop_when_rendered() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "rules after sync 1" not in out.getvalue():
            time.sleep(0.02)
        seen.set()
        # What a user's Ctrl-C / kubelet's SIGTERM does: run's handler stops it.
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_when_rendered, daemon=True)
    argv = [
        "run",
        "--proxy-mode=ipvs",
        "--dry-run",
        f"--master={api.url}",
        "--hostname-override=node-a",
        "--min-sync-period=10ms",
    ]
    with restored_signal_handlers(), contextlib.redirect_stdout(out):
        watcher.start()
        rc = main(argv)
    watcher.join(5)
    text = out.getvalue()
    assert seen.is_set()
    assert rc == 0
    # The IPVS renderer's ipvsadm-style lines, not the plan fallback.
    assert "+-A -t 10.96.0.10:80 -s rr" in text, text
    assert "+-a -t 10.96.0.10:80 -r 10.0.0.1:8080 -m -w 1" in text, text
    assert "+10.96.0.10/32" in text  # bound to kube-ipvs0


def test_without_dry_run_exits_2_with_the_no_ipvs_message(
    api: FakeApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "run",
        "--proxy-mode=ipvs",
        f"--master={api.url}",
        "--hostname-override=node-a",
        "--metrics-bind-address=127.0.0.1:0",
        "--healthz-bind-address=127.0.0.1:0",
    ]
    with restored_signal_handlers():
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--proxy-mode ipvs: IPVS is not available in this kernel" in err
    assert "Traceback" not in err
