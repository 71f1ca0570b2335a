"""Fixtures for the artifact tests: data keys, headers and ready-made artifacts (real crypto only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from strongroom.artifact import ArtifactHeader, build_header, encrypt_bytes

CHUNK = 16384
"""The C2SP chunk size, spelled out so tests do not depend on the code under test for it."""


def header_for(size: int, **overrides: Any) -> ArtifactHeader:
    """A valid header for a plaintext of ``size`` bytes, with any field overridden."""
    fields: dict[str, Any] = {
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
