"""Every Wycheproof C2SP chunked-encryption vector (Cobblestone-256 and -128), through every interface.

Applied as doc/c2sp_chunked_encryption.md in C2SP/wycheproof describes: one-shot decryption,
streaming decryption (a PartialPlaintext vector may release at most its valid prefix, and must keep
failing), length authentication via the final chunk (ValidFinalChunk vectors may pass it), raw mode,
and encryption (raw re-encryption and salt-injected re-encryption must reproduce the ciphertext).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

import pytest

from strongroom.artifact import c2sp
from strongroom.artifact.errors import DecryptionFailed
from strongroom.errors import InvalidArgument
from tests.conftest import DATA

VECTORS = DATA / "wycheproof"
FILES = {
    "c2sp_chunked_encryption_aes_256_gcm_test.json": c2sp.AES_256_GCM,
    "c2sp_chunked_encryption_aes_128_gcm_test.json": c2sp.AES_128_GCM,
}

FORMATS = (1,)
"""Independent of the container format: run once."""


def _load() -> list[Any]:
    cases = []
    for name, suite in FILES.items():
        path = VECTORS / name
        data = json.loads(path.read_text())
        for group in data["testGroups"]:
            assert group["aead"] == suite.aead_name and group["sha"] == "SHA-512"
            for test in group["tests"]:
                cases.append(pytest.param(suite, test, id=f"{suite.aead_name}-{test['tcId']}"))
    return cases


CASES = _load()
VALID = [c for c in CASES if c.values[1]["result"] == "valid"]
# Raw mode applies to every vector whose failure is not in the header (salt, commitment, key size).
RAW = [c for c in CASES if "HeaderFailure" not in c.values[1]["flags"] and "aeadKey" in c.values[1]]


def _unpack(test: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    return (
        bytes.fromhex(test["key"]),
        bytes.fromhex(test["ctx"]),
        zlib.decompress(bytes.fromhex(test["ct"])),
    )


def _matches(test: dict[str, Any], message: bytes | bytearray) -> bool:
    return bool(
        len(message) == test["msgLength"]
        and hashlib.sha512(message).hexdigest() == test["msgSha512"]
    )


def test_vector_files_are_complete() -> None:
    for name in FILES:
        data = json.loads((VECTORS / name).read_text())
        count = sum(len(g["tests"]) for g in data["testGroups"])
        assert count == data["numberOfTests"] == 35
    assert len(CASES) == 70 and len(VALID) == 20 and len(RAW) == 50


@pytest.mark.parametrize(("suite", "test"), CASES)
def test_one_shot_decrypt(suite: c2sp.Suite, test: dict[str, Any]) -> None:
    key, ctx, ct = _unpack(test)
    if test["result"] == "valid":
        assert _matches(test, c2sp.decrypt(key, ct, ctx, suite=suite))
        return
    expected: type[Exception] = (
        InvalidArgument if "InvalidKeySize" in test["flags"] else DecryptionFailed
    )
    with pytest.raises(expected) as info:
        c2sp.decrypt(key, ct, ctx, suite=suite)
    if isinstance(info.value, InvalidArgument):
        assert info.value.reason == "INVALID_KEY_SIZE"


@pytest.mark.parametrize("piece", [1, 1000, 16400, 1 << 20])
@pytest.mark.parametrize(("suite", "test"), CASES)
def test_streaming_decrypt(suite: c2sp.Suite, test: dict[str, Any], piece: int) -> None:
    key, ctx, ct = _unpack(test)
    if piece < 1000 and len(ct) > 200_000:
        piece = 4099  # byte-by-byte over the multi-MiB rollover vectors would take minutes
    if "InvalidKeySize" in test["flags"]:
        with pytest.raises(InvalidArgument):
            c2sp.Decryptor(key, ctx, suite=suite)
        return
    dec = c2sp.Decryptor(key, ctx, suite=suite)
    released = bytearray()
    failed = False
    try:
        for i in range(0, len(ct), piece):
            released += dec.update(ct[i : i + piece])
        released += dec.finalize()
    except DecryptionFailed:
        failed = True
    if test["result"] == "valid":
        assert not failed and _matches(test, released)
        return
    assert failed
    # Never anything beyond the longest valid prefix (msgLength for PartialPlaintext, else 0).
    limit = test["msgLength"] if "PartialPlaintext" in test["flags"] else 0
    assert len(released) <= limit
    if "PartialPlaintext" in test["flags"] and len(released) == limit:
        assert hashlib.sha512(released).hexdigest() == test["msgSha512"]
    # ... and the failure is sticky.
    with pytest.raises(DecryptionFailed):
        dec.update(b"\x00")
    with pytest.raises(DecryptionFailed):
        dec.finalize()


def _authenticate_length(key: bytes, ctx: bytes, ct: bytes, suite: c2sp.Suite) -> int:
    """Random-access style: check the commitment, then decrypt only the final chunk."""
    size = c2sp.message_size(len(ct))
    cipher = c2sp.open_message(key, ct[: c2sp.PREAMBLE_SIZE], ctx, suite=suite)
    last = c2sp.chunk_count(size) - 1
    start = c2sp.PREAMBLE_SIZE + last * c2sp.SEALED_CHUNK_SIZE
    cipher.open(last, True, ct[start:])
    return size


@pytest.mark.parametrize(("suite", "test"), CASES)
def test_length_authentication_via_final_chunk(suite: c2sp.Suite, test: dict[str, Any]) -> None:
    key, ctx, ct = _unpack(test)
    if "InvalidKeySize" in test["flags"]:
        with pytest.raises(InvalidArgument):
            _authenticate_length(key, ctx, ct, suite)
        return
    if test["result"] == "valid":
        assert _authenticate_length(key, ctx, ct, suite) == test["msgLength"]
    elif "ValidFinalChunk" in test["flags"]:
        _authenticate_length(key, ctx, ct, suite)  # may legitimately succeed; must not crash
    else:
        with pytest.raises(DecryptionFailed):
            _authenticate_length(key, ctx, ct, suite)


@pytest.mark.parametrize(("suite", "test"), RAW)
def test_raw_mode(suite: c2sp.Suite, test: dict[str, Any]) -> None:
    _, _, ct = _unpack(test)
    cipher = c2sp.ChunkCipher(bytes.fromhex(test["aeadKey"]), bytes.fromhex(test["baseNonce"]))
    chunks = ct[c2sp.PREAMBLE_SIZE :]
    if test["result"] == "valid":
        message = cipher.open_chunks(chunks)
        assert _matches(test, message)
        # Raw encryption is deterministic: it must reproduce the chunks exactly.
        assert cipher.seal_chunks(message) == chunks
    else:
        with pytest.raises(DecryptionFailed):
            cipher.open_chunks(chunks)


CHUNK = 16384
"""The C2SP chunk size, spelled out so that the byte feeds below do not take it from the code."""


def _byte_feeds_at_chunk_edges(size: int, edge: int = 64) -> list[tuple[int, int]]:
    """Pieces ``(start, stop)`` of a ``size``-byte message: one byte at a time within ``edge`` bytes
    of its start, its end and every chunk boundary (every step of the encryptor's buffering: the
    buffer filling to a chunk, a chunk sealed, the first byte of the next, the final chunk held
    back), each stretch between them in one piece.

    Byte-at-a-time feeds of the 4 MB vectors, 4 million calls, took 3 s per vector on CI (13 s
    in all) to go through those same steps between boundaries over and over.
    """
    marks = [0, *range(CHUNK, size, CHUNK), size]
    pieces: list[tuple[int, int]] = []
    pos = 0
    for mark in marks:
        low, high = max(0, mark - edge), min(size, mark + edge)
        if pos < low:
            pieces.append((pos, low))
            pos = low
        pieces += [(i, i + 1) for i in range(pos, high)]
        pos = max(pos, high)
    assert pos == size and [a for a, _ in pieces[1:]] == [b for _, b in pieces[:-1]]
    return pieces


def test_byte_feeds_cover_the_message_byte_by_byte_at_its_edges() -> None:
    assert _byte_feeds_at_chunk_edges(100) == [(i, i + 1) for i in range(100)]
    pieces = _byte_feeds_at_chunk_edges(2 * CHUNK + 10, edge=2)
    assert pieces == [
        (0, 1),
        (1, 2),
        (2, CHUNK - 2),
        *[(i, i + 1) for i in range(CHUNK - 2, CHUNK + 2)],
        (CHUNK + 2, 2 * CHUNK - 2),
        *[(i, i + 1) for i in range(2 * CHUNK - 2, 2 * CHUNK + 2)],
        (2 * CHUNK + 2, 2 * CHUNK + 8),
        (2 * CHUNK + 8, 2 * CHUNK + 9),
        (2 * CHUNK + 9, 2 * CHUNK + 10),
    ]


@pytest.mark.parametrize(("suite", "test"), VALID)
def test_key_derivation_and_salt_injected_encryption(
    suite: c2sp.Suite, test: dict[str, Any]
) -> None:
    key, ctx, ct = _unpack(test)
    message = c2sp.decrypt(key, ct, ctx, suite=suite)
    salt = ct[: c2sp.SALT_SIZE]
    assert c2sp.encrypt(key, message, ctx, suite=suite, salt=salt) == ct
    # The streaming encryptor produces the same bytes whatever the piece size.
    for piece in (16383, 16384, 100000):
        enc = c2sp.Encryptor(key, ctx, suite=suite, salt=salt)
        out = b"".join(enc.update(message[i : i + piece]) for i in range(0, len(message), piece))
        assert out + enc.finalize() == ct
    enc = c2sp.Encryptor(key, ctx, suite=suite, salt=salt)
    out = b"".join(enc.update(message[a:b]) for a, b in _byte_feeds_at_chunk_edges(len(message)))
    assert out + enc.finalize() == ct
    # The derived key and base nonce are the ones the vector lists.
    cipher, commitment = c2sp.ChunkCipher.derive(key, salt, ctx, suite=suite)
    assert commitment == ct[c2sp.SALT_SIZE : c2sp.PREAMBLE_SIZE]
    assert cipher.nonce(0) == bytes.fromhex(test["baseNonce"])
    raw = c2sp.ChunkCipher(bytes.fromhex(test["aeadKey"]), bytes.fromhex(test["baseNonce"]))
    assert raw.seal(0, True, b"probe") == cipher.seal(0, True, b"probe")
