"""`sliceproxy explain` end to end: both formats, bad input, --strict, stdin."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"


def explain_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["explain", "-o", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {sp["name"]: sp for sp in doc["servicePorts"]}


def test_example_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    doc = explain_json(capsys, "--state", str(EXAMPLE), "--node", "worker-a")
    assert doc["node"] == {"name": "worker-a", "zone": "zone-a"}
    names = [(sp["name"], sp["protocol"]) for sp in doc["servicePorts"]]
    assert names == sorted(names)
    web = by_name(doc)["default/web:http"]
    assert web == {
        "name": "default/web:http",
        "protocol": "TCP",
        "clusterIPs": ["10.96.0.10"],
        "port": 80,
        "nodePort": None,
        "externalIPs": [],
        "loadBalancerIPs": [],
        "internalTrafficPolicy": "Cluster",
        "externalTrafficPolicy": "Cluster",
        "sessionAffinity": {"type": "None"},
        "topologyMode": "PreferSameZone",
        "clusterEndpoints": ["10.244.1.2:8080"],
        "localEndpoints": None,
        "allReachableEndpoints": ["10.244.1.2:8080"],
        "hasAnyEndpoints": True,
        "reasons": web["reasons"],
    }
    assert web["reasons"]


def test_example_covers_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    doc = explain_json(capsys, "--state", str(EXAMPLE), "--node", "worker-a")
    sp = by_name(doc)
    assert sp["default/cache:redis"]["topologyMode"] == "PreferSameNode"
    assert sp["default/session:http"]["sessionAffinity"] == {
        "type": "ClientIP",
        "timeoutSeconds": 600,
    }
    assert sp["default/checkout:http"]["clusterEndpoints"] == [
        "10.244.1.10:8080",
        "10.244.2.10:8080",
    ]
    assert sp["kube-system/node-dns:dns"]["clusterEndpoints"] is None
    assert sp["kube-system/node-dns:dns"]["localEndpoints"] == ["10.244.1.53:53"]
    ingress = sp["default/ingress:https"]
    assert ingress["localEndpoints"] == [] and ingress["hasAnyEndpoints"] is True
    assert sp["default/shop:https"]["loadBalancerIPs"] == ["203.0.113.10"]
    assert sp["default/legacy-gw"]["externalIPs"] == ["192.0.2.50"]
    assert sp["default/reports:http"]["hasAnyEndpoints"] is False
    assert sp["default/web6:http"]["allReachableEndpoints"] == [
        "[fd00:10:244:1::2]:8080",
        "[fd00:10:244:2::2]:8080",
    ]
    assert len(sp["default/dual:http"]["allReachableEndpoints"]) == 4
    skipped = {s["object"]: s["reason"] for s in doc["skipped"]}
    assert skipped["Service default/postgres"].startswith("headless")
    assert skipped["Service default/docs"] == "type ExternalName"
    assert "mesh-proxy" in skipped["Service default/mesh-gateway"]


def test_service_filter(capsys: pytest.CaptureFixture[str]) -> None:
    doc = explain_json(
        capsys, "--state", str(EXAMPLE), "--node", "worker-b", "--service", "default/api"
    )
    assert [sp["name"] for sp in doc["servicePorts"]] == ["default/api:http", "default/api:metrics"]


def test_feature_gate_turns_off_same_node(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--state", str(EXAMPLE), "--node", "worker-a", "--service", "default/cache"]
    on = explain_json(capsys, *args)
    off = explain_json(capsys, *args, "--feature-gates", "PreferSameTrafficDistribution=false")
    assert on["servicePorts"][0]["topologyMode"] == "PreferSameNode"
    assert off["servicePorts"][0]["topologyMode"] == "PreferSameZone"


def test_unknown_feature_gate_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["explain", "--state", str(EXAMPLE), "--node", "n", "--feature-gates", "Nope=true"]
    assert main(args) == 2
    assert "unknown feature gate 'Nope'" in capsys.readouterr().err


def test_missing_node_object(capsys: pytest.CaptureFixture[str]) -> None:
    doc = explain_json(capsys, "--state", str(EXAMPLE), "--node", "worker-z")
    assert doc["node"] == {"name": "worker-z", "zone": ""}
    assert main(["explain", "--state", str(EXAMPLE), "--node", "worker-z"]) == 0
    assert "no Node object named worker-z" in capsys.readouterr().out


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--state", str(EXAMPLE), "--node", "worker-a"]) == 0
    out = capsys.readouterr().out
    assert "default/web:http TCP" in out
    assert "topology   PreferSameZone" in out
    assert "\033[" not in out  # not a terminal: no colour
    assert "[fd00:10:96::a]:80" in out


BAD = """\
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: default}
spec: {clusterIP: 10.96.1.2, ports: [{name: http, port: 99999}]}
---
this: is: not: yaml
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: good-1
  namespace: default
  labels: {kubernetes.io/service-name: good}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: []
- addresses: [10.0.0.1]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: weird, namespace: default, labels: {kubernetes.io/service-name: good}}
addressType: Banana
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"""


def test_bad_input_reported_rest_processed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    doc = explain_json(capsys, "--state", str(f), "--node", "n")
    err = capsys.readouterr().err
    assert [sp["name"] for sp in doc["servicePorts"]] == ["default/good:http"]
    assert doc["servicePorts"][0]["clusterEndpoints"] == ["10.0.0.1:8080"]
    # explain_json consumed stderr already; run again to read it.
    assert main(["explain", "--state", str(f), "--node", "n", "-o", "json"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line]
    assert (
        f"sliceproxy: {f}:2 Service default/badport: "
        "spec.ports[0].port: port 99999 out of range 1-65535" in lines
    )
    assert any(line.startswith(f"sliceproxy: {f}:3: not valid YAML") for line in lines)
    assert (
        f"sliceproxy: {f}:4 EndpointSlice default/good-1: "
        "endpoints[0].addresses: endpoint has no address" in lines
    )
    assert (
        f"sliceproxy: {f}:5 EndpointSlice default/weird: addressType: unknown address type 'Banana'"
        in lines
    )
    assert len(lines) == 4  # the ConfigMap is ignored quietly


def test_strict_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--strict", "--state", str(f), "--node", "n"])
    assert exc.value.code == 2
    assert "--strict" in capsys.readouterr().err


def test_strict_passes_clean_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--strict", "--state", str(EXAMPLE), "--node", "worker-a"]) == 0
    assert capsys.readouterr().err == ""


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(EXAMPLE.read_text()))
    doc = explain_json(capsys, "--state", "-", "--node", "worker-c")
    assert doc["node"]["zone"] == "zone-c"


def test_directory_json_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svc = {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": "j", "namespace": "default"},
        "spec": {"clusterIP": "10.96.2.1", "ports": [{"port": 80}]},
    }
    # `kubectl get -o json` List without kind on items.
    items = [{k: v for k, v in svc.items() if k not in ("kind", "apiVersion")}]
    (tmp_path / "a.json").write_text(
        json.dumps({"kind": "ServiceList", "apiVersion": "v1", "items": items})
    )
    (tmp_path / "b.yml").write_text("")
    (tmp_path / "notes.txt").write_text("not a manifest")
    doc = explain_json(capsys, "--state", str(tmp_path), "--node", "n")
    assert [sp["name"] for sp in doc["servicePorts"]] == ["default/j"]


def test_invalid_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x.json"
    f.write_text("{not json")
    assert main(["explain", "--state", str(f), "--node", "n"]) == 0
    assert f"{f}:1: not valid JSON" in capsys.readouterr().err


def test_missing_file_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--state", "/nonexistent.yaml", "--node", "n"]) == 0
    assert "cannot read" in capsys.readouterr().err


def test_console_script_no_traceback(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(BAD)
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "explain", "--strict", "--state", str(f), "--node", "n"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "explain", "--bogus-flag"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
