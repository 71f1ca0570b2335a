"""How many VCEK fetches from AMD KDS one caller's reports may cause.

A VCEK is fetched for a report before anything about it is verified (the VCEK is what verifies
it), so a caller holding the inference role can name a new made-up chip id in every report and
have the broker ask KDS for each. The collateral service bounds how many run at once
(``COLLATERAL_FETCH_BUSY``) and remembers each failure for a minute, which bounds nothing in rate:
a steady stream of new chip ids kept KDS busy at the caller's pace, enough for AMD to throttle
the broker's address and hold back the genuine first verifications of new machines.

Each caller (its verified SPIFFE ID) has :data:`VCEK_FETCH_BURST` fetches at once, then
:data:`VCEK_FETCH_RATE` a second; past that a release whose report needs a fetch is refused
``UNAVAILABLE`` ``COLLATERAL_FETCH_RATE_LIMITED`` (retry later) without asking KDS. Only a request
that goes to KDS is counted: not a release whose VCEK is cached or carried in the evidence, nor
one refused ``COLLATERAL_FETCH_BUSY`` (the budget is asked once a fetch slot is taken). The burst is sized for a
fleet, whose replicas share one SPIFFE ID: 64 machines new to the broker (or after a TCB update,
which needs each chip's new VCEK) fetch at once, the next one a second.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from strongroom.runtime.ratelimit import CallerBuckets

VCEK_FETCH_BURST = 64
VCEK_FETCH_RATE = 1.0

_FETCHING_FOR: ContextVar[str | None] = ContextVar("strongroom_vcek_fetch_caller", default=None)


@contextlib.contextmanager
def fetching_for(caller: str) -> Iterator[None]:
    """Within it, VCEK fetches count against ``caller``'s budget (the release engine wraps its
    verification of the caller's evidence in it)."""
    token = _FETCHING_FOR.set(caller)
    try:
        yield
    finally:
        _FETCHING_FOR.reset(token)


class VcekFetchBudget:
    """The gate the collateral service asks before each VCEK fetch (``vcek_fetch_gate``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = CallerBuckets(VCEK_FETCH_RATE, VCEK_FETCH_BURST, clock=clock)

    def __call__(self) -> bool:
        """Whether the current caller may cause one more fetch (one is counted); a fetch outside
        any caller's verification (a refresh, the CLI) is not budgeted."""
        caller = _FETCHING_FOR.get()
        return caller is None or self._buckets.take(caller)
