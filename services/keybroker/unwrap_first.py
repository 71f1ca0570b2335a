"""Which callers' key releases have the HSM's verdict on their wrapped data key before their
``ALLOWED`` record.

A release's re-wrap starts once its ``ALLOWED`` record has its place in the log (the HSM works
while the record is synced), so a wrapped data key that does not unwrap (``WRAPPED_KEY_INVALID``)
is found after the decision was recorded: an ``ALLOWED`` record, then a ``DENIED`` one under the
same ``decision_id``, both written whatever the caller's refusal budget (a decision's last record
is its outcome). A genuinely attested caller sending a made-up wrapped key on every call had two
fsync'd records written per call, without limit.

Each caller has :data:`~strongroom.keybroker.refusals.REFUSAL_BURST` such failures of its own (a
refusal :func:`~strongroom.keybroker.refusals.callers_fault` blames on it, after ``ALLOWED``), then
:data:`~strongroom.keybroker.refusals.REFUSAL_RATE` a second. Past that, its releases have the
HSM's re-wrap finished before their ``ALLOWED`` record is written: a key that does not unwrap is
then refused before any record of the decision, as any refusal a caller causes (under its budget
per reason), and one that unwraps is recorded and answered as before, later by the re-wrap's time
(nothing is sent before its record is durable either way). The answer never depends on this: the
replicas of a fleet share one SPIFFE ID, and one bad replica must not get the others refused.
"""

from __future__ import annotations

from collections.abc import Callable

from strongroom.keybroker.refusals import REFUSAL_BURST, REFUSAL_RATE
from strongroom.runtime.ratelimit import CallerBuckets


class UnwrapFirst:
    """Per caller, the failures after ``ALLOWED`` it may cause before its releases unwrap first."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._buckets = CallerBuckets(REFUSAL_RATE, REFUSAL_BURST, clock=clock)

    def applies(self, caller: str) -> bool:
        """Whether ``caller``'s next release waits for its re-wrap before its ``ALLOWED`` record."""
        return not self._buckets.available(caller)

    def failed(self, caller: str) -> None:
        """Counts one release of ``caller`` refused for its own fault after its ``ALLOWED``
        record."""
        self._buckets.take(caller)
