"""One cold start of the multi-part bench model in a fresh process; prints timings and peak RSS.

``python -m tests.bench._multipart_worker MODE SPEC_JSON``; MODE is ``disk`` (ONNX Runtime from the
plaintext files), ``grpc`` (each plaintext file streamed over a bare gRPC byte stream into memory,
then loaded from memory) or ``secure`` (the inference loader: attested release, parts fetched from
the model store over mTLS in parallel and decrypted into memory). A fresh process per run, so the
peak RSS (``ru_maxrss``) belongs to that one load.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from strongroom.inference.models import ModelRepository  # imports ORT with telemetry off
from strongroom.inference.models._ort import ort
from tests.bench._proc import rss_kib


def _rss_mb() -> float:
    return rss_kib() / 1024


def _output(repository: ModelRepository, name: str, indices: list[int]) -> list[float]:
    y = repository.get(name).infer({"idx": np.array(indices, dtype=np.int64)})["y"]
    return [float(v) for v in np.asarray(y).reshape(-1)[:64]]


def _disk(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    session = ort.InferenceSession(spec["graph"], providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - t0
    y = session.run(["y"], {"idx": np.array(spec["indices"], dtype=np.int64)})[0]
    return {"total": seconds, "output": [float(v) for v in np.asarray(y).reshape(-1)[:64]]}


def _grpc(spec: dict[str, Any]) -> dict[str, Any]:
    from strongroom.artifact._memory import output_bytes

    t0 = time.perf_counter()
    channel = grpc.insecure_channel(
        spec["plain_address"], options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    get = channel.unary_stream("/bench.PlainFiles/Get", lambda b: b, lambda b: b)

    def fetch(name_size: tuple[str, int]) -> tuple[str, bytes]:
        name, size = name_size
        buf, view = output_bytes(size)
        offset = 0
        for chunk in get(name.encode(), timeout=600):
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        if offset != size:
            raise RuntimeError(f"{name}: {offset} of {size} bytes")
        return name, buf

    with ThreadPoolExecutor(spec["parallel"]) as pool:
        files = dict(pool.map(fetch, spec["files"]))
    channel.close()
    t1 = time.perf_counter()
    graph = files.pop(spec["graph_name"])
    repository = ModelRepository()
    repository.load("m", "1", graph, external_data=files)
    t2 = time.perf_counter()
    del files, graph
    return {
        "total": t2 - t0,
        "fetch": t1 - t0,
        "load": t2 - t1,
        "output": _output(repository, "m", spec["indices"]),
    }


def _secure(spec: dict[str, Any]) -> dict[str, Any]:
    from strongroom.attestation.release_signature import ReleaseVerifier
    from strongroom.attesters import SimulatedAttester, TeeType
    from strongroom.cli.client import Client
    from strongroom.client.keyrelease import KeyReleaseClient
    from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
    from strongroom.dev.simulated import SimulatedAuthority
    from strongroom.inference.loader import ModelLoader

    client = Client.from_args(argparse.Namespace(client_config=Path(spec["client_config"])))
    attester = SimulatedAttester(
        SimulatedAuthority.load(Path(spec["simulated_tee"])).snp(),
        TeeType.SEV_SNP,
        production=False,
        claims={"measurement": bytes.fromhex(DEMO_MEASUREMENT)},
    )
    repository = ModelRepository()
    loader = ModelLoader(
        repository,
        store_channel=client.channel("modelstore"),
        key_release=KeyReleaseClient(
            client.channel("keybroker"),
            attester,
            client.identity.public_key_der,
            verifier=ReleaseVerifier.from_files(
                client.config.keybroker_release_signing_public_keys
            ),
        ),
        parallel_parts=spec["parallel"],
    )
    time.sleep(0.5)  # the first ephemeral RSA key is made in the background, as in the service
    t0 = time.perf_counter()
    result = loader.load(spec["name"], spec["version"])
    total = time.perf_counter() - t0
    return {
        "total": total,
        **result.timings,
        "output": _output(repository, spec["name"], spec["indices"]),
    }


def main() -> None:
    mode, spec_json = sys.argv[1], sys.argv[2]
    spec = json.loads(spec_json)
    baseline = _rss_mb()
    out = {"disk": _disk, "grpc": _grpc, "secure": _secure}[mode](spec)
    out["baseline_rss_mb"] = baseline
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
