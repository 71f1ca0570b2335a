"""Key-broker specific exceptions and the stable reason codes this package raises.

Every failure is one of the shared :mod:`strongroom.errors` classes (so the one interceptor
maps it to a gRPC status) with a reason from :class:`Reason`. Two infrastructure failures get their
own subclasses because callers branch on them: :class:`HsmUnavailable` and :class:`AuditUnavailable`.
"""

from __future__ import annotations

from strongroom.errors import Unavailable


class Reason:
    """Stable UPPER_SNAKE reason codes raised by the key-broker library."""

    # Malformed requests (InvalidArgument)
    KEY_ID_INVALID = "KEY_ID_INVALID"
    KEY_VERSION_INVALID = "KEY_VERSION_INVALID"
    WRAPPED_KEY_INVALID = "WRAPPED_KEY_INVALID"
    EPHEMERAL_KEY_INVALID = "EPHEMERAL_KEY_INVALID"
    EPHEMERAL_KEY_UNSUPPORTED = "EPHEMERAL_KEY_UNSUPPORTED"
    OAEP_MECHANISM_INVALID = "OAEP_MECHANISM_INVALID"
    AUDIT_RECORD_INVALID = "AUDIT_RECORD_INVALID"
    # Lookups (NotFound / AlreadyExists)
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    KEY_VERSION_NOT_FOUND = "KEY_VERSION_NOT_FOUND"
    KEY_ALREADY_EXISTS = "KEY_ALREADY_EXISTS"
    AUDIT_LOG_NOT_FOUND = "AUDIT_LOG_NOT_FOUND"
    # State (FailedPrecondition)
    KEY_DISABLED = "KEY_DISABLED"
    OAEP_MECHANISM_UNSUPPORTED = "OAEP_MECHANISM_UNSUPPORTED"
    HSM_ALREADY_OPEN = "HSM_ALREADY_OPEN"
    # Infrastructure (HsmUnavailable / AuditUnavailable)
    HSM_UNAVAILABLE = "HSM_UNAVAILABLE"
    HSM_TIMEOUT = "HSM_TIMEOUT"
    HSM_LOGIN_FAILED = "HSM_LOGIN_FAILED"
    HSM_CLOSED = "HSM_CLOSED"
    HSM_OPERATION_FAILED = "HSM_OPERATION_FAILED"
    KEY_VERSION_CONFLICT = "KEY_VERSION_CONFLICT"
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
    # Integrity (DataLoss) and bugs (Internal)
    AUDIT_LOG_TAMPERED = "AUDIT_LOG_TAMPERED"
    KEY_OBJECT_UNUSABLE = "KEY_OBJECT_UNUSABLE"
    HSM_ERROR = "HSM_ERROR"


class HsmUnavailable(Unavailable):
    """The HSM (module, token, session or login) cannot serve the request now; retrying may help.

    Raised when the token disappears, the module reports a device error, the caller's deadline
    passes while waiting for the HSM, or the broker cannot log in.
    """

    default_reason = Reason.HSM_UNAVAILABLE


class AuditUnavailable(Unavailable):
    """An audit record could not be made durable; the decision it describes must not take effect."""

    default_reason = Reason.AUDIT_UNAVAILABLE
