"""The SEV-SNP certificate table of an extended report (GHCB spec, "GUID table" format).

The host supplies it; the guest kernel hands it over unchanged (configfs-tsm ``auxblob``, or the
``certs_address`` buffer of SNP_GET_EXT_REPORT). It is a run of 24-byte entries — a 16-byte GUID in
RFC 4122 byte order, then little-endian u32 offset and length of the certificate counted from the
start of the table — closed by an all-zero entry. The host is untrusted, so every entry is checked.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from collections.abc import Sequence

from strongroom.attesters._base import AttestationUnavailable
from strongroom.reasons import Reason

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")

_ENTRY = struct.Struct("<16sII")
_TERMINATOR = bytes(_ENTRY.size)
# Endorsement key first: a verifier starts from the key that signed the report.
_ORDER = {VCEK_GUID: 0, VLEK_GUID: 1, ASK_GUID: 2, ARK_GUID: 3}
_ENDORSEMENT_KEYS = frozenset({VCEK_GUID, VLEK_GUID})
# The report's SIGNING_KEY field -> the certificate of that key (7, "none", has none).
_SIGNING_KEY_GUID = {0: VCEK_GUID, 1: VLEK_GUID}


class MalformedCertTable(AttestationUnavailable):
    """The host-supplied certificate table is not well formed."""

    default_reason = Reason.SNP_CERT_TABLE_MALFORMED


@dataclasses.dataclass(frozen=True)
class CertTableEntry:
    """One certificate from the table."""

    guid: uuid.UUID
    data: bytes

    def __repr__(self) -> str:
        return f"CertTableEntry(guid={self.guid}, {len(self.data)} bytes)"


def parse_cert_table(blob: bytes) -> tuple[CertTableEntry, ...]:
    """Parses a certificate table; an empty or all-zero blob means "no certificates"."""
    if not blob or not any(blob):
        return ()
    headers: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + _ENTRY.size > len(blob):
            raise MalformedCertTable("certificate table has no terminating entry")
        raw = blob[pos : pos + _ENTRY.size]
        pos += _ENTRY.size
        if raw == _TERMINATOR:
            break
        guid_bytes, offset, length = _ENTRY.unpack(raw)
        headers.append((uuid.UUID(bytes=guid_bytes), offset, length))
    table_end = pos
    entries: list[CertTableEntry] = []
    seen: set[uuid.UUID] = set()
    for guid, offset, length in headers:
        if guid in seen:
            raise MalformedCertTable(f"certificate table lists {guid} twice")
        seen.add(guid)
        if length == 0:
            raise MalformedCertTable(f"certificate {guid} is empty")
        if offset < table_end or offset + length > len(blob):
            raise MalformedCertTable(
                f"certificate {guid} (offset {offset}, length {length}) lies outside the data area"
            )
        entries.append(CertTableEntry(guid, blob[offset : offset + length]))
    return tuple(entries)


def build_cert_table(certificates: Sequence[tuple[uuid.UUID, bytes]], *, size: int = 0) -> bytes:
    """Builds a certificate table (for fake devices and simulators), zero-padded to ``size``."""
    table_size = (len(certificates) + 1) * _ENTRY.size
    headers = bytearray()
    body = bytearray()
    for guid, der in certificates:
        headers += _ENTRY.pack(guid.bytes, table_size + len(body), len(der))
        body += der
    out = bytes(headers) + _TERMINATOR + bytes(body)
    if size:
        if len(out) > size:
            raise ValueError(f"certificate table needs {len(out)} bytes, more than {size}")
        out += bytes(size - len(out))
    return out


def endorsement_chain(
    entries: Sequence[CertTableEntry], signing_key: int | None = None
) -> tuple[bytes, ...]:
    """The known AMD certificates (VCEK, VLEK, ASK/ASVK, ARK), endorsement key first.

    ``signing_key`` is the report's SIGNING_KEY field (0 VCEK, 1 VLEK, 7 none): only the
    endorsement key that signed the report is kept. The host fills the table; one that lists a
    VCEK and a VLEK (a host provisioned with both) would otherwise put both into the evidence,
    which the verifier refuses (more than one endorsement key), failing every release.
    """
    wanted = _SIGNING_KEY_GUID.get(signing_key) if signing_key is not None else None
    known = [
        e
        for e in entries
        if e.guid in _ORDER
        and (signing_key is None or e.guid not in _ENDORSEMENT_KEYS or e.guid == wanted)
    ]
    known.sort(key=lambda e: _ORDER[e.guid])
    return tuple(e.data for e in known)
