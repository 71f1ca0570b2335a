"""The runtime's view of a call's request stream once its caller ended it
(:class:`strongroom.runtime.interceptors._RequestStream`): which refusals wait for gRPC to record
whether the caller gave up. The end-to-end cases (an upload cancelled or past its deadline, one
really cut short) are in tests/e2e/test_store_gave_up.py; this is the choice of which refusals wait,
on a stand-in context (a real call cannot be held in that state on purpose)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from strongroom.errors import AlreadyExists, InvalidArgument, PermissionDenied, StrongroomError
from strongroom.runtime import interceptors


class _ActiveCall:
    """A call gRPC still reads as active; counts the waits for its end."""

    def __init__(self) -> None:
        self.waits = 0

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.waits += 1
        callback()  # the call "ends" at once: the wait is counted, not spent
        return True

    def time_remaining(self) -> float:
        return 30.0


def _ended_stream(context: Any) -> interceptors._RequestStream:
    stream = interceptors._RequestStream(iter(()), context, "/strongroom.test.Svc/Upload")
    with pytest.raises(StopIteration):
        next(stream)
    return stream


@pytest.mark.parametrize(
    "refusal",
    [
        PermissionDenied("not yours", reason="CALLER_NOT_ALLOWED"),
        AlreadyExists("published meanwhile", reason="MODEL_EXISTS"),
    ],
)
def test_a_refusal_that_does_not_depend_on_where_the_stream_ended_does_not_wait(
    refusal: StrongroomError,
) -> None:
    """Every refusal after the stream's end waited up to CALL_END_WAIT for the call to end,
    holding the worker that long per refused upload; only a refusal of what was sent can be a
    stream cut short by its caller giving up."""
    context = _ActiveCall()
    assert _ended_stream(context).caller_gave_up(refusal) is None
    assert context.waits == 0


def test_a_refusal_of_what_was_sent_waits_to_learn_whether_the_caller_gave_up() -> None:
    context = _ActiveCall()
    refusal = InvalidArgument("artifact is truncated", reason="TRUNCATED")
    assert _ended_stream(context).caller_gave_up(refusal) is None
    assert context.waits == 1
