"""The store with the real artifact format: real encrypted artifacts built by strongroom.artifact."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import (
    ArtifactReader,
    DecryptionFailed,
    StructureValidator,
    build_header,
    encrypt_bytes,
)
from strongroom.errors import InvalidArgument, ResourceExhausted
from strongroom.modelstore.errors import ModelExists
from strongroom.modelstore.storage import FilesystemStorage
from tests.modelstore.artifacts import chunked
from tests.modelstore.backends import AnyStorage, assert_clean, blob_count
from tests.modelstore.conftest import serve

CREATED = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def artifact(name: str, version: str, plaintext: bytes) -> tuple[bytes, bytearray]:
    """A real artifact (and its data key); the wrapped key is opaque to the store."""
    dek = bytearray(os.urandom(32))
    header = build_header(
        model_name=name,
        model_version=version,
        content_type="application/vnd.onnx",
        key_id="kek/models",
        key_version=7,
        wrapped_dek=os.urandom(40),
        plaintext_size=len(plaintext),
        created_at=CREATED,
    )
    return encrypt_bytes(plaintext, dek, header=header), dek


@pytest.fixture
def real_stub(storage: AnyStorage) -> Iterator[pb_grpc.ModelStoreServiceStub]:
    host, channel = serve(storage, download_chunk=100_000)
    try:
        yield pb_grpc.ModelStoreServiceStub(channel)
    finally:
        channel.close()
        host.stop(0)


def upload(stub: pb_grpc.ModelStoreServiceStub, data: bytes, **first: object) -> pb.ModelInfo:
    def requests() -> Iterator[pb.PutModelRequest]:
        for i, part in enumerate(chunked(data, 50_000)):
            yield pb.PutModelRequest(data=part, **(first if i == 0 else {}))  # type: ignore[arg-type]

    return stub.PutModel(requests(), timeout=30).model


def download(stub: pb_grpc.ModelStoreServiceStub, name: str, version: str) -> bytes:
    return b"".join(m.data for m in stub.GetModel(pb.GetModelRequest(name=name, version=version)))


def test_validator_reports_identity_after_the_header() -> None:
    data, _ = artifact("acme/m", "1.0", b"p" * 1000)
    v = StructureValidator()
    v.feed(data[:10])
    assert v.identity() is None
    v.feed(data[10:500])
    assert v.identity() == ("acme/m", "1.0")
    v.feed(data[500:])
    assert v.finish().artifact_size == len(data)


def test_round_trip_through_the_store_decrypts(
    real_stub: pb_grpc.ModelStoreServiceStub, storage: AnyStorage
) -> None:
    plaintext = os.urandom(1_000_003)
    data, dek = artifact("acme/fraud", "3.1.4", plaintext)
    info = upload(
        real_stub, data, artifact_size=len(data), artifact_sha256=hashlib.sha256(data).hexdigest()
    )
    assert (info.name, info.version) == ("acme/fraud", "3.1.4")
    assert info.artifact_size == len(data)
    assert info.plaintext_size == len(plaintext)
    assert info.content_type == "application/vnd.onnx"
    assert (info.key_id, info.key_version) == ("kek/models", 7)
    assert info.created_at.ToDatetime(tzinfo=UTC) == CREATED
    record = storage.stat("acme/fraud", "3.1.4")
    assert record.plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert record.header_size < len(data)

    downloaded = download(real_stub, "acme/fraud", "3.1.4")
    assert downloaded == data
    assert bytes(ArtifactReader(downloaded).decrypt_all(dek, verify_digest=True)) == plaintext


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: b"X" + d[1:], "BAD_MAGIC"),
        (lambda d: d[:-1], "TRUNCATED"),
        (lambda d: d + b"\0", "TRAILING_DATA"),
        (lambda d: d[:12], "TRUNCATED"),
    ],
)
def test_invalid_real_artifacts_are_rejected(
    real_stub: pb_grpc.ModelStoreServiceStub,
    storage: AnyStorage,
    mutate: object,
    reason: str,
) -> None:
    data, _ = artifact("m", "1", b"q" * 100_000)
    with pytest.raises(grpc.RpcError) as info:
        upload(real_stub, mutate(data))  # type: ignore[operator]
    err: grpc.Call = info.value  # type: ignore[assignment]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(f"{reason}: ")
    assert storage.records() == () and blob_count(storage) == 0
    assert_clean(storage)


def test_oversized_header_is_refused_before_the_body(store_root: Path) -> None:
    data, _ = artifact("big", "1", b"z" * 200_000)
    with FilesystemStorage(store_root, max_artifact_size=100_000) as s:
        consumed = 0

        def chunks() -> Iterator[bytes]:
            nonlocal consumed
            for part in chunked(data, 4096):
                consumed += 1
                yield part

        with pytest.raises(ResourceExhausted) as info:
            s.put(chunks(), StructureValidator(max_artifact_size=s.max_artifact_size))
        assert info.value.reason == "ARTIFACT_TOO_LARGE"
        assert consumed == 1, "the header alone declares the artifact too large"
        assert s.records() == ()


def test_existing_version_is_refused_after_the_header(storage: AnyStorage) -> None:
    first, _ = artifact("m", "1", b"a" * 10_000)
    storage.put(chunked(first), StructureValidator())
    second, _ = artifact("m", "1", os.urandom(2_000_000))
    consumed = 0

    def chunks() -> Iterator[bytes]:
        nonlocal consumed
        for part in chunked(second, 4096):
            consumed += 1
            yield part

    with pytest.raises(ModelExists):
        storage.put(chunks(), StructureValidator())
    assert consumed == 1
    with storage.open("m", "1") as reader:
        assert b"".join(reader.chunks(1 << 20)) == first


def test_concurrent_real_uploads_have_one_winner(storage: AnyStorage) -> None:
    n = 5
    arts = [artifact("race", "1", os.urandom(300_000))[0] for _ in range(n)]
    barrier = threading.Barrier(n)
    outcomes: list[object] = [None] * n

    def run(i: int) -> None:
        def chunks() -> Iterator[bytes]:
            barrier.wait()
            yield from chunked(arts[i], 16_384)

        try:
            outcomes[i] = storage.put(chunks(), StructureValidator())
        except ModelExists as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, ModelExists)]
    assert len(winners) == 1, outcomes
    with storage.open("race", "1") as reader:
        assert b"".join(reader.chunks(1 << 20)) == arts[winners[0]]


def test_store_is_keyless_so_tampered_ciphertext_is_caught_by_the_reader(
    storage: AnyStorage,
) -> None:
    """The store checks structure only; authenticity is the keyed reader's job (and it does it)."""
    plaintext = os.urandom(100_000)
    data, dek = artifact("m", "1", plaintext)
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0x01
    storage.put(chunked(bytes(tampered)), StructureValidator())
    with storage.open("m", "1") as reader:
        stored = b"".join(reader.chunks(1 << 20))
    with pytest.raises(DecryptionFailed):
        ArtifactReader(stored).decrypt_all(dek)


def test_header_names_follow_the_store_rules(storage: AnyStorage) -> None:
    """Every name the artifact format accepts is a valid store name (same grammar)."""
    for name, version in [("a", "0"), ("acme/x.y_z-1", "1.0.0+build.5"), ("A" * 128, "v" * 64)]:
        data, _ = artifact(name, version, b"x")
        assert storage.put([data], StructureValidator()).name == name
    with pytest.raises(InvalidArgument):
        artifact("bad name", "1", b"x")
