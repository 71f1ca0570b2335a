"""The byte-range rules of ``Storage.open``, the same for every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from strongroom.errors import InvalidArgument
from strongroom.modelstore.errors import OutOfRange
from strongroom.reasons import Reason

Frame = Callable[[int], memoryview]
"""Makes room for the next ``n`` bytes of a range read: a writable view of exactly ``n`` bytes
(``RangeReader.chunks_into``)."""


def copied_into(chunks: Iterator[bytes], frame: Frame) -> Iterator[memoryview]:
    """``chunks``, each copied into ``frame(n)``: ``chunks_into`` for a backend that cannot read
    into a buffer of the caller's."""
    for data in chunks:
        view = frame(len(data))
        view[:] = data
        yield view


def check_bounds(offset: int, length: int | None) -> None:
    """InvalidArgument (INVALID_RANGE) for a negative offset or length; checked before any lookup."""
    if offset < 0 or (length is not None and length < 0):
        raise InvalidArgument("offset and length must not be negative", reason=Reason.INVALID_RANGE)


def range_length(offset: int, length: int | None, size: int) -> int:
    """The length of the range at ``offset`` in a ``size``-byte artifact (None: to the end).

    OutOfRange if the range starts or ends past the artifact.
    """
    if offset > size:
        raise OutOfRange(f"offset {offset} is past the end of the {size}-byte artifact")
    if length is None:
        return size - offset
    if offset + length > size:
        raise OutOfRange(
            f"range of {length} bytes at offset {offset} ends past the {size}-byte artifact"
        )
    return length
