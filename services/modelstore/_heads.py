"""The one check that a stored blob is its index entry's model, shared by every path that reads
a blob for an entry: downloads and verification (both backends) and key-slot re-wraps (an S3
delete reads the same binding to decide whether it may delete the blob, and keeps it if not).

An index entry names its blob (a filesystem row by digest, an S3 record by key), and whoever can
write the storage volume or the bucket can point one entry at another model's blob, with that
blob's digest and sizes, so that nothing in the entry tells the two apart. The blob's own header
names its model (the upload checked that and recorded it), so the binding is read there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TypeVar

from strongroom.artifact import ArtifactHeader, InvalidArtifact, parse_header
from strongroom.modelstore.errors import StoredDataCorrupt
from strongroom.modelstore.records import ModelRecord
from strongroom.reasons import Reason

log = logging.getLogger(__name__)


def check_model(name: str, version: str, header: ArtifactHeader, *, blob: str) -> None:
    """``StoredDataCorrupt(BLOB_OF_ANOTHER_MODEL)``, logged, unless ``header`` (parsed from the
    blob ``blob`` that the index entry of ``name`` ``version`` names) names that model."""
    if (header.model_name, header.model_version) == (name, version):
        return
    log.error(
        "index entry of %s %s names blob %s, an artifact of %s %s: refused",
        name,
        version,
        blob,
        header.model_name,
        header.model_version,
    )
    # Which model, only in the log: the caller may read this name but not the other's (a
    # publisher scoped to its own tenant), and the answer must not tell it what else is stored.
    raise StoredDataCorrupt(
        f"the index entry of {name} {version} names another model's artifact: refused, nothing "
        "was changed (the store's log names the artifact)",
        reason=Reason.BLOB_OF_ANOTHER_MODEL,
    )


def stored_header(record: ModelRecord, head: bytes | bytearray | memoryview) -> ArtifactHeader:
    """The header of ``record``'s stored artifact, from its first bytes ``head`` (at least
    ``record.header_size`` of them; any after are ignored), checked against the record.

    ``StoredDataCorrupt``: HEADER_CORRUPT if it does not parse or its size is not the recorded
    one, BLOB_OF_ANOTHER_MODEL (:func:`check_model`) if it names another model."""
    try:
        header = parse_header(memoryview(head)[: record.header_size])
    except InvalidArtifact as exc:
        log.error(
            "the header of the stored artifact of %s %s does not parse: %s",
            record.name,
            record.version,
            exc.reason,
        )
        raise StoredDataCorrupt(
            f"stored artifact {record.name} {record.version} has an unreadable header",
            reason=Reason.HEADER_CORRUPT,
        ) from None
    check_model(record.name, record.version, header, blob=record.artifact_sha256)
    if header.header_size != record.header_size:
        log.error("the header of %s %s disagrees with its record", record.name, record.version)
        raise StoredDataCorrupt(
            f"stored artifact {record.name} {record.version} disagrees with its record",
            reason=Reason.HEADER_CORRUPT,
        )
    return header


Piece = TypeVar("Piece", bytes, memoryview)


def head_checked(record: ModelRecord, chunks: Iterator[Piece]) -> Iterator[Piece]:
    """``chunks``, a read of ``record``'s artifact from its first byte to at least the end of its
    head, with nothing handed out before the head has arrived and :func:`stored_header` has
    accepted it: the check costs no read of its own (a download's first chunk, 512 KiB, holds
    every head whole; a smaller chunk size holds the first few back)."""
    held: list[Piece] = []
    received = 0
    for data in chunks:
        held.append(data)
        received += len(data)
        if received >= record.header_size:
            break
    stored_header(record, held[0] if len(held) == 1 else b"".join(held))
    yield from held
    yield from chunks
