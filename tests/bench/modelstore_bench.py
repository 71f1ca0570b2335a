"""Model store throughput: PutModel / GetModel of one large artifact versus a bare gRPC byte stream.

Both servers run in this process with the same gRPC options, the same credentials and the same
error-mapping interceptor; the baseline is a trivial generic-handler service that only counts the
bytes it receives (upload) or sends one pre-built chunk over and over (download). Figures are
MiB/s and ratios (model store / bare stream, 1.0 = no overhead beyond gRPC itself). The store side
includes everything a real upload does: structure validation, SHA-256, writing, fsync, rename,
index insert; the download reads the blob just written (so usually from the page cache).

``run(results, server_credentials=..., channel_factory=...)`` measures over mTLS when given
credentials (``channel_factory(target)`` must return a channel to ``target``, e.g.
``localhost:PORT``); without them it measures plaintext and records the figures under ``no_tls``.
"""

from __future__ import annotations

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
from strongroom.artifact import encrypt_stream
from strongroom.modelstore.artifact_validation import structure_validator_factory
from strongroom.modelstore.service import DEFAULT_DOWNLOAD_CHUNK, ModelStoreServicer
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.modelstore.validator import ValidatorFactory
from strongroom.runtime.interceptors import ErrorMappingInterceptor
from tests.modelstore.fake_artifact import FakeValidator, artifact_header

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


def _block(chunk: int) -> bytes:
    # Incompressible, and generated once: the benchmark measures transport and storage, not RNG.
    return os.urandom(chunk)


def _bare_handler(chunk: int) -> grpc.GenericRpcHandler[Any, Any]:
    block = _block(chunk)

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


def _server(credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        interceptors=[ErrorMappingInterceptor()],
        options=_SERVER_OPTIONS,
    )
    if credentials is None:
        port = server.add_insecure_port("localhost:0")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    return server, port


def _best(fn: Callable[[], int], repeats: int) -> float:
    """Best throughput in MiB/s over ``repeats`` runs of ``fn`` (which returns bytes moved)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        moved = fn()
        elapsed = time.perf_counter() - started
        best = max(best, moved / MiB / elapsed)
    return best


def _artifact_chunks(size: int, chunk: int, version: str) -> Iterator[bytes]:
    """A ``size``-byte fake artifact: its header, then ``chunk``-byte pieces of body."""
    body_size = size
    while len(header := artifact_header("bench/model", version, body_size)) + body_size != size:
        body_size = size - len(header)  # the header spells the body size out: iterate to a fixpoint
    yield header
    yield from _bytes(body_size, chunk)


def _artifact_requests(size: int, chunk: int, version: str) -> Iterator[pb.PutModelRequest]:
    for i, data in enumerate(_artifact_chunks(size, chunk, version)):
        yield pb.PutModelRequest(data=data, artifact_size=size if i == 0 else 0)


def _bytes(size: int, chunk: int) -> Iterator[bytes]:
    block = _block(chunk)
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield block if n == chunk else block[:n]
        remaining -= n


def _put_direct(storage: FilesystemStorage, validator_factory: ValidatorFactory, size: int) -> int:
    """Stores an artifact without gRPC (the storage's own cost), then deletes it."""
    record = storage.put(_artifact_chunks(size, UPLOAD_CHUNK, "direct"), validator_factory())
    storage.delete(record.name, record.version)
    return record.artifact_size


def _write_real_artifact(path: Path, size: int) -> None:
    """Encrypts about ``size`` bytes of plaintext into a real artifact file (no store involved)."""
    plaintext_size = size - size // 64  # leaves room for the header and the per-chunk tags
    dek = bytearray(os.urandom(32))
    stream = encrypt_stream(
        _bytes(plaintext_size, UPLOAD_CHUNK),
        dek,
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


class _Bench:
    def __init__(
        self,
        size: int,
        repeats: int,
        credentials: grpc.ServerCredentials | None,
        make_channel: ChannelFactory,
    ) -> None:
        self.size, self.repeats = size, repeats
        self.credentials, self.make_channel = credentials, make_channel

    def bare(self, chunk: int, *, upload: bool) -> float:
        """Bare byte stream MiB/s: upload in UPLOAD_CHUNK pieces, or download in ``chunk`` pieces."""
        server, port = _server(self.credentials)
        server.add_generic_rpc_handlers((_bare_handler(chunk),))
        server.start()
        channel = self.make_channel(f"localhost:{port}")
        try:
            if upload:
                up = channel.stream_unary(f"/{_BARE_SERVICE}/Upload", _identity, _identity)
                return _best(
                    lambda: int.from_bytes(up(_bytes(self.size, UPLOAD_CHUNK)), "big"),
                    self.repeats,
                )
            down = channel.unary_stream(f"/{_BARE_SERVICE}/Download", _identity, _identity)
            request = self.size.to_bytes(8, "big")
            return _best(lambda: sum(len(d) for d in down(request)), self.repeats)
        finally:
            channel.close()
            server.stop(0).wait()

    def store(
        self,
        storage: FilesystemStorage,
        validator_factory: ValidatorFactory,
        chunk: int,
        *,
        upload: bool,
    ) -> float:
        """Model store MiB/s: PutModel in UPLOAD_CHUNK pieces, or GetModel in ``chunk`` pieces.

        Uploads leave exactly one artifact stored, which downloads then read.
        """
        servicer = ModelStoreServicer(storage, validator_factory, download_chunk=chunk)
        server, port = _server(self.credentials)
        pb_grpc.add_ModelStoreServiceServicer_to_server(servicer, server)
        server.start()
        channel = self.make_channel(f"localhost:{port}")
        stub = pb_grpc.ModelStoreServiceStub(channel)
        try:
            if upload:
                versions = iter(range(1_000_000))

                def put() -> int:
                    for old in storage.records():
                        storage.delete(old.name, old.version)
                    requests = _artifact_requests(self.size, UPLOAD_CHUNK, str(next(versions)))
                    return int(stub.PutModel(requests).model.artifact_size)

                return _best(put, self.repeats)
            (record,) = storage.records()
            request = pb.GetModelRequest(name=record.name, version=record.version)
            return _best(lambda: sum(len(m.data) for m in stub.GetModel(request)), self.repeats)
        finally:
            channel.close()
            server.stop(0).wait()

    def store_file(self, storage: FilesystemStorage, path: Path) -> float:
        """PutModel MiB/s of a real artifact file, checked by the production validator."""
        validators = structure_validator_factory(storage.max_artifact_size)
        servicer = ModelStoreServicer(storage, validators)
        server, port = _server(self.credentials)
        pb_grpc.add_ModelStoreServiceServicer_to_server(servicer, server)
        server.start()
        channel = self.make_channel(f"localhost:{port}")
        stub = pb_grpc.ModelStoreServiceStub(channel)
        try:

            def put() -> int:
                for old in storage.records():
                    storage.delete(old.name, old.version)
                return int(stub.PutModel(_file_requests(path)).model.artifact_size)

            return _best(put, self.repeats)
        finally:
            channel.close()
            server.stop(0).wait()


def run(
    results: dict[str, Any],
    *,
    size: int = DEFAULT_SIZE,
    repeats: int = 3,
    server_credentials: grpc.ServerCredentials | None = None,
    channel_factory: ChannelFactory | None = None,
    validator_factory: ValidatorFactory = FakeValidator,
    workdir: Path | None = None,
) -> None:
    """Measures upload and download throughput of a ``size``-byte artifact (2 GiB: 2 * 1024**3).

    Writes ``results["no_tls" | "mtls"]``. ``validator_factory`` defaults to the test suite's
    trivial fake-format validator, so the main figures isolate the store from artifact parsing;
    ``put_real_artifact_*`` uploads a real encrypted artifact (read from a file) through the
    production validator.
    """
    if (server_credentials is None) != (channel_factory is None):
        raise ValueError("pass both server_credentials and channel_factory, or neither")
    make_channel: ChannelFactory = channel_factory or (
        lambda target: grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    )
    bench = _Bench(size, repeats, server_credentials, make_channel)
    figures: dict[str, Any] = {"size_mib": size // MiB, "repeats": repeats}
    results["mtls" if server_credentials is not None else "no_tls"] = figures

    bare_up = bench.bare(UPLOAD_CHUNK, upload=True)
    bare_down = {chunk: bench.bare(chunk, upload=False) for chunk in DOWNLOAD_CHUNKS}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="modelstore-bench-") as tmp:
        storage = FilesystemStorage(Path(tmp) / "store", max_artifact_size=size)
        try:
            direct = _best(lambda: _put_direct(storage, validator_factory, size), repeats)
            put = bench.store(storage, validator_factory, UPLOAD_CHUNK, upload=True)
            get = {
                chunk: bench.store(storage, validator_factory, chunk, upload=False)
                for chunk in DOWNLOAD_CHUNKS
            }
            real_file = Path(tmp) / "real.artifact"
            _write_real_artifact(real_file, size)
            put_real = bench.store_file(storage, real_file)
        finally:
            storage.close()

    figures["bare_upload_mib_s"] = round(bare_up, 1)
    figures["put_mib_s"] = round(put, 1)
    figures["storage_put_without_grpc_mib_s"] = round(direct, 1)
    figures["put_vs_bare"] = round(put / bare_up, 3)
    figures["put_real_artifact_mib_s"] = round(put_real, 1)
    figures["put_real_artifact_vs_bare"] = round(put_real / bare_up, 3)
    figures["download_chunk_sweep"] = {
        f"{chunk // 1024}KiB": {
            "get_mib_s": round(get[chunk], 1),
            "bare_mib_s": round(bare_down[chunk], 1),
            "get_vs_bare": round(get[chunk] / bare_down[chunk], 3),
        }
        for chunk in DOWNLOAD_CHUNKS
    }
    figures["default_download_chunk_kib"] = DEFAULT_DOWNLOAD_CHUNK // 1024
    figures["best_download_chunk_kib"] = max(get, key=lambda c: get[c]) // 1024
    if DEFAULT_DOWNLOAD_CHUNK in get:
        figures["bare_download_mib_s"] = round(bare_down[DEFAULT_DOWNLOAD_CHUNK], 1)
        figures["get_mib_s"] = round(get[DEFAULT_DOWNLOAD_CHUNK], 1)
        figures["get_vs_bare"] = round(
            get[DEFAULT_DOWNLOAD_CHUNK] / bare_down[DEFAULT_DOWNLOAD_CHUNK], 3
        )


if __name__ == "__main__":
    import json
    import sys

    out: dict[str, Any] = {}
    run(out, size=int(sys.argv[1]) * MiB if len(sys.argv) > 1 else DEFAULT_SIZE)
    print(json.dumps(out, indent=2))
