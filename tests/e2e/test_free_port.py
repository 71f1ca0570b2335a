"""The dev stack's port choice: a port handed out once is never handed out again in the process."""

from __future__ import annotations

import itertools
import secrets

import pytest

from strongroom.dev.devstack import stack


def test_a_port_chosen_but_not_yet_bound_is_not_chosen_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stack chooses its services' ports (a health port among them) before it binds them,
    when each service starts: a second choice meanwhile found the same port free and handed it
    out again, and one of the two binds then failed ("Failed to bind to address", a rehearsal's
    module of 17 tests). The random draw is made to repeat itself here, as a collision would."""
    monkeypatch.setattr(stack, "_CHOSEN", set())  # as in a process that chose nothing yet
    first = stack.free_port()  # chosen, not bound: as a stack holds it until its service starts
    low = max(1024, stack._ephemeral_low() - 12_000)  # as free_port draws from
    draws = itertools.chain([first - low], itertools.count())  # the same draw again, then others
    monkeypatch.setattr(secrets, "randbelow", lambda _n: next(draws))
    assert stack.free_port() != first
