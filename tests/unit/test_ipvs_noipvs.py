"""On a kernel without IPVS (this host), IPVS mode stops at once with a plain
message: no traceback, nothing touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.backends.ipvs.kernel import NO_IPVS_MESSAGE, NoIPVSError, ipvs_available

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    ipvs_available(), reason="this kernel has IPVS: the no-IPVS path cannot be seen here"
)


def sliceproxy(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_apply_backend_ipvs_exits_with_a_clear_message_and_no_traceback(tmp_path):
    proc = sliceproxy(
        "apply",
        "--backend",
        "ipvs",
        "--state",
        "examples/cluster.yaml",
        "--node",
        "worker-a",
        "--state-file",
        str(tmp_path / "state.json"),
    )
    assert proc.returncode in (1, 2)
    assert "IPVS is not available in this kernel" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "state.json").exists()


def test_run_proxy_mode_ipvs_backend_refuses_to_start():
    from agent.backends.ipvs.cli import from_settings

    with pytest.raises(NoIPVSError, match="IPVS is not available") as info:
        from_settings(object())
    # An OSError: `sliceproxy run` turns those into a one-line message, exit 2.
    assert isinstance(info.value, OSError)
    assert str(info.value) == NO_IPVS_MESSAGE


def test_render_backend_ipvs_still_works_without_ipvs():
    proc = sliceproxy(
        "render", "--backend", "ipvs", "--state", "examples/cluster.yaml", "--node", "worker-a"
    )
    assert proc.returncode == 0, proc.stderr
    assert "-A -t 10.96.0.10:80 -s rr" in proc.stdout
