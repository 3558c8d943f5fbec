"""The e2e scene of the iptables traffic tests: a node, its pods (real
namespaces; only the manifests say which node each is on), manifest
builders shaped like `kubectl get -o json`, and the real `sliceproxy apply`
run inside the node namespace. Shared by tests/e2e/test_iptables_traffic.py,
test_iptables_partial_traffic.py and test_udp_conntrack.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.netns import Topology

NODE = "node-a"
ZONE = "zone-a"
NAMESPACE = "e2e"
CLUSTER_CIDRS = ("10.244.0.0/16", "fd00:10:244::/48")
POD_TCP, POD_UDP = 8080, 5353

# label -> (IPv4, IPv6, nodeName, zone). Remote endpoints are real pods in
# this topology; only the manifest says they live elsewhere.
PODS: dict[str, tuple[str, str, str, str]] = {
    "a1": ("10.244.1.11", "fd00:10:244:1::11", NODE, ZONE),
    "a2": ("10.244.1.12", "fd00:10:244:1::12", NODE, ZONE),
    # Same zone as the node, other node: tells "same zone" from "same node".
    "d1": ("10.244.4.11", "fd00:10:244:4::11", "node-d", ZONE),
    "b1": ("10.244.2.11", "fd00:10:244:2::11", "node-b", "zone-b"),
    "b2": ("10.244.2.12", "fd00:10:244:2::12", "node-b", "zone-b"),
    "c1": ("10.244.3.11", "fd00:10:244:3::11", "node-c", "zone-c"),
}
# --------------------------------------------------------------------- manifests
# Plain dicts shaped like `kubectl get -o json` output; files.py reads JSON.


def node_manifest(name: str, zone: str, addresses: Sequence[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone},
        },
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


def service_manifest(
    name: str,
    cluster_ip: str,
    *,
    port: int = 80,
    target_port: int = POD_TCP,
    protocol: str = "TCP",
    namespace: str = NAMESPACE,
    node_port: int | None = None,
    type_: str | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A single-port Service; ``spec`` adds fields verbatim (camelCase)."""
    family = "IPv6" if ":" in cluster_ip else "IPv4"
    port_spec: dict[str, Any] = {
        "name": "p",
        "port": port,
        "protocol": protocol,
        "targetPort": target_port,
    }
    if node_port is not None:
        port_spec["nodePort"] = node_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": type_ or ("NodePort" if node_port else "ClusterIP"),
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": [family],
            "ipFamilyPolicy": "SingleStack",
            "ports": [port_spec],
            **spec,
        },
        "status": status or {"loadBalancer": {}},
    }


def endpoint(
    pod: str,
    *,
    family: int = 4,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    hint: str | None = None,
) -> dict[str, Any]:
    """One EndpointSlice endpoint for a pod of :data:`PODS`."""
    ipv4, ipv6, node_name, zone = PODS[pod]
    out: dict[str, Any] = {
        "addresses": [ipv4 if family == 4 else ipv6],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
        "nodeName": node_name,
        "zone": zone,
        "targetRef": {"kind": "Pod", "name": pod, "namespace": NAMESPACE},
    }
    if hint is not None:
        out["hints"] = {"forZones": [{"name": hint}]}
    return out


def slice_manifest(
    service: str,
    endpoints: Sequence[dict[str, Any]],
    *,
    port: int = POD_TCP,
    protocol: str = "TCP",
    family: int = 4,
    namespace: str = NAMESPACE,
    suffix: str = "x1",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": f"IPv{family}",
        "metadata": {
            "name": f"{service}-{suffix}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
        "endpoints": list(endpoints),
    }


def write_manifest(path: Path, items: Sequence[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items)}))


def write_state(directory: Path, features: dict[str, list[dict[str, Any]]]) -> Path:
    """One small manifest per feature in ``directory`` (replacing old ones)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.json"):
        old.unlink()
    for name, items in features.items():
        write_manifest(directory / f"{name}.json", items)
    return directory


# --------------------------------------------------------------------- applying


@dataclass
class Applier:
    """Runs ``sliceproxy apply`` inside the node namespace, as a node would."""

    topo: Topology
    backend: str
    state_file: Path
    node: str = NODE

    def argv(self, state: Path) -> list[str]:
        # --strict: a mistake in the generated manifests must fail the test,
        # not quietly drop a service.
        argv = ["-m", "agent", "apply", "--strict", "--state", str(state), "--node", self.node]
        argv += ["--backend", "iptables", "--iptables-backend", self.backend]
        argv += ["--state-file", str(self.state_file)]
        for ip in (self.topo.node_ipv4, self.topo.node_ipv6):
            argv += ["--node-ip", ip]
        argv += ["--cluster-cidr", ",".join(CLUSTER_CIDRS)]
        return argv

    def apply(self, state: Path) -> str:
        """Apply; return the one-line summary (``... partial sync ok ...``).

        Raises CommandError (with the command's stderr) when it fails.
        """
        proc = self.topo.node.python(self.argv(state), check=True, timeout=60)
        return proc.stdout
