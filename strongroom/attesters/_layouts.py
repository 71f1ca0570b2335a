"""Where REPORT_DATA sits in each report format, for the attesters' echo self-check.

Full parsing and verification is the key broker's job; an attester only confirms that what the
hardware returned carries the REPORT_DATA it asked for, so a mix-up fails here, not at the broker.
"""

from __future__ import annotations

import struct

from strongroom.attesters._base import REPORT_DATA_SIZE, AttestationUnavailable
from strongroom.reasons import Reason

SNP_REPORT_DATA_OFFSET = 0x50
"""AMD SEV-SNP ATTESTATION_REPORT: REPORT_DATA at 0x50..0x8F."""
SNP_KEY_INFO_OFFSET = 0x48
"""u32 key information: bits 4:2 are SIGNING_KEY (0 VCEK, 1 VLEK, 7 none)."""

TDREPORT_SIZE = 1024
TDREPORT_REPORT_DATA_OFFSET = 128
"""TDREPORT_STRUCT: REPORTMACSTRUCT (type 16, CPUSVN 16, TEE_TCB_INFO_HASH 48, TEE_INFO_HASH 48) first."""

_TDX_QUOTE_HEADER_SIZE = 48
_TD10_REPORT_DATA_OFFSET = 520  # tee_tcb_svn..rtmr3 precede REPORTDATA in the TD report body
_TDX_TEE_TYPE = 0x81


def snp_report_data(report: bytes) -> bytes:
    """REPORT_DATA of a raw SNP attestation report."""
    end = SNP_REPORT_DATA_OFFSET + REPORT_DATA_SIZE
    if len(report) < end:
        raise AttestationUnavailable(
            f"SNP report is {len(report)} bytes, too short to hold REPORT_DATA",
            reason=Reason.SNP_REPORT_MALFORMED,
        )
    return report[SNP_REPORT_DATA_OFFSET:end]


def snp_signing_key(report: bytes) -> int:
    """The SIGNING_KEY field of a raw SNP report: which key signed it (0 VCEK, 1 VLEK, 7 none)."""
    if len(report) < SNP_KEY_INFO_OFFSET + 4:
        raise AttestationUnavailable(
            f"SNP report is {len(report)} bytes, too short to hold its key information",
            reason=Reason.SNP_REPORT_MALFORMED,
        )
    (key_info,) = struct.unpack_from("<I", report, SNP_KEY_INFO_OFFSET)
    return int((key_info >> 2) & 0x7)


def tdreport_report_data(tdreport: bytes) -> bytes:
    """REPORTDATA of a TDREPORT_STRUCT (the MAC'd local report)."""
    if len(tdreport) != TDREPORT_SIZE:
        raise AttestationUnavailable(
            f"TDREPORT is {len(tdreport)} bytes, expected {TDREPORT_SIZE}",
            reason=Reason.TDREPORT_MALFORMED,
        )
    return tdreport[TDREPORT_REPORT_DATA_OFFSET : TDREPORT_REPORT_DATA_OFFSET + REPORT_DATA_SIZE]


def tdx_quote_report_data(quote: bytes) -> bytes:
    """REPORTDATA of a TDX DCAP quote, version 4 or 5."""
    if len(quote) < _TDX_QUOTE_HEADER_SIZE:
        raise AttestationUnavailable(
            "TDX quote shorter than its header", reason=Reason.TDX_QUOTE_MALFORMED
        )
    version, _key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    if tee_type != _TDX_TEE_TYPE:
        raise AttestationUnavailable(
            f"quote TEE type 0x{tee_type:x} is not TDX", reason=Reason.TDX_QUOTE_MALFORMED
        )
    if version == 4:
        body = _TDX_QUOTE_HEADER_SIZE
    elif version == 5:
        # v5 puts a body descriptor (type u16, size u32) before the TD report body.
        body = _TDX_QUOTE_HEADER_SIZE + 6
    else:
        raise AttestationUnavailable(
            f"unsupported TDX quote version {version}", reason=Reason.TDX_QUOTE_MALFORMED
        )
    start = body + _TD10_REPORT_DATA_OFFSET
    if len(quote) < start + REPORT_DATA_SIZE:
        raise AttestationUnavailable("TDX quote truncated", reason=Reason.TDX_QUOTE_MALFORMED)
    return quote[start : start + REPORT_DATA_SIZE]
