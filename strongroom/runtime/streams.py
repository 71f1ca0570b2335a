"""Limits on streaming RPCs, so that no certified caller can take the server's worker threads.

A blocking streaming RPC (an upload, a download) holds one of the server's ``max_workers``
threads for as long as it lasts. :class:`StreamGuard` admits a stream only while

- its caller (the SPIFFE ID the authoriser verified, :func:`~strongroom.runtime.callers.caller_key`,
  not the certificate's SANs: extra DNS names buy no second bucket) has fewer than
  ``max_streams_per_identity`` streams open, of any kind (non-blocking ones such as health
  ``Watch`` included: they hold no thread, but they count against gRPC's
  ``maximum_concurrent_rpcs``), and
- with a share set (``max_streams_per_certificate``), its certificate
  (:func:`~strongroom.runtime.callers.certificate_key`, beneath its identity) has fewer than its
  share of them open, and
- fewer than ``max_blocking_streams`` blocking streams are open in total, so that some threads
  always remain for unary RPCs, and
- a blocking stream of a data-plane method (any method the service does not name control-plane)
  finds a data-plane worker free (:class:`~strongroom.runtime.callers.WorkerShares`, which
  data-plane unary calls share), and its caller holds fewer than its bound of data-plane workers
  (``max_data_plane_workers_per_identity``, unary calls and waits for a request message
  included) and its certificate fewer than its share of that bound
  (``max_calls_per_certificate``: a stream counts there as a unary call does, so that one
  replica's stalled downloads and unary waits together hold at most its share): the
  control-plane reserve is never a stream's;

otherwise the stream fails at once with ``RESOURCE_EXHAUSTED`` and a reason.

The share exists for fleets: every replica of one has the one SPIFFE ID, so one replica whose
downloads stalled (each cut only after the idle timeout below, then reopened) held all of its
identity's streams, and every other replica's model loads were refused
``TOO_MANY_STREAMS_PER_IDENTITY``. Beyond its share a certificate's streams are refused
``TOO_MANY_STREAMS_PER_CERTIFICATE`` and the rest stays for the others; the identity's cap still
counts its certificates together, so a replica that renews onto a new serial buys a second share
(two certificates at their share hold the identity's cap again). A caller without a certificate
of its own (role-less callers, one bucket; a peer without one) has no share beneath its cap. The
share's table holds only certificates with streams open (each entry gone with its last stream),
so it has at most one entry per open stream however many certificates call.

A blocking stream
counts until its handler is done with its thread, not until its RPC ends: a client that cancels
ends the RPC at once, while the handler (a read or write against a slow backend) runs on until it
returns or yields, which gRPC cannot hasten (a non-blocking one counts until its RPC ends).

A request stream that
sends nothing for ``idle_timeout`` seconds fails with ``RESOURCE_EXHAUSTED``
(``STREAM_IDLE_TIMEOUT``), which frees its thread (the model store then removes the partial upload,
as it does on cancel). A response stream whose client stops reading (gRPC's send waits for flow
control) is cancelled after ``idle_timeout`` seconds without progress: gRPC offers no way to end
it with a status from another thread, so that client sees CANCELLED.

The idle timeout alone lets a client hold a blocking stream for ever by trickling: one byte, or
one download message taken, just inside each timeout. So a blocking stream must also move at
least ``min_bytes_per_second`` (messages' encoded size, both directions together), judged over
consecutive windows of ``idle_timeout`` seconds of the server *waiting on the client*: the handler
blocked for the next request message, or the response generator suspended until the client took
the last message. Time the server spends on its own work (storage, a slow backend) is not counted
against the client, and neither is the wait for a request stream's first message (the idle
timeout bounds it): the first window starts with the header. A window that ends below the floor
ends the stream with ``RESOURCE_EXHAUSTED`` (``STREAM_TOO_SLOW``) and a warning (method, peer);
a request stream's window is judged the moment it ends, a response stream's when the client takes
its next message (the watchdog above bounds that wait). A stream that finishes is never judged on
its last, unfinished window. Non-blocking streams hold no thread and are not metered.
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

from strongroom.errors import REFUSAL_CALL, REFUSAL_LINE, ResourceExhausted
from strongroom.reasons import Reason
from strongroom.runtime.callers import (
    Certify,
    Identify,
    WorkerShares,
    caller_key,
    certificate_key,
    forget,
)
from strongroom.runtime.gave_up import server_ends
from strongroom.runtime.grpc_types import (
    HandlerInterceptor,
    RpcMethodHandler,
    is_non_blocking,
    rewrap_handler,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """How many streams a caller and the whole server may hold, and how long a stream may idle."""

    max_streams_per_identity: int
    max_blocking_streams: int
    idle_timeout: float
    # Bytes per second a blocking stream must move, judged per window of idle_timeout; 0: off.
    min_bytes_per_second: int
    # Of max_streams_per_identity, how many one certificate of the identity may hold; None (or a
    # value at or above it): no share.
    max_streams_per_certificate: int | None = None


class StreamGuard(HandlerInterceptor):
    """Admits streaming RPCs within :class:`StreamLimits`; unary RPCs pass untouched."""

    def __init__(
        self,
        limits: StreamLimits,
        identify: Identify = caller_key,
        shares: WorkerShares | None = None,
        certify: Certify = certificate_key,
    ) -> None:
        self._limits = limits
        self._identify = identify
        self._shares = shares
        self._certify = certify
        share = limits.max_streams_per_certificate
        # No share unless asked for, and none at or above the cap (it would never refuse).
        self._share = (
            share if share is not None and share < limits.max_streams_per_identity else None
        )
        self._lock = threading.Lock()
        self._per_identity: Counter[str] = Counter()
        # Streams open per certificate (its certificate_key), only while it holds any.
        self._per_certificate: Counter[str] = Counter()
        self._blocking = 0
        # Response streams waiting for their client to take a message: context -> since when.
        self._sending: dict[grpc.ServicerContext, float] = {}
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()  # the watchdog ends (close)

    def _watch_sends(self) -> None:
        period = max(0.05, self._limits.idle_timeout / 4)
        while not self._closed.wait(period):
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
                    extra={
                        "peer": context.peer(),
                        "reason": Reason.STREAM_IDLE_TIMEOUT,
                        # Its client chose how many there are: within its caller's budget, with
                        # the call's own lines (this thread runs no call of its own).
                        REFUSAL_LINE: True,
                        REFUSAL_CALL: context,
                    },
                )
                # Its handler, closed by the cancel, must not take it for its caller's.
                server_ends(context, Reason.STREAM_IDLE_TIMEOUT)
                cancel: Callable[[], object] = context.cancel  # untyped in grpc-stubs
                cancel()

    def _sending_started(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._sending[context] = time.monotonic()
            if self._watchdog is None and not self._closed.is_set():
                watchdog = threading.Thread(
                    target=self._watch_sends, name="stream-watchdog", daemon=True
                )
                watchdog.start()  # may fail (no thread to be had): the next send tries again
                self._watchdog = watchdog

    def close(self) -> None:
        """Ends the watchdog thread (the server stopped: no stream sends any more). It ran for
        the life of the process, each stopped server's guard leaving one behind."""
        self._closed.set()
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.join(10)

    def _sending_done(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._sending.pop(context, None)

    def open_streams(self, identity: str | None = None) -> int:
        """Streams open now, for one identity or (None) the blocking ones in total."""
        with self._lock:
            return self._per_identity[identity] if identity is not None else self._blocking

    def certificates_open(self) -> int:
        """Certificates with a stream open now (entries of the per-certificate table)."""
        with self._lock:
            return len(self._per_certificate)

    def _admit(
        self, identity: str, certificate: str | None, blocking: bool, method: str, data: bool
    ) -> Callable[[], None]:
        limits = self._limits
        shares = self._shares if blocking and data else None
        share = self._share
        # The worker a blocking stream holds counts in its certificate's share of the data-plane
        # bound too: counted in its identity's bound alone, one replica's stalled downloads plus
        # its unary waits up to that share held the fleet's whole bound.
        worker_certificate = certificate if shares is not None else None
        if share is None:
            certificate = None  # no stream share: no stream counted per certificate
        with self._lock:
            if self._per_identity[identity] >= limits.max_streams_per_identity:
                raise ResourceExhausted(
                    f"{identity} already has {limits.max_streams_per_identity} streams open "
                    f"(server.max_streams_per_identity); {method} refused",
                    reason=Reason.TOO_MANY_STREAMS_PER_IDENTITY,
                )
            if (
                certificate is not None
                and share is not None
                and self._per_certificate[certificate] >= share
            ):
                raise ResourceExhausted(
                    f"certificate {certificate} already has {share} streams open "
                    "(server.max_streams_per_certificate), its share of its identity's "
                    f"{limits.max_streams_per_identity} (server.max_streams_per_identity, which "
                    f"the identity's other certificates share); {method} refused, retry later",
                    reason=Reason.TOO_MANY_STREAMS_PER_CERTIFICATE,
                )
            if blocking and self._blocking >= limits.max_blocking_streams:
                raise ResourceExhausted(
                    f"the server already serves {limits.max_blocking_streams} streams "
                    f"(server.max_blocking_streams); {method} refused, retry later",
                    reason=Reason.TOO_MANY_STREAMS,
                )
            if shares is not None:
                # Raises at the caller's bound, its certificate's share of it, a full data plane.
                shares.take(method, identity, worker_certificate)
            self._per_identity[identity] += 1
            if certificate is not None:
                self._per_certificate[certificate] += 1
            if blocking:
                self._blocking += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                forget(self._per_identity, identity)
                if certificate is not None:
                    forget(self._per_certificate, certificate)
                if blocking:
                    self._blocking -= 1
                if shares is not None:
                    shares.give(identity, worker_certificate)

        return release

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """A streaming ``handler`` admitted within the limits; a unary one as it is."""
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        method = details.method
        blocking = not is_non_blocking(handler)
        data = self._shares is None or not self._shares.is_control_plane(method)
        idle = self._limits.idle_timeout if handler.request_streaming and blocking else None
        limits = self._limits
        metered = blocking and limits.min_bytes_per_second > 0

        def enter(context: grpc.ServicerContext) -> Callable[[], None]:
            identity = self._identify(context)
            try:
                # The certificate is read (its serial parsed) only when a share may count it: the
                # stream share, or the data-plane share a blocking data-plane stream takes from.
                counted = self._share is not None or (
                    blocking and data and self._shares is not None
                )
                certificate = self._certify(context, identity) if counted else None
                return self._admit(identity, certificate, blocking, method, data)
            except ResourceExhausted as exc:
                log.warning(
                    "stream refused",
                    extra={
                        "method": method,
                        "peer": context.peer(),
                        "reason": exc.reason,
                        REFUSAL_LINE: True,
                    },
                )
                raise  # the runtime's error mapping (outermost) answers it

        def meter(context: grpc.ServicerContext) -> _RateFloor | None:
            if not metered:
                return None
            return _RateFloor(limits.min_bytes_per_second, limits.idle_timeout, method, context)

        def requests(argument: Any, floor: _RateFloor | None) -> Any:
            if idle is None:
                return argument
            return _IdleTimeoutIterator(argument, idle, method, floor)

        def unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(argument: Any, context: grpc.ServicerContext) -> Any:
                release = enter(context)
                if not blocking:
                    # It holds no thread: it counts until the RPC ends.
                    if not context.add_callback(release):
                        release()  # the RPC has already ended
                    return fn(argument, context)
                # A blocking stream counts until its handler returns, never at the RPC's end: a
                # client that cancels ends the RPC at once, while the handler (a write to a slow
                # backend) holds its thread until it returns, which gRPC cannot hasten.
                try:
                    argument = requests(argument, meter(context))
                    return fn(argument, context)
                finally:
                    _close(argument)
                    release()

            return call

        def stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def call(argument: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # The stream counts while its handler's code runs, which the RPC's end does not
                # stop (a client that cancels while the handler reads a slow backend ends the RPC
                # at once, and the worker stays busy until the handler yields or returns): it is
                # released when the generator is done, or at the RPC's end while it waits at a
                # yield (the thread is then gRPC's, whose send fails at once), so that a generator
                # gRPC let go of without closing it holds nothing either.
                release = _WhileRunning(enter(context))
                if not context.add_callback(release.rpc_ended):
                    release.rpc_ended()  # the RPC has already ended: released once suspended
                responses: Iterator[Any] | None = None
                try:
                    floor = meter(context)
                    argument = requests(argument, floor)
                    responses = fn(argument, context)
                    for response in responses:
                        size = _size(response) if floor is not None else 0
                        # gRPC resumes this generator once the client took the message.
                        self._sending_started(context)
                        since = time.monotonic()
                        release.suspend()
                        try:
                            yield response
                        finally:
                            release.resume()
                        self._sending_done(context)
                        if floor is not None:
                            floor.add(time.monotonic() - since, size)
                finally:
                    self._sending_done(context)
                    if responses is not None:
                        _close_responses(responses)
                    _close(argument)
                    release.done()

            return call

        # A request stream's messages are counted as gRPC decodes them: their encoded size is known
        # there for free (a protobuf message's ByteSize() encodes it again).
        return rewrap_handler(
            handler,
            unary,
            stream,
            request_deserializer=_sized(handler.request_deserializer) if idle is not None else None,
        )


class _WhileRunning:
    """Releases a response stream's counts once its handler no longer runs on a worker: when the
    generator is done, or when the RPC ends while the generator waits at a yield (gRPC does not
    resume it then). An RPC that ends while the handler runs is released when it next yields or
    returns."""

    __slots__ = ("_ended", "_lock", "_release", "_running")

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release  # idempotent (StreamGuard._admit)
        self._lock = threading.Lock()
        self._running = True
        self._ended = False

    def suspend(self) -> None:
        """The generator yields: until it resumes, the thread is gRPC's sending."""
        with self._lock:
            self._running = False
            ended = self._ended
        if ended:
            self._release()

    def resume(self) -> None:
        """The generator runs again."""
        with self._lock:
            self._running = True

    def rpc_ended(self) -> None:
        """The RPC ended (answered, cancelled, expired): released now unless the handler runs."""
        with self._lock:
            self._ended = True
            running = self._running
        if not running:
            self._release()

    def done(self) -> None:
        """The generator finished, however: released."""
        self._release()


class _RateFloor:
    """The bytes one blocking stream moved while the server waited on its client, judged per window.

    ``add`` is given each wait on the client (seconds) and the bytes it brought. Once the waits
    add up to ``window``, the window is judged and a new one begins: fewer than ``rate`` bytes per
    second of it ends the stream.
    """

    def __init__(
        self, rate: int, window: float, method: str, context: grpc.ServicerContext
    ) -> None:
        self._rate = rate
        self._window = window
        self._method = method
        self._context = context
        self._lock = threading.Lock()  # a bidirectional handler may read and send from two threads
        self._waited = 0.0
        self._moved = 0

    def left(self) -> float:
        """Seconds of waiting on the client until the current window ends."""
        with self._lock:
            return max(0.0, self._window - self._waited)

    def add(self, waited: float, moved: int) -> None:
        """Counts a wait on the client and what it brought; raises ResourceExhausted
        (STREAM_TOO_SLOW) when that completes a window below the floor."""
        with self._lock:
            self._waited += waited
            self._moved += moved
            if self._waited < self._window:
                return
            waited, moved = self._waited, self._moved
            self._waited, self._moved = 0.0, 0
        if moved >= self._rate * waited:
            return
        log.warning(
            "stream ended: below the minimum transfer rate",
            extra={
                "method": self._method,
                "peer": self._context.peer(),
                "reason": Reason.STREAM_TOO_SLOW,
                "bytes": moved,
                "seconds": round(waited, 3),
                REFUSAL_LINE: True,  # the client's pace: within its caller's budget
                REFUSAL_CALL: self._context,
            },
        )
        # Before its handler is closed (a response stream's), which it must not take for its
        # caller giving up.
        server_ends(self._context, Reason.STREAM_TOO_SLOW)
        raise ResourceExhausted(
            f"{self._method}: the stream moved {moved} bytes in {waited:.3g}s of waiting on the "
            f"client, below the minimum of {self._rate} bytes/s "
            "(server.stream_min_bytes_per_second); the stream was ended",
            reason=Reason.STREAM_TOO_SLOW,
        )


class _Sized:
    """A decoded request message with the size of its encoding."""

    __slots__ = ("message", "size")

    def __init__(self, message: Any, size: int) -> None:
        self.message = message
        self.size = size


def _sized(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def sized(data: bytes) -> Any:
        return _Sized(deserialize(data) if deserialize is not None else data, len(data))

    return sized


def _size(message: Any) -> int:
    """A response message's encoded size: ``len`` of bytes (what the model store's GetModel
    yields), else the protobuf ``ByteSize()``; 0 for anything else."""
    if isinstance(message, bytes | bytearray):
        return len(message)
    if isinstance(message, memoryview):
        return message.nbytes
    byte_size = getattr(message, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else 0


def _close_responses(responses: Iterator[Any]) -> None:
    # A handler's generator is closed at once, not when collected: what it holds open (a stored
    # artifact's reader) is released when the stream ends, however it ended.
    close = getattr(responses, "close", None)
    if callable(close):
        close()


def _close(argument: Any) -> None:
    if isinstance(argument, _IdleTimeoutIterator):
        argument.close()


_ITEM, _END, _ERROR = "item", "end", "error"


class _IdleTimeoutIterator:
    """A request stream whose ``next`` gives up after ``timeout`` seconds without a message, and
    (with a ``floor``) once a window of waiting on the client brought too few bytes.

    gRPC's request iterator blocks without a timeout, so a reader thread pulls from it into a
    one-slot queue and the handler waits on the queue with the timeout. When the handler gives
    up, the RPC ends and gRPC's iterator returns, so the reader thread ends too. Messages arrive
    as :class:`_Sized` (see :func:`_sized`); anything else (a request that did not decode, left
    for the decoding interceptor to refuse) counts 0 bytes.
    """

    def __init__(
        self, source: Iterator[Any], timeout: float, method: str, floor: _RateFloor | None = None
    ) -> None:
        self._source = source
        self._timeout = timeout
        self._method = method
        self._floor = floor
        self._started = False  # the wait for the first message is the idle timeout's alone
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
        now = time.monotonic()
        idle_deadline = now + self._timeout
        floor = self._floor if self._started else None
        while True:
            wait = idle_deadline - now
            if floor is not None:
                wait = min(wait, floor.left())
            try:
                kind, value = self._queue.get(timeout=max(0.0, wait))
                break
            except queue.Empty:
                waited_until = time.monotonic()
                if waited_until >= idle_deadline:
                    self._done.set()
                    raise ResourceExhausted(
                        f"{self._method}: no message for {self._timeout:g}s "
                        "(server.stream_idle_timeout_seconds); the stream was ended",
                        reason=Reason.STREAM_IDLE_TIMEOUT,
                    ) from None
                if floor is not None:
                    self._count(floor, waited_until - now, 0)  # a window ended
                now = waited_until
        if kind == _ITEM:
            size = 0
            if isinstance(value, _Sized):
                value, size = value.message, value.size
            if floor is not None:
                self._count(floor, time.monotonic() - now, size)
            elif self._floor is not None:
                self._started = True
                self._count(self._floor, 0.0, size)
            return value
        self._done.set()
        if kind == _END:
            raise StopIteration
        raise value

    def _count(self, floor: _RateFloor, waited: float, moved: int) -> None:
        try:
            floor.add(waited, moved)
        except ResourceExhausted:
            self._done.set()
            raise

    def close(self) -> None:
        """Stops the reader thread at its next message (or when the RPC ends)."""
        self._done.set()
