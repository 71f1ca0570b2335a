"""The buffered decryptor reads immutable caller bytes in place and copies everything else."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from strongroom.artifact import (
    ArtifactReader,
    ArtifactWriter,
    BufferedStreamDecryptor,
    DecryptionFailed,
    StreamDecryptor,
    stream,
    summarize,
)

from .conftest import header_for

CHUNK = 16384
SEALED = CHUNK + 16


# 0: the feeding thread decrypts (the loader's default); 2: two workers.
THREADS = pytest.mark.parametrize("threads", [0, 2])


@THREADS
@pytest.mark.parametrize("piece", [SEALED * 8, SEALED * 31 + 5, 512 * 1024, 3 * SEALED - 1])
def test_bytes_pieces_of_any_size_decrypt(
    piece: int, threads: int, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(3 << 20)
    decryptor = BufferedStreamDecryptor(dek, threads=threads, batch_chunks=4)
    for start in range(0, len(artifact), piece):
        # Views of immutable bytes, as the download path passes them.
        decryptor.feed(memoryview(artifact)[start : start + piece])
    assert decryptor.finish() == plaintext


@THREADS
def test_a_reused_mutable_buffer_is_copied_before_the_caller_overwrites_it(
    threads: int, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(3 << 20)
    decryptor = BufferedStreamDecryptor(dek, threads=threads, batch_chunks=4)
    buffer = bytearray(SEALED * 16)
    for start in range(0, len(artifact), len(buffer)):
        piece = artifact[start : start + len(buffer)]
        buffer[: len(piece)] = piece
        decryptor.feed(memoryview(buffer)[: len(piece)])
        buffer[:] = b"\xff" * len(buffer)  # the caller reuses its buffer at once
    assert decryptor.finish() == plaintext


@THREADS
def test_tampering_inside_a_run_read_in_place_is_caught(
    threads: int, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(3 << 20)
    tampered = bytearray(artifact)
    tampered[len(tampered) // 2] ^= 1
    decryptor = BufferedStreamDecryptor(dek, threads=threads, batch_chunks=4)
    with pytest.raises(DecryptionFailed):
        data = bytes(tampered)
        for start in range(0, len(data), 512 * 1024):
            decryptor.feed(data[start : start + 512 * 1024])
        decryptor.finish()


def test_with_no_workers_the_feeding_thread_decrypts_and_a_failure_wipes_the_output(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(3 << 20)
    decryptor = BufferedStreamDecryptor(dek, threads=0, batch_chunks=4, as_bytes=True)
    half = len(artifact) // 2
    decryptor.feed(artifact[:half])
    assert not [t for t in threading.enumerate() if t.name.startswith("artifact-stream-decrypt")]
    out = decryptor._out  # the plaintext buffer, already written up to the bytes fed
    assert out is not None and out[: 1 << 20] == plaintext[: 1 << 20]
    tampered = bytearray(artifact[half:])
    tampered[SEALED] ^= 1
    with pytest.raises(DecryptionFailed):
        decryptor.feed(bytes(tampered))
    assert not any(out)  # nothing decrypted so far survives the failure
    with pytest.raises(DecryptionFailed):
        decryptor.finish()


@pytest.mark.parametrize("threads", [0, 2])
def test_the_tail_s_scratch_is_wiped_and_the_bulk_key_dropped(
    dek: bytearray,
    make_artifact: Callable[..., tuple[bytes, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    """The final chunks are opened into a scratch buffer (the model's last bytes and the digest)
    and copied out: it was dropped unwiped; and the bulk opener (the derived key) outlived the
    stream. Both go with the stream now."""
    plaintext, artifact = make_artifact((3 << 20) + 1000)
    wiped: list[bytes] = []
    real_wipe = stream.wipe

    def recording_wipe(buf: bytearray | memoryview) -> None:
        real_wipe(buf)
        wiped.append(bytes(buf))

    monkeypatch.setattr(stream, "wipe", recording_wipe)
    decryptor = BufferedStreamDecryptor(dek, threads=threads)
    decryptor.feed(artifact)
    assert decryptor.finish() == plaintext
    tail_size = len(plaintext) % 16384 + 32  # the last plaintext bytes and the digest
    assert any(len(w) >= tail_size and not any(w) for w in wiped), "the tail's scratch"
    assert decryptor._bulk is None
    # Nor does any other holder of the derived key (the tail's cipher, the workers' ciphers).
    assert decryptor._cipher is None and decryptor._ciphers.empty()
    failed = BufferedStreamDecryptor(dek, threads=threads)
    failed.feed(artifact[: len(artifact) // 2])
    failed.abort()
    assert failed._bulk is None
    assert failed._cipher is None and failed._ciphers.empty()


def test_a_failed_feed_keeps_nothing_of_what_it_opened_before_its_failure(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    """A feed whose first chunks authenticate and a later one does not raises without handing
    out the first ones: their plaintext was kept in the stream (never returned, never dropped)
    until the stream was freed; and a finished stream kept its derived key's cipher."""
    plaintext, artifact = make_artifact((3 << 20) + 1000)
    decryptor = StreamDecryptor(dek)
    decryptor.feed(artifact[:4096])
    assert decryptor.header is not None
    # The first feed ends inside the second chunk: the next one completes it on its own (opened
    # and kept for the feed's answer), then opens a run holding the damaged chunk.
    split = decryptor.header.header_size + 56 + CHUNK + 16 + CHUNK // 2
    assert decryptor.feed(artifact[4096:split]) == plaintext[:CHUNK]
    damaged = bytearray(artifact[split:])
    damaged[len(damaged) // 2] ^= 1
    with pytest.raises(DecryptionFailed):
        decryptor.feed(damaged)
    assert decryptor._released == []
    assert decryptor._cipher is None and decryptor._bulk is None
    whole = StreamDecryptor(dek)
    assert whole.feed(artifact) == plaintext
    whole.finish()
    assert whole._cipher is None and whole._bulk is None


def test_threads_out_of_range_are_refused(dek: bytearray) -> None:
    for threads in (-1, 65):
        with pytest.raises(ValueError, match="between 0 and 64"):
            BufferedStreamDecryptor(dek, threads=threads)


class _SlowHash:
    """A SHA-256 whose updates take a while, as a big block's do on a busy machine."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def update(self, data: Any) -> None:
        time.sleep(0.05)
        self._real.update(data)

    def digest(self) -> bytes:
        return bytes(self._real.digest())


def test_the_writer_hashes_a_reused_mutable_piece_before_the_source_moves_on(
    dek: bytearray,
) -> None:
    # An iterable source that reads into one buffer and yields it each time (the common way to
    # read without allocating): once resumed, it overwrites the piece it yielded before. The
    # writer hashes on a second thread; a hash still running then took in the next piece's bytes,
    # and the artifact carried a digest of no plaintext at all (footer, store record, manifest
    # entry), which a verify_digest reader then refused.
    plaintext = os.urandom(4 << 20)
    writer = ArtifactWriter(header_for(len(plaintext)), dek)
    writer._hash = _SlowHash(writer._hash)  # type: ignore[assignment]
    piece = 1 << 20

    def source() -> Iterator[bytearray]:
        buffer = bytearray(piece)
        for start in range(0, len(plaintext), piece):
            buffer[:] = plaintext[start : start + piece]
            yield buffer

    artifact = b"".join(writer.stream(source()))
    assert summarize(artifact).plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert ArtifactReader(artifact).decrypt_all(dek, verify_digest=True) == plaintext
