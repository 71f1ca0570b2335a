"""Streams cannot take the host's worker threads: non-blocking handlers stay non-blocking through
every interceptor, streams are limited per caller and in total, idle request streams end, and
blocking streams that trickle below the minimum transfer rate end too."""

from __future__ import annotations

import json
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
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from strongroom.runtime.server import HEALTH_SERVICE, ServiceHost, ServiceSpec
from strongroom.runtime.tracing import server_tracing_interceptor
from tests.conftest import buffered_service_log, refused_calls_not_logged

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

    def chunks(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        size, count = (int(n) for n in request.split(b","))
        chunk = b"x" * size
        for _ in range(count):
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
            "Chunks": grpc.unary_stream_rpc_method_handler(chunks, _identity, _identity),
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
    still answer (before the fix, each Watch held a thread and every other call timed out).
    Each is opened once the one before it answered: a Watch's wait for its request message
    holds a data-plane worker (health is public), and 32 opened at once would ask for more
    than this host's 3."""
    _host, _gate, channel = small
    stub = health_pb2_grpc.HealthStub(channel)
    watches = []
    try:
        for _ in range(32):
            watches.append(stub.Watch(health_pb2.HealthCheckRequest(), timeout=30))
            assert next(watches[-1]).status == health_pb2.HealthCheckResponse.SERVING
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
    still answer while the two hold their threads (one caller may hold 2 of the 3 data-plane
    workers here, so the unary call is another caller's)."""
    host, gate, channel = start(
        ServerConfig(
            max_workers=4, max_streams_per_identity=100, max_data_plane_workers_per_identity=2
        )
    )
    download = channel.unary_stream(f"/{SERVICE}/Download", _identity, _identity)
    try:
        held = [download(b"", timeout=30) for _ in range(2)]
        for call in held:
            assert next(call) == b"first"
        with pytest.raises(grpc.RpcError) as info:
            next(download(b"", timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert reason_of(info.value) == "TOO_MANY_STREAMS"
        # Another caller: a connection of its own (gRPC shares subchannels by default).
        local = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{host.port}", options=local) as other:
            assert unary(other, timeout=5) == b"ok"
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


def test_a_trickling_upload_is_ended_below_the_minimum_rate(
    small: tuple[ServiceHost, Gate, grpc.Channel],
) -> None:
    """One byte every quarter of the 1 s idle timeout never idles, yet moves far less than the
    default 64 KiB a window: the slowloris that held a blocking stream for ever."""
    host, gate, channel = small

    def trickle() -> Iterator[bytes]:
        for _ in range(24):  # 6 s in all
            yield b"x"
            time.sleep(0.25)

    upload = channel.stream_unary(f"/{SERVICE}/Upload", _identity, _identity)
    with pytest.raises(grpc.RpcError) as info:
        upload(trickle(), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert reason_of(info.value) == "STREAM_TOO_SLOW"
    assert "server.stream_min_bytes_per_second" in info.value.details()  # type: ignore[attr-defined]
    assert gate.uploads_done == 0
    assert host.streams.open_streams() == 0


def test_a_legitimate_upload_is_not_cut_by_the_minimum_rate(
    small: tuple[ServiceHost, Gate, grpc.Channel],
) -> None:
    """A client that takes most of the idle timeout before its header, pauses after it, then
    sends 16 MiB at full speed is within the floor (the wait for the first message is the idle
    timeout's alone)."""
    _host, gate, channel = small
    chunk = b"d" * (256 * 1024)

    def legitimate() -> Iterator[bytes]:
        time.sleep(0.7)
        yield b"header"
        time.sleep(0.5)
        for _ in range(64):
            yield chunk

    upload = channel.stream_unary(f"/{SERVICE}/Upload", _identity, _identity)
    assert upload(legitimate(), timeout=60) == str(6 + 64 * len(chunk)).encode()
    assert gate.uploads_done == 1


@pytest.fixture
def floored() -> Iterator[tuple[ServiceHost, grpc.Channel]]:
    """A 1 s window and a 1 MiB/s floor; the client's flow-control window stays at 64 KiB (no
    BDP probing), so the server sees each message as the client takes it."""
    host, gate, _ = start(
        ServerConfig(
            max_workers=4,
            max_streams_per_identity=1000,
            stream_idle_timeout_seconds=1,
            stream_min_bytes_per_second=1 << 20,
        )
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{host.port}", options=[("grpc.http2.bdp_probe", 0)])
    yield host, channel
    gate.release.set()
    channel.close()
    host.stop(0)


def test_a_slowly_read_download_is_ended_below_the_minimum_rate(
    floored: tuple[ServiceHost, grpc.Channel],
) -> None:
    """A client that takes a 16 KiB message every 0.1 s (160 KiB/s) never stops reading for the
    idle timeout, so the watchdog leaves it be; the floor ends it with a status."""
    host, channel = floored
    chunks = channel.unary_stream(f"/{SERVICE}/Chunks", _identity, _identity)
    call = chunks(b"16384,100000", timeout=60)
    deadline = time.monotonic() + 20
    read = 0
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            read += 1
            if host.streams.open_streams() and time.monotonic() < deadline:
                time.sleep(0.1)  # slow while the server serves it; then take what is in flight
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert reason_of(info.value) == "STREAM_TOO_SLOW"
    assert read < 100000
    assert host.streams.open_streams() == 0
    assert unary(channel) == b"ok"


def test_a_fast_download_is_not_cut_by_the_minimum_rate(
    floored: tuple[ServiceHost, grpc.Channel],
) -> None:
    host, channel = floored
    chunks = channel.unary_stream(f"/{SERVICE}/Chunks", _identity, _identity)
    for size, count in ((16384, 1024), (1 << 20, 16)):  # 16 MiB each
        received = sum(len(m) for m in chunks(f"{size},{count}".encode(), timeout=60))
        assert received == size * count
    assert host.streams.open_streams() == 0


def test_watch_streams_are_not_metered(small: tuple[ServiceHost, Gate, grpc.Channel]) -> None:
    """A health Watch sends nothing for several windows and stays open."""
    _host, _gate, channel = small
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(3)
        assert not watch.done()
    finally:
        watch.cancel()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_workers": 8, "max_blocking_streams": 8}, "below server.max_workers"),
        ({"max_streams_per_identity": 0}, "max_streams_per_identity"),
        ({"max_streams_per_certificate": 0}, "max_streams_per_certificate must be at least 1"),
        ({"max_streams_per_certificate": -3}, "max_streams_per_certificate must be at least 1"),
        ({"stream_idle_timeout_seconds": 0}, "stream_idle_timeout_seconds"),
        ({"stream_min_bytes_per_second": 1023}, "stream_min_bytes_per_second"),
        ({"stream_min_bytes_per_second": -1}, "stream_min_bytes_per_second"),
        ({"stream_min_bytes_per_second": (1 << 30) + 1}, "stream_min_bytes_per_second"),
    ],
)
def test_contradicting_stream_limits_are_refused(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**settings)  # type: ignore[arg-type]


def test_the_minimum_rate_defaults_to_64_kib_and_0_turns_it_off() -> None:
    assert ServerConfig().stream_min_bytes_per_second == 64 * 1024
    assert ServerConfig(stream_min_bytes_per_second=0).stream_min_bytes_per_second == 0
    assert ServerConfig(stream_min_bytes_per_second=1 << 30).stream_min_bytes_per_second == 1 << 30


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
        # 28 data-plane workers: each of the 20 Watches opened at once holds one while it waits
        # for its request message (health is public, so its wait is never the reserve's).
        config=ServerConfig(max_workers=32, max_streams_per_identity=1000),
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


def test_a_callers_downloads_it_stops_reading_write_its_budget_of_lines(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """The watchdog's "response stream cancelled: the client stopped reading" was no refusal
    line: a client that opened downloads and stopped reading chose how many of them the service
    wrote. They are within its caller's budget now; the rest are counted in the summary."""
    handler, stream = buffered_service_log(monkeypatch)  # a clock that never refills
    calls = REFUSED_CALLS_BURST + 3
    host, _gate, channel = start(
        ServerConfig(
            max_workers=2 * calls + 2,
            max_data_plane_workers_per_identity=calls,
            max_streams_per_identity=1000,
            stream_idle_timeout_seconds=0.5,
        )
    )
    try:
        flood = channel.unary_stream(f"/{SERVICE}/Flood", _identity, _identity)
        downloads = [flood(b"", timeout=60) for _ in range(calls)]
        for call in downloads:
            assert len(next(call)) == 1 << 20  # then the client stops reading
        deadline = time.monotonic() + 30
        while host.streams.open_streams() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.streams.open_streams() == 0
        for call in downloads:
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:  # what was in flight, then the status
                    pass
            assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    finally:
        channel.close()
        host.stop(0)
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    stopped = [r for r in lines if r["msg"].endswith("the client stopped reading")]
    assert len(stopped) == REFUSED_CALLS_BURST
    # One summary, or more when the run took longer than their period (a loaded machine).
    (((caller, reason), counted),) = refused_calls_not_logged(lines).items()
    assert caller.startswith("peer:")  # one caller: this channel's (plaintext: its address)
    assert (reason, counted) == ("STREAM_IDLE_TIMEOUT", calls - REFUSED_CALLS_BURST)
