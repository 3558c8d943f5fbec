"""Boot the test VM once and run every test under tests/vm/inside/ in it.

New inside-tests are picked up automatically: the guest runs pytest on the
whole directory, so adding a file there costs no extra boot (~15-40 s under
software emulation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.vm import vmrun

INSIDE = Path(__file__).resolve().parent / "inside"

pytestmark = [pytest.mark.vm, pytest.mark.root]


@pytest.fixture(scope="module")
def inside_run() -> vmrun.VMResult:
    missing = vmrun.missing_requirements()
    if missing:
        pytest.skip("VM tests need: " + "; ".join(missing) + " (see tests/vm/install.sh)")
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(INSIDE.relative_to(vmrun.REPO)),
        "-q",
        "-rfEs",
        "-p",
        # The repo is read-only in the guest: no .pytest_cache beside it.
        "no:cacheprovider",
    ]
    result = vmrun.run_in_vm(command)
    boot = f"{result.boot_seconds:.1f}" if result.boot_seconds is not None else "?"
    run = (
        f"{result.total_seconds - result.boot_seconds:.1f}"
        if result.boot_seconds is not None
        else "?"
    )
    print(
        f"\n[vm] boot {boot} s, inside run {run} s, total {result.total_seconds:.1f} s,"
        f" exit {result.returncode}"
    )
    return result


def test_inside_vm(inside_run: vmrun.VMResult) -> None:
    result = inside_run
    assert not result.timed_out, f"VM timed out; output so far:\n{result.output}"
    # 255: the VM died before the command reported an exit code (panic, QEMU).
    assert result.returncode == 0, (
        f"tests inside the VM failed (exit {result.returncode}):\n{result.output}"
    )
    print(result.output)
