"""Ending every outgoing call of one operation together: its caller cancelled, or its deadline
passed.

A model load makes calls on several threads (the store's download, the key release on a thread of
its own, a multi-part model's parts on a pool): when the LoadModel call that asked for it is
cancelled, gRPC tells the server on a thread of its own (``context.add_callback``), where none of
those calls can be reached. A :class:`CallScope` is what they register with: the operation sets it
as the current scope (:func:`scoped`; threads started in a copy of the caller's context inherit
it), each call is tracked while in flight, and :meth:`CallScope.cancel`, from any thread, cancels
them all. Every call also takes its timeout from the scope, so none outlives the caller's deadline.

A call made through a traced channel is a generator (OpenTelemetry's client interceptor wraps the
response stream in one) that only the thread iterating it may close, so response streams are
tracked from below the tracing: :func:`scoped_channel` wraps the raw channel with an interceptor
that registers the real call. Unary calls are made as futures (:func:`call_unary`), cancellable
through any channel.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc

from strongroom.errors import Cancelled, StrongroomError
from strongroom.reasons import Reason
from strongroom.runtime.gave_up import GaveUp, gave_up

__all__ = [
    "CallScope",
    "call_unary",
    "current_scope",
    "scoped",
    "scoped_channel",
]

T = TypeVar("T")


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class CallScope:
    """The outgoing calls of one operation, ended together by :meth:`cancel` or at ``deadline``
    (``time.monotonic()``; None: no deadline of its own)."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._cancelled = False
        self._cancelled_at: float | None = None
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next = 0

    def __repr__(self) -> str:
        return f"CallScope(deadline={self.deadline!r}, cancelled={self._cancelled})"

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def ended(self) -> bool:
        """Cancelled, or past its deadline: nobody waits for the operation any more."""
        return self._cancelled or self.expired

    def left(self) -> float | None:
        """Seconds until the deadline (0 once passed), None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def timeout(self, default: float) -> float:
        """A call's timeout: ``default``, or less so as to end by the deadline."""
        left = self.left()
        return default if left is None else min(default, left)

    def error(self) -> StrongroomError:
        """What the operation ended with: CANCELLED ``LOAD_DEADLINE_EXCEEDED`` if the deadline
        ended it (a client ends its call at its deadline as it would cancel it: a cancellation
        within :data:`~strongroom.runtime.gave_up.DEADLINE_TRANSIT` of it counts as the
        deadline, the rule every service judges by), else ``LOAD_CANCELLED``.

        Judged by when the scope was cancelled, not when this is asked: a step that notices a
        cancellation only after the deadline has passed still reports the cancellation."""
        if self._by_deadline():
            return Cancelled(
                "the load's caller's deadline passed: its download and key release were stopped",
                reason=Reason.LOAD_DEADLINE_EXCEEDED,
            )
        return Cancelled(
            "the load was cancelled by its caller: its download and key release were stopped",
            reason=Reason.LOAD_CANCELLED,
        )

    def _by_deadline(self) -> bool:
        if self.deadline is None:
            return False
        cancelled_at = self._cancelled_at
        at = time.monotonic() if cancelled_at is None else cancelled_at
        return gave_up(self.deadline - at, active=cancelled_at is None) is GaveUp.DEADLINE

    def raise_if_ended(self) -> None:
        """Raises :meth:`error` if the scope has ended; a step that starts work checks it first."""
        if self.ended:
            raise self.error()

    def on_cancel(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Runs ``callback`` when the scope is cancelled (at once if it already is); returns
        what unregisters it."""
        with self._lock:
            if not self._cancelled:
                key = self._next
                self._next += 1
                self._callbacks[key] = callback

                def remove() -> None:
                    with self._lock:
                        self._callbacks.pop(key, None)

                return remove
        callback()
        return lambda: None

    def track(self, call: _Cancellable) -> Callable[[], None]:
        """Cancels ``call`` with the scope; returns what stops tracking it (a call that ends by
        itself is left alone: its ``add_done_callback``, where it has one, does it)."""
        remove = self.on_cancel(call.cancel)
        add_done = getattr(call, "add_done_callback", None)
        if add_done is not None:
            add_done(lambda _: remove())
        return remove

    def cancel(self) -> None:
        """Cancels every tracked call and wakes every waiter; idempotent, from any thread."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled_at = time.monotonic()
            self._cancelled = True
            callbacks, self._callbacks = list(self._callbacks.values()), {}
        for callback in callbacks:
            callback()


_CURRENT: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar(
    "strongroom_call_scope", default=None
)


def current_scope() -> CallScope | None:
    """The scope the calls made here belong to, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def scoped(scope: CallScope | None) -> Iterator[CallScope | None]:
    """Makes ``scope`` current for the block (threads started in a copy of this context too)."""
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)


def call_unary(method: grpc.UnaryUnaryMultiCallable[Any, T], request: Any, *, timeout: float) -> T:
    """``method(request)``, bounded by the current scope's deadline and cancelled with it (then
    the scope's :meth:`~CallScope.error` is raised); a refusal raises ``grpc.RpcError``."""
    scope = current_scope()
    if scope is None:
        return method(request, timeout=timeout)
    scope.raise_if_ended()
    future = method.future(request, timeout=scope.timeout(timeout))
    remove = scope.track(future)
    try:
        return future.result()
    except grpc.FutureCancelledError:
        raise scope.error() from None
    finally:
        remove()


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _ScopedStreams(grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Tracks each response stream in the current scope and bounds it by the scope's deadline."""

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        scope = current_scope()
        if scope is None:
            return continuation(details, request)
        timeout = details.timeout
        left = scope.left()
        if left is not None:
            timeout = left if timeout is None else min(timeout, left)
        details = _Details(
            details.method,
            timeout,
            details.metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        call = continuation(details, request)
        scope.track(call)
        return call


def scoped_channel(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with its response streams tracked by the current :class:`CallScope`; wrap
    the raw channel, below any tracing (see the module docstring)."""
    return grpc.intercept_channel(channel, _ScopedStreams())
