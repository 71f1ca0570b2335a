"""StreamDecryptor's bulk opener against ChunkCipher: the same plaintext released, feed by feed.

The chunks holding only plaintext are opened by :class:`~strongroom.artifact.c2sp.BulkOpener`
(cryptography's native C2SP decryptor), the rest by :class:`~strongroom.artifact.c2sp.ChunkCipher`.
A reference decryptor opens every chunk with ChunkCipher (what StreamDecryptor did before): fed
the same artifact in the same pieces, whole or damaged, with the key given first or once the body
has started, both must release the same bytes from each call and fail the same way at the same
call. And however the stream ends, the opener (the derived key) goes with it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from strongroom.artifact import StreamDecryptor, encrypt_bytes, parse_header
from strongroom.artifact._memory import output_bytes, wipe
from strongroom.artifact.errors import DecryptionFailed
from strongroom.errors import StrongroomError

from .conftest import CHUNK, header_for

FORMATS = (3,)  # the chunk layout is the same in every format; the one written is enough
SEALED = CHUNK + 16
PREAMBLE = 56
DIGEST = 32


class _Reference(StreamDecryptor):
    """StreamDecryptor opening every chunk with ChunkCipher (its code before the bulk opener)."""

    def _chunks(self, first: int, count: int, ciphertext: memoryview) -> None:
        header = self._header
        assert header is not None
        out, dst = output_bytes(min((first + count) * CHUNK, header.message_size) - first * CHUNK)
        try:
            try:
                self._open_run(first, count, ciphertext, dst)
            except DecryptionFailed:
                wipe(dst)
                raise
            plain = self._split(first, dst)
            if self._hash is not None:
                self._hash.update(plain)
            self._released.append(out if plain.nbytes == dst.nbytes else bytes(plain))
            plain.release()
        finally:
            dst.release()


def _outcome(
    cls: type[StreamDecryptor], artifact: bytes, dek: bytearray, pieces: list[int], late: bool
) -> list[object]:
    """What each call returned, then ``ok`` or the failure (its type and reason), then what a
    later call raises. ``late``: the key is given once 10 body bytes have arrived."""
    decryptor = cls(None if late else dek, verify_digest=True)
    seen: list[object] = []
    pos = 0
    keyed = not late
    try:
        for size in pieces:
            seen.append(decryptor.feed(artifact[pos : pos + size]))
            pos += size
            header = decryptor.header
            if not keyed and header is not None and pos > header.header_size + 10:
                seen.append(decryptor.set_dek(dek))
                keyed = True
        if not keyed:
            seen.append(decryptor.set_dek(dek))
        decryptor.finish()
        seen.append("ok")
    except (StrongroomError, DecryptionFailed) as exc:
        seen.append((type(exc).__name__, getattr(exc, "reason", None)))
        with pytest.raises(type(exc)):  # a failed stream never ends cleanly
            decryptor.finish()
    assert decryptor._bulk is None  # the derived key, gone with the stream however it ended
    return seen


def _pieces(total: int, how: str | int) -> list[int]:
    if how == "whole":
        return [total]
    if how == "random":
        rng = random.Random(total)
        sizes = [1, PREAMBLE - 1, PREAMBLE + 1, SEALED - 1, SEALED, SEALED + 1, 3 * SEALED + 7]
        out: list[int] = []
        while sum(out) < total:
            out.append(min(rng.choice(sizes), total - sum(out)))
        return out
    assert isinstance(how, int)
    return [how] * (total // how) + ([total % how] if total % how else [])


# Around every boundary: empty, the digest alone in the final chunk, the plaintext ending a chunk
# short of its digest, exactly at a chunk's end, an empty final chunk (message = 2 chunks).
SIZES = [0, 1, CHUNK - DIGEST - 1, CHUNK - DIGEST, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - DIGEST]
SIZES += [3 * CHUNK, 3 * CHUNK + 1000]
PIECES: list[str | int] = [7, SEALED - 1, SEALED, SEALED + 1, 2 * SEALED, "random", "whole"]


def _damaged(artifact: bytes) -> Iterator[tuple[str, bytes]]:
    """The artifact with each chunk flipped, chunks swapped, repeated, dropped; cut; extended."""
    header = parse_header(artifact)
    body = header.header_size + PREAMBLE
    for i in range(header.chunk_count):
        damaged = bytearray(artifact)
        damaged[body + i * SEALED] ^= 1
        yield f"chunk {i} flipped", bytes(damaged)
    if header.chunk_count > 2:
        c0, c1 = artifact[body : body + SEALED], artifact[body + SEALED : body + 2 * SEALED]
        yield "0 and 1 swapped", artifact[:body] + c1 + c0 + artifact[body + 2 * SEALED :]
        yield "0 repeated", artifact[: body + SEALED] + artifact[body:]
        yield "0 dropped", artifact[:body] + artifact[body + SEALED :]
    yield "a byte short", artifact[:-1]
    yield "a byte more", artifact + b"\0"
    yield "a chunk more", artifact + bytes(SEALED)


@pytest.mark.parametrize("size", SIZES)
def test_released_feed_by_feed_as_chunk_cipher_releases_it(size: int) -> None:
    dek = bytearray(os.urandom(32))
    plaintext = os.urandom(size)
    artifact = encrypt_bytes(plaintext, dek, header=header_for(size))
    for how in PIECES:
        pieces = _pieces(len(artifact), how)
        for late in (False, True):
            seen = _outcome(StreamDecryptor, artifact, dek, pieces, late)
            assert seen == _outcome(_Reference, artifact, dek, pieces, late), (how, late)
            assert seen[-1] == "ok"
            assert b"".join(s for s in seen if isinstance(s, bytes)) == plaintext
        for name, damaged in _damaged(artifact):
            pieces = _pieces(len(damaged), how)
            for late in (False, True):
                seen = _outcome(StreamDecryptor, damaged, dek, pieces, late)
                assert seen == _outcome(_Reference, damaged, dek, pieces, late), (how, name, late)
                assert seen[-1] != "ok", (how, name, late)
                released = b"".join(s for s in seen if isinstance(s, bytes))
                assert released == plaintext[: len(released)]


def test_a_bad_chunk_in_a_bulk_run_releases_nothing_of_the_run() -> None:
    """Several whole chunks in one piece go to the bulk opener together: one that fails to
    authenticate releases none of them (the chunks before it in the run included)."""
    size = 6 * CHUNK + 10
    dek = bytearray(os.urandom(32))
    plaintext = os.urandom(size)
    artifact = bytearray(encrypt_bytes(plaintext, dek, header=header_for(size)))
    body = parse_header(artifact).header_size + PREAMBLE
    artifact[body + 3 * SEALED + 5] ^= 1  # chunk 3, inside the run of chunks 1..4
    decryptor = StreamDecryptor(dek)
    assert decryptor.feed(artifact[: body + SEALED]) == plaintext[:CHUNK]
    with pytest.raises(DecryptionFailed):
        decryptor.feed(artifact[body + SEALED : body + 5 * SEALED])
    assert decryptor._bulk is None and decryptor._cipher is None
    with pytest.raises(DecryptionFailed):
        decryptor.feed(artifact[body + 5 * SEALED :])


def test_the_opener_goes_when_the_stream_finishes_or_is_aborted() -> None:
    size = 3 * CHUNK + 5
    dek = bytearray(os.urandom(32))
    plaintext = os.urandom(size)
    artifact = encrypt_bytes(plaintext, dek, header=header_for(size))
    finished = StreamDecryptor(dek)
    assert finished.feed(artifact) == plaintext
    finished.finish()
    assert finished._bulk is None
    aborted = StreamDecryptor(dek)
    aborted.feed(artifact[: len(artifact) // 2])
    assert aborted._bulk is not None
    aborted.abort()
    assert aborted._bulk is None
