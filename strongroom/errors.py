"""The one exception tree every Strongroom component raises. A leaf: it imports nothing.

Each class names the canonical status code (gRPC's names, as plain strings) its failures map to;
one server interceptor in ``strongroom.runtime`` turns them into a gRPC status whose message is
``REASON: text`` (the error's :attr:`~StrongroomError.public` text) plus a ``strongroom-reason``
trailing-metadata entry. Nothing else reaches the wire: any other exception becomes INTERNAL with
a generic message (the details go to the log only).
Libraries (artifact, attestation) raise these without depending on gRPC.
"""

from __future__ import annotations

from strongroom.reasons import Reason

REFUSAL_LINE = "_strongroom_refusal"
"""The logging ``extra`` key that marks a line saying why a caller's RPC was refused
(``extra={"reason": ..., REFUSAL_LINE: True}``): the service's log writes such lines within a budget
per caller and reason (:mod:`strongroom.runtime.logs`), since callers choose how many there are.
``False`` says the opposite: the line is about the service's own failure (:func:`line_budgeted`),
and it and the call's other lines are written every time. Its leading underscore keeps it out of the
JSON line."""

REFUSAL_CALL = "_strongroom_refusal_call"
"""The logging ``extra`` key giving the call (its ``grpc.ServicerContext``) that a refusal line
(:data:`REFUSAL_LINE`) is about when it may be logged away from that call's own thread: a
watchdog cancelling a call that never sent its message, or whose client stopped reading. The
line's budget is kept on that call's caller, and the call's own later lines follow the line's
verdict (all or none). Without it such a line had no caller, and was written every time."""


class StrongroomError(Exception):
    """Base of every expected failure.

    ``reason`` is a stable, machine-readable UPPER_SNAKE code; ``status_name`` is the canonical status
    code name (``INVALID_ARGUMENT``, ``PERMISSION_DENIED``, ...) it is reported with.

    ``message`` is for whoever runs the code: the service's log, the command line. ``public`` is
    what a remote caller is told instead, when the message speaks of the service's own state (its
    files' paths: a failure of its audit log or its HSM module), which no caller may learn: the
    failure's class and errno, the operator's log having the rest. By default it is the message.
    """

    status_name: str = "INTERNAL"
    default_reason: str = Reason.INTERNAL
    logged_by_service: bool = False
    """A failure of the service itself that it logs on bounded lines of its own (an outage's line
    once per failure, then counted; a tampered log's CRITICAL; a stored policy's or a flapping
    key version's line), whatever status a caller is answered: neither its caller's fault
    (:func:`caused_by_caller`) nor a reason to write each refused call's lines every time
    (:func:`line_budgeted`)."""

    def __init__(
        self, message: str, *, reason: str | None = None, public: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self._public = public

    @property
    def public(self) -> str:
        """What a remote caller is told of this failure (its status message after the reason)."""
        return self.message if self._public is None else self._public

    def answer(self) -> str:
        """The status message a remote caller gets: ``REASON: public`` (:attr:`public`), never
        the operator's message when the two differ."""
        return f"{self.reason}: {self.public}"

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class InvalidArgument(StrongroomError):
    """The request is malformed: the caller must change it before retrying."""

    status_name = "INVALID_ARGUMENT"
    default_reason = Reason.INVALID_ARGUMENT


class NotFound(StrongroomError):
    """The named object does not exist."""

    status_name = "NOT_FOUND"
    default_reason = Reason.NOT_FOUND


class AlreadyExists(StrongroomError):
    """The object exists and is immutable."""

    status_name = "ALREADY_EXISTS"
    default_reason = Reason.ALREADY_EXISTS


class Unauthenticated(StrongroomError):
    """The caller presented no usable identity."""

    status_name = "UNAUTHENTICATED"
    default_reason = Reason.UNAUTHENTICATED


class PermissionDenied(StrongroomError):
    """The caller is known but not allowed to do this (including failed attestation or policy)."""

    status_name = "PERMISSION_DENIED"
    default_reason = Reason.PERMISSION_DENIED


class FailedPrecondition(StrongroomError):
    """The system is not in a state that allows this (disabled key, stale nonce, model not ready)."""

    status_name = "FAILED_PRECONDITION"
    default_reason = Reason.FAILED_PRECONDITION


class ResourceExhausted(StrongroomError):
    """A size or rate limit was exceeded."""

    status_name = "RESOURCE_EXHAUSTED"
    default_reason = Reason.RESOURCE_EXHAUSTED


class Unavailable(StrongroomError):
    """A dependency (HSM, storage, collateral service, peer) is unavailable; retrying may help."""

    status_name = "UNAVAILABLE"
    default_reason = Reason.UNAVAILABLE


class Aborted(StrongroomError):
    """The operation was called off by a conflicting one (an unload of what it was loading)."""

    status_name = "ABORTED"
    default_reason = Reason.ABORTED


class Cancelled(StrongroomError):
    """The caller went away (it cancelled, or its deadline passed) and the work was stopped."""

    status_name = "CANCELLED"
    default_reason = Reason.CANCELLED


class DeadlineExceeded(StrongroomError):
    """The caller's deadline passed before the work took effect, and it was not done."""

    status_name = "DEADLINE_EXCEEDED"
    default_reason = Reason.DEADLINE_EXCEEDED


class DataLoss(StrongroomError):
    """Stored data failed an integrity check."""

    status_name = "DATA_LOSS"
    default_reason = Reason.DATA_LOSS


class Internal(StrongroomError):
    """A bug or an impossible state; details are logged, never returned."""

    status_name = "INTERNAL"
    default_reason = Reason.INTERNAL


# UNAVAILABLE that requests bring on, not an outage: reports naming made-up chips, each a fetch of
# collateral, use up the fetch slots or the caller's fetch budget.
_CALLER_DRIVEN_UNAVAILABLE = frozenset(
    {Reason.COLLATERAL_FETCH_BUSY, Reason.COLLATERAL_FETCH_RATE_LIMITED}
)


def caused_by_caller(exc: StrongroomError) -> bool:
    """Whether ``exc`` refuses what its caller sent or asked for, rather than says the service
    failed: a dependency's outage (``UNAVAILABLE``, but for the collateral fetch limits requests
    use up), a bug (``INTERNAL``), stored data failing its integrity check (``DATA_LOSS``) or any
    failure the service logs itself (:attr:`StrongroomError.logged_by_service`). A refusal counts
    against its caller's budgets; a failure does not, or an outage would turn every caller's real
    reason into a rate limit after a burst."""
    if exc.logged_by_service:
        return False
    if exc.reason in _CALLER_DRIVEN_UNAVAILABLE:
        return True
    return not isinstance(exc, Unavailable | Internal | DataLoss)


def line_budgeted(exc: BaseException) -> bool:
    """Whether a refused call's per-call lines about ``exc`` (the runtime's ``rpc failed``, the
    key broker's ``key release denied``) are within its caller's budget of refusal lines
    (:data:`REFUSAL_LINE`): a refusal the caller caused, and a failure the service logs on lines
    of its own, which per-call lines written every time would let any caller drown while setting
    the log's rate. Any other failure (a bug, a damaged blob or key) is written every time, or a
    flood of refusals from elsewhere would leave it unsaid. One rule for every service."""
    if not isinstance(exc, StrongroomError):
        return False
    return exc.logged_by_service or caused_by_caller(exc)
