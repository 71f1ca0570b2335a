"""A time bound on a unary response its client does not take.

A unary call ends once its response has been sent, and gRPC sends no more than the HTTP/2 windows
the client opens: a client that never reads (it sends no ``WINDOW_UPDATE``) keeps the call, and
whatever the server holds for it until then, open until its deadline or its connection's age (none,
and 1800 s ± 10 % + 600 s grace, some 40 minutes). A response the windows take whole ends at once,
so :class:`UnsentResponses` times only what a service asks it to: the responses that hold something
scarce until they are sent (inference's response memory budget).

Once the handler has returned its response of ``size`` bytes, the call must end within
:func:`send_bound` (the download streams' settings, :mod:`~strongroom.runtime.streams`:
``server.stream_idle_timeout_seconds``, or longer when the response needs more at
``server.stream_min_bytes_per_second``; not timed with that floor off), or the watchdog cancels it.
Not their rule: gRPC tells nothing of a unary response's progress, so a client that reads nothing
keeps the response for the whole bound (17 minutes for 64 MiB), where a download that stops being
read is cut after the idle timeout. gRPC offers no way to end a call with a status from another
thread, so a cancelled call's client sees CANCELLED, and the log says why (``STREAM_IDLE_TIMEOUT``, or ``STREAM_TOO_SLOW`` when the rate's
bound was the longer). The call's end-of-call callbacks then give back what it held.

One watchdog thread serves every pending response of a process; it starts with the first and ends
when none is pending, so a stopped server leaves none behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from strongroom.errors import REFUSAL_CALL, REFUSAL_LINE
from strongroom.reasons import Reason
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.gave_up import server_ends

log = logging.getLogger(__name__)


def send_bound(size: int, idle_timeout: float, min_bytes_per_second: int) -> float | None:
    """Seconds a response of ``size`` bytes may take to be sent: ``idle_timeout``, or what
    ``min_bytes_per_second`` allows it if longer; None (no bound: its deadline and its
    connection's age alone) with the floor off (0).

    Off, the idle timeout alone cut every response taking longer to send, however steadily its
    client read (a 64 MiB one below 2.2 MiB/s at 30 s), where the floor off is an operator's
    way to serve slow links: gRPC tells nothing of a unary response's progress, so there is no
    idle rule to fall back on; a request's wait is unbounded so too
    (:meth:`~strongroom.runtime.config.ServerConfig.request_wait_for`)."""
    if min_bytes_per_second <= 0:
        return None
    return max(idle_timeout, size / min_bytes_per_second)


class UnsentResponses:
    """Cancels calls whose response is not taken within :func:`send_bound`; thread-safe."""

    def __init__(
        self,
        idle_timeout: float = ServerConfig.stream_idle_timeout_seconds,
        min_bytes_per_second: int = ServerConfig.stream_min_bytes_per_second,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("the idle timeout must be positive")
        self.idle_timeout = idle_timeout
        self.min_bytes_per_second = min_bytes_per_second
        self._period = max(0.05, idle_timeout / 4)
        self._lock = threading.Lock()
        # Calls whose response is being sent: context -> (when it is cancelled, why, its peer:
        # read now, as gRPC answers none once the call has ended).
        self._pending: dict[grpc.ServicerContext, tuple[float, str, str]] = {}
        self._watchdog: threading.Thread | None = None

    @classmethod
    def of(cls, config: ServerConfig) -> UnsentResponses:
        """The bound of ``config``'s stream settings (``server.stream_idle_timeout_seconds``,
        ``server.stream_min_bytes_per_second``)."""
        return cls(config.stream_idle_timeout_seconds, config.stream_min_bytes_per_second)

    @property
    def pending(self) -> int:
        """Responses being sent now."""
        with self._lock:
            return len(self._pending)

    def watch(self, context: grpc.ServicerContext, size: int) -> None:
        """Times the response of ``size`` bytes the handler of ``context`` is about to return,
        until its call ends (not at all with the rate floor off: :func:`send_bound`). Raises
        RuntimeError when no watchdog thread can be had (the call then fails rather than go
        unbounded)."""
        bound = send_bound(size, self.idle_timeout, self.min_bytes_per_second)
        if bound is None:
            return  # the floor off: not timed
        why = Reason.STREAM_TOO_SLOW if bound > self.idle_timeout else Reason.STREAM_IDLE_TIMEOUT
        with self._lock:
            self._pending[context] = (time.monotonic() + bound, why, context.peer())
            if self._watchdog is None:
                watchdog = threading.Thread(
                    target=self._watch, name="response-watchdog", daemon=True
                )
                try:
                    watchdog.start()
                except RuntimeError:
                    del self._pending[context]
                    raise
                self._watchdog = watchdog
        if not context.add_callback(lambda: self._done(context)):
            self._done(context)  # the call has already ended

    def _done(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._pending.pop(context, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self._period)
            now = time.monotonic()
            with self._lock:
                if not self._pending:
                    self._watchdog = None  # a later watch() starts another
                    return
                late = [
                    (c, why, peer) for c, (when, why, peer) in self._pending.items() if now >= when
                ]
                for context, why, _ in late:
                    del self._pending[context]
                    # Before the cancel, which its handler's CallEnd must not take for its
                    # caller's. Cancelling only marks the call in gRPC core: its callbacks run
                    # on gRPC's thread later, none under this lock.
                    server_ends(context, why)
                    cancel: Callable[[], object] = context.cancel  # untyped in grpc-stubs
                    cancel()
            for context, why, peer in late:
                log.warning(
                    "response cancelled: the client did not take it",
                    extra={
                        "peer": peer,
                        "reason": why,
                        # Its client chose how many there are: within its caller's budget, with
                        # the call's own lines (this thread runs no call of its own).
                        REFUSAL_LINE: True,
                        REFUSAL_CALL: context,
                    },
                )
