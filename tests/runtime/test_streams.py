"""Streams cannot take the host's worker threads: non-blocking handlers stay non-blocking through
every interceptor, streams are limited per caller and in total, idle request streams end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from strongroom.pki.authz import SpiffeAuthorizer
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.config import ConfigError, ServerConfig
from strongroom.runtime.server import HEALTH_SERVICE, ServiceHost, ServiceSpec
from strongroom.runtime.tracing import server_tracing_interceptor

SERVICE = "test.Streams"


def _identity(b: bytes) -> bytes:
    return b


class Gate:
    """Holds server-streaming and uploading calls until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.uploads_done = 0


def make_service(gate: Gate) -> ServiceSpec:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"ok"

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        gate.release.wait(30)

    def flood(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        chunk = b"x" * (1 << 20)
        for _ in range(4096):  # 4 GiB at most: far more than any flow-control window
            yield chunk

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = sum(len(r) for r in requests)
        gate.uploads_done += 1
        return str(total).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
            "Download": grpc.unary_stream_rpc_method_handler(download, _identity, _identity),
            "Upload": grpc.stream_unary_rpc_method_handler(upload, _identity, _identity),
            "Flood": grpc.unary_stream_rpc_method_handler(flood, _identity, _identity),
        },
    )
    return ServiceSpec(SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))


def start(
    config: ServerConfig, *, full_chain: bool = True
) -> tuple[ServiceHost, Gate, grpc.Channel]:
    """A host with the production interceptor chain (tracing, SPIFFE authoriser, stream guard,
    metrics, error mapping). Over plaintext the authoriser admits only public methods."""
    gate = Gate()
    interceptors = []
    if full_chain:
        interceptors = [
            server_tracing_interceptor(TracerProvider()),
            SpiffeAuthorizer("example.org", {}, public=(HEALTH_SERVICE, SERVICE)),
        ]
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[make_service(gate)],
        interceptors=interceptors,
        config=config,
    )
    host.start()
    return host, gate, grpc.insecure_channel(f"127.0.0.1:{host.port}")


@pytest.fixture
def small() -> Iterator[tuple[ServiceHost, Gate, grpc.Channel]]:
    """Four worker threads; stream limits high enough not to matter unless a test sets them."""
    host, gate, channel = start(
        ServerConfig(max_workers=4, max_streams_per_identity=1000, stream_idle_timeout_seconds=1)
    )
    yield host, gate, channel
    gate.release.set()
    channel.close()
    host.stop(0)


def unary(channel: grpc.Channel, timeout: float = 10) -> bytes:
    result: bytes = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)(
        b"", timeout=timeout
    )
    return result


def reason_of(error: grpc.RpcError) -> str | None:
    metadata: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    return dict(metadata).get(REASON_TRAILER)


def test_watch_streams_hold_no_worker_thread(
    small: tuple[ServiceHost, Gate, grpc.Channel],
) -> None:
    """32 Watch streams on a 4-thread host, through tracing and the authoriser: unary calls
    still answer (before the fix, each Watch held a thread and every other call timed out)."""
    _host, _gate, channel = small
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(32)]
    try:
        for watch in watches[:4]:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert [unary(channel, timeout=5) for _ in range(10)] == [b"ok"] * 10
        assert all(not w.done() for w in watches)
    finally:
        for watch in watches:
            watch.cancel()


def test_streams_beyond_the_per_identity_limit_are_refused() -> None:
    host, gate, channel = start(ServerConfig(max_workers=8, max_streams_per_identity=3))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(3)]
        for watch in watches:
            next(watch)
        refused = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            next(refused)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert reason_of(info.value) == "TOO_MANY_STREAMS_PER_IDENTITY"
        # A closed stream frees its slot.
        watches[0].cancel()
        deadline = time.monotonic() + 10
        while host.streams.open_streams(next(iter(host.streams._per_identity))) > 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        again = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        again.cancel()
        for watch in watches[1:]:
            watch.cancel()
    finally:
        gate.release.set()
        channel.close()
        host.stop(0)


def test_blocking_streams_leave_threads_for_unary_calls() -> None:
    """With 4 workers at most 2 blocking streams run; the third is refused and unary calls
    still answer while the two hold their threads."""
    host, gate, channel = start(ServerConfig(max_workers=4, max_streams_per_identity=100))
    download = channel.unary_stream(f"/{SERVICE}/Download", _identity, _identity)
    try:
        held = [download(b"", timeout=30) for _ in range(2)]
        for call in held:
            assert next(call) == b"first"
        with pytest.raises(grpc.RpcError) as info:
            next(download(b"", timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert reason_of(info.value) == "TOO_MANY_STREAMS"
        assert unary(channel, timeout=5) == b"ok"
    finally:
        gate.release.set()
        channel.close()
        host.stop(0)


def test_an_idle_upload_ends_with_a_reason_and_frees_its_thread(
    small: tuple[ServiceHost, Gate, grpc.Channel],
) -> None:
    host, gate, channel = small
    stop = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield b"abc"
        stop.wait(30)

    upload = channel.stream_unary(f"/{SERVICE}/Upload", _identity, _identity)
    try:
        with pytest.raises(grpc.RpcError) as info:
            upload(stalled(), timeout=20)
    finally:
        stop.set()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert reason_of(info.value) == "STREAM_IDLE_TIMEOUT"
    assert gate.uploads_done == 0
    assert host.streams.open_streams() == 0
    # An upload that keeps sending is not cut, however long it lasts in total.
    assert upload(iter([b"a"] * 5), timeout=20) == b"5"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_workers": 8, "max_blocking_streams": 8}, "below server.max_workers"),
        ({"max_streams_per_identity": 0}, "max_streams_per_identity"),
        ({"stream_idle_timeout_seconds": 0}, "stream_idle_timeout_seconds"),
    ],
)
def test_contradicting_stream_limits_are_refused(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**settings)  # type: ignore[arg-type]


def test_a_download_whose_client_stops_reading_is_cancelled_and_frees_its_thread(
    small: tuple[ServiceHost, Gate, grpc.Channel],
) -> None:
    host, _gate, channel = small
    flood = channel.unary_stream(f"/{SERVICE}/Flood", _identity, _identity)
    call = flood(b"", timeout=60)
    assert len(next(call)) == 1 << 20  # then the client stops reading
    deadline = time.monotonic() + 30
    while host.streams.open_streams() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.streams.open_streams() == 0
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:  # what was in flight, then the status
            pass
    assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    assert unary(channel) == b"ok"


def test_watchers_leaving_while_the_status_flaps_do_not_deadlock_the_server() -> None:
    """grpc_health's servicer sends to watchers under its lock while the watchers' close
    callbacks wait for that lock on gRPC's completion thread (grpc/grpc#43403): a server whose
    readiness changes while Watch callers come and go stopped answering altogether."""
    flapping: dict[str, str | None] = {"reason": None}
    gate = Gate()
    spec = make_service(gate)
    spec.checks = (lambda: flapping["reason"],)
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[spec],
        config=ServerConfig(max_workers=8, max_streams_per_identity=1000),
        check_interval=0.001,
    )
    host.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{host.port}")
    stop = threading.Event()

    def flap() -> None:
        while not stop.is_set():
            flapping["reason"] = None if flapping["reason"] else "flapping"
            time.sleep(0.0005)

    flipper = threading.Thread(target=flap, daemon=True)
    flipper.start()
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(30):
            watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(20)]
            for watch in watches:
                next(watch)
            for watch in watches:
                watch.cancel()
        assert unary(channel, timeout=10) == b"ok"
        stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    finally:
        stop.set()
        flipper.join(5)
        channel.close()
        host.stop(0)
