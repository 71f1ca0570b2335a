"""Multi-part models: the manifest that ties several artifacts into one model version.

A model too big for one protobuf (ONNX stops at 2 GB) or kept as several files (safetensors
shards) is published as several ordinary artifacts, one per *part*, plus a *manifest*: another
ordinary artifact, stored under the model's own name and version, whose plaintext is a canonical
``strongroom.api.artifact.v1.ModelManifest``. Every artifact of one model version is encrypted
under the same data key, so the manifest is authenticated, and kept confidential, by the same
C2SP construction as the parts; this module never weakens or re-implements the single-artifact
format, it only sits above it.

The manifest binds each part by position, by the SHA-256 of the part's authenticated header
bytes (its C2SP context: model name, the part's store version, sizes, creation time; in format 1
the wrapped key too, in format 2 not the key slot, and in neither the salt) and by the part's
plaintext size and SHA-256; every part must also authenticate under the manifest's data key. A keyed reader checks each part's header against its manifest
entry before using any of its bytes, and its authenticated digest once it is decrypted; so a
part swapped, reordered, dropped or taken from another version is refused with DATA_LOSS
(:class:`PartMismatch`, :class:`PartMissing`), as is a manifest served for another version
(:class:`ManifestMismatch`). See ARTIFACT_FORMAT.md, "Multi-part models".
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from strongroom.api.artifact.v1 import manifest_pb2
from strongroom.artifact.errors import InvalidArtifact
from strongroom.artifact.format import (
    _MEDIA_TYPE,
    DIGEST_SIZE,
    MAX_CONTENT_TYPE_LENGTH,
    MAX_PLAINTEXT_SIZE,
    ArtifactHeader,
)
from strongroom.errors import DataLoss
from strongroom.identifiers import validate_name, validate_version
from strongroom.reasons import Reason

__all__ = [
    "MANIFEST_CONTENT_TYPE",
    "MAX_MANIFEST_SIZE",
    "MAX_PARTS",
    "MAX_PART_NAME_LENGTH",
    "Manifest",
    "ManifestLayout",
    "ManifestMismatch",
    "ManifestPart",
    "PartMismatch",
    "PartMissing",
    "build_manifest",
    "check_part_digest",
    "check_part_header",
    "header_digest",
    "is_manifest",
    "parse_manifest",
    "part_version",
    "validate_part_name",
]

MANIFEST_CONTENT_TYPE = "application/vnd.strongroom.manifest.v1+protobuf"
"""Content type of a manifest artifact (the one stored under the model's own version)."""
MAX_PARTS = 4096
"""Most parts one model version may have (ONNX can keep one external file per tensor)."""
MAX_PART_NAME_LENGTH = 255
MAX_MANIFEST_SIZE = 1 << 20
"""Largest manifest plaintext accepted (bytes); 4096 parts with long names need about 1.3 MB less."""
PART_VERSION_MARK = "+part."
"""Part ``i`` of version ``v`` is stored as version ``v+part.i`` of the same model name."""

_SEGMENT = r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*"
_PART_NAME = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")


class ManifestLayout(enum.IntEnum):
    """How the parts make up the model (``strongroom.api.artifact.v1.ManifestLayout``)."""

    UNSPECIFIED = 0
    ONNX_EXTERNAL_DATA = 1
    """Part 0 is the ONNX graph; the others are its external-data files, by ``location``."""
    FILES = 2
    """Named files (e.g. safetensors shards) for the consumer's own runtime."""


class ManifestMismatch(DataLoss):
    """The manifest is not the one for the requested model version (or not a manifest at all)."""

    default_reason = Reason.MANIFEST_MISMATCH


class PartMismatch(DataLoss):
    """A part is not the one its manifest names at that position (swapped, reordered, mixed)."""

    default_reason = Reason.PART_MISMATCH


class PartMissing(DataLoss):
    """A part the authenticated manifest lists is missing from the store (dropped)."""

    default_reason = Reason.PART_MISSING


def _invalid(reason: str, message: str) -> InvalidArtifact:
    return InvalidArtifact(message, reason=reason)


def validate_part_name(name: str) -> str:
    """Returns ``name`` if it is a valid part name, else raises InvalidArtifact(INVALID_PART_NAME).

    A relative path of ``/``-separated segments of ``[A-Za-z0-9._+-]`` that do not start with a
    dot (so no ``.``, ``..`` or hidden segment), at most 255 ASCII characters: what ONNX writes as
    an external-data ``location`` and what a shard's file name looks like, and nothing that could
    name a file outside the model's own folder.
    """
    if not name or len(name) > MAX_PART_NAME_LENGTH:
        raise _invalid(
            Reason.INVALID_PART_NAME, f"part names must be 1-{MAX_PART_NAME_LENGTH} characters"
        )
    if not name.isascii() or not _PART_NAME.fullmatch(name):
        raise _invalid(
            Reason.INVALID_PART_NAME,
            f"part name {name[:64]!r} must be '/'-separated segments of letters, digits, '.', '_', "
            "'+' or '-', none starting with '.'",
        )
    return name


def part_version(model_version: str, index: int) -> str:
    """The store version under which part ``index`` of ``model_version`` is kept.

    Raises InvalidArgument(INVALID_MODEL_VERSION) when the result would exceed the version grammar's
    64 characters (so the model version is too long to have parts).
    """
    if not 0 <= index < MAX_PARTS:
        raise _invalid(Reason.TOO_MANY_PARTS, f"part index must be below {MAX_PARTS}")
    return validate_version(f"{validate_version(model_version)}{PART_VERSION_MARK}{index}")


def header_digest(header: ArtifactHeader) -> bytes:
    """SHA-256 of an artifact's authenticated header bytes (its C2SP context)."""
    return hashlib.sha256(header.context).digest()


def is_manifest(content_type: str) -> bool:
    """Whether an artifact (as its header or the store's record claims) holds a manifest."""
    return content_type == MANIFEST_CONTENT_TYPE


@dataclass(frozen=True)
class ManifestPart:
    """One part as the manifest binds it; ``index`` is its position (0-based)."""

    index: int
    name: str
    content_type: str
    plaintext_size: int
    plaintext_sha256: bytes
    header_sha256: bytes


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the model it belongs to, its layout and its parts in order."""

    model_name: str
    model_version: str
    layout: ManifestLayout
    parts: tuple[ManifestPart, ...]

    def __repr__(self) -> str:
        return (
            f"Manifest(model_name={self.model_name!r}, model_version={self.model_version!r}, "
            f"layout={self.layout.name}, parts={len(self.parts)}, total_size={self.total_size})"
        )

    @property
    def total_size(self) -> int:
        """Sum of the parts' plaintext sizes."""
        return sum(p.plaintext_size for p in self.parts)

    def store_version(self, index: int) -> str:
        """The store version of part ``index``."""
        return part_version(self.model_version, index)

    def part(self, name: str) -> ManifestPart:
        """The part called ``name``; raises KeyError if there is none."""
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(name)

    def encode(self) -> bytes:
        """The canonical protobuf encoding (the manifest artifact's plaintext)."""
        msg = manifest_pb2.ModelManifest(
            model_name=self.model_name,
            model_version=self.model_version,
            layout=manifest_pb2.ManifestLayout.ValueType(int(self.layout)),
            parts=[
                manifest_pb2.ManifestPart(
                    name=p.name,
                    content_type=p.content_type,
                    plaintext_size=p.plaintext_size,
                    plaintext_sha256=p.plaintext_sha256,
                    header_sha256=p.header_sha256,
                )
                for p in self.parts
            ],
        )
        return msg.SerializeToString(deterministic=True)


def _check_media_type(value: str) -> None:
    if not value or len(value) > MAX_CONTENT_TYPE_LENGTH or not _MEDIA_TYPE.fullmatch(value):
        raise _invalid(Reason.INVALID_CONTENT_TYPE, "part content type is not a valid media type")


def _validated(
    model_name: str,
    model_version: str,
    layout: int,
    parts: Sequence[tuple[str, str, int, bytes, bytes]],
) -> Manifest:
    try:
        validate_name(model_name)
        validate_version(model_version)
    except Exception as exc:  # InvalidArgument: report it as a malformed manifest
        raise _invalid(Reason.MALFORMED_MANIFEST, f"manifest model name/version: {exc}") from None
    if layout not in (ManifestLayout.ONNX_EXTERNAL_DATA, ManifestLayout.FILES):
        raise _invalid(Reason.UNSUPPORTED_MANIFEST_LAYOUT, "the manifest layout is not supported")
    if not 1 <= len(parts) <= MAX_PARTS:
        raise _invalid(Reason.TOO_MANY_PARTS, f"a manifest lists 1 to {MAX_PARTS} parts")
    # Every part must have a store version within the version grammar.
    try:
        part_version(model_version, len(parts) - 1)
    except Exception:
        raise _invalid(
            Reason.INVALID_MODEL_VERSION,
            "the model version is too long for its parts' store versions",
        ) from None
    seen: set[str] = set()
    out = []
    for index, (name, content_type, size, plain_digest, head_digest) in enumerate(parts):
        validate_part_name(name)
        if name in seen:
            raise _invalid(Reason.DUPLICATE_PART_NAME, f"part name {name!r} appears twice")
        seen.add(name)
        _check_media_type(content_type)
        if not 0 <= size <= MAX_PLAINTEXT_SIZE:
            raise _invalid(Reason.PLAINTEXT_TOO_LARGE, f"part {name!r} is too large")
        if len(plain_digest) != DIGEST_SIZE or len(head_digest) != DIGEST_SIZE:
            raise _invalid(Reason.INVALID_PART_DIGEST, f"part {name!r} digests must be 32 bytes")
        out.append(
            ManifestPart(index, name, content_type, size, bytes(plain_digest), bytes(head_digest))
        )
    return Manifest(model_name, model_version, ManifestLayout(layout), tuple(out))


def build_manifest(
    *,
    model_name: str,
    model_version: str,
    layout: ManifestLayout,
    parts: Sequence[tuple[str, str, int, bytes, bytes]],
) -> Manifest:
    """Builds and validates a manifest; ``parts`` are (name, content type, plaintext size,
    plaintext SHA-256, header SHA-256) in order. Raises InvalidArtifact for any rule broken."""
    manifest = _validated(model_name, model_version, int(layout), parts)
    if len(manifest.encode()) > MAX_MANIFEST_SIZE:
        raise _invalid(Reason.MANIFEST_TOO_LARGE, f"the manifest exceeds {MAX_MANIFEST_SIZE} bytes")
    return manifest


def parse_manifest(data: bytes | bytearray | memoryview, *, header: ArtifactHeader) -> Manifest:
    """Parses the decrypted plaintext of a manifest artifact whose (authenticated) header is
    ``header``.

    ``header`` must be a manifest's (content type) and name the same model version as the manifest
    inside, else ManifestMismatch (DATA_LOSS). A manifest that is not canonical, has unknown
    fields or breaks a limit is InvalidArtifact (MALFORMED_MANIFEST or the rule's reason).
    """
    if not is_manifest(header.content_type):
        raise ManifestMismatch(
            f"{header.model_name}/{header.model_version} is not a multi-part manifest"
        )
    raw = bytes(data)
    if len(raw) > MAX_MANIFEST_SIZE:
        raise _invalid(Reason.MANIFEST_TOO_LARGE, f"the manifest exceeds {MAX_MANIFEST_SIZE} bytes")
    msg = manifest_pb2.ModelManifest()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        raise _invalid(Reason.MALFORMED_MANIFEST, "the manifest is not a valid protobuf") from None
    reencoded = msg.SerializeToString(deterministic=True)
    msg.DiscardUnknownFields()  # type: ignore[attr-defined]
    if msg.SerializeToString(deterministic=True) != reencoded or reencoded != raw:
        raise _invalid(Reason.MALFORMED_MANIFEST, "the manifest is not in canonical encoding")
    manifest = _validated(
        msg.model_name,
        msg.model_version,
        msg.layout,
        [
            (p.name, p.content_type, p.plaintext_size, p.plaintext_sha256, p.header_sha256)
            for p in msg.parts
        ],
    )
    if (manifest.model_name, manifest.model_version) != (header.model_name, header.model_version):
        raise ManifestMismatch("the manifest belongs to another model version than its artifact")
    return manifest


def check_part_header(manifest: Manifest, index: int, header: ArtifactHeader) -> ManifestPart:
    """Checks a part artifact's (not yet authenticated) header against manifest entry ``index``.

    Called as soon as the header arrives, before any of the part's bytes are decrypted: the
    header must be exactly the one the manifest bound (name, store version, size, ...; not a
    format-2 key slot, which the context leaves out). Raises PartMismatch (DATA_LOSS) otherwise.
    The body then authenticates under this header and the manifest's data key: that, not this
    check, refuses a part with the same header bytes written under another key.
    """
    part = manifest.parts[index]
    if (
        header.model_name != manifest.model_name
        or header.model_version != manifest.store_version(index)
        or header.plaintext_size != part.plaintext_size
        or not hmac.compare_digest(header_digest(header), part.header_sha256)
    ):
        raise PartMismatch(
            f"part {index} ({part.name!r}) of {manifest.model_name}/{manifest.model_version} "
            "is not the part its manifest names"
        )
    return part


def check_part_digest(part: ManifestPart, authenticated_digest: bytes) -> None:
    """Checks a decrypted part's authenticated plaintext SHA-256 against its manifest entry."""
    if not hmac.compare_digest(bytes(authenticated_digest), part.plaintext_sha256):
        raise PartMismatch(
            f"part {part.index} ({part.name!r}) has other contents than its manifest names"
        )
