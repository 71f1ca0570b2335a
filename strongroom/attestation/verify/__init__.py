"""Verification: signatures, certificate chains to the pinned roots, and collateral.

:func:`verify_evidence` is the one entry point. It sees parsed types only (parsing happens first,
in ``strongroom.attestation.abi``) and returns verified claims; judging those claims against a
release policy is a separate step (``strongroom.attestation.policy``).

What judges the evidence — CRLs, TDX TCB info, the TDX QE identity — comes only from the
``collateral`` source the caller owns (the broker's collateral cache, or files an operator named);
the collateral items an :class:`Evidence` carries are never read. With ``require_collateral`` (the
default, and the only mode of the release path) a missing document fails closed with
``COLLATERAL_MISSING`` and one past its next update by more than ``collateral_grace`` with
``COLLATERAL_STALE``.
"""

from __future__ import annotations

import importlib
import logging
import struct
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from strongroom.attestation.claims import VerifiedClaims
from strongroom.attestation.collateral import CollateralSource
from strongroom.attestation.errors import MalformedEvidence
from strongroom.attestation.evidence import Evidence, TeeType
from strongroom.attestation.trust import TrustStore
from strongroom.errors import StrongroomError
from strongroom.reasons import Reason

logger = logging.getLogger(__name__)


class Verifier(Protocol):
    """Verifies one TEE's evidence (parse, then signatures and chains, then bindings) as of
    ``now``, taking what judges it only from ``collateral``; returns the verified claims."""

    def __call__(
        self,
        evidence: Evidence,
        *,
        trust: TrustStore,
        now: datetime,
        collateral: CollateralSource | None,
        require_collateral: bool,
        grace: timedelta,
    ) -> VerifiedClaims: ...


# One verifier module per TEE, imported when first needed. A new TEE is a new module plus its entry
# here, and a rules module plus its entry in ``strongroom.attestation.rules._RULES``; nothing else
# dispatches on the TEE type (tests/attestation/test_registry.py runs a toy TEE through both).
_VERIFIERS: dict[TeeType, tuple[str, str]] = {
    TeeType.SEV_SNP: ("strongroom.attestation.verify.snp", "verify_snp"),
    TeeType.TDX: ("strongroom.attestation.verify.tdx", "verify_tdx"),
}


def _verifier(tee_type: TeeType) -> Verifier:
    entry = _VERIFIERS.get(tee_type)
    if entry is None:
        raise MalformedEvidence(
            f"no verifier for TEE type {tee_type.value}", reason=Reason.UNSUPPORTED_TEE_TYPE
        )
    module, name = entry
    verifier: Verifier = getattr(importlib.import_module(module), name)
    return verifier


def verify_evidence(
    evidence: Evidence,
    *,
    trust: TrustStore,
    now: datetime,
    collateral: CollateralSource | None = None,
    require_collateral: bool = True,
    collateral_grace: timedelta = timedelta(0),
) -> VerifiedClaims:
    """Verifies SEV-SNP or TDX evidence as of ``now`` and returns its verified claims.

    Raises :class:`~strongroom.attestation.errors.MalformedEvidence` for input that cannot be
    parsed, :class:`~strongroom.attestation.errors.VerificationFailed` when a signature, chain or
    binding check fails, and :class:`~strongroom.attestation.errors.CollateralUnavailable` when a
    needed certificate or collateral document is missing, stale or cannot be fetched. Nothing
    else escapes: an unanticipated parser failure on untrusted bytes becomes ``MalformedEvidence``
    (``Reason.UNPARSEABLE_INPUT``).

    ``require_collateral=False`` is for offline inspection only: missing CRLs, TCB info or QE
    identity are then tolerated and the claims say so (``collateral_complete`` is false, which
    every release policy refuses).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    verifier = _verifier(evidence.tee_type)
    try:
        claims = verifier(
            evidence,
            trust=trust,
            now=now,
            collateral=collateral,
            require_collateral=require_collateral,
            grace=collateral_grace,
        )
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
    except (
        ArithmeticError,
        LookupError,
        RecursionError,
        TypeError,
        ValueError,
        struct.error,  # not a ValueError
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.InvalidVersion,
    ) as exc:
        # A parser met input no specific check anticipated. The bytes are untrusted, so this
        # is malformed evidence, not a server fault; the type goes to the log for a fix.
        logger.warning(
            "attestation evidence rejected by a parser safety net",
            extra={"tee_type": evidence.tee_type.value, "error_type": type(exc).__name__},
        )
        raise MalformedEvidence(
            f"evidence or collateral could not be parsed ({type(exc).__name__})",
            reason=Reason.UNPARSEABLE_INPUT,
        ) from None
    return claims
