"""A long-lived IPVS applier for the VM tests, and the client that drives it.

Why a server: IPVS tables, ipsets, iptables and sysctls are per network
namespace, so the applier must run *inside* the test's node namespace. Under
software emulation each new Python process there costs 5-15 s (interpreter
start-up + pyroute2 import over 9p), and the traffic tests used to start one
per apply and per dump: 219 s for one module. One process per test module,
started with ``ip netns exec NODE python -m tests.vm.inside.applier_server``,
pays that once. It also keeps one ``IPVSBackend`` alive across syncs, as the
agent does, so ownership and drain times live in memory, not in a state file.

Protocol: one JSON object per line on stdin, one JSON reply per line on
stdout. Commands (``cmd``):

``apply``       ``spec``: services as plain dicts (see ``build_plan``) -> ok, error, ops
``drain_tick``  re-check draining real servers -> draining, deleted
``tick``        the backend's runtime tick (what the agent calls) -> {}
``dump``        the IPVS table -> {"TCP/10.0.0.1:80": {"10.1.0.2:8080": [weight, active, inactive]}}
``cleanup``     ``IPVSBackend.cleanup()`` -> removed
``cli``         ``argv``: run ``agent.cli.main(argv)`` in this process -> rc, stdout, stderr
``quit``        exit

A failing command answers ``{"exception": ..., "traceback": ...}`` and the
server keeps running, so one broken scenario does not take the module down.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[3]

# -- server side (inside the node namespace) ----------------------------------


def build_plan(spec: dict[str, Any]) -> Any:
    """A NodePlan from a compact spec (no API objects: the plan is what the
    backend consumes, and the decision code is tested elsewhere)."""
    from agent.model import Endpoint, NodeInfo, ServicePort, ServicePortName
    from agent.plan import NodePlan, plan_port
    from agent.state import ResolvedPort

    node = NodeInfo(spec["node"], zone=spec["zone"], addresses=tuple(spec["addresses"]))
    entries = {}
    for s in spec["services"]:
        svc = ServicePort(
            ServicePortName("default", s["name"], "p", s.get("protocol", "TCP")),
            tuple(s["ips"]),
            s["port"],
            node_port=s.get("node_port"),
            external_ips=tuple(s.get("external_ips", ())),
            load_balancer_ips=tuple(s.get("lb_ips", ())),
            load_balancer_source_ranges=tuple(s.get("source_ranges", ())),
            affinity_timeout=s.get("affinity"),
            external_traffic_policy=s.get("etp", "Cluster"),
        )
        eps = tuple(
            Endpoint(
                e["ip"],
                e["port"],
                ready=e.get("ready", True),
                serving=e.get("serving", True),
                terminating=e.get("terminating", False),
                node_name=e["node"],
                zone=e["zone"],
                zone_hints=frozenset(e.get("hints", ())),
                is_local=e["node"] == spec["node"],
            )
            for e in s["endpoints"]
        )
        for p in plan_port(ResolvedPort(svc, eps), node, True):
            entries[p.key] = p
    return NodePlan(node, entries)


def _dump(backend: Any) -> dict[str, dict[str, list[int]]]:
    return {
        f"{p}/{a}:{n}": {f"{r.address}:{r.port}": [r.weight, r.active, r.inactive] for r in s.reals}
        for (p, a, n), s in backend.kernel().dump().items()
    }


def _cli(argv: Sequence[str]) -> dict[str, Any]:
    from agent.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse errors
            rc = exc.code if isinstance(exc.code, int) else 2
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def handle(backend: Any, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req["cmd"]
    if cmd == "apply":
        result = backend.sync(build_plan(req["spec"]), None)
        return {"ok": result.ok, "error": result.error, "ops": result.rules_written}
    if cmd == "drain_tick":
        status = backend.drain_tick()
        return {"draining": status.draining, "deleted": status.deleted}
    if cmd == "tick":
        backend.tick()
        return {}
    if cmd == "dump":
        return {"table": _dump(backend)}
    if cmd == "cleanup":
        return {"removed": backend.cleanup()}
    if cmd == "cli":
        return _cli(req["argv"])
    raise ValueError(f"unknown command {cmd!r}")


def serve() -> int:
    from agent.backends.ipvs.apply import IPVSBackend
    from agent.backends.ipvs.render import IPVSOptions

    # Replies get a private copy of stdout; fd 1 then points at stderr so that
    # a stray print (or a child process) can never corrupt the JSON stream.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    backend = IPVSBackend(IPVSOptions(families=(4, 6)))
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        try:
            reply = handle(backend, req)
        except Exception as exc:  # reported to the test, which fails with it
            reply = {
                "exception": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        replies.write(json.dumps(reply) + "\n")
    backend.close()
    return 0


# -- client side (the test process) ---------------------------------------------


class ApplierError(RuntimeError):
    pass


class Applier:
    """Starts the server in a namespace; ``call`` sends one command and waits."""

    def __init__(self, exec_argv: Sequence[str], *, start_timeout: float = 180.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        # stderr (the backend's log) goes to a file: a pipe nobody drains
        # would block the server once full.
        self._stderr: IO[str] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives with the server
        self.proc = subprocess.Popen(
            [*exec_argv, sys.executable, "-m", "tests.vm.inside.applier_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=REPO,
        )
        try:
            self._read(start_timeout)
        except BaseException:
            self.close()
            raise

    def log_tail(self, chars: int = 4000) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            why = "timed out" if not ready else f"exited {self.proc.poll()}"
            raise ApplierError(f"applier server {why}; its log:\n{self.log_tail()}")
        return json.loads(line)

    def call(self, cmd: str, *, timeout: float = 120.0, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if "exception" in reply:
            raise ApplierError(f"{cmd}: {reply['exception']}\n{reply['traceback']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in (self.proc.stdout, self._stderr):
            if f is not None:
                f.close()


if __name__ == "__main__":
    sys.exit(serve())
