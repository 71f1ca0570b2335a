"""Verified claims: what a verifier vouches for after every signature and chain check passed.

Only the verifiers build these. The release policy (``policy.py``) reads them; ``as_dict()`` gives
a JSON-able view with hex strings for audit logs and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from strongroom.attestation.abi.snp import FirmwareVersion, PlatformInfo, SnpPolicy, TcbVersion
from strongroom.attestation.evidence import TeeType

# TCB statuses that are not Intel's but say why none applies.
TCB_NOT_EVALUATED = "NotEvaluated"
TCB_NO_MATCHING_LEVEL = "NoMatchingTcbLevel"


@dataclass(frozen=True)
class SnpClaims:
    """Verified claims of an AMD SEV-SNP report."""

    version: int
    product: str
    signing_key: str  # "VCEK" or "VLEK"
    measurement: bytes
    report_data: bytes
    host_data: bytes
    family_id: bytes
    image_id: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    policy: SnpPolicy
    platform_info: PlatformInfo
    vmpl: int
    guest_svn: int
    chip_id: bytes
    reported_tcb: TcbVersion
    committed_tcb: TcbVersion
    current_tcb: TcbVersion
    launch_tcb: TcbVersion
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    simulated: bool
    revocation_checked: bool = False
    # The cloud a VLEK was issued to (its CSP_ID extension); None for a VCEK.
    vlek_csp_id: str | None = None

    tee_type = TeeType.SEV_SNP

    @property
    def collateral_complete(self) -> bool:
        """Revocation was checked against the verifier's own, current CRL."""
        return self.revocation_checked

    @property
    def debug(self) -> bool:
        """The guest policy allows debugging."""
        return self.policy.debug

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able view (bytes as lowercase hex)."""
        return {
            "tee_type": self.tee_type.value,
            "version": self.version,
            "product": self.product,
            "signing_key": self.signing_key,
            "measurement": self.measurement.hex(),
            "report_data": self.report_data.hex(),
            "host_data": self.host_data.hex(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "policy": f"0x{self.policy.raw:x}",
            "policy_flags": self.policy.flags(),
            "abi": f"{self.policy.abi_major}.{self.policy.abi_minor}",
            "debug": self.policy.debug,
            "platform_info": f"0x{self.platform_info.raw:x}",
            "platform_flags": self.platform_info.flags(),
            "vmpl": self.vmpl,
            "guest_svn": self.guest_svn,
            "chip_id": self.chip_id.hex(),
            "reported_tcb": self.reported_tcb.components(),
            "committed_tcb": self.committed_tcb.components(),
            "current_tcb": self.current_tcb.components(),
            "launch_tcb": self.launch_tcb.components(),
            "firmware": str(self.current_version),
            "committed_firmware": str(self.committed_version),
            "simulated": self.simulated,
            "revocation_checked": self.revocation_checked,
            **({"vlek_csp_id": self.vlek_csp_id} if self.vlek_csp_id is not None else {}),
        }


@dataclass(frozen=True)
class TdxClaims:
    """Verified claims of an Intel TDX quote, with the evaluated TCB status."""

    version: int
    body_type: str  # "TD1.0" or "TD1.5"
    tee_tcb_svn: bytes
    tee_tcb_svn2: bytes | None
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    mr_servicetd: bytes | None
    debug: bool
    fmspc: bytes
    pce_id: bytes
    pcesvn: int
    cpusvn: bytes
    sgx_type: int
    qe_isv_svn: int
    tcb_status: str
    platform_tcb_status: str
    tdx_module_tcb_status: str | None
    qe_tcb_status: str | None
    tcb_date: str | None
    advisory_ids: tuple[str, ...]
    collateral_evaluated: bool
    simulated: bool
    revocation_checked: bool = False
    qe_identity_checked: bool = False
    tcb_evaluation_data_number: int | None = None

    tee_type = TeeType.TDX

    @property
    def collateral_complete(self) -> bool:
        """TCB info, QE identity and CRLs all came from the verifier and were checked."""
        return self.collateral_evaluated and self.qe_identity_checked and self.revocation_checked

    @property
    def rtmr0(self) -> bytes:
        """Runtime measurement register 0 (firmware)."""
        return self.rtmrs[0]

    @property
    def rtmr1(self) -> bytes:
        """Runtime measurement register 1 (OS loader / kernel)."""
        return self.rtmrs[1]

    @property
    def rtmr2(self) -> bytes:
        """Runtime measurement register 2 (OS / applications)."""
        return self.rtmrs[2]

    @property
    def rtmr3(self) -> bytes:
        """Runtime measurement register 3 (reserved for the workload)."""
        return self.rtmrs[3]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able view (bytes as lowercase hex)."""
        out: dict[str, Any] = {
            "tee_type": self.tee_type.value,
            "version": self.version,
            "body_type": self.body_type,
            "mrtd": self.mrtd.hex(),
            "rtmr0": self.rtmrs[0].hex(),
            "rtmr1": self.rtmrs[1].hex(),
            "rtmr2": self.rtmrs[2].hex(),
            "rtmr3": self.rtmrs[3].hex(),
            "report_data": self.report_data.hex(),
            "td_attributes": self.td_attributes.hex(),
            "debug": self.debug,
            "xfam": self.xfam.hex(),
            "mrconfigid": self.mrconfigid.hex(),
            "mrowner": self.mrowner.hex(),
            "mrownerconfig": self.mrownerconfig.hex(),
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "mr_seam": self.mr_seam.hex(),
            "mr_signer_seam": self.mr_signer_seam.hex(),
            "seam_attributes": self.seam_attributes.hex(),
            "fmspc": self.fmspc.hex(),
            "pce_id": self.pce_id.hex(),
            "pcesvn": self.pcesvn,
            "cpusvn": self.cpusvn.hex(),
            "sgx_type": self.sgx_type,
            "qe_isv_svn": self.qe_isv_svn,
            "tcb_status": self.tcb_status,
            "platform_tcb_status": self.platform_tcb_status,
            "tdx_module_tcb_status": self.tdx_module_tcb_status,
            "qe_tcb_status": self.qe_tcb_status,
            "tcb_date": self.tcb_date,
            "advisory_ids": list(self.advisory_ids),
            "collateral_evaluated": self.collateral_evaluated,
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
            "revocation_checked": self.revocation_checked,
            "qe_identity_checked": self.qe_identity_checked,
            "simulated": self.simulated,
        }
        if self.tee_tcb_svn2 is not None:
            out["tee_tcb_svn2"] = self.tee_tcb_svn2.hex()
        if self.mr_servicetd is not None:
            out["mr_servicetd"] = self.mr_servicetd.hex()
        return out


class VerifiedClaims(Protocol):
    """What every TEE's verified claims offer; a TEE's own rules narrow to its claims type.

    A protocol rather than a union of the known types, so that a new TEE adds its claims class in
    its own module without touching this one.
    """

    @property
    def tee_type(self) -> TeeType:
        """The TEE that produced the evidence."""
        ...

    @property
    def report_data(self) -> bytes:
        """The report's caller-chosen binding field (the broker checks it holds its nonce)."""
        ...

    @property
    def simulated(self) -> bool:
        """The evidence chains to the simulated (test) authority."""
        ...

    @property
    def collateral_complete(self) -> bool:
        """Everything that judges the evidence came from the verifier and was checked."""
        ...

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able view for audit records and the CLI."""
        ...
