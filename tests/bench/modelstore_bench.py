"""Model store throughput: PutModel / GetModel of one large artifact versus a bare gRPC byte stream.

All servers run in this process with the same gRPC options, the same credentials and the same
error-mapping interceptor; the baseline is a trivial generic-handler service that only counts the
bytes it receives (upload) or sends one pre-built chunk over and over (download). Figures are
MiB/s (best of ``repeats``) and ratios (model store / bare stream; 1.0 = no cost beyond gRPC
itself). Each repetition measures every variant once, interleaved, so that load from other
processes affects the store and its baseline alike.

The store side includes everything a real upload does: structure validation, SHA-256, writing,
fsync, rename, directory fsync, index insert; downloads read the blob just written (so usually
from the page cache). ``storage_put_without_grpc`` is the storage alone, fed from memory.

``run(results, server_credentials=..., channel_factory=...)`` measures over mTLS when given
credentials (``channel_factory(target)`` must return a channel to ``target``, which is
``localhost:PORT``); without them it measures plaintext and records the figures under ``no_tls``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import StructureValidator, encrypt_stream
from strongroom.modelstore.service import (
    DEFAULT_DOWNLOAD_CHUNK,
    ModelStoreServicer,
    add_to_server,
)
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.runtime.interceptors import ErrorMappingInterceptor, RequestDecodingInterceptor
from tests.modelstore.artifacts import artifact_header, fit

MiB = 1024 * 1024
DEFAULT_SIZE = 512 * MiB
UPLOAD_CHUNK = 1 * MiB
DOWNLOAD_CHUNKS = (256 * 1024, 512 * 1024, 1 * MiB, 2 * MiB)
_BARE_SERVICE = "bench.ByteStream"
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MiB)]

ChannelFactory = Callable[[str], grpc.Channel]


def _identity(data: bytes) -> bytes:
    return data


def _bytes(size: int, chunk: int) -> Iterator[bytes]:
    # Incompressible, and generated once: the benchmark measures transport and storage, not RNG.
    block = os.urandom(chunk)
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield block if n == chunk else block[:n]
        remaining -= n


def _bare_handler(chunk: int) -> grpc.GenericRpcHandler[Any, Any]:
    block = os.urandom(chunk)

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = 0
        for data in requests:
            total += len(data)
        return total.to_bytes(8, "big")

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        remaining = int.from_bytes(request, "big")
        while remaining > 0:
            n = min(chunk, remaining)
            yield block if n == chunk else block[:n]
            remaining -= n

    return grpc.method_handlers_generic_handler(
        _BARE_SERVICE,
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload, _identity, _identity),
            "Download": grpc.unary_stream_rpc_method_handler(download, _identity, _identity),
        },
    )


def _artifact(size: int, version: str) -> tuple[bytes, int]:
    """A real head and the filler length after it, for an artifact of at most ``size`` bytes.

    The store checks structure only (it holds no key), so filler passes for ciphertext and the
    figures isolate transport and storage from encryption.
    """
    return artifact_header("bench/model", version, fit("bench/model", version, size))


def _artifact_chunks(size: int, chunk: int, version: str) -> Iterator[bytes]:
    head, follow = _artifact(size, version)
    yield head
    yield from _bytes(follow, chunk)


def _artifact_requests(size: int, chunk: int, version: str) -> Iterator[pb.PutModelRequest]:
    head, follow = _artifact(size, version)
    yield pb.PutModelRequest(data=head, artifact_size=len(head) + follow)
    for data in _bytes(follow, chunk):
        yield pb.PutModelRequest(data=data)


def _write_real_artifact(path: Path, size: int) -> None:
    """Encrypts about ``size`` bytes of plaintext into a real artifact file (no store involved)."""
    plaintext_size = size - size // 64  # leaves room for the header and the per-chunk tags
    stream = encrypt_stream(
        _bytes(plaintext_size, UPLOAD_CHUNK),
        bytearray(os.urandom(32)),
        model_name="bench/real",
        model_version="1",
        content_type="application/octet-stream",
        key_id="kek/bench",
        key_version=1,
        wrapped_dek=os.urandom(40),
        plaintext_size=plaintext_size,
    )
    with open(path, "wb") as f:
        for piece in stream:
            f.write(piece)


def _file_requests(path: Path) -> Iterator[pb.PutModelRequest]:
    with open(path, "rb", buffering=0) as f:
        while data := f.read(UPLOAD_CHUNK):
            yield pb.PutModelRequest(data=data)


def _timed(fn: Callable[[], int]) -> float:
    """MiB/s of one call of ``fn`` (which returns the bytes it moved)."""
    started = time.perf_counter()
    moved = fn()
    return moved / MiB / (time.perf_counter() - started)


def _disk_write_fsync(path: Path, size: int) -> int:
    block = os.urandom(UPLOAD_CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // UPLOAD_CHUNK):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return size


class _Harness:
    """Every server the benchmark needs, started once; methods measure one transfer each."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        storage: FilesystemStorage,
        credentials: grpc.ServerCredentials | Callable[[], grpc.ServerCredentials] | None,
        make_channel: ChannelFactory,
    ) -> None:
        self._stack, self._credentials, self._make_channel = stack, credentials, make_channel
        self.storage = storage
        self.bare = {chunk: self._channel(self._bare(chunk)) for chunk in DOWNLOAD_CHUNKS}
        self.store = {
            chunk: pb_grpc.ModelStoreServiceStub(self._channel(self._store(chunk)))
            for chunk in DOWNLOAD_CHUNKS
        }
        self.real_store = pb_grpc.ModelStoreServiceStub(
            self._channel(self._store(DEFAULT_DOWNLOAD_CHUNK))
        )
        self._versions = iter(range(1_000_000))

    def _server(self) -> tuple[grpc.Server, int]:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=[ErrorMappingInterceptor(), RequestDecodingInterceptor()],
            options=_SERVER_OPTIONS,
        )
        if self._credentials is None:
            port = server.add_insecure_port("localhost:0")
        else:
            # A factory gives each server its own credentials object (dynamic credentials, such as
            # a rotating workload identity's, can back only one port).
            credentials = self._credentials() if callable(self._credentials) else self._credentials
            port = server.add_secure_port("localhost:0", credentials)
        server.start()
        self._stack.callback(lambda: server.stop(0).wait())
        return server, port

    def _bare(self, chunk: int) -> int:
        server, port = self._server()
        server.add_generic_rpc_handlers((_bare_handler(chunk),))
        return port

    def _store(self, chunk: int) -> int:
        server, port = self._server()
        servicer = ModelStoreServicer(self.storage, download_chunk=chunk)
        add_to_server(servicer, server)
        return port

    def _channel(self, port: int) -> grpc.Channel:
        channel = self._make_channel(f"localhost:{port}")
        self._stack.callback(channel.close)
        return channel

    def _clear(self) -> None:
        for record in self.storage.records():
            self.storage.delete(record.name, record.version)

    def bare_upload(self, size: int) -> int:
        upload = self.bare[UPLOAD_CHUNK].stream_unary(
            f"/{_BARE_SERVICE}/Upload", _identity, _identity
        )
        return int.from_bytes(upload(_bytes(size, UPLOAD_CHUNK)), "big")

    def bare_download(self, size: int, chunk: int) -> int:
        download = self.bare[chunk].unary_stream(f"/{_BARE_SERVICE}/Download", _identity, _identity)
        return sum(len(d) for d in download(size.to_bytes(8, "big")))

    def put(self, size: int) -> int:
        """Replaces the stored artifact by a fresh ``size``-byte one, through gRPC."""
        self._clear()
        requests = _artifact_requests(size, UPLOAD_CHUNK, str(next(self._versions)))
        return int(self.store[UPLOAD_CHUNK].PutModel(requests).model.artifact_size)

    def put_direct(self, size: int) -> int:
        """The storage alone: a fresh artifact from memory, no gRPC."""
        self._clear()
        chunks = _artifact_chunks(size, UPLOAD_CHUNK, str(next(self._versions)))
        return self.storage.put(chunks, StructureValidator()).artifact_size

    def put_real(self, path: Path) -> int:
        """A real artifact read from ``path``, through the production validator."""
        self._clear()
        return int(self.real_store.PutModel(_file_requests(path)).model.artifact_size)

    def get(self, chunk: int) -> int:
        (record,) = self.storage.records()
        request = pb.GetModelRequest(name=record.name, version=record.version)
        return sum(len(m.data) for m in self.store[chunk].GetModel(request))


def run(
    results: dict[str, Any],
    *,
    size: int = DEFAULT_SIZE,
    repeats: int = 3,
    server_credentials: grpc.ServerCredentials | Callable[[], grpc.ServerCredentials] | None = None,
    channel_factory: ChannelFactory | None = None,
    workdir: Path | None = None,
) -> None:
    """Measures upload and download throughput of a ``size``-byte artifact (2 GiB: 2 * 1024**3).

    Writes ``results["no_tls" | "mtls"]``. Every upload goes through the production validator; the
    main figures upload a real head followed by filler (no encryption in the timing), while
    ``put_real_artifact_*`` uploads a real encrypted artifact read from a file. ``workdir`` holds the storage root (default: the system temp dir).
    """
    if (server_credentials is None) != (channel_factory is None):
        raise ValueError("pass both server_credentials and channel_factory, or neither")
    make_channel: ChannelFactory = channel_factory or (
        lambda target: grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    )
    best: dict[str, float] = {}

    def measure(key: str, fn: Callable[[], int]) -> None:
        best[key] = max(best.get(key, 0.0), _timed(fn))

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        storage = FilesystemStorage(tmp / "store", max_artifact_size=size)
        stack.callback(storage.close)
        harness = _Harness(stack, storage, server_credentials, make_channel)
        real_file = tmp / "real.artifact"
        _write_real_artifact(real_file, size)
        for _ in range(repeats):
            measure("bare_upload", lambda: harness.bare_upload(size))
            measure("put", lambda: harness.put(size))
            measure("put_direct", lambda: harness.put_direct(size))
            measure("put_real", lambda: harness.put_real(real_file))
            measure("disk", lambda: _disk_write_fsync(tmp / "disk.bin", size))
            harness.put(size)  # the artifact the downloads read
            for chunk in DOWNLOAD_CHUNKS:
                measure(f"bare_download_{chunk}", lambda c=chunk: harness.bare_download(size, c))  # type: ignore[misc]
                measure(f"get_{chunk}", lambda c=chunk: harness.get(c))  # type: ignore[misc]

    default = DEFAULT_DOWNLOAD_CHUNK
    figures: dict[str, Any] = {
        "size_mib": size // MiB,
        "repeats": repeats,
        "bare_upload_mib_s": round(best["bare_upload"], 1),
        "put_mib_s": round(best["put"], 1),
        "put_vs_bare": round(best["put"] / best["bare_upload"], 3),
        "put_real_artifact_mib_s": round(best["put_real"], 1),
        "put_real_artifact_vs_bare": round(best["put_real"] / best["bare_upload"], 3),
        "storage_put_without_grpc_mib_s": round(best["put_direct"], 1),
        # The floor under any durable upload: writing the same bytes to a file and fsyncing.
        "baseline_disk_write_fsync_mib_s": round(best["disk"], 1),
        "put_vs_disk_write_fsync": round(best["put"] / best["disk"], 3),
        "default_download_chunk_kib": default // 1024,
        "bare_download_mib_s": round(best[f"bare_download_{default}"], 1),
        "get_mib_s": round(best[f"get_{default}"], 1),
        "get_vs_bare": round(best[f"get_{default}"] / best[f"bare_download_{default}"], 3),
        "download_chunk_sweep": {
            f"{chunk // 1024}KiB": {
                "get_mib_s": round(best[f"get_{chunk}"], 1),
                "bare_mib_s": round(best[f"bare_download_{chunk}"], 1),
                "get_vs_bare": round(best[f"get_{chunk}"] / best[f"bare_download_{chunk}"], 3),
            }
            for chunk in DOWNLOAD_CHUNKS
        },
    }
    results["mtls" if server_credentials is not None else "no_tls"] = figures


if __name__ == "__main__":
    import json
    import sys

    out: dict[str, Any] = {}
    run(out, size=int(sys.argv[1]) * MiB if len(sys.argv) > 1 else DEFAULT_SIZE)
    print(json.dumps(out, indent=2))
