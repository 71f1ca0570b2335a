"""The attestation exception tree: malformed evidence, failed verification, unavailable collateral,
policy violations.

Each branch maps to a different gRPC status through the shared runtime tree, so a caller can tell a
request it must fix (``InvalidArgument``) from evidence that is not trusted (``PermissionDenied``) and
from a dependency that may come back (``Unavailable``). Every error carries a stable reason code from
:class:`strongroom.reasons.Reason`; the message says what was checked, never key material.
"""

from __future__ import annotations

from strongroom.errors import InvalidArgument, PermissionDenied, Unavailable
from strongroom.reasons import Reason


class MalformedEvidence(InvalidArgument):
    """The evidence (report, quote, certificate or collateral) is not well-formed.

    Raised while parsing, before any signature is looked at: the bytes cannot be what they claim to
    be. This is never raised for a structurally valid report with a bad signature.
    """

    default_reason = Reason.MALFORMED_EVIDENCE


class VerificationFailed(PermissionDenied):
    """The evidence is well-formed but not authentic: a signature, chain or binding check failed."""

    default_reason = Reason.VERIFICATION_FAILED


class CollateralUnavailable(Unavailable):
    """Collateral needed to verify the evidence (VCEK, TCB info, ...) is missing or unfetchable."""

    default_reason = Reason.COLLATERAL_MISSING


class PolicyViolation(PermissionDenied):
    """Authentic evidence that the release policy does not allow."""

    default_reason = Reason.POLICY_VIOLATION


class PolicyInvalid(InvalidArgument):
    """A release-policy document does not follow the schema (see ``services/keybroker/POLICY.md``)."""

    default_reason = Reason.POLICY_BAD_VALUE
