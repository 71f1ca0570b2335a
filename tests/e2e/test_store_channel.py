"""Downloads over a store channel (:func:`store_channel`: :data:`STORE_CHANNEL_OPTIONS`, gRPC's
single-threaded response streams, each taken in to its end), against the real model store over
mTLS: the whole artifact arrives, read by the iterating thread, a load's scope cancelled from
another thread still ends the download, and every reader that leaves a download ends it."""

from __future__ import annotations

import gc
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import grpc.experimental
import pytest
from opentelemetry.sdk.trace import TracerProvider

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import InvalidArtifact
from strongroom.client.cancel import CallScope, scoped, scoped_channel
from strongroom.client.fetch import ModelFetcher, grpc_source
from strongroom.client.keyrelease import ReleasedDataKey
from strongroom.client.publish import publish_model
from strongroom.client.rewrap import MAX_HEAD_SIZE, _read_head
from strongroom.client.store_channel import STORE_CHANNEL_OPTIONS, store_channel
from strongroom.dev.devstack import DevStack
from strongroom.errors import Cancelled, FailedPrecondition
from strongroom.reasons import Reason
from strongroom.runtime.tracing import traced_channel
from tests.test_cli_peer_text import _Generous

KEY_ID = "store-channel"


@pytest.fixture(scope="module")
def published(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A model of several download messages, published; its stored artifact's bytes."""
    from strongroom.dev.devstack.model import train

    admin, publisher = stack.identity("admin"), stack.identity("publisher")
    stack.create_release_key(admin, KEY_ID, policy_version="1")
    path = train(tmp_path_factory.mktemp("store-channel") / "m.onnx", padding_bytes=3 << 20).path
    publish_model(
        path,
        name="channel/model",
        version="1",
        key_id=KEY_ID,
        broker=stack.channel(publisher, "keybroker"),
        store=stack.channel(publisher, "modelstore"),
    )
    reader = stack.identity("inference")
    return b"".join(grpc_source(stack.channel(reader, "modelstore"))("channel/model", "1"))


def test_the_option_is_grpcs_single_threaded_response_streams() -> None:
    assert dict(STORE_CHANNEL_OPTIONS) == {
        grpc.experimental.ChannelOptions.SingleThreadedUnaryStream: 1
    }


def test_a_download_arrives_whole_read_by_the_iterating_thread(
    stack: DevStack, published: bytes
) -> None:
    reader = stack.identity("inference")
    channel = stack.channel(reader, "modelstore", options=STORE_CHANNEL_OPTIONS)
    pieces = list(grpc_source(channel)("channel/model", "1"))
    assert len(pieces) > 1 and b"".join(pieces) == published


def _received_until_cancelled(channel: grpc.Channel) -> int:
    """How much of the model a download through ``channel`` received before its load's scope,
    cancelled from another thread once the first piece arrived, ended it with Cancelled."""
    scope = CallScope(time.monotonic() + 60)
    received = 0
    with scoped(scope), pytest.raises(Cancelled):
        for piece in grpc_source(channel)("channel/model", "1"):
            if not received:
                canceller = threading.Thread(target=scope.cancel)
                canceller.start()
                canceller.join()
            received += len(piece)
    return received


def test_a_scope_cancelled_from_another_thread_ends_the_download(
    stack: DevStack, published: bytes
) -> None:
    reader = stack.identity("inference")
    channel = stack.channel(reader, "modelstore", options=STORE_CHANNEL_OPTIONS)
    assert 0 < _received_until_cancelled(channel) < len(published)


class _Ends(grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Records whether each response stream's done callbacks ran (a CallScope's tracking ends
    there), and on which thread: in single-threaded mode they run on the thread that takes in
    the call's end, in gRPC's default mode on its channel's own."""

    def __init__(self) -> None:
        self.calls = 0
        self.ended = 0
        self.threads: list[threading.Thread] = []

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        self.calls += 1
        call.add_done_callback(lambda _call: self._end())
        return call

    def _end(self) -> None:
        self.ended += 1
        self.threads.append(threading.current_thread())


def _server_like(stack: DevStack, ends: _Ends) -> grpc.Channel:
    """The store channel as the inference server builds it (services/inference/server.py), with
    ``ends`` just above the wrapping of gRPC's own calls."""
    observed = grpc.intercept_channel(stack.store_channel(stack.identity("inference")), ends)
    return traced_channel(scoped_channel(observed), TracerProvider())


def test_a_download_its_reader_leaves_is_taken_in_to_its_end(
    stack: DevStack, published: bytes
) -> None:
    """A reader that stops early (a refused header, a failed part) cancelled the call and left
    its end untaken: its core call stayed for as long as the channel (25-130 KB each, on the
    inference server's store channel for good) and its done callbacks never ran."""
    ends = _Ends()
    channel = _server_like(stack, ends)
    scope = CallScope(time.monotonic() + 60)
    with scoped(scope):
        pieces = grpc_source(channel)("channel/model", "1")
        assert next(pieces)
        pieces.close()
    assert (ends.calls, ends.ended) == (1, 1)
    # The same through a channel without the tracing, the command line's.
    ends = _Ends()
    plain = grpc.intercept_channel(stack.store_channel(stack.identity("inference")), ends)
    pieces = grpc_source(plain)("channel/model", "1")
    assert next(pieces)
    pieces.close()
    assert (ends.calls, ends.ended) == (1, 1)


def test_a_download_cancelled_from_another_thread_is_taken_in_to_its_end(
    stack: DevStack, published: bytes
) -> None:
    ends = _Ends()
    assert 0 < _received_until_cancelled(_server_like(stack, ends)) < len(published)
    assert (ends.calls, ends.ended) == (1, 1)


def test_a_whole_download_through_the_servers_channel_arrives_and_ends(
    stack: DevStack, published: bytes
) -> None:
    ends = _Ends()
    with scoped(CallScope(time.monotonic() + 60)):
        pieces = list(grpc_source(_server_like(stack, ends))("channel/model", "1"))
    assert b"".join(pieces) == published
    assert (ends.calls, ends.ended) == (1, 1)


def test_a_raw_single_threaded_call_left_by_its_reader_is_taken_in_too(
    stack: DevStack, published: bytes
) -> None:
    """A library caller's channel made with the options but not wrapped: grpc_source ends the
    call it holds itself."""
    ends = _Ends()
    raw = stack.channel(stack.identity("inference"), "modelstore", options=STORE_CHANNEL_OPTIONS)
    pieces = grpc_source(grpc.intercept_channel(raw, ends))("channel/model", "1")
    assert next(pieces)
    pieces.close()
    assert (ends.calls, ends.ended) == (1, 1)


def test_a_store_channels_downloads_are_read_and_ended_by_their_own_thread(
    stack: DevStack, published: bytes
) -> None:
    """What :func:`store_channel` makes: a download ends on the thread reading it (the option
    is set) and one its reader leaves, through the tracing the server puts on top, is taken in
    to its end (the channel is wrapped). The same download over a channel without the option
    ends on gRPC's own thread."""
    reader = stack.identity("inference")
    ends = _Ends()
    made = store_channel(
        reader,
        stack.address("modelstore"),
        server_name="modelstore",
        server_id=stack.spiffe_id("modelstore"),
    )
    with made:
        channel = traced_channel(grpc.intercept_channel(made, ends), TracerProvider())
        assert b"".join(grpc_source(channel)("channel/model", "1")) == published
        pieces = grpc_source(channel)("channel/model", "1")
        assert next(pieces)
        pieces.close()
    assert (ends.calls, ends.ended) == (2, 2)
    assert ends.threads == [threading.current_thread()] * 2
    ends = _Ends()
    with grpc.intercept_channel(stack.channel(reader, "modelstore"), ends) as default:
        assert b"".join(grpc_source(default)("channel/model", "1")) == published
        deadline = time.monotonic() + 10
        while not ends.ended and time.monotonic() < deadline:
            time.sleep(0.01)  # the done callback runs on gRPC's thread, just after the end
    assert ends.ended == 1 and ends.threads != [threading.current_thread()]


def test_a_head_read_left_by_a_rewrap_is_taken_in_to_its_end(stack: DevStack) -> None:
    """A re-wrap run (``strongroom keys rewrap-models``, over the command line's store channel) stops
    reading a model's head when a store sends more than it asked for: it left the call neither
    closed nor read to its end, and its core call stayed for as long as the channel."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ModelStoreServiceServicer_to_server(_Generous(), server)  # type: ignore[abstract]
    port = server.add_secure_port("127.0.0.1:0", stack.identity("modelstore").server_credentials())
    server.start()
    ends = _Ends()
    try:
        raw = store_channel(
            stack.identity("admin"), f"127.0.0.1:{port}", server_id=stack.spiffe_id("modelstore")
        )
        with grpc.intercept_channel(raw, ends) as channel:
            model = pb.ModelInfo(name="m", version="1", artifact_size=10 * MAX_HEAD_SIZE)
            with pytest.raises(InvalidArtifact, match="more than the"):
                _read_head(pb_grpc.ModelStoreServiceStub(channel), model, timeout=10)
            gc.collect()  # collected, a call left is cancelled but never taken in
            assert (ends.calls, ends.ended) == (1, 1)
    finally:
        server.stop(None)


def _no_release(key_id: str, key_version: int, wrapped: bytes) -> ReleasedDataKey:
    raise AssertionError("no key is asked for a refused header")


def test_a_fetch_that_refuses_the_header_ends_its_download(
    stack: DevStack, published: bytes
) -> None:
    """A guard: the fetch ended the download it left only because CPython frees a for loop's
    iterator as an exception leaves the loop; it now ends it itself, whatever holds it."""
    ends = _Ends()
    channel = grpc.intercept_channel(stack.store_channel(stack.identity("inference")), ends)
    with channel, pytest.raises(FailedPrecondition) as refused:
        ModelFetcher(channel, _no_release).fetch("channel/model", "1", header_sha256=bytes(32))
    assert refused.value.reason == Reason.HEADER_PIN_MISMATCH
    assert (ends.calls, ends.ended) == (1, 1)
