"""Run a command inside a throwaway VM that boots Debian's stock kernel.

This machine's own kernel has no IPVS and no dummy links, so tests that need
them run under QEMU (software emulation: KVM hangs here) with virtme-ng, which
shares the host's root filesystem read-only with the guest. The guest therefore
sees the repository and its venv at the same paths as the host.

Usage from Python::

    result = run_in_vm([".venv/bin/python", "-m", "pytest", "tests/vm/inside", "-q"])
    print(result.returncode, result.output)

Usage from a shell (exit code is the guest command's)::

    .venv/bin/python -m tests.vm.vmrun -- uname -r
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Printed by the guest wrapper right before the user command starts, so the
# host can tell boot time from run time without trusting the guest clock.
_READY_MARK = "@@SLICEPROXY_VM_READY@@"

# Set inside the guest; tests under tests/vm/inside skip without it.
IN_VM_ENV = "SLICEPROXY_IN_VM"

DEFAULT_TIMEOUT = float(os.environ.get("SLICEPROXY_VM_TIMEOUT", "1200"))
DEFAULT_MEMORY = os.environ.get("SLICEPROXY_VM_MEMORY", "2G")


@dataclass(frozen=True)
class VMResult:
    returncode: int
    output: str
    boot_seconds: float | None  # host time until the guest command started
    total_seconds: float
    timed_out: bool


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # Natural ordering, so 6.1.0-10 sorts after 6.1.0-9 (plain string sort
    # would not).
    parts = re.findall(r"\d+|[^\d]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Path | None:
    """Newest /boot/vmlinuz-<ver> whose modules are installed.

    Modules matter: Debian builds 9p, ip_vs and dummy as modules, and the guest
    loads them from the host's /lib/modules/<ver> through the shared root.
    """
    candidates = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (modules / version / "modules.dep").exists():
            candidates.append((version, image))
    if not candidates:
        return None
    return max(candidates, key=lambda c: _version_key(c[0]))[1]


def find_vng() -> Path | None:
    # Prefer the vng of the interpreter running us (the project venv), since
    # that is where install.sh puts it; fall back to PATH.
    local = Path(sys.executable).parent / "vng"
    if local.exists():
        return local
    found = shutil.which("vng")
    return Path(found) if found else None


def find_qemu() -> Path | None:
    found = shutil.which("qemu-system-x86_64")
    return Path(found) if found else None


def missing_requirements() -> list[str]:
    """Human-readable list of what is missing to boot the VM (empty = ready)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the guest runs as root over the host's filesystem)")
    if find_qemu() is None:
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    if find_kernel() is None:
        missing.append(
            "a kernel image /boot/vmlinuz-* with modules (apt-get install linux-image-amd64)"
        )
    if find_vng() is None:
        missing.append("vng (pip install virtme-ng into the venv)")
    if shutil.which("busybox") is None:
        missing.append(
            "busybox (apt-get install busybox-static; virtme-ng builds its initramfs with it)"
        )
    return missing


def _fast_share_paths(cwd: Path) -> list[Path]:
    """Host directories worth re-mounting in the guest with a 9p page cache.

    virtme-ng mounts the root share without caching, so every stat() and
    read() is a round trip to QEMU; importing pytest + pyroute2 then takes
    ~20-30 s under TCG. A second read-only 9p share with cache=loose over the
    same path cuts that several-fold. We cover the working tree (which holds
    .venv) and the base interpreter's prefix (the venv's python symlinks there).
    """
    paths = [cwd.resolve(), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    chosen: list[Path] = []
    for path in sorted(set(paths), key=lambda p: len(p.parts)):
        # A parent share already covers its children. "/" or a top-level
        # directory (e.g. /usr for Debian's own python) would shadow the
        # guest's mounts and writable overlays, so leave those uncached.
        if len(path.parts) < 3 or any(path.is_relative_to(c) for c in chosen):
            continue
        chosen.append(path)
    return chosen


def _guest_script(
    command: Sequence[str] | str, cwd: Path, env: Mapping[str, str], shares: Sequence[Path]
) -> str:
    lines = ["set -u"]
    for i, path in enumerate(shares):
        q = shlex.quote(str(path))
        # Failure only costs speed, so warn and go on rather than fail the run.
        lines.append(
            f"mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,msize=512000,ro "
            f"spfast{i} {q} || echo 'vmrun: fast share {q} not mounted' >&2"
        )
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    for key, value in env.items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"echo {_READY_MARK}")
    cmd = command if isinstance(command, str) else shlex.join(command)
    # stderr joins stdout in the guest: virtme carries them on separate serial
    # ports, and merging them on the host scrambles the order of lines.
    lines.append(f"exec {cmd} 2>&1")
    return "\n".join(lines)


def build_vng_argv(
    command: Sequence[str] | str,
    *,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    memory: str = DEFAULT_MEMORY,
    cpus: int = 2,
    kernel: Path | None = None,
    vng: Path | None = None,
) -> list[str]:
    kernel = kernel or find_kernel()
    vng = vng or find_vng()
    if kernel is None or vng is None:
        raise RuntimeError("cannot boot VM, missing: " + ", ".join(missing_requirements()))
    guest_env = {
        IN_VM_ENV: "1",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        # The shared root is read-only; don't even try to write .pyc files.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    guest_env.update(env or {})
    shares = _fast_share_paths(cwd)
    qemu_opts = []
    for i, path in enumerate(shares):
        qemu_opts += [
            f"-fsdev local,id=spfs{i},path={path},security_model=none,readonly=on,multidevs=remap",
            f"-device virtio-9p-pci,fsdev=spfs{i},mount_tag=spfast{i}",
        ]
    argv = [
        str(vng),
        "--run",
        str(kernel),
        "--disable-kvm",  # KVM hangs on this kind of machine
        # 9p, not virtiofs: virtiofs would need a virtiofsd daemon running
        # beside QEMU (one more process to leak), and Debian 12 has only the
        # deprecated C one.
        "--force-9p",
        "--cpus",
        str(cpus),
        "--memory",
        memory,
        "--user",
        "root",
        "--cwd",
        str(cwd),
    ]
    if qemu_opts:
        # "=" form: argparse would take a value starting with "-" for an option.
        argv.append("--qemu-opts=" + " ".join(qemu_opts))
    argv += ["--exec", _guest_script(command, cwd, guest_env, shares)]
    return argv


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # vng, virtme-run and qemu share the process group we created, so one
    # signal reaches them all, including a QEMU that vng forked. Sent even
    # after a clean exit: a leftover member would keep our pipe open.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_in_vm(
    command: Sequence[str] | str,
    *,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory: str = DEFAULT_MEMORY,
    cpus: int = 2,
    kernel: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> VMResult:
    """Boot the VM, run `command` (argv or shell text) in `cwd`, return its result.

    `echo` receives each output line as it arrives (for live progress).
    QEMU and all helpers are killed on timeout or error; no process outlives
    this call. Exit code 255 means the VM died before the command reported one
    (kernel panic, QEMU failure); -9 means the timeout fired.
    """
    argv = build_vng_argv(command, cwd=cwd, env=env, memory=memory, cpus=cpus, kernel=kernel)
    host_env = dict(os.environ)
    # vng runs its helpers (virtme-run) through PATH.
    host_env["PATH"] = f"{Path(argv[0]).parent}{os.pathsep}{host_env.get('PATH', '')}"
    lines: list[str] = []
    ready_at: list[float] = []
    start = time.monotonic()
    # virtme leaves its return-code file in TMPDIR if killed; a private
    # TMPDIR lets us remove everything it created.
    with tempfile.TemporaryDirectory(prefix="sliceproxy-vm-") as tmp:
        host_env["TMPDIR"] = tmp
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=host_env,
            stdin=subprocess.DEVNULL,  # QEMU's stdio chardev must not grab a tty
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.strip() == _READY_MARK:
                    ready_at.append(time.monotonic())
                    continue
                lines.append(line)
                if echo is not None:
                    echo(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = -signal.SIGKILL
        finally:
            # Also on KeyboardInterrupt or any error: no QEMU may outlive us.
            _kill_group(proc)
            reader.join(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
    total = time.monotonic() - start
    boot = ready_at[0] - start if ready_at else None
    return VMResult(returncode, "\n".join(lines), boot, total, timed_out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--memory", default=DEFAULT_MEMORY)
    parser.add_argument("command", nargs="+", help="command to run inside the VM")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print("vmrun: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    result = run_in_vm(args.command, timeout=args.timeout, memory=args.memory, echo=print)
    boot = f"{result.boot_seconds:.1f}" if result.boot_seconds is not None else "?"
    print(
        f"vmrun: exit {result.returncode}, boot {boot} s, total {result.total_seconds:.1f} s"
        + (" (TIMED OUT)" if result.timed_out else ""),
        file=sys.stderr,
    )
    return result.returncode if result.returncode >= 0 else 124


if __name__ == "__main__":
    sys.exit(main())
