"""The key-release decision: challenge, evidence, binding, policy, HSM re-wrap, audit.

Every decision, allowed or denied, is audited with its reason before the caller hears of it. An
allowed release whose audit record cannot be made durable is refused: the wrapped key is dropped.
The data key itself never leaves the HSM in plaintext: the HSM unwraps it with the KEK and wraps it
to the ephemeral RSA key the attestation report binds.

Once the evidence and the policy allow a release, what can still be refused before the HSM runs is
checked (an acceptable OAEP hash, the key version exists and is enabled), and the HSM's re-wrap
starts when the audit has placed the ``ALLOWED`` record in its batch: it runs on the HSM's worker
thread while the record and the signed head are written and synced, and the caller is answered
when both are done. Nothing is wrapped before the decision, and nothing is sent before its record
is durable. Should the re-wrap fail after the ``ALLOWED``
record became durable, a ``DENIED`` record with the HSM's reason follows it under the same
``decision_id``: the last record of a decision is its outcome. (If that second record cannot be
written either, the log says more was released than was: the safe direction.) A caller certificate
(or SPIFFE ID) whose wrapped data keys failed so too often has its releases re-wrapped before
their ``ALLOWED`` record is written (:mod:`strongroom.keybroker.unwrap_first`): a key that does not unwrap is then an
ordinary refusal, within the caller's budget.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from strongroom.attestation import Evidence, TrustStore, VerifiedClaims, verify_evidence
from strongroom.attestation.binding import check_report_data, report_data_for
from strongroom.attestation.collateral import CollateralSource
from strongroom.attestation.release_signature import (
    ReleaseSigner,
    ReleaseStatement,
    SignedRelease,
)
from strongroom.errors import (
    REFUSAL_LINE,
    InvalidArgument,
    StrongroomError,
    caused_by_caller,
    line_budgeted,
)
from strongroom.identifiers import validate_key_version
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.keybroker.challenge import Challenge, ChallengeIssuer
from strongroom.keybroker.ephemeral import ReleaseTarget
from strongroom.keybroker.errors import AuditTampered, AuditUnavailable, ReleaseNotPermitted
from strongroom.keybroker.fetch_budget import fetching_for
from strongroom.keybroker.grant_budget import DEFAULT_GRANT_LIMITS, GrantBudget, GrantLimits
from strongroom.keybroker.keys import (
    KeyManager,
    ReleasedKey,
    WrappedDataKey,
    recordable_key_id,
    validate_key_id,
)
from strongroom.keybroker.policies import PolicyStore, StoredPolicy
from strongroom.keybroker.refusals import (
    BROKER_REFUSAL_BURST,
    RefusalRecords,
    log_unaudited,
    record_counts,
)
from strongroom.keybroker.unwrap_first import UnwrapFirst
from strongroom.oaep import OaepHash
from strongroom.reasons import Reason
from strongroom.runtime.metrics import KEY_RELEASES

log = logging.getLogger(__name__)
# What a refusal's record keeps when the rest of its context is not recordable: who asked (from
# the verified certificate) and a digest of what they sent.
_CALLER_FIELDS = ("caller_spiffe_id", "caller_cert_serial", "evidence_sha256")
# The claim of a record carrying the count of its caller's refusals left unrecorded before it.
_COUNT = "refusals_unrecorded"

MAX_REPORT_BYTES = 16 * 1024
MAX_CERTIFICATES = 8
MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_COLLATERAL_ITEMS = 8
MAX_COLLATERAL_BYTES = 256 * 1024


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: SPIFFE ID, certificate serial, and its TLS public key."""

    spiffe_id: str
    serial: int
    tls_public_key_der: bytes = field(repr=False)


@dataclass(frozen=True)
class ReleaseRequest:
    """A key release request, not yet validated."""

    key_id: str
    key_version: int
    wrapped_data_key: bytes = field(repr=False)
    evidence: Evidence
    ephemeral_public_key_der: bytes = field(repr=False)
    nonce: bytes
    accepted_mechanisms: Sequence[OaepHash]


@dataclass(frozen=True)
class ReleaseOutcome:
    """A granted release, with where its time went (seconds)."""

    wrapped_data_key: bytes = field(repr=False)
    mechanism: OaepHash
    decision_id: str
    policy_version: str
    timings: dict[str, float]
    # The release-signing key's signature over the answer bound to its request, and its key id.
    signature: bytes = b""
    signing_key_id: bytes = b""


def _counting(context: dict[str, Any], unrecorded: int) -> dict[str, Any]:
    """``context`` for a record that also carries how many refusals went unrecorded before it."""
    return {**context, "claims": {**context.get("claims", {}), _COUNT: unrecorded}}


def _check_evidence_sizes(evidence: Evidence) -> None:
    if not evidence.report or len(evidence.report) > MAX_REPORT_BYTES:
        raise InvalidArgument(
            f"evidence.report must be 1-{MAX_REPORT_BYTES} bytes", reason=Reason.EVIDENCE_SIZE
        )
    if len(evidence.certificates) > MAX_CERTIFICATES or any(
        not 0 < len(c) <= MAX_CERTIFICATE_BYTES for c in evidence.certificates
    ):
        raise InvalidArgument(
            f"evidence.certificates: at most {MAX_CERTIFICATES} of 1-{MAX_CERTIFICATE_BYTES} bytes",
            reason=Reason.EVIDENCE_SIZE,
        )
    if len(evidence.collateral) > MAX_COLLATERAL_ITEMS or any(
        not 0 < len(c.data) <= MAX_COLLATERAL_BYTES for c in evidence.collateral
    ):
        raise InvalidArgument(
            f"evidence.collateral: at most {MAX_COLLATERAL_ITEMS} of 1-{MAX_COLLATERAL_BYTES} bytes",
            reason=Reason.EVIDENCE_SIZE,
        )


class ReleaseEngine:
    """Decides key releases. Thread-safe; holds no per-request state between calls."""

    def __init__(
        self,
        *,
        keys: KeyManager,
        challenges: ChallengeIssuer,
        policies: PolicyStore,
        trust: TrustStore,
        audit: AuditLog,
        collateral: CollateralSource | None,
        signer: ReleaseSigner,
        collateral_grace: timedelta = timedelta(0),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        hsm_timeout: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        grant_limits: GrantLimits = DEFAULT_GRANT_LIMITS,
    ) -> None:
        self._keys = keys
        self._challenges = challenges
        self._policies = policies
        self._trust = trust
        self._audit = audit
        # Signs each granted answer over its request (nonce, ephemeral key, key slot): a peer
        # holding only a broker certificate cannot answer a release for the broker.
        self._signer = signer
        # The broker's own collateral (CRLs, TCB info, QE identity); evidence-carried collateral
        # is never consulted. None means nothing can verify: every release fails closed.
        self._collateral = collateral
        self._collateral_grace = collateral_grace
        self._clock = clock
        self._hsm_timeout = hsm_timeout
        # Per reason, as refusals of a request that was read: a fleet shares one bucket, and one
        # replica flooding a cheap refusal left the others' reasons only counted, under none.
        self._unread_refusals = RefusalRecords(
            "key releases refused unread", monotonic, per_reason=True
        )
        self._read_refusals = RefusalRecords("key releases refused", monotonic, per_reason=True)
        self._broker_refusals = RefusalRecords(
            "key releases refused for the broker's failures",
            monotonic,
            per_reason=True,
            burst=BROKER_REFUSAL_BURST,
        )
        self._unwrap_first = UnwrapFirst(monotonic)
        self._grants = GrantBudget(grant_limits, monotonic)
        # Releases refused past the grant budget: none is recorded on its own (its budget is never
        # spent), the first and then one a minute carry the count (the rate limit must not become
        # a way to fill the log at the pace the grants were). Per reason: the broker's counting
        # records then name the reason they count.
        self._rate_limited = RefusalRecords("key releases rate-limited", monotonic, per_reason=True)

    def challenge(self, key_id: str, caller: Caller) -> Challenge:
        """A nonce for releasing ``key_id`` to ``caller``."""
        return self._challenges.issue(validate_key_id(key_id), caller.spiffe_id)

    @staticmethod
    def _context(caller: Caller, report: bytes) -> dict[str, Any]:
        return {
            "caller_spiffe_id": caller.spiffe_id,
            "caller_cert_serial": f"{caller.serial:x}",
            "evidence_sha256": hashlib.sha256(report).hexdigest(),
        }

    def deny(self, exc: Exception, caller: Caller, *, key_id: str, report: bytes) -> None:
        """Audits a release refused before it reached :meth:`release` (e.g. unparseable fields),
        under the caller's record budget for that reason, as :meth:`release` does."""
        context = self._context(caller, report)
        context["key_id"] = recordable_key_id(key_id)
        self._refused(exc, context)

    def deny_unread(self, exc: StrongroomError, caller: Caller | None, bucket: str) -> None:
        """Audits a release refused before its request was read: by the authoriser (an identity
        without the role), the per-identity cap, a busy data plane, or because it does not
        decode. The record has who asked, as far as the certificate says (None when it says
        nothing usable), and why; no request field.

        These cost the caller nothing, so each ``bucket`` (the runtime's: the caller's SPIFFE ID,
        or :data:`~strongroom.runtime.callers.ROLELESS` for every caller without a role or a
        usable certificate together) has, per reason, 64 of them recorded one by one and then one
        a second (within 256 at once, then 4 a second, over its reasons:
        :mod:`strongroom.keybroker.refusals`); past that they are counted per reason, and a
        record once a minute, or the bucket's next one of that reason recorded on its own,
        carries the count (``claims.refusals_unrecorded``; ``claims.counted_reason`` on the
        broker's ``REFUSALS_COUNTED``; ``claims.refusals_bucket`` names a shared bucket, whose
        count is of all its callers). Per reason, as refusals of a request that was read
        (:meth:`release`): one budget for every reason let one replica's flood of a cheap
        refusal leave its fleet's other refusals (a stalled message, a busy data plane) only
        counted, in a count that named no reason."""
        context: dict[str, Any] = {}
        if caller is not None:
            context["caller_spiffe_id"] = caller.spiffe_id
            context["caller_cert_serial"] = f"{caller.serial:x}"
        if caller is None or bucket != caller.spiffe_id:
            context["claims"] = {"refusals_bucket": bucket}
        self._within_budget(self._unread_refusals, bucket, exc.reason, exc, context)

    def _refused(self, exc: BaseException, context: dict[str, Any]) -> None:
        """Audits a refusal of a request that was read: under the caller's budget for its
        recorded reason when the caller caused it, under its larger budget for the broker's
        failures when the broker did (or a bug); one by one when an ``ALLOWED`` record of this
        decision was written (a decision's last record is its outcome: it is never left out, and
        the caller's failures there make its releases unwrap first: :mod:`.unwrap_first`), and
        when the audit log is what failed (nothing to write it to: it is logged)."""
        refusal = exc.cause if isinstance(exc, ReleaseNotPermitted) else exc
        who = context["caller_spiffe_id"]
        theirs = isinstance(refusal, StrongroomError) and caused_by_caller(refusal)
        if "decision_id" in context:
            if theirs:
                self._unwrap_first.failed(who, int(context["caller_cert_serial"], 16))
            self._audit_denial(exc, context)
        elif isinstance(refusal, AuditUnavailable):
            self._audit_denial(exc, context)
        elif (
            isinstance(refusal, StrongroomError) and refusal.reason == Reason.RELEASES_RATE_LIMITED
        ):
            self._past_budget(self._rate_limited, who, refusal.reason, exc, context)
        elif isinstance(refusal, StrongroomError):
            records = self._read_refusals if theirs else self._broker_refusals
            self._within_budget(records, who, refusal.reason, exc, context)
        else:
            self._within_budget(self._broker_refusals, who, "INTERNAL", exc, context)

    def _within_budget(
        self,
        records: RefusalRecords,
        who: str,
        reason: str,
        exc: BaseException,
        context: dict[str, Any],
    ) -> None:
        """Audits ``exc`` (recorded with ``reason``) on its own while ``who`` has budget left in
        ``records``; past it, counts it, and records it with the count of those left unrecorded
        when a counting record is due. Only the record is budgeted: the caller is answered with
        its own refusal either way."""
        if records.spend(who, reason):
            # Refusals counted while the caller was over its budget go on its next record.
            pending = records.take_unrecorded(who, reason)
            if not self._audit_denial(
                exc, context if pending is None else _counting(context, pending)
            ):
                # The log refused it: this refusal and the count it carried are counted again.
                records.count_unrecorded(who, reason, 1 + (pending or 0))
            return
        self._past_budget(records, who, reason, exc, context)

    def _past_budget(
        self,
        records: RefusalRecords,
        who: str,
        reason: str,
        exc: BaseException,
        context: dict[str, Any],
    ) -> None:
        """Counts ``exc``, a refusal past ``who``'s budget in ``records``, and records it with the
        count of those left unrecorded before it when a counting record is due (the first, then
        one each :data:`~strongroom.keybroker.refusals.LIMITED_RECORD_SECONDS`)."""
        unrecorded = records.unrecorded_if_due(who, reason)
        if unrecorded is None:
            KEY_RELEASES.add(1, {"outcome": "denied", "reason": reason})
            return
        if not self._audit_denial(exc, _counting(context, unrecorded)):
            records.count_unrecorded(who, reason, 1 + unrecorded)

    def record_counted_refusals(self, *, every: bool = False) -> None:
        """Records the counts of refusals past their callers' budgets that are due (all with
        ``every``, at shutdown): those of a caller that stopped while over its budget."""
        record_counts(self._audit, self._unread_refusals, "key_release", every=every)
        record_counts(self._audit, self._read_refusals, "key_release", every=every)
        record_counts(self._audit, self._broker_refusals, "key_release", every=every)
        record_counts(self._audit, self._rate_limited, "key_release", every=every)

    def release(self, request: ReleaseRequest, caller: Caller) -> ReleaseOutcome:
        """Releases the data key to the attested caller, or raises and audits why not.

        Every refusal is audited, whatever raised it: an unexpected error is recorded with
        reason ``INTERNAL`` before it reaches the error interceptor.

        Refusals the caller caused (bad or stale evidence, a wrong nonce, an unknown key, a
        policy that does not admit it) are recorded one by one up to a budget per caller and
        recorded reason (:mod:`strongroom.keybroker.refusals`: 64 at once, then 1 a second; 256
        and 4 a second for all of a caller's reasons together), then counted: the first past it
        is still recorded, then a record with ``claims.refusals_unrecorded`` (that reason's
        count) once a minute, on the caller's next record of that reason, or as
        ``REFUSALS_COUNTED`` (with ``claims.counted_reason``) from the broker's pass. The
        caller's answer never depends on the budget: a fleet of replicas often shares one SPIFFE
        ID, and one bad replica must not get the others refused. Refusals the broker caused (an
        outage, collateral it cannot fetch, a policy that does not load, a bug) have a budget of
        their own per caller and reason, four times larger at once
        (:data:`~strongroom.keybroker.refusals.BROKER_REFUSAL_BURST`), counted alike past it. A
        denial following its decision's ``ALLOWED`` record is always recorded; a caller certificate
        (or SPIFFE ID) with too many of its own there has its releases unwrapped before their
        record
        (:mod:`strongroom.keybroker.unwrap_first`).

        A release the policy allowed is within its caller's grant budget, per certificate and per
        SPIFFE ID (:mod:`strongroom.keybroker.grant_budget`), or refused before the HSM and any
        ``ALLOWED`` record (``RELEASES_RATE_LIMITED``; a caller with no grant left is refused so
        before its evidence is verified); those refusals are recorded the first and
        then one a minute per SPIFFE ID, each with the count of those left unrecorded before it
        (``REFUSALS_COUNTED`` from the broker's pass for a caller that stopped).
        """
        context = self._context(caller, request.evidence.report)
        try:
            outcome = self._decide(request, caller, context)
        except BaseException as exc:
            # Not only Exception: a panic in Rust code (pyo3's PanicException, e.g. from the
            # signature) is a BaseException, and one after the ALLOWED record left that record
            # the decision's outcome, for a key the caller never got.
            self._refused(exc, context)
            raise
        return outcome

    def _decide(
        self, request: ReleaseRequest, caller: Caller, context: dict[str, Any]
    ) -> ReleaseOutcome:
        started = time.perf_counter()
        # 1. Structure: malformed requests are rejected before any cryptography. The checked
        # values are typed, and the HSM layer takes them as they are.
        key_id = validate_key_id(request.key_id)
        context["key_id"] = key_id
        version = validate_key_version(request.key_version)
        context["key_version"] = version
        wrapped = WrappedDataKey(request.wrapped_data_key)
        ephemeral_der = request.ephemeral_public_key_der
        target = ReleaseTarget.parse(ephemeral_der, request.accepted_mechanisms)
        _check_evidence_sizes(request.evidence)
        # 2. Freshness: a nonce this broker fleet issued for this key and this caller.
        self._challenges.check(request.nonce, key_id, caller.spiffe_id)
        # 3. The key must have a policy (deny by default), and it must name the caller: evidence
        # from anyone else is not worth a signature check or a collateral fetch.
        stored = self._policy_naming(caller, key_id, context)
        # A caller past its grant budget (7.) is refused before its evidence costs a signature
        # and chain check, which a refusal after it cost on every call; nothing is taken yet, so
        # a refusal of its evidence or by its policy costs it no grant.
        self._grants.check(caller.spiffe_id, caller.serial)
        # 4. Evidence: signatures and chains to the pinned roots, as of now.
        verify_started = time.perf_counter()
        # Its VCEK fetches count against its certificate's budget and its SPIFFE ID's.
        with fetching_for(caller.spiffe_id, caller.serial):
            claims: VerifiedClaims = verify_evidence(
                request.evidence,
                trust=self._trust,
                now=self._clock(),
                collateral=self._collateral,
                require_collateral=True,
                collateral_grace=self._collateral_grace,
            )
        context["claims"] = claims.as_dict()
        # 5. Binding: REPORT_DATA must be exactly H(nonce, ephemeral key, caller's TLS key).
        expected = report_data_for(request.nonce, ephemeral_der, caller.tls_public_key_der)
        check_report_data(claims.report_data, expected)
        # 6. Policy.
        stored.policy.evaluate(claims, caller.spiffe_id)
        verified = time.perf_counter()
        # 7. The caller's grant budget, before the HSM or an ALLOWED record: a genuine caller
        # looping filled the log and took the HSM at the broker's pace.
        self._grants.take(caller.spiffe_id, caller.serial)
        try:
            return self._grant(
                request,
                caller=caller,
                context=context,
                stored=stored,
                wrapped=wrapped,
                target=target,
                times=(started, verify_started, verified),
            )
        except BaseException as exc:
            # The broker's failure (an HSM or audit outage, a bug) gives the grant back. A refusal
            # the caller caused here spends it: a genuine caller sends the wrapped key (made-up
            # ones fail after the take, in the HSM, after an ALLOWED record until they unwrap
            # first) and refunded, they had the HSM and two records a call outside the budget.
            if not (isinstance(exc, StrongroomError) and caused_by_caller(exc)):
                self._grants.refund(caller.spiffe_id, caller.serial)
            raise

    def _grant(
        self,
        request: ReleaseRequest,
        *,
        caller: Caller,
        context: dict[str, Any],
        stored: StoredPolicy,
        wrapped: WrappedDataKey,
        target: ReleaseTarget,
        times: tuple[float, float, float],
    ) -> ReleaseOutcome:
        """The HSM's re-wrap and the ``ALLOWED`` record of a release the policy allowed;
        ``times``: when its checks, its verification and its policy's verdict started or ended."""
        started, verify_started, verified = times
        key_id: str = context["key_id"]
        version: int = context["key_version"]
        ephemeral_der = request.ephemeral_public_key_der
        # The decision's id before its record: the answer that names it can be signed as soon
        # as the re-wrap is done, on the HSM's worker, while this thread syncs the audit log
        # (the signature was ~55 us on every release's path after the commit). Signed is not
        # sent: the answer still goes out only once the record is durable.
        decision_id = uuid.uuid4().hex

        def statement(released: ReleasedKey) -> ReleaseStatement:
            return ReleaseStatement(
                nonce=request.nonce,
                ephemeral_public_key_der=ephemeral_der,
                key_id=key_id,
                key_version=version,
                request_wrapped_key=request.wrapped_data_key,
                mechanism=released.mechanism.mechanism,
                released_wrapped_key=released.wrapped,
                decision_id=decision_id,
                policy_version=stored.policy.version,
            )

        signed_early: list[tuple[ReleasedKey, SignedRelease]] = []

        def sign_early(released: ReleasedKey) -> None:
            signed_early.append((released, self._signer.sign(statement(released))))

        # 8. The HSM re-wraps the data key to the attested ephemeral key while (9.) the decision
        # is made durable; the caller hears of the release only once both are done.
        pending = self._keys.begin_release(
            key_id, version, wrapped, target, timeout=self._hsm_timeout, then=sign_early
        )
        if self._unwrap_first.applies(caller.spiffe_id, caller.serial):
            pending.result()  # a key that does not unwrap is refused before any record of it
        # Before the HSM's first connection its hashes are unknown: the record names the one used,
        # so it waits for the re-wrap then.
        mechanism = pending.mechanism or pending.result().mechanism
        context["oaep_mechanism"] = mechanism.mechanism_label
        # 9. Audit before answering; without a durable record there is no release (the re-wrap's
        # result is dropped unread). The record names the key that signs the answer below (the
        # id the answer carries): across a rotation of that key, the log says which one vouched.
        # Not in ``context``: a denial after this record signed nothing. Its id is
        # ``decision_id``, the one the answer is signed with and names: one source, not the
        # record's copy beside the statement's.
        self._audit.append(
            AuditEvent(
                decision=Decision.ALLOWED,
                reason=Reason.RELEASED,
                release_signing_key_id=self._signer.key_id.hex(),
                decision_id=decision_id,
                **context,
            ),
            on_written=pending.start,
        )
        audited = time.perf_counter()
        # Should the re-wrap fail now, the denial is recorded under this decision's id, after it.
        context["decision_id"] = decision_id
        released = pending.result()
        done = time.perf_counter()
        KEY_RELEASES.add(1, {"outcome": "allowed", "reason": "RELEASED"})
        log.info(
            "key released",
            extra={
                "key_id": key_id,
                "key_version": version,
                "decision_id": decision_id,
                "caller": caller.spiffe_id,
                "mechanism": released.mechanism.mechanism_label,
            },
        )
        # The worker's signature is of this very result (else, should its step have failed,
        # signed here).
        early = signed_early[0] if signed_early else None
        signed = (
            early[1]
            if early is not None and early[0] is released
            else self._signer.sign(statement(released))
        )
        return ReleaseOutcome(
            wrapped_data_key=released.wrapped,
            mechanism=released.mechanism,
            decision_id=decision_id,
            policy_version=stored.policy.version,
            signature=signed.signature,
            signing_key_id=signed.key_id,
            timings={
                "checks": verify_started - started,
                "verify": verified - verify_started,
                # The two overlap: each from the end of verification to its own end, and the
                # step's wall-clock time.
                "hsm": (pending.finished_at or done) - verified,
                "audit": audited - verified,
                "hsm_and_audit": done - verified,
            },
        )

    def _policy_naming(self, caller: Caller, key_id: str, context: dict[str, Any]) -> StoredPolicy:
        """The key's policy, if it names the caller; otherwise :class:`ReleaseNotPermitted`, the
        same answer whether the policy does not name the caller, does not exist, or does not
        read or load: a caller must not learn which key ids have a policy, nor a stored policy's
        load error. The refusal's real reason is audited."""
        try:
            stored = self._policies.get(key_id)
        except (AuditUnavailable, AuditTampered):
            # Recording the document in force failed: an outage (a tampered log's DATA_LOSS
            # too), not this key's policy; its caller is told so, and its line is the log's.
            raise
        except StrongroomError as exc:
            # The broker's configuration, not the caller: the operator must fix it. Logged once
            # and then counted: this runs before the caller is checked, for anyone naming the key.
            self._policies.does_not_load(key_id, exc)
            raise ReleaseNotPermitted(key_id, exc) from None
        context["policy_version"] = stored.policy.version
        context["policy_sha256"] = stored.sha256
        try:
            stored.policy.check_caller(caller.spiffe_id)
        except StrongroomError as exc:
            raise ReleaseNotPermitted(key_id, exc) from None
        return stored

    def _audit_denial(self, exc: BaseException, context: dict[str, Any]) -> bool:
        """Records a denial; False when the audit log refused the record (it is logged)."""
        if isinstance(exc, ReleaseNotPermitted):
            exc = exc.cause  # what the caller was not told is what the record keeps
        if isinstance(exc, StrongroomError):
            # What the caller is told: an outage's message names the broker's files (the audit
            # log's, the HSM module's and SoftHSM2's configuration); the outage's own lines have
            # it, once and then counted, not one line per refused call.
            detail = exc.public
            reason, status = exc.reason, exc.status_name
        else:
            # A bug, not a verdict: the caller gets INTERNAL from the interceptor, and the audit
            # log still records that this request was refused.
            reason, status, detail = "INTERNAL", "INTERNAL", type(exc).__name__
        KEY_RELEASES.add(1, {"outcome": "denied", "reason": reason})
        # Within the log's budget when the caller chose it or an outage with its own lines
        # refused it; the broker's other failures (a bug) are written every time. The audit
        # record is not budgeted here either way.
        budgeted = line_budgeted(exc)
        who = {"caller": context.get("caller_spiffe_id"), "key_id": context.get("key_id")}
        log.warning(
            "key release denied",
            extra={
                "reason": reason,
                "status": status,
                "detail": detail,
                **who,
                REFUSAL_LINE: budgeted,
            },
        )
        if isinstance(exc, AuditUnavailable):
            return False  # the failure to audit is itself what is being reported
        try:
            self._audit.append(AuditEvent(decision=Decision.DENIED, reason=reason, **context))
            return True
        except AuditUnavailable:
            log_unaudited(log, "denied key release", reason, budgeted=budgeted, **who)
            return False
        except StrongroomError:
            pass  # a field the log does not take: the refusal is recorded without the request's
        # A count this record carries must reach the log with it: those refusals have no other.
        counted = context.get("claims", {}).get(_COUNT)
        try:
            self._audit.append(
                AuditEvent(
                    decision=Decision.DENIED,
                    reason=reason,
                    claims={} if counted is None else {_COUNT: counted},
                    **{k: context[k] for k in _CALLER_FIELDS if k in context},
                )
            )
        except StrongroomError:
            log_unaudited(log, "denied key release", reason, budgeted=budgeted, **who)
            return False
        return True
