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
from strongroom.attestation.errors import MalformedEvidence
from strongroom.attestation.evidence import TeeType
from strongroom.reasons import Reason

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


def _diagnose(data: bytes) -> MalformedEvidence | None:
    """Why bytes that look like a quote or report are not a supported one (a precise reason
    instead of "unknown format"); ``None`` when they look like neither."""
    if len(data) >= 8:
        version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
        tdx_like = (tee_type == tdx_abi.TEE_TYPE_TDX) + (
            key_type == tdx_abi.ATT_KEY_TYPE_ECDSA_P256
        )
        if tdx_like and version in (3, 4, 5, 6) and len(data) >= 48:
            if tee_type != tdx_abi.TEE_TYPE_TDX:
                return MalformedEvidence(
                    f"quote TEE type 0x{tee_type:X} is not TDX (0x81)",
                    reason=Reason.UNSUPPORTED_TEE_TYPE,
                )
            if key_type != tdx_abi.ATT_KEY_TYPE_ECDSA_P256:
                return MalformedEvidence(
                    f"quote attestation key type {key_type} is not ECDSA P-256 (2)",
                    reason=Reason.UNSUPPORTED_ATTESTATION_KEY_TYPE,
                )
            return MalformedEvidence(
                f"TDX quote version {version} is not supported (4 or 5)",
                reason=Reason.UNSUPPORTED_VERSION,
            )
    if len(data) >= 0x38:
        (version,) = struct.unpack_from("<I", data, 0)
        (sig_algo,) = struct.unpack_from("<I", data, 0x34)
        if sig_algo == 1 and 1 <= version <= 16:  # ECDSA P-384/SHA-384: an SNP report's shape
            if version not in snp_abi.SUPPORTED_VERSIONS:
                return MalformedEvidence(
                    f"SEV-SNP report version {version} is not supported "
                    f"({', '.join(map(str, snp_abi.SUPPORTED_VERSIONS))})",
                    reason=Reason.UNSUPPORTED_VERSION,
                )
            if len(data) != snp_abi.REPORT_SIZE_BYTES:
                return MalformedEvidence(
                    f"SEV-SNP report is {len(data)} bytes, not {snp_abi.REPORT_SIZE_BYTES}",
                    reason=Reason.REPORT_SIZE,
                )
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

    Raises :class:`MalformedEvidence` (``Reason.UNKNOWN_EVIDENCE_FORMAT``) when nothing matches.
    """
    raw = bytes(data)
    kind = _classify_raw(raw)
    if kind is not None:
        return DetectedEvidence(kind[0], kind[1], "raw", raw)
    candidates = _text_candidates(raw)
    for encoding, decoded in candidates:
        kind = _classify_raw(decoded)
        if kind is not None:
            return DetectedEvidence(kind[0], kind[1], encoding, decoded)
    for candidate in (raw, *(decoded for _, decoded in candidates)):
        diagnosis = _diagnose(candidate)
        if diagnosis is not None:
            raise diagnosis
    raise MalformedEvidence(
        "evidence is not a recognised SEV-SNP report, Azure HCL report or TDX quote "
        "(raw, hex or base64)",
        reason=Reason.UNKNOWN_EVIDENCE_FORMAT,
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
        raise MalformedEvidence("empty evidence", reason=Reason.BAD_ENCODING)
    return bytes(data)
