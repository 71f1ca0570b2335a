"""The interface the store needs from an artifact structure validator.

The store never interprets artifact bytes itself: a validator (in production
``strongroom.artifact.StructureValidator``) is fed every chunk, rejects a bad header or excess bytes
at once, and at the end returns a summary naming the model. Anything with this shape works.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable


class ArtifactSummaryLike(Protocol):
    """The header fields of a structurally valid artifact."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def content_type(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def key_version(self) -> int: ...
    @property
    def plaintext_size(self) -> int: ...
    @property
    def plaintext_sha256(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def header_size(self) -> int: ...
    @property
    def artifact_size(self) -> int: ...


class ArtifactValidator(Protocol):
    """Checks an artifact's structure incrementally.

    ``feed`` raises an ``InvalidArgument`` subclass as soon as the bytes cannot be a valid artifact;
    ``finish`` raises one if the artifact is incomplete, else returns its summary.
    """

    def feed(self, data: bytes, /) -> None: ...
    def finish(self) -> ArtifactSummaryLike: ...


@runtime_checkable
class EarlyIdentity(Protocol):
    """Optional: a validator that knows the model's name and version once the header is parsed.

    The store then reserves the name and version before the body arrives, so a losing concurrent
    upload (or a re-upload of an existing version) fails after the header, not after the last byte.
    """

    def identity(self) -> tuple[str, str] | None:
        """Returns ``(name, version)`` once the header has been parsed, else None."""
        ...


ValidatorFactory = Callable[[], ArtifactValidator]
"""Makes a fresh validator for each upload."""
