"""The ``Evidence`` domain type, mirroring ``strongroom.api.attestation.v1.Evidence``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strongroom.attestation.errors import MalformedEvidence
from strongroom.reasons import Reason

if TYPE_CHECKING:
    from strongroom.api.attestation.v1 import evidence_pb2

# Evidence arrives over the network: bound what we are willing to hold before parsing.
MAX_REPORT_BYTES = 64 * 1024
MAX_CERTIFICATES = 8
MAX_COLLATERAL = 16
MAX_ITEM_BYTES = 256 * 1024


class TeeType(enum.Enum):
    """The confidential-computing technology that produced the evidence."""

    SEV_SNP = "SEV_SNP"
    TDX = "TDX"


class CollateralKind(enum.Enum):
    """What a collateral document is."""

    TDX_TCB_INFO = "TDX_TCB_INFO"
    TDX_QE_IDENTITY = "TDX_QE_IDENTITY"
    CRL = "CRL"
    TCB_SIGNING_CHAIN = "TCB_SIGNING_CHAIN"


_TEE_TO_PROTO = {TeeType.SEV_SNP: 1, TeeType.TDX: 2}
_KIND_TO_PROTO = {
    CollateralKind.TDX_TCB_INFO: 1,
    CollateralKind.TDX_QE_IDENTITY: 2,
    CollateralKind.CRL: 3,
    CollateralKind.TCB_SIGNING_CHAIN: 4,
}


@dataclass(frozen=True)
class Collateral:
    """One supporting document (TCB info, QE identity, CRL, TCB-signing chain)."""

    kind: CollateralKind
    data: bytes

    def __repr__(self) -> str:
        return f"Collateral({self.kind.value}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class Evidence:
    """A hardware attestation report or quote plus what is needed to verify it.

    ``report`` is the report exactly as produced (SNP raw or Azure HCL-wrapped; TDX quote).
    ``certificates`` holds DER or PEM certificates (for SNP: the VCEK or VLEK; AMD roots are pinned).
    """

    tee_type: TeeType
    report: bytes
    certificates: tuple[bytes, ...] = ()
    collateral: tuple[Collateral, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.report) > MAX_REPORT_BYTES:
            raise MalformedEvidence("evidence report is too large", reason=Reason.REPORT_SIZE)
        if len(self.certificates) > MAX_CERTIFICATES or len(self.collateral) > MAX_COLLATERAL:
            raise MalformedEvidence(
                "too many certificates or collateral items", reason=Reason.BAD_COLLATERAL
            )
        if any(len(c) > MAX_ITEM_BYTES for c in self.certificates) or any(
            len(c.data) > MAX_ITEM_BYTES for c in self.collateral
        ):
            raise MalformedEvidence(
                "certificate or collateral item is too large", reason=Reason.BAD_COLLATERAL
            )

    def __repr__(self) -> str:
        return (
            f"Evidence({self.tee_type.value}, report={len(self.report)} bytes, "
            f"certificates={len(self.certificates)}, collateral={list(self.collateral)!r})"
        )

    def collateral_of(self, kind: CollateralKind) -> list[bytes]:
        """The data of every collateral item of the given kind, in order."""
        return [c.data for c in self.collateral if c.kind is kind]

    @classmethod
    def from_proto(cls, message: evidence_pb2.Evidence) -> Evidence:
        """Converts the wire message; an unspecified TEE or collateral kind is malformed."""
        tee = {v: k for k, v in _TEE_TO_PROTO.items()}.get(int(message.tee_type))
        if tee is None:
            raise MalformedEvidence(
                "evidence tee_type is unspecified", reason=Reason.TEE_TYPE_UNSPECIFIED
            )
        kinds = {v: k for k, v in _KIND_TO_PROTO.items()}
        collateral: list[Collateral] = []
        for item in message.collateral:
            kind = kinds.get(int(item.kind))
            if kind is None:
                raise MalformedEvidence(
                    "collateral kind is unspecified", reason=Reason.BAD_COLLATERAL
                )
            collateral.append(Collateral(kind, bytes(item.data)))
        return cls(
            tee_type=tee,
            report=bytes(message.report),
            certificates=tuple(bytes(c) for c in message.certificates),
            collateral=tuple(collateral),
        )

    def to_proto(self) -> evidence_pb2.Evidence:
        """Converts to the wire message."""
        from strongroom.api.attestation.v1 import evidence_pb2

        message = evidence_pb2.Evidence(
            tee_type=_TEE_TO_PROTO[self.tee_type],  # type: ignore[arg-type]
            report=self.report,
            certificates=list(self.certificates),
        )
        for item in self.collateral:
            message.collateral.add(kind=_KIND_TO_PROTO[item.kind], data=item.data)
        return message
