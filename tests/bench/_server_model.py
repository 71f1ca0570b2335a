"""One unary method served by gRPC's threaded server or by ``grpc.aio``, for ``grpcserver_bench``.

``python -m tests.bench._server_model MODEL WORK CA_URL ROOT_PEM STATE_DIR`` serves
``/bench.ServerModel/Call`` over mTLS with the workload identity persisted in ``STATE_DIR``
(resumed, never renewed), prints its port on its first line of output, and serves until its
standard input closes. It runs with the key broker's process environment (set by the bench).
``MODEL`` is ``threaded`` (``grpc.server`` on a 32-thread pool, as the
services run) or ``aio`` (``grpc.aio.server`` on one event loop). ``WORK`` is what each call does:

- ``bare``: returns the request;
- ``release_shaped``: the parts of a key release that are not gRPC: the release floor's P-384
  ECDSA verify of an SNP report's signed part (CPU, holding the GIL) and its write + ``fsync`` of
  an audit-record-sized line, under a lock (blocking I/O; on ``aio`` in the loop's default
  executor, as an asyncio server must run it).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from strongroom.runtime.config import ServerConfig
from tests.bench.keybroker_bench import _BareSyncs, p384_verify
from tests.bench.releasecpu_bench import RECORD_BYTES

SERVICE = "bench.ServerModel"
METHOD = f"/{SERVICE}/Call"
MODELS = ("threaded", "aio")
WORKS = ("bare", "release_shaped")
THREADED_WORKERS = ServerConfig().max_workers  # the services' pool size


def _identity(message: bytes) -> bytes:
    return message


def _release_shaped(directory: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """The verify (CPU) and the durable append (blocking I/O) of ``release_shaped``: the release
    floor's own parts (``keybroker_bench``), the append serialised as the audit's commits are."""
    syncs = _BareSyncs(directory, RECORD_BYTES)
    lock = threading.Lock()

    def append() -> None:
        with lock:
            syncs.append()

    return p384_verify(), append


def _threaded(
    credentials: grpc.ServerCredentials, work: tuple[Callable[[], None], Callable[[], None]] | None
) -> None:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        if work is not None:
            work[0]()
            work[1]()
        return request

    server = grpc.server(futures.ThreadPoolExecutor(THREADED_WORKERS))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {"Call": grpc.unary_unary_rpc_method_handler(call, _identity, _identity)},
            )
        ]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print(port, flush=True)
    sys.stdin.buffer.read()
    server.stop(None)


async def _aio(
    credentials: grpc.ServerCredentials, work: tuple[Callable[[], None], Callable[[], None]] | None
) -> None:
    loop = asyncio.get_running_loop()

    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        if work is not None:
            work[0]()
            await loop.run_in_executor(None, work[1])
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {"Call": grpc.unary_unary_rpc_method_handler(call, _identity, _identity)},
            )
        ]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    await server.stop(None)


def main(argv: list[str]) -> None:
    """Serves one model and workload (module doc) until standard input closes."""
    from strongroom.pki import CaClient, WorkloadIdentity

    model, work_name, ca_url, root_pem, state_dir = argv
    if model not in MODELS or work_name not in WORKS:
        raise SystemExit(f"usage: MODEL ({'|'.join(MODELS)}) WORK ({'|'.join(WORKS)}) ...")
    identity = WorkloadIdentity.resume(
        CaClient(ca_url, Path(root_pem).read_bytes()), state_dir, auto_renew=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = _release_shaped(Path(tmp)) if work_name == "release_shaped" else None
        if model == "threaded":
            _threaded(identity.server_credentials(), work)
        else:
            asyncio.run(_aio(identity.server_credentials(), work))
    identity.close()


if __name__ == "__main__":
    main(sys.argv[1:])
