"""Key-broker specific exceptions and the stable reason codes this package raises.

Every failure is one of the shared :mod:`strongroom.errors` classes (so the one interceptor
maps it to a gRPC status) with a reason from :class:`strongroom.reasons.Reason`. Two infrastructure failures get their
own subclasses because callers branch on them: :class:`HsmUnavailable` and :class:`AuditUnavailable`.
"""

from __future__ import annotations

from strongroom.errors import Unavailable
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
