"""Which callers' key releases have the HSM's verdict on their wrapped data key before their
``ALLOWED`` record.

A release's re-wrap starts once its ``ALLOWED`` record has its place in the log (the HSM works
while the record is synced), so a wrapped data key that does not unwrap (``WRAPPED_KEY_INVALID``)
is found after the decision was recorded: an ``ALLOWED`` record, then a ``DENIED`` one under the
same ``decision_id``, both written whatever the caller's refusal budget (a decision's last record
is its outcome). A genuinely attested caller sending a made-up wrapped key on every call had two
fsync'd records written per call, without limit.

Each caller's certificate has :data:`~strongroom.keybroker.refusals.REFUSAL_BURST` such failures
of its own (a refusal :func:`~strongroom.errors.caused_by_caller` blames on it, after
``ALLOWED``), then :data:`~strongroom.keybroker.refusals.REFUSAL_RATE` a second; its SPIFFE ID,
:data:`~strongroom.keybroker.refusals.REASONS_PER_CALLER` times that over all its certificates.
Past either, its releases have the HSM's re-wrap finished before their ``ALLOWED`` record is
written: a key that does not unwrap is then refused before any record of the decision, as any
refusal a caller causes (under its budget per reason), and one that unwraps is recorded and
answered as before, later by the re-wrap's time (nothing is sent before its record is durable
either way). The answer never depends on this.

Per certificate first: the replicas of a fleet share one SPIFFE ID, and one bad replica keyed by
it put the whole fleet's releases on the slower path. Per SPIFFE ID too: a replica holding its
service's provisioner can mint certificates, each with failures of its own; a bad replica that
does not gets no further than its own path (its failures after ``ALLOWED`` stop once it unwraps
first, then come at its certificate's rate, below its SPIFFE ID's). Each switch to the slower
path is logged (a WARNING, within its caller's log budget) with the certificate's serial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from strongroom.errors import REFUSAL_LINE
from strongroom.keybroker.refusals import REASONS_PER_CALLER, REFUSAL_BURST, REFUSAL_RATE
from strongroom.runtime.callers import MAX_CERTIFICATES_TRACKED, certificate_bucket
from strongroom.runtime.ratelimit import CallerBuckets

_log = logging.getLogger(__name__)


class UnwrapFirst:
    """Per caller certificate and SPIFFE ID, the failures after ``ALLOWED`` it may cause before
    its releases unwrap first. A certificate is named by its SPIFFE ID and serial."""

    def __init__(self, clock: Callable[[], float]) -> None:
        # At most so many certificates (a replica may mint them): one forgotten starts again at
        # 64, within its SPIFFE ID's bound.
        self._certificates = CallerBuckets(
            REFUSAL_RATE, REFUSAL_BURST, clock=clock, max_tracked=MAX_CERTIFICATES_TRACKED
        )
        self._identities = CallerBuckets(
            REFUSAL_RATE * REASONS_PER_CALLER, REFUSAL_BURST * REASONS_PER_CALLER, clock=clock
        )

    def certificates_tracked(self) -> int:
        """How many caller certificates it remembers now (at most
        :data:`~strongroom.runtime.callers.MAX_CERTIFICATES_TRACKED`)."""
        return len(self._certificates)

    def applies(self, spiffe_id: str, serial: int) -> bool:
        """Whether this caller's next release waits for its re-wrap before its ``ALLOWED``
        record."""
        return not (
            self._certificates.available(certificate_bucket(spiffe_id, serial))
            and self._identities.available(spiffe_id)
        )

    def failed(self, spiffe_id: str, serial: int) -> None:
        """Counts one release of this caller refused for its own fault after its ``ALLOWED``
        record; logs the switch when it puts the caller's releases on the slower path."""
        before = self.applies(spiffe_id, serial)
        self._certificates.take(certificate_bucket(spiffe_id, serial))
        self._identities.take(spiffe_id)
        if before or not self.applies(spiffe_id, serial):
            return
        fleet = not self._identities.available(spiffe_id)
        _log.warning(
            "key releases of a caller are re-wrapped before their record: too many of its "
            "wrapped data keys failed after ALLOWED; its answers are slower, not changed",
            extra={
                "caller": spiffe_id,
                "caller_cert_serial": f"{serial:x}",
                # Every certificate of the SPIFFE ID (a whole fleet), or this one only.
                "scope": "spiffe_id" if fleet else "certificate",
                REFUSAL_LINE: True,
            },
        )
