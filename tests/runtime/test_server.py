"""The service host: error mapping, health, readiness and graceful draining, over real gRPC."""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import logging
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom import errors
from strongroom.dev.devstack.stack import free_port
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime import health as health_module
from strongroom.runtime import health_port as health_port_module
from strongroom.runtime import log_writer
from strongroom.runtime import server as server_module
from strongroom.runtime.config import LoggingConfig, ServerConfig
from strongroom.runtime.grpc_types import HandlerInterceptor, RpcMethodHandler, rewrap_handler
from strongroom.runtime.health import MAX_SERVICE_NAME
from strongroom.runtime.health_port import LOG_LINES_PER_SECOND
from strongroom.runtime.log_refusals import (
    REASONS_PER_CALLER,
    REFUSED_CALLS_BURST,
    REFUSED_CALLS_PER_SECOND,
)
from strongroom.runtime.logs import configure_logging
from strongroom.runtime.server import MessageLimits, ServiceHost, ServiceSpec
from tests.conftest import buffered_service_log, refused_calls_not_logged
from tests.ports import listenable

SERVICE = "test.Echo"


class Behaviour:
    """What the test service does for each method; changed by the tests."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.ready_reason: str | None = None


def _identity(b: bytes) -> bytes:
    return b


class Panic(BaseException):
    """Not an Exception, as pyo3's ``PanicException`` (raised by ``cryptography``) is not."""


def make_service(behaviour: Behaviour) -> ServiceSpec:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"invalid":
            raise errors.InvalidArgument("name must not be empty", reason="NAME_EMPTY")
        if request == b"denied":
            raise errors.PermissionDenied("not for you", reason="CALLER_NOT_ALLOWED")
        if request.startswith(b"refuse:"):  # a refusal for the reason the caller names
            raise errors.FailedPrecondition("refused", reason=request[7:].decode())
        if request == b"bug":
            raise KeyError("secret-internal-detail")
        if request == b"panic":
            raise Panic("secret-panic-detail")
        if request == b"slow":
            behaviour.started.set()
            behaviour.release.wait(10)
        return b"ok:" + request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if request == b"endless":  # until its call ends and gRPC closes it
            try:
                while True:
                    yield b"more"
                    time.sleep(0.01)
            finally:
                behaviour.started.set()
        yield b"first"
        if request == b"panic":
            raise Panic("secret-panic-detail")
        raise errors.DataLoss("blob digest mismatch", reason="DIGEST_MISMATCH")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, _identity, _identity),
        },
    )
    return ServiceSpec(
        name=SERVICE,
        register=lambda server: server.add_generic_rpc_handlers((handler,)),
        checks=(lambda: behaviour.ready_reason,),
    )


@pytest.fixture
def host() -> Iterator[tuple[ServiceHost, Behaviour, grpc.Channel]]:
    behaviour = Behaviour()
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(behaviour)],
        health_listen="127.0.0.1:0",
        check_interval=0.05,
    )
    host.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{host.port}")
    try:
        yield host, behaviour, channel
    finally:
        behaviour.release.set()
        channel.close()
        host.stop(0)


def call(channel: grpc.Channel, payload: bytes, timeout: float = 10) -> bytes:
    fn = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    return fn(payload, timeout=timeout)  # type: ignore[no-any-return]


def test_success(host: tuple[ServiceHost, Behaviour, grpc.Channel]) -> None:
    assert call(host[2], b"x") == b"ok:x"


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "NAME_EMPTY"),
        (b"denied", grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED"),
    ],
)
def test_domain_errors_map_to_precise_status(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    payload: bytes,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(host[2], payload)
    err = info.value
    assert err.code() == code  # type: ignore[attr-defined]
    assert err.details().startswith(f"{reason}: ")  # type: ignore[attr-defined]
    assert (REASON_TRAILER, reason) in tuple(err.trailing_metadata())  # type: ignore[attr-defined]


def test_unexpected_error_is_internal_without_details(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(host[2], b"bug")
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    details = err.details()  # type: ignore[attr-defined]
    assert "secret-internal-detail" not in details and "Traceback" not in details
    ref = details.rsplit("ref ", 1)[1].rstrip(")")
    assert any(ref in r.getMessage() for r in caplog.records), "the reference must be in the log"


def _internal_ref(err: grpc.RpcError, caplog: pytest.LogCaptureFixture) -> str:
    """The reference of an INTERNAL answer, checked as the error mapping gives it: no detail of
    the failure to the caller, the reason trailer, and one ERROR line naming the reference."""
    assert err.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    details = err.details()  # type: ignore[attr-defined]
    assert details.startswith("INTERNAL: internal error (ref ")
    assert "secret-panic-detail" not in details and "Traceback" not in details
    assert (REASON_TRAILER, "INTERNAL") in tuple(err.trailing_metadata())  # type: ignore[attr-defined]
    ref: str = details.rsplit("ref ", 1)[1].rstrip(")")
    lines = [r for r in caplog.records if ref in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.ERROR]
    return ref


def test_a_base_exception_from_a_handler_is_internal_and_the_service_goes_on(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    """A BaseException that is not an exit (pyo3's PanicException, which ``cryptography`` raises
    on a Rust panic) went past the error mapping, which caught Exception only, to gRPC, which
    catches no more: the call got no status until its deadline. It is answered as any bug is."""
    channel = host[2]
    with pytest.raises(grpc.RpcError) as info:
        call(channel, b"panic", timeout=5)
    _internal_ref(info.value, caplog)
    responses = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(
        b"panic", timeout=5
    )
    assert next(responses) == b"first"
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    _internal_ref(info.value, caplog)
    assert call(channel, b"x") == b"ok:x"  # the service keeps serving


def test_a_base_exception_on_the_plaintext_health_port_is_internal_and_it_goes_on(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plaintext health port's handlers (gRPC's asyncio server) caught Exception only too:
    a BaseException that is not an exit or a cancel is answered as any bug is there as well."""
    h = host[0]
    assert h.health_port is not None
    status_of = h._health.status_of
    panicking = [True]

    def panic_once(service: str) -> int | None:
        if panicking.pop() if panicking else False:
            raise Panic("secret-panic-detail")
        return status_of(service)

    monkeypatch.setattr(h._health, "status_of", panic_once)
    with pytest.raises(grpc.RpcError) as info:
        health_status(h.health_port)
    _internal_ref(info.value, caplog)
    assert health_status(h.health_port) == health_pb2.HealthCheckResponse.SERVING  # it answers on


def test_a_streaming_handler_closed_when_its_call_ends_is_no_error(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    """GeneratorExit is how a streaming handler whose call ended is closed: the error mapping,
    which answers any other BaseException INTERNAL, lets it through, unlogged."""
    _, behaviour, channel = host
    responses = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(
        b"endless", timeout=10
    )
    assert next(responses) == b"more"
    responses.cancel()  # type: ignore[attr-defined]
    assert behaviour.started.wait(5), "the handler was not closed"
    gc.collect()
    assert call(channel, b"x") == b"ok:x"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_base_exception_from_an_observed_method_is_internal_and_not_a_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same for a method whose refusals an observer hears (the broker's ReleaseKey): a bug,
    not a refusal, so its observer hears nothing of it."""
    seen: list[str] = []
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(Behaviour())],
        refusal_observers={f"/{SERVICE}/Unary": lambda exc, _c, _b: seen.append(exc.reason)},
    )
    host.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                call(channel, b"panic", timeout=5)
            _internal_ref(info.value, caplog)
            assert call(channel, b"x") == b"ok:x"
    finally:
        host.stop(0)
    assert seen == []


def test_streaming_error_after_first_message(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    fn = host[2].unary_stream(f"/{SERVICE}/Stream", _identity, _identity)
    responses = fn(b"", timeout=10)
    assert next(responses) == b"first"
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_health_follows_readiness_checks_on_both_ports(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    h, behaviour, _ = host
    assert h.health_port is not None
    SERVING = health_pb2.HealthCheckResponse.SERVING
    NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_status(h.port) == SERVING
    assert health_status(h.health_port, SERVICE) == SERVING
    behaviour.ready_reason = "HSM unavailable"
    assert wait_for(lambda: health_status(h.health_port) == NOT_SERVING)  # type: ignore[arg-type]
    assert health_status(h.port, SERVICE) == NOT_SERVING
    assert h.not_ready_reason == f"{SERVICE}: HSM unavailable"
    behaviour.ready_reason = None
    assert wait_for(lambda: health_status(h.health_port) == SERVING)  # type: ignore[arg-type]


def test_health_port_serves_nothing_else(host: tuple[ServiceHost, Behaviour, grpc.Channel]) -> None:
    h = host[0]
    with (
        grpc.insecure_channel(f"127.0.0.1:{h.health_port}") as ch,
        pytest.raises(grpc.RpcError) as info,
    ):
        call(ch, b"x")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_health_watchers_leave_nothing_behind(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    """Every Watch of a new name left an (empty) entry keyed by that name after its stream ended,
    on the unauthenticated port: 200 watches of 1 MiB names held 200 MiB for good."""
    h = host[0]
    stub_port = h.health_port
    with grpc.insecure_channel(f"127.0.0.1:{stub_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for i in range(50):
            call = stub.Watch(health_pb2.HealthCheckRequest(service=f"made-up-{i}"))
            assert next(call).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            call.cancel()
        assert wait_for(lambda: not h._health._watchers)
        # A name no service has or will have: told once, the stream ends, nothing is kept.
        long = stub.Watch(health_pb2.HealthCheckRequest(service="x" * (MAX_SERVICE_NAME + 1)))
        statuses = [r.status for r in long]
        assert statuses == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
        with pytest.raises(grpc.RpcError) as info:  # past the port's 1 KiB requests
            next(stub.Watch(health_pb2.HealthCheckRequest(service="x" * 2000), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert not h._health._watchers


def test_health_watch_streams_are_bounded(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open Watch streams cost memory on the unauthenticated port, and nothing bounded how many a
    client kept (5,000 held ~250 MB). Past the bound a Watch is told the status and ended; Check
    (the probes) still answers."""
    monkeypatch.setattr(health_module, "MAX_WATCHERS", 6)  # 3 of them on the plaintext port
    h = host[0]
    assert h.health_port is not None
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{h.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        kept = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
        assert [next(call).status for call in kept] == [serving] * 3
        beyond = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert [r.status for r in beyond] == [serving]  # told once, then the stream ended
        assert health_status(h.health_port) == serving
        kept[0].cancel()
        assert wait_for(lambda: h._health._watching == 2)
        again = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(again).status == serving
        assert wait_for(lambda: h._health._watching == 3)  # kept open again
        for call in [*kept[1:], again]:
            call.cancel()
        assert wait_for(lambda: not h._health._watchers)


def test_graceful_stop_drains_in_flight_calls(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    h, behaviour, channel = host
    result: dict[str, bytes] = {}
    # The slow call's own deadline is not under test: long enough that a loaded machine's
    # probes below cannot outlast it (it is released as soon as a probe is refused).
    t = threading.Thread(
        target=lambda: result.setdefault("slow", call(channel, b"slow", timeout=60))
    )
    t.start()
    assert behaviour.started.wait(5)
    stopper = threading.Thread(target=h.stop, kwargs={"grace": 30})
    stopper.start()
    # New calls are refused while the in-flight one is still running.
    assert wait_for(lambda: _refused(channel))
    behaviour.release.set()
    t.join(10)
    stopper.join(10)
    assert result["slow"] == b"ok:slow"


def test_stop_returns_only_once_cancelled_calls_handlers_have_returned(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    """gRPC's stop cancels the calls in flight after the grace, and returned while their
    handlers still ran: what a service does once stopped (the key broker's last audit records,
    then closing its log) raced handlers still deciding. stop now waits for them (bounded)."""
    h, behaviour, channel = host
    t = threading.Thread(target=_call_quietly, args=(channel, b"slow"))
    t.start()
    assert behaviour.started.wait(5)
    stopper = threading.Thread(target=h.stop, kwargs={"grace": 0})
    stopper.start()
    stopper.join(1.0)
    assert stopper.is_alive()  # the handler is still running: stop has not returned
    behaviour.release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    t.join(10)


def test_wait_returns_only_once_stop_has_drained_the_handlers_and_counts_those_it_gave_up(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait`` (what ``run_until_signal`` returns after, and the service then closes what it
    holds) returned once gRPC's server had terminated, before the stop's drain of the
    handlers still running: the service closed its audit log beside handlers still deciding,
    the drain bounded for nothing. It returns once the stop has, which knows how many calls'
    handlers it gave up on (the process then exits without them)."""
    monkeypatch.setattr(server_module, "HANDLER_DRAIN_SECONDS", 0.5)  # the handler outlasts it
    h, behaviour, channel = host
    t = threading.Thread(target=_call_quietly, args=(channel, b"slow"))
    t.start()
    assert behaviour.started.wait(5)
    stopper = threading.Thread(target=h.stop, kwargs={"grace": 0})
    stopper.start()
    h.wait()
    stopping = stopper.is_alive()
    behaviour.release.set()
    stopper.join(10)
    t.join(10)
    assert not stopping
    assert h.abandoned == 1


def _call_quietly(channel: grpc.Channel, payload: bytes) -> None:
    with contextlib.suppress(grpc.RpcError):
        call(channel, payload)


def _refused(channel: grpc.Channel) -> bool:
    """Whether a new call is refused as the server stops. A call that reaches the server just as
    it stops can wait unserved until the grace ends: its short deadline makes it one more probe,
    not a refusal (it ran the slow call's deadline out on a loaded CI machine)."""
    try:
        call(channel, b"late", timeout=1)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[no-any-return]
    return False


def test_each_service_reports_its_own_readiness() -> None:
    first, second = Behaviour(), Behaviour()
    spec_a = make_service(first)
    spec_b = ServiceSpec(
        name="test.Other", register=lambda server: None, checks=(lambda: second.ready_reason,)
    )
    first.ready_reason = "models not ready"
    host = ServiceHost(
        listen="127.0.0.1:0", credentials=None, services=[spec_a, spec_b], check_interval=0.05
    )
    host.start()
    try:
        SERVING = health_pb2.HealthCheckResponse.SERVING
        NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(host.port, SERVICE) == NOT_SERVING
        assert health_status(host.port, "test.Other") == SERVING, (
            "a failing service must not hide the others"
        )
        assert health_status(host.port) == NOT_SERVING
    finally:
        host.stop(0)


def test_liveness_stays_serving_when_not_ready(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    from strongroom.runtime.server import LIVENESS

    h, behaviour, _ = host
    assert h.health_port is not None
    behaviour.ready_reason = "HSM unavailable"
    assert wait_for(
        lambda: health_status(h.health_port) == health_pb2.HealthCheckResponse.NOT_SERVING
    )  # type: ignore[arg-type]
    assert health_status(h.health_port, LIVENESS) == health_pb2.HealthCheckResponse.SERVING


# A HealthCheckRequest whose service name (field 1) is not UTF-8.
UNDECODABLE_HEALTH_REQUEST = b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize("port_name", ["health_port", "port"])
@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_an_undecodable_health_request_is_invalid_on_both_ports_without_a_traceback(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    caplog: pytest.LogCaptureFixture,
    port_name: str,
    method: str,
) -> None:
    """The plaintext health port needs no certificate: a stranger's garbage must not make it log
    an ERROR with a traceback per request (gRPC's own answer to an undecodable request)."""
    port = getattr(host[0], port_name)
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        path = f"/grpc.health.v1.Health/{method}"
        if method == "Check":
            channel.unary_unary(path, _identity, _identity)(UNDECODABLE_HEALTH_REQUEST, timeout=5)
        else:
            list(
                channel.unary_stream(path, _identity, _identity)(
                    UNDECODABLE_HEALTH_REQUEST, timeout=5
                )
            )
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert (REASON_TRAILER, "MALFORMED_REQUEST") in tuple(err.trailing_metadata())  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


class _Refuser(HandlerInterceptor):
    """Stands in for the authoriser: refuses a call whose metadata asks for it."""

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        def unary(fn: Any) -> Any:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                if ("refuse", "yes") in tuple(context.invocation_metadata()):
                    raise errors.PermissionDenied("no role", reason="PEER_NOT_ALLOWED")
                return fn(request, context)

            return call

        return rewrap_handler(handler, unary, lambda fn: fn)


def test_refusals_before_the_behaviour_runs_are_observed_and_only_those() -> None:
    """A service that must account for every refusal of a method (the broker audits every refused
    release) never saw those raised before its code ran: the authoriser's, and a request that
    does not decode. The error mapping tells the method's observer of those, and of no other."""
    seen: list[tuple[str, str]] = []

    def observer(exc: errors.StrongroomError, context: grpc.ServicerContext, bucket: str) -> None:
        seen.append((exc.reason, exc.status_name))
        if exc.reason == "MALFORMED_REQUEST":
            raise RuntimeError("the observer fails")  # the refusal stands all the same

    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(Behaviour())],
        interceptors=[_Refuser()],
        refusal_observers={
            f"/{SERVICE}/Unary": observer,
            "/grpc.health.v1.Health/Check": observer,
        },
    )
    host.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
            check = channel.unary_unary("/grpc.health.v1.Health/Check", _identity, _identity)
            assert unary(b"x", timeout=10) == b"ok:x"
            codes = []
            for attempt in (
                lambda: unary(b"x", timeout=10, metadata=(("refuse", "yes"),)),
                lambda: unary(b"denied", timeout=10),  # the behaviour's own refusal
                lambda: check(UNDECODABLE_HEALTH_REQUEST, timeout=10),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    attempt()
                codes.append(info.value.code())  # type: ignore[attr-defined]
    finally:
        host.stop(0)
    assert codes == [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]
    assert seen == [
        ("PEER_NOT_ALLOWED", "PERMISSION_DENIED"),
        ("MALFORMED_REQUEST", "INVALID_ARGUMENT"),
    ]


def test_a_unary_requests_bytes_are_freed_once_parsed() -> None:
    """The runtime parses a unary request itself (after the authoriser and the admission), and
    every interceptor's frame keeps the argument gRPC passed until the call returns: were that
    the bytes, every call would hold its encoding beside the parsed message (which the protobuf
    runtime copies) while its handler runs, a ModelInfer's tens of MiB for its whole inference.
    Measured with tracemalloc (gRPC makes the request's bytes object in Python's allocator)."""
    payload = bytes(8 << 20)
    held: dict[str, int] = {}
    baseline = 0

    def parse(data: bytes) -> int:
        return len(data)  # a message far smaller than its encoding

    def unary(request: int, context: grpc.ServicerContext) -> bytes:
        gc.collect()
        held["Unary"] = tracemalloc.get_traced_memory()[0] - baseline
        return b"%d" % request

    def stream(request: int, context: grpc.ServicerContext) -> Iterator[bytes]:
        gc.collect()
        held["Stream"] = tracemalloc.get_traced_memory()[0] - baseline
        yield b"%d" % request

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, parse, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, parse, _identity),
        },
    )
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[ServiceSpec(SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))],
        message_limits=MessageLimits(receive=16 << 20, send=1 << 20),
    )
    host.start()
    tracemalloc.start()
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{host.port}", options=[("grpc.max_send_message_length", 16 << 20)]
        ) as channel:
            baseline = tracemalloc.get_traced_memory()[0]
            assert channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)(
                payload, timeout=30
            ) == b"%d" % len(payload)
            baseline = tracemalloc.get_traced_memory()[0]
            assert list(
                channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(
                    payload, timeout=30
                )
            ) == [b"%d" % len(payload)]
    finally:
        tracemalloc.stop()
        host.stop(0)
    # The bytes (8 MiB) are gone by the time the behaviour runs; a few KiB of other allocations.
    assert held["Unary"] < len(payload) // 4, held
    assert held["Stream"] < len(payload) // 4, held


def _stall(channel: grpc.Channel, method: str, gate: threading.Event) -> Any:
    """A health call whose headers go and whose request message never does (until ``gate``)."""

    def never() -> Iterator[bytes]:
        gate.wait(60)
        yield from ()

    path = f"/grpc.health.v1.Health/{method}"
    if method == "Check":
        return channel.stream_unary(path, _identity, _identity).future(never(), timeout=60)
    return channel.stream_stream(path, _identity, _identity)(never(), timeout=60)


def _reason(call: Any) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        call.result() if hasattr(call, "result") else list(call)
    err: Any = info.value
    return err.code(), dict(err.trailing_metadata() or ()).get(REASON_TRAILER)


def test_calls_that_never_send_their_message_cannot_stall_the_plaintext_health_port(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
) -> None:
    """The plaintext health port (no certificate needed: the kubelet's probes) had 2 worker
    threads, and gRPC read a call's request on its worker: two Checks that sent their headers and
    never their message held both, and every probe queued behind them (liveness failed, the pod
    was restarted). A call waiting for its message holds no thread now: the probes are answered
    however many such calls wait, on one connection or many."""
    h = host[0]
    assert h.health_port is not None
    gate = threading.Event()
    channels = [grpc.insecure_channel(f"127.0.0.1:{h.health_port}") for _ in range(4)]
    try:
        stalled = [_stall(c, m, gate) for c in channels for m in ("Check", "Watch") * 4]
        port = h._health_server
        assert port is not None
        assert wait_for(lambda: port.waiting() == len(stalled), timeout=30)
        serving = health_pb2.HealthCheckResponse.SERVING
        for _ in range(5):
            assert health_status(h.health_port) == serving
        with grpc.insecure_channel(f"127.0.0.1:{h.health_port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == serving
            watch.cancel()
        assert not any(call.done() for call in stalled)
        gate.set()  # the stalled calls end without a message
        assert {_reason(call) for call in stalled} == {
            (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
        }
    finally:
        gate.set()
        for channel in channels:
            channel.close()


@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_a_plaintext_health_call_without_its_message_is_ended_after_the_wait_bound(
    method: str,
) -> None:
    """What a stalled call costs on the unauthenticated port lasts the bound
    (server.health_request_wait_seconds), not the caller's deadline or its connection's
    life: it is ended with RESOURCE_EXHAUSTED REQUEST_MESSAGE_TIMEOUT while its caller still
    sends nothing."""
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(Behaviour())],
        health_listen="127.0.0.1:0",
        config=ServerConfig(health_request_wait_seconds=0.2),
    )
    host.start()
    gate = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.health_port}") as channel:
            assert _reason(_stall(channel, method, gate)) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "REQUEST_MESSAGE_TIMEOUT",
            )
            assert not gate.is_set()
            assert health_status(host.health_port or 0) == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        host.stop(0)


@pytest.mark.parametrize("port_name", ["health_port", "port"])
def test_a_service_health_knows_nothing_of_is_not_found_on_both_ports(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], port_name: str
) -> None:
    """The plaintext port answers Check as grpcio-health-checking does on the mTLS port."""
    with pytest.raises(grpc.RpcError) as info:
        health_status(getattr(host[0], port_name), "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_stopping_a_host_ends_its_watchdog_threads() -> None:
    """The watchdogs of waits for a health call's message and of stalled response streams ran
    for the life of the process: each host stopped left both threads behind (with its guards)."""
    h = ServiceHost(listen="127.0.0.1:0", credentials=None, services=[make_service(Behaviour())])
    h.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{h.port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            responses = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(
                b"", timeout=30
            )
            assert next(responses) == b"first"
            with pytest.raises(grpc.RpcError):
                next(responses)
    finally:
        h.stop(0)
    watchdogs = [h.unary._watchdog, h.streams._watchdog]
    for thread in watchdogs:
        assert thread is not None  # both ran
        thread.join(30)
    assert not any(thread.is_alive() for thread in watchdogs if thread is not None)


def test_a_host_stopped_before_it_started_releases_its_ports_and_threads() -> None:
    """A host built and then stopped before it started (a SIGTERM while its service started)
    kept both its ports bound for the life of the process: gRPC stops a server never started
    without shutting it down. Its ports and its health port's thread are released now, and a
    start after the stop starts nothing."""
    h = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(Behaviour())],
        health_listen="127.0.0.1:0",
    )
    assert h.health_port is not None
    assert not listenable(h.port) and not listenable(h.health_port)
    h.stop()
    assert listenable(h.port) and listenable(h.health_port)
    assert h._health_server is not None and not h._health_server._thread.is_alive()
    h.start()
    assert listenable(h.port)


def test_a_stop_that_comes_while_the_host_starts_stops_what_the_start_started() -> None:
    """A stop that came between start()'s look at whether the host was stopped and gRPC's start
    found nothing started to stop, returned, and the server then started and served on (a
    library user saw it running after stop() had returned). The stop now waits for the start
    under way, then stops the server it started."""
    h = ServiceHost(listen="127.0.0.1:0", credentials=None, services=[make_service(Behaviour())])
    start = h._server.start
    stopper = threading.Thread(target=h.stop, args=(0,), name="stopper")

    def stopped_meanwhile() -> None:
        if threading.current_thread() is stopper:  # a stop's own start, to free the port
            start()
            return
        stopper.start()
        # Long enough for a stop that does not wait for the start to have returned (it did,
        # in milliseconds); one that waits (as it must) waits here till the join gives up.
        stopper.join(0.5)
        start()

    h._server.start = stopped_meanwhile  # type: ignore[method-assign]
    h.start()
    stopper.join(30)
    assert not stopper.is_alive()
    assert listenable(h.port)  # was: still bound, the server serving


def test_a_call_waiting_on_a_host_stopped_before_it_started_is_refused_not_served() -> None:
    """A host stopped before it started starts its server to free its port, and a call already
    waiting on that port (a client's connection in the listen queue, a ``wait_for_ready`` call
    of a peer that retries) was then served by a service told to stop: its behaviour ran with
    everything the service had opened still open (the key broker's HSM and audit log; the
    build's cleanup stops the host first), and was answered when the stop's thread came late.
    It is refused UNAVAILABLE now, before any of the service's code runs. The stop of the
    server is held here until the call is answered, as a stop's thread descheduled on a busy
    host would be (without the hold it was served about once in 30 stops)."""
    behaviour = Behaviour()
    behaviour.release.set()  # "slow" marks that the behaviour ran, then answers at once
    h = ServiceHost(listen="127.0.0.1:0", credentials=None, services=[make_service(behaviour)])
    with grpc.insecure_channel(f"127.0.0.1:{h.port}") as channel:
        waiting: Any = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity).future(
            b"slow", timeout=30, wait_for_ready=True
        )
        stop = h._server.stop

        def late_stop(grace: float | None) -> threading.Event:
            with contextlib.suppress(grpc.FutureTimeoutError):
                waiting.exception(timeout=30)  # answered: served, or refused
            return stop(grace)

        h._server.stop = late_stop  # type: ignore[method-assign,assignment]
        h.stop()
        assert not behaviour.started.is_set()  # was: it ran, and answered b"ok:slow"
        assert _reason(waiting) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
    assert listenable(h.port)


def test_a_host_whose_health_port_is_taken_releases_its_service_port() -> None:
    """A host whose health port another process holds is refused LISTEN_ADDRESS_IN_USE, but its
    service port, bound first, stayed bound for the life of the process: building it again
    once the health port was free was refused that port, said to be held by another
    process. It is released with the refusal now."""
    port = free_port()  # below the ephemeral range: no connection's source port meanwhile
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(errors.Unavailable) as refused:
            ServiceHost(
                listen=f"127.0.0.1:{port}",
                credentials=None,
                services=[make_service(Behaviour())],
                health_listen=f"127.0.0.1:{taken.getsockname()[1]}",
            )
    assert refused.value.reason == "LISTEN_ADDRESS_IN_USE"
    assert listenable(port)  # was: bound by the refused host's server
    h = ServiceHost(
        listen=f"127.0.0.1:{port}",
        credentials=None,
        services=[make_service(Behaviour())],
        health_listen="127.0.0.1:0",
    )
    h.stop()


def test_a_host_whose_start_failed_after_its_server_started_still_stops_it() -> None:
    """A start that failed once gRPC's server had started (the health port's start raising, a
    KeyboardInterrupt in a library's start) left the host marked as never started, and its stop
    then started the server again to free its port: gRPC refused ("Cannot start
    already-started server!"), and the stop raised with the server still serving. The stop
    stops it now."""
    h = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(Behaviour())],
        health_listen="127.0.0.1:0",
    )
    assert h._health_server is not None

    def fails() -> None:
        raise RuntimeError("the health port did not start")

    h._health_server.start = fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="health port"):
        h.start()
    h.stop(0)  # was: ValueError, the server serving on
    assert listenable(h.port)
    assert h.health_port is not None and listenable(h.health_port)


def test_the_plaintext_health_port_logs_refused_calls_within_a_budget(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who reaches the plaintext port chose how many lines the service wrote (a Check for
    a name never set: one line each), on the event loop's one thread. At most
    LOG_LINES_PER_SECOND are written a second now, and the rest are counted in one WARNING."""
    caplog.set_level(logging.INFO)
    calls = 10 * LOG_LINES_PER_SECOND
    with grpc.insecure_channel(f"127.0.0.1:{host[0].health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        pending = [
            check.future(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
            for _ in range(calls)
        ]
        for future in pending:
            assert future.exception().code() == grpc.StatusCode.NOT_FOUND

    def said() -> tuple[int, int]:
        logged = [r for r in caplog.records if r.getMessage() == "rpc failed"]
        counted = [r for r in caplog.records if r.getMessage() == "refused health calls not logged"]
        return len(logged), sum(getattr(r, "lines", 0) for r in counted)

    assert wait_for(lambda: sum(said()) == calls, timeout=30), said()
    assert said()[0] < calls


def test_the_plaintext_port_cannot_hold_every_watch_of_the_mtls_port(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ports' Watch streams shared one bound: anyone who reached the plaintext port (no
    certificate) held it all, and every certified caller's Watch was told the status and ended.
    The plaintext port's watchers hold half of it at most now."""
    monkeypatch.setattr(health_module, "MAX_WATCHERS", 4)
    h, _, channel = host
    serving = health_pb2.HealthCheckResponse.SERVING
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(f"127.0.0.1:{h.health_port}") as plaintext:
        stub = health_pb2_grpc.HealthStub(plaintext)
        kept = []
        for _ in range(4):  # every watcher the plaintext port may hold, and then some
            watch = stub.Watch(request, timeout=30)
            assert next(watch).status == serving
            kept.append(watch)
        assert wait_for(lambda: h._health._watching == 2)
        assert [r.status for r in kept[2]] == []  # told once (above), then ended
        watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=30)
        assert next(watch).status == serving
        assert wait_for(lambda: h._health._watching == 3)  # kept open
        for call in [*kept, watch]:
            call.cancel()
        assert wait_for(lambda: not h._health._watchers)


def test_calls_waiting_on_the_plaintext_port_are_bounded_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each call waiting for its message on the plaintext port (no certificate needed) held
    ~25 KiB, and nothing bounded how many waited: calls opened faster than the wait bound ends
    them grew the process until it ran out of memory. Past MAX_WAITING_CALLS, the call that has
    waited longest is ended (RESOURCE_EXHAUSTED TOO_MANY_WAITING_CALLS), and probes answer."""
    monkeypatch.setattr(health_port_module, "MAX_WAITING_CALLS", 3)
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(Behaviour())],
        health_listen="127.0.0.1:0",
        config=ServerConfig(health_request_wait_seconds=60),  # only making room ends a wait
    )
    host.start()
    port = host._health_server
    assert port is not None and host.health_port is not None
    gate = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.health_port}") as channel:
            stalled = []
            for n, method in enumerate(("Check", "Watch", "Check", "Watch", "Check")):
                stalled.append(_stall(channel, method, gate))
                assert wait_for(lambda: port.waiting() == min(n + 1, 3), timeout=30)  # noqa: B023
                if n >= 3:  # the oldest still waiting made room
                    assert _reason(stalled[n - 3]) == (
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "TOO_MANY_WAITING_CALLS",
                    )
            for _ in range(3):  # each probe makes room too, and is answered
                assert health_status(host.health_port) == health_pb2.HealthCheckResponse.SERVING
            assert port.waiting() <= 3
            gate.set()
    finally:
        gate.set()
        host.stop(0)


def test_a_stream_watchdog_that_could_not_start_is_started_by_the_next_send(
    host: tuple[ServiceHost, Behaviour, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog of stalled response streams is started by the first send; when no thread
    could be had, the never-started thread was kept: no stalled download was ever cancelled
    again (and stopping the host failed joining it). The next send starts it now."""
    h, _, channel = host
    real = threading.Thread

    class NoWatchdog(real):  # type: ignore[misc,valid-type]
        def start(self) -> None:
            if self.name == "stream-watchdog":
                raise RuntimeError("can't start new thread")
            super().start()

    stream = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)
    monkeypatch.setattr(threading, "Thread", NoWatchdog)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(b"", timeout=30))
    monkeypatch.setattr(threading, "Thread", real)
    assert info.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    responses = stream(b"", timeout=30)
    assert next(responses) == b"first"
    watchdog = h.streams._watchdog
    assert watchdog is not None and watchdog.is_alive()


def _service_log(monkeypatch: pytest.MonkeyPatch) -> tuple[logging.Handler, io.StringIO]:
    """The service's JSON log configured as a service configures it, into a buffer, with its
    refusal budget on a clock that never moves (no refill: the counts are exact)."""
    return buffered_service_log(monkeypatch)


def test_refused_calls_on_the_service_port_log_within_a_budget_per_caller_and_for_everyone(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """Every refused call on the service's port wrote its lines, however many a caller sent
    (any certificate of the CA may call, a role-less one included). Now each caller and reason
    has REFUSED_CALLS_BURST calls logged, everyone together REFUSED_CALLS_PER_SECOND (many
    connections or identities buy no more), and the rest are counted in one summary, by caller
    and reason, when the log closes (or every SUMMARY_SECONDS)."""
    handler, stream = _service_log(monkeypatch)
    flood = 3 * REFUSED_CALLS_BURST
    others = 30
    for _ in range(flood):
        with pytest.raises(grpc.RpcError):
            call(host[2], b"invalid")
    # Each on a connection of its own: another caller (keyed by its address without a
    # certificate, by its SPIFFE ID with one).
    for _ in range(others):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with (
            grpc.insecure_channel(f"127.0.0.1:{host[0].port}", options=options) as channel,
            pytest.raises(grpc.RpcError),
        ):
            call(channel, b"invalid")
    logging.getLogger("strongroom.test").warning("other lines are not budgeted")
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    logged = [r for r in lines if r["msg"] == "rpc failed"]
    summaries = [r for r in lines if r["msg"] == "refused calls not logged"]
    assert len(logged) == REFUSED_CALLS_PER_SECOND
    assert sum(s["calls"] for s in summaries) == flood + others - REFUSED_CALLS_PER_SECOND
    (_, reason), calls = refused_calls_not_logged(lines).most_common(1)[0]
    assert (reason, calls) == ("NAME_EMPTY", flood - REFUSED_CALLS_BURST)  # the flooding caller's
    assert any(r["msg"] == "other lines are not budgeted" for r in lines)


def _full_pipe() -> tuple[int, Any]:
    """A pipe whose buffer is full and that nobody reads (a log collector that stopped): its read
    end, and its write end as a text stream, on which every write blocks."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for size in (65536, 4096, 256, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_end, b"x" * size)
    os.set_blocking(write_end, True)
    return read_end, open(write_end, "w", buffering=1)


def _stalled_service_log(
    monkeypatch: pytest.MonkeyPatch, clock: Callable[[], float] = lambda: 0.0
) -> tuple[log_writer.ServiceLog, Callable[[], list[dict[str, Any]]]]:
    """The service's JSON log configured as a service configures it, on stderr to a pipe nobody
    reads yet; and what the collector, once back, reads of it when the log has closed."""
    read_end, stream = _full_pipe()
    monkeypatch.setattr("sys.stderr", stream)
    handler = configure_logging(LoggingConfig(format="json"), "test", clock=clock)

    def collect() -> list[dict[str, Any]]:
        written: list[bytes] = []
        reader = threading.Thread(
            target=lambda: written.extend(iter(lambda: os.read(read_end, 1 << 20), b""))
        )
        reader.start()
        handler.close()
        stream.close()
        reader.join(30)
        os.close(read_end)
        text = b"".join(written).decode().lstrip("x")  # what filled the pipe
        return [json.loads(line) for line in text.splitlines()]

    return handler, collect


def test_a_blocked_log_destination_holds_no_request_worker(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """stderr to a pipe nobody reads: the handler wrote each line on the thread that logged it,
    so a refused call's "rpc failed" blocked its worker, and every call that logged after it
    queued on the handler's lock. Lines now go through a bounded queue that one thread writes:
    calls are answered, lines past the queue are dropped and counted, and the count is written
    once the destination takes lines again; nothing queued is lost at close."""
    monkeypatch.setattr(log_writer, "LOG_QUEUE_LINES", 8)
    _, collect = _stalled_service_log(monkeypatch)
    try:
        for _ in range(3):  # logged: within the refusal budget
            with pytest.raises(grpc.RpcError) as refused:
                call(host[2], b"invalid", timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert call(host[2], b"legit", timeout=30) == b"ok:legit"
        emitted = 50
        for n in range(emitted):
            logging.getLogger("strongroom.test").warning("line %d", n)
    finally:
        lines = collect()  # the collector is back
    dropped = [r for r in lines if r["msg"] == "log lines dropped"]
    kept = [r for r in lines if r["msg"] != "log lines dropped"]
    assert [r["msg"] for r in kept].count("rpc failed") + len(
        [r for r in kept if r["msg"].startswith("line ")]
    ) + sum(r["lines"] for r in dropped) == 3 + emitted
    assert dropped  # the queue's bound was reached, and said


def _spend_everyones_refusal_budget(host: ServiceHost) -> None:
    """Refused calls from as many callers (a connection each) as it takes to spend every caller's
    refusal lines together (on :func:`_service_log`'s clock, that never refills)."""
    for _ in range(REFUSED_CALLS_PER_SECOND // REFUSED_CALLS_BURST):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{host.port}", options=options) as channel:
            for _ in range(REFUSED_CALLS_BURST):
                with pytest.raises(grpc.RpcError):
                    call(channel, b"invalid")


def test_a_service_failure_is_logged_whatever_refused_calls_spent(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """Every "rpc failed" was a refusal line, within the budget of refusals: callers who spent
    everyone's (a few certificates) left the service's own failures unsaid, a blob that failed
    its integrity check (DATA_LOSS), an outage, a bug. Only what a caller is refused for is
    budgeted now; the service's failures are written every time."""
    handler, stream = _service_log(monkeypatch)
    _spend_everyones_refusal_budget(host[0])
    with pytest.raises(grpc.RpcError) as failed:
        list(host[2].unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(b"x", timeout=10))
    assert failed.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError):
        call(host[2], b"invalid")  # a refusal past the budget is still not written
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failures = [(r["reason"], r["status"]) for r in lines if r["msg"] == "rpc failed"]
    assert failures.count(("DIGEST_MISMATCH", "DATA_LOSS")) == 1
    assert failures.count(("NAME_EMPTY", "INVALID_ARGUMENT")) == REFUSED_CALLS_PER_SECOND


def test_the_log_queue_is_bounded_in_bytes_too(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """The queue of lines waiting for a stalled destination was bounded by their number only,
    though callers choose much of a line (a method name of up to 16 KiB, carried by each of a
    denied call's lines): 4,096 lines of tens of KiB. It holds LOG_QUEUE_BYTES at most now."""
    _, collect = _stalled_service_log(monkeypatch)
    big = "m" * (64 << 10)
    logged = 2 * log_writer.LOG_QUEUE_BYTES // len(big)  # well within LOG_QUEUE_LINES
    for n in range(logged):
        logging.getLogger("strongroom.test").warning("line %d %s", n, big)
    lines = collect()
    kept = [r for r in lines if r["msg"].startswith("line ")]
    dropped = sum(r["lines"] for r in lines if r["msg"] == "log lines dropped")
    assert len(kept) + dropped == logged
    assert sum(len(r["msg"]) for r in kept) <= log_writer.LOG_QUEUE_BYTES
    assert [int(r["msg"].split()[1]) for r in kept] == list(range(len(kept)))  # the first ones


def test_refusal_lines_leave_room_in_the_log_queue_for_other_lines(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """Lines past the queue's bound are dropped, whatever they say: while the destination was
    slow, refusals within their budget (many callers, reasons, minutes) filled the queue, and an
    operator's change or a service's failure logged then was dropped. Refusal lines take at most
    half of the queue now."""
    monkeypatch.setattr(log_writer, "LOG_QUEUE_LINES", 8)
    ticks = itertools.count(0.0, 3600.0)  # every refusal within its budget
    _, collect = _stalled_service_log(monkeypatch, clock=lambda: next(ticks))
    refusals = logging.getLogger("strongroom.test.refusals")
    for n in range(20):
        refusals.warning("refused %d", n, extra={"reason": "NAME_EMPTY", errors.REFUSAL_LINE: True})
    logging.getLogger("strongroom.test").warning("key deactivated by the operator")
    lines = collect()
    msgs = [r["msg"] for r in lines]
    assert "key deactivated by the operator" in msgs
    assert [m for m in msgs if m.startswith("refused ")] == [f"refused {n}" for n in range(4)]
    assert sum(r["lines"] for r in lines if r["msg"] == "log lines dropped") == 16


def test_a_caller_spreading_refusals_over_reasons_keeps_within_a_budget_of_its_own(
    host: tuple[ServiceHost, Behaviour, grpc.Channel],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """Each reason of a caller had a budget of its own, and only everyone's capped them: one
    caller refused for four reasons spent everyone's at once (for twenty, for good), and the
    next caller's first refusal went unwritten. A caller's reasons together now have
    REASONS_PER_CALLER reasons' budgets."""
    handler, stream = _service_log(monkeypatch)
    reasons = REFUSED_CALLS_PER_SECOND // REFUSED_CALLS_BURST
    for n in range(reasons):
        for _ in range(REFUSED_CALLS_BURST):
            with pytest.raises(grpc.RpcError):
                call(host[2], f"refuse:REASON_{n}".encode())
    options = [("grpc.use_local_subchannel_pool", 1)]
    with (
        grpc.insecure_channel(f"127.0.0.1:{host[0].port}", options=options) as other,
        pytest.raises(grpc.RpcError),
    ):
        call(other, b"invalid")
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failures = [r["reason"] for r in lines if r["msg"] == "rpc failed"]
    assert failures.count("NAME_EMPTY") == 1  # the other caller's
    assert len(failures) == REASONS_PER_CALLER * REFUSED_CALLS_BURST + 1
