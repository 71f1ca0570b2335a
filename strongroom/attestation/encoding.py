"""Recognises what a blob of evidence is (SEV-SNP raw, Azure HCL-wrapped SNP, TDX quote) and how it
is encoded (raw bytes, hex text, base64 text).

Used by the CLI and by anything that receives evidence from outside the gRPC API; the verifier
itself takes raw bytes only.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass

from strongroom.attestation.abi import snp as snp_abi
from strongroom.attestation.abi import tdx as tdx_abi
from strongroom.attestation.errors import BAD_ENCODING, UNKNOWN_EVIDENCE_FORMAT, MalformedEvidence
from strongroom.attestation.evidence import TeeType

_HEX = re.compile(rb"\A[0-9a-fA-F]+\Z")
_B64 = re.compile(rb"\A[A-Za-z0-9+/_-]+=*\Z")
_MAX_TEXT = 1 << 20


@dataclass(frozen=True)
class DetectedEvidence:
    """Evidence bytes decoded to raw form, with what they were recognised as."""

    tee_type: TeeType
    container: str  # "snp", "azure-hcl" or "tdx-quote"
    encoding: str  # "raw", "hex" or "base64"
    data: bytes


def _classify_raw(data: bytes) -> tuple[TeeType, str] | None:
    if snp_abi.is_azure_hcl(data):
        return TeeType.SEV_SNP, "azure-hcl"
    if len(data) >= 8:
        version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
        if (
            version in (4, 5)
            and key_type == tdx_abi.ATT_KEY_TYPE_ECDSA_P256
            and tee_type == tdx_abi.TEE_TYPE_TDX
        ):
            return TeeType.TDX, "tdx-quote"
    if len(data) == snp_abi.REPORT_SIZE_BYTES:
        (version,) = struct.unpack_from("<I", data, 0)
        if version in snp_abi.SUPPORTED_VERSIONS:
            return TeeType.SEV_SNP, "snp"
    return None


def _text_candidates(data: bytes) -> list[tuple[str, bytes]]:
    text = b"".join(bytes(data).split())
    if not text or len(text) > _MAX_TEXT:
        return []
    out: list[tuple[str, bytes]] = []
    if _HEX.match(text) and len(text) % 2 == 0:
        out.append(("hex", binascii.unhexlify(text)))
    if _B64.match(text):
        try:
            if b"-" in text or b"_" in text:
                decoded = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
            else:
                decoded = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
            out.append(("base64", decoded))
        except (binascii.Error, ValueError):
            pass
    return out


def detect_evidence(data: bytes) -> DetectedEvidence:
    """Decodes hex/base64 text if needed and recognises the evidence format.

    Raises :class:`MalformedEvidence` (``UNKNOWN_EVIDENCE_FORMAT``) when nothing matches.
    """
    raw = bytes(data)
    kind = _classify_raw(raw)
    if kind is not None:
        return DetectedEvidence(kind[0], kind[1], "raw", raw)
    for encoding, decoded in _text_candidates(raw):
        kind = _classify_raw(decoded)
        if kind is not None:
            return DetectedEvidence(kind[0], kind[1], encoding, decoded)
    raise MalformedEvidence(
        "evidence is not a recognised SEV-SNP report, Azure HCL report or TDX quote "
        "(raw, hex or base64)",
        reason=UNKNOWN_EVIDENCE_FORMAT,
    )


def decode_text_or_raw(data: bytes) -> bytes:
    """Returns hex- or base64-decoded bytes when ``data`` is such text, else ``data`` itself."""
    try:
        return detect_evidence(data).data
    except MalformedEvidence:
        pass
    candidates = _text_candidates(data)
    if candidates:
        return candidates[0][1]
    if not data:
        raise MalformedEvidence("empty evidence", reason=BAD_ENCODING)
    return bytes(data)
