"""Deterministic real artifacts for the key-slot tests (shared with the crash worker).

Each model's data key is wrapped with AES-KWP under a test KEK per version, as the broker's HSM
does; :func:`decrypt_stored` plays the reader: unwrap the slot under the version it names, decrypt.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from strongroom.artifact import ArtifactReader, build_header, encrypt_bytes, parse_header

KEY_ID = "models-kek"


def kek(version: int) -> bytes:
    """Test KEK ``version`` (32 bytes)."""
    return hashlib.sha256(b"modelstore test KEK v%d" % version).digest()


def dek_of(name: str, version: str) -> bytes:
    """The model's data key (deterministic, so a worker process and the test agree)."""
    return hashlib.sha256(f"dek {name} {version}".encode()).digest()


def plaintext_of(name: str, version: str, size: int) -> bytes:
    """The model's plaintext."""
    return hashlib.shake_256(f"plain {name} {version}".encode()).digest(size)


def wrapped(name: str, version: str, kek_version: int) -> bytes:
    """The model's data key wrapped under KEK ``kek_version``."""
    return aes_key_wrap_with_padding(kek(kek_version), dek_of(name, version))


def artifact(name: str, version: str, size: int = 100_000, *, format_version: int = 2) -> bytes:
    """A real artifact, its data key wrapped under KEK version 1."""
    header = build_header(
        model_name=name,
        model_version=version,
        content_type="application/vnd.onnx",
        key_id=KEY_ID,
        key_version=1,
        wrapped_dek=wrapped(name, version, 1),
        plaintext_size=size,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        format_version=format_version,
    )
    salt = hashlib.sha256(f"salt {name} {version}".encode()).digest()[:24]
    return encrypt_bytes(
        plaintext_of(name, version, size),
        bytearray(dek_of(name, version)),
        header=header,
        salt=salt,
    )


def decrypt_stored(data: bytes) -> bytes:
    """What an attested reader gets: unwrap the slot under the KEK version it names, decrypt."""
    header = parse_header(data)
    dek = bytearray(aes_key_unwrap_with_padding(kek(header.key_version), header.wrapped_dek))
    return bytes(ArtifactReader(data).decrypt_all(dek))
