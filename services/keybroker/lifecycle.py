"""Key lifecycle as the broker's domain: every change is audited before the caller hears of it.

The gRPC servicers translate protobuf to these calls and back; the decisions (the key must exist
before it gets a policy, a data key is audited before it leaves) live here, where tests reach them
without a transport.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from strongroom.attestation.policy import MAX_POLICY_VERSION_LENGTH
from strongroom.errors import (
    InvalidArgument,
    ResourceExhausted,
    StrongroomError,
    caused_by_caller,
    line_budgeted,
)
from strongroom.keybroker.audit import AuditEvent, AuditLog, AuditRecord, Decision
from strongroom.keybroker.errors import PolicyChanged, PolicyStoreBusy
from strongroom.keybroker.keys import (
    ChangeGate,
    DataKey,
    KeyInfo,
    KeyManager,
    Reaped,
    Rewrapped,
    recordable_key_id,
    require_model,
    validate_key_id,
)
from strongroom.keybroker.policies import LOCK_WAIT, PolicyStore, StoredPolicy
from strongroom.keybroker.refusals import (
    BROKER_REFUSAL_BURST,
    REFUSAL_BURST,
    REFUSAL_RATE,
    RefusalRecords,
    log_unaudited,
    record_counts,
)
from strongroom.keybroker.release import Caller
from strongroom.reasons import Reason
from strongroom.runtime.metrics import DATA_KEYS_REWRAPPED

_log = logging.getLogger(__name__)


def _naming(policy: StoredPolicy | None) -> dict[str, object]:
    """The fields naming the policy document that judged a decision (none when none did)."""
    if policy is None:
        return {}
    return {"policy_version": policy.policy.version, "policy_sha256": policy.sha256}


def _unrecorded_refusal(action: str, refusal: StrongroomError, failure: StrongroomError) -> None:
    """Logs a refusal the audit log would not take (full, failing, tampered with): its caller
    still hears the refusal itself, and the record's count is carried by the next one."""
    log_unaudited(
        _log,
        f"refused {action}",
        refusal.reason,
        budgeted=line_budgeted(refusal),
        audit_failure=failure.reason,
    )


def _check_expected_version(expected: str) -> None:
    """A compare-and-swap's expected version, which its records carry: a policy version's rule."""
    if len(expected) > MAX_POLICY_VERSION_LENGTH or not expected.isprintable():
        raise InvalidArgument(
            f"expected_policy_version: must be at most {MAX_POLICY_VERSION_LENGTH} printable "
            "characters (a policy version)",
            reason=Reason.POLICY_BAD_VALUE,
        )


def _with_live(claims: Mapping[str, object], refusal: StrongroomError) -> Mapping[str, object]:
    """``claims`` and, for a refused compare-and-swap, the live version it met ("" for none)."""
    if not isinstance(refusal, PolicyChanged):
        return claims
    return {**claims, "live_policy_version": refusal.live_version or ""}


class _RefusalBudget:
    """The refusals of one RPC a caller may have recorded (:class:`RefusalRecords`), and the
    refusal past them; and those the broker caused (an HSM outage, a policy that does not load, a
    damaged key), with a budget of their own per caller and reason, counted past it (the caller
    is answered with its refusal either way)."""

    def __init__(self, what: str, reason: Reason, clock: Callable[[], float]) -> None:
        self._what = what
        self._reason = reason
        self._records = RefusalRecords(what, clock)
        self._broker = RefusalRecords(
            f"{what} refused for the broker's failures",
            clock,
            per_reason=True,
            burst=BROKER_REFUSAL_BURST,
        )

    def broker_failure(self, caller: Caller, reason: str) -> tuple[int | None, int] | None:
        """For a refusal the broker caused: None when it is only counted (past its budget);
        else the count of those left unrecorded its record carries (None: none), and how many
        refusals to count again should the log refuse that record."""
        who = caller.spiffe_id
        if self._broker.spend(who, reason):
            pending = self._broker.take_unrecorded(who, reason)
            return pending, 1 + (pending or 0)
        unrecorded = self._broker.unrecorded_if_due(who, reason)
        return None if unrecorded is None else (unrecorded, 1 + unrecorded)

    def count_broker_failures(self, caller: Caller, reason: str, count: int) -> None:
        """Counts again ``count`` refusals the broker caused whose record the log refused."""
        self._broker.count_unrecorded(caller.spiffe_id, reason, count)

    def spend(self, caller: Caller) -> None:
        """Counts one recorded refusal of ``caller``."""
        self._records.spend(caller.spiffe_id)

    def take_unrecorded(self, caller: Caller) -> int | None:
        """For a refusal of ``caller`` recorded on its own: the count of those that went
        unrecorded since its last counting record, if any (they go on this one)."""
        return self._records.take_unrecorded(caller.spiffe_id)

    def count_unrecorded(self, caller: Caller, count: int) -> None:
        """Counts again ``count`` refusals whose record the audit log refused."""
        self._records.count_unrecorded(caller.spiffe_id, count=count)

    def record_counts(self, audit: AuditLog, action: str, *, every: bool) -> None:
        """Records the due counts of callers that stopped while over this budget."""
        record_counts(audit, self._records, action, every=every)
        record_counts(audit, self._broker, action, every=every)

    def over(self, caller: Caller) -> tuple[ResourceExhausted, int | None] | None:
        """None while ``caller`` may still be refused on the record; else the refusal to raise
        and, when it is due to be recorded, how many went unrecorded since the last record."""
        if self._records.available(caller.spiffe_id):
            return None
        refusal = ResourceExhausted(
            f"more than {REFUSAL_BURST} refused {self._what} at once, or more than "
            f"{REFUSAL_RATE:g} a second after that, from this caller; retry later",
            reason=self._reason,
        )
        return refusal, self._records.unrecorded_if_due(caller.spiffe_id, self._reason)


_TURN_POLL = 0.05
"""Seconds between two looks at a waiting policy change's caller while it waits for its turn."""


def _take_turn(
    lock: threading.Lock, deadline: float, still_wanted: Callable[[], None] | None
) -> bool:
    """Takes ``lock`` by ``deadline`` (monotonic): False once it passed. Between two tries,
    ``still_wanted`` may call the wait off (what it raises): a caller whose deadline passed kept
    a control-plane worker waiting for the whole bound, then had its change recorded ALLOWED."""
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        if still_wanted is None:
            return lock.acquire(timeout=remaining)
        if lock.acquire(timeout=min(remaining, _TURN_POLL)):
            return True
        if time.monotonic() >= deadline:
            return False
        still_wanted()


class KeyService:
    """Creates, rotates and disables keys, sets policies and issues data keys, auditing each."""

    def __init__(
        self,
        keys: KeyManager,
        policies: PolicyStore,
        audit: AuditLog,
        *,
        clock: Callable[[], float] = time.monotonic,
        policy_lock_wait: float = LOCK_WAIT,
    ) -> None:
        self._keys = keys
        self._policies = policies
        self._audit = audit
        self._rewrap_refusals = _RefusalBudget(
            "re-wraps", Reason.REWRAP_REFUSALS_RATE_LIMITED, clock
        )
        self._data_key_refusals = _RefusalBudget(
            "data keys", Reason.DATA_KEY_REFUSALS_RATE_LIMITED, clock
        )
        # key_id -> the lock a policy change of that key holds from its record to its file (one per
        # existing key: a lock is made only once the key was found in the HSM).
        self._policy_locks: dict[str, threading.Lock] = {}
        self._policy_locks_guard = threading.Lock()
        # The most a policy change waits for its turn, here and at the directory's lock.
        self._policy_lock_wait = policy_lock_wait

    def _policy_lock(self, key_id: str) -> threading.Lock:
        with self._policy_locks_guard:
            return self._policy_locks.setdefault(key_id, threading.Lock())

    def _record(
        self,
        caller: Caller,
        action: str,
        key_id: str | None,
        reason: str | None = None,
        decision: Decision = Decision.ALLOWED,
        **extra: object,
    ) -> AuditRecord:
        return self._audit.append(
            AuditEvent(
                decision=decision,
                reason=reason or action.upper(),
                action=action,
                caller_spiffe_id=caller.spiffe_id,
                caller_cert_serial=f"{caller.serial:x}",
                key_id=key_id,
                **extra,  # type: ignore[arg-type]
            )
        )

    def record_counted_refusals(self, *, every: bool = False) -> None:
        """Records the due counts of refused ReWrap and GenerateDataKey calls past their callers'
        budgets (all with ``every``, at shutdown)."""
        self._rewrap_refusals.record_counts(self._audit, "rewrap", every=every)
        self._data_key_refusals.record_counts(self._audit, "generate_data_key", every=every)

    def policy_version(self, key_id: str) -> str:
        """The version of the key's release policy, or "" when it has none."""
        return self._policies.version(key_id)

    def _gate(self, caller: Caller, action: str, key_id: str) -> ChangeGate:
        """The gate a key change passes on the HSM worker: its record is written there, right
        before the token is changed (a change whose record fails is not made, and one that
        outlives its caller's wait is recorded or not made at all); a change that then fails is
        recorded as refused under the same decision id. An abandoned attempt a creation destroys
        on its way is recorded too (``reap_key_claim``, ``ABANDONED_KEY_CLAIM``, naming the
        object and its age), before it is destroyed: a record refused leaves it in place."""
        decision: list[str] = []
        version: list[int | None] = []

        def before(changed: int | None) -> None:
            record = self._record(caller, action, key_id, key_version=changed)
            decision.append(record.decision_id)
            version.append(changed)

        def failed(exc: BaseException) -> None:
            reason = exc.reason if isinstance(exc, StrongroomError) else Reason.HSM_OPERATION_FAILED
            try:
                self._record(
                    caller,
                    action,
                    key_id,
                    reason=reason,
                    decision=Decision.DENIED,
                    key_version=version[0],
                    decision_id=decision[0],
                )
            except StrongroomError as audit_error:  # the change's own error is what is raised
                _log.error(
                    "the refusal of a recorded key change could not be recorded",
                    extra={"key_id": key_id, "action": action, "reason": audit_error.reason},
                )

        def reaped(what: Reaped) -> None:
            self._record(
                caller,
                "reap_key_claim",
                what.key_id,
                reason=Reason.ABANDONED_KEY_CLAIM,
                key_version=what.version,
                claims={"object": what.kind, "label": what.label, "age_ms": what.age_ms},
            )

        return ChangeGate(before, failed, reaped)

    def create_key(self, caller: Caller, key_id: str) -> KeyInfo:
        """Creates a KEK (version 1) in the HSM, recorded as it is published."""
        validate_key_id(key_id)
        return self._keys.create_key(key_id, gate=self._gate(caller, "create_key", key_id))

    def list_keys(self) -> list[KeyInfo]:
        """Every key and its versions."""
        return self._keys.list_keys()

    def rotate_key(self, caller: Caller, key_id: str) -> KeyInfo:
        """Adds a new current version; older versions keep unwrapping. Recorded with the new
        version as it is published."""
        validate_key_id(key_id)
        return self._keys.rotate_key(key_id, gate=self._gate(caller, "rotate_key", key_id))

    def disable_key(self, caller: Caller, key_id: str, version: int | None) -> KeyInfo:
        """Disables one version, or every version when ``version`` is None; recorded before the
        token is changed."""
        validate_key_id(key_id)
        return self._keys.disable_key(
            key_id, version or "all", gate=self._gate(caller, "disable_key", key_id)
        )

    def set_policy(
        self,
        caller: Caller,
        key_id: str,
        document: str,
        *,
        expected_version: str | None = None,
        still_wanted: Callable[[], None] | None = None,
    ) -> StoredPolicy:
        """Validates and stores the release policy of an existing key.

        The change is recorded before it takes effect (a policy is live for every replica the
        moment its file is written, so a change whose record failed would be live unrecorded);
        should storing it fail after that, a ``DENIED`` record with the same decision id follows:
        a decision's last record is its outcome, as for key releases.

        Two changes of one key's policy are serialised from the record to the written file: run
        side by side, the later record could precede the other's file, so the log's last change
        named a policy that was not the live one. That lock is this process's; the check of the
        live policy and the write are also one critical section across every process sharing the
        policy directory (:meth:`PolicyStore.write`), so the rules below hold across replicas,
        each of which records the changes it makes in its own log before they are written.

        ``expected_version`` makes the change a compare-and-swap: it is made only while the live
        policy is at that version ("": while the key has none). Otherwise it is refused,
        :class:`PolicyChanged` (FailedPrecondition, POLICY_CHANGED) naming the live version,
        nothing is stored, and the refusal is recorded (``DENIED``, with the expected and live
        versions in its claims): the attempt lost a race with another change, which an auditor
        reconstructing who changed what needs to see. Refused before its record when the live
        policy already differs, it has one ``DENIED`` record; refused by the check repeated
        under the directory's lock (another replica's change in between), its ``ALLOWED``
        record is followed by a ``DENIED`` one under the same decision id, as a failed write is.

        A new document must carry a new version: release records name the policy that judged
        them only by its version, so a policy loosened under the version it had (or any other
        edit) would make every record of that version ambiguous. The same document again is
        accepted (a retry); another one under the live version is refused,
        FailedPrecondition(POLICY_VERSION_REUSED), unrecorded like an invalid document (checked
        again under the directory's lock: recorded then, after the change's record). Each record
        also carries the document's SHA-256 (``policy_sha256``, as release records do).

        ``still_wanted`` (the caller is still waiting: its call is active, its deadline not past)
        is asked while the change waits for its turn behind this broker's other change of the key
        (what it raises refuses the change then, unrecorded: nothing was attempted), while it
        waits for the directory's lock and, under it, just before the write
        (:meth:`PolicyStore.write`); what it raises there refuses the change, nothing stored,
        recorded ``DENIED`` after its ``ALLOWED`` record as a failed write is.
        """
        if expected_version:
            _check_expected_version(expected_version)
        self._keys.describe_key(key_id)  # NotFound for a key that does not exist
        stored = self._policies.check(key_id, document)
        version = stored.policy.version
        claims: dict[str, object] = (
            {} if expected_version is None else {"expected_policy_version": expected_version}
        )
        # One bound for the whole wait, this process's other change of the key included: waited
        # for unbounded, each change queued behind a holder stuck on the directory's lock added
        # its own wait, and a few of them held every control-plane worker for minutes.
        deadline = time.monotonic() + self._policy_lock_wait
        lock = self._policy_lock(key_id)
        if not _take_turn(lock, deadline, still_wanted):
            raise PolicyStoreBusy(
                f"cannot store the policy of {key_id!r}: another change of it on this broker did "
                f"not finish within {self._policy_lock_wait:g} s; nothing was stored, retry"
            )
        try:
            try:
                # Before the record, so that a change that is already stale is not recorded as
                # allowed first; repeated under the directory's lock by the write.
                self._policies.refuse_conflict(key_id, stored, expected_version)
            except PolicyChanged as exc:
                self._record_refused_change(caller, key_id, stored, exc, claims)
                raise
            record = self._record(
                caller,
                "set_release_policy",
                key_id,
                policy_version=version,
                policy_sha256=stored.sha256,
                claims=claims,
            )
            try:
                return self._policies.write(
                    key_id,
                    stored,
                    expected_version=expected_version,
                    lock_wait=max(0.0, deadline - time.monotonic()),
                    still_wanted=still_wanted,
                )
            except StrongroomError as exc:
                self._record(
                    caller,
                    "set_release_policy",
                    key_id,
                    reason=exc.reason,
                    decision=Decision.DENIED,
                    policy_version=version,
                    policy_sha256=stored.sha256,
                    decision_id=record.decision_id,
                    claims=_with_live(claims, exc),
                )
                raise
        finally:
            lock.release()

    def _record_refused_change(
        self,
        caller: Caller,
        key_id: str,
        stored: StoredPolicy,
        refusal: PolicyChanged,
        claims: Mapping[str, object],
    ) -> None:
        """Records a compare-and-swap refused before its change was recorded; should the log
        refuse the record, the caller still hears its refusal (as every audited refusal is)."""
        try:
            self._record(
                caller,
                "set_release_policy",
                key_id,
                reason=refusal.reason,
                decision=Decision.DENIED,
                policy_version=stored.policy.version,
                policy_sha256=stored.sha256,
                claims=_with_live(claims, refusal),
            )
        except StrongroomError as exc:
            _unrecorded_refusal("set_release_policy", refusal, exc)

    def get_policy(self, key_id: str) -> StoredPolicy:
        """The key's stored release policy: FailedPrecondition(NO_RELEASE_POLICY) when the key
        has none, NotFound(KEY_NOT_FOUND) when there is no such key (it answered "no policy" for
        a key that does not exist, which an admin reads as a key waiting for one)."""
        try:
            return self._policies.get(key_id, judge=False)  # shown, not judged by
        except StrongroomError as exc:
            if exc.reason == Reason.NO_RELEASE_POLICY:
                self._keys.describe_key(key_id)
            raise

    def generate_data_key(
        self, caller: Caller, key_id: str, model_name: str, model_version: str
    ) -> DataKey:
        """A fresh data key bound to ``model_name``/``model_version`` and its wrapped form; the
        caller must wipe it. Audited first, with the model it was bound to; so is a refusal, the
        HSM side's (KEY_NOT_FOUND, KEY_DISABLED, ...) as the policy's.

        When the key's release policy lists ``publishers``, only those may get data keys under
        it, each for its model names; a refusal is audited (PermissionDenied). A key without a
        policy (nothing can be released under it yet) or a policy without ``publishers``
        admits every publisher; a policy that cannot be read admits none."""
        judged_by = self._check_publisher(caller, key_id, model_name, model_version)
        try:
            data_key = self._keys.generate_data_key(key_id, model_name, model_version)
        except StrongroomError as exc:
            # The HSM side's refusals (no such key, a disabled current version, the HSM down)
            # were raised unrecorded: only the policy's were in the log.
            self._record_refusal(
                self._data_key_refusals,
                caller,
                "generate_data_key",
                key_id=key_id,
                refusal=exc,
                claims={"model_name": model_name, "model_version": model_version},
                **_naming(judged_by),
            )
            raise
        try:
            self._record(
                caller,
                "generate_data_key",
                data_key.key_id,
                reason=Reason.DATA_KEY_GENERATED,
                key_version=data_key.version,
                claims={"model_name": model_name, "model_version": model_version},
                policy_version=None if judged_by is None else judged_by.policy.version,
                policy_sha256=None if judged_by is None else judged_by.sha256,
            )
        except BaseException:
            data_key.wipe()
            raise
        return data_key

    def _check_publisher(
        self, caller: Caller, key_id: str, model_name: str, model_version: str
    ) -> StoredPolicy | None:
        """The policy that admitted ``caller`` (None: the key has none), or the refusal, recorded
        naming the policy that refused it."""
        # What the caller got wrong is answered as before, unaudited: the policy is asked only
        # about a well-formed request.
        validate_key_id(key_id)
        require_model(model_name, model_version)
        claims = {"model_name": model_name, "model_version": model_version}
        over = self._over_budget(
            self._data_key_refusals, caller, "generate_data_key", key_id, claims
        )
        if over is not None:
            raise over
        judged_by: StoredPolicy | None = None
        try:
            judged_by = self._policies.get(key_id)
        except StrongroomError as exc:
            if exc.reason == Reason.NO_RELEASE_POLICY:
                return None
            self._policies.does_not_load(key_id, exc)  # the operator's line, once then counted
            refusal: StrongroomError = exc
        else:
            try:
                judged_by.policy.check_publisher(caller.spiffe_id, model_name)
                return judged_by
            except StrongroomError as exc:
                refusal = exc
        self._record_refusal(
            self._data_key_refusals,
            caller,
            "generate_data_key",
            key_id=key_id,
            refusal=refusal,
            claims=claims,
            **_naming(judged_by),
        )
        raise refusal

    def rewrap(self, caller: Caller, key_id: str, version: int, wrapped: bytes) -> Rewrapped:
        """Moves a wrapped data key to the key's current KEK version, inside the HSM.

        Every re-wrap is audited with the versions it moved between (never the key); so is every
        refusal, since a burst of failed unwraps is what a forged key slot looks like, up to
        :data:`REFUSAL_BURST` per caller and then :data:`REFUSAL_RATE` a second. Beyond that
        the caller is refused at once, ResourceExhausted(REWRAP_REFUSALS_RATE_LIMITED), recorded
        once per :data:`LIMITED_RECORD_SECONDS` with how many went unrecorded.
        """
        # A malformed id is the caller's: recorded as none (it would invalidate the record).
        recorded = recordable_key_id(key_id)
        refusal = self._over_budget(
            self._rewrap_refusals, caller, "rewrap", recorded, {"from_key_version": version}
        )
        if refusal is not None:
            known = recorded if recorded is not None and self._keys.known(recorded) else None
            DATA_KEYS_REWRAPPED.add(1, {"key_id": known or "", "outcome": refusal.reason})
            raise refusal
        try:
            rewrapped = self._keys.rewrap(key_id, version, wrapped)
        except StrongroomError as exc:
            self._record_refusal(
                self._rewrap_refusals,
                caller,
                "rewrap",
                key_id=recorded,
                refusal=exc,
                claims={"from_key_version": version},
            )
            # Only a key known to exist is a label: any number of made-up ids would push the real
            # keys' series into the SDK's overflow bucket. Not "any reason but KEY_NOT_FOUND": a
            # made-up id with version 0 (the proto default) or a blob of the wrong length is
            # refused before the HSM is asked whether the key exists.
            known = recorded if recorded is not None and self._keys.known(recorded) else None
            DATA_KEYS_REWRAPPED.add(1, {"key_id": known or "", "outcome": exc.reason})
            raise
        self._record(
            caller,
            "rewrap",
            key_id,
            reason=Reason.DATA_KEY_REWRAPPED,
            key_version=rewrapped.version,
            claims={"from_key_version": version},
        )
        DATA_KEYS_REWRAPPED.add(1, {"key_id": key_id, "outcome": "rewrapped"})
        return rewrapped

    def _over_budget(
        self,
        budget: _RefusalBudget,
        caller: Caller,
        action: str,
        key_id: str | None,
        claims: Mapping[str, object],
    ) -> ResourceExhausted | None:
        """The refusal for a caller past ``budget`` (None while within it), recorded when a
        counting record is due, with the count of those left unrecorded since the last."""
        limited = budget.over(caller)
        if limited is None:
            return None
        refusal, unrecorded = limited
        if unrecorded is not None:
            try:
                self._refused_on_record(
                    caller, action, key_id, refusal, {**claims, "refusals_unrecorded": unrecorded}
                )
            except StrongroomError as exc:
                # The log refused it: this refusal and its count are counted again.
                budget.count_unrecorded(caller, unrecorded + 1)
                _unrecorded_refusal(action, refusal, exc)
        return refusal

    def _record_refusal(
        self,
        budget: _RefusalBudget,
        caller: Caller,
        action: str,
        *,
        key_id: str | None,
        refusal: StrongroomError,
        claims: Mapping[str, object],
        **extra: object,
    ) -> None:
        """Records ``refusal`` on its own (with ``extra`` fields), spending one of ``caller``'s
        budget when the refusal is its own (:func:`~strongroom.errors.caused_by_caller`), else one
        of its budget for the broker's failures of that reason (past which it is only counted, and
        recorded with the count when a counting record is due: each was a record outside any budget,
        at the caller's pace), with the count of those left unrecorded since the last counting
        record; should the log refuse the record, that count and this refusal are counted again, not
        lost, and the failure logged: the caller is answered with its refusal either way, as a
        refused key release is (one rule for every refusal the broker audits)."""
        budgeted = caused_by_caller(refusal)
        if not budgeted:
            turn = budget.broker_failure(caller, refusal.reason)
            if turn is None:
                return  # counted
            pending, again = turn
        else:
            budget.spend(caller)
            pending = budget.take_unrecorded(caller)
            again = (pending or 0) + 1
        try:
            self._refused_on_record(
                caller,
                action,
                key_id,
                refusal,
                claims if pending is None else {**claims, "refusals_unrecorded": pending},
                **extra,
            )
        except StrongroomError as exc:
            if budgeted:
                budget.count_unrecorded(caller, again)
            else:
                budget.count_broker_failures(caller, refusal.reason, again)
            _unrecorded_refusal(action, refusal, exc)

    def _refused_on_record(
        self,
        caller: Caller,
        action: str,
        key_id: str | None,
        refusal: StrongroomError,
        claims: Mapping[str, object],
        **extra: object,
    ) -> None:
        self._record(
            caller,
            action,
            key_id,
            reason=refusal.reason,
            decision=Decision.DENIED,
            claims=claims,
            **extra,
        )
