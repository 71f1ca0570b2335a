"""Limits on streaming RPCs, so that no certified caller can take the server's worker threads.

A blocking streaming RPC (an upload, a download) holds one of the server's ``max_workers``
threads for as long as it lasts. :class:`StreamGuard` admits a stream only while

- its caller (the SPIFFE ID of the peer certificate) has fewer than ``max_streams_per_identity``
  streams open, of any kind (non-blocking ones such as health ``Watch`` included: they hold no
  thread, but they count against gRPC's ``maximum_concurrent_rpcs``), and
- fewer than ``max_blocking_streams`` blocking streams are open in total, so that some threads
  always remain for unary RPCs;

otherwise the stream fails at once with ``RESOURCE_EXHAUSTED`` and a reason. A request stream that
sends nothing for ``idle_timeout`` seconds fails with ``RESOURCE_EXHAUSTED``
(``STREAM_IDLE_TIMEOUT``), which frees its thread (the model store then removes the partial upload,
as it does on cancel). A response stream whose client stops reading (gRPC's send waits for flow
control) is cancelled after ``idle_timeout`` seconds without progress: gRPC offers no way to end
it with a status from another thread, so that client sees CANCELLED.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from strongroom.errors import ResourceExhausted
from strongroom.reasons import Reason
from strongroom.runtime.grpc_types import (
    HandlerInterceptor,
    RpcMethodHandler,
    is_non_blocking,
    rewrap_handler,
)

log = logging.getLogger(__name__)

Identify = Callable[[grpc.ServicerContext], str]
"""Names the caller of an RPC for per-identity accounting."""


def peer_identity(context: grpc.ServicerContext) -> str:
    """The caller's certificate identities (its SANs) or, without a certificate, its address."""
    identities = context.peer_identities()
    if identities:
        return ",".join(i.decode(errors="replace") for i in identities)
    return f"peer:{context.peer()}"


@dataclass(frozen=True)
class StreamLimits:
    """How many streams a caller and the whole server may hold, and how long a stream may idle."""

    max_streams_per_identity: int
    max_blocking_streams: int
    idle_timeout: float


class StreamGuard(HandlerInterceptor):
    """Admits streaming RPCs within :class:`StreamLimits`; unary RPCs pass untouched."""

    def __init__(self, limits: StreamLimits, identify: Identify = peer_identity) -> None:
        self._limits = limits
        self._identify = identify
        self._lock = threading.Lock()
        self._per_identity: Counter[str] = Counter()
        self._blocking = 0
        # Response streams waiting for their client to take a message: context -> since when.
        self._sending: dict[grpc.ServicerContext, float] = {}
        self._watchdog: threading.Thread | None = None

    def _watch_sends(self) -> None:
        period = max(0.05, self._limits.idle_timeout / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                stalled = [
                    c
                    for c, since in self._sending.items()
                    if now - since > self._limits.idle_timeout
                ]
                for context in stalled:
                    del self._sending[context]
            for context in stalled:
                log.warning(
                    "response stream cancelled: the client stopped reading",
                    extra={"peer": context.peer(), "reason": "STREAM_IDLE_TIMEOUT"},
                )
                cancel: Callable[[], object] = context.cancel  # untyped in grpc-stubs
                cancel()

    def _sending_started(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._sending[context] = time.monotonic()
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch_sends, name="stream-watchdog", daemon=True
                )
                self._watchdog.start()

    def _sending_done(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._sending.pop(context, None)

    def open_streams(self, identity: str | None = None) -> int:
        """Streams open now, for one identity or (None) the blocking ones in total."""
        with self._lock:
            return self._per_identity[identity] if identity is not None else self._blocking

    def _admit(self, identity: str, blocking: bool, method: str) -> Callable[[], None]:
        limits = self._limits
        with self._lock:
            if self._per_identity[identity] >= limits.max_streams_per_identity:
                raise ResourceExhausted(
                    f"{identity} already has {limits.max_streams_per_identity} streams open "
                    f"(server.max_streams_per_identity); {method} refused",
                    reason=Reason.TOO_MANY_STREAMS_PER_IDENTITY,
                )
            if blocking and self._blocking >= limits.max_blocking_streams:
                raise ResourceExhausted(
                    f"the server already serves {limits.max_blocking_streams} streams "
                    f"(server.max_blocking_streams); {method} refused, retry later",
                    reason=Reason.TOO_MANY_STREAMS,
                )
            self._per_identity[identity] += 1
            if blocking:
                self._blocking += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._per_identity[identity] -= 1
                if self._per_identity[identity] <= 0:
                    del self._per_identity[identity]
                if blocking:
                    self._blocking -= 1

        return release

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """A streaming ``handler`` admitted within the limits; a unary one as it is."""
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        method = details.method
        blocking = not is_non_blocking(handler)
        idle = self._limits.idle_timeout if handler.request_streaming and blocking else None

        def enter(context: grpc.ServicerContext) -> Callable[[], None]:
            try:
                release = self._admit(self._identify(context), blocking, method)
            except ResourceExhausted as exc:
                log.warning(
                    "stream refused",
                    extra={"method": method, "peer": context.peer(), "reason": exc.reason},
                )
                raise  # the runtime's error mapping (outermost) answers it
            if not context.add_callback(release):
                release()  # the RPC has already ended
            return release

        def requests(argument: Any) -> Any:
            return _IdleTimeoutIterator(argument, idle, method) if idle is not None else argument

        def unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(argument: Any, context: grpc.ServicerContext) -> Any:
                release = enter(context)
                if not blocking:
                    return fn(argument, context)  # released when the RPC ends
                argument = requests(argument)
                try:
                    return fn(argument, context)
                finally:
                    _close(argument)
                    release()

            return call

        def stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def call(argument: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                release = enter(context)
                argument = requests(argument)
                try:
                    for response in fn(argument, context):
                        # gRPC resumes this generator once the client took the message.
                        self._sending_started(context)
                        yield response
                        self._sending_done(context)
                finally:
                    self._sending_done(context)
                    _close(argument)
                    release()

            return call

        return rewrap_handler(handler, unary, stream)


def _close(argument: Any) -> None:
    if isinstance(argument, _IdleTimeoutIterator):
        argument.close()


_ITEM, _END, _ERROR = "item", "end", "error"


class _IdleTimeoutIterator:
    """A request stream whose ``next`` gives up after ``timeout`` seconds without a message.

    gRPC's request iterator blocks without a timeout, so a reader thread pulls from it into a
    one-slot queue and the handler waits on the queue with the timeout. When the handler gives
    up, the RPC ends and gRPC's iterator returns, so the reader thread ends too.
    """

    def __init__(self, source: Iterator[Any], timeout: float, method: str) -> None:
        self._source = source
        self._timeout = timeout
        self._method = method
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        self._done = threading.Event()
        threading.Thread(target=self._pump, name="rpc-request-reader", daemon=True).start()

    def _offer(self, entry: tuple[str, Any]) -> bool:
        while not self._done.is_set():
            try:
                self._queue.put(entry, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        try:
            for item in self._source:
                if not self._offer((_ITEM, item)):
                    return
            self._offer((_END, None))
        except BaseException as exc:  # handed to the handler's thread, which re-raises it
            self._offer((_ERROR, exc))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done.is_set():
            raise StopIteration
        try:
            kind, value = self._queue.get(timeout=self._timeout)
        except queue.Empty:
            self._done.set()
            raise ResourceExhausted(
                f"{self._method}: no message for {self._timeout:g}s "
                "(server.stream_idle_timeout_seconds); the stream was ended",
                reason=Reason.STREAM_IDLE_TIMEOUT,
            ) from None
        if kind == _ITEM:
            return value
        self._done.set()
        if kind == _END:
            raise StopIteration
        raise value

    def close(self) -> None:
        """Stops the reader thread at its next message (or when the RPC ends)."""
        self._done.set()
