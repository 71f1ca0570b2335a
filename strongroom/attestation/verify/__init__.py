"""Verification: signatures, certificate chains to the pinned roots, and collateral.

:func:`verify_evidence` is the one entry point. It sees parsed types only (parsing happens first,
in ``strongroom.attestation.abi``) and returns verified claims; judging those claims against a
release policy is a separate step (``strongroom.attestation.policy``).
"""

from __future__ import annotations

import logging
from datetime import datetime

from strongroom.attestation.claims import SnpClaims, TdxClaims
from strongroom.attestation.collateral import CollateralSource
from strongroom.attestation.evidence import Evidence, TeeType
from strongroom.attestation.trust import TrustStore
from strongroom.errors import StrongroomError

logger = logging.getLogger(__name__)


def verify_evidence(
    evidence: Evidence,
    *,
    trust: TrustStore,
    now: datetime,
    collateral: CollateralSource | None = None,
) -> SnpClaims | TdxClaims:
    """Verifies SEV-SNP or TDX evidence as of ``now`` and returns its verified claims.

    Raises :class:`~strongroom.attestation.errors.MalformedEvidence` for input that cannot be
    parsed, :class:`~strongroom.attestation.errors.VerificationFailed` when a signature, chain or
    binding check fails, and :class:`~strongroom.attestation.errors.CollateralUnavailable` when a
    needed certificate or collateral document is missing or cannot be fetched.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        if evidence.tee_type is TeeType.SEV_SNP:
            from strongroom.attestation.verify.snp import verify_snp

            claims: SnpClaims | TdxClaims = verify_snp(
                evidence, trust=trust, now=now, collateral=collateral
            )
        else:
            from strongroom.attestation.verify.tdx import verify_tdx

            claims = verify_tdx(evidence, trust=trust, now=now, collateral=collateral)
    except StrongroomError as exc:
        logger.info(
            "attestation evidence rejected",
            extra={
                "tee_type": evidence.tee_type.value,
                "reason": exc.reason,
                "detail": exc.message,
            },
        )
        raise
    return claims
