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
and at shutdown; only a crash loses the last minute's. A record the audit log refuses (full,
failing) does not lose the count it carried, nor its refusal when budgeted: they are counted again
(:meth:`RefusalRecords.count_unrecorded`) for the caller's next counting record.

A budget is per caller, or per caller and reason (``per_reason``: refused key releases, whether
their request was read or not, where an operator needs the first records of each reason in full
and then a count per reason, and where one flood of one reason must not leave another reason
unrecorded). Per reason, a caller's refusals of all reasons together also stay within
:data:`REASONS_PER_CALLER` reasons' budgets; past that they are counted per reason, and the first
refusal of a reason past its caller's budget is still recorded in full (with the count, 0): every
reason a caller provokes has its first refusal in full, and one a minute while it goes on. Refusals the broker caused
(:func:`~strongroom.errors.caused_by_caller` false: an HSM outage, collateral it cannot fetch or
holds back while a fetch is backed off, a stored policy that does not load, a bug) have a budget of
their own, :data:`BROKER_REFUSAL_BURST` per caller and reason, then the same rate: unbudgeted, every
report naming a chip whose VCEK fetch was backed off (forged or not) was a record at its caller's
pace. Their own budget, larger and apart from the caller's: an outage's first refusals are each
recorded in full (what an operator must see), and a genuine caller refused through an outage has its
own budget untouched once it ends.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from strongroom.errors import REFUSAL_LINE, StrongroomError
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.reasons import Reason
from strongroom.runtime.log_refusals import by_caller_and_reason
from strongroom.runtime.ratelimit import CallerBuckets
from strongroom.spiffe import is_workload_id

_log = logging.getLogger(__name__)

REFUSAL_BURST = 64
"""Refusals of one kind one caller may have recorded at once, then :data:`REFUSAL_RATE` a second."""
REFUSAL_RATE = 1.0
BROKER_REFUSAL_BURST = 256
"""Refusals of one reason the broker caused that one caller may have recorded at once (then
:data:`REFUSAL_RATE` a second): a fleet's first few retries through an outage, each in full."""
LIMITED_RECORD_SECONDS = 60.0
"""How often a caller over its rate has a record counting the refusals left unrecorded."""
REASONS_PER_CALLER = 4
"""With a budget per reason, how many reasons' budgets one caller's refusals of every reason have
together (256 at once, then 4 a second): a caller cycling through the catalogue's reasons would
otherwise have each reason's budget, over a hundred records a second."""
_MAX_LIMITED = 1024


def log_unaudited(
    log: logging.Logger, refused: str, reason: str, *, budgeted: bool, **fields: object
) -> None:
    """Logs, to the refusing module's ``log``, a refusal (``refused``: ``denied key release``,
    ``refused generate_data_key``; its ``reason``) the audit log would not record: a WARNING,
    within its caller's budget of refusal lines when ``budgeted``
    (:func:`~strongroom.errors.line_budgeted`). The audit
    log's failure has its own line (an outage's bounded ERROR, a tamper's CRITICAL when found);
    an ERROR here per refused call let a caller flood the log while the disk was full. One rule
    for every refusal the broker audits, the key release's and the key service's alike."""
    log.warning(
        "could not audit a %s",
        refused,
        extra={"reason": reason, **fields, REFUSAL_LINE: budgeted},
    )


class RefusalRecords:
    """The per-caller record budget of one kind of refusal (``what``, for the log); with
    ``per_reason``, one budget per caller and reason; ``burst`` records at once (then
    :data:`REFUSAL_RATE` a second)."""

    def __init__(
        self,
        what: str,
        clock: Callable[[], float],
        *,
        per_reason: bool = False,
        burst: int = REFUSAL_BURST,
    ) -> None:
        self._what = what
        self._clock = clock
        self._per_reason = per_reason
        self._buckets = CallerBuckets(REFUSAL_RATE, burst, clock=clock)
        # Per reason, every reason of a caller together too (see REASONS_PER_CALLER).
        self._callers = (
            CallerBuckets(
                REFUSAL_RATE * REASONS_PER_CALLER, burst * REASONS_PER_CALLER, clock=clock
            )
            if per_reason
            else None
        )
        # (caller, reason or "") -> (when its last counting record was due, refusals unrecorded
        # since)
        self._limited: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def _key(self, caller: str, reason: str) -> tuple[str, str]:
        return (caller, reason if self._per_reason else "")

    def _bucket(self, caller: str, reason: str) -> str:
        # A space is in neither a SPIFFE ID nor a reason code: the pair cannot collide.
        return f"{caller} {reason}" if self._per_reason else caller

    def available(self, caller: str, reason: str = "") -> bool:
        """Whether ``caller``'s next refusal of this kind (and ``reason``, per reason) may be
        recorded on its own."""
        return self._buckets.available(self._bucket(caller, reason)) and (
            self._callers is None or self._callers.available(caller)
        )

    def spend(self, caller: str, reason: str = "") -> bool:
        """Counts one refusal recorded on its own; False (nothing counted) past the budget."""
        bucket = self._bucket(caller, reason)
        if self._callers is None:
            return self._buckets.take(bucket)
        if not self._callers.available(caller) or not self._buckets.take(bucket):
            return False
        if not self._callers.take(caller):  # another refusal of the caller took the last one
            self._buckets.refund(bucket)
            return False
        return True

    def take_unrecorded(self, caller: str, reason: str = "") -> int | None:
        """For a refusal recorded on its own: how many of ``caller``'s refusals (of ``reason``,
        per reason) went unrecorded since its last counting record (this record carries them),
        or None when none did."""
        key = self._key(caller, reason)
        with self._lock:
            entry = self._limited.get(key)
            if entry is None or entry[1] == 0:
                return None
            # The next counting record stays due when it was: only the count moves to this one.
            self._limited[key] = (entry[0], 0)
            return entry[1]

    def count_unrecorded(self, caller: str, reason: str = "", count: int = 1) -> None:
        """Counts ``count`` refusals of ``caller`` (of ``reason``, per reason) that a record the
        audit log refused was to carry, or to be: they go on the caller's next counting record
        instead of being lost (a full log, a failing disk: what a flood brings about)."""
        if count <= 0:
            return
        key = self._key(caller, reason)
        with self._lock:
            since, unrecorded = self._limited.get(key, (self._clock(), 0))
            self._limited[key] = (since, unrecorded + count)

    def take_counts(self, *, every: bool = False) -> list[tuple[str, str | None, int]]:
        """The callers whose counted refusals are due to be recorded, each with the reason
        counted (per reason; else None) and the count, which is taken: a counting record is due
        :data:`LIMITED_RECORD_SECONDS` after the last (or at once with ``every``, at shutdown).
        For callers that stopped while over their budget, whose counts no refusal of theirs
        would ever carry."""
        now = self._clock()
        taken: list[tuple[str, str | None, int]] = []
        with self._lock:
            for (caller, reason), (since, count) in list(self._limited.items()):
                if count and (every or now - since >= LIMITED_RECORD_SECONDS):
                    taken.append((caller, reason if self._per_reason else None, count))
                    self._limited[(caller, reason)] = (now, 0)
        return taken

    def unrecorded_if_due(self, caller: str, reason: str) -> int | None:
        """For a refusal past the budget: how many went unrecorded before it when a counting
        record is due now (the caller records it), else None (it is counted for the next)."""
        now = self._clock()
        key = self._key(caller, reason)
        with self._lock:
            entry = self._limited.get(key)
            due = entry is None or now - entry[0] >= LIMITED_RECORD_SECONDS
            unrecorded = 0 if entry is None else entry[1]
            self._limited[key] = (now, 0) if due or entry is None else (entry[0], unrecorded + 1)
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
    """Writes one ``REFUSALS_COUNTED`` record for each caller (and reason, per reason) whose
    counted refusals of this kind are due (:meth:`RefusalRecords.take_counts`), its count in
    ``claims.refusals_unrecorded`` and, per reason, the reason counted in
    ``claims.counted_reason``; the count of a bucket callers share (every role-less caller's:
    :data:`~strongroom.runtime.callers.ROLELESS`) names it in ``claims.refusals_bucket`` and no
    caller. Once the audit log refuses a record (it is failing), that count and every count
    after it are kept for a later pass, untried, and one ERROR says how many: a line per caller
    and reason let callers set the number of ERRORs each pass wrote through an audit outage.
    ``every`` is the last pass (the broker stops): none comes after it, so its ERROR says the
    counts are not recorded and names the largest by caller and reason (as the runtime's
    :func:`~strongroom.runtime.log_refusals.by_caller_and_reason` does),
    the only trace of whose refusals went unrecorded."""
    due = records.take_counts(every=every)
    failure: StrongroomError | None = None
    for index, (caller, counted, count) in enumerate(due):
        try:
            _record_count(audit, action, caller, counted, count)
        except StrongroomError as exc:
            failure = exc
            break
        except BaseException:
            # A bug, or what a signal raised here: the counts taken and not written go back for
            # the next pass (they were lost with this one).
            _keep(records, due[index:])
            raise
    if failure is None:
        return
    # Taken before their records were written: kept, or those refusals would leave no trace.
    kept = _keep(records, due[index:])
    fields: dict[str, object] = {
        "what": action,
        "counts": len(kept),
        "unrecorded": kept.total(),
        "reason": failure.reason,
    }
    if not every:
        _log.error("cannot record counted refusals; kept for a later pass", extra=fields)
        return
    _log.error(
        "cannot record counted refusals; the broker stops with them unrecorded",
        extra={**fields, **by_caller_and_reason(kept)},
    )


def _keep(
    records: RefusalRecords, counts: list[tuple[str, str | None, int]]
) -> Counter[tuple[str, str]]:
    """Counts ``counts`` (taken for records not written) again, for the next pass; returns them
    by caller and reason."""
    kept: Counter[tuple[str, str]] = Counter()
    for caller, counted, count in counts:
        records.count_unrecorded(caller, counted or "", count)
        kept[(caller, counted or "")] += count
    return kept


def _record_count(
    audit: AuditLog, action: str, caller: str, counted: str | None, count: int
) -> None:
    claims: dict[str, object] = {"refusals_unrecorded": count}
    if counted is not None:
        claims["counted_reason"] = counted
    if not is_workload_id(caller):  # a bucket callers share (role-less ones): named
        claims["refusals_bucket"] = caller
    audit.append(
        AuditEvent(
            decision=Decision.DENIED,
            reason=Reason.REFUSALS_COUNTED,
            action=action,
            caller_spiffe_id=caller if is_workload_id(caller) else None,
            claims=claims,
        )
    )
