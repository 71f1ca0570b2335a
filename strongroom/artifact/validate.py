"""Keyless, incremental structure validation of an artifact stream (for the model store).

The store never holds a key, so it checks everything that can be checked without one: magic,
format version, a canonical header (and, in format 2, key slot) within every limit, and a total
length exactly equal to what the header implies. It fails on the first piece that makes the stream
invalid, so an upload can be aborted early, and it buffers at most the head (64 KiB header and 2 KiB
key slot) and the 32-byte footer.
"""

from __future__ import annotations

from strongroom.artifact.errors import ArtifactTooLarge, InvalidArtifact
from strongroom.artifact.format import (
    FOOTER_SIZE,
    ArtifactHeader,
    ArtifactSummary,
    HeadAccumulator,
)
from strongroom.reasons import Reason

__all__ = ["StructureValidator", "summarize"]


class StructureValidator:
    """Validates an artifact fed in pieces of any size: ``feed(data)`` repeatedly, then ``finish()``.

    ``max_artifact_size`` (optional) rejects, with ArtifactTooLarge, a header that declares a larger
    artifact, before any body byte is accepted. After any error the validator stays failed.
    """

    def __init__(self, *, max_artifact_size: int | None = None) -> None:
        self._max = max_artifact_size
        self._head = HeadAccumulator()
        self._header: ArtifactHeader | None = None
        self._seen = 0
        self._footer = bytearray()
        self._error: Exception | None = None

    @property
    def header(self) -> ArtifactHeader | None:
        """The parsed header once it has been received, else None."""
        return self._header

    def identity(self) -> tuple[str, str] | None:
        """(model name, version) once the header has been parsed, else None.

        A store uses it to reserve the version before the body arrives, so a duplicate upload
        fails after its first few KiB rather than after its last byte.
        """
        header = self._header
        return None if header is None else (header.model_name, header.model_version)

    @property
    def bytes_seen(self) -> int:
        """Total bytes fed so far."""
        return self._seen

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Checks the next bytes; raises InvalidArtifact (or ArtifactTooLarge) as soon as possible."""
        if self._error is not None:
            raise self._error
        # As bytes: a view of another format (array('H')) slices in items while the head's
        # reading steps in bytes, and never reached the header's end (a loop without end).
        view = memoryview(data).cast("B")
        try:
            self._feed(view)
        except (InvalidArtifact, ArtifactTooLarge) as exc:
            self._error = exc
            raise

    def _feed(self, view: memoryview) -> None:
        start = self._seen
        self._seen += view.nbytes
        if self._header is None:
            rest = self._head.take(view)
            start += view.nbytes - rest.nbytes
            view = rest
            self._header = self._head.header
            if self._header is None:
                return
            size = self._header.artifact_size
            if self._max is not None and size > self._max:
                raise ArtifactTooLarge(f"artifact of {size} bytes exceeds the limit of {self._max}")
        total = self._header.artifact_size
        if self._seen > total:
            raise InvalidArtifact(
                "artifact is longer than its header implies", reason=Reason.TRAILING_DATA
            )
        footer_start = total - FOOTER_SIZE
        if self._seen > footer_start:
            skip = max(footer_start - start, 0)
            self._footer += view[skip:]

    def finish(self) -> ArtifactSummary:
        """Declares the end of the stream; returns the summary if the length is exactly right."""
        if self._error is not None:
            raise self._error
        header = self._header
        if header is None or self._seen < header.artifact_size:
            self._error = InvalidArtifact(
                "artifact is shorter than its header implies", reason=Reason.TRUNCATED
            )
            raise self._error
        return ArtifactSummary.of(header, bytes(self._footer))


def summarize(data: bytes | bytearray | memoryview) -> ArtifactSummary:
    """Validates the structure of a complete artifact held in memory and returns its summary."""
    validator = StructureValidator()
    validator.feed(data)
    return validator.finish()
