"""Real artifacts for the store's tests and benchmarks, built by ``strongroom.artifact``'s writer.

The store never holds a key, so each artifact is encrypted under a data key made up here and
carries a made-up wrapped-key blob: the structure is exactly what production uploads, and the store
(keyless by design) cannot tell the difference. Tests that need to decrypt build their own key
(see ``test_real_artifacts.py``). The key, wrapped blob and salt derive from the arguments, so
equal arguments give equal bytes (as a re-upload of one file does) and different ones differ.
"""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime
from typing import Any

from strongroom.api.artifact.v1 import header_pb2
from strongroom.artifact import ArtifactHeader, build_header, encrypt_bytes
from strongroom.artifact.format import FORMAT_VERSION

CREATED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
"""``created_at`` of every artifact unless a test passes its own."""

CONTENT_TYPE = "application/onnx"
KEY_ID = "kek-test"
KEY_VERSION = 3

_PREFIX = struct.Struct(">8sII")  # magic, format version, header length (ARTIFACT_FORMAT.md)


def _derive(label: bytes, size: int, *parts: bytes) -> bytes:
    return hashlib.shake_256(b"\0".join((label, *parts))).digest(size)


def header(
    name: str,
    version: str,
    plaintext_size: int,
    *,
    seed: bytes = b"",
    created_at: datetime | None = None,
    key_id: str = KEY_ID,
    key_version: int = KEY_VERSION,
    content_type: str = CONTENT_TYPE,
    format_version: int = FORMAT_VERSION,
) -> ArtifactHeader:
    """A valid header (current format unless told, so with a key slot) for ``plaintext_size``
    bytes."""
    return build_header(
        model_name=name,
        model_version=version,
        content_type=content_type,
        key_id=key_id,
        key_version=key_version,
        wrapped_dek=_derive(
            b"wrapped", 40, name.encode(), version.encode(), seed
        ),  # never unwrapped
        plaintext_size=plaintext_size,
        created_at=created_at or CREATED,
        format_version=format_version,
    )


def make_artifact(
    name: str,
    version: str,
    payload: bytes,
    *,
    created_at: datetime | None = None,
    key_id: str = KEY_ID,
    key_version: int = KEY_VERSION,
    content_type: str = CONTENT_TYPE,
    format_version: int = FORMAT_VERSION,
) -> bytes:
    """A real artifact of model ``name`` ``version`` whose plaintext is ``payload`` (in format
    ``format_version``: the store cannot tell how its body key was derived, only the header)."""
    seed = hashlib.sha256(payload).digest()
    head = header(
        name,
        version,
        len(payload),
        seed=seed,
        created_at=created_at,
        key_id=key_id,
        key_version=key_version,
        content_type=content_type,
        format_version=format_version,
    )
    key = bytearray(_derive(b"dek", 32, name.encode(), version.encode(), seed))
    salt = _derive(b"salt", 24, name.encode(), version.encode(), seed)
    return encrypt_bytes(payload, key, header=head, salt=salt)


def artifact_header(
    name: str, version: str, plaintext_size: int, **options: Any
) -> tuple[bytes, int]:
    """``(head, follow)``: the bytes before the body, and how many bytes must follow them.

    For benchmarks that stream filler instead of ciphertext: the store validates structure only
    (canonical header, exact length), so ``head`` plus any ``follow`` bytes is accepted as it is.
    """
    h = header(name, version, plaintext_size, **options)
    return h.head, h.artifact_size - h.header_size


def fit(name: str, version: str, artifact_size: int) -> int:
    """The largest plaintext size whose artifact is at most ``artifact_size`` bytes long."""
    low, high = 0, artifact_size
    while low < high:  # artifact size grows with the plaintext size: bisect
        mid = (low + high + 1) // 2
        head, follow = artifact_header(name, version, mid)
        if len(head) + follow <= artifact_size:
            low = mid
        else:
            high = mid - 1
    return low


def with_header(artifact: bytes, **fields: Any) -> bytes:
    """``artifact`` with header fields replaced (re-encoded, length fixed), everything else kept.

    Builds what the writer refuses to (e.g. an invalid model name), to show that the store's
    validator rejects it; the body no longer matches, which a keyless store cannot see.
    """
    magic, fmt, length = _PREFIX.unpack_from(artifact)
    msg = header_pb2.ArtifactHeader.FromString(artifact[_PREFIX.size : _PREFIX.size + length])
    for field, value in fields.items():
        setattr(msg, field, value)
    raw = msg.SerializeToString(deterministic=True)
    return _PREFIX.pack(magic, fmt, len(raw)) + raw + artifact[_PREFIX.size + length :]


def chunked(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """``data`` cut into ``size``-byte pieces."""
    return [data[i : i + size] for i in range(0, len(data), size)]
