"""Inference benchmarks: OIP ModelInfer over gRPC, and ONNX Runtime load-from-bytes.

``run(results)`` records, all measured in the same run:

- ``oip_infer``: ModelInfer requests/s and p50/p99 latency for a small classifier (batch 1, raw
  FP32) over the OIP servicer, sequential and with 4 concurrent clients, against two baselines: the
  same inference called directly (no gRPC) and an empty RPC (ServerLive) on the same channel. Pass
  ``server_credentials`` and ``channel_factory`` (address -> channel) to measure over mTLS; call it
  once with and once without to get the mTLS/plaintext ratio.
- ``model_load``: loading ~100 MB and ~500 MB models from bytes in memory, from in-memory external
  initializers, and (for information) from a file on local disk (page cache warm).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from strongroom.inference.models import (
    LoadedModel,
    ModelRepository,
    RuntimeOptions,
    session_options,
)
from strongroom.inference.models._ort import ort
from strongroom.inference.oip import InferLimits, OipServicer, add_to_server
from strongroom.runtime.interceptors import ErrorMappingInterceptor, RequestDecodingInterceptor
from tests.bench._proc import rss_kib
from tests.bench._scale import scaled
from tests.inference import onnx_models

SEQUENTIAL_REQUESTS = 2000
CONCURRENT_CLIENTS = 4
CONCURRENT_REQUESTS = 1000  # per client
WARMUP = 200


def run(
    results: dict[str, Any],
    *,
    server_credentials: grpc.ServerCredentials | None = None,
    channel_factory: Callable[[str], grpc.Channel] | None = None,
    load_sizes_mb: Sequence[int] = (100, 500),
    scale: float = 1.0,
) -> None:
    """Runs the benchmarks and stores their figures in ``results`` (``scale``:
    :mod:`tests.bench._scale`)."""
    results["oip_infer"] = _bench_infer(server_credentials, channel_factory, scale)
    if load_sizes_mb:
        results["model_load"] = {f"{mb}MB": _bench_load(mb) for mb in load_sizes_mb}


def _stats(latencies_ns: list[int], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies_ns)
    return {
        "requests": len(ordered),
        "requests_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": round(ordered[len(ordered) // 2] / 1e6, 4),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] / 1e6, 4),
    }


def _timed(call: Callable[[], object], count: int) -> tuple[list[int], float]:
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter_ns()
        call()
        latencies.append(time.perf_counter_ns() - t0)
    return latencies, time.perf_counter() - started


def _bench_infer(
    server_credentials: grpc.ServerCredentials | None,
    channel_factory: Callable[[str], grpc.Channel] | None,
    scale: float,
) -> dict[str, Any]:
    sequential_requests = scaled(SEQUENTIAL_REQUESTS, scale)
    repo = ModelRepository(["classifier"])
    model = repo.load("classifier", "1", onnx_models.classifier())
    limits = InferLimits()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[ErrorMappingInterceptor(), RequestDecodingInterceptor()],
        options=limits.grpc_server_options(),
    )
    add_to_server(OipServicer(repo, limits=limits), server)
    if server_credentials is not None:
        port = server.add_secure_port("127.0.0.1:0", server_credentials)
        address = f"localhost:{port}"
    else:
        port = server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
    server.start()
    channel = channel_factory(address) if channel_factory else grpc.insecure_channel(address)
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
        request = pb.ModelInferRequest(model_name="classifier")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(x.tobytes())
        live = pb.ServerLiveRequest()

        for _ in range(scaled(WARMUP, scale)):
            stub.ModelInfer(request)
            stub.ServerLive(live)
            model.infer({"x": x})

        direct = _stats(*_timed(lambda: model.infer({"x": x}), sequential_requests))
        empty = _stats(*_timed(lambda: stub.ServerLive(live), sequential_requests))
        sequential = _stats(*_timed(lambda: stub.ModelInfer(request), sequential_requests))

        latencies: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            mine, _ = _timed(lambda: stub.ModelInfer(request), scaled(CONCURRENT_REQUESTS, scale))
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client) for _ in range(CONCURRENT_CLIENTS)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = _stats(latencies, time.perf_counter() - started)
    finally:
        channel.close()
        server.stop(grace=None)
    return {
        "transport": "tls" if server_credentials is not None else "plaintext",
        "model": "classifier Gemm-Relu-Gemm 4x8x3 + softmax + argmax, batch 1, raw FP32",
        "direct_infer_baseline": direct,
        "server_live_baseline": empty,
        "model_infer_sequential": sequential,
        f"model_infer_{CONCURRENT_CLIENTS}_clients": concurrent,
        "ratio_p50_model_infer_to_direct": round(sequential["p50_ms"] / direct["p50_ms"], 2),
        "ratio_p50_model_infer_to_server_live": round(sequential["p50_ms"] / empty["p50_ms"], 2),
    }


def _rss_mb() -> float:
    return round(rss_kib() / 1024, 1)


def _bench_load(megabytes: int) -> dict[str, Any]:
    elements = megabytes * (1 << 20) // 4
    table = np.random.default_rng(megabytes).standard_normal(elements, dtype=np.float32)
    blob = onnx_models.lookup(table)
    graph, weights = onnx_models.lookup_external(table)
    del table
    repeats = 3 if megabytes <= 100 else 2
    indices = {"indices": np.array([0, elements - 1])}

    def load_bytes() -> None:
        LoadedModel.from_bytes("big", "1", blob).infer(indices)

    def load_external() -> None:
        LoadedModel.from_bytes("big", "1", graph, external_data={"weights.bin": weights}).infer(
            indices
        )

    with tempfile.TemporaryDirectory(prefix="strongroom-bench-") as tmp:
        # Random weights, not a model anyone owns: the disk path is measured for comparison only.
        path = Path(tmp) / "model.onnx"
        path.write_bytes(blob)
        so = session_options(RuntimeOptions())

        def load_disk() -> None:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            session.run(None, indices)

        figures: dict[str, Any] = {"model_bytes": len(blob)}
        for name, load in (
            ("from_bytes_s", load_bytes),
            ("from_memory_external_initializers_s", load_external),
            ("from_disk_file_s", load_disk),
        ):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                load()
                times.append(time.perf_counter() - started)
            figures[name] = round(statistics.median(times), 3)
        os.unlink(path)
    figures["ratio_from_bytes_to_disk"] = round(
        figures["from_bytes_s"] / figures["from_disk_file_s"], 2
    )
    figures["ratio_external_to_disk"] = round(
        figures["from_memory_external_initializers_s"] / figures["from_disk_file_s"], 2
    )
    figures["rss_mb_after"] = _rss_mb()
    return figures


if __name__ == "__main__":
    import json

    out: dict[str, Any] = {}
    run(out)
    print(json.dumps(out, indent=2))
