"""A GetModel its caller gives up on is logged once, saying how, as the other services do."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import StructureValidator
from strongroom.modelstore.service import SERVICE_NAME, ModelStoreServicer
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from tests.conftest import buffered_service_log, refused_calls_not_logged
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.conftest import Served, serve

# Far more than gRPC's flow-control windows hold: the stream is still being sent when the
# caller gives up.
_SIZE = 16 * 1024 * 1024
_STOPPED = "download stopped"


class _Lines(logging.Handler):
    """The store's ``download stopped`` lines, as they come (from gRPC's threads)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(_STOPPED):
            self.records.append(record)
            self.arrived.set()


@pytest.fixture
def stopped_lines() -> Iterator[_Lines]:
    logger = logging.getLogger("strongroom.modelstore.service")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _stored(served: Served) -> None:
    artifact = make_artifact("acme/big", "1", bytes(range(256)) * (_SIZE // 256))
    served.storage.put(chunked(artifact, 1 << 20), StructureValidator())


def _windowed(port: int) -> grpc.Channel:
    """A channel whose flow-control window stays at 64 KiB. With BDP probing, a client's
    transport took ~4 MiB it did not read (more on a loaded machine): a store that handed it the
    whole artifact had ended its stream before the caller gave up, and logged no stop."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)])


def _give_up(channel: grpc.Channel, how: str) -> None:
    """Starts a download, takes its first message and gives up on it ``how``."""
    stub = pb_grpc.ModelStoreServiceStub(channel)
    deadline = 60.0 if how == "CANCELLED" else 2.0
    started = time.monotonic()
    call = stub.GetModel(pb.GetModelRequest(name="acme/big", version="1"), timeout=deadline)
    first = next(call)
    assert first.model.name == "acme/big"
    if how == "CANCELLED":
        call.cancel()
        return
    # Read nothing more: gRPC's send waits on flow control until the deadline ends the call.
    time.sleep(max(0.0, started + deadline + 0.5 - time.monotonic()))
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def _one_line(stopped_lines: _Lines, how: str) -> None:
    assert stopped_lines.arrived.wait(30)
    time.sleep(0.2)  # a second line, if any, would come from the same close
    (line,) = stopped_lines.records
    assert line.levelno == logging.INFO
    fields = line.__dict__
    assert (fields["model"], fields["version"], fields["gave_up"]) == ("acme/big", "1", how)
    assert fields["reason"] == how
    assert 0 < fields["bytes_sent"] < _SIZE
    assert fields["bytes_sent"] % (64 * 1024) == 0  # whole messages handed to gRPC
    assert str(fields["peer"]).startswith(("ipv4:", "ipv6:"))


@pytest.mark.parametrize("how", ["CANCELLED", "DEADLINE_EXCEEDED"])
def test_an_abandoned_download_is_logged_once_with_what_was_sent(
    fs_storage: FilesystemStorage, stopped_lines: _Lines, how: str
) -> None:
    """A GetModel whose caller cancelled it, or whose deadline passed, half way through its
    artifact logged nothing, anywhere: a loader giving up on a slow store, or a client walking
    away from downloads, left no trace. It is one INFO line now, with the model, version, the
    bytes handed to gRPC, the peer and how the caller gave up (the runtime's one rule)."""
    host, channel = serve(fs_storage, download_chunk=64 * 1024)
    slow = _windowed(host.port)
    try:
        _stored(Served(fs_storage, pb_grpc.ModelStoreServiceStub(channel), channel))
        _give_up(slow, how)
        _one_line(stopped_lines, how)
    finally:
        slow.close()
        channel.close()
        host.stop(0)


def _serving(
    get_model: Callable[[pb.GetModelRequest, grpc.ServicerContext], Iterator[bytes]],
) -> tuple[grpc.Server, int]:
    """A bare gRPC server (no runtime host around it) whose only method is ``get_model``, a
    stand-in for the servicer's own GetModel; started, with its port."""
    handler = grpc.unary_stream_rpc_method_handler(
        get_model,
        request_deserializer=pb.GetModelRequest.FromString,
        response_serializer=lambda message: message,
    )
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"GetModel": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize("how", ["CANCELLED", "DEADLINE_EXCEEDED"])
def test_a_download_whose_generator_outlives_its_call_is_logged_when_the_call_ends(
    fs_storage: FilesystemStorage, stopped_lines: _Lines, how: str
) -> None:
    """The line was written when the stream's generator was closed, which gRPC never does: a
    collection closes it once nothing refers to it, so a generator still referred to (a
    reference cycle through it, a traceback kept) logged nothing. It is written when the call
    ends, however long its generator lives after."""
    servicer = ModelStoreServicer(fs_storage, download_chunk=64 * 1024)
    kept: list[Iterator[bytes]] = []

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        responses = servicer.GetModel(request, context)
        kept.append(responses)
        return responses

    server, port = _serving(get_model)
    slow = _windowed(port)
    try:
        _stored(Served(fs_storage, None, None))  # type: ignore[arg-type]  # its storage only
        _give_up(slow, how)
        _one_line(stopped_lines, how)
        assert len(kept) == 1  # still referred to: never closed
    finally:
        slow.close()
        server.stop(0)


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("STREAM_IDLE_TIMEOUT", grpc.StatusCode.CANCELLED),
        ("STREAM_TOO_SLOW", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_a_download_the_stores_watchdog_ended_says_the_server_ended_it(
    fs_storage: FilesystemStorage, stopped_lines: _Lines, reason: str, status: grpc.StatusCode
) -> None:
    """A download whose client stopped reading was cancelled by the store's own watchdog, and the
    line said ``gave_up CANCELLED``, ``its call was cancelled``, as if the caller had given up;
    one read below the minimum rate, ended by the store, said nothing. Each is one line now
    saying the server ended it, with the watchdog's reason and no ``gave_up``."""
    # Each watchdog alone, so that the other cannot end the stream first: the idle one without
    # the floor (a client slow to start would fall below it); the floor over windows too long
    # for a stall of the paced client to pass for idle.
    idle = reason == "STREAM_IDLE_TIMEOUT"
    config = ServerConfig(
        stream_idle_timeout_seconds=1 if idle else 3,
        stream_min_bytes_per_second=0 if idle else 1 << 20,
    )
    host, channel = serve(fs_storage, config=config, download_chunk=64 * 1024)
    # The client's flow-control window stays at 64 KiB (no BDP probing), so the store sees each
    # message as the client takes it.
    slow = grpc.insecure_channel(f"127.0.0.1:{host.port}", options=[("grpc.http2.bdp_probe", 0)])
    try:
        _stored(Served(fs_storage, pb_grpc.ModelStoreServiceStub(channel), channel))
        call = pb_grpc.ModelStoreServiceStub(slow).GetModel(
            pb.GetModelRequest(name="acme/big", version="1"), timeout=60
        )
        next(call)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                if idle:
                    stopped_lines.arrived.wait(30)  # it stops reading, then takes what came
                else:
                    time.sleep(0.2)  # 64 KiB every 0.2 s: 320 KiB/s, below the 1 MiB/s floor
        assert info.value.code() == status  # type: ignore[attr-defined]
        assert stopped_lines.arrived.wait(30)
        time.sleep(0.2)  # a second line, if any, would come from the same close
    finally:
        slow.close()
        channel.close()
        host.stop(0)
    (line,) = stopped_lines.records
    assert line.getMessage() == f"download stopped: the server ended it ({reason})"
    fields = line.__dict__
    assert (fields["model"], fields["version"], fields["reason"]) == ("acme/big", "1", reason)
    assert fields["ended_by"] == "server"
    assert "gave_up" not in fields
    assert 0 < fields["bytes_sent"] < _SIZE


def test_a_whole_download_logs_no_stop(fs_served: Served, stopped_lines: _Lines) -> None:
    _stored(fs_served)
    request = pb.GetModelRequest(name="acme/big", version="1")
    received = sum(len(r.data) for r in fs_served.stub.GetModel(request, timeout=60))
    assert received > _SIZE
    fs_served.channel.close()
    time.sleep(0.5)
    assert stopped_lines.records == []


def test_a_flood_of_abandoned_downloads_is_logged_within_the_callers_budget(
    fs_served: Served,
    stopped_lines: _Lines,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """A caller walking away from download after download chooses how many ``download
    stopped`` lines the store writes: the service's log writes them within that caller's budget
    of refusal lines (REFUSED_CALLS_BURST at once), and counts the rest in its summary."""
    handler, stream = buffered_service_log(monkeypatch, "modelstore")
    _stored(fs_served)
    request = pb.GetModelRequest(name="acme/big", version="1")
    sent = 2 * REFUSED_CALLS_BURST
    for _ in range(sent):
        call = fs_served.stub.GetModel(request, timeout=60)
        next(call)
        call.cancel()
    deadline = time.monotonic() + 30
    while len(stopped_lines.records) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stopped_lines.records) == sent  # each one said, before the budget
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    written = [r for r in lines if r["msg"].startswith(_STOPPED)]
    assert len(written) == REFUSED_CALLS_BURST
    assert [r["reason"] for r in written] == ["CANCELLED"] * REFUSED_CALLS_BURST
    # The summary says what the lines not written were (it said reason "", as no other
    # refusal line does).
    counted = refused_calls_not_logged(lines)
    assert {reason for _, reason in counted} == {"CANCELLED"}
    assert counted.total() == sent - REFUSED_CALLS_BURST


def test_a_download_whose_call_ended_before_its_handler_ran_is_logged_once(
    fs_storage: FilesystemStorage, stopped_lines: _Lines
) -> None:
    """A GetModel whose call had ended (its callbacks run) before the handler got to it: the
    line is written at once, when the handler asks for the call's end, with nothing sent; the
    stream's first message, which gRPC then drops, writes no second one. Passes on the code
    under review: recorded as checked."""
    servicer = ModelStoreServicer(fs_storage, download_chunk=64 * 1024)
    started, cancelled, ended = threading.Event(), threading.Event(), threading.Event()

    def get_model(request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        assert context.add_callback(ended.set)
        started.set()
        assert cancelled.wait(30) and ended.wait(30)  # the call's callbacks have run
        yield from servicer.GetModel(request, context)

    server, port = _serving(get_model)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        _stored(Served(fs_storage, None, None))  # type: ignore[arg-type]  # its storage only
        stub = pb_grpc.ModelStoreServiceStub(channel)
        call = stub.GetModel(pb.GetModelRequest(name="acme/big", version="1"), timeout=60)
        assert started.wait(30)  # the server has the call
        call.cancel()
        cancelled.set()
        assert stopped_lines.arrived.wait(30)
        time.sleep(0.2)  # a second line, if any, would come from the same handler at once
    finally:
        channel.close()
        server.stop(0)
    (line,) = stopped_lines.records
    assert line.__dict__["gave_up"] == "CANCELLED"
    assert line.__dict__["bytes_sent"] == 0


def test_a_whole_download_of_an_empty_range_logs_no_stop(
    fs_served: Served, stopped_lines: _Lines
) -> None:
    """A range at the artifact's end is one message (the model, no data): answered, it writes
    no line. Passes on the code under review: recorded as checked."""
    _stored(fs_served)
    size = fs_served.stub.StatModel(
        pb.StatModelRequest(name="acme/big", version="1"), timeout=60
    ).model.artifact_size
    request = pb.GetModelRequest(name="acme/big", version="1", offset=size)
    (only,) = list(fs_served.stub.GetModel(request, timeout=60))
    assert only.model.name == "acme/big" and only.data == b""
    fs_served.channel.close()
    time.sleep(0.5)
    assert stopped_lines.records == []
