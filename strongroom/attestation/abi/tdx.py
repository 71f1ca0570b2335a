"""Intel TDX DCAP quote parsing (quote versions 4 and 5; TD 1.0 and TD 1.5 report bodies).

Structure only. Layout (little-endian):

* header, 48 bytes: version, attestation key type (2 = ECDSA P-256), TEE type (0x81 = TDX),
  two reserved u16, QE vendor id (16), user data (20);
* v4: TD 1.0 body (584 bytes) at 48; v5: body type (u16) and body size (u32) at 48, body at 54
  (type 2 = TD 1.0 / 584 bytes, type 3 = TD 1.5 / 648 bytes);
* u32 signature-data length, then the ECDSA quote signature data: signature (64, r||s big-endian),
  attestation public key (64, x||y), certification data (type 6 = QE report certification data:
  QE report (384), QE report signature (64), QE auth data (u16 length + bytes), and nested
  certification data type 5 = PEM PCK chain).

Every declared length is honoured: nested structures must fill their container exactly; bytes after
the signature data (zero padding, or test bytes) are ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strongroom.attestation.errors import MalformedEvidence
from strongroom.reasons import Reason

HEADER_SIZE = 48
TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
TD10_BODY_SIZE = 584
TD15_BODY_SIZE = 648
ENCLAVE_REPORT_SIZE = 384
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
TD_ATTR_DEBUG_BIT = 0
TD_ATTR_SEPT_VE_DISABLE_BIT = 28
TD_ATTR_MIGRATABLE_BIT = 29
TD_ATTR_PKS_BIT = 30
TD_ATTR_KL_BIT = 31
TD_ATTR_PERFMON_BIT = 63


def _mask(*bits: range | int) -> int:
    out = 0
    for item in bits:
        for bit in [item] if isinstance(item, int) else item:
            out |= 1 << bit
    return out


TD_ATTR_UNDER_DEBUG_MASK = _mask(range(0, 8))
"""ATTRIBUTES bits 7:0, the TUD ("TD under debug") group of the TDX module 1.0 ABI: bit 0 is
DEBUG (the host reads and writes the TD's state), the others were reserved for more debug flags;
newer modules put off-TD profiling there (bits 4-6: the host observes the TD). Any of them set
means the TD is not confidential from its host."""

TD_ATTR_RESERVED_MASK = _mask(range(8, 16), range(18, 27), range(32, 62))
"""ATTRIBUTES bits that no TDX module release lets a host set (reserved, must be zero).

Intel's TDX module sources define reserved ranges per release: 1.0 ``reserved_tud`` 7:1,
``reserved_sec`` 27:8 and ``reserved_other`` 62:32; 1.5 names bit 27 (LASS) and bit 16 (ICSSD) and
keeps 15:4 (``reserved_tup``), 22:17 (``reserved_p``), 26:23 (``reserved_n``) and 62:32 reserved;
the latest release names bit 6 (PMT_PROF) and bit 62 (TPA), and its ``ATTRIBUTES_FIXED0`` allows
only bits 0, 6, 16, 27-30, 62 and 63. This mask is the part reserved in every one of them, minus
bit 17, which a newer ABI edition names SERVTD_EXT. Bits 7:0 are judged as debug instead. A future
module that defines one of these bits is refused until the verifier learns what the bit means."""


def attribute_bits(td_attributes: bytes, mask: int) -> tuple[int, ...]:
    """The bit numbers set in ``td_attributes`` (8 bytes, little-endian) among those in ``mask``."""
    value = int.from_bytes(td_attributes, "little") & mask
    return tuple(bit for bit in range(64) if (value >> bit) & 1)


class _Cursor:
    """Reads fields from a bounded region; running past its end is malformed input."""

    def __init__(self, data: bytes, start: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, start, end, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise MalformedEvidence(
                f"TDX quote {self.what} is truncated (needs {n} more bytes at offset {self.pos})",
                reason=Reason.TRUNCATED,
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        value: int = struct.unpack("<H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def finish(self) -> None:
        if self.pos != self.end:
            raise MalformedEvidence(
                f"TDX quote {self.what} has {self.end - self.pos} bytes beyond its declared content",
                reason=Reason.BAD_FIELD,
            )


@dataclass(frozen=True)
class QuoteHeader:
    """The quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdQuoteBody:
    """The TD report body (TD 1.0 fields, plus the TD 1.5 ones when present)."""

    body_type: int
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_servicetd: bytes | None

    @property
    def td_attributes_int(self) -> int:
        """TD attributes as a little-endian integer (bit 0 is DEBUG)."""
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        """A "TD under debug" bit (ATTRIBUTES 7:0, DEBUG is bit 0) is set: the host can see or
        observe the TD's state."""
        return bool(self.td_attributes_int & TD_ATTR_UNDER_DEBUG_MASK)

    @property
    def body_name(self) -> str:
        """``TD1.0`` or ``TD1.5``."""
        return "TD1.5" if self.body_type == BODY_TYPE_TD15 else "TD1.0"


@dataclass(frozen=True)
class EnclaveReport:
    """An SGX enclave report body: here, the Quoting Enclave's report."""

    raw: bytes
    cpusvn: bytes
    miscselect: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True)
class QuoteSignatureData:
    """The ECDSA quote signature data with its type-6 certification data."""

    signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


@dataclass(frozen=True)
class TdxQuote:
    """A parsed, not yet verified, TDX quote."""

    raw: bytes
    header: QuoteHeader
    body: TdQuoteBody
    signed_length: int
    signature_data: QuoteSignatureData
    trailing_bytes: int

    @property
    def signed_bytes(self) -> bytes:
        """Header and body: what the attestation key signs."""
        return self.raw[: self.signed_length]

    def __repr__(self) -> str:
        return (
            f"TdxQuote(version={self.header.version}, body={self.body.body_name}, "
            f"mr_td={self.body.mr_td.hex()})"
        )


def parse_enclave_report(raw: bytes) -> EnclaveReport:
    """Parses a 384-byte SGX report body."""
    if len(raw) != ENCLAVE_REPORT_SIZE:
        raise MalformedEvidence("QE report must be 384 bytes", reason=Reason.TRUNCATED)
    c = _Cursor(raw, 0, ENCLAVE_REPORT_SIZE, "QE report")
    cpusvn = c.take(16)
    miscselect = c.u32()
    c.take(28)
    attributes = c.take(16)
    mr_enclave = c.take(32)
    c.take(32)
    mr_signer = c.take(32)
    c.take(96)
    isv_prod_id = c.u16()
    isv_svn = c.u16()
    c.take(60)
    report_data = c.take(64)
    c.finish()
    return EnclaveReport(
        raw=bytes(raw),
        cpusvn=cpusvn,
        miscselect=miscselect,
        attributes=attributes,
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        report_data=report_data,
    )


def _parse_body(c: _Cursor, body_type: int) -> TdQuoteBody:
    tee_tcb_svn = c.take(16)
    mr_seam = c.take(48)
    mr_signer_seam = c.take(48)
    seam_attributes = c.take(8)
    td_attributes = c.take(8)
    xfam = c.take(8)
    mr_td = c.take(48)
    mr_config_id = c.take(48)
    mr_owner = c.take(48)
    mr_owner_config = c.take(48)
    rtmrs = (c.take(48), c.take(48), c.take(48), c.take(48))
    report_data = c.take(64)
    svn2 = servicetd = None
    if body_type == BODY_TYPE_TD15:
        svn2 = c.take(16)
        servicetd = c.take(48)
    c.finish()
    return TdQuoteBody(
        body_type=body_type,
        tee_tcb_svn=tee_tcb_svn,
        mr_seam=mr_seam,
        mr_signer_seam=mr_signer_seam,
        seam_attributes=seam_attributes,
        td_attributes=td_attributes,
        xfam=xfam,
        mr_td=mr_td,
        mr_config_id=mr_config_id,
        mr_owner=mr_owner,
        mr_owner_config=mr_owner_config,
        rtmrs=rtmrs,
        report_data=report_data,
        tee_tcb_svn2=svn2,
        mr_servicetd=servicetd,
    )


def _parse_signature_data(c: _Cursor) -> QuoteSignatureData:
    signature = c.take(64)
    attestation_key = c.take(64)
    cert_type = c.u16()
    cert_size = c.u32()
    if cert_type != CERT_DATA_QE_REPORT:
        raise MalformedEvidence(
            f"TDX certification data type {cert_type} is not supported (expected 6)",
            reason=Reason.UNSUPPORTED_CERTIFICATION_DATA,
        )
    inner = _Cursor(c.data, c.pos, c.pos + cert_size, "QE report certification data")
    c.take(cert_size)
    c.finish()
    qe_report = parse_enclave_report(inner.take(ENCLAVE_REPORT_SIZE))
    qe_report_signature = inner.take(64)
    auth_len = inner.u16()
    qe_auth_data = inner.take(auth_len)
    pck_type = inner.u16()
    pck_size = inner.u32()
    if pck_type != CERT_DATA_PCK_CHAIN:
        raise MalformedEvidence(
            f"TDX QE certification data type {pck_type} is not supported (expected 5: PCK chain)",
            reason=Reason.UNSUPPORTED_CERTIFICATION_DATA,
        )
    pck_chain = inner.take(pck_size)
    inner.finish()
    return QuoteSignatureData(
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pck_chain,
    )


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parses a TDX DCAP quote (v4 or v5). Trailing bytes after the signature data are ignored."""
    data = bytes(data)
    c = _Cursor(data, 0, len(data), "header")
    version = c.u16()
    if len(data) < HEADER_SIZE:
        raise MalformedEvidence(f"TDX quote is only {len(data)} bytes", reason=Reason.TRUNCATED)
    if version not in (4, 5):
        raise MalformedEvidence(
            f"TDX quote version {version} is not supported (supported: 4, 5)",
            reason=Reason.UNSUPPORTED_VERSION,
        )
    header = QuoteHeader(
        version=version,
        attestation_key_type=c.u16(),
        tee_type=c.u32(),
        qe_svn=c.u16(),
        pce_svn=c.u16(),
        qe_vendor_id=c.take(16),
        user_data=c.take(20),
    )
    if header.attestation_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise MalformedEvidence(
            f"attestation key type {header.attestation_key_type} is not ECDSA P-256",
            reason=Reason.UNSUPPORTED_ATTESTATION_KEY_TYPE,
        )
    if header.tee_type != TEE_TYPE_TDX:
        raise MalformedEvidence(
            f"quote TEE type 0x{header.tee_type:X} is not TDX (0x81)",
            reason=Reason.UNSUPPORTED_TEE_TYPE,
        )
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise MalformedEvidence("quote QE vendor id is not Intel's", reason=Reason.BAD_FIELD)
    if version == 4:
        body_type, body_size = BODY_TYPE_TD10, TD10_BODY_SIZE
    else:
        body_type = c.u16()
        body_size = c.u32()
        expected = {BODY_TYPE_TD10: TD10_BODY_SIZE, BODY_TYPE_TD15: TD15_BODY_SIZE}.get(body_type)
        if expected is None:
            raise MalformedEvidence(
                f"quote v5 body type {body_type} is not a TD report (2 or 3)",
                reason=Reason.UNSUPPORTED_BODY_TYPE,
            )
        if body_size != expected:
            raise MalformedEvidence(
                f"quote v5 body type {body_type} declares {body_size} bytes; expected {expected}",
                reason=Reason.BAD_FIELD,
            )
    body_cursor = _Cursor(data, c.pos, c.pos + body_size, "body")
    c.take(body_size)
    body = _parse_body(body_cursor, body_type)
    signed_length = c.pos
    sig_len = c.u32()
    sig_cursor = _Cursor(data, c.pos, c.pos + sig_len, "signature data")
    c.take(sig_len)
    signature_data = _parse_signature_data(sig_cursor)
    return TdxQuote(
        raw=data,
        header=header,
        body=body,
        signed_length=signed_length,
        signature_data=signature_data,
        trailing_bytes=len(data) - c.pos,
    )


def build_quote(
    *,
    version: int,
    body_fields: TdQuoteBody,
    signature: bytes,
    attestation_key: bytes,
    qe_report: bytes,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    pck_chain_pem: bytes,
    user_data: bytes = bytes(20),
) -> tuple[bytes, int]:
    """Serialises a quote (used by the simulated attester); returns the bytes and signed length.

    ``signature`` may be a 64-byte placeholder; the caller signs ``quote[:signed_length]`` and
    patches the signature in at ``signed_length + 4``.
    """
    out = bytearray()
    out += struct.pack("<HHIHH", version, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, 0, 0)
    out += INTEL_QE_VENDOR_ID + user_data
    b = body_fields
    body = (
        b.tee_tcb_svn
        + b.mr_seam
        + b.mr_signer_seam
        + b.seam_attributes
        + b.td_attributes
        + b.xfam
        + b.mr_td
        + b.mr_config_id
        + b.mr_owner
        + b.mr_owner_config
        + b"".join(b.rtmrs)
        + b.report_data
    )
    if b.body_type == BODY_TYPE_TD15:
        assert b.tee_tcb_svn2 is not None and b.mr_servicetd is not None
        body += b.tee_tcb_svn2 + b.mr_servicetd
    if version == 5:
        out += struct.pack("<HI", b.body_type, len(body))
    elif b.body_type != BODY_TYPE_TD10:
        raise ValueError("quote v4 carries only TD 1.0 bodies")
    out += body
    signed_length = len(out)
    inner = (
        qe_report
        + qe_report_signature
        + struct.pack("<H", len(qe_auth_data))
        + qe_auth_data
        + struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pck_chain_pem))
        + pck_chain_pem
    )
    sig_data = (
        signature + attestation_key + struct.pack("<HI", CERT_DATA_QE_REPORT, len(inner)) + inner
    )
    out += struct.pack("<I", len(sig_data)) + sig_data
    return bytes(out), signed_length


def build_enclave_report(
    *,
    cpusvn: bytes,
    miscselect: int,
    attributes: bytes,
    mr_enclave: bytes,
    mr_signer: bytes,
    isv_prod_id: int,
    isv_svn: int,
    report_data: bytes,
) -> bytes:
    """Serialises a 384-byte SGX report body (used by the simulated attester)."""
    out = (
        cpusvn
        + struct.pack("<I", miscselect)
        + bytes(28)
        + attributes
        + mr_enclave
        + bytes(32)
        + mr_signer
        + bytes(96)
        + struct.pack("<HH", isv_prod_id, isv_svn)
        + bytes(60)
        + report_data
    )
    if len(out) != ENCLAVE_REPORT_SIZE:
        raise ValueError("enclave report fields have wrong sizes")
    return out
