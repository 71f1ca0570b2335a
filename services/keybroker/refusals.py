"""How many refusals of one kind each caller has recorded one by one in the audit log.

A refusal that costs its caller nothing (no valid key id, blob or evidence, no HSM call; an
identity without the role asking for a key) is still an fsync'd audit record: unbounded, one
certified caller could grow the log until ``audit_max_bytes`` refused every decision, key
releases included, with ``AUDIT_LOG_FULL``. So each caller has :data:`REFUSAL_BURST` records at
once, then :data:`REFUSAL_RATE` a second; past that its refusals of that kind are counted, and one
record per :data:`LIMITED_RECORD_SECONDS` says how many went unrecorded since the last; so does the
caller's next refusal recorded on its own (once its budget refilled), so that a caller slowing down
below the rate does not leave its count unwritten for ever. The log still accounts for every
refusal, by number where not one by one: the counts of a caller that stopped while over its
budget are recorded by the broker's own pass once a minute (:meth:`RefusalRecords.take_counts`)
and at shutdown; only a crash loses the last minute's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from strongroom.errors import StrongroomError
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.reasons import Reason
from strongroom.runtime.ratelimit import CallerBuckets
from strongroom.spiffe import is_workload_id

_log = logging.getLogger(__name__)

REFUSAL_BURST = 64
"""Refusals of one kind one caller may have recorded at once, then :data:`REFUSAL_RATE` a second."""
REFUSAL_RATE = 1.0
LIMITED_RECORD_SECONDS = 60.0
"""How often a caller over its rate has a record counting the refusals left unrecorded."""
_MAX_LIMITED = 1024


class RefusalRecords:
    """The per-caller record budget of one kind of refusal (``what``, for the log)."""

    def __init__(self, what: str, clock: Callable[[], float]) -> None:
        self._what = what
        self._clock = clock
        self._buckets = CallerBuckets(REFUSAL_RATE, REFUSAL_BURST, clock=clock)
        # caller -> (when its last counting record was due, refusals unrecorded since)
        self._limited: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def available(self, caller: str) -> bool:
        """Whether ``caller``'s next refusal of this kind may be recorded on its own."""
        return self._buckets.available(caller)

    def spend(self, caller: str) -> bool:
        """Counts one refusal recorded on its own; False (nothing counted) past the budget."""
        return self._buckets.take(caller)

    def take_unrecorded(self, caller: str) -> int | None:
        """For a refusal recorded on its own: how many of ``caller``'s refusals went unrecorded
        since its last counting record (this record carries them), or None when none did."""
        with self._lock:
            entry = self._limited.get(caller)
            if entry is None or entry[1] == 0:
                return None
            # The next counting record stays due when it was: only the count moves to this one.
            self._limited[caller] = (entry[0], 0)
            return entry[1]

    def take_counts(self, *, every: bool = False) -> list[tuple[str, int]]:
        """The callers whose counted refusals are due to be recorded, with their counts, which
        are taken: a counting record is due :data:`LIMITED_RECORD_SECONDS` after the last (or at
        once with ``every``, at shutdown). For callers that stopped while over their budget,
        whose counts no refusal of theirs would ever carry."""
        now = self._clock()
        taken: list[tuple[str, int]] = []
        with self._lock:
            for caller, (since, count) in list(self._limited.items()):
                if count and (every or now - since >= LIMITED_RECORD_SECONDS):
                    taken.append((caller, count))
                    self._limited[caller] = (now, 0)
        return taken

    def unrecorded_if_due(self, caller: str, reason: str) -> int | None:
        """For a refusal past the budget: how many went unrecorded before it when a counting
        record is due now (the caller records it), else None (it is counted for the next)."""
        now = self._clock()
        with self._lock:
            entry = self._limited.get(caller)
            due = entry is None or now - entry[0] >= LIMITED_RECORD_SECONDS
            unrecorded = 0 if entry is None else entry[1]
            self._limited[caller] = (now, 0) if due or entry is None else (entry[0], unrecorded + 1)
            if len(self._limited) > _MAX_LIMITED:
                # Callers no longer limited are forgotten, but not a count not yet recorded:
                # dropping it would leave those refusals out of the log.
                cutoff = now - LIMITED_RECORD_SECONDS
                self._limited = {
                    k: v for k, v in self._limited.items() if v[0] > cutoff or v[1] > 0
                }
        if not due:
            return None
        _log.warning(
            "audited refusals rate-limited",
            extra={
                "what": self._what,
                "caller": caller,
                "reason": reason,
                "unrecorded": unrecorded,
            },
        )
        return unrecorded


def record_counts(
    audit: AuditLog, records: RefusalRecords, action: str, *, every: bool = False
) -> None:
    """Writes one ``REFUSALS_COUNTED`` record for each caller whose counted refusals of this kind
    are due (:meth:`RefusalRecords.take_counts`), its count in ``claims.refusals_unrecorded``. A
    record that cannot be written is logged with its count (the audit log is failing)."""
    for caller, count in records.take_counts(every=every):
        try:
            audit.append(
                AuditEvent(
                    decision=Decision.DENIED,
                    reason=Reason.REFUSALS_COUNTED,
                    action=action,
                    caller_spiffe_id=caller if is_workload_id(caller) else None,
                    claims={"refusals_unrecorded": count},
                )
            )
        except StrongroomError as exc:
            _log.error(
                "cannot record counted refusals",
                extra={"what": action, "caller": caller, "unrecorded": count, "reason": exc.reason},
            )
