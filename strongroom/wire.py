"""Protobuf wire format for messages that carry one large ``bytes`` field, without the copies.

A model download is a stream of ``GetModelResponse`` messages whose ``data`` field holds most of
each message. Through the protobuf runtime every chunk is copied four times on its way: into the
message and out as its serialisation on the server, into the parsed message and out as a new
``bytes`` on the client (≈0.2 s of CPU per 512 MB here, on a 2-core VM that also runs TLS and
the decryption). These helpers keep the byte layout exactly as protobuf defines it (the messages
interoperate with any protobuf implementation; tests compare both ways) but:

- :func:`append_bytes_field` writes the large field after the protobuf-serialised small fields
  (one copy, the concatenation);
- :func:`bytes_field_view` finds the field in a received message and returns a ``memoryview``
  into it (no copy), after walking and checking every field of the message.

:func:`fields` is the walk itself: each field's number, wire type and bytes, without parsing any of
them, so that a server can count what a message holds before the protobuf runtime builds it.

Every wire type is walked (unknown fields and deprecated groups are skipped as protobuf skips
them), so whatever the protobuf runtime accepts yields the same data here (tested against it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

_VARINT, _I64, _LEN, _START_GROUP, _END_GROUP, _I32 = 0, 1, 2, 3, 4, 5
_MAX_VARINT_BYTES = 10
# Protobuf's own default recursion limit; groups nest.
_MAX_GROUP_DEPTH = 100


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def encode_varint(value: int) -> bytes:
    """``value`` (0 ≤ value < 2**64) as a protobuf varint."""
    if not 0 <= value < 1 << 64:
        raise ValueError("varint out of range")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise WireError("message ends inside a varint")
        byte = buf[pos + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >= 1 << 64:
                raise WireError("varint out of range")
            return result, pos + i + 1
        shift += 7
    raise WireError("varint longer than 10 bytes")


def read_varint(message: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` of ``message`` and the position after it (:class:`WireError` if it
    is cut short, longer than 10 bytes or above 2**64 - 1, as protobuf refuses it)."""
    return _read_varint(memoryview(message), pos)


def append_bytes_field(head: bytes, field_number: int, data: bytes | memoryview) -> bytes:
    """The message ``head`` (serialised, without ``field_number``) with ``data`` as that field.

    Protobuf parsers accept fields in any order, so appending is equivalent to setting it.
    """
    # nbytes, not len(): a view of another format (array('I')) has len() items, not bytes.
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    return b"".join((bytes_field_prefix(head, field_number, size), data))


def bytes_field_prefix(head: bytes, field_number: int, size: int) -> bytes:
    """What :func:`append_bytes_field` makes of ``head`` before a ``size``-byte field's data: the
    caller writes the data after it (into the message's own memory, without a copy of its own)."""
    if not 1 <= field_number < 1 << 29:
        raise ValueError("field number out of range")
    return b"".join((head, encode_varint(field_number << 3 | _LEN), encode_varint(size)))


def bytes_field_view(message: bytes, field_number: int) -> memoryview:
    """A view of length-delimited field ``field_number`` in ``message`` (empty if absent).

    Every field is walked and bounds-checked, so a truncated or malformed message raises
    :class:`WireError`; as protobuf specifies, the last occurrence of the field wins.
    """
    found = memoryview(message)[0:0]
    for field in fields(message):
        if field.number == field_number and field.payload is not None and not field.depth:
            found = field.payload
    return found


class Field(NamedTuple):
    """One field as :func:`fields` finds it: its number, its wire type, the bytes of a
    length-delimited one (None for the other wire types), and how many groups enclose it."""

    number: int
    wire_type: int
    payload: memoryview | None
    depth: int

    @property
    def length_delimited(self) -> bool:
        """Whether it is a length-delimited field (a string, bytes, message or packed array)."""
        return self.wire_type == _LEN


def fields(message: bytes | memoryview) -> Iterator[Field]:
    """Each field of ``message``, in order, without parsing any field's contents.

    The fields of (deprecated) groups are yielded too, with their depth, so that a caller that
    counts fields counts every one protobuf would read; a field of the message itself has depth 0.
    A truncated or malformed message raises :class:`WireError` when the walk reaches the fault, so
    a caller that stops early (a limit reached) reads no further than it needs.
    """
    buf = memoryview(message).cast("B")
    pos, end = 0, len(buf)
    groups: list[int] = []  # the field numbers of the enclosing groups, innermost last
    # One-byte varints (tags of fields 1-15, lengths below 128, small values) are read inline:
    # a caller may walk hundreds of thousands of fields (a tensor's BYTES elements).
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        payload = None
        depth = len(groups)
        if wire_type == _VARINT:
            if pos < end and buf[pos] < 0x80:
                pos += 1
            else:
                _, pos = _read_varint(buf, pos)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            if pos < end and buf[pos] < 0x80:
                size = buf[pos]
                pos += 1
            else:
                size, pos = _read_varint(buf, pos)
            if size > end - pos:
                raise WireError("length-delimited field runs past the message")
            payload = buf[pos : pos + size]
            pos += size
        elif wire_type == _START_GROUP:
            if len(groups) >= _MAX_GROUP_DEPTH:
                raise WireError("groups nested too deeply")
            groups.append(number)
        elif wire_type == _END_GROUP:
            if not groups or groups.pop() != number:
                raise WireError("unmatched end of group")
            depth = len(groups)
        else:
            raise WireError(f"invalid wire type {wire_type}")
        if pos > end:
            raise WireError("message ends inside a field")
        yield Field(number, wire_type, payload, depth)
    if groups:
        raise WireError("message ends inside a group")
