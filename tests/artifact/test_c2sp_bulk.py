"""The bulk opener (cryptography's C2SP decryptor over runs of whole chunks) against ChunkCipher.

Every Wycheproof Cobblestone-256 vector's non-final chunks go through both: the same plaintext
where ChunkCipher opens them, a failure (and a zeroed output) where it does not; and the
opener's own rules: order, whole chunks, its output's size, a failure that ends it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from strongroom.artifact import c2sp
from strongroom.artifact.errors import DecryptionFailed
from strongroom.errors import InvalidArgument
from tests.artifact.test_c2sp_vectors import CASES, _unpack

CS, SEALED, PRE = c2sp.CHUNK_SIZE, c2sp.SEALED_CHUNK_SIZE, c2sp.PREAMBLE_SIZE
AES_256 = [c for c in CASES if c.values[0] is c2sp.AES_256_GCM]


def _full_chunks(ct: bytes) -> int:
    """The chunks before the final one that a ciphertext of this length holds."""
    return max(0, (len(ct) - PRE - 1) // SEALED)


def _reference(key: bytes, ctx: bytes, ct: bytes, count: int) -> bytearray | None:
    """ChunkCipher's plaintext of the first ``count`` chunks, or None where it refuses them."""
    out = bytearray(count * CS)
    try:
        cipher = c2sp.open_message(key, ct[:PRE], ctx)
        cipher.open_full_chunks_into(
            0, count, memoryview(ct)[PRE : PRE + count * SEALED], memoryview(out)
        )
    except DecryptionFailed:
        return None
    return out


@pytest.mark.parametrize(("suite", "test"), AES_256)
def test_every_vector_opens_as_chunk_cipher_opens_it(
    suite: c2sp.Suite, test: dict[str, Any]
) -> None:
    del suite
    key, ctx, ct = _unpack(test)
    if "InvalidKeySize" in test["flags"]:
        with pytest.raises(InvalidArgument):
            c2sp.BulkOpener(key, ct[:PRE], ctx)
        return
    count = _full_chunks(ct)
    expected = _reference(key, ctx, ct, count)
    out = bytearray(b"\xa5" * count * CS)
    try:
        opener = c2sp.BulkOpener(key, ct[:PRE], ctx)
        # Runs of uneven lengths, as download messages cut them.
        first = 0
        for longest in (1, 2, 5, 31, 64, count):
            run = min(longest, count - first)
            opener.open_into(
                first,
                memoryview(ct)[PRE + first * SEALED : PRE + (first + run) * SEALED],
                memoryview(out)[first * CS : (first + run) * CS],
            )
            first += run
    except DecryptionFailed:
        assert expected is None
        return
    assert expected is not None and out == expected


def _message(chunks: int) -> tuple[bytes, bytes, bytes, bytes]:
    key, ctx = os.urandom(32), b"bulk test"
    message = os.urandom(chunks * CS + 100)
    return key, ctx, message, c2sp.encrypt(key, message, ctx)


def test_a_tampered_chunk_zeroes_the_run_and_ends_the_opener() -> None:
    key, ctx, message, ct = _message(6)
    damaged = bytearray(ct)
    damaged[PRE + 4 * SEALED + 7] ^= 1  # chunk 4
    opener = c2sp.BulkOpener(key, damaged[:PRE], ctx)
    out = bytearray(6 * CS)
    opener.open_into(0, memoryview(damaged)[PRE : PRE + 2 * SEALED], memoryview(out)[: 2 * CS])
    assert out[: 2 * CS] == message[: 2 * CS]
    with pytest.raises(DecryptionFailed):
        opener.open_into(
            2, memoryview(damaged)[PRE + 2 * SEALED : PRE + 6 * SEALED], memoryview(out)[2 * CS :]
        )
    assert not any(out[2 * CS :])  # the run's authenticated chunks 2 and 3 are wiped too
    with pytest.raises(ValueError, match="in order"):
        opener.open_into(
            6, memoryview(ct)[PRE + 6 * SEALED : PRE + 6 * SEALED], memoryview(out)[:0]
        )
    # Nor the failed run again, sent undamaged: the opener is done, whatever its decryptor's state.
    with pytest.raises(ValueError, match="in order"):
        opener.open_into(
            2, memoryview(ct)[PRE + 2 * SEALED : PRE + 6 * SEALED], memoryview(out)[2 * CS :]
        )
    assert not any(out[2 * CS :])


@pytest.mark.parametrize(
    ("key", "ctx"),
    [(os.urandom(32), b"bulk test"), (None, b"other")],
    ids=["wrong-key", "wrong-context"],
)
def test_a_wrong_key_or_context_fails_at_the_commitment(key: bytes | None, ctx: bytes) -> None:
    right, _ctx, _plain, ct = _message(1)
    with pytest.raises(DecryptionFailed):
        c2sp.BulkOpener(key or right, ct[:PRE], ctx)
    with pytest.raises(DecryptionFailed):  # nor does a short preamble open anything later
        c2sp.BulkOpener(right, ct[: PRE - 1], _ctx)


def test_runs_must_be_whole_in_order_and_fill_their_output() -> None:
    key, ctx, message, ct = _message(4)
    body = memoryview(ct)[PRE:]
    opener = c2sp.BulkOpener(key, ct[:PRE], ctx)
    out = memoryview(bytearray(4 * CS))
    with pytest.raises(ValueError, match="in order"):
        opener.open_into(1, body[SEALED : 2 * SEALED], out[:CS])
    with pytest.raises(ValueError, match="whole"):
        opener.open_into(0, body[: SEALED + 1], out[:CS])
    with pytest.raises(ValueError, match="whole chunks"):
        opener.open_into(0, body[:SEALED], out[: CS + 1])
    opener.open_into(0, body[: 4 * SEALED], out)  # the refusals consumed nothing
    assert bytes(out) == message[: 4 * CS]
    assert "redacted" in repr(opener) and key.hex() not in repr(opener)
