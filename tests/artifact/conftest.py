"""Fixtures for the artifact tests: data keys, headers and ready-made artifacts (real crypto only)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from strongroom.artifact import (
    ArtifactHeader,
    InvalidArtifact,
    build_header,
    encrypt_bytes,
    parse_header,
)

CHUNK = 16384
"""The C2SP chunk size, spelled out so tests do not depend on the code under test for it."""

_FORMAT = {"version": 1}
"""The format version :func:`header_for` builds, set per module by the ``artifact_format`` fixture."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Runs every test module once per format version it declares in ``FORMATS`` (default: 1, and
    3, the one written; format 2, the same layout as 3, has its own module)."""
    if "artifact_format" in metafunc.fixturenames:
        versions = getattr(metafunc.module, "FORMATS", (1, 3))
        metafunc.parametrize(
            "artifact_format",
            versions,
            indirect=True,
            scope="module",
            ids=[f"v{v}" for v in versions],
        )


@pytest.fixture(scope="module", autouse=True)
def artifact_format(request: pytest.FixtureRequest) -> Iterator[int]:
    """The artifact format version under test (1: wrapped key bound into the body; 2, 3: key slot)."""
    _FORMAT["version"] = request.param
    yield request.param
    _FORMAT["version"] = 1


def kek(version: int) -> bytes:
    """A test KEK per version (an HSM's AES-256 KEK versions, here as plain bytes)."""
    return hashlib.sha256(b"strongroom test KEK v%d" % version).digest()


def wrap(dek: bytes | bytearray, version: int = 3) -> bytes:
    """AES-KWP wrap of ``dek`` under test KEK ``version`` (what the broker's HSM does)."""
    return aes_key_wrap_with_padding(kek(version), bytes(dek))


def unwrap_for(artifact: bytes | bytearray) -> bytearray | None:
    """The data key a broker would hand out for this artifact's key slot, or None if it refuses.

    Models the HSM: the slot names the KEK version; AES-KWP unwrap under it either fails its
    integrity check or yields *some* key. A malformed head is refused before any unwrap.
    """
    try:
        header = parse_header(artifact)
    except InvalidArtifact:
        return None
    if not 1 <= header.key_version <= 8:
        return None
    try:
        return bytearray(aes_key_unwrap_with_padding(kek(header.key_version), header.wrapped_dek))
    except InvalidUnwrap:
        return None


def header_for(size: int, **overrides: Any) -> ArtifactHeader:
    """A valid header for a plaintext of ``size`` bytes, with any field overridden."""
    fields: dict[str, Any] = {
        "format_version": _FORMAT["version"],
        "model_name": "acme/fraud-detector",
        "model_version": "1.4.0",
        "content_type": "application/vnd.onnx",
        "key_id": "models-kek",
        "key_version": 3,
        "wrapped_dek": bytes(range(40)),
        "plaintext_size": size,
        "created_at": datetime(2025, 11, 25, 17, 0, 0, 123456, tzinfo=UTC),
    }
    fields.update(overrides)
    return build_header(**fields)


@pytest.fixture
def dek() -> bytearray:
    """A fresh random AES-256 data key."""
    return bytearray(os.urandom(32))


@pytest.fixture
def make_artifact(dek: bytearray) -> Callable[..., tuple[bytes, bytes]]:
    """Returns ``make(size, **header_overrides) -> (plaintext, artifact)`` under the ``dek`` fixture."""

    def make(size: int, **overrides: Any) -> tuple[bytes, bytes]:
        plaintext = os.urandom(size)
        return plaintext, encrypt_bytes(plaintext, dek, header=header_for(size, **overrides))

    return make
