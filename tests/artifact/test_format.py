"""The container format: prefix, canonical header, field limits, summaries (no keys involved)."""

from __future__ import annotations

import hashlib
import io
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from strongroom.api.artifact.v1 import header_pb2
from strongroom.artifact import (
    MAGIC,
    ArtifactSummary,
    InvalidArtifact,
    WrapMechanism,
    parse_header,
    read_header,
    read_summary,
    summarize,
)
from strongroom.artifact.format import body_size
from strongroom.reasons import Reason

from .conftest import CHUNK, header_for

FORMATS = (1,)
"""Byte-level tests of the format-1 layout (format 2 has its own module)."""


def _wrap(raw: bytes, *, version: int = 1, magic: bytes = MAGIC) -> bytes:
    return magic + struct.pack(">II", version, len(raw)) + raw


def _base_message(**overrides: Any) -> header_pb2.ArtifactHeader:
    msg = header_pb2.ArtifactHeader()
    msg.ParseFromString(header_for(1000).encoded[16:])
    for name, value in overrides.items():
        if name == "created_at":
            msg.created_at.seconds, msg.created_at.nanos = value
        else:
            setattr(msg, name, value)
    return msg


def _encode(msg: header_pb2.ArtifactHeader) -> bytes:
    return _wrap(msg.SerializeToString(deterministic=True))


def _reason(data: bytes) -> str:
    with pytest.raises(InvalidArtifact) as info:
        parse_header(data)
    return info.value.reason


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(raw: bytes) -> list[bytes]:
    """Splits a protobuf message into its encoded fields (tag included), in order."""
    fields, pos = [], 0
    while pos < len(raw):
        start = pos

        def varint() -> int:
            nonlocal pos
            shift = value = 0
            while True:
                byte = raw[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    return value

        wire = varint() & 7
        if wire == 0:
            varint()
        elif wire == 2:
            length = varint()  # not `pos += varint()`: that reads `pos` before the call
            pos += length
        else:  # pragma: no cover - the header has no fixed-width fields
            raise AssertionError(wire)
        fields.append(raw[start:pos])
    return fields


# -- prefix ---------------------------------------------------------------------------------------


def test_layout_of_a_header() -> None:
    header = header_for(5 * CHUNK + 7)
    enc = header.encoded
    assert enc[:8] == b"SRMODEL\x00"
    assert struct.unpack(">II", enc[8:16]) == (1, len(enc) - 16)
    assert header.header_size == len(enc)
    assert header.message_size == 5 * CHUNK + 7 + 32
    assert header.chunk_count == 6
    # salt + commitment + message + one tag per chunk
    assert header.body_size == 56 + (5 * CHUNK + 39) + 16 * 6
    assert header.artifact_size == len(enc) + header.body_size + 32
    assert header.context == enc


@pytest.mark.parametrize(
    ("size", "chunks"),
    [(0, 1), (CHUNK - 33, 1), (CHUNK - 32, 2), (CHUNK - 1, 2), (CHUNK, 2), (2 * CHUNK - 32, 3)],
)
def test_body_size_follows_c2sp(size: int, chunks: int) -> None:
    assert body_size(size) == 56 + size + 32 + 16 * chunks


@pytest.mark.parametrize(
    "magic", [b"SRMODEL\x01", b"srmodel\x00", b"\x00" * 8, b"PK\x03\x04\x00\x00\x00\x00"]
)
def test_bad_magic(magic: bytes) -> None:
    assert _reason(_wrap(header_for(1).encoded[16:], magic=magic)) == "BAD_MAGIC"


def test_bad_magic_is_detected_on_the_first_byte() -> None:
    assert _reason(b"X") == "BAD_MAGIC"


@pytest.mark.parametrize("version", [0, 4, 0x0100_0001, 0xFFFF_FFFF])
def test_unknown_format_version(version: int) -> None:
    assert _reason(_wrap(header_for(1).encoded[16:], version=version)) == (
        "UNSUPPORTED_FORMAT_VERSION"
    )


def test_header_length_limits() -> None:
    assert _reason(MAGIC + struct.pack(">II", 1, 0)) == "HEADER_EMPTY"
    assert _reason(MAGIC + struct.pack(">II", 1, 65537)) == "HEADER_TOO_LARGE"
    assert _reason(MAGIC + struct.pack(">II", 1, 0xFFFF_FFFF)) == "HEADER_TOO_LARGE"


def test_truncated_header() -> None:
    enc = header_for(1).encoded
    for cut in range(len(enc)):
        assert _reason(enc[:cut]) == "TRUNCATED"


# -- canonical encoding ---------------------------------------------------------------------------


def test_header_roundtrip_is_canonical() -> None:
    header = header_for(123, signature_bundle=b"{}", signature_bundle_media_type="application/json")
    again = parse_header(header.encoded + b"body bytes are ignored")
    assert again == header
    assert again.signature_bundle == b"{}"


def test_fields_out_of_order_are_rejected() -> None:
    fields = _fields(header_for(1).encoded[16:])
    fields[0], fields[1] = fields[1], fields[0]
    assert _reason(_wrap(b"".join(fields))) == "NON_CANONICAL_HEADER"


def test_duplicate_field_is_rejected() -> None:
    fields = _fields(header_for(1).encoded[16:])
    assert _reason(_wrap(fields[0] + b"".join(fields))) == "NON_CANONICAL_HEADER"


def test_explicit_default_value_is_rejected() -> None:
    raw = header_for(1).encoded[16:]
    # signature_bundle (field 12, bytes) present but empty.
    assert _reason(_wrap(raw + b"\x62\x00")) == "NON_CANONICAL_HEADER"


def test_non_minimal_varint_is_rejected() -> None:
    fields = _fields(header_for(1, key_version=3).encoded[16:])
    i = next(i for i, f in enumerate(fields) if f[0] == 0x28)  # key_version, varint
    assert fields[i] == b"\x28\x03"
    fields[i] = b"\x28\x83\x00"
    assert _reason(_wrap(b"".join(fields))) == "NON_CANONICAL_HEADER"


@pytest.mark.parametrize("extra", [b"\xa0\x06\x01", b"\xfa\x3e\x02ab"])
def test_unknown_top_level_field_is_rejected(extra: bytes) -> None:
    assert _reason(_wrap(header_for(1).encoded[16:] + extra)) == "UNKNOWN_HEADER_FIELD"


def test_unknown_field_inside_created_at_is_rejected() -> None:
    fields = _fields(header_for(1).encoded[16:])
    i = next(i for i, f in enumerate(fields) if f[0] == 0x5A)  # created_at, field 11
    ts = fields[i][2:] + b"\x18\x01"
    fields[i] = b"\x5a" + _varint(len(ts)) + ts
    assert _reason(_wrap(b"".join(fields))) == "UNKNOWN_HEADER_FIELD"


@pytest.mark.parametrize(
    "raw", [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28", b"\x08" + b"\xff" * 11]
)
def test_malformed_protobuf(raw: bytes) -> None:
    assert _reason(_wrap(raw)) == "MALFORMED_HEADER"


# -- field limits ---------------------------------------------------------------------------------

GOOD_LIMITS: list[dict[str, Any]] = [
    {"model_name": "a" * 128},
    {"model_name": "Org_1/sub.team/model-v2"},
    {"model_version": "v" * 64},
    {"model_version": "1.4.0+build.7"},
    {"content_type": "application/vnd.dev.sigstore.bundle.v0.3+json"},
    {"key_id": "kms:eu-1/models_kek.v2"},
    {"key_version": 2**31 - 1},  # the highest a broker numbers (the field holds 32 bits)
    {"wrapped_dek": b"\x01" * 16},
    {"wrapped_dek": b"\x01" * 1024},
    {"plaintext_size": 1 << 40},
    {"signature_bundle": b"\x00" * 32768, "signature_bundle_media_type": "application/json"},
]


@pytest.mark.parametrize("overrides", GOOD_LIMITS)
def test_limits_accepted_at_the_boundary(overrides: dict[str, Any]) -> None:
    header = header_for(overrides.pop("plaintext_size", 1), **overrides)
    assert parse_header(header.encoded) == header


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"model_name": ""}, "INVALID_MODEL_NAME"),
    ({"model_name": "a" * 129}, "INVALID_MODEL_NAME"),
    ({"model_name": "a b"}, "INVALID_MODEL_NAME"),
    ({"model_name": "../etc"}, "INVALID_MODEL_NAME"),
    ({"model_name": "/abs"}, "INVALID_MODEL_NAME"),
    ({"model_name": "trailing/"}, "INVALID_MODEL_NAME"),
    ({"model_name": "a//b"}, "INVALID_MODEL_NAME"),
    ({"model_name": "modèle"}, "INVALID_MODEL_NAME"),
    ({"model_name": "x\n"}, "INVALID_MODEL_NAME"),
    ({"model_version": ""}, "INVALID_MODEL_VERSION"),
    ({"model_version": "1" * 65}, "INVALID_MODEL_VERSION"),
    ({"model_version": "-1"}, "INVALID_MODEL_VERSION"),
    ({"model_version": "1/2"}, "INVALID_MODEL_VERSION"),
    ({"content_type": ""}, "INVALID_CONTENT_TYPE"),
    ({"content_type": "Application/ONNX"}, "INVALID_CONTENT_TYPE"),
    ({"content_type": "onnx"}, "INVALID_CONTENT_TYPE"),
    ({"content_type": "text/plain; charset=utf-8"}, "INVALID_CONTENT_TYPE"),
    ({"content_type": "a/" + "b" * 127}, "INVALID_CONTENT_TYPE"),
    ({"key_id": ""}, "INVALID_KEY_ID"),
    ({"key_id": "k" * 129}, "INVALID_KEY_ID"),
    ({"key_id": "key id"}, "INVALID_KEY_ID"),
    ({"key_version": 0}, "INVALID_KEY_VERSION"),
    # Above the versions a broker numbers (2**31-1), though the field holds 32 bits.
    ({"key_version": 2**31}, "INVALID_KEY_VERSION"),
    ({"key_version": 2**32 - 1}, "INVALID_KEY_VERSION"),
    ({"wrapped_data_key": b""}, "INVALID_WRAPPED_DEK"),
    ({"wrapped_data_key": b"\x01" * 8}, "INVALID_WRAPPED_DEK"),
    ({"wrapped_data_key": b"\x01" * 41}, "INVALID_WRAPPED_DEK"),
    ({"wrapped_data_key": b"\x01" * 1032}, "INVALID_WRAPPED_DEK"),
    ({"wrap_mechanism": header_pb2.WRAP_MECHANISM_UNSPECIFIED}, "UNSUPPORTED_WRAP_MECHANISM"),
    (
        {"wrap_mechanism": header_pb2.WRAP_MECHANISM_RSA_OAEP_SHA256},
        "UNSUPPORTED_WRAP_MECHANISM",
    ),
    ({"wrap_mechanism": 77}, "UNSUPPORTED_WRAP_MECHANISM"),
    ({"body_encryption": header_pb2.BODY_ENCRYPTION_UNSPECIFIED}, "UNSUPPORTED_BODY_ENCRYPTION"),
    ({"body_encryption": 2}, "UNSUPPORTED_BODY_ENCRYPTION"),
    ({"chunk_size": 65536}, "UNSUPPORTED_CHUNK_SIZE"),
    ({"chunk_size": 0}, "UNSUPPORTED_CHUNK_SIZE"),
    ({"plaintext_size": (1 << 40) + 1}, "PLAINTEXT_TOO_LARGE"),
    ({"plaintext_size": (1 << 64) - 1}, "PLAINTEXT_TOO_LARGE"),
    ({"created_at": (0, 0)}, "INVALID_CREATED_AT"),
    ({"created_at": (-5, 0)}, "INVALID_CREATED_AT"),
    ({"created_at": (253402300800, 0)}, "INVALID_CREATED_AT"),
    ({"created_at": (1, 1_000_000_000)}, "INVALID_CREATED_AT"),
    (
        {"signature_bundle": b"x" * 32769, "signature_bundle_media_type": "application/json"},
        "INVALID_SIGNATURE_BUNDLE",
    ),
    ({"signature_bundle": b"{}"}, "INVALID_SIGNATURE_BUNDLE"),
    ({"signature_bundle_media_type": "application/json"}, "INVALID_SIGNATURE_BUNDLE"),
]


@pytest.mark.parametrize(("overrides", "reason"), BAD_FIELDS)
def test_parse_rejects_out_of_limit_fields(overrides: dict[str, Any], reason: str) -> None:
    got = _reason(_encode(_base_message(**overrides)))
    assert got == reason
    # ARTIFACT_FORMAT.md documents these codes and clients branch on them: each is catalogued
    # (a bad key id carried INVALID_KEY_ID, a code the catalogue did not have).
    assert got in Reason.__members__


def test_missing_created_at_is_rejected() -> None:
    msg = _base_message()
    msg.ClearField("created_at")
    assert _reason(_encode(msg)) == "INVALID_CREATED_AT"


def test_header_larger_than_64_kib_is_rejected() -> None:
    msg = _base_message(signature_bundle=b"x" * 32768, signature_bundle_media_type="a/b")
    raw = msg.SerializeToString(deterministic=True)
    padded = raw + b"\xa0\x06\x01" * ((65536 - len(raw)) // 3 + 1)
    assert _reason(_wrap(padded)) == "HEADER_TOO_LARGE"


_BUILD_ALIASES = {"wrapped_data_key": "wrapped_dek"}


def _buildable(overrides: dict[str, Any]) -> bool:
    """Whether build_header can even be asked for this value (it fixes some fields itself)."""
    if {"body_encryption", "chunk_size"} & overrides.keys():
        return False
    seconds, nanos = overrides.get("created_at", (1, 0))
    return bool(0 <= nanos < 1_000_000_000 and 0 <= seconds < 253402300800)  # fits a datetime


@pytest.mark.parametrize(
    ("overrides", "reason"), [case for case in BAD_FIELDS if _buildable(case[0])]
)
def test_build_rejects_the_same_fields(overrides: dict[str, Any], reason: str) -> None:
    fields = {_BUILD_ALIASES.get(k, k): v for k, v in overrides.items()}
    if "created_at" in fields:
        seconds, _ = fields.pop("created_at")
        fields["created_at"] = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    if "wrap_mechanism" in fields:
        fields["wrap_mechanism"] = int(fields["wrap_mechanism"])
    size = fields.pop("plaintext_size", 1)
    with pytest.raises(InvalidArtifact) as info:
        header_for(size, **fields)
    assert info.value.reason == reason


def test_created_at_must_be_aware_and_is_stored_in_utc() -> None:
    with pytest.raises(InvalidArtifact) as info:
        header_for(1, created_at=datetime(2025, 1, 1))
    assert info.value.reason == "INVALID_CREATED_AT"
    paris = timezone(timedelta(hours=1))
    header = header_for(1, created_at=datetime(2025, 1, 1, 13, 0, 0, 5, tzinfo=paris))
    assert header.created_at == datetime(2025, 1, 1, 12, 0, 0, 5, tzinfo=UTC)
    assert header.created_at.tzinfo is UTC


def test_repr_does_not_show_key_material_or_bundle() -> None:
    header = header_for(
        1,
        wrapped_dek=b"\xab" * 40,
        signature_bundle=b"SECRETBUNDLE",
        signature_bundle_media_type="application/json",
    )
    text = repr(header)
    assert "ab" * 8 not in text and "SECRETBUNDLE" not in text
    assert "acme/fraud-detector" in text


# -- summaries ------------------------------------------------------------------------------------


def test_summary_of_an_artifact(make_artifact: Any) -> None:
    plaintext, artifact = make_artifact(3 * CHUNK + 5)
    summary = summarize(artifact)
    header = parse_header(artifact)
    assert summary == ArtifactSummary(
        name="acme/fraud-detector",
        version="1.4.0",
        content_type="application/vnd.onnx",
        key_id="models-kek",
        key_version=3,
        plaintext_size=3 * CHUNK + 5,
        plaintext_sha256=hashlib.sha256(plaintext).hexdigest(),
        created_at=datetime(2025, 11, 25, 17, 0, 0, 123456, tzinfo=UTC),
        header_size=header.header_size,
        artifact_size=len(artifact),
        wrapped_dek_mechanism=WrapMechanism.AES_KEY_WRAP_PAD,
        body_size=len(artifact) - header.header_size - 32,
        format_version=1,
        has_signature_bundle=False,
    )


def test_read_header_and_read_summary_from_a_file(make_artifact: Any) -> None:
    plaintext, artifact = make_artifact(CHUNK + 1)
    stream = io.BytesIO(artifact)
    header = read_header(stream)
    assert stream.tell() == header.header_size
    summary = read_summary(io.BytesIO(artifact))
    assert summary == summarize(artifact)
    assert summary.plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    with pytest.raises(InvalidArtifact) as info:
        read_summary(io.BytesIO(artifact[:-1]))
    assert info.value.reason == "TRUNCATED"
    with pytest.raises(InvalidArtifact) as info:
        read_summary(io.BytesIO(artifact + b"\x00"))
    assert info.value.reason == "TRAILING_DATA"
    with pytest.raises(InvalidArtifact) as info:
        read_header(io.BytesIO(artifact[:10]))
    assert info.value.reason == "TRUNCATED"
