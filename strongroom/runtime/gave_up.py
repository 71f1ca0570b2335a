"""Why a call's caller stopped waiting for it: its deadline passed, or it cancelled the call.

gRPC tells a server only that a call ended, not why, and a client ends a call at its own
deadline just as it would cancel it. The server's copy of the deadline falls later than the
caller's by the request's transit (gRPC sends the time left, which the server counts from the
request's arrival), so a call its caller's deadline ended is seen ending a few milliseconds
before the server's deadline (0.7-3 ms in 2 of 8 calls on an idle machine, more under load). One
rule, :func:`gave_up`, tells the two apart for every service: what a caller is told, what the
key broker audits and what the logs say must not depend on which service asked.

A handler that must say how its call ended after the fact (a run stopped, a stream's generator
closed) asks a :class:`CallEnd`, which judges at the call's end, and which tells a call the
server itself ended (a watchdog's cancel, :func:`server_ends`) from a caller giving up: to the
handler a cancel from the server looks like its caller's.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Callable

import grpc

DEADLINE_TRANSIT = 1.0
"""Seconds before the server's deadline within which a call that ended is taken as its caller's
deadline having passed (a caller cancelling within this of its deadline is counted so too)."""


class GaveUp(enum.Enum):
    """How a caller stopped waiting; each value is the canonical status name it stands for."""

    DEADLINE = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"


def gave_up(remaining: float | None, active: bool) -> GaveUp | None:
    """How the caller of a call with ``remaining`` seconds before the server's deadline (None:
    it has none), ``active`` or ended, stopped waiting; None while it still waits.

    A deadline that has passed is :attr:`GaveUp.DEADLINE`; so is an end within
    :data:`DEADLINE_TRANSIT` of it. Any other end is :attr:`GaveUp.CANCELLED`."""
    if remaining is not None and (remaining <= 0 or (not active and remaining <= DEADLINE_TRANSIT)):
        return GaveUp.DEADLINE
    if not active:
        return GaveUp.CANCELLED
    return None


def gave_up_on(context: grpc.ServicerContext) -> GaveUp | None:
    """:func:`gave_up` for the call of ``context``, as it stands now."""
    # Whether it is active first: the time left, read after, then counts an end that came just
    # before it (the caller's deadline, DEADLINE_TRANSIT) rather than find the call ended with
    # more time left than it had when it ended.
    active = context.is_active()
    return gave_up(context.time_remaining(), active)


# Why the server itself ended a call, by its context: weakly keyed, so that an entry goes with
# its call and the table holds no more entries than there are calls alive.
_SERVER_ENDED: weakref.WeakKeyDictionary[grpc.ServicerContext, str] = weakref.WeakKeyDictionary()
_SERVER_ENDED_LOCK = threading.Lock()


def server_ends(context: grpc.ServicerContext, reason: str) -> None:
    """Records that the server ends the call of ``context`` itself, for ``reason`` (a watchdog's:
    a stalled stream cancelled, one too slow refused), so that its :class:`CallEnd` names that
    reason rather than a caller giving up. Called before the cancel or the refusal, so that the
    handler, closed by either, finds it."""
    with _SERVER_ENDED_LOCK:
        _SERVER_ENDED[context] = reason


def _server_reason(context: grpc.ServicerContext) -> str | None:
    with _SERVER_ENDED_LOCK:
        return _SERVER_ENDED.get(context)


class CallEnd:
    """How the call of ``context`` ended, judged by :func:`gave_up_on` when it ends: judged when
    the handler notices, later (a stopped run, a closed stream), a cancel made shortly before the
    deadline would count as the deadline's. ``on_end`` (if any) runs at the end, after the
    judgement, on gRPC's thread, or at once if the call has already ended."""

    __slots__ = ("_context", "_on_end", "_why")

    def __init__(
        self, context: grpc.ServicerContext, on_end: Callable[[], None] | None = None
    ) -> None:
        self._context = context
        self._on_end = on_end
        self._why: GaveUp | None = None
        if not context.add_callback(self._end):
            self._end()  # the call has already ended

    def _end(self) -> None:
        self._why = gave_up_on(self._context)
        if self._on_end is not None:
            self._on_end()

    def gave_up(self) -> GaveUp | None:
        """How the caller gave up: as judged at the call's end; before that end, as the call
        stands now (:func:`gave_up_on`: None while its caller waits within its deadline). None
        for a call the server ended (:meth:`server_reason`): its caller did not give up."""
        if _server_reason(self._context) is not None:
            return None
        return self._why or gave_up_on(self._context)

    def server_reason(self) -> str | None:
        """Why the server itself ended the call (:func:`server_ends`), or None if it did not."""
        return _server_reason(self._context)
