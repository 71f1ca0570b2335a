"""Encrypt → decrypt round trips through every writer and reader, at the sizes where chunking changes."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongroom.artifact import (
    ArtifactReader,
    ArtifactWriter,
    BufferedStreamDecryptor,
    DecryptionFailed,
    StreamDecryptor,
    encrypt_bytes,
    encrypt_stream,
    summarize,
    wipe,
)
from strongroom.errors import FailedPrecondition, InvalidArgument

from .conftest import CHUNK, header_for

FIELDS: dict[str, Any] = {
    "model_name": "acme/m",
    "model_version": "2",
    "content_type": "application/vnd.onnx",
    "key_id": "kek",
    "key_version": 1,
    "wrapped_dek": bytes(40),
}

# Where the chunking of plaintext || digest changes: empty, one byte, the digest straddling a chunk
# boundary (CHUNK-33 .. CHUNK-31), a full chunk, one more, several chunks.
SIZES = [
    0,
    1,
    CHUNK - 33,
    CHUNK - 32,
    CHUNK - 31,
    CHUNK - 1,
    CHUNK,
    CHUNK + 1,
    3 * CHUNK - 32,
    4 * CHUNK + 100,
    7 * CHUNK + 5000,
]


def _ranges(size: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    yield 0, size
    yield 0, 0
    yield size, 0
    for edge in (CHUNK - 1, CHUNK, CHUNK + 1, size - CHUNK, size - 1):
        if 0 <= edge <= size:
            yield edge, min(3, size - edge)
            yield edge, size - edge
    for _ in range(30):
        offset = rng.randrange(size + 1)
        yield offset, rng.randrange(size - offset + 1)


def _pieces(data: bytes, rng: random.Random, biggest: int) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = rng.randint(1, biggest)
        yield data[pos : pos + n]
        pos += n


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_every_interface(size: int, dek: bytearray, tmp_path: Path) -> None:
    rng = random.Random(size)
    plaintext = os.urandom(size)
    header = header_for(size)
    artifact = encrypt_bytes(plaintext, dek, header=header)
    assert len(artifact) == header.artifact_size
    assert summarize(artifact).plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()

    # Streaming writer from a file, from an iterable, with small blocks: same structure.
    path = tmp_path / "model.bin"
    path.write_bytes(plaintext)
    with path.open("rb") as f:
        from_file = b"".join(encrypt_stream(f, dek, block_size=3 * CHUNK, **FIELDS))
    from_iter = b"".join(
        encrypt_stream(
            _pieces(plaintext, rng, 5000), dek, plaintext_size=size, block_size=CHUNK, **FIELDS
        )
    )
    for other in (from_file, from_iter):
        assert summarize(other).plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
        assert ArtifactReader(other).decrypt_all(dek) == plaintext

    # Whole-artifact decryption: memory and file, one and two threads.
    art_path = tmp_path / "model.srm"
    art_path.write_bytes(artifact)
    for threads in (1, 2):
        assert ArtifactReader(artifact).decrypt_all(dek, threads=threads) == plaintext
        with art_path.open("rb") as f:
            got = ArtifactReader(f).decrypt_all(dek, threads=threads, verify_digest=True)
            assert got == plaintext

    # Random access: memory and (unbuffered) file.
    readers = [
        ArtifactReader(artifact),
        ArtifactReader(art_path.open("rb", buffering=0)),
        ArtifactReader(io.BytesIO(artifact)),  # no file descriptor: locked seek + readinto
    ]
    assert readers[2].decrypt_all(dek, threads=2) == plaintext
    for offset, length in _ranges(size, rng):
        for reader in readers:
            assert reader.read_range(dek, offset, length) == plaintext[offset : offset + length]

    # Incremental decryption in random pieces.
    for _ in range(3):
        dec = StreamDecryptor(dek, verify_digest=True)
        out = b"".join(dec.feed(p) for p in _pieces(artifact, rng, 40000))
        dec.finish()
        assert out == plaintext
        buffered = BufferedStreamDecryptor(dek, threads=2, batch_chunks=2, verify_digest=True)
        for piece in _pieces(artifact, rng, 40000):
            buffered.feed(piece)
        assert buffered.finish() == plaintext


def test_range_outside_the_plaintext(dek: bytearray, make_artifact: Any) -> None:
    _, artifact = make_artifact(100)
    reader = ArtifactReader(artifact)
    for offset, length in [(-1, 1), (0, 101), (100, 1), (50, -1)]:
        with pytest.raises(InvalidArgument) as info:
            reader.read_range(dek, offset, length)
        assert info.value.reason == "RANGE_OUT_OF_BOUNDS"


def test_key_arrives_after_the_header(dek: bytearray, make_artifact: Any) -> None:
    plaintext, artifact = make_artifact(5 * CHUNK + 3)
    dec = StreamDecryptor()
    assert dec.feed(artifact[:10]) == b"" and dec.header is None
    assert dec.feed(artifact[10 : 3 * CHUNK]) == b""
    assert dec.header is not None and dec.header.model_name == "acme/fraud-detector"
    out = dec.set_dek(dek) + dec.feed(artifact[3 * CHUNK :])
    dec.finish()
    assert out == plaintext

    buffered = BufferedStreamDecryptor()
    buffered.feed(artifact[: 2 * CHUNK])
    buffered.set_dek(dek)
    buffered.feed(artifact[2 * CHUNK :])
    assert buffered.finish() == plaintext


def test_finish_without_key_fails(make_artifact: Any) -> None:
    _, artifact = make_artifact(10)
    dec = StreamDecryptor()
    dec.feed(artifact)
    with pytest.raises(FailedPrecondition) as info:
        dec.finish()
    assert info.value.reason == "DATA_KEY_REQUIRED"


def test_body_waiting_for_the_key_is_bounded(dek: bytearray) -> None:
    size = 17 * 1024 * 1024
    artifact = encrypt_bytes(bytes(size), dek, header=header_for(size))
    dec = StreamDecryptor()
    with pytest.raises(FailedPrecondition) as info:
        for i in range(0, len(artifact), 1 << 20):
            dec.feed(artifact[i : i + (1 << 20)])
    assert info.value.reason == "DATA_KEY_REQUIRED"


def test_writer_rejects_a_source_of_the_wrong_size(dek: bytearray, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    for declared in (len(data) - 1, len(data) + 1, 0):
        with pytest.raises(InvalidArgument) as info:
            b"".join(encrypt_stream(iter([data]), dek, plaintext_size=declared, **FIELDS))
        assert info.value.reason == "PLAINTEXT_SIZE_MISMATCH"
    # A file whose length disagrees with the declared size fails before anything is produced.
    path = tmp_path / "f"
    path.write_bytes(data)
    with path.open("rb") as f, pytest.raises(InvalidArgument) as info:
        encrypt_stream(f, dek, plaintext_size=5, **FIELDS)
    assert info.value.reason == "PLAINTEXT_SIZE_MISMATCH"
    # An unsized source needs a declared size.
    with pytest.raises(InvalidArgument) as info:
        encrypt_stream(iter([data]), dek, **FIELDS)
    assert info.value.reason == "PLAINTEXT_SIZE_REQUIRED"


def test_a_source_that_ends_early_never_yields_a_valid_artifact(dek: bytearray) -> None:
    data = os.urandom(3 * CHUNK + 10)
    produced = bytearray()
    with pytest.raises(InvalidArgument):
        for part in encrypt_stream(iter([data]), dek, plaintext_size=len(data) + 1, **FIELDS):
            produced += part
    with pytest.raises(Exception):  # noqa: B017 - truncated: structure or decryption must fail
        ArtifactReader(bytes(produced)).decrypt_all(dek)


def test_writer_push_api_and_size_checks(dek: bytearray) -> None:
    data = os.urandom(2 * CHUNK + 77)
    header = header_for(len(data))
    writer = ArtifactWriter(header, dek)
    wipe(dek)  # the writer keeps no reference to the caller's key
    assert dek == bytearray(32)
    parts = [writer.start()]
    parts += [writer.write(data[i : i + 1000]) for i in range(0, len(data), 1000)]
    parts.append(writer.finish())
    artifact = b"".join(parts)
    assert summarize(artifact).plaintext_size == len(data)
    with pytest.raises(ValueError):
        writer.write(b"more")

    short = ArtifactWriter(header_for(10), bytearray(32))
    short.start()
    short.write(b"123")
    with pytest.raises(InvalidArgument):
        short.finish()
    with pytest.raises(ValueError):
        short.finish()  # a failed writer stays failed


def test_invalid_key_sizes(make_artifact: Any) -> None:
    _, artifact = make_artifact(10)
    for bad in (bytearray(16), bytearray(31), bytearray(33)):
        with pytest.raises(InvalidArgument):
            ArtifactWriter(header_for(1), bad)
        with pytest.raises(InvalidArgument):
            ArtifactReader(artifact).decrypt_all(bad)
        with pytest.raises(InvalidArgument):
            StreamDecryptor(bad)


def test_wrong_key_is_rejected_everywhere(make_artifact: Any) -> None:
    _, artifact = make_artifact(3 * CHUNK)
    other = bytearray(os.urandom(32))
    reader = ArtifactReader(artifact)
    with pytest.raises(DecryptionFailed):
        reader.decrypt_all(other)
    with pytest.raises(DecryptionFailed):
        reader.read_range(other, 0, 1)
    dec = StreamDecryptor(other)
    with pytest.raises(DecryptionFailed):
        dec.feed(artifact)
    with pytest.raises(DecryptionFailed):
        dec.finish()  # sticky
    buffered = BufferedStreamDecryptor(other)
    with pytest.raises(DecryptionFailed):
        buffered.feed(artifact)


def test_decryption_failed_is_opaque(make_artifact: Any) -> None:
    _, artifact = make_artifact(3 * CHUNK)
    with pytest.raises(DecryptionFailed) as info:
        ArtifactReader(artifact).decrypt_all(bytearray(32))
    assert info.value.reason == "DECRYPTION_FAILED"
    assert (
        str(info.value)
        == "DECRYPTION_FAILED: the artifact could not be decrypted and authenticated"
    )


def test_wipe() -> None:
    buf = bytearray(b"secret key material")
    wipe(buf)
    assert buf == bytearray(len(buf))
    view = memoryview(bytearray(b"abcdef"))[2:4]
    wipe(view)
    assert view.obj == bytearray(b"ab\x00\x00ef")
    wipe(bytearray())
    with pytest.raises(TypeError):
        wipe(memoryview(b"read-only"))


def test_wipe_and_output_views_leave_no_garbage_for_the_collector() -> None:
    """Regression: wipe() made a ctypes array type per buffer size, each freed only by the cycle
    collector (a full collection once it lived long): the key broker, wiping a data key per
    release, grew by ~5 KiB per 1,000 releases between full collections ~170,000 releases apart."""
    from strongroom.artifact._memory import output_bytes

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for size in (32, 33, 4096, 3 << 20):
            wipe(bytearray(size))
            obj, view = output_bytes(size)
            view[-1] = 7
            assert obj[-1] == 7
            wipe(view)
            assert not any(obj)
            view.release()
            gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, type)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_chunk_open_zeroes_its_output_on_failure() -> None:
    from strongroom.artifact import c2sp

    cipher = c2sp.ChunkCipher(bytes(32), bytes(12))
    sealed = bytearray(cipher.seal(0, False, b"\x42" * CHUNK))
    sealed[100] ^= 1
    out = bytearray(CHUNK)
    with pytest.raises(DecryptionFailed):
        cipher.open_into(0, False, sealed, out)
    assert out == bytearray(CHUNK)  # the unauthenticated plaintext was written, then wiped
    # Lengths contradicting the final flag are refused without decrypting.
    good = cipher.seal(0, False, b"\x42" * CHUNK)
    with pytest.raises(DecryptionFailed):
        cipher.open(0, True, good)
    with pytest.raises(ValueError):
        cipher.seal(0, False, b"short")
    with pytest.raises(ValueError):
        cipher.seal(0, True, b"\x00" * CHUNK)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=0, max_value=6 * CHUNK),
    cuts=st.lists(st.integers(min_value=1, max_value=3 * CHUNK), max_size=40),
    data=st.data(),
)
def test_property_round_trip(
    size: int, cuts: list[int], data: st.DataObject, dek: bytearray
) -> None:
    plaintext = random.Random(size).randbytes(size)
    artifact = encrypt_bytes(plaintext, dek, header=header_for(size))
    offset = data.draw(st.integers(min_value=0, max_value=size))
    length = data.draw(st.integers(min_value=0, max_value=size - offset))
    reader = ArtifactReader(artifact)
    assert reader.read_range(dek, offset, length) == plaintext[offset : offset + length]
    dec = StreamDecryptor(dek)
    out, pos = bytearray(), 0
    for cut in [*cuts, len(artifact)]:
        out += dec.feed(artifact[pos : pos + cut])
        pos += cut
    if pos < len(artifact):
        out += dec.feed(artifact[pos:])
    dec.finish()
    assert out == plaintext


def test_large_artifact_parallel_paths(dek: bytearray, tmp_path: Path) -> None:
    # Big enough for two decrypt_all workers (>= 128 full chunks) and the uninitialised buffer.
    size = 3 * 1024 * 1024 + 123
    plaintext = os.urandom(size)
    artifact = encrypt_bytes(plaintext, dek, header=header_for(size))
    path = tmp_path / "big.srm"
    path.write_bytes(artifact)
    for threads in (1, 2, 3):
        assert ArtifactReader(artifact).decrypt_all(dek, threads=threads) == plaintext
        with path.open("rb") as f:
            assert ArtifactReader(f).decrypt_all(dek, threads=threads) == plaintext
    for threads in (0, 1, 2, 3):
        buffered = BufferedStreamDecryptor(dek, threads=threads)
        for i in range(0, len(artifact), 1 << 20):
            buffered.feed(artifact[i : i + (1 << 20)])
        assert buffered.finish() == plaintext
    damaged = bytearray(artifact)
    damaged[len(artifact) // 2] ^= 0x80
    for threads in (1, 2):
        with pytest.raises(DecryptionFailed):
            ArtifactReader(bytes(damaged)).decrypt_all(dek, threads=threads)
    for threads in (0, 1, 2):
        buffered = BufferedStreamDecryptor(dek, threads=threads)
        with pytest.raises(DecryptionFailed):
            for i in range(0, len(damaged), 1 << 20):
                buffered.feed(damaged[i : i + (1 << 20)])
            buffered.finish()


def test_output_buffer_sizes() -> None:
    from strongroom.artifact._memory import output_buffer

    for size in (0, 1, (1 << 20) - 1, 1 << 20, 5 * (1 << 20) + 3):
        buf = output_buffer(size)
        assert type(buf) is bytearray and len(buf) == size
        buf[-1:] = b"\x01" if size else b""
    with pytest.raises(ValueError):
        output_buffer(-1)


def test_decrypt_into_a_caller_buffer(dek: bytearray, make_artifact: Any) -> None:
    plaintext, artifact = make_artifact(5 * CHUNK + 9)
    reader = ArtifactReader(artifact)
    out = bytearray(len(plaintext))
    for threads in (1, 2):
        reader.decrypt_into(dek, out, threads=threads, verify_digest=True)
        assert out == plaintext
    for bad in (bytearray(len(plaintext) - 1), memoryview(bytes(len(plaintext)))):
        with pytest.raises(InvalidArgument) as info:
            reader.decrypt_into(dek, bad)
        assert info.value.reason == "INVALID_OUTPUT_BUFFER"
    damaged = bytearray(artifact)
    damaged[-40] ^= 1  # inside the final chunk: detected by the tail check, before the chunks
    with pytest.raises(DecryptionFailed):
        ArtifactReader(bytes(damaged)).decrypt_into(dek, out)
    damaged = bytearray(artifact)
    damaged[len(artifact) // 2] ^= 1
    out[:] = b"\xff" * len(out)
    with pytest.raises(DecryptionFailed):
        ArtifactReader(bytes(damaged)).decrypt_into(dek, out)
    assert out == bytearray(len(out))  # zeroed: no plaintext of any chunk is left behind
