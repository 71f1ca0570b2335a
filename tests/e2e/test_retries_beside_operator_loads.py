"""A configured model's retries beside an operator's LoadModel and ModelMetadata of the same model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.artifact.stream import BufferedStreamDecryptor
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train
from strongroom.inference.models import ModelState
from tests.e2e.stalling import StallOnce
from tests.e2e.test_configured_retries import _failed_with, _publish, _start
from tests.e2e.test_resilience import wait_until


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return train(tmp_path / "m.onnx").path


@pytest.fixture
def stopped(stack: DevStack) -> Iterator[None]:
    yield
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()


class PlaintextBuffers:
    """Counts the decrypted-model buffers alive at once in this process: from their allocation
    (:class:`BufferedStreamDecryptor`'s) until they are wiped (a load done) or dropped (failed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live = 0
        self.most = 0
        self.allocated = 0
        self._guard = threading.Lock()
        allocate = BufferedStreamDecryptor._allocate
        wipe_output = BufferedStreamDecryptor.wipe_output
        on_fail = BufferedStreamDecryptor._on_fail
        counter = self

        def counted_allocate(decryptor: Any, size: int) -> None:
            allocate(decryptor, size)
            with counter._guard:
                counter.live += 1
                counter.allocated += 1
                counter.most = max(counter.most, counter.live)
            decryptor._counted = True

        def release(decryptor: Any) -> None:
            if getattr(decryptor, "_counted", False):
                decryptor._counted = False
                with counter._guard:
                    counter.live -= 1

        def counted_wipe_output(decryptor: Any) -> None:
            wipe_output(decryptor)
            release(decryptor)

        def counted_on_fail(decryptor: Any) -> None:
            on_fail(decryptor)
            release(decryptor)

        monkeypatch.setattr(BufferedStreamDecryptor, "_allocate", counted_allocate)
        monkeypatch.setattr(BufferedStreamDecryptor, "wipe_output", counted_wipe_output)
        monkeypatch.setattr(BufferedStreamDecryptor, "_on_fail", counted_on_fail)


def test_an_operators_load_beside_a_retrys_holds_one_plaintext_buffer_at_most(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured retry is downloading the model (its plaintext buffer allocated, its key
    released) when an operator's LoadModel of the same model arrives: the two loads never hold
    a plaintext buffer each at once (2 GB each for the largest model, which the pod's memory
    limit does not plan for). Loads of one model name take its lock (ModelLoader): the
    LoadModel waits for the retry's load to end, then loads; with the lock taken per load
    instead, this test sees two buffers at once."""
    stack.create_release_key(stack.identity("admin"), "twice", policy_version="1")
    buffers = PlaintextBuffers(monkeypatch)
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "1")
    monkeypatch.setattr(storage, "open", stall)
    inference = _start(stack, "twice")
    inference.load_configured_models()
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    with ThreadPoolExecutor(1) as pool:
        try:
            assert wait_until(lambda: _failed_with(inference, "twice") == "MODEL_NOT_FOUND", 30)
            _publish(stack, model_path, "twice", "twice")
            assert stall.stalled.wait(30)  # the store has sent all but the artifact's end
            assert wait_until(lambda: buffers.live == 1, 30)  # the retry holds its buffer
            answer: Future[Any] = pool.submit(
                control.LoadModel,
                control_pb.LoadModelRequest(name="twice", version="1"),
                timeout=60,
            )
            # It waits for the retry's load (or, were they not exclusive, has begun its own).
            assert wait_until(
                lambda: inference.loader.queued("twice") == ("1",) or buffers.allocated > 1, 30
            )
        finally:
            stall.go_on.set()
        answer.result(60)
    assert inference.repository.is_ready("twice", "1")
    assert buffers.allocated == 2  # the retry's load, then the LoadModel's own
    assert buffers.most == 1


def test_a_retry_under_way_still_shows_the_failure_it_retries(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a configured model's retry was loading it, ModelMetadata said only that it was
    still loading: the failure being retried (here: not yet published) could not be seen."""
    stack.create_release_key(stack.identity("admin"), "watched", policy_version="1")
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "1")
    monkeypatch.setattr(storage, "open", stall)
    inference = _start(stack, "watched")
    oip = oip_grpc.GRPCInferenceServiceStub(stack.channel(stack.identity("client"), "inference"))
    inference.load_configured_models()
    try:
        assert wait_until(lambda: _failed_with(inference, "watched") == "MODEL_NOT_FOUND", 30)
        _publish(stack, model_path, "watched", "watched")
        assert stall.stalled.wait(30)  # the retry is loading it
        assert inference.repository.version_state("watched", "1") is ModelState.LOADING
        for version in ("", "1"):
            with pytest.raises(grpc.RpcError) as info:
                oip.ModelMetadata(
                    oip_pb.ModelMetadataRequest(name="watched", version=version), timeout=30
                )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "loading again after its last load failed (MODEL_NOT_FOUND)" in str(
                info.value.details()
            )
        ready = oip.ModelReady(oip_pb.ModelReadyRequest(name="watched"), timeout=30)
        assert not ready.ready
    finally:
        stall.go_on.set()
    assert wait_until(lambda: inference.repository.is_ready("watched", "1"), 30)
    oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="watched"), timeout=30)
