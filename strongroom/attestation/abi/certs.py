"""Certificate loading and the vendor extensions the verifiers rely on (structure only).

* AMD VCEK/VLEK extensions (OIDs under ``1.3.6.1.4.1.3704.1``): product name, the TCB the key was
  derived for (``.3.x`` SPLs), the chip's ``hwID`` (VCEK only) and the CSP id (VLEK only).
* Intel SGX PCK extension (``1.2.840.113741.1.13.1``): FMSPC, PCE-ID, PCESVN, CPUSVN and its 16
  components, SGX type.

AMD issues VCEK/VLEK certificates with serial number 0 (and the Turin ASK with a negative serial);
``cryptography`` warns about these when parsing. The warning is silenced only around our own loads
so that ``-W error`` elsewhere cannot turn real AMD certificates into failures.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from strongroom.attestation.abi import _der
from strongroom.attestation.errors import MalformedEvidence
from strongroom.cryptoparse import X509_PARSE_ERRORS
from strongroom.reasons import Reason

AMD_OID_PREFIX = "1.3.6.1.4.1.3704.1."
OID_AMD_STRUCT_VERSION = "1.3.6.1.4.1.3704.1.1"
OID_AMD_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
OID_AMD_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_AMD_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_AMD_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_AMD_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_AMD_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
OID_AMD_HWID = "1.3.6.1.4.1.3704.1.4"
OID_AMD_CSP_ID = "1.3.6.1.4.1.3704.1.5"

OID_SGX_EXTENSIONS = "1.2.840.113741.1.13.1"
_SGX = OID_SGX_EXTENSIONS
OID_SGX_PPID = _SGX + ".1"
OID_SGX_TCB = _SGX + ".2"
OID_SGX_PCESVN = _SGX + ".2.17"
OID_SGX_CPUSVN = _SGX + ".2.18"
OID_SGX_PCEID = _SGX + ".3"
OID_SGX_FMSPC = _SGX + ".4"
OID_SGX_TYPE = _SGX + ".5"

SIMULATED_MARK = "Strongroom SIMULATED TEE - NOT FOR PRODUCTION"

_load_lock = threading.Lock()
_SERIAL_WARNINGS = (
    "Parsed a serial number which wasn't positive",
    "Parsed a negative serial number",
)


def load_certificate(data: bytes) -> x509.Certificate:
    """Loads one DER or PEM certificate, tolerating AMD's zero/negative serial numbers."""
    data = bytes(data)
    try:
        with _load_lock, warnings.catch_warnings():
            for message in _SERIAL_WARNINGS:
                warnings.filterwarnings(
                    "ignore", message=message, category=CryptographyDeprecationWarning
                )
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            # ``cryptography`` parses names only when first read: a subject or issuer that does
            # not parse (a UTF8String that is not UTF-8) raised ValueError wherever the chain was
            # first compared, past every handler of malformed input (the verifier's safety net;
            # the collateral fetcher, which then neither named the upstream's fault nor backed off).
            _ = cert.subject, cert.issuer
            return cert
    except X509_PARSE_ERRORS as exc:
        raise MalformedEvidence(
            f"cannot parse certificate: {exc}", reason=Reason.BAD_CERTIFICATE
        ) from None


def split_pem_certificates(data: bytes) -> list[bytes]:
    """Returns the DER bytes of every CERTIFICATE block in a PEM bundle.

    Text outside the blocks (comments, NUL padding as TDX quotes carry) is ignored, as OpenSSL does.
    """
    text = bytes(data).rstrip(b"\x00 \t\r\n")
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    out: list[bytes] = []
    pos = 0
    while True:
        start = text.find(begin, pos)
        if start < 0:
            break
        stop = text.find(end, start)
        if stop < 0:
            raise MalformedEvidence(
                "unterminated PEM certificate block", reason=Reason.BAD_CERTIFICATE
            )
        block = text[start : stop + len(end)]
        out.append(load_certificate(block).public_bytes(Encoding.DER))
        pos = stop + len(end)
    return out


def certificates_from_bytes(data: bytes) -> list[bytes]:
    """Normalises one DER certificate or a PEM bundle to a list of DER certificates."""
    stripped = bytes(data).lstrip()
    if stripped.startswith(b"-----BEGIN"):
        certs = split_pem_certificates(stripped)
        if not certs:
            raise MalformedEvidence("no certificate in PEM data", reason=Reason.BAD_CERTIFICATE)
        return certs
    load_certificate(data)
    return [bytes(data)]


def is_simulated(cert: x509.Certificate) -> bool:
    """True when the subject carries the simulated-TEE marking."""
    return SIMULATED_MARK in cert.subject.rfc4514_string()


def common_name(cert: x509.Certificate) -> str:
    """The subject CN, or the empty string."""
    try:
        attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        raise MalformedEvidence(
            "certificate subject cannot be parsed", reason=Reason.BAD_CERTIFICATE
        ) from None
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def extensions_of(cert: x509.Certificate) -> list[x509.Extension[x509.ExtensionType]]:
    """The certificate's extensions; a duplicated or malformed extension is malformed input.

    ``cryptography`` parses extensions lazily, so this is where a duplicated extension or a bad
    basicConstraints of an untrusted certificate first shows up.
    """
    try:
        return list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise MalformedEvidence(
            f"certificate {common_name(cert)!r} has malformed extensions ({type(exc).__name__})",
            reason=Reason.BAD_CERTIFICATE,
        ) from None


def _raw_extensions(cert: x509.Certificate) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for ext in extensions_of(cert):
        value = ext.value
        if isinstance(value, x509.UnrecognizedExtension):
            out[ext.oid.dotted_string] = value.value
    return out


@dataclass(frozen=True)
class AmdKeyCertInfo:
    """What a VCEK or VLEK certificate says about the key it certifies."""

    kind: str  # "VCEK" or "VLEK"
    product_name: str
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None
    hwid: bytes | None
    csp_id: str | None

    @property
    def product(self) -> str:
        """The product family (``Milan``, ``Genoa``, ``Turin``) without the stepping suffix."""
        return self.product_name.split("-", 1)[0]


def parse_amd_key_cert(cert: x509.Certificate) -> AmdKeyCertInfo:
    """Decodes the AMD extensions of a VCEK or VLEK; the kind is taken from the subject CN."""
    cn = common_name(cert)
    if cn == "SEV-VCEK":
        kind = "VCEK"
    elif cn == "SEV-VLEK":
        kind = "VLEK"
    else:
        raise MalformedEvidence(
            f"certificate {cn!r} is not an AMD VCEK or VLEK", reason=Reason.BAD_CERTIFICATE
        )
    ext = _raw_extensions(cert)

    def spl(oid: str, *, required: bool = True) -> int | None:
        raw = ext.get(oid)
        if raw is None:
            if required:
                raise MalformedEvidence(
                    f"{kind} certificate lacks TCB extension {oid}", reason=Reason.BAD_CERTIFICATE
                )
            return None
        value = _der.decode_unsigned(_der.read_one(raw, _der.TAG_INTEGER))
        if value > 0xFF:
            raise MalformedEvidence(
                f"{kind} TCB extension {oid} exceeds a byte", reason=Reason.BAD_CERTIFICATE
            )
        return value

    name_raw = ext.get(OID_AMD_PRODUCT_NAME)
    if name_raw is None:
        raise MalformedEvidence(
            f"{kind} certificate lacks productName", reason=Reason.BAD_CERTIFICATE
        )
    try:
        product_name = _der.read_one(name_raw, _der.TAG_IA5STRING).decode("ascii", "strict")
    except UnicodeDecodeError:
        raise MalformedEvidence(
            f"{kind} productName is not an ASCII (IA5) string", reason=Reason.BAD_CERTIFICATE
        ) from None
    hwid = ext.get(OID_AMD_HWID)
    csp_raw = ext.get(OID_AMD_CSP_ID)
    try:
        # Strict, as productName: "replace" decoding read different byte strings as one CSP id
        # (U+FFFD for each byte past 7 bits), in the claims and the audit.
        csp_id = (
            _der.read_one(csp_raw, _der.TAG_IA5STRING).decode("ascii", "strict")
            if csp_raw is not None
            else None
        )
    except UnicodeDecodeError:
        raise MalformedEvidence(
            f"{kind} CSP_ID is not an ASCII (IA5) string", reason=Reason.BAD_CERTIFICATE
        ) from None
    if kind == "VCEK" and hwid is None:
        raise MalformedEvidence(
            "VCEK certificate lacks the hwID extension", reason=Reason.BAD_CERTIFICATE
        )
    if kind == "VLEK" and hwid is not None:
        raise MalformedEvidence(
            "VLEK certificate carries a hwID extension", reason=Reason.BAD_CERTIFICATE
        )
    bl, tee, snp, ucode = (
        spl(OID_AMD_BL_SPL),
        spl(OID_AMD_TEE_SPL),
        spl(OID_AMD_SNP_SPL),
        spl(OID_AMD_UCODE_SPL),
    )
    assert bl is not None and tee is not None and snp is not None and ucode is not None
    return AmdKeyCertInfo(
        kind=kind,
        product_name=product_name,
        bootloader=bl,
        tee=tee,
        snp=snp,
        microcode=ucode,
        fmc=spl(OID_AMD_FMC_SPL, required=False),
        hwid=bytes(hwid) if hwid is not None else None,
        csp_id=csp_id,
    )


@dataclass(frozen=True)
class PckExtensions:
    """The SGX extension of an Intel PCK certificate."""

    ppid: bytes
    cpusvn: bytes
    tcb_components: tuple[int, ...]
    pcesvn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def parse_pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """Decodes the SGX extension (FMSPC, PCESVN, CPUSVN components...) of a PCK certificate."""
    raw = _raw_extensions(cert).get(OID_SGX_EXTENSIONS)
    if raw is None:
        raise MalformedEvidence(
            "PCK certificate lacks the SGX extension", reason=Reason.BAD_CERTIFICATE
        )
    values: dict[str, _der.Tlv] = {}
    for item in _der.read_all(_der.read_one(raw, _der.TAG_SEQUENCE)):
        pair = _der.read_all(item.value) if item.tag == _der.TAG_SEQUENCE else []
        if len(pair) != 2 or pair[0].tag != _der.TAG_OID:
            raise MalformedEvidence("malformed SGX extension entry", reason=Reason.BAD_CERTIFICATE)
        values[_der.decode_oid(pair[0].value)] = pair[1]

    def need(oid: str, tag: int) -> bytes:
        tlv = values.get(oid)
        if tlv is None or tlv.tag != tag:
            raise MalformedEvidence(
                f"SGX extension {oid} missing or mistyped", reason=Reason.BAD_CERTIFICATE
            )
        return tlv.value

    tcb: dict[str, _der.Tlv] = {}
    for item in _der.read_all(need(OID_SGX_TCB, _der.TAG_SEQUENCE)):
        pair = _der.read_all(item.value) if item.tag == _der.TAG_SEQUENCE else []
        if len(pair) != 2 or pair[0].tag != _der.TAG_OID:
            raise MalformedEvidence("malformed SGX TCB entry", reason=Reason.BAD_CERTIFICATE)
        tcb[_der.decode_oid(pair[0].value)] = pair[1]
    components: list[int] = []
    for i in range(1, 17):
        tlv = tcb.get(f"{OID_SGX_TCB}.{i}")
        if tlv is None or tlv.tag != _der.TAG_INTEGER:
            raise MalformedEvidence(f"SGX TCB component {i} missing", reason=Reason.BAD_CERTIFICATE)
        components.append(_der.decode_unsigned(tlv.value))
    pcesvn_tlv = tcb.get(OID_SGX_PCESVN)
    cpusvn_tlv = tcb.get(OID_SGX_CPUSVN)
    if pcesvn_tlv is None or pcesvn_tlv.tag != _der.TAG_INTEGER:
        raise MalformedEvidence("SGX PCESVN missing", reason=Reason.BAD_CERTIFICATE)
    if cpusvn_tlv is None or cpusvn_tlv.tag != _der.TAG_OCTET_STRING or len(cpusvn_tlv.value) != 16:
        raise MalformedEvidence("SGX CPUSVN missing or not 16 bytes", reason=Reason.BAD_CERTIFICATE)
    fmspc = need(OID_SGX_FMSPC, _der.TAG_OCTET_STRING)
    pce_id = need(OID_SGX_PCEID, _der.TAG_OCTET_STRING)
    if len(fmspc) != 6 or len(pce_id) != 2:
        raise MalformedEvidence(
            "SGX FMSPC must be 6 bytes and PCE-ID 2 bytes", reason=Reason.BAD_CERTIFICATE
        )
    return PckExtensions(
        ppid=need(OID_SGX_PPID, _der.TAG_OCTET_STRING),
        cpusvn=cpusvn_tlv.value,
        tcb_components=tuple(components),
        pcesvn=_der.decode_unsigned(pcesvn_tlv.value),
        pce_id=pce_id,
        fmspc=fmspc,
        sgx_type=_der.decode_unsigned(need(OID_SGX_TYPE, _der.TAG_ENUMERATED)),
    )
