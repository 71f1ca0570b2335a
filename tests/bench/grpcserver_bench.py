"""gRPC's threaded server against ``grpc.aio``, the same method over the same mTLS, in one run.

The services run on gRPC's threaded server; this area measures what moving to ``grpc.aio`` would
change before anyone does it. One unary method (``tests.bench._server_model``) is served by each
model in its own process, with the key broker's process environment and a step-ca certificate
(DevStack), for two workloads: ``bare`` (the method returns at once) and ``release_shaped`` (a
P-384 verify and an fsync'd record-sized append per call: the parts of a key release that are not
gRPC, without group commit). Callers in this process (a channel each, a release-sized request of
:data:`REQUEST_BYTES` and a wrapped-key-sized answer) call it with 1 and with 16 at once; the two
models alternate, :data:`ROUNDS` rounds each, and the best round of each counts.

Figures per workload, callers and model: calls/s, p50 latency, and the server's CPU per call
(``/proc/PID/stat``, all its threads, gRPC's C core included). ``ratio_aio_over_threaded`` above 1
for calls/s (below 1 for CPU) would favour ``grpc.aio``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from strongroom.dev.devstack import DevStack
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.process import SERVICE_ENV
from tests.bench import _server_model
from tests.bench._proc import cpu_seconds
from tests.bench._scale import scaled
from tests.bench._stream_server import StreamServer

REQUEST_BYTES = 3000  # a ReleaseKeyRequest with an SNP report, its VCEK and an RSA-3072 key
RESPONSE_BYTES = 400  # a ReleaseKeyResponse: an RSA-3072 OAEP block and a few fields
ROUNDS = 2
CALLERS = (1, 16)
SERVER_NAME = "keybroker"


def _start(model: str, work: str, ca_url: str, root_pem: Path, state: Path) -> StreamServer:
    """One model/workload server process (``_server_model``), listening."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            _server_model.__name__,
            model,
            work,
            ca_url,
            str(root_pem),
            str(state),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **SERVICE_ENV["keybroker"]},
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    server = StreamServer(process, int(line) if line.isdigit() else 0, 0)
    if not server.port:
        server.stop()
        raise RuntimeError(f"the {model}/{work} server did not start")
    return server


def _calls(identity: WorkloadIdentity, port: int, n: int) -> list[Callable[[], bytes]]:
    request = os.urandom(REQUEST_BYTES)
    out: list[Callable[[], bytes]] = []
    for _ in range(n):
        channel = identity.channel(f"127.0.0.1:{port}", server_name=SERVER_NAME)
        method = channel.unary_unary(
            _server_model.METHOD, lambda b: b, lambda b: b[:RESPONSE_BYTES]
        )
        out.append(partial(method, request, timeout=30))
    return out


def _round(
    server: StreamServer, calls: list[Callable[[], bytes]], per_caller: int
) -> dict[str, float]:
    latencies: list[float] = []

    def work(call: Callable[[], bytes]) -> None:
        mine = []
        for _ in range(per_caller):
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
        latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(call,)) for call in calls]
    cpu_before = cpu_seconds(server.pid)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu = cpu_seconds(server.pid) - cpu_before
    n = len(latencies)
    return {
        "calls_per_s": round(n / wall, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "server_cpu_us_per_call": round(cpu / n * 1e6, 1),
    }


def run(results: dict[str, Any], *, calls: int = 1600, scale: float = 1.0) -> None:
    """Both models, both workloads, 1 and 16 callers (module doc); ``scale``:
    :mod:`tests.bench._scale`."""
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        ca = stack.start_ca()
        root_pem = Path(tmp) / "root.pem"
        root_pem.write_bytes(ca.root_pem)
        state = Path(tmp) / "server-identity"
        WorkloadIdentity.enrol(
            ca.client(),
            stack.token(SERVER_NAME, dns=[SERVER_NAME]),
            state_dir=state,
            auto_renew=False,
        ).close()
        client = stack.identity("inference")
        for work in _server_model.WORKS:
            servers = {
                model: _start(model, work, ca.url, root_pem, state)
                for model in _server_model.MODELS
            }
            try:
                results[work] = _compare(servers, client, calls, scale)
            finally:
                for server in servers.values():
                    server.stop()
        results["note"] = (
            "one process per model, callers in the bench process on the same cores; best of "
            f"{scaled(ROUNDS, scale)} alternated rounds; {REQUEST_BYTES}-byte requests, "
            f"{RESPONSE_BYTES}-byte answers"
        )


def _compare(
    servers: dict[str, StreamServer], client: WorkloadIdentity, calls: int, scale: float
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for n in CALLERS:
        per_caller = max(calls // n, scaled(50, scale)) if n > 1 else max(calls // 2, 1)
        callers = {model: _calls(client, server.port, n) for model, server in servers.items()}
        for model, server in servers.items():
            _round(server, callers[model], scaled(20, scale))  # connections, warm-up
        rounds: dict[str, list[dict[str, float]]] = {model: [] for model in servers}
        for _ in range(scaled(ROUNDS, scale)):
            for model, server in servers.items():
                rounds[model].append(_round(server, callers[model], per_caller))
        best = {model: max(r, key=lambda x: x["calls_per_s"]) for model, r in rounds.items()}
        figures[f"{n}_callers"] = best | {
            "ratio_aio_over_threaded": {
                figure: _ratio(best["aio"][figure], best["threaded"][figure])
                for figure in ("calls_per_s", "p50_ms", "server_cpu_us_per_call")
            }
        }
    return figures


def _ratio(aio: float, threaded: float) -> float | None:
    """aio over threaded; None when the threaded figure is 0 (a server's CPU over a few calls
    can be less than one clock tick of ``/proc/PID/stat``)."""
    return round(aio / threaded, 3) if threaded else None
