"""The one rule telling a caller's deadline from its cancellation (strongroom.runtime.gave_up)."""

from __future__ import annotations

import pytest

from strongroom.runtime.gave_up import DEADLINE_TRANSIT, GaveUp, gave_up


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
