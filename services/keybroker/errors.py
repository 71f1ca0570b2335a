"""Key-broker specific exceptions and the stable reason codes this package raises.

Every failure is one of the shared :mod:`strongroom.errors` classes (so the one interceptor
maps it to a gRPC status) with a reason from :class:`strongroom.reasons.Reason`. Two infrastructure failures get their
own subclasses because callers branch on them: :class:`HsmUnavailable` and :class:`AuditUnavailable`;
so do a stored policy the broker cannot read or load (:class:`PolicyUnreadable`,
:class:`StoredPolicyInvalid`), a key version its replicas kept disabling under an operation
(:class:`KeyStateMoving`), a policy change whose expected version is no longer the live one
(:class:`PolicyChanged`) and the one refusal a caller hears for every way it may not release a
key (:class:`ReleaseNotPermitted`).
"""

from __future__ import annotations

from strongroom.errors import (
    DataLoss,
    FailedPrecondition,
    PermissionDenied,
    StrongroomError,
    Unavailable,
)
from strongroom.files import errno_name
from strongroom.reasons import Reason


class HsmUnavailable(Unavailable):
    """The HSM (module, token, session or login) cannot serve the request now; retrying may help.

    Raised when the token disappears, the module reports a device error, the caller's deadline
    passes while waiting for the HSM, or the broker cannot log in.
    """

    default_reason = Reason.HSM_UNAVAILABLE
    logged_by_service = True  # outage_lines.OutageLines: once per failure, then counted


OPERATORS_LOG = "; its operator's log has the details"
"""How every answer that keeps the broker's own details (paths, file names, the HSM's module and
token) from a remote caller ends: the broker's log has them."""

AUDIT_OPERATIONS: tuple[str, ...] = (
    "write",
    "read",
    "lock",
    "open",
    "access",
    "create",
    "rename",
    "sync",
    "list",
    "look up",
    "repair",
    "keep",
)
"""What a caller may be told the broker could not do to its audit log (:func:`audit_failure`):
the first words of every failed call's description (``write the audit head``, ``look up the
audit file``), ``keep`` when no call failed (``AUDIT_LOG_FULL``). README upgrade item 96 lists
them; a test holds the two together."""


def audit_operation(doing: str) -> str:
    """The operation of :data:`AUDIT_OPERATIONS` that ``doing`` (``write the audit head``) begins
    with; ``keep`` for a description that begins with none (a test holds every call site to the
    set: a caller must never be told a word the list does not have, nor a path)."""
    for operation in AUDIT_OPERATIONS:
        if doing == operation or doing.startswith(operation + " "):
            return operation
    return "keep"


def audit_failure(doing: str = "keep", cause: OSError | None = None) -> str:
    """What a remote caller is told of a failure of the broker's audit log: what the broker could
    not do to it (one of :data:`AUDIT_OPERATIONS`: ``doing`` is reduced to it) and the errno's
    symbol, never a path, a file name or the directory's layout (the operator's message, in the
    broker's log, has them)."""
    errno = f" ({errno_name(cause)})" if cause is not None else ""
    return f"the key broker cannot {audit_operation(doing)} its audit log{errno}{OPERATORS_LOG}"


class AuditUnavailable(Unavailable):
    """An audit record could not be made durable; the decision it describes must not take effect.

    Its message names the files and the errno for the operator; a remote caller is told only
    ``public`` (by default :func:`audit_failure`'s words for a failure of unknown kind), whatever
    raised it: a message naming the log's directory reached every caller of the failed RPC."""

    default_reason = Reason.AUDIT_UNAVAILABLE
    logged_by_service = True  # outage_lines.OutageLines: once per failure, then counted

    def __init__(
        self, message: str, *, reason: str | None = None, public: str | None = None
    ) -> None:
        super().__init__(message, reason=reason, public=public or audit_failure())


class AuditLogClosed(AuditUnavailable):
    """A record arrived after the broker closed its audit log (it is stopping): refused like any
    record the log cannot keep, but nothing for the operator to fix (logged once, at WARNING)."""

    def __init__(self, message: str = "the audit log is closed") -> None:
        super().__init__(
            message, public="the key broker is stopping: its audit log takes no more records"
        )


class AuditTampered(DataLoss):
    """The audit log's files do not hold the chain the broker signed (``AUDIT_LOG_TAMPERED``).

    Its message names the file that fails and how, for the operator; a remote caller is told only
    that the check failed: the files' names and paths are the broker's own."""

    default_reason = Reason.AUDIT_LOG_TAMPERED
    logged_by_service = True  # its CRITICAL, once: every decision is refused until a restart

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            public=f"the key broker's audit log failed its integrity check{OPERATORS_LOG}",
        )


class PolicyUnreadable(FailedPrecondition):
    """A key's stored policy file exists but cannot be read as text (permissions, a symlink loop,
    an I/O error, bytes that are not UTF-8), or may not be (not a regular file, a symlink leading
    out of the policy directory, a file with another hard link): the broker's configuration must
    be fixed; nothing is released under the key until then."""

    default_reason = Reason.POLICY_UNREADABLE
    logged_by_service = True  # policy_lines: once per key, then counted


class StoredPolicyInvalid(FailedPrecondition):
    """A key's stored policy no longer loads (written for a development broker, edited by hand in
    a directory deployment configuration manages): the broker's configuration error, not the
    request's. Its reason is the loader's (``POLICY_BAD_VALUE``, ``POLICY_DEBUG_IN_PRODUCTION``,
    ...)."""

    logged_by_service = True  # policy_lines: once per key, then counted


class KeyStateMoving(FailedPrecondition):
    """An operation refused ``KEY_DISABLED`` because its key version was disabled under it on
    every attempt the broker made (another replica changing the version's state): the broker's
    own replicas moved the state, not the caller, who can neither disable nor enable a version
    (an admin's command disables; only a program using the library enables). Fail closed, as
    each attempt met a disable, but not the caller's fault: its grant is given back."""

    default_reason = Reason.KEY_DISABLED
    logged_by_service = True  # state_lines: once per version, then counted


class PolicyChanged(FailedPrecondition):
    """A compare-and-swap policy change refused: the key's live policy is not at the version the
    caller expected to replace (someone else changed it since the caller read it). Nothing was
    stored; ``live_version`` is the live policy's version (None: the key has none, or one that
    does not read or load)."""

    default_reason = Reason.POLICY_CHANGED

    def __init__(self, message: str, *, live_version: str | None) -> None:
        super().__init__(message)
        self.live_version = live_version


class PolicyStoreBusy(Unavailable):
    """The policy directory's change lock was not free in time: another replica (or this one) is
    changing a policy, or one holding it is stuck; nothing was stored, and a retry may succeed."""

    default_reason = Reason.POLICY_STORE_BUSY


class ReleaseNotPermitted(PermissionDenied):
    """What a releasing caller hears when the key's policy does not permit it, whatever the cause:
    the policy does not name it, the key has no policy, or its stored policy does not read or load.

    One answer for all of them, so that a caller the broker does not trust learns neither which
    key ids have a policy nor anything a policy says. ``cause`` is the real refusal: the audit
    record carries its reason, and the broker's log its detail.
    """

    default_reason = Reason.CALLER_NOT_ALLOWED

    def __init__(self, key_id: str, cause: StrongroomError) -> None:
        super().__init__(
            f"this caller may not release key {key_id!r} (the broker's audit log has the reason)"
        )
        self.cause = cause
