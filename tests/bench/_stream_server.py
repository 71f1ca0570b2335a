"""The cold-start baselines' servers, each in its own process as a real store would be.

``coldstart_bench`` starts one per baseline with :func:`start` and stops it with
:meth:`StreamServer.stop`. Kinds (``python -m tests.bench._stream_server KIND FILE ...``):

- ``plain FILE``: the file as a bare gRPC byte stream (raw bytes messages of the store's download
  chunk size), no TLS;
- ``mtls FILE CA_URL ROOT_PEM STATE_DIR``: the same stream over mTLS, with the workload identity
  persisted in ``STATE_DIR`` (resumed, never renewed: a run is far shorter than its lifetime);
- ``store FILE ROOT``: the model store's own servicer without TLS, holding the PLAINTEXT model in
  a filesystem store under ``ROOT``: a real head, the plaintext, zero filler up to the length the
  head declares (structurally valid, since the store is keyless, but readable in clear).

The child prints ``PORT HEADER_SIZE`` (0 but for ``store``) on its first line of output and serves
until its standard input closes. It runs with the model store's process environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from strongroom.runtime.process import SERVICE_ENV

SERVICE = "bench.PlainModel"


class StreamServer:
    """A running bench server process: its port and, for ``store``, the artifact head's size."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, header_size: int) -> None:
        self._process = process
        self.port = port
        self.header_size = header_size

    @property
    def pid(self) -> int:
        """The server process's id (for its CPU time)."""
        return self._process.pid

    def stop(self) -> None:
        """Closes its standard input and waits for it to exit."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)


def start(kind: str, *args: str | Path) -> StreamServer:
    """Starts a ``kind`` server (module doc) in a child process; returns once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, kind, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **SERVICE_ENV["modelstore"]},
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode().split()
    if len(line) != 2:
        process.kill()
        process.wait(5)
        raise RuntimeError(f"the {kind} stream server did not start")
    return StreamServer(process, int(line[0]), int(line[1]))


def _plain(path: Path, credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    from strongroom.modelstore.service import DEFAULT_DOWNLOAD_CHUNK

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(DEFAULT_DOWNLOAD_CHUNK):
                yield chunk

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Get": grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    if credentials is None:
        return server, server.add_insecure_port("127.0.0.1:0")
    return server, server.add_secure_port("127.0.0.1:0", credentials)


def _store(path: Path, root: Path) -> tuple[grpc.Server, int, int]:
    from strongroom.artifact import StructureValidator
    from strongroom.modelstore.service import ModelStoreServicer, add_to_server
    from strongroom.modelstore.storage import FilesystemStorage
    from strongroom.runtime.interceptors import ErrorMappingInterceptor, RequestDecodingInterceptor
    from tests.modelstore.artifacts import artifact_header

    size = path.stat().st_size
    storage = FilesystemStorage(root, max_artifact_size=size + (1 << 20))
    header, follow = artifact_header("plain", "1", size)  # follow > size: tags, digest, footer

    def chunks() -> Iterator[bytes]:
        yield header
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        yield bytes(follow - size)

    storage.put(chunks(), StructureValidator())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[ErrorMappingInterceptor(), RequestDecodingInterceptor()],
    )
    add_to_server(ModelStoreServicer(storage), server)
    return server, server.add_insecure_port("127.0.0.1:0"), len(header)


def main(argv: list[str]) -> None:
    """Serves one baseline (module doc) until standard input closes."""
    kind, path = argv[0], Path(argv[1])
    header_size = 0
    identity = None
    if kind == "plain":
        server, port = _plain(path, None)
    elif kind == "mtls":
        from strongroom.pki import CaClient, WorkloadIdentity

        ca = CaClient(argv[2], Path(argv[3]).read_bytes())
        identity = WorkloadIdentity.resume(ca, argv[4], auto_renew=False)
        server, port = _plain(path, identity.server_credentials())
    elif kind == "store":
        server, port, header_size = _store(path, Path(argv[2]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    server.start()
    print(port, header_size, flush=True)
    sys.stdin.buffer.read()  # until the bench closes it
    server.stop(None)
    if identity is not None:
        identity.close()


if __name__ == "__main__":
    main(sys.argv[1:])
