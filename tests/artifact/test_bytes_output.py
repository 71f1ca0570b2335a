"""Decrypting straight into a ``bytes`` object (for ONNX Runtime), and wiping it afterwards."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from strongroom.artifact import BufferedStreamDecryptor, DecryptionFailed
from strongroom.artifact._memory import discard, output_bytes, wipe_bytes

CHUNK = 16384


def feed_all(decryptor: BufferedStreamDecryptor, artifact: bytes, piece: int = 100_000) -> None:
    for start in range(0, len(artifact), piece):
        decryptor.feed(artifact[start : start + piece])


def test_output_bytes_is_writable_storage_of_a_bytes_object() -> None:
    obj, view = output_bytes(4096)
    view[:] = b"\xab" * 4096
    assert isinstance(obj, bytes) and obj == b"\xab" * 4096
    view[0] = 1
    assert obj[0] == 1


def test_wipe_bytes_zeroes_a_new_bytes_object_and_never_a_shared_one() -> None:
    secret = bytes(range(1, 33))
    wipe_bytes(secret)
    assert secret == bytes(32)
    one = bytes([7])  # CPython's shared one-byte object: left alone
    wipe_bytes(one)
    assert bytes([7]) == b"\x07" and one == b"\x07"
    wipe_bytes(b"")
    with pytest.raises(TypeError):
        wipe_bytes(bytearray(b"ab"))  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 33, CHUNK, 5 * CHUNK + 7, 3 << 20])
def test_as_bytes_round_trip_and_wipe(
    size: int, dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    plaintext, artifact = make_artifact(size)
    decryptor = BufferedStreamDecryptor(dek, threads=2, batch_chunks=2, as_bytes=True)
    feed_all(decryptor, artifact)
    out = decryptor.finish()
    assert isinstance(out, bytes)
    assert out == plaintext
    decryptor.wipe_output()
    assert out == bytes(size), "the plaintext must be overwritten in place"


def test_as_bytes_failure_releases_nothing(
    dek: bytearray, make_artifact: Callable[..., tuple[bytes, bytes]]
) -> None:
    _plaintext, artifact = make_artifact(4 * CHUNK)
    tampered = bytearray(artifact)
    tampered[len(tampered) // 2] ^= 1
    decryptor = BufferedStreamDecryptor(dek, threads=2, batch_chunks=1, as_bytes=True)
    with pytest.raises(DecryptionFailed):
        feed_all(decryptor, bytes(tampered), piece=CHUNK)
        decryptor.finish()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("size", [1, 4095, 4096, 3 * 4096 + 17, 8 << 20])
@pytest.mark.parametrize("skip", [0, 1, 4093])
def test_discard_zeroes_every_byte(size: int, skip: int) -> None:
    obj, view = output_bytes(size + skip)
    view[:] = b"\x5a" * (size + skip)
    discard(view[skip:])  # views that start and end anywhere in a page
    assert obj[:skip] == b"\x5a" * skip
    assert obj[skip:] == bytes(size)


def test_discard_hands_the_pages_back_instead_of_writing_them() -> None:
    size = 64 << 20
    obj, view = output_bytes(size)
    view[:] = b"\x5a" * size  # every page resident
    before = _rss_bytes()
    discard(view)
    # Writing zeros would keep every page resident; dropped pages leave the process.
    assert before - _rss_bytes() > size // 2
    assert obj.count(0) == size
