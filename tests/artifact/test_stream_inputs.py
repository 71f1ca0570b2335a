"""The buffered decryptor reads immutable caller bytes in place and copies everything else."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from strongroom.artifact import BufferedStreamDecryptor, DecryptionFailed

CHUNK = 16384
SEALED = CHUNK + 16


@pytest.mark.parametrize("piece", [SEALED * 8, SEALED * 31 + 5, 512 * 1024, 3 * SEALED - 1])
def test_bytes_pieces_of_any_size_decrypt(
    piece: int, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(3 << 20)
    decryptor = BufferedStreamDecryptor(dek, threads=2, batch_chunks=4)
    for start in range(0, len(artifact), piece):
        # Views of immutable bytes, as the download path passes them.
        decryptor.feed(memoryview(artifact)[start : start + piece])
    assert decryptor.finish() == plaintext


def test_a_reused_mutable_buffer_is_copied_before_the_caller_overwrites_it(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(3 << 20)
    decryptor = BufferedStreamDecryptor(dek, threads=2, batch_chunks=4)
    buffer = bytearray(SEALED * 16)
    for start in range(0, len(artifact), len(buffer)):
        piece = artifact[start : start + len(buffer)]
        buffer[: len(piece)] = piece
        decryptor.feed(memoryview(buffer)[: len(piece)])
        buffer[:] = b"\xff" * len(buffer)  # the caller reuses its buffer at once
    assert decryptor.finish() == plaintext


def test_tampering_inside_a_run_read_in_place_is_caught(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(3 << 20)
    tampered = bytearray(artifact)
    tampered[len(tampered) // 2] ^= 1
    decryptor = BufferedStreamDecryptor(dek, threads=2, batch_chunks=4)
    with pytest.raises(DecryptionFailed):
        data = bytes(tampered)
        for start in range(0, len(data), 512 * 1024):
            decryptor.feed(data[start : start + 512 * 1024])
        decryptor.finish()
