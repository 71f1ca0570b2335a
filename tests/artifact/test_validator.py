"""Keyless structure validation of uploads fed in pieces of any size (what the model store runs)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongroom.artifact import (
    MAGIC,
    ArtifactTooLarge,
    InvalidArtifact,
    StructureValidator,
    encrypt_bytes,
    parse_header,
    summarize,
)

from .conftest import CHUNK, header_for


def _feed_all(artifact: bytes, sizes: list[int]) -> StructureValidator:
    validator = StructureValidator()
    pos = 0
    for n in sizes:
        validator.feed(artifact[pos : pos + n])
        pos += n
    validator.feed(artifact[pos:])
    return validator


@pytest.fixture(scope="module")
def artifacts(artifact_format: int) -> list[tuple[bytes, bytes]]:
    dek = bytearray(os.urandom(32))
    out = []
    for size in (0, 1, CHUNK - 32, CHUNK, 3 * CHUNK + 17):
        plaintext = os.urandom(size)
        out.append((plaintext, encrypt_bytes(plaintext, dek, header=header_for(size))))
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(min_value=0, max_value=4), sizes=st.lists(st.integers(0, 20000), max_size=30)
)
def test_valid_artifacts_in_random_pieces(
    artifacts: list[tuple[bytes, bytes]], which: int, sizes: list[int]
) -> None:
    plaintext, artifact = artifacts[which]
    validator = _feed_all(artifact, sizes)
    summary = validator.finish()
    assert summary == summarize(artifact)
    assert summary.artifact_size == len(artifact) == validator.bytes_seen
    assert summary.plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert validator.header == parse_header(artifact)


def test_one_byte_at_a_time(artifacts: list[tuple[bytes, bytes]]) -> None:
    _, artifact = artifacts[2]
    validator = StructureValidator()
    for i in range(len(artifact)):
        validator.feed(artifact[i : i + 1])
    assert validator.finish().artifact_size == len(artifact)


def _first_failure(data: bytes, piece: int) -> tuple[str, int]:
    """Feeds ``data`` in pieces; returns the reason and how many bytes had been fed when it failed."""
    validator = StructureValidator()
    fed = 0
    try:
        for i in range(0, len(data), piece):
            validator.feed(data[i : i + piece])
            fed = i + piece
        validator.finish()
    except InvalidArtifact as exc:
        # The validator stays failed.
        with pytest.raises(InvalidArtifact):
            validator.feed(b"")
        with pytest.raises(InvalidArtifact):
            validator.finish()
        return exc.reason, fed
    raise AssertionError("accepted")


def test_bad_magic_fails_on_the_first_byte(artifacts: list[tuple[bytes, bytes]]) -> None:
    _, artifact = artifacts[1]
    assert _first_failure(b"X" + artifact[1:], 1) == ("BAD_MAGIC", 0)
    assert _first_failure(artifact[:7] + b"\x01" + artifact[8:], 1) == ("BAD_MAGIC", 7)


def test_unknown_version(artifacts: list[tuple[bytes, bytes]]) -> None:
    _, artifact = artifacts[1]
    for version in (0, 4, 256, 1 << 24):
        data = MAGIC + struct.pack(">I", version) + artifact[12:]
        reason, _ = _first_failure(data, 3)
        assert reason == "UNSUPPORTED_FORMAT_VERSION"


def test_oversize_and_empty_header(artifacts: list[tuple[bytes, bytes]]) -> None:
    _, artifact = artifacts[1]
    for length, reason in (
        (65537, "HEADER_TOO_LARGE"),
        (0xFFFFFFFF, "HEADER_TOO_LARGE"),
        (0, "HEADER_EMPTY"),
    ):
        data = MAGIC + struct.pack(">II", 1, length) + artifact[16:]
        assert _first_failure(data, 5) == (reason, 15)


def test_non_canonical_header(artifacts: list[tuple[bytes, bytes]]) -> None:
    _, artifact = artifacts[1]
    header = parse_header(artifact)
    raw = header.encoded[16:] + b"\x62\x00"  # an explicit empty signature_bundle
    data = (
        MAGIC
        + struct.pack(">II", header.format_version, len(raw))
        + raw
        + header.slot_encoded
        + artifact[header.header_size :]
    )
    assert _first_failure(data, 64)[0] == "NON_CANONICAL_HEADER"


@pytest.mark.parametrize("which", [0, 2, 4])
def test_inconsistent_body_length(artifacts: list[tuple[bytes, bytes]], which: int) -> None:
    _, artifact = artifacts[which]
    for cut in (
        1,
        15,
        16,
        17,
        32,
        33,
        CHUNK + 16,
        len(artifact) - parse_header(artifact).header_size,
    ):
        if cut < len(artifact):
            assert _first_failure(artifact[:-cut], 1000)[0] == "TRUNCATED"
    for extra in (b"\x00", b"\x00" * 16, os.urandom(CHUNK + 16)):
        reason, fed = _first_failure(artifact + extra, 1000)
        assert reason == "TRAILING_DATA"
        assert fed <= len(artifact) + 1000  # fails on the piece that overflows, not at the end


def test_too_long_fails_as_soon_as_the_limit_is_crossed(
    artifacts: list[tuple[bytes, bytes]],
) -> None:
    _, artifact = artifacts[4]
    validator = StructureValidator()
    validator.feed(artifact)
    with pytest.raises(InvalidArtifact) as info:
        validator.feed(b"\x00")
    assert info.value.reason == "TRAILING_DATA"


def test_max_artifact_size(artifacts: list[tuple[bytes, bytes]]) -> None:
    _, artifact = artifacts[4]
    header = parse_header(artifact)
    StructureValidator(max_artifact_size=len(artifact)).feed(artifact)
    validator = StructureValidator(max_artifact_size=len(artifact) - 1)
    with pytest.raises(ArtifactTooLarge) as info:
        validator.feed(artifact[: header.header_size])  # rejected before any body byte
    assert info.value.reason == "ARTIFACT_TOO_LARGE"


def test_empty_stream_is_truncated() -> None:
    with pytest.raises(InvalidArtifact) as info:
        StructureValidator().finish()
    assert info.value.reason == "TRUNCATED"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_garbage_never_crashes(data: bytes) -> None:
    validator = StructureValidator()
    try:
        validator.feed(data)
        validator.finish()
    except InvalidArtifact:
        return
    raise AssertionError("garbage accepted")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_headers_never_crash(artifacts: list[tuple[bytes, bytes]], data: Any) -> None:
    _, artifact = artifacts[1]
    header_size = parse_header(artifact).header_size
    mutated = bytearray(artifact)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, header_size - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    validator = StructureValidator()
    try:
        validator.feed(mutated)
        validator.finish()
    except InvalidArtifact:
        pass  # rejected with a reason, never another exception


def test_random_splits_of_a_bad_stream_fail_the_same_way(
    artifacts: list[tuple[bytes, bytes]],
) -> None:
    _, artifact = artifacts[3]
    rng = random.Random(3)
    for _ in range(50):
        bad = artifact[:-1]
        validator = StructureValidator()
        pos = 0
        while pos < len(bad):
            n = rng.randint(1, 5000)
            validator.feed(bad[pos : pos + n])
            pos += n
        with pytest.raises(InvalidArtifact) as info:
            validator.finish()
        assert info.value.reason == "TRUNCATED"
