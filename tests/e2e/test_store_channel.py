"""Downloads over a store channel with :data:`STORE_CHANNEL_OPTIONS` (gRPC's single-threaded
response streams), against the real model store over mTLS: the whole artifact arrives, read by
the iterating thread, and a load's scope cancelled from another thread still ends the download."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import grpc.experimental
import pytest
from opentelemetry.sdk.trace import TracerProvider

from strongroom.client.cancel import CallScope, scoped, scoped_channel
from strongroom.client.fetch import STORE_CHANNEL_OPTIONS, grpc_source
from strongroom.client.publish import publish_model
from strongroom.client.whole_streams import whole_streams
from strongroom.dev.devstack import DevStack
from strongroom.errors import Cancelled
from strongroom.runtime.tracing import traced_channel

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
    there): in single-threaded mode they run on the thread that takes in the call's end."""

    def __init__(self) -> None:
        self.calls = 0
        self.ended = 0

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        self.calls += 1
        call.add_done_callback(lambda _call: self._end())
        return call

    def _end(self) -> None:
        self.ended += 1


def _server_like(stack: DevStack, ends: _Ends) -> grpc.Channel:
    """The store channel as the inference server builds it (services/inference/server.py), with
    ``ends`` just above the wrapping of gRPC's own calls."""
    raw = stack.channel(stack.identity("inference"), "modelstore", options=STORE_CHANNEL_OPTIONS)
    observed = grpc.intercept_channel(whole_streams(raw), ends)
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
    plain = grpc.intercept_channel(
        whole_streams(
            stack.channel(stack.identity("inference"), "modelstore", options=STORE_CHANNEL_OPTIONS)
        ),
        ends,
    )
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
