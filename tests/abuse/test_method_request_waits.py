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
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.dev.devstack import DevStack
from strongroom.inference.oip import SERVICE_NAME as OIP
from strongroom.modelstore.service import SERVICE_NAME as STORE
from strongroom.runtime import config
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
