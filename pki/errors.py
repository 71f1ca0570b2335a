"""The PKI's failures, as branches of the one Strongroom exception tree.

Malformed input, a verification failure and an unavailable CA are different branches: callers retry
only :class:`CaUnavailable`.
"""

from __future__ import annotations

from strongroom.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from strongroom.reasons import Reason


class InvalidPkiConfig(InvalidArgument):
    """A CA directory, duration, address or authorisation table is malformed."""

    default_reason = Reason.INVALID_PKI_CONFIG


class CaUnavailable(Unavailable):
    """The CA could not be reached or answered with a server-side error; retrying may help."""

    default_reason = Reason.CA_UNAVAILABLE


class CaRejected(PermissionDenied):
    """The CA refused a request (bad token, SANs not matching the token, renewal refused)."""

    default_reason = Reason.CA_REJECTED


class CertificateInvalid(PermissionDenied):
    """A certificate or chain failed verification against the pinned root, or does not match its key."""

    default_reason = Reason.CERTIFICATE_INVALID


class NoIdentity(FailedPrecondition):
    """No usable workload identity: nothing persisted (or expired) and no enrolment token given."""

    default_reason = Reason.NO_IDENTITY


class IdentityMismatch(FailedPrecondition):
    """An enrolment token asks for another SPIFFE ID than the workload's own (it is not used)."""

    default_reason = Reason.IDENTITY_MISMATCH


class IdentityClosed(FailedPrecondition):
    """The workload identity was closed and can no longer be used."""

    default_reason = Reason.IDENTITY_CLOSED


class PeerUnauthenticated(Unauthenticated):
    """The peer presented no usable certificate (missing, malformed, expired or foreign)."""

    default_reason = Reason.PEER_UNAUTHENTICATED


class PeerNotAllowed(PermissionDenied):
    """The peer is authenticated but its SPIFFE ID may not call this method."""

    default_reason = Reason.PEER_NOT_ALLOWED
