"""How many VCEK fetches from AMD KDS one caller's reports may cause.

A VCEK is fetched for a report before anything about it is verified (the VCEK is what verifies
it), so a caller holding the inference role can name a new made-up chip id in every report and
have the broker ask KDS for each. The collateral service bounds how many run at once
(``COLLATERAL_FETCH_BUSY``) and remembers each failure for a minute, which bounds nothing in rate:
a steady stream of new chip ids kept KDS busy at the caller's pace, enough for AMD to throttle
the broker's address and hold back the genuine first verifications of new machines.

Each caller certificate has :data:`VCEK_FETCH_CERTIFICATE_BURST` fetches at once, then
:data:`VCEK_FETCH_CERTIFICATE_RATE` a second; each SPIFFE ID, all its certificates together,
:data:`VCEK_FETCH_BURST` at once, then :data:`VCEK_FETCH_RATE` a second. Past either, a release
whose report needs a fetch is refused ``UNAVAILABLE`` ``COLLATERAL_FETCH_RATE_LIMITED`` (retry
later) without asking KDS. Only a request that goes to KDS is counted: not a release whose VCEK
is cached or carried in the evidence, nor one refused ``COLLATERAL_FETCH_BUSY`` (the budget is
asked once a fetch slot is taken).

Per SPIFFE ID, sized for a fleet, whose replicas share one: 64 machines new to the broker (or
after a TCB update, which needs each chip's new VCEK) fetch at once, the next one a second. Per
certificate too: keyed by the SPIFFE ID alone, one compromised replica naming a made-up chip each
second spent its whole fleet's budget for good, and a genuine replica on a new chip or TCB had
its VCEK refused for as long as it went on. One replica runs on one chip, whose VCEK it needs
once per TCB, and a failed fetch of it is asked again at most once a minute (the collateral
service's back-off): a certificate's 4 at once, then one a minute, covers its start, a TCB update
and an outage waited out, and leaves its fleet the rest. A replica holding its service's
provisioner (or renewing onto a new key, which any replica may) gets a new certificate and
budget at will: the SPIFFE ID's bounds it, as before this budget existed. It mints them as fast
as the CA signs (274 a second from one step-ca here), so the budget remembers
:data:`~strongroom.runtime.callers.MAX_CERTIFICATES_TRACKED` certificates at most, the one counted
longest ago forgotten first (it gets a new 4, within its SPIFFE ID's).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from strongroom.runtime.callers import MAX_CERTIFICATES_TRACKED, certificate_bucket
from strongroom.runtime.ratelimit import CallerBuckets

VCEK_FETCH_BURST = 64
VCEK_FETCH_RATE = 1.0
VCEK_FETCH_CERTIFICATE_BURST = 4
VCEK_FETCH_CERTIFICATE_RATE = 1.0 / 60

# The caller whose evidence is being verified: its SPIFFE ID and its certificate's serial.
_FETCHING_FOR: ContextVar[tuple[str, int] | None] = ContextVar(
    "strongroom_vcek_fetch_caller", default=None
)


@contextlib.contextmanager
def fetching_for(spiffe_id: str, serial: int) -> Iterator[None]:
    """Within it, VCEK fetches count against the budgets of the caller ``spiffe_id`` and of its
    certificate ``serial`` (the release engine wraps its verification of the caller's evidence
    in it)."""
    token = _FETCHING_FOR.set((spiffe_id, serial))
    try:
        yield
    finally:
        _FETCHING_FOR.reset(token)


class VcekFetchBudget:
    """The gate the collateral service asks before each VCEK fetch (``vcek_fetch_gate``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._certificates = CallerBuckets(
            VCEK_FETCH_CERTIFICATE_RATE,
            VCEK_FETCH_CERTIFICATE_BURST,
            clock=clock,
            max_tracked=MAX_CERTIFICATES_TRACKED,
        )
        self._identities = CallerBuckets(VCEK_FETCH_RATE, VCEK_FETCH_BURST, clock=clock)

    def certificates_tracked(self) -> int:
        """How many caller certificates the budget remembers now (at most
        :data:`~strongroom.runtime.callers.MAX_CERTIFICATES_TRACKED`)."""
        return len(self._certificates)

    def __call__(self) -> bool:
        """Whether the current caller may cause one more fetch (one is counted in both its
        budgets); a fetch outside any caller's verification (a refresh, the CLI) is not
        budgeted."""
        caller = _FETCHING_FOR.get()
        if caller is None:
            return True
        spiffe_id, serial = caller
        certificate = certificate_bucket(spiffe_id, serial)
        # The certificate's first: a replica past its own budget spends none of its fleet's.
        if not self._certificates.take(certificate):
            return False
        if not self._identities.take(spiffe_id):
            self._certificates.refund(certificate)  # no fetch: its own budget stays whole
            return False
        return True
