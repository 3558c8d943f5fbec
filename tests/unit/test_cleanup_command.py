"""`sliceproxy cleanup`: dispatch through the backend registry (fake backend
modules), order, skip and failure handling; and the real IPVS cleanup on
this host, whose kernel has no IPVS (skipped with a message, nothing touched).
The IPVS cleanup itself runs in the VM (tests/vm/inside/test_ipvs_traffic.py)."""

from __future__ import annotations

import argparse
import types

import pytest

from agent.backends import registry
from agent.backends.ipvs.kernel import ipvs_available
from agent.cli import main
from agent.commands import cleanup as cleanup_cmd

REAL_MODULE = registry.module


class FakeModules:
    """Stands in for registry.module(): records which cleanups ran, in order."""

    def __init__(self, behaviour: dict[str, str]) -> None:
        # name -> "ok" | "absent" | "fail" | "crash"
        self.behaviour = behaviour
        self.calls: list[tuple[str, argparse.Namespace]] = []

    def module(self, name: str) -> types.SimpleNamespace:
        def clean(args: argparse.Namespace) -> str:
            self.calls.append((name, args))
            what = self.behaviour[name]
            if what == "absent":
                raise registry.BackendAbsent(f"no {name} here")
            if what == "fail":
                raise OSError(f"{name} broke")
            if what == "crash":
                raise ValueError(f"{name} netlink trouble")
            return f"{name}: removed 3"

        # Everything but cleanup from the real module: the parser needs
        # add_arguments.
        real = REAL_MODULE(name)
        return types.SimpleNamespace(add_arguments=real.add_arguments, cleanup=clean)

    @property
    def order(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> FakeModules:
    mods = FakeModules({"iptables": "ok", "ipvs": "ok"})
    monkeypatch.setattr(registry, "module", mods.module)
    return mods


def test_default_cleans_every_backend_ipvs_first(
    fakes: FakeModules, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cleanup"]) == 0
    # IPVS first: iptables mode's cleanup cannot delete chains IPVS mode
    # still jumps to.
    assert fakes.order == ["ipvs", "iptables"]
    assert capsys.readouterr().out.splitlines() == ["ipvs: removed 3", "iptables: removed 3"]


@pytest.mark.parametrize("name", ["iptables", "ipvs"])
def test_backend_flag_cleans_only_that_backend(
    name: str, fakes: FakeModules, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cleanup", "--backend", name]) == 0
    assert fakes.order == [name]
    assert capsys.readouterr().out == f"{name}: removed 3\n"


def test_absent_backend_is_skipped_with_a_message_and_exit_0(
    fakes: FakeModules, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.behaviour["ipvs"] = "absent"
    assert main(["cleanup"]) == 0
    assert fakes.order == ["ipvs", "iptables"]
    out = capsys.readouterr().out
    assert "ipvs: skipped: no ipvs here" in out
    assert "iptables: removed 3" in out


@pytest.mark.parametrize("failure", ["fail", "crash"])
def test_a_failing_backend_does_not_stop_the_others_and_exits_1(
    failure: str, fakes: FakeModules, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.behaviour["ipvs"] = failure
    assert main(["cleanup"]) == 1
    assert fakes.order == ["ipvs", "iptables"]
    captured = capsys.readouterr()
    assert "sliceproxy: ipvs cleanup failed:" in captured.err
    assert "Traceback" not in captured.err
    assert "iptables: removed 3" in captured.out


def test_iptables_flags_reach_the_cleaner(fakes: FakeModules) -> None:
    assert main(["cleanup", "--kube-proxy", "--iptables-backend=legacy", "--family=6"]) == 0
    args = dict(fakes.calls)["iptables"]
    assert args.kube_proxy is True
    assert args.iptables_backend == "legacy"
    assert args.family == "6"


def test_cleaner_is_each_backend_modules_cleanup() -> None:
    from agent.backends.iptables import cli as iptables_cli
    from agent.backends.ipvs import cli as ipvs_cli

    assert cleanup_cmd.cleaner("ipvs") is ipvs_cli.cleanup
    assert cleanup_cmd.cleaner("iptables") is iptables_cli.cleanup


def test_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cleanup", "--backend", "nftables"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(ipvs_available(), reason="this kernel has IPVS")
def test_real_ipvs_cleanup_without_ipvs_skips_and_touches_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.backends.ipvs import apply as ipvs_apply

    def must_not_build(*_a: object, **_k: object) -> None:
        raise AssertionError("no IPVS backend may be built on a kernel without IPVS")

    monkeypatch.setattr(ipvs_apply, "IPVSBackend", must_not_build)
    assert main(["cleanup", "--backend", "ipvs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ipvs: skipped: IPVS is not available in this kernel")
