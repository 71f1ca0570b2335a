"""A tiny stand-in artifact format and validator for storage and servicer tests.

It has the shape the store relies on (a header naming the model, then a body of a declared size)
without any cryptography; tests with the real ``strongroom.artifact`` format live in
``test_real_artifacts.py``. Layout: ``FAKEART1`` + 4-byte big-endian header length +
JSON header + body.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from datetime import UTC, datetime
from typing import Any

from strongroom.errors import InvalidArgument

MAGIC = b"FAKEART1"
_PREFIX = len(MAGIC) + 4
_MAX_HEADER = 64 * 1024


@dataclasses.dataclass(frozen=True)
class FakeSummary:
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


def artifact_header(
    name: str,
    version: str,
    body_size: int,
    *,
    plaintext_sha256: str = "0" * 64,
    created_at: datetime | None = None,
    key_id: str = "kek-test",
    key_version: int = 3,
) -> bytes:
    """The header of a fake artifact whose body of ``body_size`` bytes follows it."""
    created = created_at or datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    header = json.dumps(
        {
            "name": name,
            "version": version,
            "content_type": "application/onnx",
            "key_id": key_id,
            "key_version": key_version,
            "plaintext_size": body_size,
            "plaintext_sha256": plaintext_sha256,
            "created_at": created.isoformat(),
            "body_size": body_size,
        }
    ).encode()
    return MAGIC + struct.pack(">I", len(header)) + header


def make_artifact(
    name: str,
    version: str,
    body: bytes,
    *,
    created_at: datetime | None = None,
    key_id: str = "kek-test",
    key_version: int = 3,
) -> bytes:
    """A valid fake artifact carrying ``body``."""
    header = artifact_header(
        name,
        version,
        len(body),
        plaintext_sha256=hashlib.sha256(body).hexdigest(),
        created_at=created_at,
        key_id=key_id,
        key_version=key_version,
    )
    return header + body


class FakeValidator:
    """Incremental validator for the fake format; knows the identity once the header is in."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: dict[str, Any] | None = None
        self._header_size = 0
        self._body_seen = 0
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        if self._header is None:
            self._buffer += data
            if len(self._buffer) >= len(MAGIC) and self._buffer[: len(MAGIC)] != MAGIC:
                raise InvalidArgument("not an artifact", reason="BAD_MAGIC")
            if len(self._buffer) < _PREFIX:
                return
            (hlen,) = struct.unpack(">I", self._buffer[len(MAGIC) : _PREFIX])
            if hlen > _MAX_HEADER:
                raise InvalidArgument("header too large", reason="BAD_HEADER")
            if len(self._buffer) < _PREFIX + hlen:
                return
            try:
                self._header = json.loads(bytes(self._buffer[_PREFIX : _PREFIX + hlen]))
            except ValueError:
                raise InvalidArgument("header is not JSON", reason="BAD_HEADER") from None
            self._header_size = _PREFIX + hlen
            data = bytes(self._buffer[_PREFIX + hlen :])
            self._buffer.clear()
        self._body_seen += len(data)
        assert self._header is not None
        if self._body_seen > int(self._header["body_size"]):
            raise InvalidArgument("more data than the header declares", reason="TRAILING_DATA")

    def identity(self) -> tuple[str, str] | None:
        if self._header is None:
            return None
        return str(self._header["name"]), str(self._header["version"])

    def finish(self) -> FakeSummary:
        if self._header is None:
            raise InvalidArgument("artifact ends inside its header", reason="TRUNCATED")
        h = self._header
        if self._body_seen != h["body_size"]:
            raise InvalidArgument("artifact is truncated", reason="TRUNCATED")
        return FakeSummary(
            name=str(h["name"]),
            version=str(h["version"]),
            content_type=str(h["content_type"]),
            key_id=str(h["key_id"]),
            key_version=int(h["key_version"]),
            plaintext_size=int(h["plaintext_size"]),
            plaintext_sha256=str(h["plaintext_sha256"]),
            created_at=datetime.fromisoformat(str(h["created_at"])),
            header_size=self._header_size,
            artifact_size=self._header_size + self._body_seen,
        )


class LateValidator:
    """The fake validator without ``identity()``: the store learns the name only at the end."""

    def __init__(self) -> None:
        self._inner = FakeValidator()

    def feed(self, data: bytes) -> None:
        self._inner.feed(data)

    def finish(self) -> FakeSummary:
        return self._inner.finish()


class OpaqueValidator:
    """Accepts any bytes and names them ``name``/``version`` (to exercise shared blobs)."""

    def __init__(self, name: str, version: str) -> None:
        self._name, self._version, self._size = name, version, 0

    def feed(self, data: bytes) -> None:
        self._size += len(data)

    def finish(self) -> FakeSummary:
        return FakeSummary(
            name=self._name,
            version=self._version,
            content_type="application/octet-stream",
            key_id="k",
            key_version=1,
            plaintext_size=0,
            plaintext_sha256="0" * 64,
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            header_size=0,
            artifact_size=self._size,
        )


def chunked(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """``data`` cut into ``size``-byte pieces."""
    return [data[i : i + size] for i in range(0, len(data), size)]
