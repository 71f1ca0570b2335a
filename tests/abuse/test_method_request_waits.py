"""A data-plane call that never sends its small request is ended at its own method's bound.

The wait for a data-plane call's request message (``server.request_wait_seconds``) defaulted to
one bound per service, what the stream floor allowed its largest request: a store ``StatModel``
that never sent its few bytes held its data-plane worker for the 65 s of a 4 MiB upload chunk,
an inference ``ModelMetadata`` for the 1,040 s (17 minutes) of a 64 MiB tensor. Each method's
largest request sets its own bound now, and only ``ModelInfer`` keeps the long one.

Real services over real mTLS, with the bounds scaled down so that nothing here waits minutes:
:data:`~strongroom.runtime.config.MIN_REQUEST_WAIT_SECONDS` is 0.5 s while the hosts are built,
the store's floor is its default (64 KiB/s: ``StatModel``'s 64 KiB in 1 s, the service's 4 MiB +
64 KiB in 65 s), the inference service's 1 MiB/s (``ModelMetadata``'s 1 MiB in 1 s,
``ModelInfer``'s 65 MiB in 65 s). On the old code the small calls waited out the whole bound of
their service, past their own 30 s deadline.

The same per-method sizes bound each request message itself: a store ``StatModel`` of 100 KiB
was taken whole (the store's limit was its 4 MiB upload chunk's) and, on a slow link, cut
``CANCELLED`` at its short wait instead of refused ``MESSAGE_TOO_LARGE``; an inference
``ModelMetadata`` of over 1 MiB likewise (the limit was a 64 MiB tensor's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.dev.devstack import DevStack
from strongroom.inference.oip import SERVICE_NAME as OIP
from strongroom.modelstore.service import SERVICE_NAME as STORE
from strongroom.runtime import config
from strongroom.wire import append_bytes_field
from tests.abuse.conftest import SERVER
from tests.abuse.releases import settled
from tests.abuse.traffic import outcome
from tests.conftest import stack_root

DEADLINE = 30.0  # each stalled call's own deadline: the old bounds (65 s, 65 s) outlast it
INFERENCE_FLOOR = 1 << 20  # bytes per second: 1 MiB in 1 s, a 65 MiB ModelInfer in 65 s


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """step-ca, key broker, model store and inference in this process over real mTLS, their
    request waits built with a 0.5 s least bound."""
    root = stack_root(tmp_path_factory, "method-waits", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev, pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "MIN_REQUEST_WAIT_SECONDS", 0.5)
        dev.start_in_process("keybroker", server=SERVER)
        dev.start_in_process("modelstore", server=SERVER)
        dev.start_in_process(
            "inference", server={**SERVER, "stream_min_bytes_per_second": INFERENCE_FLOOR}
        )
        mp.undo()
        yield dev


class Stalled:
    """A unary call whose headers go and whose request message never does (until :meth:`end`)."""

    def __init__(self, channel: grpc.Channel, method: str) -> None:
        self._gate = threading.Event()
        self.future: Any = channel.stream_unary(method, None, None).future(
            self._never(), timeout=DEADLINE
        )

    def _never(self) -> Iterator[bytes]:
        self._gate.wait(DEADLINE)
        yield from ()

    def outcome(self) -> tuple[str, str | None]:
        return outcome(self.future.exception(DEADLINE + 30))

    def end(self) -> None:
        self._gate.set()


def stalled(stack: DevStack, service: str, method: str) -> Stalled:
    return Stalled(stack.channel(stack.identity("admin"), service), method)


def running(stack: DevStack, service: str) -> Callable[[], int]:
    host = stack.services[service].handle.host
    return lambda: host.unary.running(stack.spiffe_id("admin"))


def test_a_stat_model_whose_request_never_comes_is_ended_at_its_own_short_bound(
    stack: DevStack,
) -> None:
    """The store's StatModel request (at most 64 KiB) is waited for 1 s here, not the 65 s of
    the store's upload chunk: cancelled long before its deadline, its worker given back."""
    host = stack.services["modelstore"].handle.host
    assert host.unary.request_wait(f"/{STORE}/StatModel") == 1.0
    assert host.unary.request_wait(f"/{STORE}/PutModel") == pytest.approx(65.0)  # the chunk's
    call = stalled(stack, "modelstore", f"/{STORE}/StatModel")
    try:
        assert call.outcome() == ("CANCELLED", None)  # old code: DEADLINE_EXCEEDED at 30 s
    finally:
        call.end()
    assert settled(lambda: running(stack, "modelstore")() == 0)


def test_a_model_metadata_is_ended_while_a_tensor_sized_model_infer_still_waits(
    stack: DevStack,
) -> None:
    """On one inference server, a stalled ModelMetadata (at most 1 MiB: 1 s here) is cancelled
    while a stalled ModelInfer, whose 65 MiB request keeps its long bound (65 s here), still
    waits; the ModelInfer then ends without a message when its client ends its stream."""
    host = stack.services["inference"].handle.host
    assert host.unary.request_wait(f"/{OIP}/ModelInfer") == pytest.approx(65.0)
    infer = stalled(stack, "inference", f"/{OIP}/ModelInfer")
    metadata = stalled(stack, "inference", f"/{OIP}/ModelMetadata")
    try:
        assert metadata.outcome() == ("CANCELLED", None)  # old code: DEADLINE_EXCEEDED at 30 s
        assert not infer.future.done()  # its bound is its tensor's, not ModelMetadata's
        infer.end()
        assert infer.outcome() == ("INVALID_ARGUMENT", "MALFORMED_REQUEST")
    finally:
        metadata.end()
        infer.end()
    assert settled(lambda: running(stack, "inference")() == 0)


PADDING_FIELD = 15  # a field none of these requests has: protobuf keeps it as an unknown field


def padded(message: bytes, size: int) -> bytes:
    """``message`` with an unknown field that makes it exactly ``size`` bytes."""
    for pad in range(size - len(message), 0, -1):
        out = append_bytes_field(message, PADDING_FIELD, bytes(pad))
        if len(out) == size:
            return out
    raise ValueError(f"cannot pad {len(message)} bytes to {size}")


def sent(stack: DevStack, service: str, method: str, message: bytes) -> tuple[str, str | None, str]:
    """(status, reason, details) of ``message`` sent as the request of ``method`` (raw bytes)."""
    channel = stack.channel(stack.identity("admin"), service)
    call = channel.unary_unary(method, None, None)
    try:
        call(message, timeout=DEADLINE)
    except grpc.RpcError as exc:
        return (*outcome(exc), exc.details() or "")
    finally:
        channel.close()
    return ("OK", None, "")


def too_large(method: str, size: int, limit: int) -> tuple[str, str, str]:
    return (
        "RESOURCE_EXHAUSTED",
        "MESSAGE_TOO_LARGE",
        f"MESSAGE_TOO_LARGE: {method}: a request message of {size} bytes is larger than the "
        f"limit of {limit} bytes",
    )


def test_a_stat_model_over_its_own_limit_is_refused_as_too_large(stack: DevStack) -> None:
    """A 100 KiB StatModel is refused MESSAGE_TOO_LARGE naming its own 64 KiB, the size its
    wait is derived from; one of exactly 64 KiB is served (the model is not there). Old code:
    NOT_FOUND, the message taken under the store's 4 MiB + 64 KiB upload limit."""
    method = f"/{STORE}/StatModel"
    request = store_pb.StatModelRequest(name="sizes-absent", version="1").SerializeToString()
    limit = stack.services["modelstore"].handle.host.message_limits.request(method)
    assert limit == 64 * 1024
    assert sent(stack, "modelstore", method, padded(request, 100 * 1024)) == too_large(
        method, 100 * 1024, limit
    )
    assert sent(stack, "modelstore", method, padded(request, limit))[:2] == (
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
    )


def test_a_model_metadata_over_its_own_limit_is_refused_as_too_large(stack: DevStack) -> None:
    """ModelMetadata one byte over its 1 MiB is refused MESSAGE_TOO_LARGE naming 1 MiB; at
    1 MiB it is served (the model is not loaded). Old code: NOT_FOUND, under the 65 MiB of a
    tensor."""
    method = f"/{OIP}/ModelMetadata"
    request = oip_pb.ModelMetadataRequest(name="sizes-absent").SerializeToString()
    limit = stack.services["inference"].handle.host.message_limits.request(method)
    assert limit == 1 << 20
    assert sent(stack, "inference", method, padded(request, limit + 1)) == too_large(
        method, limit + 1, limit
    )
    assert sent(stack, "inference", method, padded(request, limit))[:2] == (
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
    )


def test_requests_at_the_service_limit_still_reach_model_infer_and_put_model(
    stack: DevStack,
) -> None:
    """The methods whose requests carry the payload keep the service's limit: a ModelInfer and a
    PutModel message of exactly it reach their handlers (refused there for what they are, not
    for their size)."""
    infer = f"/{OIP}/ModelInfer"
    limits = stack.services["inference"].handle.host.message_limits
    assert limits.request(infer) == limits.receive
    request = oip_pb.ModelInferRequest(model_name="sizes-absent").SerializeToString()
    assert sent(stack, "inference", infer, padded(request, limits.receive))[:2] == (
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
    )
    put = f"/{STORE}/PutModel"
    limits = stack.services["modelstore"].handle.host.message_limits
    assert limits.request(put) == limits.receive
    channel = stack.channel(stack.identity("publisher"), "modelstore")
    try:
        upload = channel.stream_unary(put, None, None)
        chunk = store_pb.PutModelRequest(data=b"\0" * 1024).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            upload(iter([padded(chunk, limits.receive)]), timeout=DEADLINE)
        assert outcome(info.value) == ("INVALID_ARGUMENT", "BAD_MAGIC")  # read, not refused
    finally:
        channel.close()


def test_a_downloads_request_has_the_small_wait_and_the_small_limit(stack: DevStack) -> None:
    """GetModel, a blocking response stream whose one request is read while it holds its
    data-plane worker: a request that never comes is cancelled at StatModel's bound (1 s here,
    not the upload chunk's 65 s), and one of 100 KiB is refused MESSAGE_TOO_LARGE naming 64 KiB."""
    method = f"/{STORE}/GetModel"
    channel = stack.channel(stack.identity("admin"), "modelstore")
    gate = threading.Event()

    def never() -> Iterator[bytes]:
        gate.wait(DEADLINE)
        yield from ()

    try:
        download = channel.stream_stream(method, None, None)
        stalled_call = download(never(), timeout=DEADLINE)
        with pytest.raises(grpc.RpcError) as info:
            list(stalled_call)
        assert outcome(info.value) == ("CANCELLED", None)
        gate.set()
        request = store_pb.GetModelRequest(name="sizes-absent", version="1").SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            list(download(iter([padded(request, 100 * 1024)]), timeout=DEADLINE))
        assert (*outcome(info.value), info.value.details()) == too_large(
            method, 100 * 1024, 64 * 1024
        )
    finally:
        gate.set()
        channel.close()
