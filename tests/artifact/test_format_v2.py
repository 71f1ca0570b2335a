"""Formats 2 and 3: the key slot outside the body's context — layout, limits, and why a swapped slot
fails."""

from __future__ import annotations

import io
import os
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from strongroom.api.artifact.v1 import header_pb2
from strongroom.artifact import (
    ArtifactReader,
    BufferedStreamDecryptor,
    DecryptionFailed,
    InvalidArtifact,
    KeySlot,
    StreamDecryptor,
    StructureValidator,
    WrapMechanism,
    encrypt_bytes,
    parse_header,
    read_header,
    summarize,
    with_key_slot,
)
from strongroom.artifact.format import MAX_KEY_SLOT_SIZE, PREFIX_SIZE
from strongroom.identifiers import MAX_KEY_VERSION

from .conftest import CHUNK, header_for, kek, unwrap_for, wrap

FORMATS = (2, 3)

SIZE = 2 * CHUNK + 77


@pytest.fixture(scope="module")
def case(artifact_format: int) -> dict[str, Any]:
    dek = bytearray(os.urandom(32))
    plaintext = os.urandom(SIZE)
    header = header_for(SIZE, wrapped_dek=wrap(dek, 3), key_version=3)
    return {
        "dek": dek,
        "plaintext": plaintext,
        "header": header,
        "artifact": encrypt_bytes(plaintext, dek, header=header),
    }


def _reason(data: bytes) -> str:
    with pytest.raises(InvalidArtifact) as info:
        parse_header(data)
    return info.value.reason


def _slot(**fields: Any) -> bytes:
    values: dict[str, Any] = {
        "key_id": "models-kek",
        "key_version": 3,
        "wrap_mechanism": 1,
        "wrapped_data_key": bytes(40),
    }
    values.update(fields)
    raw = header_pb2.ArtifactKeySlot(**values).SerializeToString(deterministic=True)
    return struct.pack(">I", len(raw)) + raw


def _with_raw_slot(case: dict[str, Any], slot: bytes) -> bytes:
    header = case["header"]
    return header.encoded + slot + case["artifact"][header.header_size :]


def _rewrapped(case: dict[str, Any], slot: KeySlot) -> bytes:
    header = case["header"]
    return with_key_slot(header, slot).head + case["artifact"][header.header_size :]


def test_layout(case: dict[str, Any], artifact_format: int) -> None:
    header = case["header"]
    art = case["artifact"]
    assert struct.unpack(">I", art[8:12]) == (artifact_format,)
    msg = header_pb2.ArtifactHeader()
    msg.ParseFromString(header.encoded[PREFIX_SIZE:])
    # The bound header names the key but carries no version, wrapped key or mechanism.
    assert msg.key_id == "models-kek"
    assert (msg.key_version, msg.wrapped_data_key, msg.wrap_mechanism) == (0, b"", 0)
    (slot_len,) = struct.unpack(">I", header.slot_encoded[:4])
    assert len(header.slot_encoded) == 4 + slot_len
    assert header.header_size == len(header.encoded) + 4 + slot_len
    assert header.context == header.encoded  # the slot is not in the context
    assert header.key_slot == KeySlot("models-kek", 3, wrap(case["dek"], 3), WrapMechanism(1))
    assert read_header(io.BytesIO(art)) == header
    summary = summarize(art)
    assert (summary.format_version, summary.key_version, summary.header_size) == (
        artifact_format,
        3,
        header.header_size,
    )


def test_rewrapped_slot_still_decrypts_everywhere(case: dict[str, Any]) -> None:
    rewrapped = _rewrapped(case, KeySlot("models-kek", 4, wrap(case["dek"], 4)))
    assert len(rewrapped) == len(case["artifact"])
    dek = unwrap_for(rewrapped)
    assert dek is not None and dek == case["dek"]
    assert ArtifactReader(rewrapped).decrypt_all(dek) == case["plaintext"]
    stream = StreamDecryptor(dek)
    out = b"".join(stream.feed(rewrapped[i : i + 999]) for i in range(0, len(rewrapped), 999))
    stream.finish()
    assert out == case["plaintext"]
    buffered = BufferedStreamDecryptor(dek)
    for i in range(0, len(rewrapped), 5000):
        buffered.feed(rewrapped[i : i + 5000])
    assert buffered.finish() == case["plaintext"]


def test_a_slot_swapped_in_from_another_artifact_fails_the_commitment(case: dict[str, Any]) -> None:
    # Another model's slot, under the same KEK and version: the HSM unwraps it happily, to the
    # other model's key, which the body's key commitment rejects before any chunk is opened.
    other_dek = bytearray(os.urandom(32))
    swapped = _rewrapped(case, KeySlot("models-kek", 3, wrap(other_dek, 3)))
    dek = unwrap_for(swapped)
    assert dek == other_dek
    with pytest.raises(DecryptionFailed):
        ArtifactReader(swapped).decrypt_all(dek)
    stream = StreamDecryptor(dek)
    with pytest.raises(DecryptionFailed):
        assert stream.feed(swapped) == b""


def test_an_altered_wrapped_key_fails_the_unwrap(case: dict[str, Any]) -> None:
    wrapped = bytearray(wrap(case["dek"], 3))
    for i in range(len(wrapped)):
        wrapped[i] ^= 0x01
        assert unwrap_for(_rewrapped(case, KeySlot("models-kek", 3, bytes(wrapped)))) is None
        wrapped[i] ^= 0x01


def test_a_slot_naming_another_kek_version_fails_the_unwrap(case: dict[str, Any]) -> None:
    for version in (1, 2, 4):
        moved = _rewrapped(case, KeySlot("models-kek", version, wrap(case["dek"], 3)))
        assert unwrap_for(moved) is None
    with pytest.raises(InvalidUnwrap):
        aes_key_unwrap_with_padding(kek(4), wrap(case["dek"], 3))


def test_a_slot_naming_another_key_is_malformed(case: dict[str, Any]) -> None:
    assert _reason(_with_raw_slot(case, _slot(key_id="other-kek"))) == "KEY_SLOT_MISMATCH"
    with pytest.raises(InvalidArtifact) as info:
        _rewrapped(case, KeySlot("other-kek", 4, bytes(40)))
    assert info.value.reason == "KEY_SLOT_MISMATCH"


def test_a_format_2_body_cannot_pass_as_format_1(case: dict[str, Any]) -> None:
    # Same content header with the slot's fields folded in, under a version-1 prefix: the format
    # version is in the context, so the commitment fails.
    header = case["header"]
    v1 = header_for(SIZE, format_version=1, key_version=3, wrapped_dek=header.wrapped_dek).encoded
    forged = v1 + case["artifact"][header.header_size :]
    assert parse_header(forged).artifact_size == len(forged)
    with pytest.raises(DecryptionFailed):
        ArtifactReader(forged).decrypt_all(case["dek"])


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"key_version": 0}, "INVALID_KEY_VERSION"),
        # A slot at 2**31 or above was stored like any other: no broker releases under it.
        ({"key_version": 2**31}, "INVALID_KEY_VERSION"),
        ({"key_version": 2**32 - 1}, "INVALID_KEY_VERSION"),
        ({"wrap_mechanism": 0}, "UNSUPPORTED_WRAP_MECHANISM"),
        ({"wrap_mechanism": 2}, "UNSUPPORTED_WRAP_MECHANISM"),
        ({"wrapped_data_key": bytes(8)}, "INVALID_WRAPPED_DEK"),
        ({"wrapped_data_key": bytes(41)}, "INVALID_WRAPPED_DEK"),
        ({"wrapped_data_key": bytes(1032)}, "INVALID_WRAPPED_DEK"),
        ({"key_id": ""}, "INVALID_KEY_ID"),
    ],
)
def test_slot_limits(case: dict[str, Any], fields: dict[str, Any], reason: str) -> None:
    assert _reason(_with_raw_slot(case, _slot(**fields))) == reason


def test_the_slot_takes_every_version_a_broker_numbers(case: dict[str, Any]) -> None:
    top = _with_raw_slot(case, _slot(key_version=MAX_KEY_VERSION))
    assert parse_header(top).key_version == MAX_KEY_VERSION


def test_slot_encoding_rules(case: dict[str, Any]) -> None:
    good = _slot()
    raw = good[4:]
    assert parse_header(_with_raw_slot(case, good)).key_version == 3
    unknown = raw + b"\x28\x01"  # field 5, varint
    assert _reason(_with_raw_slot(case, struct.pack(">I", len(unknown)) + unknown)) == (
        "UNKNOWN_HEADER_FIELD"
    )
    # Fields out of order: valid protobuf, not canonical.
    reordered = raw[12:14] + raw[:12] + raw[14:]
    assert _reason(_with_raw_slot(case, struct.pack(">I", len(reordered)) + reordered)) == (
        "NON_CANONICAL_HEADER"
    )
    assert _reason(_with_raw_slot(case, struct.pack(">I", 3) + b"\xff\xff\xff")) == (
        "MALFORMED_HEADER"
    )
    assert _reason(_with_raw_slot(case, struct.pack(">I", 0))) == "KEY_SLOT_EMPTY"
    assert _reason(_with_raw_slot(case, struct.pack(">I", MAX_KEY_SLOT_SIZE + 1))) == (
        "KEY_SLOT_TOO_LARGE"
    )
    head = case["header"].head
    for cut in (len(case["header"].encoded) + 2, len(head) - 1):
        assert _reason(head[:cut]) == "TRUNCATED"


@pytest.mark.parametrize(
    "fields",
    [
        {"key_version": 3},
        {"wrapped_data_key": bytes(40)},
        {"wrap_mechanism": 1},
    ],
)
def test_key_fields_in_a_format_2_header_are_rejected(
    case: dict[str, Any], fields: dict[str, Any]
) -> None:
    msg = header_pb2.ArtifactHeader()
    msg.ParseFromString(case["header"].encoded[PREFIX_SIZE:])
    for name, value in fields.items():
        setattr(msg, name, value)
    raw = msg.SerializeToString(deterministic=True)
    data = (
        b"SRMODEL\x00"
        + struct.pack(">II", case["header"].format_version, len(raw))
        + raw
        + case["header"].slot_encoded
    )
    assert _reason(data) == "KEY_FIELD_IN_HEADER"


def test_slot_length_errors_fail_on_the_first_piece_that_shows_them(case: dict[str, Any]) -> None:
    at = len(case["header"].encoded)
    data = _with_raw_slot(case, struct.pack(">I", MAX_KEY_SLOT_SIZE + 1))
    validator = StructureValidator()
    validator.feed(data[: at + 3])
    with pytest.raises(InvalidArtifact) as info:
        validator.feed(data[at + 3 : at + 4])
    assert info.value.reason == "KEY_SLOT_TOO_LARGE"


def test_every_split_point_of_the_head(case: dict[str, Any]) -> None:
    art = case["artifact"]
    expected = summarize(art)
    for cut in range(1, case["header"].header_size + 60):
        validator = StructureValidator()
        validator.feed(art[:cut])
        validator.feed(art[cut:])
        assert validator.finish() == expected
        stream = StreamDecryptor(case["dek"])
        out = stream.feed(art[:cut]) + stream.feed(art[cut:])
        stream.finish()
        assert out == case["plaintext"]


def test_with_key_slot_refuses_format_1() -> None:
    v1 = header_for(10, format_version=1)
    with pytest.raises(InvalidArtifact) as info:
        with_key_slot(v1, KeySlot(v1.key_id, 4, bytes(40)))
    assert info.value.reason == "KEY_SLOT_NOT_REPLACEABLE"


def test_build_header_refuses_unknown_versions() -> None:
    with pytest.raises(InvalidArtifact) as info:
        header_for(10, format_version=4)
    assert info.value.reason == "UNSUPPORTED_FORMAT_VERSION"
