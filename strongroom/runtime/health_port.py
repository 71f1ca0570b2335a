"""The plaintext health port: gRPC health for kubelet and compose probes that no caller can stall.

The port needs no certificate (a probe has none), so anyone who reaches it may call it. It was a
threaded gRPC server with 2 workers, and gRPC's threaded server reads a unary request on the
call's worker before any code of ours runs: two calls that sent their headers and never their
message held both workers, and the kubelet's probes queued behind them until the calls' deadlines
(none, if the caller set none) or their connections closed; failed liveness probes then restarted
a healthy service. No cap on workers or waits fixes that, since a probe's own wait for its
message (milliseconds) cannot be told from a stalled one before it ends.

So the port is served by gRPC's asyncio server on a thread of its own: a call waiting for its
message is a suspended coroutine, which holds no thread, and a probe is answered whatever number
of calls wait. Each wait is bounded besides (``server.health_request_wait_seconds``): a call
whose message has not arrived by then is ended with ``RESOURCE_EXHAUSTED``
(``REQUEST_MESSAGE_TIMEOUT``, one WARNING with the peer), so that what stalled calls cost (a few
KiB each in gRPC core) lasts seconds, not a connection's life. How many wait is bounded too
(:data:`MAX_WAITING_CALLS`): calls opened faster than the bound ends them (thousands a second, on
many connections) held ~25 KiB each, without limit, until the process ran out of memory. Past the
bound the call that has waited longest is ended with ``RESOURCE_EXHAUSTED``
(``TOO_MANY_WAITING_CALLS``), never the newest: a probe's message comes with its call and is read
at once, before as many other calls as the bound could come in and end it. Every method is
registered as a request stream to read its one message with that bound (the asyncio server reads
a unary request before the handler runs, without one).

Statuses come from the service's :class:`~strongroom.runtime.health.HealthServicer`, which the
mTLS port serves too: ``Check`` answers as grpcio-health-checking's does (``NOT_FOUND`` for a name
never set), and ``Watch`` goes through :meth:`~strongroom.runtime.health.HealthServicer.watch`
(its bounds on names and watchers included), handed to this port's event loop without waiting.
A request that does not decode is ``INVALID_ARGUMENT`` (``MALFORMED_REQUEST``) with one WARNING,
never gRPC's traceback; a request over ``HEALTH_MAX_REQUEST_BYTES`` is refused by gRPC itself.

What a refused call logs (its WARNING, its ``rpc failed`` line) is budgeted: anyone who reaches the
port chose how many lines the service wrote (two per call: a flood of ``Check`` for a name never
set, of undecodable requests, of calls without their message), each written by the event loop's
one thread, which a slow log pipe then blocked, and the probes with it. At most
:data:`LOG_LINES_PER_SECOND` such lines are written a second; the rest are counted and said in
one WARNING (``refused health calls not logged``) once that second is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from strongroom.errors import InvalidArgument, NotFound, ResourceExhausted
from strongroom.reasons import Reason
from strongroom.runtime.health import HealthServicer
from strongroom.runtime.interceptors import AIO_EXITS, answer_aio
from strongroom.runtime.listen import add_port

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_MAX_REQUEST_BYTES = 1024
"""The largest request the plaintext health port reads (a HealthCheckRequest is a service name)."""
MAX_WAITING_CALLS = 1024
"""Calls the port lets wait for their request message at once (each holds ~25 KiB of gRPC's and
ours); past it, the call that has waited longest is ended (``TOO_MANY_WAITING_CALLS``)."""
LOG_LINES_PER_SECOND = 20
"""Log lines the port writes a second about refused calls; the rest are counted, said once."""

T = TypeVar("T")


class _LogBudget:
    """At most ``per_second`` lines a second, the rest counted and said in one WARNING when the
    second is over. Used on the event loop's thread only (no lock)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_second: int) -> None:
        self._loop = loop
        self._per_second = per_second
        self._since = time.monotonic()
        self._written = 0
        self._dropped = 0

    def allow(self) -> bool:
        """Whether the next line may be written (if not, it is counted)."""
        now = time.monotonic()
        if now - self._since >= 1.0 and not self._dropped:
            self._since, self._written = now, 0
        if self._written < self._per_second:
            self._written += 1
            return True
        if not self._dropped:  # said once this second is over, whether more calls come or not
            self._loop.call_later(max(0.0, self._since + 1.0 - now), self._flush)
        self._dropped += 1
        return False

    def _flush(self) -> None:
        log.warning(
            "refused health calls not logged",
            extra={"lines": self._dropped, "limit_per_second": self._per_second},
        )
        self._since, self._written, self._dropped = time.monotonic(), 0, 0


class PlaintextHealthPort:
    """gRPC health over plaintext on ``listen``, from ``health``'s statuses, on an asyncio server
    whose event loop runs on a thread of its own; a call's request message is awaited for at most
    ``request_wait`` seconds. ``options`` are gRPC channel arguments besides (the service port's
    keepalive and connection age). Bound at construction (:attr:`port`); :meth:`start`, then
    :meth:`stop`."""

    def __init__(
        self,
        health: HealthServicer,
        listen: str,
        request_wait: float,
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._health = health
        self._options = tuple(options)
        self._wait = request_wait
        # Calls waiting for their message, the longest-waiting first (the loop's thread only):
        # each one's future, set when it is ended to make room.
        self._waiting: dict[object, asyncio.Future[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._log = _LogBudget(self._loop, LOG_LINES_PER_SECOND)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="health-port", daemon=True
        )
        self._thread.start()
        self._started = False
        try:
            self._server, self.port = self._run(self._bind(listen))
        except BaseException:
            self._close_loop()
            raise

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _bind(self, listen: str) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", HEALTH_MAX_REQUEST_BYTES),
                *self._options,
            ],
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    HEALTH_SERVICE,
                    {
                        "Check": grpc.stream_unary_rpc_method_handler(
                            self._check,
                            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
                        ),
                        "Watch": grpc.stream_stream_rpc_method_handler(
                            self._watch,
                            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
                        ),
                    },
                ),
            )
        )
        return server, add_port(server, listen, None)

    def waiting(self) -> int:
        """Calls waiting for their request message now."""
        return self._run(self._count())

    async def _count(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Starts answering."""
        self._run(self._server.start())
        self._started = True

    def stop(self) -> None:
        """Ends every call at once and stops the event loop's thread; a port never started is
        released too."""
        try:
            if not self._started:
                # gRPC frees the port only when a started server stops (ServiceHost.stop).
                self._run(self._server.start())
            self._run(self._server.stop(0))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _request(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
    ) -> health_pb2.HealthCheckRequest:
        """The call's one request message, awaited for at most the bound, then parsed; raises
        the refusal otherwise."""
        key = object()
        evicted: asyncio.Future[None] = self._loop.create_future()
        self._waiting[key] = evicted
        if len(self._waiting) > MAX_WAITING_CALLS:  # the longest-waiting makes room
            self._waiting.pop(next(iter(self._waiting))).set_result(None)
        read = asyncio.ensure_future(anext(requests))
        try:
            done, _ = await asyncio.wait(
                (read, evicted), timeout=self._wait, return_when=asyncio.FIRST_COMPLETED
            )
            if read not in done and evicted in done:
                raise self._ended(
                    context,
                    "health call ended: too many calls wait for their message",
                    f"{method}: {MAX_WAITING_CALLS} calls wait for their request message; this "
                    "one, waiting longest, was ended to make room (send the message with the call)",
                    Reason.TOO_MANY_WAITING_CALLS,
                    method,
                )
            if read not in done:
                raise TimeoutError
            data = read.result()
        except TimeoutError:
            raise self._ended(
                context,
                "health call ended: no request message",
                f"{method}: no request message within {self._wait:g}s "
                "(server.health_request_wait_seconds); the call was ended",
                Reason.REQUEST_MESSAGE_TIMEOUT,
                method,
            ) from None
        except StopAsyncIteration:
            raise InvalidArgument(
                f"{method} requires exactly one request message; the caller sent none",
                reason=Reason.MALFORMED_REQUEST,
            ) from None
        finally:
            self._waiting.pop(key, None)
            read.cancel()  # nothing once it is done; else the read ends with the call
        try:
            return health_pb2.HealthCheckRequest.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            problem = type(exc).__name__
        if self._log.allow():
            log.warning(
                "malformed request",
                extra={"method": method, "peer": context.peer(), "problem": problem},
            )
        # Raised outside the except block: the refusal chains no parser exception.
        raise InvalidArgument(
            f"{method}: the request message is not a valid protobuf encoding of "
            f"grpc.health.v1.HealthCheckRequest ({len(data)} bytes)",
            reason=Reason.MALFORMED_REQUEST,
        )

    def _ended(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        line: str,
        message: str,
        reason: str,
        method: str,
    ) -> ResourceExhausted:
        """The refusal of a call ended while it waited for its message, logged within the
        port's log rate (anyone reaching the port decides how often this happens)."""
        if self._log.allow():
            log.warning(line, extra={"method": method, "peer": context.peer(), "reason": reason})
        return ResourceExhausted(message, reason=reason)

    async def _check(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        method = f"/{HEALTH_SERVICE}/Check"
        try:
            request = await self._request(requests, context, method)
            status = self._health.status_of(request.service)
            if status is None:  # as grpcio-health-checking answers (a name never set)
                raise NotFound(
                    "no health status is kept for a service of that name", reason=Reason.NOT_FOUND
                )
            return health_pb2.HealthCheckResponse(status=status)
        except AIO_EXITS:
            raise
        except BaseException as exc:  # a bug's, too, is answered (interceptors.EXITS)
            failure = exc
        # Answered outside the except block: the abort chains nothing.
        await answer_aio(context, failure, method, log_refusal=self._log.allow())

    async def _watch(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        method = f"/{HEALTH_SERVICE}/Watch"
        try:
            request = await self._request(requests, context, method)
        except AIO_EXITS:
            raise
        except BaseException as exc:
            failure = exc
        else:
            async for response in self._statuses(request.service):
                yield response
            return
        await answer_aio(context, failure, method, log_refusal=self._log.allow())

    async def _statuses(self, service: str) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """``service``'s status now and whenever it changes, until the watch ends."""
        changed = asyncio.Event()
        latest: list[health_pb2.HealthCheckResponse | None] = []  # what was sent since the yield
        loop = self._loop

        def deliver(response: health_pb2.HealthCheckResponse | None) -> None:
            latest.append(response)
            changed.set()

        def send(response: health_pb2.HealthCheckResponse | None) -> None:
            # Called by whichever thread set a status, with the watcher's lock held: hand it
            # over, never wait (a loop that has stopped drops it: the call is over anyway).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, response)

        closed = self._health.watch(service, send, plaintext=True)
        try:
            while True:
                await changed.wait()
                changed.clear()
                sent, latest[:] = list(latest), []
                # Each response carries the status as it is now: a watcher that read slowly gets
                # the newest, never a queue of older ones.
                last = next((r for r in reversed(sent) if r is not None), None)
                if last is not None:
                    yield last
                if None in sent:
                    return
        finally:
            if closed is not None:
                closed()
