"""Attestation evidence for key release: parse, verify, validate.

* ``abi``: parse SEV-SNP reports and TDX quotes (structure only) into typed values;
* ``verify``: check signatures and chains to the pinned roots (:func:`verify_evidence`);
* ``policy``: judge verified claims against a versioned release policy (:class:`ReleasePolicy`),
  with each TEE's section and checks in ``rules`` (one module per TEE, registered like verifiers);
* ``binding``: the REPORT_DATA binding shared by the key broker and the inference server;
* the simulated TEE authority lives in the development kit (``strongroom.dev.simulated``).
"""

from strongroom.attestation.claims import SnpClaims, TdxClaims, VerifiedClaims
from strongroom.attestation.collateral import CollateralSource, StaticCollateralSource
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    PolicyInvalid,
    PolicyViolation,
    VerificationFailed,
)
from strongroom.attestation.evidence import Collateral, CollateralKind, Evidence, TeeType
from strongroom.attestation.trust import TrustStore
from strongroom.attestation.verify import verify_evidence

__all__ = [
    "Collateral",
    "CollateralKind",
    "CollateralSource",
    "CollateralUnavailable",
    "Evidence",
    "MalformedEvidence",
    "PolicyInvalid",
    "PolicyViolation",
    "SnpClaims",
    "StaticCollateralSource",
    "TdxClaims",
    "TeeType",
    "TrustStore",
    "VerificationFailed",
    "VerifiedClaims",
    "verify_evidence",
]
