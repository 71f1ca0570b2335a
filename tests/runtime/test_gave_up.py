"""The one rule telling a caller's deadline from its cancellation (strongroom.runtime.gave_up)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from strongroom.runtime.gave_up import (
    DEADLINE_TRANSIT,
    CallEnd,
    GaveUp,
    gave_up,
    gave_up_on,
    server_ends,
)


@pytest.mark.parametrize(
    ("remaining", "active", "outcome"),
    [
        (None, True, None),
        (30.0, True, None),
        (0.0, True, GaveUp.DEADLINE),
        (-1.0, True, GaveUp.DEADLINE),
        (0.0, False, GaveUp.DEADLINE),
        # Ended by its caller's deadline: the client's passes a transit before the server's.
        (0.003, False, GaveUp.DEADLINE),
        (0.75, False, GaveUp.DEADLINE),
        (DEADLINE_TRANSIT, False, GaveUp.DEADLINE),
        (DEADLINE_TRANSIT + 0.001, False, GaveUp.CANCELLED),
        (30.0, False, GaveUp.CANCELLED),
        (None, False, GaveUp.CANCELLED),
    ],
)
def test_a_call_ended_just_before_the_servers_deadline_is_its_callers_deadline(
    remaining: float | None, active: bool, outcome: GaveUp | None
) -> None:
    """A SetReleasePolicy whose caller's deadline passed while it waited for the policy lock was
    recorded CANCELLED about one time in four: the caller's client ends the call at its own
    deadline, which passes before the server's by the request's transit, as a cancellation
    would, and the server saw the call end with 0.7 to 3 ms of its deadline left. A call ended
    within DEADLINE_TRANSIT of it is the deadline's; one cancelled well before it stays
    CANCELLED. Every service judges by this rule (the inference loads' scope had its own, 0.5 s)."""
    assert gave_up(remaining, active) is outcome


_METHOD = "/test.GaveUp/Hold"


def _raw(message: bytes) -> bytes:
    return message


@contextlib.contextmanager
def _serving(
    handle: Callable[[grpc.ServicerContext], None],
) -> Iterator[Callable[..., Any]]:
    """A real gRPC server whose one unary method runs ``handle(context)``, and its method."""

    def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        handle(context)
        return b""

    handler = grpc.unary_unary_rpc_method_handler(hold, _raw, _raw)
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.GaveUp", {"Hold": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel.unary_unary(_METHOD, _raw, _raw)
    finally:
        channel.close()
        server.stop(0)


def test_a_call_end_is_judged_when_the_call_ends_not_when_asked() -> None:
    """Inference's stopped runs and the store's stopped downloads each kept their own copy of
    this, and the two differed before the end (one judged the call as it stood, the other said
    None). One CallEnd now: None while its caller waits; at the end, the verdict of that moment,
    kept: asked later, within DEADLINE_TRANSIT of the deadline, the rule would say the
    deadline's."""
    seen: dict[str, Any] = {}
    started, ended = threading.Event(), threading.Event()
    ends: list[None] = []

    def on_end() -> None:
        ends.append(None)
        ended.set()

    def handle(context: grpc.ServicerContext) -> None:
        end = CallEnd(context, on_end=on_end)
        seen["waiting"] = end.gave_up()
        started.set()
        assert ended.wait(30)
        while (context.time_remaining() or 0.0) > DEADLINE_TRANSIT / 2:
            time.sleep(0.01)
        seen["asked later"], seen["the rule now"] = end.gave_up(), gave_up_on(context)
        seen["server"] = end.server_reason()
        seen["late"] = CallEnd(context).gave_up()  # made once the call had ended

    with _serving(handle) as hold:
        call = hold.future(b"", timeout=DEADLINE_TRANSIT + 2)
        assert started.wait(30)
        call.cancel()
        assert ended.wait(30)
        deadline = time.monotonic() + 30
        while "late" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == {
        "waiting": None,
        "asked later": GaveUp.CANCELLED,
        "the rule now": GaveUp.DEADLINE,
        "server": None,
        "late": GaveUp.DEADLINE,
    }
    assert len(ends) == 1


def test_a_call_the_server_ended_is_not_its_callers_giving_up() -> None:
    """A download the store's watchdog cancelled looked to its handler like its caller's cancel
    (its line said gave_up CANCELLED): a call the server ended (server_ends, before its cancel)
    has no verdict of giving up, and its CallEnd names the server's reason."""
    seen: dict[str, Any] = {}
    done = threading.Event()

    def handle(context: grpc.ServicerContext) -> None:
        ended = threading.Event()
        end = CallEnd(context, on_end=ended.set)
        server_ends(context, "STREAM_IDLE_TIMEOUT")
        context.cancel()  # type: ignore[no-untyped-call]
        assert ended.wait(30)
        seen["gave up"], seen["server"] = end.gave_up(), end.server_reason()
        seen["the rule"] = gave_up_on(context)  # the rule itself is unchanged
        done.set()

    with _serving(handle) as hold:
        with pytest.raises(grpc.RpcError) as info:
            hold(b"", timeout=60)
        assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        assert done.wait(30)
    assert seen == {"gave up": None, "server": "STREAM_IDLE_TIMEOUT", "the rule": GaveUp.CANCELLED}
