"""The attester interface: 64 bytes of REPORT_DATA in, hardware evidence out."""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

from strongroom.api.attestation.v1 import evidence_pb2
from strongroom.attestation.evidence import Collateral, CollateralKind, Evidence, TeeType
from strongroom.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from strongroom.reasons import Reason

__all__ = [
    "REPORT_DATA_SIZE",
    "AttestationUnavailable",
    "Attester",
    "AttesterNotConfigured",
    "Collateral",
    "CollateralKind",
    "EvidenceBundle",
    "InvalidReportData",
    "ReportBindingMismatch",
    "TeeType",
    "check_echo",
    "require_report_data",
]

REPORT_DATA_SIZE = 64
"""REPORT_DATA is exactly this long for both SEV-SNP and TDX; it is never padded or truncated."""


@dataclasses.dataclass(frozen=True)
class EvidenceBundle:
    """A hardware report exactly as produced, plus what a verifier needs besides the pinned roots.

    ``certificates`` holds DER certificates (for SEV-SNP the VCEK or VLEK first, then ASK/ASVK and
    ARK when the host supplied them); ``source`` names the attester that produced the bundle.
    """

    tee_type: TeeType
    report: bytes
    certificates: tuple[bytes, ...] = ()
    collateral: tuple[Collateral, ...] = ()
    source: str = ""

    def __repr__(self) -> str:
        return (
            f"EvidenceBundle(tee_type={self.tee_type.name}, report={len(self.report)} bytes, "
            f"certificates={len(self.certificates)}, collateral={len(self.collateral)}, "
            f"source={self.source!r})"
        )

    def to_evidence(self) -> Evidence:
        """The attestation domain type the key broker verifies."""
        return Evidence(self.tee_type, self.report, self.certificates, self.collateral)

    def to_proto(self) -> evidence_pb2.Evidence:
        """The wire form (``strongroom.api.attestation.v1.Evidence``)."""
        return self.to_evidence().to_proto()


@runtime_checkable
class Attester(Protocol):
    """Produces fresh hardware evidence whose REPORT_DATA is exactly the 64 bytes given."""

    @property
    def tee_type(self) -> TeeType:
        """The kind of evidence :meth:`attest` returns."""
        ...

    def attest(self, report_data: bytes) -> EvidenceBundle:
        """Asks the hardware for a report binding ``report_data`` (exactly 64 bytes)."""
        ...


class InvalidReportData(InvalidArgument):
    """REPORT_DATA is not exactly 64 bytes (it is never padded or truncated to fit)."""

    default_reason = Reason.REPORT_DATA_INVALID


class AttestationUnavailable(Unavailable):
    """The attestation device, the kernel or the host failed to produce a report."""

    default_reason = Reason.ATTESTATION_UNAVAILABLE


class AttesterNotConfigured(FailedPrecondition):
    """No usable attester exists for the configuration (no device, simulator in production, ...)."""

    default_reason = Reason.ATTESTER_NOT_CONFIGURED


class ReportBindingMismatch(Internal):
    """The hardware returned a report whose REPORT_DATA is not the one requested."""

    default_reason = Reason.REPORT_DATA_NOT_ECHOED


def require_report_data(report_data: bytes) -> bytes:
    """Returns ``report_data`` as bytes if it is exactly 64 bytes long, else raises."""
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise InvalidReportData(f"REPORT_DATA must be bytes, not {type(report_data).__name__}")
    data = bytes(report_data)
    if len(data) != REPORT_DATA_SIZE:
        raise InvalidReportData(
            f"REPORT_DATA must be exactly {REPORT_DATA_SIZE} bytes, got {len(data)}",
            reason=Reason.REPORT_DATA_LENGTH,
        )
    return data


def check_echo(echoed: bytes, expected: bytes, what: str) -> None:
    """Raises unless the report carries exactly the REPORT_DATA that was requested."""
    if echoed != expected:
        raise ReportBindingMismatch(f"the {what} does not carry the requested REPORT_DATA")
