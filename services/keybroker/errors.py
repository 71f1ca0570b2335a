"""Key-broker specific exceptions and the stable reason codes this package raises.

Every failure is one of the shared :mod:`strongroom.errors` classes (so the one interceptor
maps it to a gRPC status) with a reason from :class:`strongroom.reasons.Reason`. Two infrastructure failures get their
own subclasses because callers branch on them: :class:`HsmUnavailable` and :class:`AuditUnavailable`;
so does a stored policy the broker cannot read (:class:`PolicyUnreadable`).
"""

from __future__ import annotations

from strongroom.errors import FailedPrecondition, Unavailable
from strongroom.reasons import Reason


class HsmUnavailable(Unavailable):
    """The HSM (module, token, session or login) cannot serve the request now; retrying may help.

    Raised when the token disappears, the module reports a device error, the caller's deadline
    passes while waiting for the HSM, or the broker cannot log in.
    """

    default_reason = Reason.HSM_UNAVAILABLE


class AuditUnavailable(Unavailable):
    """An audit record could not be made durable; the decision it describes must not take effect."""

    default_reason = Reason.AUDIT_UNAVAILABLE


class PolicyUnreadable(FailedPrecondition):
    """A key's stored policy file exists but cannot be read as text (permissions, a symlink loop,
    an I/O error, bytes that are not UTF-8): the broker's configuration must be fixed; nothing is
    released under the key until then."""

    default_reason = Reason.POLICY_UNREADABLE
