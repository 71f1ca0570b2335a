"""How a load's :class:`~strongroom.client.cancel.CallScope` names what ended it."""

from __future__ import annotations

import threading
import time

from strongroom.client.cancel import CallScope
from strongroom.runtime.gave_up import DEADLINE_TRANSIT


def test_a_cancellation_as_the_deadline_arrives_is_the_deadline() -> None:
    """A client whose deadline passes cancels its call, and the server can hear of it just before
    its own copy of the deadline passes: the load was recorded LOAD_CANCELLED, as if an operator
    had cancelled it (tests/e2e/test_faults.py's deadline test failed so, now and then)."""
    scope = CallScope(time.monotonic() + DEADLINE_TRANSIT / 2)
    scope.cancel()
    assert scope.error().reason == "LOAD_DEADLINE_EXCEEDED"


def test_a_cancellation_noticed_after_the_deadline_is_still_a_cancellation() -> None:
    """The reason was judged when the error was raised: a load its caller cancelled, whose
    step noticed only after the deadline had passed (a release thread returning late), was
    recorded LOAD_DEADLINE_EXCEEDED."""
    scope = CallScope(time.monotonic() + 2 * DEADLINE_TRANSIT)
    scope.cancel()
    passed = threading.Event()
    while not scope.expired:
        passed.wait(DEADLINE_TRANSIT / 10)
    assert scope.error().reason == "LOAD_CANCELLED"


def test_a_scope_that_only_expires_is_the_deadline_and_one_without_a_deadline_is_cancelled() -> (
    None
):
    expired = CallScope(time.monotonic() - 1)
    assert expired.ended and expired.error().reason == "LOAD_DEADLINE_EXCEEDED"
    unbounded = CallScope()
    unbounded.cancel()
    assert unbounded.error().reason == "LOAD_CANCELLED"


def test_a_peer_s_call_out_of_time_is_still_an_unavailable_dependency_for_the_loader() -> None:
    """The fetch library now makes a peer's DEADLINE_EXCEEDED DeadlineExceeded (remote.TRANSIENT,
    as the publisher does); the loader still answers it UNAVAILABLE, retried, its reason kept:
    LoadModel's caller did not run out of time. Once the load's own scope has ended, the scope's
    error, as for an Unavailable."""
    from services.inference.loader import _ended, transient
    from strongroom.errors import DeadlineExceeded, Unavailable

    late = DeadlineExceeded(
        "fetch: Deadline Exceeded (DEADLINE_EXCEEDED)", reason="FETCH_UNAVAILABLE"
    )
    answered = _ended(CallScope(), late)
    assert type(answered) is Unavailable and transient(answered)
    assert (answered.reason, answered.message) == (late.reason, late.message)
    expired = CallScope(time.monotonic() - 1)
    assert _ended(expired, late).reason == "LOAD_DEADLINE_EXCEEDED"
