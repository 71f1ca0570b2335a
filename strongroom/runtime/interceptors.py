"""The one place where domain errors become gRPC statuses.

A :class:`~strongroom.errors.StrongroomError` becomes its status code with the message
``REASON: text`` (its :meth:`~strongroom.errors.StrongroomError.answer`: never a message naming
the service's own files) and a ``strongroom-reason`` trailing-metadata entry. Anything else is a
bug (any BaseException too, but the exits: :data:`EXITS`): it is logged with a reference id and
the caller gets INTERNAL with only that id, never a stack trace.

A request that does not deserialise (garbage bytes, invalid UTF-8 in a string field) would get
gRPC's own ``INTERNAL "Exception deserializing request!"`` and a logged traceback; here it becomes
``INVALID_ARGUMENT`` (``MALFORMED_REQUEST``) with one WARNING line naming the method and the peer.
A deserialiser that refuses a request with a :class:`~strongroom.errors.StrongroomError` (a limit
it checks on the wire before the protobuf runtime builds the message) has that refusal answered.

No unary request is parsed before its caller is authorised and admitted. gRPC calls a handler's
``request_deserializer`` on a unary request before any interceptor's behaviour runs, so a service's
own deserialiser would parse every request (up to the message limit) of any holder of a
certificate of the CA, role or not, and outside the per-caller and data-plane admission.
:class:`RequestDecodingInterceptor` (innermost) therefore registers every unary-request method with
a deserialiser that only boxes the bytes as received (:class:`_Received`), and calls the method's
own deserialiser on them once the authoriser and the guards have let the call through, inside the
error mapping. The bytes are parsed once, as gRPC would have: no copy is added, and they are freed
once parsed (the box, which every interceptor's frame keeps, is emptied). Request streams
are deserialised as the handler reads them, after all of that already.

gRPC's threaded server reads a unary request on the call's worker thread before any interceptor's
behaviour runs: a peer that sent a call's headers and never its message held a worker for as long
as it liked, before the authoriser and every limit (any certificate of the CA sufficed: health is
public), and as many as there are workers held them all. :class:`DeferredRequests` (outermost)
hands gRPC every unary-request method as a request stream, so that its behaviour starts at once,
and the message (the box of its bytes) is read innermost, by :class:`RequestDecodingInterceptor`,
once the authoriser and the limits admitted the call (a caller refused there holds nothing; an admitted one waits within
its limits: :meth:`~strongroom.runtime.callers.UnaryGuard.wait_for_request`).

A service that must account for every refusal of a method (the key broker audits every refused
release) is told of the refusals its own code never sees, those raised before its behaviour runs
(by the authoriser, the stream and unary-call guards, the request decoding), through a
:data:`RefusalObserver` registered for the method with the error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Generic, NoReturn, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from strongroom.errors import (
    REFUSAL_LINE,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    StrongroomError,
    line_budgeted,
)
from strongroom.pki.authz import admitted_caller, verified_as
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.reasons import Reason
from strongroom.runtime.callers import Identify, caller_key
from strongroom.runtime.gave_up import GaveUp, gave_up_on
from strongroom.runtime.grpc_types import (
    HandlerInterceptor,
    RpcMethodHandler,
    ServerInterceptor,
    carry_attributes,
    is_non_blocking,
    rewrap_handler,
)
from strongroom.runtime.log_refusals import enter_rpc, leave_rpc

log = logging.getLogger(__name__)

RefusalObserver = Callable[[StrongroomError, grpc.ServicerContext, str], None]
"""Told of a refusal of an RPC raised before the service's behaviour ran, with the call's context
(its peer certificate) and the bucket its caller counts in by the host's rule, the one its limits
use (:func:`~strongroom.runtime.callers.bucket`: every role-less caller in one): the request was
not read, or not decoded. Called before the caller is answered; what it raises is logged, and the
caller's answer stays the refusal."""


class _Call:
    """One observed RPC: whether its request reached the service's behaviour."""

    __slots__ = ("reached",)

    def __init__(self) -> None:
        self.reached = False


# The observed RPC running on this thread, set by the error mapping around the call and marked by
# the request decoding (innermost) when it hands the request to the service.
_OBSERVED: ContextVar[_Call | None] = ContextVar("strongroom_observed_call", default=None)


def abort_with(context: grpc.ServicerContext, exc: StrongroomError) -> NoReturn:
    """Fails the current RPC with ``exc``'s status, reason and public message (raises)."""
    context.set_trailing_metadata(((REASON_TRAILER, exc.reason),))
    context.abort(grpc.StatusCode[exc.status_name], exc.answer())


EXITS = (GeneratorExit, KeyboardInterrupt, SystemExit)
"""The BaseExceptions the error mapping lets through unanswered: the process exiting, and a
streaming handler's generator being closed (gRPC's collector closes one whose call ended; the
close must end it, and a generator that yields on GeneratorExit is a RuntimeError). Every other
BaseException is a bug answered INTERNAL as any Exception is: pyo3's ``PanicException`` (a Rust
panic in ``cryptography``) is one, and past the mapping gRPC, which catches Exception only, left
its call without a status until the caller's deadline."""
AIO_EXITS = (*EXITS, asyncio.CancelledError)
"""The same for a handler of gRPC's asyncio server: its call cancelled, as well."""


def _handle(exc: BaseException, context: grpc.ServicerContext, method: str) -> NoReturn:
    if isinstance(exc, StrongroomError):
        log.info(
            "rpc failed",
            extra={
                "method": method,
                "reason": exc.reason,
                "status": exc.status_name,
                # Within the caller's budget when it is refused, or when the service logs the
                # failure on lines of its own (an outage's); a bug or a damaged blob every time.
                REFUSAL_LINE: line_budgeted(exc),
            },
        )
        abort_with(context, exc)
    # context.abort() raises a bare Exception after recording the status: let it through.
    if context.code() is not None:  # type: ignore[attr-defined]
        raise exc
    ref = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (ref %s)", method, ref, exc_info=exc)
    context.set_trailing_metadata(((REASON_TRAILER, "INTERNAL"),))
    context.abort(grpc.StatusCode.INTERNAL, f"INTERNAL: internal error (ref {ref})")


async def answer_aio(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: BaseException,
    method: str,
    *,
    log_refusal: bool = True,
) -> NoReturn:
    """What :func:`_handle` does, for a handler of gRPC's asyncio server (the plaintext health
    port): a :class:`~strongroom.errors.StrongroomError` becomes its status, reason trailer and
    message (logged unless ``log_refusal`` is false: the caller's log budget is spent); anything
    else is logged with a reference and answered INTERNAL with only that."""
    if isinstance(exc, StrongroomError):
        if log_refusal:
            log.info(
                "rpc failed",
                extra={"method": method, "reason": exc.reason, "status": exc.status_name},
            )
        context.set_trailing_metadata(((REASON_TRAILER, exc.reason),))
        await context.abort(grpc.StatusCode[exc.status_name], exc.answer())
    ref = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (ref %s)", method, ref, exc_info=exc)
    context.set_trailing_metadata(((REASON_TRAILER, Reason.INTERNAL),))
    await context.abort(grpc.StatusCode.INTERNAL, f"INTERNAL: internal error (ref {ref})")
    raise AssertionError("unreachable: abort raises")


class _Malformed:
    """Stands for a request message that did not deserialise (gRPC treats None as a failure), or
    that its deserialiser refused (``error``: a limit it checks on the wire, before the parse), or
    that is larger than the service's limit (``size``)."""

    __slots__ = ("error", "problem", "size")

    def __init__(
        self, problem: str, error: StrongroomError | None = None, size: int | None = None
    ) -> None:
        self.problem = problem
        self.error = error
        self.size = size


def _too_large(method: str, size: int, limit: int) -> _Malformed:
    return _Malformed(
        "message too large",
        ResourceExhausted(
            f"{method}: a request message of {size} bytes is larger than the limit of {limit} "
            "bytes",
            reason=Reason.MESSAGE_TOO_LARGE,
        ),
        size,
    )


def _safe_deserializer(
    deserialize: Callable[[bytes], Any] | None, method: str, max_request: int | None = None
) -> Callable[[bytes], Any] | None:
    """``deserialize`` answering a marker (:class:`_Malformed`) for a message it cannot or will
    not parse, refused when the behaviour reads it (authorised and admitted); one over
    ``max_request`` bytes (the method's limit, of which gRPC enforces only a cap above it:
    :attr:`~strongroom.runtime.server.MessageLimits.receive_cap`) is refused unparsed, and its
    bytes are dropped at once."""
    if max_request is None:
        if deserialize is None:
            return None
        parse = deserialize
    else:
        parse = deserialize if deserialize is not None else _as_is

    def safe(data: bytes) -> Any:
        if max_request is not None and len(data) > max_request:
            return _too_large(method, len(data), max_request)
        try:
            return parse(data)
        except StrongroomError as exc:
            return _Malformed(type(exc).__name__, exc)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Malformed(type(exc).__name__)

    return safe


def _as_is(data: bytes) -> bytes:
    return data


def _malformed(
    request: _Malformed, context: grpc.ServicerContext, method: str, detail: str = ""
) -> StrongroomError:
    if request.size is not None and request.error is not None:
        log.warning(
            "request message too large",
            extra={
                "method": method,
                "peer": context.peer(),
                "bytes": request.size,
                "reason": request.error.reason,
                REFUSAL_LINE: True,
            },
        )
    if request.error is not None:
        return request.error  # the refusal the deserialiser chose (its status, its reason)
    log.warning(
        "malformed request",
        extra={
            "method": method,
            "peer": context.peer(),
            "problem": request.problem,
            "reason": Reason.MALFORMED_REQUEST,
            REFUSAL_LINE: True,
        },
    )
    return InvalidArgument(
        f"{method}: the request message is not a valid protobuf encoding{detail}",
        reason=Reason.MALFORMED_REQUEST,
    )


def _message_type(deserialize: Callable[[bytes], Any]) -> str:
    """The full name of the message ``deserialize`` parses when it is a generated message class's
    ``FromString`` (what the generated registration passes), else ''."""
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else ""


def _ended_by_caller(context: grpc.ServicerContext, method: str, before: str) -> StrongroomError:
    """The refusal of a call that ended (gRPC raises a bare ``grpc.RpcError`` from its request
    stream) ``before`` the service had read what it needed: DeadlineExceeded when its caller's
    deadline ended it, Cancelled otherwise, as the one rule tells them apart
    (:func:`~strongroom.runtime.gave_up.gave_up`)."""
    if gave_up_on(context) is GaveUp.DEADLINE:
        return DeadlineExceeded(f"{method}: the caller's deadline passed before {before}")
    return Cancelled(
        f"{method}: the call ended before {before} (cancelled, or a message refused by gRPC: "
        "far larger than the limit)"
    )


CALL_END_WAIT = 0.5
"""Seconds a refusal of a request stream its caller ended waits for gRPC to record the call's
end, when the end was a cancel or a deadline (:meth:`_RequestStream.caller_gave_up`)."""


class _RequestStream:
    """A call's request stream as its behaviour reads it, authorised and admitted: a message that
    did not decode is refused (:func:`_malformed`), and the call's end, which gRPC's iterator
    raises as a bare ``grpc.RpcError``, is its caller giving up (:func:`_ended_by_caller`).

    That error reached the error mapping as a bug of the service's: an upload its client
    cancelled, or whose deadline passed, was logged "unexpected error" with a traceback and
    answered INTERNAL."""

    __slots__ = ("_context", "_ended", "_method", "_requests")

    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> None:
        self._requests = iter(requests)
        self._context = context
        self._method = method
        self._ended = False

    def __iter__(self) -> _RequestStream:
        return self

    def __next__(self) -> Any:
        try:
            request = next(self._requests)
        except StopIteration:
            self._ended = True
            raise
        except grpc.RpcError:
            raise self._gave_up() from None
        if isinstance(request, _Malformed):
            raise _malformed(request, self._context, self._method)
        return request

    def _gave_up(self) -> StrongroomError:
        return _ended_by_caller(self._context, self._method, "its request stream ended")

    def caller_gave_up(self, refusal: StrongroomError) -> StrongroomError | None:
        """What a refusal the behaviour raised after the stream's end stands for when its caller
        gave up on the call (None: the refusal stands).

        gRPC completes a cancelled call's pending read empty, as if the caller had ended its
        stream, and records the cancel after: the behaviour took an upload whose caller's
        deadline passed for a truncated one (INVALID_ARGUMENT TRUNCATED), and the call could
        still read as active when it refused it (1 run in 5 with two CPU burners). So a refusal
        after the stream's end waits for the call to end, at most :data:`CALL_END_WAIT`: a
        caller that really ended its stream waits for its answer, which comes that much later.
        Only a refusal of what was sent (``refusal``: INVALID_ARGUMENT) waits: a stream cut short
        reads as one, while no other refusal depends on where the stream ended, and each such
        wait holds a worker that long for every refused upload of a caller."""
        if not self._ended:
            return None
        if isinstance(refusal, InvalidArgument):
            _await_end(self._context)
        if gave_up_on(self._context) is not None:
            return self._gave_up()
        return None


def _await_end(context: grpc.ServicerContext) -> None:
    """Waits, at most :data:`CALL_END_WAIT`, for an active call to end: gRPC completes a
    cancelled call's pending read empty, as if its caller had ended its request stream, and
    records the cancel after (:meth:`_RequestStream.caller_gave_up`)."""
    if context.is_active():
        ended = threading.Event()
        if context.add_callback(ended.set):
            ended.wait(CALL_END_WAIT)


@contextlib.contextmanager
def _judged(request: Any) -> Iterator[None]:
    """Re-raises a refusal of a call whose request stream its caller gave up on
    (:meth:`_RequestStream.caller_gave_up`) as the caller giving up."""
    try:
        yield
    except StrongroomError as refusal:
        ended = request.caller_gave_up(refusal) if isinstance(request, _RequestStream) else None
        if ended is None:
            raise
        raise ended from None


class ErrorMappingInterceptor(HandlerInterceptor):
    """Maps exceptions raised by handlers to gRPC statuses, for every RPC kind.

    ``observers`` maps full method names (``/pkg.Service/Method``) to a :data:`RefusalObserver`,
    told of the refusals raised before the method's behaviour ran (for methods whose response is
    one message; the request decoding must be in the chain, innermost, to tell when it ran), and
    of the caller's bucket by ``identify`` (the host's: its limits' rule).

    ``max_request``: the largest request message (bytes) of every method, or of each method
    (``max_request(method)``, full method name: the host's
    :meth:`~strongroom.runtime.server.MessageLimits.request`, whose sizes bound the wait for the
    message too); one larger is refused ``RESOURCE_EXHAUSTED`` ``MESSAGE_TOO_LARGE`` unparsed (by the request decoding, after the
    authoriser and the limits, like a message that does not decode), observed as any refusal
    before the behaviour. gRPC's own limit must be above it
    (:attr:`~strongroom.runtime.server.MessageLimits.receive_cap`): a message gRPC refuses ends
    the call before any of this sees why, and the service took it for a client that cancelled.
    """

    def __init__(
        self,
        observers: Mapping[str, RefusalObserver] | None = None,
        identify: Identify = caller_key,
        *,
        max_request: int | Callable[[str], int] | None = None,
    ) -> None:
        self._observers = dict(observers or {})
        self._identify = identify
        self._max_request = max_request

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """``handler`` with its exceptions mapped to statuses."""
        method = details.method
        limit = self._max_request
        return _wrap_handler(
            handler,
            method,
            self._observers.get(method),
            self._identify,
            limit(method) if callable(limit) else limit,
        )


def _observe(
    observer: RefusalObserver,
    failure: BaseException,
    context: grpc.ServicerContext,
    method: str,
    identify: Identify,
) -> None:
    if not isinstance(failure, StrongroomError):
        return  # a bug, not a refusal: INTERNAL, logged with its reference
    try:
        observer(failure, context, identify(context))
    except Exception:  # the refusal stands whatever the observer does
        log.exception("the refusal observer of %s failed", method)


def _wrap_handler(
    handler: RpcMethodHandler,
    method: str,
    observer: RefusalObserver | None = None,
    identify: Identify = caller_key,
    max_request: int | None = None,
) -> RpcMethodHandler:
    # Undecodable (and oversized) messages of a request stream become a marker here (where gRPC deserialises
    # them) and are refused by RequestDecodingInterceptor, innermost: authorisation and stream
    # limits come first. Unary requests reach this boxed, parsed by that interceptor.
    #
    # The failure is handled after its except block, not in it: the exception gRPC's abort raises
    # then chains nothing, and the tracing span around this (OpenTelemetry's records whatever
    # leaves it) gets neither the error's message nor its stack, only the status the caller got.
    #
    # Each call's refusal lines (the authoriser's, the limits', its own and the one here) are
    # about its caller: enter_rpc says which call runs, and names its caller by the host's rule
    # (every role-less caller as one, as the limits count them), for their budget (runtime.logs).
    def unary_result(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            rpc = enter_rpc(context, identify)
            try:
                try:
                    return fn(request, context)
                except EXITS:
                    raise
                except BaseException as exc:
                    failure = exc
                _handle(failure, context, method)
            finally:
                leave_rpc(rpc)

        return call

    def stream_result(
        fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    ) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            rpc = enter_rpc(context, identify)
            try:
                try:
                    yield from fn(request, context)
                    return
                except EXITS:
                    raise
                except BaseException as exc:
                    failure = exc
                _handle(failure, context, method)
            finally:
                # A generator closed by the collector ends in another context: nothing to undo.
                with contextlib.suppress(ValueError):
                    leave_rpc(rpc)

        return call

    return rewrap_handler(
        handler,
        unary_result if observer is None else _observed(observer, method, identify),
        stream_result,
        request_deserializer=_safe_deserializer(handler.request_deserializer, method, max_request),
    )


def _observed(
    observer: RefusalObserver, method: str, identify: Identify
) -> Callable[[Callable[[Any, grpc.ServicerContext], Any]], Callable[..., Any]]:
    """The error mapping of a method with one response whose early refusals ``observer`` hears."""

    def wrap(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            observed = _Call()
            rpc = enter_rpc(context, identify)
            token = _OBSERVED.set(observed)
            try:
                # The observer hears of the caller the authoriser verified when it admitted the
                # call, as the limits counted it: checked again now, a certificate that expired
                # while the call waited for its message made it role-less, and its refusal
                # counted in every role-less caller's budget, naming no one.
                with admitted_caller() as admitted:
                    try:
                        return fn(request, context)
                    except EXITS:
                        raise
                    except BaseException as exc:
                        failure = exc
                    finally:
                        _OBSERVED.reset(token)
                if not observed.reached:
                    with verified_as(admitted):
                        _observe(observer, failure, context, method, identify)
                _handle(failure, context, method)
            finally:
                leave_rpc(rpc)

        return call

    return wrap


class _Received:
    """A unary request's bytes as gRPC received them, boxed until the request decoding takes them.

    gRPC hands a behaviour its request, and every interceptor's frame around the call keeps that
    argument until the call returns: were it the bytes themselves, each unary call would hold its
    encoding beside the message parsed from it (the protobuf runtime copies what it parses) for as
    long as its handler runs, a ModelInfer its whole inference. The box is what they keep; the
    decoding empties it, so the bytes are freed once parsed."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def take(self) -> bytes:
        """The bytes, which the box no longer holds (a second take is a bug: it raises)."""
        data = self.data
        if data is None:
            raise RuntimeError("a unary request's bytes were taken twice")
        self.data = None
        return data


def _decoded(
    deserialize: Callable[[bytes], Any],
    received: _Received | PendingRequest,
    context: grpc.ServicerContext,
    method: str,
    message_type: str,
) -> Any:
    """The received bytes parsed by the method's own deserialiser: where every unary request is
    read (:class:`DeferredRequests`) and parsed, once its caller is authorised and admitted
    (:class:`RequestDecodingInterceptor`). The bytes are referenced from nowhere else once this
    returns."""
    box = received.read(context) if isinstance(received, PendingRequest) else received
    if isinstance(box, _Malformed):  # refused unparsed: larger than the limit
        raise _malformed(box, context, method)
    data = box.take()
    try:
        return deserialize(data)
    except StrongroomError:
        raise  # the refusal the deserialiser chose (a limit it checks on the wire)
    except (DecodeError, UnicodeDecodeError, ValueError) as exc:
        problem = type(exc).__name__
    size = len(data)
    del data  # the refusal's traceback keeps this frame: not the bytes with it
    detail = f" of {message_type}" if message_type else ""
    # Raised outside the except block: the refusal chains no parser exception to the caller.
    raise _malformed(_Malformed(problem), context, method, f"{detail} ({size} bytes)")


class RequestDecodingInterceptor(HandlerInterceptor):
    """Parses a unary request, and refuses a request that does not deserialise (INVALID_ARGUMENT
    MALFORMED_REQUEST, or the refusal its deserialiser raised).

    It goes innermost, after the authoriser and the stream and unary-call guards: a caller who may
    not call the method, or who is over its limits, learns that first, whatever bytes it sent,
    and its request is never parsed. A unary-request method is registered with gRPC with a
    deserialiser that only boxes the bytes (gRPC would otherwise parse the request before any
    interceptor runs) and its own deserialiser runs here, on the bytes it takes from the box. Needs :class:`ErrorMappingInterceptor` further out.
    """

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """``handler`` parsing its unary request, or refusing an undecodable message of its
        request stream, before its behaviour runs."""
        method = details.method
        if handler.request_streaming:
            return self._as_received(handler, method)
        deserialize = handler.request_deserializer
        if deserialize is None:
            return self._as_received(handler, method)  # the behaviour takes the bytes
        message_type = _message_type(deserialize)  # for the refusal's message, found once

        def decode(received: _Received | PendingRequest, context: grpc.ServicerContext) -> Any:
            return _decoded(deserialize, received, context, method, message_type)

        return _decoding(handler, decode, request_deserializer=_Received)

    @staticmethod
    def _as_received(handler: RpcMethodHandler, method: str) -> RpcMethodHandler:
        # Messages deserialised by gRPC as the behaviour reads them (a marker for those that did
        # not decode), or a unary request the behaviour takes as bytes.
        request_streaming = handler.request_streaming

        def arguments(argument: Any, context: grpc.ServicerContext) -> Any:
            if request_streaming:
                return _RequestStream(argument, context, method)
            if isinstance(argument, PendingRequest):
                argument = argument.read(context)  # authorised and admitted: now it may wait
            if isinstance(argument, _Malformed):
                raise _malformed(argument, context, method)
            return argument

        return _decoding(handler, arguments)


def _decoding(
    handler: RpcMethodHandler,
    decode: Callable[[Any, grpc.ServicerContext], Any],
    **replace: Any,
) -> RpcMethodHandler:
    """``handler`` whose behaviour gets ``decode(argument, context)`` for the argument gRPC hands
    it; ``replace`` goes to :func:`rewrap_handler` (the deserialiser gRPC is given)."""

    def unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(argument: Any, context: grpc.ServicerContext) -> Any:
            request = decode(argument, context)
            observed = _OBSERVED.get()
            if observed is not None:
                observed.reached = True  # the service's own refusals are its own to report
            with _judged(request):
                return fn(request, context)

        return call

    def stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
        def call(argument: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            request = decode(argument, context)
            with _judged(request):
                yield from fn(request, context)

        return call

    return rewrap_handler(handler, unary, stream, **replace)


W = TypeVar("W")


class _PerMethod(Generic[W]):
    """What an interceptor built from a method's handler, kept per method for as long as the
    service's handler is the same object; at most ``max_methods`` methods (a service registers
    far fewer), so callers naming methods cannot grow it."""

    def __init__(self, max_methods: int) -> None:
        self._max = max_methods
        self._lock = threading.Lock()
        self._built: dict[str, tuple[RpcMethodHandler, W]] = {}

    def get(self, method: str, handler: RpcMethodHandler, build: Callable[[], W]) -> W:
        """The value kept for ``method`` and ``handler``, or ``build()``, kept if there is room."""
        kept = self._built.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        built = build()
        with self._lock:
            if len(self._built) < self._max or method in self._built:
                self._built[method] = (handler, built)
        return built


class CachedChain(HandlerInterceptor):
    """Runs ``interceptors`` (outermost first) once per method and reuses the wrapped handler.

    gRPC asks the interceptors for a handler on every call, and each of them wraps the one it gets
    afresh: about a tenth of a key release's CPU went to building the same closures again. The
    wrapped handler is kept per method, for as long as the service's own handler is the same
    object. That requires what holds for Strongroom's interceptors: what they wrap depends on the
    method name only (per-call facts such as the caller or the metadata are read from the
    servicer context when the call runs). At most ``max_methods`` are kept (the registered methods
    of a service are far fewer); unknown methods are never kept, so callers cannot grow it.
    """

    def __init__(
        self, interceptors: Sequence[ServerInterceptor], *, max_methods: int = 512
    ) -> None:
        self._interceptors = tuple(interceptors)
        self._wrapped: _PerMethod[RpcMethodHandler | None] = _PerMethod(max_methods)

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler | None:
        """``handler`` wrapped by every interceptor, built once per method and handler."""
        return self._wrapped.get(details.method, handler, lambda: self._wrap(handler, details))

    def _wrap(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler | None:
        def at(index: int) -> Callable[[grpc.HandlerCallDetails], RpcMethodHandler | None]:
            if index == len(self._interceptors):
                return lambda _details: handler
            interceptor = self._interceptors[index]
            return lambda d: interceptor.intercept_service(at(index + 1), d)

        return at(0)(details)


RequestWait = Callable[[grpc.ServicerContext, str, Callable[[], Any]], Any]
"""Runs a read of a call's request message (``read``) for ``method`` within the caller's bounds:
:meth:`~strongroom.runtime.callers.UnaryGuard.wait_for_request`."""


class PendingRequest:
    """The request message of a unary-request call, not read yet: gRPC hands the call's request
    stream over at once (:class:`DeferredRequests`), and :class:`RequestDecodingInterceptor`
    (innermost, after the authoriser and the limits) reads its one message."""

    __slots__ = ("_method", "_requests", "_wait")

    def __init__(self, requests: Iterator[Any], method: str, wait: RequestWait | None) -> None:
        self._requests = requests
        self._method = method
        self._wait = wait

    def read(self, context: grpc.ServicerContext) -> Any:
        """The request message (decoded, or the marker of one that did not decode); waits for it
        within the caller's bounds (a call that holds no data-plane worker already) or within
        the wait bound (one that does)."""
        if self._wait is None:
            return self._next(context)
        return self._wait(context, self._method, lambda: self._next(context))

    def _next(self, context: grpc.ServicerContext) -> Any:
        try:
            return next(self._requests)
        except StopIteration:
            # Read empty: a caller that sent none, or (gRPC's order) one that gave up just now.
            _await_end(context)
            if gave_up_on(context) is not None:
                raise _ended_by_caller(
                    context, self._method, "its request message was read"
                ) from None
            raise InvalidArgument(
                f"{self._method} requires exactly one request message; the caller sent none",
                reason=Reason.MALFORMED_REQUEST,
            ) from None
        except grpc.RpcError:  # the RPC ended before its message was read
            # What the log and the broker's audit of an unread ReleaseKey say: a caller whose
            # deadline passed was recorded CANCELLED, as if it had called the call off.
            raise _ended_by_caller(context, self._method, "its request message was read") from None


class DeferredRequests(HandlerInterceptor):
    """Serves every unary-request method as a request stream whose one message is read inside the
    chain (:class:`PendingRequest`), so that no worker waits for a request before the authoriser
    and the limits; it goes outermost, around the chain that ends with
    :class:`RequestDecodingInterceptor`, which reads it. Every interceptor inside still sees the
    method as unary.

    ``counted(method, non_blocking)`` says whether a call of the method already holds a
    data-plane worker while its request is read (a data-plane unary call or blocking stream);
    the others read it through ``wait``
    (:meth:`~strongroom.runtime.callers.UnaryGuard.wait_for_request`), the counted ones through
    ``read`` when given (:meth:`~strongroom.runtime.callers.UnaryGuard.read_request`: bounded).
    The converted handler is built once per method and handler, like :class:`CachedChain`'s.
    """

    def __init__(
        self,
        counted: Callable[[str, bool], bool],
        wait: RequestWait,
        *,
        max_methods: int = 512,
        read: RequestWait | None = None,
    ) -> None:
        self._counted = counted
        self._wait = wait
        self._read = read
        self._converted: _PerMethod[RpcMethodHandler] = _PerMethod(max_methods)

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """``handler`` as a request-stream handler when its request is one message."""
        if handler.request_streaming:
            return handler
        method = details.method
        return self._converted.get(method, handler, lambda: self._convert(handler, method))

    def _convert(self, handler: RpcMethodHandler, method: str) -> RpcMethodHandler:
        non_blocking = is_non_blocking(handler)
        wait = self._read if self._counted(method, non_blocking) else self._wait
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            def one(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return unary(PendingRequest(requests, method, wait), context)

            carry_attributes(one, unary)  # gRPC reads them (its thread pool) from the behaviour
            return grpc.stream_unary_rpc_method_handler(one, **kwargs)
        streaming = handler.unary_stream
        if streaming is None:
            return handler
        behaviour: Any = streaming
        if non_blocking:

            def sends(requests: Iterator[Any], context: grpc.ServicerContext, send: Any) -> Any:
                return behaviour(PendingRequest(requests, method, wait), context, send)

            carry_attributes(sends, behaviour)
            return grpc.stream_stream_rpc_method_handler(sends, **kwargs)

        def many(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            pending = PendingRequest(requests, method, wait)
            return behaviour(pending, context)  # type: ignore[no-any-return]

        carry_attributes(many, behaviour)
        return grpc.stream_stream_rpc_method_handler(many, **kwargs)
