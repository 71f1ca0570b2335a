"""The model store's streams when their caller gives up mid-stream: an upload or a download whose
client cancels it, or whose deadline passes, against the real store over mTLS.

What the store says of such a call follows the rule every service judges by
(:mod:`strongroom.runtime.gave_up`): DEADLINE_EXCEEDED when the caller's deadline ended it,
CANCELLED when the caller called it off; and an upload so ended stores nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.dev.devstack import DevStack
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from tests.modelstore.artifacts import chunked, make_artifact

GAVE_UP = ["CANCELLED", "DEADLINE_EXCEEDED"]


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> bool:
    """Polls ``condition`` (how long to wait for something the store does, not a timing bound)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _storage(stack: DevStack) -> FilesystemStorage:
    storage = stack.services["modelstore"].handle.storage
    assert isinstance(storage, FilesystemStorage)
    return storage


def _failed(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    """The error mapping's "rpc failed" lines of ``method``."""
    return [
        r
        for r in caplog.records
        if r.getMessage() == "rpc failed" and str(getattr(r, "method", "")).endswith(method)
    ]


def _unexpected(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("gave_up", GAVE_UP)
def test_an_upload_its_caller_gave_up_on_mid_stream_is_said_so_and_stores_nothing(
    stack: DevStack, caplog: pytest.LogCaptureFixture, gave_up: str
) -> None:
    """A PutModel whose client cancelled it, or whose deadline passed, while the store waited for
    its next message reached the error mapping as gRPC's bare ``grpc.RpcError``: the store logged
    "unexpected error" (ERROR, with a traceback) and took the call for an INTERNAL failure of its
    own. It now says the caller gave up, as the rule tells which way, and the partial upload
    leaves nothing behind: no temporary file, no record, no reservation of the version."""
    caplog.set_level(logging.INFO)
    storage = _storage(stack)
    publisher = pb_grpc.ModelStoreServiceStub(
        stack.channel(stack.identity("publisher"), "modelstore")
    )
    # The channel's TLS handshake, made before the call's deadline starts.
    publisher.ListModels(pb.ListModelsRequest(), timeout=30)
    name = f"gave-up/{gave_up.lower()}"
    artifact = make_artifact(name, "1", os.urandom(1_000_000))
    parts = chunked(artifact, 64 * 1024)
    sent, stop = threading.Event(), threading.Event()

    def stalled() -> Iterator[pb.PutModelRequest]:
        yield pb.PutModelRequest(data=parts[0])
        yield pb.PutModelRequest(data=parts[1])
        sent.set()
        stop.wait(60)

    tmp = storage.root / "tmp"
    try:
        if gave_up == "CANCELLED":
            future = publisher.PutModel.future(stalled(), timeout=600)
            assert sent.wait(30)
            assert _wait_for(lambda: any(tmp.iterdir())), "the upload is in progress"
            assert future.cancel()
        else:
            with pytest.raises(grpc.RpcError) as info:
                publisher.PutModel(stalled(), timeout=3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert _wait_for(lambda: bool(_failed(caplog, "PutModel")))
    finally:
        stop.set()
    (line,) = _failed(caplog, "PutModel")
    assert (getattr(line, "reason", None), getattr(line, "status", None)) == (gave_up, gave_up)
    assert _unexpected(caplog) == []
    assert _wait_for(lambda: not any(tmp.iterdir()))
    assert [r for r in storage.records() if r.name == name] == []
    # The version is not held: the whole artifact is stored now.
    stored = publisher.PutModel((pb.PutModelRequest(data=p) for p in parts), timeout=60)
    assert (stored.model.name, stored.model.artifact_size) == (name, len(artifact))


def test_an_upload_its_caller_ended_short_is_still_refused_truncated(
    stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the rule above: an upload whose client ended its stream short of the
    artifact, and waits for the answer, is refused TRUNCATED (its caller did not give up), and
    stores nothing."""
    caplog.set_level(logging.INFO)
    publisher = pb_grpc.ModelStoreServiceStub(
        stack.channel(stack.identity("publisher"), "modelstore")
    )
    name = "gave-up/short"
    parts = chunked(make_artifact(name, "1", os.urandom(1_000_000)), 64 * 1024)
    with pytest.raises(grpc.RpcError) as info:
        publisher.PutModel((pb.PutModelRequest(data=p) for p in parts[:2]), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.details().startswith("TRUNCATED")  # type: ignore[attr-defined]
    assert [getattr(r, "reason", None) for r in _failed(caplog, "PutModel")] == ["TRUNCATED"]
    assert [r for r in _storage(stack).records() if r.name == name] == []


def test_an_upload_message_over_the_limit_is_refused_for_it_and_stores_nothing(
    stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC refused an upload message over the store's limit itself, and the store saw its
    request stream end as if the client had cancelled: its log said CANCELLED, the caller gave up,
    when the caller had sent a message too large. The runtime refuses it now, RESOURCE_EXHAUSTED
    MESSAGE_TOO_LARGE naming the limit, logged so, and the partial upload leaves nothing behind."""
    caplog.set_level(logging.INFO)
    storage = _storage(stack)
    limit = stack.services["modelstore"].handle.host.message_limits.receive
    publisher = pb_grpc.ModelStoreServiceStub(
        stack.channel(stack.identity("publisher"), "modelstore")
    )
    name = "oversize/chunk"
    parts = chunked(make_artifact(name, "1", os.urandom(1_000_000)), 64 * 1024)
    oversized = pb.PutModelRequest(data=bytes(limit + 1 - 5))  # tag and length: 5 bytes
    assert oversized.ByteSize() == limit + 1
    with pytest.raises(grpc.RpcError) as info:
        publisher.PutModel(iter([pb.PutModelRequest(data=parts[0]), oversized]), timeout=60)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.trailing_metadata() or ())[REASON_TRAILER] == "MESSAGE_TOO_LARGE"
    assert f"larger than the limit of {limit} bytes" in err.details()
    assert _wait_for(lambda: bool(_failed(caplog, "PutModel")))
    (line,) = _failed(caplog, "PutModel")
    assert (getattr(line, "reason", None), getattr(line, "status", None)) == (
        "MESSAGE_TOO_LARGE",
        "RESOURCE_EXHAUSTED",
    )
    (warning,) = [r for r in caplog.records if r.getMessage() == "request message too large"]
    assert getattr(warning, "bytes", None) == limit + 1
    assert _unexpected(caplog) == []
    assert _wait_for(lambda: not any((storage.root / "tmp").iterdir()))
    assert [r for r in storage.records() if r.name == name] == []
    # The version is not held: the whole artifact is stored now.
    stored = publisher.PutModel((pb.PutModelRequest(data=p) for p in parts), timeout=60)
    assert stored.model.name == name
