"""Typed values the storage layer returns: a stored model's record, a page of them, upload claims."""

from __future__ import annotations

import dataclasses
from datetime import datetime


@dataclasses.dataclass(frozen=True, slots=True)
class ModelRecord:
    """What the store knows about one stored artifact (the header fields come from its validator)."""

    name: str
    version: str
    artifact_sha256: str
    """Lower-case hex SHA-256 of the whole artifact as stored."""
    artifact_size: int
    plaintext_size: int
    plaintext_sha256: str
    content_type: str
    key_id: str
    key_version: int
    header_size: int
    created_at: datetime
    """When the publisher created the artifact (from its header), timezone-aware UTC."""
    stored_at: datetime
    """When the store committed it, timezone-aware UTC."""
    artifact_format: int = 0
    """The artifact's format version, from its header (1 and 2 do not bind the data key to the
    model; 3 does); 0: not known (an S3 index record written before the store recorded it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelPage:
    """One page of a listing; ``next_page_token`` is empty on the last page."""

    models: tuple[ModelRecord, ...]
    next_page_token: str


@dataclasses.dataclass(slots=True)
class UploadClaims:
    """What the client says about the artifact it is uploading; both fields are optional.

    The storage reads ``size`` after every chunk (to fail fast) and both fields once more after the
    last chunk, so a transport adapter may fill them in while the chunk iterator is consumed (a
    digest that arrives with the last message is still checked).
    """

    size: int | None = None
    sha256: str | None = None
