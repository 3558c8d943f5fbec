"""How much does the kubernetes client's model deserialisation cost at scale?

Serves N EndpointSlices x M endpoints (default 1,000 x 100 = 100k endpoints)
from the fake API server and lists them twice per round:

* ``models``: ``list_endpoint_slice_for_all_namespaces()`` -> client models;
* ``raw``: the same call with ``_preload_content=False`` + ``json.loads``.

Both include the HTTP transfer from 127.0.0.1, as the agent would pay it. A
second pair times decoding alone from the same prepared body, to separate the
decoder from the transport. Prints each time (best and median of the rounds)
and the models/raw ratio.

    .venv/bin/python bench/deserialize.py [--slices 1000] [--endpoints 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tests.support.fake_apiserver import FakeApiServer


def make_slice(i: int, endpoints: int) -> dict[str, Any]:
    svc = f"svc-{i // 2}"  # two slices per service, as large services have
    return {
        "metadata": {
            "name": f"{svc}-{i:05d}",
            "namespace": f"ns-{i % 20}",
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [f"10.{(i >> 8) & 255}.{i & 255}.{j % 250 + 1}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{(i * endpoints + j) % 500}",
                "zone": f"zone-{j % 3}",
                "targetRef": {
                    "kind": "Pod",
                    "namespace": f"ns-{i % 20}",
                    "name": f"{svc}-pod-{j}",
                    "uid": f"00000000-0000-0000-{i:04d}-{j:012d}",
                },
                "hints": {"forZones": [{"name": f"zone-{j % 3}"}]},
            }
            for j in range(endpoints)
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def timed(fn: Callable[[], Any], rounds: int) -> tuple[list[float], Any]:
    times: list[float] = []
    result: Any = None
    for _ in range(rounds):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def fmt(times: list[float]) -> str:
    return f"best {min(times):7.3f} s   median {statistics.median(times):7.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    with FakeApiServer() as server, tempfile.TemporaryDirectory() as tmp:
        for i in range(args.slices):
            server.create("EndpointSlice", make_slice(i, args.endpoints))
        api = k8s_config.new_client_from_config(str(server.kubeconfig(Path(tmp) / "kc")))
        disc = k8s_client.DiscoveryV1Api(api)
        try:

            def via_models() -> int:
                lst = disc.list_endpoint_slice_for_all_namespaces()
                return sum(len(s.endpoints or ()) for s in lst.items)

            def via_raw() -> int:
                resp = disc.list_endpoint_slice_for_all_namespaces(_preload_content=False)
                try:
                    body = json.loads(resp.data)
                finally:
                    resp.release_conn()
                return sum(len(s.get("endpoints") or ()) for s in body["items"])

            body_bytes = disc.list_endpoint_slice_for_all_namespaces(_preload_content=False).data
            body_text = body_bytes.decode()

            t_models, n_models = timed(via_models, args.rounds)
            t_raw, n_raw = timed(via_raw, args.rounds)
            assert n_models == n_raw == args.slices * args.endpoints, (n_models, n_raw)
            d_models, _ = timed(
                lambda: api.deserialize(body_text, "V1EndpointSliceList", "application/json"),
                args.rounds,
            )
            d_raw, _ = timed(lambda: json.loads(body_bytes), args.rounds)
        finally:
            api.close()

    print(
        f"{args.slices} EndpointSlices x {args.endpoints} endpoints = {n_raw} endpoints, "
        f"body {len(body_bytes) / 1e6:.1f} MB, {args.rounds} rounds"
    )
    print(f"list -> client models      : {fmt(t_models)}")
    print(f"list -> raw json.loads     : {fmt(t_raw)}")
    print(f"ratio models/raw (list)    : {min(t_models) / min(t_raw):6.1f}x")
    print(f"decode only -> models      : {fmt(d_models)}")
    print(f"decode only -> json.loads  : {fmt(d_raw)}")
    print(f"ratio models/raw (decode)  : {min(d_models) / min(d_raw):6.1f}x")


if __name__ == "__main__":
    main()
