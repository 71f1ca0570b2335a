"""Cold start of a multi-part ONNX model larger than 2 GB (external data), against plaintext loads.

The model is generated here: a graph that sums ``Gather`` lookups from ``tensors`` float32 tables
of ``tensor_mb`` each, every table in its own external-data file (as ``onnx.save_model(...,
save_as_external_data=True, all_tensors_to_one_file=False)`` lays it out), so the model is one
graph part plus one part per table. It is published part by part (one streaming pass each) into a
model store running as a child process, beside a key broker (SoftHSM2) in another.

Each load runs in a fresh process, so its peak RSS is its own:

* secure — the inference loader: attested key release, parts fetched over mTLS in parallel and
  decrypted straight into memory, ONNX Runtime fed with in-memory external data; with 1 and with
  ``parallel`` parts at a time;
* baselines, same run — ONNX Runtime loading the plaintext files from local disk (page cache
  warm: it memory-maps external data); and the plaintext files streamed over a bare gRPC byte
  stream into memory (as many in parallel) and loaded from memory exactly as the secure path does.

Peak RSS is reported as a multiple of the model size (goal at most 1.2x). The secure output must equal
the plaintext output.

One untimed round of every mode comes first (``warmup_s``): the first processes to touch ~5 GB
after the model's generation paid for it several times over (a bare round of 32 s against 6 s for
the next, both its fetch and its load: on this VM, memory that free page reporting had handed back
to the host, whose first touch costs a host fault — with that memory touched beforehand, the first
round was as fast as the rest), which made medians meaningless and could leave a cold round as
the best of a mode. Touching the memory beforehand (README, "Benchmarking on this VM") does the
rest: one round touches ~5 GB, not all a run will use. ``warmup=False`` (the smoke test's tiny
model, which touches nothing worth touching) skips it: ``warmup_s`` is then None.

The broker is started with its release grant budget set explicitly out of reach
(``tests/bench/_budget.py``): its loads release keys back to back from one inference identity, far
past the default budget (1,024 at once, then 8 a second, per SPIFFE ID), which would otherwise turn
all but the first thousand into ``RELEASES_RATE_LIMITED`` refusals and time those instead.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from strongroom.artifact.manifest import ManifestLayout
from strongroom.client.multipart import onnx_parts, publish_parts
from strongroom.dev.devstack import DevStack
from tests.bench._budget import bench_broker_section

COLUMNS = 1024


def generate(folder: Path, *, tensors: int, tensor_mb: int, seed: int = 3) -> Path:
    """Writes the graph and its external-data files without ever holding the model in memory."""
    rows = (tensor_mb << 20) // (COLUMNS * 4)
    rng = np.random.default_rng(seed)
    inits, nodes, sums = [], [], []
    for t in range(tensors):
        name = f"table{t}"
        location = f"{name}.bin"
        with (folder / location).open("wb") as f:
            step = max(1, (64 << 20) // (COLUMNS * 4))
            for start in range(0, rows, step):
                n = min(step, rows - start)
                f.write(rng.standard_normal((n, COLUMNS), dtype=np.float32).tobytes())
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, COLUMNS])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", location),
            ("offset", "0"),
            ("length", str(rows * COLUMNS * 4)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
        nodes.append(helper.make_node("Gather", [name, "idx"], [f"g{t}"]))
        sums.append(f"g{t}")
    nodes.append(helper.make_node("Sum", sums, ["y"]))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, COLUMNS])],
        inits,
    )
    path = folder / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path)
    )
    return path


def _serve_files(folder: Path) -> tuple[grpc.Server, int]:
    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with (folder / request.decode()).open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    handler = grpc.method_handlers_generic_handler(
        "bench.PlainFiles",
        {"Get": grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _worker(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench._multipart_worker", mode, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed: {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run(
    results: dict[str, Any],
    *,
    tensors: int = 9,
    tensor_mb: int = 256,
    parallel: int = 4,
    repeats: int = 2,
    warmup: bool = True,
) -> None:
    """Generates a ``tensors * tensor_mb`` model (2.25 GiB by default) and measures its cold start
    (after an untimed round of every mode, unless not ``warmup``)."""
    # Rows of each table (a smaller model than the default has fewer than 4,096).
    rows = (tensor_mb << 20) // (COLUMNS * 4)
    indices = [0, 7, min(4095, rows - 1)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "model"
        models.mkdir()
        t0 = time.perf_counter()
        graph = generate(models, tensors=tensors, tensor_mb=tensor_mb)
        parts = onnx_parts(graph)
        size = sum(p.path.stat().st_size for p in parts)
        results["model_mb"] = round(size / 2**20, 1)
        results["parts"] = len(parts)
        results["generate_s"] = round(time.perf_counter() - t0, 1)
        with DevStack(root / "stack") as stack:
            stack.start_process("keybroker", bench_broker_section(stack))
            stack.start_process("modelstore")
            admin = stack.identity("admin")
            stack.create_release_key(admin, "bench", policy_version="bench")
            publisher = stack.identity("publisher")
            t0 = time.perf_counter()
            publish_parts(
                parts,
                name="big",
                version="1",
                key_id="bench",
                broker=stack.channel(publisher, "keybroker"),
                store=stack.channel(publisher, "modelstore"),
                layout=ManifestLayout.ONNX_EXTERNAL_DATA,
            )
            publish_s = time.perf_counter() - t0
            results["publish_s"] = round(publish_s, 2)
            results["publish_mib_s"] = round(size / 2**20 / publish_s, 1)
            secure_spec = {
                "client_config": str(stack.write_client_config("inference")),
                "simulated_tee": str(stack.root / "simulated-tee"),
                "name": "big",
                "version": "1",
                "indices": indices,
            }
            server, port = _serve_files(models)
            plain_spec = {
                "plain_address": f"127.0.0.1:{port}",
                "files": [[p.name, p.path.stat().st_size] for p in parts],
                "graph_name": parts[0].name,
                "parallel": parallel,
                "indices": indices,
            }
            runs: dict[str, list[dict[str, Any]]] = {
                "disk": [], "grpc": [], "secure_parallel": [], "secure_serial": [],
            }  # fmt: skip
            results["warmup_s"] = None
            try:
                for round_ in range(0 if warmup else 1, 1 + repeats):
                    t0 = time.perf_counter()
                    this_round = {
                        "disk": _worker("disk", {"graph": str(graph), "indices": indices}),
                        "grpc": _worker("grpc", plain_spec),
                        "secure_parallel": _worker("secure", {**secure_spec, "parallel": parallel}),
                        "secure_serial": _worker("secure", {**secure_spec, "parallel": 1}),
                    }
                    if round_ == 0:
                        results["warmup_s"] = round(time.perf_counter() - t0, 1)
                        continue
                    for name, sample in this_round.items():
                        runs[name].append(sample)
            finally:
                server.stop(None)
        reference = runs["disk"][0]["output"]
        results["secure_output_equals_plaintext"] = all(
            np.allclose(r["output"], reference, rtol=1e-6, atol=1e-6)
            for name in ("secure_parallel", "secure_serial", "grpc")
            for r in runs[name]
        )
        for name, samples in runs.items():
            best = min(samples, key=lambda r: r["total"])
            results[f"{name}_best_s"] = {
                k: round(v, 3)
                for k, v in best.items()
                if isinstance(v, float) and not k.endswith("_mb")
            }
            results[f"{name}_median_s"] = round(statistics.median(r["total"] for r in samples), 3)
            peak = max(r["peak_rss_mb"] for r in samples)
            base = min(r["baseline_rss_mb"] for r in samples)
            results[f"{name}_peak_rss_mb"] = round(peak, 1)
            results[f"{name}_peak_rss_x_model"] = round(peak / (size / 2**20), 2)
            results[f"{name}_load_rss_x_model"] = round((peak - base) / (size / 2**20), 2)
        secure = results["secure_parallel_best_s"]["total"]
        results["ratio_secure_to_local_disk"] = round(secure / results["disk_best_s"]["total"], 2)
        results["ratio_secure_to_plain_grpc"] = round(secure / results["grpc_best_s"]["total"], 2)
        results["ratio_serial_to_parallel_fetch"] = round(
            results["secure_serial_best_s"]["total"] / secure, 2
        )
