"""The artifact container: prefix, canonical protobuf header, key slot, C2SP body, digest footer.

Byte layout (``strongroom/artifact/ARTIFACT_FORMAT.md`` is the normative description)::

    offset 0       8 bytes   magic  "SRMODEL\\0"
    offset 8       4 bytes   format version, big-endian (1, 2 or 3)
    offset 12      4 bytes   header length N, big-endian (1 .. 65536)
    offset 16      N bytes   ArtifactHeader, canonical protobuf
    formats 2 and 3 only:
    offset 16+N    4 bytes   key slot length S, big-endian (1 .. 2048)
    offset 20+N    S bytes   ArtifactKeySlot, canonical protobuf (key id, KEK version, wrapped DEK)
    then           B bytes   body: C2SP chunked-encryption v1 of  plaintext || SHA-256(plaintext)
                             with context = the 16+N bytes of prefix and header (never the slot)
    then           32 bytes  footer: SHA-256(plaintext), in clear

In format 1 the KEK version and wrapped data key are header fields, hence bound into the body; in
formats 2 and 3 they live in the key slot, outside the context, so a data key can be re-wrapped under
a new KEK version by replacing the slot alone. Format 3 differs from 2 only in the body key: derived
from the slot's key and the model's name and version (``keybinding``), not the slot's key itself. ``B`` follows from ``plaintext_size`` alone, so the total
length of an artifact is known as soon as its head (everything before the body) has been read. This
module parses and validates structure only; it never sees a key.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from google.protobuf.message import DecodeError

from strongroom.api.artifact.v1 import header_pb2
from strongroom.artifact import c2sp
from strongroom.artifact.errors import InvalidArtifact
from strongroom.errors import InvalidArgument
from strongroom.identifiers import (
    MAX_KEY_VERSION,
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    MODEL_NAME_PATTERN,
    MODEL_VERSION_PATTERN,
    validate_key_version,
)
from strongroom.reasons import Reason

__all__ = [
    "DIGEST_SIZE",
    "FOOTER_SIZE",
    "FORMAT_V1",
    "FORMAT_V2",
    "FORMAT_V3",
    "FORMAT_VERSION",
    "HEADER_WRAP_MECHANISMS",
    "KEY_SLOT_FORMATS",
    "MAGIC",
    "MAX_HEADER_SIZE",
    "MAX_HEAD_SIZE",
    "MAX_KEY_SLOT_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "PREFIX_SIZE",
    "SLOT_LENGTH_SIZE",
    "SUPPORTED_FORMAT_VERSIONS",
    "ArtifactHeader",
    "ArtifactSummary",
    "BodyEncryption",
    "HeadAccumulator",
    "KeySlot",
    "WrapMechanism",
    "body_size",
    "build_header",
    "check_content_type",
    "check_key_id",
    "check_prefix",
    "head_length",
    "parse_header",
    "read_header",
    "read_summary",
    "with_key_slot",
]

MAGIC = b"SRMODEL\x00"
"""First eight bytes of every artifact."""
FORMAT_V1 = 1
"""Format 1: the KEK version and wrapped data key are header fields, bound into the body."""
FORMAT_V2 = 2
"""Format 2: they live in a key slot outside the body's context (re-wrappable)."""
FORMAT_V3 = 3
"""Format 3: format 2's layout, with the body key bound to the model's name and version
(:mod:`~strongroom.artifact.keybinding`): the key in the slot opens no other model's body."""
FORMAT_VERSION = FORMAT_V3
"""The format version this library writes unless told otherwise."""
SUPPORTED_FORMAT_VERSIONS = (FORMAT_V1, FORMAT_V2, FORMAT_V3)
KEY_SLOT_FORMATS = (FORMAT_V2, FORMAT_V3)
"""The formats with a key slot outside the body's context (re-wrappable)."""
"""Every format version this library reads (and can write)."""
_PREFIX = struct.Struct(">8sII")
PREFIX_SIZE = _PREFIX.size
"""Magic, format version and header length: 16 bytes."""
MAX_HEADER_SIZE = 64 * 1024
"""Largest protobuf header accepted (bytes)."""
_SLOT_LENGTH = struct.Struct(">I")
SLOT_LENGTH_SIZE = _SLOT_LENGTH.size
"""The key slot's length field (formats 2 and 3): 4 bytes."""
MAX_KEY_SLOT_SIZE = 2048
"""Largest protobuf key slot accepted (bytes); a real one is about 60."""
MAX_HEAD_SIZE = PREFIX_SIZE + MAX_HEADER_SIZE + SLOT_LENGTH_SIZE + MAX_KEY_SLOT_SIZE
"""The most bytes before any artifact's body (prefix, header, key slot): the largest head."""
DIGEST_SIZE = 32
"""SHA-256 digest length: appended to the encrypted message and repeated in the footer."""
FOOTER_SIZE = DIGEST_SIZE
MAX_PLAINTEXT_SIZE = 1 << 40
"""Largest model accepted: 1 TiB (2^26 chunks, far below the C2SP limit of 2^38)."""
DEK_SIZE = 32
"""The data key is an AES-256 key (the C2SP input key)."""

MAX_CONTENT_TYPE_LENGTH = 128
MAX_KEY_ID_LENGTH = 128
MIN_WRAPPED_DEK_SIZE = 16
MAX_WRAPPED_DEK_SIZE = 1024
MAX_SIGNATURE_BUNDLE_SIZE = 32 * 1024
MAX_MEDIA_TYPE_LENGTH = 128
_MAX_TIMESTAMP_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the protobuf Timestamp limit

_NAME = MODEL_NAME_PATTERN
_VERSION = MODEL_VERSION_PATTERN
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# RFC 6838 restricted names, lower case only so each media type has one spelling; no parameters.
_RESTRICTED = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(rf"{_RESTRICTED}/{_RESTRICTED}")


class WrapMechanism(enum.IntEnum):
    """How the header's data key is wrapped; same numbers as ``strongroom.api.artifact.v1.WrapMechanism``.

    The key broker's RPC enum has the same numbers too, but the format does not depend on it:
    ``strongroom.client.mechanisms`` maps one to the other.
    """

    UNSPECIFIED = 0
    AES_KEY_WRAP_PAD = 1
    RSA_OAEP_SHA1 = 2
    RSA_OAEP_SHA256 = 3


HEADER_WRAP_MECHANISMS = frozenset({WrapMechanism.AES_KEY_WRAP_PAD})
"""The mechanisms a header or key slot may name: the KEK wrap (RSA-OAEP is only for release to a TEE)."""


class BodyEncryption(enum.IntEnum):
    """The body's encryption scheme; same numbers as ``strongroom.api.artifact.v1.BodyEncryption``."""

    UNSPECIFIED = 0
    C2SP_CHUNKED_AES_256_GCM_HKDF_SHA512 = 1


def body_size(plaintext_size: int) -> int:
    """Exact body length for a plaintext of ``plaintext_size`` bytes (the message carries the digest)."""
    return c2sp.ciphertext_size(plaintext_size + DIGEST_SIZE)


def _invalid(reason: str, message: str) -> InvalidArtifact:
    return InvalidArtifact(message, reason=reason)


@dataclass(frozen=True)
class KeySlot:
    """Which KEK version wraps an artifact's data key, and the wrapped key (a claim until unwrapped).

    In format 1 these are header fields; in formats 2 and 3 they form the key slot, outside the context.
    """

    key_id: str
    key_version: int
    wrapped_dek: bytes
    wrap_mechanism: WrapMechanism = WrapMechanism.AES_KEY_WRAP_PAD


@dataclass(frozen=True, repr=False)
class ArtifactHeader:
    """A parsed, validated artifact head (everything before the body) and its exact encoding.

    ``encoded`` is the prefix and canonical protobuf header: it is what the body's C2SP context
    binds. ``slot_encoded`` is the key slot (formats 2 and 3) (its 4-byte length and canonical protobuf),
    empty in format 1; it is *not* in the context. ``key_version``, ``wrapped_dek`` and
    ``wrap_mechanism`` are the header's fields in format 1 and the slot's in formats 2 and 3. The values
    are structurally valid but *unauthenticated* until a keyed reader checks the body's commitment
    against ``encoded`` with the data key that the slot unwraps to.
    """

    model_name: str
    model_version: str
    content_type: str
    key_id: str
    key_version: int
    wrapped_dek: bytes
    wrap_mechanism: WrapMechanism
    plaintext_size: int
    created_at: datetime
    signature_bundle: bytes
    signature_bundle_media_type: str
    body_encryption: BodyEncryption
    chunk_size: int
    format_version: int
    encoded: bytes
    slot_encoded: bytes = b""

    def __repr__(self) -> str:
        return (
            f"ArtifactHeader(format_version={self.format_version}, "
            f"model_name={self.model_name!r}, model_version={self.model_version!r}, "
            f"key_id={self.key_id!r}, key_version={self.key_version}, "
            f"plaintext_size={self.plaintext_size}, header_size={self.header_size})"
        )

    @property
    def header_size(self) -> int:
        """Bytes before the body (the body's offset): prefix, protobuf header and key slot."""
        return len(self.encoded) + len(self.slot_encoded)

    @property
    def head(self) -> bytes:
        """Every byte before the body, exactly as stored."""
        return self.encoded + self.slot_encoded

    @property
    def key_slot(self) -> KeySlot:
        """The KEK id and version and the wrapped data key (from the header or the slot)."""
        return KeySlot(self.key_id, self.key_version, self.wrapped_dek, self.wrap_mechanism)

    @property
    def message_size(self) -> int:
        """Length of the encrypted C2SP message: plaintext plus its 32-byte digest."""
        return self.plaintext_size + DIGEST_SIZE

    @property
    def chunk_count(self) -> int:
        """Number of C2SP chunks in the body."""
        return c2sp.chunk_count(self.message_size)

    @property
    def body_size(self) -> int:
        """Exact body length in bytes."""
        return body_size(self.plaintext_size)

    @property
    def footer_offset(self) -> int:
        """Offset of the 32-byte footer."""
        return self.header_size + self.body_size

    @property
    def artifact_size(self) -> int:
        """Exact length of the whole artifact."""
        return self.footer_offset + FOOTER_SIZE

    @property
    def context(self) -> bytes:
        """The C2SP context of the body: the exact prefix and header bytes (never the key slot)."""
        return self.encoded


@dataclass(frozen=True)
class ArtifactSummary:
    """What a keyless party (the model store, ``strongroom model inspect``) can know of an artifact.

    Every value is as the artifact claims it: structurally checked (limits, canonical header, exact
    length), but only a holder of the data key can authenticate it. ``plaintext_sha256`` comes from
    the footer (lower-case hex). ``header_size`` counts everything before the body (prefix,
    protobuf header and, in formats 2 and 3, the key slot); ``artifact_size`` is exactly
    ``header_size + body_size + 32``.
    """

    name: str
    version: str
    content_type: str
    key_id: str
    key_version: int
    plaintext_size: int
    plaintext_sha256: str
    created_at: datetime
    header_size: int
    artifact_size: int
    wrapped_dek_mechanism: WrapMechanism
    body_size: int
    format_version: int
    has_signature_bundle: bool

    @classmethod
    def of(cls, header: ArtifactHeader, footer: bytes) -> ArtifactSummary:
        """Combines a parsed header and its 32-byte footer."""
        if len(footer) != FOOTER_SIZE:
            raise _invalid(Reason.TRUNCATED, "artifact footer is truncated")
        return cls(
            name=header.model_name,
            version=header.model_version,
            content_type=header.content_type,
            key_id=header.key_id,
            key_version=header.key_version,
            plaintext_size=header.plaintext_size,
            plaintext_sha256=bytes(footer).hex(),
            created_at=header.created_at,
            header_size=header.header_size,
            artifact_size=header.artifact_size,
            wrapped_dek_mechanism=header.wrap_mechanism,
            body_size=header.body_size,
            format_version=header.format_version,
            has_signature_bundle=bool(header.signature_bundle),
        )


def check_prefix(data: bytes | bytearray | memoryview) -> int | None:
    """Checks as much of the 16-byte prefix as ``data`` holds; returns the header length once known.

    Rejects a wrong magic or version as soon as the offending byte is present, so a streaming
    validator fails on the first bad piece. Returns None while the prefix is incomplete.
    """
    view = memoryview(data)
    have = min(view.nbytes, PREFIX_SIZE)
    if view[: min(have, len(MAGIC))] != MAGIC[: min(have, len(MAGIC))]:
        raise _invalid(Reason.BAD_MAGIC, "not a Strongroom model artifact (bad magic)")
    if have >= 12:
        (version,) = struct.unpack_from(">I", view, 8)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise _invalid(
                Reason.UNSUPPORTED_FORMAT_VERSION,
                f"artifact format version {version} is not supported "
                f"(only {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})",
            )
    elif have > 8 and any(view[8:have]):
        # The version's high bytes are already non-zero: it cannot be a supported one.
        raise _invalid(
            Reason.UNSUPPORTED_FORMAT_VERSION, "artifact format version is not supported"
        )
    if have < PREFIX_SIZE:
        return None
    _, _, header_len = _PREFIX.unpack_from(view)
    if header_len == 0:
        raise _invalid(Reason.HEADER_EMPTY, "artifact header is empty")
    if header_len > MAX_HEADER_SIZE:
        raise _invalid(
            Reason.HEADER_TOO_LARGE,
            f"artifact header of {header_len} bytes exceeds {MAX_HEADER_SIZE}",
        )
    return int(header_len)


def _check_ascii(
    value: str, pattern: re.Pattern[str], max_len: int, reason: Reason, what: str
) -> None:
    if not value:
        raise _invalid(reason, f"{what} is empty")
    if len(value) > max_len:
        raise _invalid(reason, f"{what} is longer than {max_len} characters")
    if not value.isascii() or not pattern.fullmatch(value):
        raise _invalid(reason, f"{what} has characters outside its allowed set")


def check_content_type(value: str) -> None:
    """InvalidArtifact(INVALID_CONTENT_TYPE) unless ``value`` is a content type a header may carry
    (the one rule, for headers and for what a store records from them)."""
    _check_ascii(
        value, _MEDIA_TYPE, MAX_CONTENT_TYPE_LENGTH, Reason.INVALID_CONTENT_TYPE, "content type"
    )


def check_key_id(value: str) -> None:
    """InvalidArtifact(INVALID_KEY_ID) unless ``value`` is a key id a header may carry (the one
    rule, for headers and for what a store records from them)."""
    _check_ascii(value, _KEY_ID, MAX_KEY_ID_LENGTH, Reason.INVALID_KEY_ID, "key id")


def _check_key_fields(
    key_id: str,
    key_version: int,
    wrap_mechanism: int,
    wrapped: bytes,
) -> None:
    """The rules shared by the format-1 header fields 4-7 and the key slot (formats 2 and 3)."""
    check_key_id(key_id)
    # The broker's rule (identifiers.validate_key_version), not the field's 32 bits: a header or
    # slot naming 2**31 or above was stored and listed like any model, yet no broker releases or
    # re-wraps under it (every load a refused release, and a key rotation called it current).
    try:
        validate_key_version(key_version)
    except InvalidArgument:
        raise _invalid(
            Reason.INVALID_KEY_VERSION,
            f"key version must be 1..{MAX_KEY_VERSION}, the versions a key broker numbers",
        ) from None
    if wrap_mechanism not in HEADER_WRAP_MECHANISMS:
        raise _invalid(
            Reason.UNSUPPORTED_WRAP_MECHANISM,
            "the data key must be wrapped with WRAP_MECHANISM_AES_KEY_WRAP_PAD",
        )
    size = len(wrapped)
    if not MIN_WRAPPED_DEK_SIZE <= size <= MAX_WRAPPED_DEK_SIZE or size % 8:
        raise _invalid(
            Reason.INVALID_WRAPPED_DEK,
            f"wrapped data key must be a multiple of 8 bytes between {MIN_WRAPPED_DEK_SIZE} "
            f"and {MAX_WRAPPED_DEK_SIZE}",
        )


def _validate(msg: header_pb2.ArtifactHeader, format_version: int) -> None:
    _check_ascii(msg.model_name, _NAME, MAX_NAME_LENGTH, Reason.INVALID_MODEL_NAME, "model name")
    _check_ascii(
        msg.model_version,
        _VERSION,
        MAX_VERSION_LENGTH,
        Reason.INVALID_MODEL_VERSION,
        "model version",
    )
    check_content_type(msg.content_type)
    if format_version == FORMAT_V1:
        _check_key_fields(msg.key_id, msg.key_version, msg.wrap_mechanism, msg.wrapped_data_key)
    else:
        check_key_id(msg.key_id)
        # One place for the wrapped key: a key-slot header that also carried one would leave a
        # reader to choose between a bound copy and a replaceable one.
        if msg.key_version or msg.wrapped_data_key or msg.wrap_mechanism:
            raise _invalid(
                Reason.KEY_FIELD_IN_HEADER,
                f"a format-{format_version} header must not carry key_version, wrapped_data_key or "
                "wrap_mechanism (they belong in the key slot)",
            )
    if msg.body_encryption != header_pb2.BODY_ENCRYPTION_C2SP_CHUNKED_AES_256_GCM_HKDF_SHA512:
        raise _invalid(Reason.UNSUPPORTED_BODY_ENCRYPTION, "unsupported body encryption")
    if msg.chunk_size != c2sp.CHUNK_SIZE:
        raise _invalid(Reason.UNSUPPORTED_CHUNK_SIZE, f"chunk size must be {c2sp.CHUNK_SIZE}")
    if msg.plaintext_size > MAX_PLAINTEXT_SIZE:
        raise _invalid(Reason.PLAINTEXT_TOO_LARGE, f"plaintext exceeds {MAX_PLAINTEXT_SIZE} bytes")
    if not msg.HasField("created_at"):
        raise _invalid(Reason.INVALID_CREATED_AT, "created_at is missing")
    ts = msg.created_at
    if not 0 < ts.seconds <= _MAX_TIMESTAMP_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise _invalid(Reason.INVALID_CREATED_AT, "created_at is out of range")
    if len(msg.signature_bundle) > MAX_SIGNATURE_BUNDLE_SIZE:
        raise _invalid(
            Reason.INVALID_SIGNATURE_BUNDLE,
            f"signature bundle exceeds {MAX_SIGNATURE_BUNDLE_SIZE} bytes",
        )
    if msg.signature_bundle:
        _check_ascii(
            msg.signature_bundle_media_type,
            _MEDIA_TYPE,
            MAX_MEDIA_TYPE_LENGTH,
            Reason.INVALID_SIGNATURE_BUNDLE,
            "signature bundle media type",
        )
    elif msg.signature_bundle_media_type:
        raise _invalid(
            Reason.INVALID_SIGNATURE_BUNDLE, "signature bundle media type is set without a bundle"
        )


def _timestamp_to_datetime(seconds: int, nanos: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=nanos // 1000)


_Message = header_pb2.ArtifactHeader | header_pb2.ArtifactKeySlot


def _parse_canonical(raw: bytes, msg: _Message, what: str) -> None:
    """Parses ``raw`` into ``msg``; it must be canonical and carry no unknown field."""
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        raise _invalid(
            Reason.MALFORMED_HEADER, f"artifact {what} is not a valid protobuf"
        ) from None
    reencoded = msg.SerializeToString(deterministic=True)
    # Recursive (the Timestamp too); missing from the typeshed stubs.
    msg.DiscardUnknownFields()  # type: ignore[union-attr]
    if msg.SerializeToString(deterministic=True) != reencoded:
        raise _invalid(
            Reason.UNKNOWN_HEADER_FIELD, f"artifact {what} has fields this reader does not know"
        )
    if reencoded != raw:
        raise _invalid(Reason.NON_CANONICAL_HEADER, f"artifact {what} is not in canonical encoding")


def head_length(data: bytes | bytearray | memoryview) -> int | None:
    """The length of everything before the body, once ``data`` (from offset 0) holds enough to know.

    Checks the prefix (and, in formats 2 and 3, the key slot's length field) as soon as those bytes are
    present, so a streaming reader fails on the first bad piece. Returns None while unknown.
    """
    view = memoryview(data)
    header_len = check_prefix(view)
    if header_len is None:
        return None
    (version,) = struct.unpack_from(">I", view, 8)
    if version == FORMAT_V1:
        return PREFIX_SIZE + header_len
    slot_at = PREFIX_SIZE + header_len
    if view.nbytes < slot_at + SLOT_LENGTH_SIZE:
        return None
    (slot_len,) = _SLOT_LENGTH.unpack_from(view, slot_at)
    if slot_len == 0:
        raise _invalid(Reason.KEY_SLOT_EMPTY, "artifact key slot is empty")
    if slot_len > MAX_KEY_SLOT_SIZE:
        raise _invalid(
            Reason.KEY_SLOT_TOO_LARGE,
            f"artifact key slot of {slot_len} bytes exceeds {MAX_KEY_SLOT_SIZE}",
        )
    return slot_at + SLOT_LENGTH_SIZE + int(slot_len)


def parse_header(data: bytes | bytearray | memoryview) -> ArtifactHeader:
    """Parses and validates the head (prefix, header, key slot in formats 2 and 3) at the start of ``data``.

    Needs no key. ``data`` must start at artifact offset 0 and hold at least the whole head; anything
    after it is ignored. Raises InvalidArtifact with a reason code: BAD_MAGIC,
    UNSUPPORTED_FORMAT_VERSION, HEADER_EMPTY, HEADER_TOO_LARGE, KEY_SLOT_EMPTY, KEY_SLOT_TOO_LARGE,
    TRUNCATED, MALFORMED_HEADER, UNKNOWN_HEADER_FIELD, NON_CANONICAL_HEADER, KEY_FIELD_IN_HEADER,
    KEY_SLOT_MISMATCH, or the reason of the offending field.
    """
    view = memoryview(data)
    total = head_length(view)
    if total is None or view.nbytes < total:
        raise _invalid(Reason.TRUNCATED, "artifact is truncated inside its header")
    header_len = check_prefix(view)
    assert header_len is not None
    version = int(struct.unpack_from(">I", view, 8)[0])
    encoded = bytes(view[: PREFIX_SIZE + header_len])
    msg = header_pb2.ArtifactHeader()
    _parse_canonical(encoded[PREFIX_SIZE:], msg, "header")
    _validate(msg, version)
    slot_encoded = b""
    if version == FORMAT_V1:
        slot = KeySlot(
            msg.key_id,
            msg.key_version,
            msg.wrapped_data_key,
            WrapMechanism(msg.wrap_mechanism),
        )
    else:
        slot_encoded = bytes(view[len(encoded) : total])
        slot = _parse_slot(slot_encoded[SLOT_LENGTH_SIZE:], msg.key_id)
    return ArtifactHeader(
        model_name=msg.model_name,
        model_version=msg.model_version,
        content_type=msg.content_type,
        key_id=msg.key_id,
        key_version=slot.key_version,
        wrapped_dek=slot.wrapped_dek,
        wrap_mechanism=slot.wrap_mechanism,
        plaintext_size=msg.plaintext_size,
        created_at=_timestamp_to_datetime(msg.created_at.seconds, msg.created_at.nanos),
        signature_bundle=msg.signature_bundle,
        signature_bundle_media_type=msg.signature_bundle_media_type,
        body_encryption=BodyEncryption(msg.body_encryption),
        chunk_size=msg.chunk_size,
        format_version=version,
        encoded=encoded,
        slot_encoded=slot_encoded,
    )


def _parse_slot(raw: bytes, header_key_id: str) -> KeySlot:
    msg = header_pb2.ArtifactKeySlot()
    _parse_canonical(raw, msg, "key slot")
    _check_key_fields(msg.key_id, msg.key_version, msg.wrap_mechanism, msg.wrapped_data_key)
    # The header's key id is bound into the body; a slot naming another KEK cannot be this
    # artifact's (and would send the unwrap to the wrong key).
    if msg.key_id != header_key_id:
        raise _invalid(Reason.KEY_SLOT_MISMATCH, "the key slot names another key than the header")
    return KeySlot(
        msg.key_id, msg.key_version, msg.wrapped_data_key, WrapMechanism(msg.wrap_mechanism)
    )


def _encode_slot(slot: KeySlot) -> bytes:
    """The key slot field (formats 2 and 3): 4-byte length and canonical ArtifactKeySlot (validated)."""
    if not 0 <= slot.key_version < 1 << 32:
        raise _invalid(Reason.INVALID_KEY_VERSION, "key version must be a 32-bit unsigned integer")
    _check_key_fields(
        slot.key_id, slot.key_version, int(slot.wrap_mechanism), bytes(slot.wrapped_dek)
    )
    raw = header_pb2.ArtifactKeySlot(
        key_id=slot.key_id,
        key_version=slot.key_version,
        wrap_mechanism=header_pb2.WrapMechanism.ValueType(int(slot.wrap_mechanism)),
        wrapped_data_key=bytes(slot.wrapped_dek),
    ).SerializeToString(deterministic=True)
    return _SLOT_LENGTH.pack(len(raw)) + raw


def build_header(
    *,
    model_name: str,
    model_version: str,
    content_type: str,
    key_id: str,
    key_version: int,
    wrapped_dek: bytes,
    plaintext_size: int,
    wrap_mechanism: WrapMechanism = WrapMechanism.AES_KEY_WRAP_PAD,
    created_at: datetime | None = None,
    signature_bundle: bytes = b"",
    signature_bundle_media_type: str = "",
    format_version: int = FORMAT_VERSION,
) -> ArtifactHeader:
    """Builds, encodes and validates a head (same checks as :func:`parse_header`).

    ``format_version`` 3 (the default) and 2 put the KEK version and wrapped data key in the key
    slot; 1 puts them in the header (bound into the body). Format 3's body key is bound to the
    model (:func:`~strongroom.artifact.keybinding.bind_data_key`); the header is the same. ``created_at`` must be timezone-aware and
    defaults to now; it is kept to the microsecond. Raises InvalidArtifact for any value outside
    the format's limits.
    """
    if format_version not in SUPPORTED_FORMAT_VERSIONS:
        raise _invalid(
            Reason.UNSUPPORTED_FORMAT_VERSION,
            f"artifact format version {format_version} is not supported",
        )
    if created_at is None:
        created_at = datetime.now(UTC)
    if created_at.tzinfo is None:
        raise _invalid(Reason.INVALID_CREATED_AT, "created_at must be timezone-aware")
    if not 0 <= plaintext_size <= MAX_PLAINTEXT_SIZE:
        raise _invalid(
            Reason.PLAINTEXT_TOO_LARGE, f"plaintext size must be 0..{MAX_PLAINTEXT_SIZE}"
        )
    if not 0 <= key_version < 1 << 32:
        raise _invalid(Reason.INVALID_KEY_VERSION, "key version must be a 32-bit unsigned integer")
    utc = created_at.astimezone(UTC)
    epoch = int(utc.replace(microsecond=0).timestamp())
    msg = header_pb2.ArtifactHeader(
        model_name=model_name,
        model_version=model_version,
        content_type=content_type,
        key_id=key_id,
        plaintext_size=plaintext_size,
        body_encryption=header_pb2.BODY_ENCRYPTION_C2SP_CHUNKED_AES_256_GCM_HKDF_SHA512,
        chunk_size=c2sp.CHUNK_SIZE,
        signature_bundle=bytes(signature_bundle),
        signature_bundle_media_type=signature_bundle_media_type,
    )
    slot = b""
    if format_version == FORMAT_V1:
        msg.key_version = key_version
        msg.wrapped_data_key = bytes(wrapped_dek)
        msg.wrap_mechanism = header_pb2.WrapMechanism.ValueType(int(wrap_mechanism))
    else:
        slot = _encode_slot(KeySlot(key_id, key_version, bytes(wrapped_dek), wrap_mechanism))
    msg.created_at.seconds = epoch
    msg.created_at.nanos = utc.microsecond * 1000
    _validate(msg, format_version)
    raw = msg.SerializeToString(deterministic=True)
    if len(raw) > MAX_HEADER_SIZE:
        raise _invalid(Reason.HEADER_TOO_LARGE, f"artifact header exceeds {MAX_HEADER_SIZE} bytes")
    return parse_header(_PREFIX.pack(MAGIC, format_version, len(raw)) + raw + slot)


def with_key_slot(header: ArtifactHeader, slot: KeySlot) -> ArtifactHeader:
    """The same format-2 or -3 head with another key slot (a re-wrapped data key); context unchanged.

    Only the slot changes, so the body (bound to ``header.encoded``) stays valid if, and only if,
    ``slot`` unwraps to the same data key. Raises InvalidArtifact(KEY_SLOT_NOT_REPLACEABLE) for a
    format-1 artifact, whose key fields are bound into the body, and KEY_SLOT_MISMATCH if the slot
    names another key.
    """
    if header.format_version not in KEY_SLOT_FORMATS:
        raise _invalid(
            Reason.KEY_SLOT_NOT_REPLACEABLE,
            f"a format-{header.format_version} artifact binds its wrapped data key into the body; "
            "it can only be re-encrypted, not re-wrapped",
        )
    if slot.key_id != header.key_id:
        raise _invalid(Reason.KEY_SLOT_MISMATCH, "the key slot names another key than the header")
    return parse_header(header.encoded + _encode_slot(slot))


class HeadAccumulator:
    """Collects the head of an artifact arriving in pieces; buffers at most the head itself.

    ``take(view)`` consumes what belongs to the head and returns the rest of ``view``; once the head
    is complete, :attr:`header` is set. Errors (InvalidArtifact) are raised on the first bad piece.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ArtifactHeader | None = None

    def take(self, view: memoryview) -> memoryview:
        """Consumes head bytes from ``view``; returns the bytes after the head (possibly empty)."""
        if self.header is not None:
            return view
        # The head's length is learnt in up to three steps (prefix, header, slot length): take only
        # what is known to belong to the head, so no body byte is ever buffered here.
        while True:
            total = head_length(self._buf)
            if total is None:
                need = self._next_boundary() - len(self._buf)
            else:
                need = total - len(self._buf)
            step = min(need, view.nbytes)
            self._buf += view[:step]
            view = view[step:]
            if total is not None and len(self._buf) == total:
                self.header = parse_header(self._buf)
                self._buf = bytearray()
                return view
            if step < need or not view.nbytes:
                # Waiting for more bytes; re-check what arrived (a bad magic fails right away).
                head_length(self._buf)
                return view

    def _next_boundary(self) -> int:
        """The offset up to which the buffered bytes must reach before the head length is known."""
        header_len = check_prefix(self._buf)
        if header_len is None:
            return PREFIX_SIZE
        return PREFIX_SIZE + header_len + SLOT_LENGTH_SIZE


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        piece = stream.read(remaining)
        if not piece:
            break
        parts.append(piece)
        remaining -= len(piece)
    return b"".join(parts)


def read_header(stream: BinaryIO) -> ArtifactHeader:
    """Reads exactly the head (prefix, header, key slot) from ``stream`` at offset 0 and parses it.

    Leaves the stream positioned at the start of the body; needs no key and no seeking.
    """
    head = bytearray(_read_exactly(stream, PREFIX_SIZE))
    if check_prefix(head) is None:
        raise _invalid(Reason.TRUNCATED, "artifact is truncated inside its prefix")
    # At most two more reads: the header (plus the slot length), then the slot.
    for _ in range(2):
        total = head_length(head)
        if total is not None:
            break
        header_len = check_prefix(head)
        assert header_len is not None
        want = PREFIX_SIZE + header_len + SLOT_LENGTH_SIZE - len(head)
        piece = _read_exactly(stream, want)
        head += piece
        if len(piece) < want:
            raise _invalid(Reason.TRUNCATED, "artifact is truncated inside its header")
    total = head_length(head)
    if total is None:  # pragma: no cover - head_length knows after prefix, header, slot length
        raise _invalid(Reason.TRUNCATED, "artifact is truncated inside its header")
    head += _read_exactly(stream, total - len(head))
    return parse_header(head)


def read_summary(stream: BinaryIO) -> ArtifactSummary:
    """Keyless summary of a seekable artifact: header, footer and exact total length; body unread.

    Raises InvalidArtifact(TRUNCATED or TRAILING_DATA) if the stream's length is not exactly what
    the header implies.
    """
    stream.seek(0)
    header = read_header(stream)
    end = stream.seek(0, 2)
    if end < header.artifact_size:
        raise _invalid(Reason.TRUNCATED, "artifact is shorter than its header implies")
    if end > header.artifact_size:
        raise _invalid(Reason.TRAILING_DATA, "artifact is longer than its header implies")
    stream.seek(header.footer_offset)
    return ArtifactSummary.of(header, _read_exactly(stream, FOOTER_SIZE))
