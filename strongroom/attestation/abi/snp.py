"""AMD SEV-SNP ``ATTESTATION_REPORT`` parsing (SEV-SNP firmware ABI, report versions 2, 3, 4 and 5).

Structure only: the result is an immutable typed value; nothing here looks at the signature's
validity. Layout (little-endian, 1184 bytes): the signed part is bytes ``0x000..0x29F``; the
signature's R and S are 72-byte little-endian integers at ``0x2A0`` and ``0x2E8``. Fields marked
reserved in the ABI must be zero: a report that sets them is from a format this parser does not know.

TCB_VERSION byte layout differs by product: Milan/Genoa ``[BL, TEE, rsvd x4, SNP, UCODE]``,
Turin ``[FMC, BL, TEE, SNP, rsvd x3, UCODE]``. The product is known from the report's CPUID fields
(version 3+); version-2 reports predate Turin.

Versions 3 and 4 share one layout (version 4 is written by some firmware, e.g. Milan 1.55.31 on
GCP; go-sev-guest reads it as version 3): CPUID fields at ``0x188..0x18A``, and ``0x1F8..0x29F``
reserved, where version 5 puts its mitigation vectors. A version-4 report that sets any byte the
version-3 layout calls reserved is refused like a version-3 one (``BAD_FIELD``): nothing written
there is read until the ABI defines it for that version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from strongroom.attestation.errors import MalformedEvidence
from strongroom.reasons import Reason

REPORT_SIZE_BYTES = 0x4A0
SIGNED_LENGTH = 0x2A0
SUPPORTED_VERSIONS = (2, 3, 4, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
HCL_MAGIC = b"HCLA"
HCL_REPORT_OFFSET = 0x20
_HCL_RUNTIME_HEADER = HCL_REPORT_OFFSET + REPORT_SIZE_BYTES
_HCL_REPORT_TYPE_SNP = 2

# CPUID family of the processor generations (Zen 3/4 = 0x19, Zen 5 = 0x1A).
_FAMILY_ZEN3_4 = 0x19
_FAMILY_ZEN5 = 0x1A
_FIRST_GENOA_MODEL = 0x10
# Family 0x19 models 0xA0-0xAF are the Zen 4c parts (Siena, Bergamo): AMD signs them under
# Genoa's ARK and ASK, and KDS serves their VCEKs as Genoa's, so their product is Genoa.
_ZEN4C_MODELS = range(0xA0, 0xB0)
# The family 0x19 models of the SEV-SNP server parts: Milan 0x00-0x0F, Genoa 0x10-0x1F and the
# Zen 4c parts. The family's other models are client parts (Vermeer 0x21, Raphael 0x61, ...) that
# have no SEV-SNP and no chain at AMD KDS: read as Genoa (every model from 0x10 was), a report
# naming one was judged against Genoa's chain and TCB minimums as if it were a Genoa.
# Family 0x1A likewise: Turin is models 0x00-0x0F and Turin Dense 0x10-0x1F (one product, one
# chain); the family's other models are client Zen 5 parts (Strix Point 0x24, Granite Ridge 0x44,
# Krackan 0x60, Strix Halo 0x70, ...) with no SEV-SNP, read as Turin on the family alone.
_MODELS: dict[int, dict[str, tuple[range, ...]]] = {
    _FAMILY_ZEN3_4: {
        "Milan": (range(0x00, _FIRST_GENOA_MODEL),),
        "Genoa": (range(_FIRST_GENOA_MODEL, 0x20), _ZEN4C_MODELS),
    },
    _FAMILY_ZEN5: {"Turin": (range(0x00, 0x20),)},
}

PRODUCTS = ("Milan", "Genoa", "Turin")
"""The AMD product families this verifier knows, as AMD KDS and the ARK/ASK common names spell them."""

CPU_FAMILY_BY_PRODUCT = {"Milan": _FAMILY_ZEN3_4, "Genoa": _FAMILY_ZEN3_4, "Turin": _FAMILY_ZEN5}
"""The CPUID family each product reports (Milan and Genoa share Zen 3/4's family)."""

# GUEST_POLICY bits 26-63 are reserved, must be zero (bit 25, PAGE_SWAP_DISABLE, is the last the
# ABI defines). The policy is what the guest owner allowed the host (debug, a migration agent):
# a bit a newer firmware defines is refused until this verifier knows what it lets the host do.
GUEST_POLICY_RESERVED_SHIFT = 26
# GUEST_POLICY bit 17 is reserved and must be one: the firmware refuses to launch a guest whose
# policy clears it, so a report that clears it was not written by SEV-SNP firmware.
GUEST_POLICY_MUST_BE_ONE_BIT = 17

# PLATFORM_INFO bits 8-63 are reserved, must be zero. Bits 0-5 and 7 are the ABI's named flags;
# bit 6 is set by genuine Turin firmware (the Azure Turin vector), so it is accepted unnamed.
PLATFORM_INFO_RESERVED_SHIFT = 8

# VMPL: 0-3 for a report the guest asked for (MSG_REPORT_REQ); the firmware writes 0xFFFFFFFF in
# one the hypervisor asked for (SNP_HV_REPORT_REQ, ABI 1.57), whose REPORT_DATA the guest never
# chose. No other value is defined.
MAX_GUEST_VMPL = 3
VMPL_HOST_REQUESTED = 0xFFFFFFFF

SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
SIGNING_KEY_NONE = 7
_SIGNING_KEY_NAMES = {SIGNING_KEY_VCEK: "VCEK", SIGNING_KEY_VLEK: "VLEK", SIGNING_KEY_NONE: "NONE"}


def _product_of(family: int, model: int) -> str | None:
    """The product (chain) of a CPUID family and model, or ``None`` for one that is no SEV-SNP
    part this verifier knows."""
    products = _MODELS.get(family, {})
    return next((p for p, ranges in products.items() if any(model in r for r in ranges)), None)


@dataclass(frozen=True)
class TcbVersion:
    """A decoded TCB_VERSION. ``fmc`` is set only for the Turin layout."""

    raw: int
    turin_layout: bool
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, *, turin_layout: bool) -> TcbVersion:
        """Decodes the 64-bit little-endian TCB_VERSION value with the given byte layout."""
        b = raw.to_bytes(8, "little")
        if turin_layout:
            return cls(raw, True, bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(raw, False, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    @classmethod
    def from_components(
        cls,
        *,
        bootloader: int,
        tee: int,
        snp: int,
        microcode: int,
        fmc: int | None = None,
    ) -> TcbVersion:
        """Builds a TCB version from its components (Turin layout when ``fmc`` is given)."""
        for value in (bootloader, tee, snp, microcode, fmc or 0):
            if not 0 <= value <= 0xFF:
                raise ValueError("TCB components are single bytes")
        if fmc is not None:
            b = bytes([fmc, bootloader, tee, snp, 0, 0, 0, microcode])
        else:
            b = bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
        return cls.decode(int.from_bytes(b, "little"), turin_layout=fmc is not None)

    def components(self) -> dict[str, int]:
        """The named components, in the order AMD lists them (FMC first on Turin)."""
        out: dict[str, int] = {}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        out.update(bootloader=self.bootloader, tee=self.tee, snp=self.snp, microcode=self.microcode)
        return out

    def reserved_bytes_zero(self) -> bool:
        """True when the layout's reserved bytes are zero (KDS-issued TCBs always have them zero)."""
        b = self.raw.to_bytes(8, "little")
        return not any(b[4:7]) if self.turin_layout else not any(b[2:6])


@dataclass(frozen=True)
class SnpPolicy:
    """The guest policy the VM was launched with (ABI ``GUEST_POLICY``)."""

    raw: int

    @property
    def abi_minor(self) -> int:
        """Minimum ABI minor version required by the guest."""
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        """Minimum ABI major version required by the guest."""
        return (self.raw >> 8) & 0xFF

    def _bit(self, n: int) -> bool:
        return bool((self.raw >> n) & 1)

    @property
    def smt(self) -> bool:
        """SMT is allowed on the host."""
        return self._bit(16)

    @property
    def reserved_1(self) -> bool:
        """Bit 17, which the ABI requires to be 1."""
        return self._bit(17)

    @property
    def migrate_ma(self) -> bool:
        """Association with a migration agent is allowed."""
        return self._bit(18)

    @property
    def debug(self) -> bool:
        """Debugging is allowed: the hypervisor can read and write guest memory."""
        return self._bit(19)

    @property
    def single_socket(self) -> bool:
        """The guest may only run on a single socket."""
        return self._bit(20)

    @property
    def cxl_allow(self) -> bool:
        """CXL may be populated with guest memory."""
        return self._bit(21)

    @property
    def mem_aes_256_xts(self) -> bool:
        """AES-256-XTS memory encryption is required."""
        return self._bit(22)

    @property
    def rapl_dis(self) -> bool:
        """Running Average Power Limit must be disabled."""
        return self._bit(23)

    @property
    def ciphertext_hiding(self) -> bool:
        """Ciphertext hiding must be enabled."""
        return self._bit(24)

    @property
    def page_swap_disable(self) -> bool:
        """Guest page swapping is disabled."""
        return self._bit(25)

    def flags(self) -> dict[str, bool]:
        """Every decoded flag by name."""
        return {
            "smt": self.smt,
            "reserved_1": self.reserved_1,
            "migrate_ma": self.migrate_ma,
            "debug": self.debug,
            "single_socket": self.single_socket,
            "cxl_allow": self.cxl_allow,
            "mem_aes_256_xts": self.mem_aes_256_xts,
            "rapl_dis": self.rapl_dis,
            "ciphertext_hiding": self.ciphertext_hiding,
            "page_swap_disable": self.page_swap_disable,
        }


@dataclass(frozen=True)
class PlatformInfo:
    """The host platform state (ABI ``PLATFORM_INFO``)."""

    raw: int

    def flags(self) -> dict[str, bool]:
        """Every decoded flag by name."""
        names = (
            "smt_enabled",
            "tsme_enabled",
            "ecc_enabled",
            "rapl_disabled",
            "ciphertext_hiding_enabled",
            "alias_check_complete",
            None,
            "tio_enabled",
        )
        return {name: bool((self.raw >> i) & 1) for i, name in enumerate(names) if name}


@dataclass(frozen=True)
class FirmwareVersion:
    """A firmware version ``major.minor.build``."""

    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True)
class SnpReport:
    """A parsed, not yet verified, SEV-SNP attestation report."""

    raw: bytes
    version: int
    guest_svn: int
    policy: SnpPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers (``0x000..0x29F``)."""
        return self.raw[:SIGNED_LENGTH]

    @property
    def signing_key_name(self) -> str:
        """``VCEK``, ``VLEK`` or ``NONE`` from the report's SIGNING_KEY field."""
        return _SIGNING_KEY_NAMES.get(self.signing_key, f"RESERVED_{self.signing_key}")

    @property
    def turin_layout(self) -> bool:
        """True when the report comes from a Turin (Zen 5) processor."""
        return self.cpuid_fam_id == _FAMILY_ZEN5

    @property
    def product(self) -> str | None:
        """The product named by the report's CPUID fields, or None (version 2 or an unknown family):
        the chain (ARK/ASK, KDS product) its VCEK/VLEK must come from. Family 0x19 below model 0x10
        is Milan, 0x10-0x1F Genoa, as are Siena and Bergamo (models 0xA0-0xAF; the parser refuses
        the family's other models); family 0x1A models 0x00-0x1F Turin (likewise)."""
        if self.cpuid_fam_id is None:
            return None
        return _product_of(self.cpuid_fam_id, self.cpuid_mod_id or 0)

    @property
    def processor(self) -> str | None:
        """The processor line the CPUID fields name, for messages: :attr:`product`, except
        ``Siena/Bergamo`` for family 0x19 models 0xA0-0xAF, whose product (chain) is Genoa's."""
        if self.product == "Genoa" and (self.cpuid_mod_id or 0) in _ZEN4C_MODELS:
            return "Siena/Bergamo"
        return self.product

    def chip_id_for_kds(self) -> bytes:
        """The hardware ID as AMD KDS and the VCEK ``hwID`` extension use it (8 bytes on Turin)."""
        return self.chip_id[:8] if self.turin_layout else self.chip_id

    @property
    def chip_id_masked(self) -> bool:
        """True when the firmware zeroed CHIP_ID (the platform's MASK_CHIP_ID is set)."""
        return not any(self.chip_id)

    @property
    def host_requested(self) -> bool:
        """True when the hypervisor, not the guest, asked for the report (VMPL 0xFFFFFFFF)."""
        return self.vmpl == VMPL_HOST_REQUESTED

    def __repr__(self) -> str:
        return (
            f"SnpReport(version={self.version}, vmpl={self.vmpl}, "
            f"measurement={self.measurement.hex()}, signing_key={self.signing_key_name})"
        )


def _u32(data: bytes, off: int) -> int:
    value: int = struct.unpack_from("<I", data, off)[0]
    return value


def _u64(data: bytes, off: int) -> int:
    value: int = struct.unpack_from("<Q", data, off)[0]
    return value


def _mbz(data: bytes, start: int, end: int, what: str) -> None:
    if any(data[start:end]):
        raise MalformedEvidence(
            f"SNP report reserved field {what} (0x{start:03X}..0x{end - 1:03X}) is not zero",
            reason=Reason.BAD_FIELD,
        )


def _no_reserved_bits(what: str, value: int, first_reserved: int) -> None:
    """MalformedEvidence(BAD_FIELD) naming the bits of ``value`` from ``first_reserved`` up
    that are set: reserved by every SEV-SNP ABI this verifier knows."""
    if value >> first_reserved:
        bits = [b for b in range(first_reserved, 64) if (value >> b) & 1]
        raise MalformedEvidence(
            f"SNP report {what} 0x{value:x} sets reserved bit(s) "
            f"{', '.join(map(str, bits))}, which no SEV-SNP ABI this verifier knows defines",
            reason=Reason.BAD_FIELD,
        )


def unwrap_azure_hcl(data: bytes) -> bytes:
    """Returns the 1184-byte SNP report inside an Azure vTPM HCL report (``HCLA``, report at 0x20)."""
    if data[:4] != HCL_MAGIC:
        raise MalformedEvidence("not an Azure HCL report (no HCLA magic)", reason=Reason.BAD_FIELD)
    if len(data) < _HCL_RUNTIME_HEADER + 12:
        raise MalformedEvidence(
            f"Azure HCL report is {len(data)} bytes, too short to hold an SNP report",
            reason=Reason.TRUNCATED,
        )
    report_type = _u32(data, _HCL_RUNTIME_HEADER + 8)
    if report_type != _HCL_REPORT_TYPE_SNP:
        raise MalformedEvidence(
            f"Azure HCL report carries report type {report_type}, not SEV-SNP",
            reason=Reason.UNKNOWN_EVIDENCE_FORMAT,
        )
    return bytes(data[HCL_REPORT_OFFSET:_HCL_RUNTIME_HEADER])


def is_azure_hcl(data: bytes) -> bool:
    """True when the bytes start like an Azure vTPM HCL report."""
    return data[:4] == HCL_MAGIC


def parse_snp_report(data: bytes) -> SnpReport:
    """Parses a raw SNP report, or one wrapped in an Azure HCL report.

    Raises :class:`MalformedEvidence` for a wrong size, an unsupported version or signature
    algorithm, or a non-zero reserved field.
    """
    if is_azure_hcl(data):
        data = unwrap_azure_hcl(data)
    if len(data) != REPORT_SIZE_BYTES:
        raise MalformedEvidence(
            f"SNP report is {len(data)} bytes; expected {REPORT_SIZE_BYTES}",
            reason=Reason.TRUNCATED if len(data) < REPORT_SIZE_BYTES else Reason.REPORT_SIZE,
        )
    data = bytes(data)
    version = _u32(data, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(
            f"SNP report version {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
            reason=Reason.UNSUPPORTED_VERSION,
        )
    sig_algo = _u32(data, 0x34)
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise MalformedEvidence(
            f"SNP report signature algorithm {sig_algo} is not ECDSA P-384 with SHA-384",
            reason=Reason.UNSUPPORTED_SIGNATURE_ALGORITHM,
        )
    policy = _u64(data, 0x08)
    _no_reserved_bits("guest policy", policy, GUEST_POLICY_RESERVED_SHIFT)
    if not (policy >> GUEST_POLICY_MUST_BE_ONE_BIT) & 1:
        raise MalformedEvidence(
            f"SNP report guest policy 0x{policy:x} clears bit {GUEST_POLICY_MUST_BE_ONE_BIT}, "
            "which the SEV-SNP ABI requires to be one (no firmware launches such a guest)",
            reason=Reason.BAD_FIELD,
        )
    platform_info = _u64(data, 0x40)
    _no_reserved_bits("PLATFORM_INFO", platform_info, PLATFORM_INFO_RESERVED_SHIFT)
    vmpl = _u32(data, 0x30)
    if MAX_GUEST_VMPL < vmpl < VMPL_HOST_REQUESTED:
        raise MalformedEvidence(
            f"SNP report VMPL {vmpl} is neither a guest VMPL (0-3) nor a host request (0xFFFFFFFF)",
            reason=Reason.BAD_FIELD,
        )
    key_info = _u32(data, 0x48)
    if key_info >> 5:
        raise MalformedEvidence(
            "SNP report key-info reserved bits are set", reason=Reason.BAD_FIELD
        )
    if (key_info >> 2) & 0x7 not in _SIGNING_KEY_NAMES:
        raise MalformedEvidence(
            f"SNP report SIGNING_KEY {(key_info >> 2) & 0x7} is reserved (0 VCEK, 1 VLEK, 7 none)",
            reason=Reason.BAD_FIELD,
        )
    _mbz(data, 0x4C, 0x50, "RESERVED0")
    if version >= 3:  # 3 and 4: one layout
        fam, mod, step = data[0x188], data[0x189], data[0x18A]
        cpuid: tuple[int | None, int | None, int | None] = (fam, mod, step)
        _mbz(data, 0x18B, 0x1A0, "RESERVED1")
    else:
        cpuid = (None, None, None)
        _mbz(data, 0x188, 0x1A0, "RESERVED1")
    _mbz(data, 0x1EB, 0x1EC, "RESERVED2")
    _mbz(data, 0x1EF, 0x1F0, "RESERVED3")
    if version >= 5:  # the mitigation vectors; reserved (must be zero) in versions 2-4
        mit: tuple[int | None, int | None] = (_u64(data, 0x1F8), _u64(data, 0x200))
        _mbz(data, 0x208, SIGNED_LENGTH, "RESERVED4")
    else:
        mit = (None, None)
        _mbz(data, 0x1F8, SIGNED_LENGTH, "RESERVED4")
    _mbz(data, 0x330, REPORT_SIZE_BYTES, "SIGNATURE.RESERVED")
    turin = cpuid[0] == _FAMILY_ZEN5
    if cpuid[0] is not None and cpuid[0] not in (_FAMILY_ZEN3_4, _FAMILY_ZEN5):
        raise MalformedEvidence(
            f"SNP report CPUID family 0x{cpuid[0]:02X} is not a known SEV-SNP processor",
            reason=Reason.BAD_FIELD,
        )
    if cpuid[0] is not None and _product_of(cpuid[0], cpuid[1] or 0) is None:
        raise MalformedEvidence(
            f"SNP report CPUID family 0x{cpuid[0]:02X} model 0x{cpuid[1] or 0:02X} is not an "
            "SEV-SNP processor this verifier knows (family 0x19: Milan models 0x00-0x0F, Genoa "
            "0x10-0x1F, Siena/Bergamo 0xA0-0xAF; family 0x1A: Turin 0x00-0x1F)",
            reason=Reason.UNSUPPORTED_PROCESSOR,
        )

    def tcb(off: int) -> TcbVersion:
        return TcbVersion.decode(_u64(data, off), turin_layout=turin)

    # The reserved bytes of the firmware's TCB_VERSION fields must be zero as well. REPORTED_TCB's
    # are judged with the VCEK's TCB (TCB_MISMATCH, verify.snp), the others here.
    for off, what in ((0x38, "CURRENT_TCB"), (0x1E0, "COMMITTED_TCB"), (0x1F0, "LAUNCH_TCB")):
        if not tcb(off).reserved_bytes_zero():
            raise MalformedEvidence(
                f"SNP report {what} (0x{off:03X}) sets its reserved bytes", reason=Reason.BAD_FIELD
            )

    return SnpReport(
        raw=data,
        version=version,
        guest_svn=_u32(data, 0x04),
        policy=SnpPolicy(policy),
        family_id=data[0x10:0x20],
        image_id=data[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=tcb(0x38),
        platform_info=PlatformInfo(platform_info),
        author_key_en=bool(key_info & 1),
        mask_chip_key=bool((key_info >> 1) & 1),
        signing_key=(key_info >> 2) & 0x7,
        report_data=data[0x50:0x90],
        measurement=data[0x90:0xC0],
        host_data=data[0xC0:0xE0],
        id_key_digest=data[0xE0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=cpuid[0],
        cpuid_mod_id=cpuid[1],
        cpuid_step=cpuid[2],
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_version=FirmwareVersion(major=data[0x1EA], minor=data[0x1E9], build=data[0x1E8]),
        committed_version=FirmwareVersion(major=data[0x1EE], minor=data[0x1ED], build=data[0x1EC]),
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=mit[0],
        current_mit_vector=mit[1],
        signature_r=int.from_bytes(data[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(data[0x2E8:0x330], "little"),
    )


def build_report_body(fields: dict[str, Any]) -> bytearray:
    """Builds the 1184-byte report layout from named fields (used by the simulated attester).

    ``fields`` holds the same names as :class:`SnpReport` with integer, bytes or TcbVersion values;
    the signature area is left zero for the caller to fill.
    """
    buf = bytearray(REPORT_SIZE_BYTES)

    def put(off: int, value: bytes, size: int) -> None:
        if len(value) != size:
            raise ValueError(f"field at 0x{off:03X} must be {size} bytes")
        buf[off : off + size] = value

    struct.pack_into("<I", buf, 0x00, fields["version"])
    struct.pack_into("<I", buf, 0x04, fields.get("guest_svn", 0))
    struct.pack_into("<Q", buf, 0x08, fields["policy"])
    put(0x10, fields.get("family_id", bytes(16)), 16)
    put(0x20, fields.get("image_id", bytes(16)), 16)
    struct.pack_into("<I", buf, 0x30, fields.get("vmpl", 0))
    struct.pack_into("<I", buf, 0x34, SIG_ALGO_ECDSA_P384_SHA384)
    struct.pack_into("<Q", buf, 0x38, fields["current_tcb"].raw)
    struct.pack_into("<Q", buf, 0x40, fields.get("platform_info", 0))
    key_info = (
        int(fields.get("author_key_en", False))
        | int(fields.get("mask_chip_key", False)) << 1
        | (fields.get("signing_key", SIGNING_KEY_VCEK) & 0x7) << 2
    )
    struct.pack_into("<I", buf, 0x48, key_info)
    put(0x50, fields["report_data"], 64)
    put(0x90, fields["measurement"], 48)
    put(0xC0, fields.get("host_data", bytes(32)), 32)
    put(0xE0, fields.get("id_key_digest", bytes(48)), 48)
    put(0x110, fields.get("author_key_digest", bytes(48)), 48)
    put(0x140, fields.get("report_id", bytes(32)), 32)
    put(0x160, fields.get("report_id_ma", b"\xff" * 32), 32)
    struct.pack_into("<Q", buf, 0x180, fields["reported_tcb"].raw)
    if fields["version"] >= 3:
        buf[0x188] = fields.get("cpuid_fam_id", _FAMILY_ZEN3_4)
        buf[0x189] = fields.get("cpuid_mod_id", 0x01)
        buf[0x18A] = fields.get("cpuid_step", 0x01)
    put(0x1A0, fields["chip_id"], 64)
    struct.pack_into("<Q", buf, 0x1E0, fields["committed_tcb"].raw)
    cur: FirmwareVersion = fields["current_version"]
    com: FirmwareVersion = fields["committed_version"]
    buf[0x1E8:0x1EB] = bytes([cur.build, cur.minor, cur.major])
    buf[0x1EC:0x1EF] = bytes([com.build, com.minor, com.major])
    struct.pack_into("<Q", buf, 0x1F0, fields["launch_tcb"].raw)
    if fields["version"] >= 5:
        struct.pack_into("<Q", buf, 0x1F8, fields.get("launch_mit_vector", 0))
        struct.pack_into("<Q", buf, 0x200, fields.get("current_mit_vector", 0))
    return buf
