"""Mutation sweep: every tampering of a multi-chunk artifact is rejected, and nothing leaks first.

The artifact has a small header and a 4-chunk body (3 full chunks and a short final one holding
the plaintext tail and the digest). For each mutation:

* ``ArtifactReader.decrypt_all`` raises (InvalidArtifact or DecryptionFailed) and returns nothing;
* ``StreamDecryptor`` raises by ``finish()`` at the latest and has released only a prefix of the
  plaintext made of chunks *before* the first damaged one (nothing at all for header damage);
* ``BufferedStreamDecryptor`` raises and releases nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from strongroom.artifact import (
    ArtifactReader,
    BufferedStreamDecryptor,
    DecryptionFailed,
    InvalidArtifact,
    StreamDecryptor,
    StructureValidator,
    encrypt_bytes,
    parse_header,
)
from strongroom.artifact import reader as reader_module
from strongroom.artifact import stream as stream_module

from .conftest import CHUNK, header_for, unwrap_for, wrap

SEALED = CHUNK + 16
SIZE = 3 * CHUNK + 1000  # message = 3 * CHUNK + 1032: chunks of 16384, 16384, 16384, 1032
REJECTED = (InvalidArtifact, DecryptionFailed)


@pytest.fixture(scope="module")
def case(artifact_format: int) -> dict[str, Any]:
    dek = bytearray(os.urandom(32))
    plaintext = os.urandom(SIZE)
    # A real AES-KWP wrap, so that format 2 (whose key slot the body does not bind) is judged the
    # way a broker does it: unwrap the slot under the KEK version it names, then decrypt.
    header = header_for(SIZE, wrapped_dek=wrap(dek))
    artifact = encrypt_bytes(plaintext, dek, header=header)
    body = header.header_size
    chunks = body + 56
    return {
        "dek": dek,
        "plaintext": plaintext,
        "artifact": artifact,
        "header": header,
        "body": body,
        "chunks": chunks,
        "footer": header.footer_offset,
    }


def _chunk_of(case: dict[str, Any], byte: int) -> int:
    """Index of the first chunk whose authentication a change at ``byte`` breaks (-1: before all)."""
    if byte < case["chunks"]:
        return -1  # header or preamble: nothing may be released
    if byte >= case["footer"]:
        return 4  # footer: every chunk is authentic, only finish() can fail
    return int((byte - case["chunks"]) // SEALED)


def _stream_release(artifact: bytes | bytearray, dek: bytearray, piece: int) -> tuple[bytes, bool]:
    dec = StreamDecryptor(dek)
    released = bytearray()
    try:
        for i in range(0, len(artifact), piece):
            released += dec.feed(artifact[i : i + piece])
        dec.finish()
    except REJECTED:
        return bytes(released), True
    return bytes(released), False


def _dek_for(case: dict[str, Any], artifact: bytes | bytearray) -> bytearray | None:
    """The key a reader would use: format 1 binds the wrapped key, so the true one; format 2 takes
    what the (possibly altered) key slot unwraps to, or None if the HSM refuses the slot."""
    if case["header"].format_version == 1:
        return bytearray(case["dek"])
    return unwrap_for(artifact)


def _check_rejected(
    case: dict[str, Any], mutated: bytes | bytearray, first_bad_chunk: int, *, streams: bool
) -> None:
    plaintext = case["plaintext"]
    dek = _dek_for(case, mutated)
    if dek is None:
        return  # refused before any decryption: nothing can be released
    with pytest.raises(REJECTED):
        ArtifactReader(bytes(mutated)).decrypt_all(dek, threads=1)
    if not streams:
        return
    released, failed = _stream_release(mutated, dek, 5000)
    assert failed
    assert released == plaintext[: len(released)]
    assert len(released) <= max(first_bad_chunk, 0) * CHUNK
    buffered = BufferedStreamDecryptor(dek, threads=2, batch_chunks=1)
    with pytest.raises(REJECTED):
        for i in range(0, len(mutated), 7000):
            buffered.feed(mutated[i : i + 7000])
        buffered.finish()


def _sample_bits(case: dict[str, Any], every: int) -> Iterator[int]:
    """Every bit of header, preamble, tags and footer; every ``every``-th bit of chunk bodies."""
    total = len(case["artifact"]) * 8
    chunk_starts = [case["chunks"] + i * SEALED for i in range(4)]
    chunk_lens = [CHUNK, CHUNK, CHUNK, 1032]
    dense = set(range(case["chunks"] * 8)) | set(range(case["footer"] * 8, total))
    for start, length in zip(chunk_starts, chunk_lens, strict=True):
        tag = start + length
        dense |= set(range(tag * 8, (tag + 16) * 8))
        dense |= {start * 8, start * 8 + 1, (tag - 1) * 8 + 7}
    yield from sorted(dense | set(range(0, total, every)))


def test_every_header_preamble_tag_and_footer_bit_and_sampled_body_bits(
    case: dict[str, Any],
) -> None:
    mutated = bytearray(case["artifact"])
    count = 0
    for bit in _sample_bits(case, 13):
        byte = bit // 8
        mutated[byte] ^= 1 << (bit % 8)
        # The streaming decryptors are slower to drive: check them on a sample of the flips.
        _check_rejected(case, mutated, _chunk_of(case, byte), streams=count % 16 == 0)
        mutated[byte] ^= 1 << (bit % 8)
        count += 1
    assert mutated == case["artifact"]
    assert count > 30000


SWEEP_WORKERS = max(1, min(4, len(os.sched_getaffinity(0))))
"""Processes the single-bit sweep is split between: it is ~170,000 decryptions per format, all
Python-bound (one core took over a minute per format), and each flip is independent."""


def _swept_bits(case: dict[str, Any]) -> list[int]:
    """Every bit of the artifact but in the bodies of the middle full chunks (1 and 2), where each
    byte is flipped at one bit, bit ``byte % 8``: every byte and every bit position still.

    Chunk 0 (the first full chunk) and the short final one (the tail and the digest) keep every
    bit, as do the head, preamble, every tag and the footer; chunks 1 and 2 are chunk 0's role
    under another counter, and their 262,144 bits were two thirds of the sweep's decryptions.
    """
    total = len(case["artifact"]) * 8
    sparse = set()
    for i in (1, 2):
        start = case["chunks"] + i * SEALED
        sparse |= set(range(start * 8, (start + CHUNK) * 8))
    kept = {byte * 8 + byte % 8 for byte in {bit // 8 for bit in sparse}}
    return [bit for bit in range(total) if bit not in sparse or bit in kept]


def _accepted_flips(
    artifact: bytes, dek: bytes, format_version: int, bits: Sequence[int]
) -> list[int]:
    """The bits in ``bits`` whose flip ``decrypt_all`` did not reject (run in a worker process).

    A flip is rejected when decryption raises one of ``REJECTED``; any other exception propagates
    (and fails the test), as it did under ``pytest.raises``.

    A flip in the head (prefix, header, key slot) or the footer gets a fresh reader, and for format
    2 and 3 the key the altered slot unwraps to. A flip between them (preamble, chunks, tags) leaves
    every byte the reader's construction and the key slot depend on as they were: it is decrypted
    by one reader built once over the buffer being flipped, with the true key. Its ``decrypt_all``
    still reads the preamble, checks the commitment, and authenticates the tail and every chunk from
    the live buffer; parsing the same head twice per flip (slot unwrap and reader) made the sweep
    3.7 times as slow. Should a reader ever cache more than its head and footer, flips would
    start to decrypt and fail this test rather than pass unseen. A reader that stays refused
    once it refused (a failure latched) would instead refuse every later flip whatever its
    bytes and hide a hole in chunk authentication: the shared reader must decrypt the restored
    artifact once the share is swept.
    """
    mutated = bytearray(artifact)
    header = parse_header(artifact)
    body, footer = header.header_size, header.footer_offset
    shared = ArtifactReader(mutated)
    accepted = []
    for bit in bits:
        byte = bit // 8
        mutated[byte] ^= 1 << (bit % 8)
        key: bytearray | None
        reader: ArtifactReader | None
        if body <= byte < footer:
            reader, key = shared, bytearray(dek)
        else:
            # What _dek_for gives a reader, without the case fixture: format 1 binds the wrapped key.
            key = bytearray(dek) if format_version == 1 else unwrap_for(mutated)
            reader = None
        if key is not None:
            try:
                (reader or ArtifactReader(mutated)).decrypt_all(key, threads=1)
            except REJECTED:
                pass
            else:
                accepted.append(bit)
        mutated[byte] ^= 1 << (bit % 8)
    # Its rejections were its judgement of each flip's bytes, not a refusal carried over.
    try:
        shared.decrypt_all(bytearray(dek), threads=1)
    except REJECTED as exc:  # raised as an AssertionError: the worker's exception is pickled
        raise AssertionError(f"the shared reader refused the intact artifact: {exc!r}") from None
    return accepted


@pytest.mark.slow
def test_every_single_bit_flip(case: dict[str, Any]) -> None:
    """Every bit flipped (one a byte in the middle chunks' bodies, see :func:`_swept_bits`): no
    flip decrypts."""
    artifact = bytes(case["artifact"])
    bits = _swept_bits(case)
    assert len(bits) == len(artifact) * 8 - 2 * CHUNK * 7
    # Interleaved shares: header flips cost more than body flips, so each worker gets some of both.
    shares = [bits[first::SWEEP_WORKERS] for first in range(SWEEP_WORKERS)]
    assert sum(len(share) for share in shares) == len(bits)
    # spawn, not fork: this process may hold gRPC and OpenSSL threads from other tests.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=SWEEP_WORKERS, mp_context=context) as pool:
        results = pool.map(
            _accepted_flips,
            [artifact] * SWEEP_WORKERS,
            [bytes(case["dek"])] * SWEEP_WORKERS,
            [case["header"].format_version] * SWEEP_WORKERS,
            shares,
        )
        accepted = sorted(bit for share in results for bit in share)
    assert accepted == [], (
        f"{len(accepted)} single-bit flips decrypted, the first at {accepted[:5]}"
    )


def test_header_bit_flips_release_nothing_from_the_stream(case: dict[str, Any]) -> None:
    mutated = bytearray(case["artifact"])
    for byte in range(case["chunks"]):
        for bit in range(8):
            mutated[byte] ^= 1 << bit
            dek = _dek_for(case, mutated)
            if dek is not None:
                released, failed = _stream_release(mutated, dek, 1 << 20)
                assert failed and released == b""
            mutated[byte] ^= 1 << bit


def test_truncation_at_many_offsets(case: dict[str, Any]) -> None:
    artifact, dek, plaintext = case["artifact"], case["dek"], case["plaintext"]
    cuts = set(range(case["chunks"] + 64)) | set(range(0, len(artifact), 61))
    for k in range(5):
        edge = case["chunks"] + k * SEALED
        cuts |= set(range(edge - 17, edge + 18))
    cuts |= set(range(len(artifact) - 80, len(artifact)))
    for cut in sorted(c for c in cuts if 0 <= c < len(artifact)):
        truncated = artifact[:cut]
        with pytest.raises(InvalidArtifact):
            ArtifactReader(truncated)
        validator = StructureValidator()
        with pytest.raises(InvalidArtifact):
            validator.feed(truncated)
            validator.finish()
        if cut % 7 == 0 or cut >= case["chunks"] - 2:
            released, failed = _stream_release(truncated, dek, 3000)
            assert failed
            assert released == plaintext[: len(released)]
            ends = [case["chunks"] + (k + 1) * SEALED for k in range(3)] + [case["footer"]]
            complete_chunks = sum(cut >= end for end in ends)
            assert len(released) <= min(SIZE, complete_chunks * CHUNK)


def _split(case: dict[str, Any], artifact: bytes) -> tuple[bytes, bytes, list[bytes], bytes]:
    head = artifact[: case["chunks"]]
    chunks = [
        artifact[case["chunks"] + i * SEALED : case["chunks"] + (i + 1) * SEALED] for i in range(4)
    ]
    chunks[3] = artifact[case["chunks"] + 3 * SEALED : case["footer"]]
    return head[: case["body"]], head[case["body"] :], chunks, artifact[case["footer"] :]


def _with_size(case: dict[str, Any], size: int) -> bytes:
    """The same header with another plaintext_size (what an attacker would write to hide a cut)."""
    return header_for(size, wrapped_dek=case["header"].wrapped_dek).head


@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_chunk_deletion(case: dict[str, Any], i: int) -> None:
    header, preamble, chunks, footer = _split(case, case["artifact"])
    rest = chunks[:i] + chunks[i + 1 :]
    # As is: the length no longer matches the header.
    _check_rejected(case, header + preamble + b"".join(rest) + footer, i, streams=True)
    if i == 3:
        return  # no size makes a body without a short final chunk well formed
    # With the header's size "fixed" to match: the context changed, so the commitment fails.
    removed = len(chunks[i]) - 16
    forged = _with_size(case, SIZE - removed) + preamble + b"".join(rest) + footer
    assert len(forged) == parse_header(forged).artifact_size
    _check_rejected(case, forged, -1, streams=True)


@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_chunk_duplication(case: dict[str, Any], i: int) -> None:
    header, preamble, chunks, footer = _split(case, case["artifact"])
    doubled = [*chunks[: i + 1], chunks[i], *chunks[i + 1 :]]
    _check_rejected(case, header + preamble + b"".join(doubled) + footer, i + 1, streams=True)
    if i == 3:
        return  # two short chunks: no size makes that well formed
    added = len(chunks[i]) - 16
    forged = _with_size(case, SIZE + added) + preamble + b"".join(doubled) + footer
    assert len(forged) == parse_header(forged).artifact_size
    _check_rejected(case, forged, -1, streams=True)


@pytest.mark.parametrize(("i", "j"), [(0, 1), (0, 2), (1, 2)])
def test_chunk_reordering(case: dict[str, Any], i: int, j: int) -> None:
    header, preamble, chunks, footer = _split(case, case["artifact"])
    swapped = list(chunks)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    mutated = header + preamble + b"".join(swapped) + footer
    assert len(mutated) == len(case["artifact"])
    _check_rejected(case, mutated, i, streams=True)


def test_final_chunk_dropped_and_previous_chunk_presented_as_final(case: dict[str, Any]) -> None:
    _header, preamble, chunks, footer = _split(case, case["artifact"])
    # Drop the short final chunk and claim a size ending at the chunk boundary.
    forged = _with_size(case, 3 * CHUNK - 32) + preamble + b"".join(chunks[:3]) + footer
    _check_rejected(case, forged, -1, streams=True)


def test_extension_is_rejected(case: dict[str, Any]) -> None:
    _header, _preamble, chunks, footer = _split(case, case["artifact"])
    for extra in (b"\x00", footer, chunks[0], chunks[3]):
        mutated = case["artifact"] + extra
        _check_rejected(case, mutated, 4, streams=True)
        with pytest.raises(InvalidArtifact) as info:
            StructureValidator().feed(mutated)
        assert info.value.reason == "TRAILING_DATA"


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_name": "acme/other-model"},
        {"model_version": "1.4.1"},
        {"key_version": 4},
        {"key_id": "other-kek"},
        {"wrapped_dek": bytes(40)},
        {"content_type": "application/octet-stream"},
        {"signature_bundle": b"{}", "signature_bundle_media_type": "application/json"},
    ],
)
def test_body_moved_under_another_header(case: dict[str, Any], overrides: dict[str, Any]) -> None:
    fields = {"wrapped_dek": case["header"].wrapped_dek, **overrides}
    other = header_for(SIZE, **fields).head
    moved = other + case["artifact"][case["body"] :]
    assert len(moved) == parse_header(moved).artifact_size  # structurally perfect
    _check_rejected(case, moved, -1, streams=True)
    dek = _dek_for(case, moved)
    if dek is not None:
        released, failed = _stream_release(moved, dek, 1 << 20)
        assert failed and released == b""


def test_splicing_two_encryptions_of_the_same_header(case: dict[str, Any]) -> None:
    # Same key, same header bytes, different plaintext: a fresh salt, hence a different body key.
    other_plain = os.urandom(SIZE)
    other = encrypt_bytes(other_plain, case["dek"], header=case["header"])
    h, p1, c1, f1 = _split(case, case["artifact"])
    _, _p2, c2, f2 = _split(case, other)
    _check_rejected(case, h + p1 + b"".join(c2) + f1, 0, streams=True)  # their chunks, our salt
    _check_rejected(case, h + p1 + b"".join(c1[:3] + c2[3:]) + f1, 3, streams=True)
    _check_rejected(case, h + p1 + b"".join(c1) + f2, 4, streams=True)  # their footer


def test_failed_decrypt_all_wipes_its_buffer(case: dict[str, Any], monkeypatch: Any) -> None:
    wiped: list[int] = []
    real_wipe = reader_module.wipe  # type: ignore[attr-defined]

    def spy(buf: Any) -> None:
        real_wipe(buf)
        if len(buf) == SIZE:
            assert not any(buf)
            wiped.append(len(buf))

    monkeypatch.setattr(reader_module, "wipe", spy)
    mutated = bytearray(case["artifact"])
    mutated[case["chunks"] + 2 * SEALED + 5] ^= 1  # chunk 2: chunks 0 and 1 decrypt first
    for threads in (1, 2):
        with pytest.raises(DecryptionFailed):
            ArtifactReader(bytes(mutated)).decrypt_all(case["dek"], threads=threads)
    assert wiped == [SIZE, SIZE]


def test_failed_buffered_stream_wipes_its_buffer(case: dict[str, Any], monkeypatch: Any) -> None:
    wiped: list[int] = []
    real_wipe = stream_module.wipe  # type: ignore[attr-defined]

    def spy(buf: Any) -> None:
        real_wipe(buf)
        if len(buf) == SIZE:
            assert not any(buf)
            wiped.append(len(buf))

    monkeypatch.setattr(stream_module, "wipe", spy)
    mutated = bytearray(case["artifact"])
    mutated[case["chunks"] + 2 * SEALED + 5] ^= 1
    dec = BufferedStreamDecryptor(case["dek"], threads=2, batch_chunks=1)
    with pytest.raises(DecryptionFailed):
        dec.feed(bytes(mutated))
        dec.finish()
    assert wiped == [SIZE]
    with pytest.raises(DecryptionFailed):
        dec.finish()  # and it stays failed


def test_random_multi_byte_corruption(case: dict[str, Any]) -> None:
    rng = random.Random(7)
    for _ in range(300):
        mutated = bytearray(case["artifact"])
        first = len(mutated)
        for _ in range(rng.randint(2, 6)):
            pos = rng.randrange(len(mutated))
            mutated[pos] ^= rng.randint(1, 255)
            first = min(first, pos)
        _check_rejected(case, mutated, _chunk_of(case, first), streams=True)
