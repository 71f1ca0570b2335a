"""The multi-part manifest: canonical encoding, limits, and its binding to parts and version."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime

import pytest

from strongroom.api.artifact.v1 import manifest_pb2
from strongroom.artifact import ArtifactReader, DecryptionFailed, build_header, encrypt_bytes
from strongroom.artifact.errors import InvalidArtifact
from strongroom.artifact.format import ArtifactHeader
from strongroom.artifact.manifest import (
    MANIFEST_CONTENT_TYPE,
    MAX_PARTS,
    Manifest,
    ManifestLayout,
    ManifestMismatch,
    PartMismatch,
    build_manifest,
    check_part_digest,
    check_part_header,
    header_digest,
    parse_manifest,
    part_version,
    validate_part_name,
)
from strongroom.errors import InvalidArgument

WRAPPED = bytes(40)


def header(
    version: str, size: int, content_type: str = "application/octet-stream"
) -> ArtifactHeader:
    return build_header(
        model_name="acme/big",
        model_version=version,
        content_type=content_type,
        key_id="kek",
        key_version=1,
        wrapped_dek=WRAPPED,
        plaintext_size=size,
    )


def manifest_for(parts: list[ArtifactHeader], version: str = "1") -> Manifest:
    return build_manifest(
        model_name="acme/big",
        model_version=version,
        layout=ManifestLayout.ONNX_EXTERNAL_DATA,
        parts=[
            (
                f"p{i}",
                h.content_type,
                h.plaintext_size,
                hashlib.sha256(b"%d" % i).digest(),
                header_digest(h),
            )
            for i, h in enumerate(parts)
        ],
    )


def manifest_header(size: int, version: str = "1") -> ArtifactHeader:
    return header(version, size, MANIFEST_CONTENT_TYPE)


def test_round_trip_and_part_versions() -> None:
    parts = [header(part_version("1", i), 10 + i) for i in range(3)]
    manifest = manifest_for(parts)
    encoded = manifest.encode()
    parsed = parse_manifest(encoded, header=manifest_header(len(encoded)))
    assert parsed == manifest
    assert [manifest.store_version(i) for i in range(3)] == ["1+part.0", "1+part.1", "1+part.2"]
    assert manifest.total_size == 33
    assert "p0" in repr(manifest) or "parts=3" in repr(manifest)
    for i, h in enumerate(parts):
        assert check_part_header(manifest, i, h) is manifest.parts[i]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda parts: [parts[1], parts[0], parts[2]], "reordered"),
        (lambda parts: [parts[0], parts[0], parts[2]], "duplicated"),
        (
            lambda parts: [parts[0], header("1+part.1", 11, "application/x-other"), parts[2]],
            "swapped",
        ),
        (lambda parts: [parts[0], header("2+part.1", 11), parts[2]], "other version"),
        (lambda parts: [parts[0], header("1+part.1", 11), parts[2]], "same fields, other header"),
    ],
)
def test_a_part_that_is_not_the_bound_one_is_refused(mutate: object, why: str) -> None:
    parts = [header(part_version("1", i), 10 + i) for i in range(3)]
    manifest = manifest_for(parts)
    served = mutate(parts)  # type: ignore[operator]
    refused = 0
    for i, h in enumerate(served):
        try:
            check_part_header(manifest, i, h)
        except PartMismatch as exc:
            assert exc.status_name == "DATA_LOSS" and exc.reason == "PART_MISMATCH"
            refused += 1
    assert refused >= 1, why


def test_the_part_digest_must_match() -> None:
    part = manifest_for([header("1+part.0", 1)]).parts[0]
    check_part_digest(part, hashlib.sha256(b"0").digest())
    with pytest.raises(PartMismatch):
        check_part_digest(part, hashlib.sha256(b"other").digest())


def test_a_manifest_under_another_versions_header_is_refused() -> None:
    encoded = manifest_for([header("1+part.0", 1)]).encode()
    with pytest.raises(ManifestMismatch) as info:
        parse_manifest(encoded, header=manifest_header(len(encoded), version="2"))
    assert info.value.status_name == "DATA_LOSS"
    with pytest.raises(ManifestMismatch):  # a plain artifact is not a manifest
        parse_manifest(encoded, header=header("1", len(encoded)))


def test_non_canonical_or_unknown_fields_are_malformed() -> None:
    encoded = manifest_for([header("1+part.0", 1)]).encode()
    for bad in (
        encoded + b"\x2a\x00",  # unknown field 5 (empty bytes)
        encoded + encoded[:2] + b"acme/big"[: encoded[1]],  # repeated scalar: not canonical
        b"\xff\xff",
    ):
        with pytest.raises(InvalidArtifact) as info:
            parse_manifest(bad, header=manifest_header(len(bad)))
        assert info.value.reason == "MALFORMED_MANIFEST"


def _raw(**fields: object) -> bytes:
    msg = manifest_pb2.ModelManifest(
        model_name="acme/big",
        model_version="1",
        layout=manifest_pb2.MANIFEST_LAYOUT_ONNX_EXTERNAL_DATA,
    )
    part = manifest_pb2.ManifestPart(
        name="a", content_type="application/octet-stream", plaintext_sha256=bytes(32),
        header_sha256=bytes(32),
    )  # fmt: skip
    two = bool(fields.pop("two_parts", False))
    for key, value in fields.items():
        target = part if key.startswith("part_") else msg
        setattr(target, key.removeprefix("part_"), value)
    msg.parts.append(part)
    if two:
        msg.parts.append(part)
    return msg.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"layout": 0}, "UNSUPPORTED_MANIFEST_LAYOUT"),
        ({"layout": 9}, "UNSUPPORTED_MANIFEST_LAYOUT"),
        ({"part_name": "../etc/passwd"}, "INVALID_PART_NAME"),
        ({"part_name": "/abs"}, "INVALID_PART_NAME"),
        ({"part_name": ".hidden"}, "INVALID_PART_NAME"),
        ({"part_name": "x" * 256}, "INVALID_PART_NAME"),
        ({"part_content_type": "Not A Type"}, "INVALID_CONTENT_TYPE"),
        ({"part_plaintext_sha256": bytes(31)}, "INVALID_PART_DIGEST"),
        ({"part_header_sha256": bytes(33)}, "INVALID_PART_DIGEST"),
        ({"part_plaintext_size": (1 << 40) + 1}, "PLAINTEXT_TOO_LARGE"),
        ({"two_parts": True}, "DUPLICATE_PART_NAME"),
    ],
)
def test_limits(fields: dict[str, object], reason: str) -> None:
    raw = _raw(**fields)
    with pytest.raises(InvalidArtifact) as info:
        parse_manifest(raw, header=manifest_header(len(raw)))
    assert info.value.reason == reason


def test_no_parts_or_too_many_parts() -> None:
    with pytest.raises(InvalidArtifact) as info:
        build_manifest(
            model_name="acme/big", model_version="1", layout=ManifestLayout.FILES, parts=[]
        )
    assert info.value.reason == "TOO_MANY_PARTS"
    many = [
        (f"p{i}", "application/octet-stream", 0, bytes(32), bytes(32)) for i in range(MAX_PARTS + 1)
    ]
    with pytest.raises(InvalidArtifact) as info:
        build_manifest(
            model_name="acme/big", model_version="1", layout=ManifestLayout.FILES, parts=many
        )
    assert info.value.reason == "TOO_MANY_PARTS"


def test_a_version_too_long_for_part_versions() -> None:
    with pytest.raises(InvalidArgument) as info:
        part_version("v" * 60, 1)
    assert info.value.reason == "INVALID_MODEL_VERSION"
    with pytest.raises(InvalidArtifact) as info2:
        build_manifest(
            model_name="acme/big", model_version="v" * 60, layout=ManifestLayout.FILES,
            parts=[("a", "application/octet-stream", 0, bytes(32), bytes(32))],
        )  # fmt: skip
    assert info2.value.reason == "INVALID_MODEL_VERSION"


@pytest.mark.parametrize(
    "name", ["model.onnx", "weights/layer.0.bin", "model-00001-of-00002.safetensors", "a+b_c-d"]
)
def test_valid_part_names(name: str) -> None:
    assert validate_part_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/../b", "a//b", "a/", "é", "a b", "a\\b"])
def test_invalid_part_names(name: str) -> None:
    with pytest.raises(InvalidArtifact):
        validate_part_name(name)


def test_the_manifest_size_does_not_depend_on_the_digests() -> None:
    """The publisher builds the manifest's header before it knows the digests."""
    parts = [header(part_version("1", i), 5) for i in range(4)]
    zero = manifest_for(parts).encode()
    real = build_manifest(
        model_name="acme/big", model_version="1", layout=ManifestLayout.ONNX_EXTERNAL_DATA,
        parts=[(f"p{i}", h.content_type, 5, os.urandom(32), header_digest(h)) for i, h in enumerate(parts)],
    ).encode()  # fmt: skip
    assert len(zero) == len(real)


def test_the_header_digest_covers_the_context_not_the_slot_or_the_salt() -> None:
    # What the manifest's header_sha256 binds is the part's C2SP context. A format-2 part
    # re-wrapped (other slot) or re-encrypted under another key with the same header fields keeps
    # its digest: check_part_header passes, and the body's commitment under the manifest's data
    # key is what refuses a part written under any other key.
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)  # one creation time for both

    def part(wrapped: bytes, fmt: int) -> ArtifactHeader:
        return build_header(
            model_name="acme/big",
            model_version="1+part.0",
            content_type="application/octet-stream",
            key_id="kek",
            key_version=1,
            wrapped_dek=wrapped,
            plaintext_size=5,
            created_at=when,
            format_version=fmt,
        )

    assert header_digest(part(bytes(40), 2)) == header_digest(part(b"\x01" * 40, 2))
    assert header_digest(part(bytes(40), 1)) != header_digest(part(b"\x01" * 40, 1))
    genuine = part(bytes(40), 2)
    manifest = manifest_for([genuine])
    key, other = bytearray(os.urandom(32)), bytearray(os.urandom(32))
    forged = encrypt_bytes(b"other", other, header=part(b"\x01" * 40, 2))
    served = ArtifactReader(forged)
    check_part_header(manifest, 0, served.header)  # same context: the digest matches
    with pytest.raises(DecryptionFailed):
        served.decrypt_all(key)  # the manifest's key: the commitment refuses it
