"""Downloads over a store channel with :data:`STORE_CHANNEL_OPTIONS` (gRPC's single-threaded
response streams), against the real model store over mTLS: the whole artifact arrives, read by
the iterating thread, and a load's scope cancelled from another thread still ends the download."""

from __future__ import annotations

import threading
import time

import grpc
import grpc.experimental
import pytest

from strongroom.client.cancel import CallScope, scoped
from strongroom.client.fetch import STORE_CHANNEL_OPTIONS, grpc_source
from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from strongroom.errors import Cancelled

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


def test_a_scope_cancelled_from_another_thread_ends_the_download(
    stack: DevStack, published: bytes
) -> None:
    reader = stack.identity("inference")
    channel = stack.channel(reader, "modelstore", options=STORE_CHANNEL_OPTIONS)
    scope = CallScope(time.monotonic() + 60)
    received = 0
    with scoped(scope), pytest.raises(Cancelled):
        for piece in grpc_source(channel)("channel/model", "1"):
            if not received:
                canceller = threading.Thread(target=scope.cancel)
                canceller.start()
                canceller.join()
            received += len(piece)
    assert 0 < received < len(published)
