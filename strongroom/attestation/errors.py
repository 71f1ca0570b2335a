"""The attestation exception tree: malformed evidence, failed verification, unavailable collateral,
policy violations.

Each branch maps to a different gRPC status through the shared runtime tree, so a caller can tell a
request it must fix (``InvalidArgument``) from evidence that is not trusted (``PermissionDenied``) and
from a dependency that may come back (``Unavailable``). Every error carries a stable reason code from
the constants below; the message says what was checked, never key material.
"""

from __future__ import annotations

from strongroom.errors import InvalidArgument, PermissionDenied, Unavailable

# --- MalformedEvidence reasons (structure; nothing was verified yet) ---------------------------
BAD_ENCODING = "BAD_ENCODING"
UNKNOWN_EVIDENCE_FORMAT = "UNKNOWN_EVIDENCE_FORMAT"
TEE_TYPE_UNSPECIFIED = "TEE_TYPE_UNSPECIFIED"
REPORT_SIZE = "REPORT_SIZE"
TRUNCATED = "TRUNCATED"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
UNSUPPORTED_SIGNATURE_ALGORITHM = "UNSUPPORTED_SIGNATURE_ALGORITHM"
UNSUPPORTED_TEE_TYPE = "UNSUPPORTED_TEE_TYPE"
UNSUPPORTED_ATTESTATION_KEY_TYPE = "UNSUPPORTED_ATTESTATION_KEY_TYPE"
UNSUPPORTED_BODY_TYPE = "UNSUPPORTED_BODY_TYPE"
UNSUPPORTED_CERTIFICATION_DATA = "UNSUPPORTED_CERTIFICATION_DATA"
BAD_FIELD = "BAD_FIELD"
BAD_CERTIFICATE = "BAD_CERTIFICATE"
BAD_COLLATERAL = "BAD_COLLATERAL"
# Input that made a parser fail in a way no specific check anticipated (the safety net).
UNPARSEABLE_INPUT = "UNPARSEABLE_INPUT"

# --- VerificationFailed reasons (signatures, chains, bindings) -------------------------------------
REPORT_SIGNATURE_INVALID = "REPORT_SIGNATURE_INVALID"
QUOTE_SIGNATURE_INVALID = "QUOTE_SIGNATURE_INVALID"
QE_REPORT_SIGNATURE_INVALID = "QE_REPORT_SIGNATURE_INVALID"
QE_REPORT_DATA_MISMATCH = "QE_REPORT_DATA_MISMATCH"
CERT_CHAIN_INVALID = "CERT_CHAIN_INVALID"
ROOT_NOT_TRUSTED = "ROOT_NOT_TRUSTED"
INTERMEDIATE_NOT_PINNED = "INTERMEDIATE_NOT_PINNED"
CERT_NOT_VALID_AT_TIME = "CERT_NOT_VALID_AT_TIME"
CERT_REVOKED = "CERT_REVOKED"
CRL_SIGNATURE_INVALID = "CRL_SIGNATURE_INVALID"
WRONG_CERTIFICATE_TYPE = "WRONG_CERTIFICATE_TYPE"
SIGNING_KEY_MISMATCH = "SIGNING_KEY_MISMATCH"
PRODUCT_MISMATCH = "PRODUCT_MISMATCH"
TCB_MISMATCH = "TCB_MISMATCH"
HWID_MISMATCH = "HWID_MISMATCH"
COLLATERAL_SIGNATURE_INVALID = "COLLATERAL_SIGNATURE_INVALID"
COLLATERAL_EXPIRED = "COLLATERAL_EXPIRED"
COLLATERAL_NOT_YET_VALID = "COLLATERAL_NOT_YET_VALID"
COLLATERAL_ROLLBACK = "COLLATERAL_ROLLBACK"
COLLATERAL_MISMATCH = "COLLATERAL_MISMATCH"
FMSPC_MISMATCH = "FMSPC_MISMATCH"
TDX_MODULE_MISMATCH = "TDX_MODULE_MISMATCH"
QE_IDENTITY_MISMATCH = "QE_IDENTITY_MISMATCH"
REPORT_DATA_MISMATCH = "REPORT_DATA_MISMATCH"
TEE_TYPE_MISMATCH = "TEE_TYPE_MISMATCH"

# --- CollateralUnavailable reasons ---------------------------------------------------------------
COLLATERAL_MISSING = "COLLATERAL_MISSING"
COLLATERAL_FETCH_FAILED = "COLLATERAL_FETCH_FAILED"
COLLATERAL_STALE = "COLLATERAL_STALE"

# --- PolicyViolation reasons (validation of verified claims) ---------------------------------------
CALLER_NOT_ALLOWED = "CALLER_NOT_ALLOWED"
TEE_TYPE_NOT_ALLOWED = "TEE_TYPE_NOT_ALLOWED"
MEASUREMENT_NOT_ALLOWED = "MEASUREMENT_NOT_ALLOWED"
DEBUG_FORBIDDEN = "DEBUG_FORBIDDEN"
VMPL_NOT_ALLOWED = "VMPL_NOT_ALLOWED"
SMT_FORBIDDEN = "SMT_FORBIDDEN"
MIGRATE_MA_FORBIDDEN = "MIGRATE_MA_FORBIDDEN"
SIGNING_KEY_NOT_ALLOWED = "SIGNING_KEY_NOT_ALLOWED"
PRODUCT_NOT_ALLOWED = "PRODUCT_NOT_ALLOWED"
TCB_TOO_OLD = "TCB_TOO_OLD"
GUEST_SVN_TOO_OLD = "GUEST_SVN_TOO_OLD"
HOST_DATA_NOT_ALLOWED = "HOST_DATA_NOT_ALLOWED"
MRTD_NOT_ALLOWED = "MRTD_NOT_ALLOWED"
RTMR_NOT_ALLOWED = "RTMR_NOT_ALLOWED"
MRCONFIGID_NOT_ALLOWED = "MRCONFIGID_NOT_ALLOWED"
MROWNER_NOT_ALLOWED = "MROWNER_NOT_ALLOWED"
MROWNERCONFIG_NOT_ALLOWED = "MROWNERCONFIG_NOT_ALLOWED"
TCB_STATUS_NOT_ACCEPTED = "TCB_STATUS_NOT_ACCEPTED"
FMSPC_NOT_ALLOWED = "FMSPC_NOT_ALLOWED"
SIMULATED_TEE_NOT_ALLOWED = "SIMULATED_TEE_NOT_ALLOWED"
COLLATERAL_INCOMPLETE = "COLLATERAL_INCOMPLETE"
TCB_EVALUATION_TOO_OLD = "TCB_EVALUATION_TOO_OLD"

# --- PolicyInvalid reasons (loading a policy document) --------------------------------------------
POLICY_SYNTAX = "POLICY_SYNTAX"
POLICY_UNKNOWN_KEY = "POLICY_UNKNOWN_KEY"
POLICY_MISSING_KEY = "POLICY_MISSING_KEY"
POLICY_BAD_TYPE = "POLICY_BAD_TYPE"
POLICY_BAD_VALUE = "POLICY_BAD_VALUE"
POLICY_BAD_HEX = "POLICY_BAD_HEX"
POLICY_EMPTY_ALLOW_LIST = "POLICY_EMPTY_ALLOW_LIST"
POLICY_FOREIGN_TRUST_DOMAIN = "POLICY_FOREIGN_TRUST_DOMAIN"
POLICY_DEBUG_IN_PRODUCTION = "POLICY_DEBUG_IN_PRODUCTION"


class MalformedEvidence(InvalidArgument):
    """The evidence (report, quote, certificate or collateral) is not well-formed.

    Raised while parsing, before any signature is looked at: the bytes cannot be what they claim to
    be. This is never raised for a structurally valid report with a bad signature.
    """

    default_reason = "MALFORMED_EVIDENCE"


class VerificationFailed(PermissionDenied):
    """The evidence is well-formed but not authentic: a signature, chain or binding check failed."""

    default_reason = "VERIFICATION_FAILED"


class CollateralUnavailable(Unavailable):
    """Collateral needed to verify the evidence (VCEK, TCB info, ...) is missing or unfetchable."""

    default_reason = COLLATERAL_MISSING


class PolicyViolation(PermissionDenied):
    """Authentic evidence that the release policy does not allow."""

    default_reason = "POLICY_VIOLATION"


class PolicyInvalid(InvalidArgument):
    """A release-policy document does not follow the schema (see ``services/keybroker/POLICY.md``)."""

    default_reason = POLICY_BAD_VALUE
