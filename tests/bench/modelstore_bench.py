"""Model store throughput: PutModel / GetModel of one large artifact versus a bare gRPC byte stream.

What is measured is what users run. Uploads go through the publishing client's own code
(:func:`strongroom.client.publish.put_model` with the publisher's framing,
:func:`~strongroom.client.publish.upload_pieces`: each chunk sent with one copy; a real artifact
file through :func:`~strongroom.client.publish.upload_artifact`, which is ``strongroom model
upload``: the file is checked and hashed, then sent) and downloads through the loader's
(:func:`strongroom.client.fetch.grpc_source`, which the inference loader and
:class:`~strongroom.client.fetch.ModelFetcher` read the store with: each chunk a view of the
received message). The store is served as ``strongroom serve modelstore`` serves it: over mTLS,
the host of :func:`strongroom.modelstore.server.serving_host` (the runtime's whole interceptor
chain: deferred request reads, metrics, tracing, error mapping, SPIFFE authorisation, the stream
and unary-call guards, request decoding; the service's message limits and worker shares). In
plaintext (no peer certificate, so no caller to authorise) the same
:class:`~strongroom.runtime.server.ServiceHost` runs without the authoriser, which is the only
difference. Every server runs in this process (so the client's CPU and the server's share the
interpreter and the two cores).

The baseline is a trivial generic-handler service on a plain ``grpc.server`` with the same
credentials (the same mTLS, or none) that only counts the bytes it receives (upload) or sends one
pre-built chunk over and over (download), read by a bare client that keeps each message's bytes as
gRPC hands them over. That chunk stays in the CPU's caches, while a download reads the artifact's
bytes from memory (the page cache): so downloads have a second baseline, the same bare service
streaming the stored artifact's own bytes as the storage reads them (``bare_download_stored``,
``get_vs_bare_stored``: what the servicer, the host and the framing add to reading the bytes at
all). Figures are MiB/s (best of ``repeats``) and ratios (model store / bare stream; 1.0 = no
cost beyond gRPC itself). Each repetition measures every variant once,
interleaved, so that load from other processes affects the store and its baseline alike.

The store side includes everything a real upload does: structure validation, SHA-256, writing,
fsync, rename, directory fsync, index insert; downloads read the blob just written (so usually
from the page cache). ``storage_put_without_grpc`` is the storage alone, fed from memory.

``run(results)`` measures plaintext and records the figures under ``no_tls``; ``run(results,
tls=StoreTls(...))`` measures over mTLS with the given workload identities and records them under
``mtls``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from strongroom.artifact import StructureValidator, encrypt_stream
from strongroom.client.fetch import grpc_source
from strongroom.client.publish import UploadMessage, put_model, upload_artifact, upload_pieces
from strongroom.files import start_writeback
from strongroom.modelstore._blobs import WRITEBACK_STEP
from strongroom.modelstore.server import serving_host
from strongroom.modelstore.service import (
    CONTROL_PLANE,
    DEFAULT_DOWNLOAD_CHUNK,
    SERVICE_NAME,
    ModelStoreServicer,
    add_to_server,
    message_limits,
)
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.config import CommonConfig, TracingConfig
from strongroom.runtime.interceptors import ErrorMappingInterceptor, RequestDecodingInterceptor
from strongroom.runtime.server import ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider, server_tracing_interceptor
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
_TIMEOUT = 600.0

ChannelFactory = Callable[[str], grpc.Channel]


@dataclass(frozen=True)
class StoreTls:
    """What an mTLS run serves and calls with: the store's identity and its common configuration
    (``authz`` must give the client's SPIFFE ID the publisher role, which also reads), and
    ``channel(target)``, an mTLS channel from the client's identity to ``localhost:PORT``."""

    server: WorkloadIdentity
    common: CommonConfig
    channel: ChannelFactory


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


def _bare_handler(chunk: int, storage: FilesystemStorage) -> grpc.GenericRpcHandler[Any, Any]:
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

    def download_stored(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        # The stored artifact's own bytes, read as the store reads them, sent bare.
        name, version = request.decode().split("\0")
        with storage.open(name, version) as reader:
            yield from reader.chunks(chunk)

    return grpc.method_handlers_generic_handler(
        _BARE_SERVICE,
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload, _identity, _identity),
            "Download": grpc.unary_stream_rpc_method_handler(download, _identity, _identity),
            "DownloadStored": grpc.unary_stream_rpc_method_handler(
                download_stored, _identity, _identity
            ),
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


def _upload_messages(size: int, chunk: int, version: str) -> Iterator[UploadMessage]:
    # As the publisher frames an artifact (publish_model): each piece in views of at most
    # UPLOAD_MESSAGE_BYTES, sent as PutModelRequest.data without protobuf's copies.
    for piece in _artifact_chunks(size, chunk, version):
        yield from upload_pieces(piece)


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


def _timed(fn: Callable[[], int]) -> float:
    """MiB/s of one call of ``fn`` (which returns the bytes it moved)."""
    started = time.perf_counter()
    moved = fn()
    return moved / MiB / (time.perf_counter() - started)


def _disk_write_fsync(path: Path, size: int) -> int:
    """Writes ``size`` bytes and fsyncs them, starting writeback as it goes as the store's
    uploads do (:func:`~strongroom.files.start_writeback`): without it the kernel
    writes everything at the fsync and the floor reads below the store it is the floor of."""
    block = os.urandom(UPLOAD_CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = written = 0
        for _ in range(size // UPLOAD_CHUNK):
            written += os.write(fd, block)
            if written - started >= WRITEBACK_STEP and start_writeback(
                fd, started, written - started
            ):
                started = written
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return size


class _Harness:
    """Every server the benchmark needs, started once; methods measure one transfer each."""

    def __init__(
        self, stack: contextlib.ExitStack, storage: FilesystemStorage, tls: StoreTls | None
    ) -> None:
        self._stack, self._tls = stack, tls
        self.storage = storage
        self.bare = {chunk: self._channel(self._bare(chunk)) for chunk in DOWNLOAD_CHUNKS}
        self.store_ports = {chunk: self._store(chunk) for chunk in DOWNLOAD_CHUNKS}
        self.store = {chunk: self._channel(port) for chunk, port in self.store_ports.items()}
        self._versions = iter(range(1_000_000))

    def _bare(self, chunk: int) -> int:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=[ErrorMappingInterceptor(), RequestDecodingInterceptor()],
            options=_SERVER_OPTIONS,
        )
        server.add_generic_rpc_handlers((_bare_handler(chunk, self.storage),))
        if self._tls is None:
            port = server.add_insecure_port("localhost:0")
        else:
            # Credentials of their own per server: a rotating identity's back one port each.
            port = server.add_secure_port("localhost:0", self._tls.server.server_credentials())
        server.start()
        self._stack.callback(lambda: server.stop(0).wait())
        return port

    def _store(self, chunk: int) -> int:
        servicer = ModelStoreServicer(self.storage, download_chunk=chunk)
        host = self._host(servicer)
        host.start()
        self._stack.callback(host.stop, 0)
        return host.port

    def _host(self, servicer: ModelStoreServicer) -> ServiceHost:
        if self._tls is not None:
            # Exactly what `strongroom serve modelstore` serves on.
            return serving_host(self._tls.common, servicer, identity=self._tls.server)
        # No peer certificate, so no caller to authorise: the same host without the authoriser.
        return ServiceHost(
            listen="localhost:0",
            credentials=None,
            services=[ServiceSpec(SERVICE_NAME, lambda s: add_to_server(servicer, s))],
            tracing=server_tracing_interceptor(make_tracer_provider("modelstore", TracingConfig())),
            control_plane=CONTROL_PLANE,
            message_limits=message_limits(servicer.max_chunk, servicer.download_chunk),
        )

    def _channel(self, port: int) -> grpc.Channel:
        target = f"localhost:{port}"
        if self._tls is None:
            channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            channel = self._tls.channel(target)
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

    def bare_download_stored(self, chunk: int) -> int:
        """The stored artifact's bytes as a bare stream: the storage's read, no store around it."""
        (record,) = self.storage.records()
        download = self.bare[chunk].unary_stream(
            f"/{_BARE_SERVICE}/DownloadStored", _identity, _identity
        )
        return sum(len(d) for d in download(f"{record.name}\0{record.version}".encode()))

    def put(self, size: int) -> int:
        """Replaces the stored artifact by a fresh ``size``-byte one, through the publishing
        client's upload (``put_model``, the publisher's framing)."""
        self._clear()
        version = str(next(self._versions))
        messages = _upload_messages(size, UPLOAD_CHUNK, version)
        answer = put_model(
            self.store[UPLOAD_CHUNK],
            messages,
            name="bench/model",
            version=version,
            timeout=_TIMEOUT,
        )
        return int(answer.model.artifact_size)

    def put_direct(self, size: int) -> int:
        """The storage alone: a fresh artifact from memory, no gRPC."""
        self._clear()
        chunks = _artifact_chunks(size, UPLOAD_CHUNK, str(next(self._versions)))
        return self.storage.put(chunks, StructureValidator()).artifact_size

    def put_real(self, path: Path) -> int:
        """A real artifact file, as ``strongroom model upload`` sends it (``upload_artifact``)."""
        self._clear()
        published = upload_artifact(
            path, store=self.store[DEFAULT_DOWNLOAD_CHUNK], timeout=_TIMEOUT
        )
        return int(published.model.artifact_size)

    def get(self, chunk: int) -> int:
        """The stored artifact, read as the inference loader reads it (``grpc_source``)."""
        (record,) = self.storage.records()
        source = grpc_source(self.store[chunk], timeout=_TIMEOUT)
        return sum(len(data) for data in source(record.name, record.version))


def run(
    results: dict[str, Any],
    *,
    size: int = DEFAULT_SIZE,
    repeats: int = 3,
    tls: StoreTls | None = None,
    workdir: Path | None = None,
) -> None:
    """Measures upload and download throughput of a ``size``-byte artifact (2 GiB: 2 * 1024**3).

    Writes ``results["no_tls"]``, or ``results["mtls"]`` with ``tls``. Every upload goes through
    the production validator; the main figures upload a real head followed by filler (no
    encryption in the timing), while ``put_real_artifact_*`` uploads a real encrypted artifact
    file with ``upload_artifact`` (which checks it, then hashes it as it sends it, as ``strongroom
    model upload`` does). ``workdir`` holds the storage root (default: the system temp dir).
    """
    best: dict[str, float] = {}

    def measure(key: str, fn: Callable[[], int]) -> None:
        best[key] = max(best.get(key, 0.0), _timed(fn))

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        storage = FilesystemStorage(tmp / "store", max_artifact_size=size)
        stack.callback(storage.close)
        harness = _Harness(stack, storage, tls)
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
                measure(f"bare_stored_{chunk}", lambda c=chunk: harness.bare_download_stored(c))  # type: ignore[misc]

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
        # The same bare stream sending the stored artifact's bytes as the storage reads them:
        # what the store's servicer, host and framing add to reading the bytes at all.
        "bare_download_stored_mib_s": round(best[f"bare_stored_{default}"], 1),
        "get_vs_bare_stored": round(best[f"get_{default}"] / best[f"bare_stored_{default}"], 3),
        "download_chunk_sweep": {
            f"{chunk // 1024}KiB": {
                "get_mib_s": round(best[f"get_{chunk}"], 1),
                "bare_mib_s": round(best[f"bare_download_{chunk}"], 1),
                "get_vs_bare": round(best[f"get_{chunk}"] / best[f"bare_download_{chunk}"], 3),
                "bare_stored_mib_s": round(best[f"bare_stored_{chunk}"], 1),
                "get_vs_bare_stored": round(best[f"get_{chunk}"] / best[f"bare_stored_{chunk}"], 3),
            }
            for chunk in DOWNLOAD_CHUNKS
        },
    }
    results["mtls" if tls is not None else "no_tls"] = figures


if __name__ == "__main__":
    import json
    import sys

    out: dict[str, Any] = {}
    run(out, size=int(sys.argv[1]) * MiB if len(sys.argv) > 1 else DEFAULT_SIZE)
    print(json.dumps(out, indent=2))
