"""A minimal strict DER reader for the few vendor certificate extensions we decode.

Only definite lengths in minimal form are accepted; anything else is malformed. The values these
extensions carry are small (INTEGER, ENUMERATED, OCTET STRING, IA5String, OID, SEQUENCE), so a full
ASN.1 library is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from strongroom.attestation.errors import MalformedEvidence
from strongroom.reasons import Reason

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_IA5STRING = 0x16
TAG_SEQUENCE = 0x30


@dataclass(frozen=True)
class Tlv:
    """One DER element: its tag and content bytes."""

    tag: int
    value: bytes


def _fail(what: str) -> MalformedEvidence:
    return MalformedEvidence(f"certificate extension: {what}", reason=Reason.BAD_CERTIFICATE)


def read_all(data: bytes) -> list[Tlv]:
    """Splits ``data`` into consecutive DER elements; the bytes must be consumed exactly."""
    out: list[Tlv] = []
    pos = 0
    n = len(data)
    while pos < n:
        if pos + 2 > n:
            raise _fail("truncated DER header")
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise _fail("multi-byte DER tags are not supported")
        first = data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + count > n:
                raise _fail("bad DER length")
            length = int.from_bytes(data[pos : pos + count], "big")
            if length < 0x80 or data[pos] == 0:
                raise _fail("non-minimal DER length")
            pos += count
        if pos + length > n:
            raise _fail("DER value runs past its container")
        out.append(Tlv(tag, data[pos : pos + length]))
        pos += length
    return out


def read_one(data: bytes, tag: int) -> bytes:
    """Reads exactly one element of the given tag and returns its content."""
    items = read_all(data)
    if len(items) != 1 or items[0].tag != tag:
        raise _fail(f"expected a single element with tag 0x{tag:02X}")
    return items[0].value


def decode_unsigned(content: bytes) -> int:
    """Decodes INTEGER/ENUMERATED content that must be non-negative and minimally encoded."""
    if not content:
        raise _fail("empty INTEGER")
    if content[0] & 0x80:
        raise _fail("negative INTEGER where an unsigned value is required")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise _fail("non-minimal INTEGER")
    return int.from_bytes(content, "big")


def decode_oid(content: bytes) -> str:
    """Decodes OBJECT IDENTIFIER content to dotted form."""
    if not content or content[-1] & 0x80:
        raise _fail("bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for byte in content:
        if value == 0 and byte == 0x80:
            raise _fail("non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def encode(tag: int, content: bytes) -> bytes:
    """Encodes one DER element (used by the simulated attester to build extensions)."""
    n = len(content)
    if n < 0x80:
        header = bytes([tag, n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        header = bytes([tag, 0x80 | len(size)]) + size
    return header + content


def encode_unsigned(value: int, tag: int = TAG_INTEGER) -> bytes:
    """Encodes a non-negative INTEGER (or ENUMERATED) minimally."""
    if value < 0:
        raise ValueError("only non-negative values are supported")
    content = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return encode(tag, content)


def encode_oid(dotted: str) -> bytes:
    """Encodes an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return encode(TAG_OID, bytes(out))
