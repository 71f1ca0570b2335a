"""ReleaseEngine, the release decision, on its own: fakes for the HSM and the audit log, real
challenges, policies, simulated evidence and verifier-owned collateral.

What is checked is the order of the decision: nothing reaches the HSM before the request is well
formed, fresh, covered by a policy, verified and bound, and its ``ALLOWED`` record has its place in
the log; every refusal is audited exactly once with its reason; an allowed release whose record
cannot be made durable is not answered; a re-wrap failing after that record is recorded under the
same decision.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.attestation.abi.snp import parse_snp_report
from strongroom.attestation.binding import report_data_for
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import CollateralService, FetchSettings
from strongroom.attestation.release_signature import (
    ReleaseSigner,
    ReleaseStatement,
    ReleaseVerifier,
)
from strongroom.dev.devstack import read_audit_records
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import (
    REFUSAL_LINE,
    InvalidArgument,
    PermissionDenied,
    StrongroomError,
    Unavailable,
    caused_by_caller,
)
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import (
    AuditEvent,
    AuditLog,
    AuditRecord,
    Decision,
    canonical_json,
    record_hash,
)
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.challenge import ChallengeIssuer
from strongroom.keybroker.ephemeral import EphemeralPublicKey, parse_ephemeral_public_key
from strongroom.keybroker.errors import AuditTampered, AuditUnavailable, HsmUnavailable
from strongroom.keybroker.keys import ReleasedKey
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller, ReleaseEngine, ReleaseRequest
from strongroom.oaep import OaepHash
from strongroom.pki.errors import PeerNotAllowed
from strongroom.runtime.callers import ROLELESS
from strongroom.runtime.secrets import Secret
from tests.attestation.collateral_server import FakeCollateralServer
from tests.keybroker.helpers import (
    MEASUREMENT,
    POLICY,
    ec_spki_on_an_unsupported_curve,
    replace_keeping_mtime,
)
from tests.keybroker.test_audit_dirlock import _held, _within_test_wait


@dataclass
class FakeKeys:
    """Stands in for KeyManager: records what reached the 'HSM', and when (in ``trace``)."""

    trace: list[str]
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail_with: Exception | None = None
    mechanism_known: bool = True
    run_then: bool = True  # as the HSM's worker does (False: a step that never ran)

    def begin_release(self, *args: Any, **kwargs: Any) -> FakePending:
        return FakePending(self, args, then=kwargs.get("then") if self.run_then else None)


@dataclass
class FakePending:
    keys: FakeKeys
    args: tuple[Any, ...]
    started: bool = False
    then: Any = None

    @property
    def mechanism(self) -> OaepHash | None:
        return OaepHash.SHA1 if self.keys.mechanism_known else None

    finished_at = None

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.keys.calls.append(self.args)
            self.keys.trace.append("hsm")
            if self.then is not None and self.keys.fail_with is None:
                self.then(self._released)

    @functools.cached_property
    def _released(self) -> ReleasedKey:
        return ReleasedKey(b"wrapped-to-ephemeral", OaepHash.SHA1)

    def result(self) -> ReleasedKey:
        self.start()
        if self.keys.fail_with is not None:
            raise self.keys.fail_with
        return self._released


@dataclass
class FakeAudit:
    """Stands in for AuditLog: ``fail_allowed`` fails an ALLOWED record before it is written
    ("before") or after its ``on_written`` ran ("after", as a failed fsync does)."""

    trace: list[str]
    events: list[AuditEvent] = field(default_factory=list)
    fail_allowed: str | None = None

    def append(self, event: AuditEvent, on_written: Any = None) -> AuditRecord:
        failing = self.fail_allowed if event.decision is Decision.ALLOWED else None
        if failing == "before":
            raise AuditUnavailable("disk full")
        self.trace.append(f"written {event.decision.name}")
        if on_written is not None:
            on_written()
        if failing == "after":
            raise AuditUnavailable("fsync failed")
        self.events.append(event)
        return AuditRecord(
            len(self.events), event.decision_id or f"d{len(self.events)}", "now", "h"
        )


SIGNING_KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def authority(sim_authority: SimulatedAuthority) -> SimulatedAuthority:
    return sim_authority


@pytest.fixture
def world(authority, tmp_path):
    trace: list[str] = []
    keys, audit = FakeKeys(trace), FakeAudit(trace)
    policies = PolicyStore(tmp_path / "policies", production=False)
    policies.put("k1", POLICY)
    engine = ReleaseEngine(
        keys=keys,  # type: ignore[arg-type]
        challenges=ChallengeIssuer(Secret(os.urandom(32))),
        policies=policies,
        trust=authority.trust_store(),
        audit=audit,  # type: ignore[arg-type]
        collateral=authority.collateral_source(),
        signer=ReleaseSigner(SIGNING_KEY),
    )
    return engine, keys, audit


def _ephemeral() -> bytes:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=3072)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


EPHEMERAL = _ephemeral()
CALLER = Caller("spiffe://strongroom.test/inference", 0x2A, _ephemeral())


def _request(engine, authority, **overrides: Any) -> ReleaseRequest:
    nonce = overrides.pop("nonce", None) or engine.challenge("k1", CALLER).nonce
    bound_key = overrides.pop("bound_key", EPHEMERAL)
    measurement = overrides.pop("measurement", MEASUREMENT)
    evidence = authority.snp().evidence(
        report_data_for(nonce, bound_key, CALLER.tls_public_key_der), measurement=measurement
    )
    fields: dict[str, Any] = {
        "key_id": "k1",
        "key_version": 1,
        "wrapped_data_key": b"\x01" * 40,
        "evidence": evidence,
        "ephemeral_public_key_der": EPHEMERAL,
        "nonce": nonce,
        "accepted_mechanisms": [OaepHash.SHA256, OaepHash.SHA1],
    }
    if "send_nonce" in overrides:  # evidence bound to a good nonce, another one sent
        fields["nonce"] = overrides.pop("send_nonce")
    fields.update(overrides)
    return ReleaseRequest(**fields)


def test_an_allowed_release_reaches_the_hsm_once_and_is_audited_first(world, authority) -> None:
    engine, keys, audit = world
    outcome = engine.release(_request(engine, authority), CALLER)
    assert outcome.wrapped_data_key == b"wrapped-to-ephemeral"
    assert outcome.mechanism is OaepHash.SHA1
    assert outcome.policy_version == "p1"
    assert len(keys.calls) == 1
    key_id, version, wrapped, target = keys.calls[0]
    ephemeral, accepted = target.public_key, target.mechanisms
    assert (key_id, version, wrapped) == ("k1", 1, b"\x01" * 40)
    # The engine hands the HSM the key it parsed and checked, not raw bytes to parse again.
    assert ephemeral == parse_ephemeral_public_key(EPHEMERAL)
    assert isinstance(ephemeral, EphemeralPublicKey)
    assert list(accepted) == [OaepHash.SHA256, OaepHash.SHA1]
    [event] = audit.events
    assert (event.decision, event.reason, event.key_id) == (Decision.ALLOWED, "RELEASED", "k1")
    assert event.claims["measurement"] == MEASUREMENT.hex()
    assert event.oaep_mechanism == OaepHash.SHA1.mechanism_label
    # The record names the key that signed the answer, as the answer does.
    assert event.release_signing_key_id == outcome.signing_key_id.hex()
    assert outcome.signing_key_id == ReleaseSigner(SIGNING_KEY).key_id
    assert outcome.decision_id == event.decision_id
    assert re.fullmatch("[0-9a-f]{32}", outcome.decision_id)
    # The re-wrap starts only once the record has its place in the log (it overlaps the syncs).
    assert audit.trace == ["written ALLOWED", "hsm"]


def test_an_allowed_release_is_signed_over_its_request(world, authority) -> None:
    """The answer was bound to nothing: a peer with a broker certificate could answer for it."""
    engine, _, _ = world
    request = _request(engine, authority)
    outcome = engine.release(request, CALLER)
    statement = ReleaseStatement(
        nonce=request.nonce,
        ephemeral_public_key_der=EPHEMERAL,
        key_id="k1",
        key_version=1,
        request_wrapped_key=request.wrapped_data_key,
        mechanism=OaepHash.SHA1.mechanism,
        released_wrapped_key=b"wrapped-to-ephemeral",
        decision_id=outcome.decision_id,
        policy_version="p1",
    )
    verifier = ReleaseVerifier([SIGNING_KEY.public_key()])
    assert verifier.verify(statement, outcome.signature, outcome.signing_key_id)
    for changed in (
        {"nonce": engine.challenge("k1", CALLER).nonce},
        {"released_wrapped_key": b"another key"},
        {"ephemeral_public_key_der": _ephemeral()},
        {"request_wrapped_key": b"\x02" * 40},
    ):
        with pytest.raises(StrongroomError) as info:
            verifier.verify(
                dataclasses.replace(statement, **changed),
                outcome.signature,
                outcome.signing_key_id,
            )
        assert info.value.reason == "RELEASE_SIGNATURE_INVALID"


@pytest.mark.parametrize("then_ran", [True, False], ids=["on-the-worker", "step-never-ran"])
def test_the_answer_is_signed_as_the_rewrap_ends_not_after_the_audit_commit(
    world, authority, monkeypatch: pytest.MonkeyPatch, then_ran: bool
) -> None:
    """The answer's signature needs the re-wrapped key and the decision's id, both known before
    the audit's syncs end: it is made by the step the HSM's worker runs after the re-wrap
    (``then``), while the caller's thread commits, not on the release's path after the commit.
    Signed once, over the decision the log records; where the step did not run, the handler
    signs, and the answer is the same."""
    engine, keys, audit = world
    keys.run_then = then_ran
    trace = audit.trace
    signer, append = engine._signer, audit.append

    def sign(statement: ReleaseStatement) -> Any:
        trace.append("signed")
        return ReleaseSigner.sign(signer, statement)

    def committed(*args: Any, **kwargs: Any) -> AuditRecord:
        record = append(*args, **kwargs)
        trace.append("committed")
        return record

    monkeypatch.setattr(signer, "sign", sign)
    monkeypatch.setattr(audit, "append", committed)
    request = _request(engine, authority)
    outcome = engine.release(request, CALLER)
    signing = ["signed", "committed"] if then_ran else ["committed", "signed"]
    assert trace == ["written ALLOWED", "hsm", *signing]
    [event] = audit.events
    assert outcome.decision_id == event.decision_id
    statement = ReleaseStatement(
        nonce=request.nonce,
        ephemeral_public_key_der=EPHEMERAL,
        key_id="k1",
        key_version=1,
        request_wrapped_key=request.wrapped_data_key,
        mechanism=OaepHash.SHA1.mechanism,
        released_wrapped_key=b"wrapped-to-ephemeral",
        decision_id=event.decision_id,
        policy_version="p1",
    )
    verifier = ReleaseVerifier([SIGNING_KEY.public_key()])
    assert verifier.verify(statement, outcome.signature, outcome.signing_key_id)


def test_before_the_hsm_first_connects_the_release_waits_for_the_rewrap(world, authority) -> None:
    engine, keys, audit = world
    keys.mechanism_known = False  # the record names the hash, which only the re-wrap tells now
    outcome = engine.release(_request(engine, authority), CALLER)
    assert outcome.mechanism is OaepHash.SHA1
    assert audit.trace == ["hsm", "written ALLOWED"]
    assert audit.events[0].oaep_mechanism == OaepHash.SHA1.mechanism_label


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [
        ({"key_id": "Bad Key"}, InvalidArgument, "KEY_ID_INVALID"),
        ({"key_version": 0}, InvalidArgument, "KEY_VERSION_INVALID"),
        ({"wrapped_data_key": b"x"}, InvalidArgument, "WRAPPED_KEY_INVALID"),
        ({"ephemeral_public_key_der": b"junk"}, InvalidArgument, "EPHEMERAL_KEY_INVALID"),
        (
            {"ephemeral_public_key_der": ec_spki_on_an_unsupported_curve()},
            InvalidArgument,
            "EPHEMERAL_KEY_UNSUPPORTED",
        ),
        ({"accepted_mechanisms": []}, InvalidArgument, "OAEP_MECHANISM_INVALID"),
        ({"send_nonce": b"\x00" * 10}, InvalidArgument, "NONCE_MALFORMED"),
        ({"measurement": bytes(48)}, PermissionDenied, "MEASUREMENT_NOT_ALLOWED"),
        ({"bound_key": _ephemeral()}, PermissionDenied, "REPORT_DATA_MISMATCH"),
    ],
)
def test_refusals_never_reach_the_hsm_and_are_audited_once(
    world, authority, overrides, error, reason
) -> None:
    engine, keys, audit = world
    request = _request(engine, authority, **overrides)
    with pytest.raises(error) as info:
        engine.release(request, CALLER)
    assert info.value.reason == reason
    assert keys.calls == []
    [event] = audit.events
    assert (event.decision, event.reason) == (Decision.DENIED, reason)
    assert event.caller_spiffe_id == CALLER.spiffe_id


def test_a_nonce_for_another_caller_is_refused(world, authority) -> None:
    engine, keys, audit = world
    other = Caller("spiffe://strongroom.test/inference-2", 1, CALLER.tls_public_key_der)
    nonce = engine.challenge("k1", other).nonce
    with pytest.raises(StrongroomError) as info:
        engine.release(_request(engine, authority, nonce=nonce), CALLER)
    assert info.value.reason.startswith("NONCE")
    assert keys.calls == [] and [e.decision for e in audit.events] == [Decision.DENIED]


def test_a_key_without_a_policy_releases_nothing(world, authority) -> None:
    engine, keys, audit = world
    request = _request(engine, authority, key_id="k2", nonce=engine.challenge("k2", CALLER).nonce)
    with pytest.raises(PermissionDenied) as info:
        engine.release(request, CALLER)
    assert info.value.reason == "CALLER_NOT_ALLOWED"  # what the caller hears; the record says why
    assert keys.calls == []
    assert [(e.decision, e.reason) for e in audit.events] == [
        (Decision.DENIED, "NO_RELEASE_POLICY")
    ]


OUTSIDER = Caller("spiffe://strongroom.test/reader", 7, CALLER.tls_public_key_der)


def _refusal(engine, authority, key_id: str, caller: Caller) -> StrongroomError:
    request = _request(
        engine, authority, key_id=key_id, nonce=engine.challenge(key_id, caller).nonce
    )
    with pytest.raises(StrongroomError) as info:
        engine.release(request, caller)
    return info.value


def test_a_caller_named_by_no_policy_cannot_tell_which_key_ids_have_one(world, authority) -> None:
    """The policy was loaded before the caller was checked: PERMISSION_DENIED CALLER_NOT_ALLOWED
    for a key with a policy, FAILED_PRECONDITION NO_RELEASE_POLICY for one without (and only an
    existing key can have one). Now one answer; the audit record has the real reason."""
    engine, keys, audit = world
    answers = {
        key_id: (e.status_name, e.reason, e.message.replace(repr(key_id), "KEY"))
        for key_id in ("k1", "no-such-key")
        for e in [_refusal(engine, authority, key_id, OUTSIDER)]
    }
    assert answers["k1"] == answers["no-such-key"]
    assert answers["k1"][:2] == ("PERMISSION_DENIED", "CALLER_NOT_ALLOWED")
    assert keys.calls == []
    assert [(e.reason, e.caller_spiffe_id) for e in audit.events] == [
        ("CALLER_NOT_ALLOWED", OUTSIDER.spiffe_id),
        ("NO_RELEASE_POLICY", OUTSIDER.spiffe_id),
    ]


@pytest.mark.parametrize("caller", [CALLER, OUTSIDER], ids=["named", "outsider"])
def test_a_stored_policy_that_no_longer_loads_is_audited_and_told_to_no_caller(
    world, authority, caller, caplog
) -> None:
    """Written by a development broker (``min_reported_tcb: any``), read by a production one: it
    was INVALID_ARGUMENT (the caller's fault) with the loader's message, to any inference
    identity. It is the broker's configuration error: audited with its reason, logged for the
    operator, and the caller hears what every caller the policy does not admit hears."""
    engine, keys, audit = world
    engine._policies = PolicyStore(Path(engine._policies._dir), production=True)
    refused = _refusal(engine, authority, "k1", caller)
    assert (refused.status_name, refused.reason) == ("PERMISSION_DENIED", "CALLER_NOT_ALLOWED")
    assert "min_reported_tcb" not in refused.message and "any" not in refused.message
    assert keys.calls == []
    assert [(e.decision, e.reason) for e in audit.events] == [(Decision.DENIED, "POLICY_BAD_VALUE")]
    [logged] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "min_reported_tcb" in logged.getMessage()  # the cause, and the file
    assert logged.getMessage().endswith(f"(its file: {Path(engine._policies._dir) / 'k1.yaml'})")


@pytest.mark.parametrize(("when", "hsm_calls"), [("before", 0), ("after", 1)])
def test_without_a_durable_record_there_is_no_release(world, authority, when, hsm_calls) -> None:
    engine, keys, audit = world
    audit.fail_allowed = when
    with pytest.raises(AuditUnavailable):
        engine.release(_request(engine, authority), CALLER)
    # Failing before the write, the HSM is never asked; failing at the sync, its answer is dropped.
    assert len(keys.calls) == hsm_calls
    assert audit.events == []  # the failure to audit is what is reported


def test_a_rewrap_failing_after_the_allowed_record_is_recorded_under_the_same_decision(
    world, authority
) -> None:
    engine, keys, audit = world
    keys.fail_with = HsmUnavailable("the token went away", reason="HSM_UNAVAILABLE")
    with pytest.raises(HsmUnavailable):
        engine.release(_request(engine, authority), CALLER)
    allowed, denied = audit.events
    assert (allowed.decision, denied.decision) == (Decision.ALLOWED, Decision.DENIED)
    assert denied.reason == "HSM_UNAVAILABLE"
    # The ALLOWED record's id: the last record is the outcome.
    assert denied.decision_id == allowed.decision_id is not None
    assert denied.key_id == "k1" and denied.claims == allowed.claims
    # Nothing was signed for the denial: only the ALLOWED record names a release-signing key.
    assert allowed.release_signing_key_id is not None and denied.release_signing_key_id is None


def test_an_unexpected_error_is_audited_as_internal(world, authority) -> None:
    engine, keys, audit = world
    keys.fail_with = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        engine.release(_request(engine, authority), CALLER)
    assert [(e.decision, e.reason) for e in audit.events] == [
        (Decision.ALLOWED, "RELEASED"),
        (Decision.DENIED, "INTERNAL"),
    ]
    assert audit.events[1].decision_id == audit.events[0].decision_id is not None


class _Panic(BaseException):
    """What pyo3 raises for a panic in Rust code (``pyo3_runtime.PanicException``, e.g. from
    cryptography): a BaseException, not an Exception."""


def test_a_base_exception_after_the_allowed_record_is_audited_as_internal(world, authority) -> None:
    """release() audited what _decide raised only when it was an Exception: a BaseException after
    the ALLOWED record (a panic in the re-wrap's or the signature's Rust code) left that record the
    decision's last, a release the log says was made and the caller never got. It is followed by
    its DENIED record now, under the same decision, and still raised."""
    engine, keys, audit = world
    keys.fail_with = _Panic("a Rust panic")
    with pytest.raises(_Panic):
        engine.release(_request(engine, authority), CALLER)
    assert [(e.decision, e.reason) for e in audit.events] == [
        (Decision.ALLOWED, "RELEASED"),
        (Decision.DENIED, "INTERNAL"),
    ]
    assert audit.events[1].decision_id == audit.events[0].decision_id is not None


def test_a_caller_the_policy_does_not_name_is_refused_before_its_evidence_is_verified(
    world, authority
) -> None:
    """The evidence here has a forged signature: verified first, it was refused for that, after
    the verifier had fetched (and cached) collateral for whatever chip and TCB it claimed. The
    policy's list of callers is now checked first."""
    engine, keys, audit = world
    other = Caller("spiffe://strongroom.test/reader", 7, CALLER.tls_public_key_der)

    def forged(caller: Caller) -> ReleaseRequest:
        request = _request(engine, authority, nonce=engine.challenge("k1", caller).nonce)
        report = bytearray(request.evidence.report)
        report[0x2A0:0x2A8] = b"\xff" * 8  # inside the signature's r
        evidence = dataclasses.replace(request.evidence, report=bytes(report))
        return dataclasses.replace(request, evidence=evidence)

    with pytest.raises(PermissionDenied) as info:
        engine.release(forged(other), other)
    assert info.value.reason == "CALLER_NOT_ALLOWED"
    with pytest.raises(PermissionDenied) as info:
        engine.release(forged(CALLER), CALLER)  # the named caller's is verified, and refused
    assert info.value.reason == "REPORT_SIGNATURE_INVALID"
    assert keys.calls == []
    assert [(e.reason, e.caller_spiffe_id) for e in audit.events] == [
        ("CALLER_NOT_ALLOWED", other.spiffe_id),
        ("REPORT_SIGNATURE_INVALID", CALLER.spiffe_id),
    ]


def test_a_caller_revoked_by_a_same_size_same_mtime_policy_is_refused(world, authority) -> None:
    """The policy is re-read when the file is replaced, even by one of the same size with the
    old mtime (rsync -a, cp -p, tar x): before, the cached policy kept releasing to the caller."""
    engine, keys, audit = world
    engine.release(_request(engine, authority), CALLER)  # allowed, and the policy is cached
    revoked = POLICY.replace("strongroom.test/inference", "strongroom.test/inferenz2")
    assert len(revoked) == len(POLICY)
    replace_keeping_mtime(Path(engine._policies._dir) / "k1.yaml", revoked)
    with pytest.raises(PermissionDenied) as info:
        engine.release(_request(engine, authority), CALLER)
    assert info.value.reason == "CALLER_NOT_ALLOWED"
    assert len(keys.calls) == 1
    assert [e.reason for e in audit.events] == ["RELEASED", "CALLER_NOT_ALLOWED"]


def test_a_release_under_a_policy_that_is_not_utf8_is_refused_with_its_reason(
    world, authority
) -> None:
    """Before: UnicodeDecodeError, audited and answered as INTERNAL."""
    engine, keys, audit = world
    path = Path(engine._policies._dir) / "k1.yaml"
    path.write_bytes(path.read_bytes() + b'description: "caf\xe9"\n')
    with pytest.raises(PermissionDenied) as info:
        engine.release(_request(engine, authority), CALLER)
    assert info.value.reason == "CALLER_NOT_ALLOWED"  # as for any key whose policy admits no one
    assert keys.calls == []
    assert [(e.decision, e.reason) for e in audit.events] == [
        (Decision.DENIED, "POLICY_UNREADABLE")
    ]


def _real_audit_engine(
    authority,
    tmp_path,
    *,
    audit_key: Ed25519PrivateKey | None = None,
    policies_audited: bool = False,
    **engine_args,
) -> tuple[ReleaseEngine, Path]:
    """An engine with a real audit log (its policy store recording documents in force into it
    with ``policies_audited``)."""
    audit = AuditLog.open(tmp_path / "audit.log", audit_key or Ed25519PrivateKey.generate())
    policies = PolicyStore(
        tmp_path / "policies", production=False, audit=audit if policies_audited else None
    )
    policies.put("k1", POLICY)
    engine = ReleaseEngine(
        keys=FakeKeys([]),  # type: ignore[arg-type]
        challenges=ChallengeIssuer(Secret(os.urandom(32))),
        policies=policies,
        trust=authority.trust_store(),
        audit=audit,
        signer=ReleaseSigner(SIGNING_KEY),
        **{"collateral": authority.collateral_source(), **engine_args},
    )
    return engine, tmp_path / "audit.log"


def test_a_release_is_refused_while_another_process_holds_the_audit_logs_lock(
    authority, tmp_path, monkeypatch, caplog
) -> None:
    """A process that can read the audit log (the shipper) holds its ``flock``: the release
    waited for it without bound. Now it is refused within the bound, as when the log cannot be
    written (AUDIT_UNAVAILABLE, the HSM never asked, the refusal logged and counted), and the
    next release, the holder gone, is granted and recorded."""
    monkeypatch.setattr(audit_module, "LOG_LOCK_WAIT_SECONDS", 0.2)
    engine, log = _real_audit_engine(authority, tmp_path)
    request = _request(engine, authority)
    with _held(log, "LOCK_SH"), pytest.raises(AuditUnavailable) as refused:
        _within_test_wait(lambda: engine.release(request, CALLER))
    assert refused.value.reason == "AUDIT_UNAVAILABLE"
    assert "is locked by another process" in refused.value.message
    assert engine._keys.calls == []
    [denied] = [r for r in caplog.records if r.getMessage() == "key release denied"]
    assert denied.reason == "AUDIT_UNAVAILABLE"  # type: ignore[attr-defined]
    # Within the caller's budget of refusal lines: the outage has its own (it was written for
    # every refused call), and the caller's line has only what the caller was told.
    assert getattr(denied, REFUSAL_LINE) is True
    assert denied.detail == refused.value.public  # type: ignore[attr-defined]
    assert read_audit_records(log) == []
    engine.release(_request(engine, authority), CALLER)
    assert [r["decision"] for r in read_audit_records(log)] == ["allowed"]
    assert verify_audit_log(log).intact


def test_a_release_refused_by_a_tampered_audit_log_logs_within_the_callers_budget(
    authority, tmp_path, caplog
) -> None:
    """A tampered audit log refuses every decision until the broker restarts, with a CRITICAL of
    its own (once, naming the file): an outage of the audit log like a full disk. Its refused
    releases' ``key release denied`` and ``could not audit a denied key release`` were written
    for every call (DATA_LOSS is not the caller's fault), so any certified caller set the broker's
    WARNING rate through it; they are within the caller's budget, as an outage's are."""
    engine, log = _real_audit_engine(authority, tmp_path)
    engine.release(_request(engine, authority), CALLER)
    genuine = log.read_bytes()
    last = json.loads(genuine.splitlines()[-1])
    forged = {k: v for k, v in last.items() if k not in ("hash", "sig")}
    forged.update(seq=last["seq"] + 1, prev=last["hash"], decision="allowed", reason="RELEASED")
    forged["hash"] = record_hash(forged)
    log.write_bytes(genuine + canonical_json(forged) + b"\n")
    caplog.clear()
    with pytest.raises(AuditTampered) as refused:
        engine.release(_request(engine, authority), CALLER)
    per_call = [
        r
        for r in caplog.records
        if r.getMessage() in ("key release denied", "could not audit a denied key release")
    ]
    assert [r.getMessage() for r in per_call] == [
        "key release denied",
        "could not audit a denied key release",
    ]
    assert [getattr(r, REFUSAL_LINE) for r in per_call] == [True, True]
    assert per_call[0].detail == refused.value.public  # type: ignore[attr-defined]
    # The tamper's own line, once, is what the operator is told (outside any budget).
    [critical] = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert "audit log tampering detected" in critical.getMessage()
    assert getattr(critical, REFUSAL_LINE, None) is None


def test_a_tampered_audit_log_refusing_a_policys_record_is_not_said_a_policy_that_does_not_load(
    authority, tmp_path, caplog
) -> None:
    """A release under a policy not yet recorded in force (the first since the broker started, or
    a document changed on disk) records it first; a tampered log refuses that record with
    AuditTampered (DATA_LOSS), which the policy lookup took for a policy that does not load: the
    caller was told PERMISSION_DENIED CALLER_NOT_ALLOWED, not AUDIT_LOG_TAMPERED, and every such
    call wrote an ERROR ``the release policy of a key does not load`` (outside any budget, naming
    the tamper) that sent the operator to a policy with nothing wrong. It is the audit log's
    refusal, as an AuditUnavailable there is."""
    engine, log = _real_audit_engine(authority, tmp_path, policies_audited=True)
    engine.deny(InvalidArgument("no", reason="EVIDENCE_MALFORMED"), CALLER, key_id="k", report=b"r")
    genuine = log.read_bytes()
    last = json.loads(genuine.splitlines()[-1])
    forged = {k: v for k, v in last.items() if k not in ("hash", "sig")}
    forged.update(seq=last["seq"] + 1, prev=last["hash"], decision="allowed", reason="RELEASED")
    forged["hash"] = record_hash(forged)
    log.write_bytes(genuine + canonical_json(forged) + b"\n")
    caplog.clear()
    for _ in range(3):
        with pytest.raises(StrongroomError) as refused:
            engine.release(_request(engine, authority), CALLER)
        assert isinstance(refused.value, AuditTampered), refused.value
        assert refused.value.reason == "AUDIT_LOG_TAMPERED"
    assert not [r for r in caplog.records if "does not load" in r.getMessage()]
    assert [r.levelname for r in caplog.records if r.levelno >= logging.ERROR] == ["CRITICAL"]


@pytest.mark.parametrize("key_id", ["", "Model-A", "a\nb", "k" * 100])
def test_a_request_refused_before_the_decision_is_audited_whatever_its_key_id(
    authority, tmp_path, key_id
) -> None:
    """A ReleaseKey refused while its fields are read (an unspecified TEE type, say) is audited
    with the key id it named. A key id the log does not take made its record invalid, so the
    refusal went unrecorded: an unlimited stream of attempts invisible to the audit log."""
    engine, log = _real_audit_engine(authority, tmp_path)
    refusal = InvalidArgument("evidence: tee_type is unspecified", reason="EVIDENCE_MALFORMED")
    engine.deny(refusal, CALLER, key_id=key_id, report=b"report")
    [record] = read_audit_records(log)
    assert (record["decision"], record["reason"]) == ("denied", "EVIDENCE_MALFORMED")
    assert record["key"]["id"] is None
    assert record["caller"]["spiffe_id"] == CALLER.spiffe_id


def test_a_refusal_whose_context_the_log_refuses_is_still_recorded(authority, tmp_path) -> None:
    """Whatever in a refusal's context the log cannot take, the refusal is recorded with who
    asked and the digest of what they sent."""
    engine, log = _real_audit_engine(authority, tmp_path)
    context = ReleaseEngine._context(CALLER, b"report")
    context |= {"key_id": "k1", "policy_version": "v" * 300}
    engine._audit_denial(InvalidArgument("no", reason="NONCE_EXPIRED"), context)
    [record] = read_audit_records(log)
    assert (record["decision"], record["reason"]) == ("denied", "NONCE_EXPIRED")
    assert record["caller"]["spiffe_id"] == CALLER.spiffe_id
    assert record["evidence_sha256"] == context["evidence_sha256"]


def test_a_release_refused_before_it_was_read_is_audited_with_who_asked(
    authority, tmp_path
) -> None:
    """The runtime's refusals of ReleaseKey (no inference role, an undecodable request) reach
    the engine without a request: the record has the certificate's identity, when there is a
    usable one, and the reason; no request field."""
    engine, log = _real_audit_engine(authority, tmp_path)
    engine.deny_unread(
        InvalidArgument("not protobuf", reason="MALFORMED_REQUEST"), CALLER, CALLER.spiffe_id
    )
    engine.deny_unread(PermissionDenied("expired", reason="PEER_CERT_EXPIRED"), None, ROLELESS)
    first, second = read_audit_records(log)
    assert (first["decision"], first["reason"]) == ("denied", "MALFORMED_REQUEST")
    assert first["caller"]["spiffe_id"] == CALLER.spiffe_id
    assert first["key"]["id"] is None and first["evidence_sha256"] is None
    assert (second["reason"], second["caller"]["spiffe_id"]) == ("PEER_CERT_EXPIRED", None)


def test_refusals_counted_past_the_budget_reach_the_log_when_the_caller_slows_down(
    authority, tmp_path
) -> None:
    """Refusals counted past a caller's budget were written only by its next counting record,
    which comes only while it stays over its rate: a caller that slowed down to within it (its
    refusals recorded one by one again) left those counted ones out of the log for ever. Its next
    refusal recorded on its own now carries the count."""
    now = [1000.0]
    engine, log = _real_audit_engine(authority, tmp_path, monotonic=lambda: now[0])
    stranger = Caller("spiffe://strongroom.test/stranger", 7, b"der")
    for _ in range(64 + 1 + 5):  # the burst, a counting record, 5 counted
        engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)
    now[0] += 10.0  # within the rate again: recorded one by one, before any counting is due
    for _ in range(3):
        engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)
    counted = [
        json.loads(line)["claims"].get("refusals_unrecorded")
        for line in log.read_text().splitlines()
    ]
    assert counted == [None] * 64 + [0] + [5, None, None]


def test_refusals_before_the_request_is_read_cannot_fill_the_audit_log(authority, tmp_path) -> None:
    """An identity without the inference role (any holder of a CA certificate) sending ReleaseKey
    in a loop had every refusal fsync'd into the log: about 460 KB/s from one client, the Helm
    log limit in half an hour, and then every release refused AUDIT_LOG_FULL. Past 64 per caller,
    then one a second, they are counted and recorded once a minute with the count."""
    now = [1000.0]
    engine, log = _real_audit_engine(authority, tmp_path, monotonic=lambda: now[0])
    stranger = Caller("spiffe://strongroom.test/stranger", 7, b"der")

    def refuse(times: int) -> None:
        for _ in range(times):
            engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)

    refuse(64 + 10)
    now[0] += 60.0  # the bucket refills 60, and a counting record is due again
    refuse(60 + 1)
    records = read_audit_records(log)
    assert {(r["reason"], r["caller"]["spiffe_id"]) for r in records} == {
        ("PEER_NOT_ALLOWED", stranger.spiffe_id)
    }
    counted = [r["claims"].get("refusals_unrecorded") for r in records]
    # 64 one by one; the 65th says none went unrecorded before it, 9 then do; 60 one by one
    # after the refill, the first carrying the 9; the next is a counting record again (none since).
    assert counted == [None] * 64 + [0] + [9] + [None] * 59 + [0]
    # Another caller has its own budget; so do the refusals of a request that was read
    # (engine.deny), per reason: 64 one by one, then a counting record.
    engine.deny_unread(PeerNotAllowed("no inference role"), None, ROLELESS)
    for _ in range(70):
        engine.deny(
            InvalidArgument("bad", reason="EVIDENCE_MALFORMED"), CALLER, key_id="k1", report=b""
        )
    assert len(read_audit_records(log)) == len(records) + 1 + 64 + 1


def test_a_caller_that_stops_while_over_its_budget_has_its_count_recorded(
    authority, tmp_path
) -> None:
    """Refusals counted past a caller's budget were written only by that caller's later
    refusals: one that flooded and stopped (up to a minute of refusals at any rate) left its
    count out of the log for good. The broker's pass records due counts once a minute, and every
    count at shutdown."""
    now = [1000.0]
    engine, log = _real_audit_engine(authority, tmp_path, monotonic=lambda: now[0])
    stranger = Caller("spiffe://strongroom.test/stranger", 7, b"der")
    for _ in range(64 + 1 + 500):  # the budget, the counting record, then 500 only counted
        engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)

    def counts() -> list[tuple[str, int]]:
        return [
            (r["reason"], r["claims"]["refusals_unrecorded"])
            for r in read_audit_records(log)
            if r["reason"] == "REFUSALS_COUNTED"
        ]

    engine.record_counted_refusals()  # the periodic pass: not a minute since the last record
    assert counts() == []
    now[0] += 60.0
    engine.record_counted_refusals()
    assert counts() == [("REFUSALS_COUNTED", 500)]
    for _ in range(60 + 3):  # the minute's refill, recorded one by one, then 3 counted again
        engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)
    engine.record_counted_refusals(every=True)  # shutdown
    assert counts()[-1] == ("REFUSALS_COUNTED", 3)
    record = read_audit_records(log)[-1]
    assert (record["decision"], record["caller"]["spiffe_id"]) == ("denied", stranger.spiffe_id)
    engine.record_counted_refusals(every=True)
    assert len(counts()) == 2  # nothing left to record


def test_a_flood_of_one_unread_refusal_leaves_another_reason_recorded_and_counted_as_its_own(
    authority, tmp_path
) -> None:
    """Releases refused before their request was read had one budget per caller for every
    reason, and their counts named none: a replica flooding undecodable requests (its fleet's
    SPIFFE ID is one bucket) left the fleet's other refusals (here a request whose message never
    came) only counted, in a count an auditor read as more undecodable requests, and the
    broker's pass wrote that count naming no reason. Each reason now has its first refusals
    recorded in full, and each count names the reason it counts."""
    now = [1000.0]
    engine, log = _real_audit_engine(authority, tmp_path, monotonic=lambda: now[0])
    fleet = Caller("spiffe://strongroom.test/inference", 7, b"der")

    def refuse(reason: str, times: int) -> None:
        for _ in range(times):
            refusal = InvalidArgument("refused unread", reason=reason)
            engine.deny_unread(refusal, fleet, fleet.spiffe_id)

    refuse("MALFORMED_REQUEST", 64 + 1 + 30)  # the budget, a counting record, 30 only counted
    refuse("REQUEST_MESSAGE_TIMEOUT", 2)
    now[0] += 60.0
    engine.record_counted_refusals()
    records = read_audit_records(log)
    timeouts = [r for r in records if r["reason"] == "REQUEST_MESSAGE_TIMEOUT"]
    assert len(timeouts) == 2 and timeouts[0]["caller"]["spiffe_id"] == fleet.spiffe_id
    counted = [
        (r["claims"].get("counted_reason"), r["claims"]["refusals_unrecorded"])
        for r in records
        if r["reason"] == "REFUSALS_COUNTED"
    ]
    assert counted == [("MALFORMED_REQUEST", 30)]


def test_counts_whose_record_the_audit_log_refuses_are_kept_for_a_later_record(
    authority, tmp_path, monkeypatch
) -> None:
    """A count was taken from the table before its record was written: when the audit log
    refused that record (full, its disk failing: what a flood of refusals brings about), the
    broker's pass only logged the count and a caller's counting record lost it without a word,
    and a budgeted refusal whose own record failed was neither recorded nor counted. Such counts
    and refusals are now counted again, and reach the log once it takes records again."""
    now = [1000.0]
    engine, log = _real_audit_engine(authority, tmp_path, monotonic=lambda: now[0])
    stranger = Caller("spiffe://strongroom.test/stranger", 7, b"der")
    context = {**ReleaseEngine._context(CALLER, b"report"), "key_id": "k1"}
    for _ in range(64 + 1 + 500):  # the budget, the counting record, then 500 only counted
        engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)
    for _ in range(64 + 1 + 7):
        engine._refused(InvalidArgument("bad", reason="NONCE_EXPIRED"), context)
    written = len(read_audit_records(log))
    real_append = engine._audit.append

    def full(event: AuditEvent, **kwargs: Any) -> AuditRecord:
        raise AuditUnavailable("the audit log is full", reason="AUDIT_LOG_FULL")

    monkeypatch.setattr(engine._audit, "append", full)
    now[0] += 60.0
    engine.record_counted_refusals()  # both counts are due: their records fail
    now[0] += 1.0  # a token each: these records are due one by one, with no count left
    engine.deny_unread(PeerNotAllowed("no inference role"), stranger, stranger.spiffe_id)
    engine._refused(InvalidArgument("bad", reason="NONCE_EXPIRED"), context)
    monkeypatch.setattr(engine._audit, "append", real_append)
    assert len(read_audit_records(log)) == written  # nothing reached the log meanwhile
    engine.record_counted_refusals(every=True)
    counted = {
        (r["caller"]["spiffe_id"], r["claims"].get("counted_reason")): r["claims"][
            "refusals_unrecorded"
        ]
        for r in read_audit_records(log)[written:]
    }
    assert counted == {
        (stranger.spiffe_id, "PEER_NOT_ALLOWED"): 500 + 1,
        (CALLER.spiffe_id, "NONCE_EXPIRED"): 7 + 1,
    }


def test_each_decision_names_its_policy_document_and_a_hand_edit_is_recorded_before_use(
    authority, tmp_path, monkeypatch
) -> None:
    """Records named the judging policy only by its version, and a document edited by hand in
    the policy directory was never recorded: an edit that kept the version (here the caller
    replaced, same size and mtime as rsync -a leaves it) made every record of that version name two
    documents. Each document is now recorded in force before its first decision, and each
    decision carries its SHA-256; a record that fails leaves the document unused."""
    audit_key = Ed25519PrivateKey.generate()
    # The policy is stored, not yet judged by: nothing recorded.
    engine, _ = _real_audit_engine(authority, tmp_path, audit_key=audit_key, policies_audited=True)
    audit = engine._audit

    def records() -> list[dict[str, Any]]:
        return read_audit_records(tmp_path / "audit.log")

    first = hashlib.sha256(POLICY.encode()).hexdigest()
    engine.release(_request(engine, authority), CALLER)
    engine.release(_request(engine, authority), CALLER)
    assert [(r["action"], r["reason"], r["policy_sha256"]) for r in records()] == [
        ("policy_in_force", "POLICY_IN_FORCE", first),
        ("key_release", "RELEASED", first),
        ("key_release", "RELEASED", first),
    ]
    assert records()[0]["claims"] == {} and records()[0]["policy_version"] == "p1"

    edited = POLICY.replace("strongroom.test/inference", "strongroom.test/inferenz2")
    assert len(edited) == len(POLICY)
    replace_keeping_mtime(tmp_path / "policies" / "k1.yaml", edited)
    second = hashlib.sha256(edited.encode()).hexdigest()
    real_append = audit.append

    def failing_append(event: AuditEvent, **kwargs: Any) -> AuditRecord:
        if event.action == "policy_in_force":
            raise AuditUnavailable("the audit disk is gone")
        return real_append(event, **kwargs)

    monkeypatch.setattr(audit, "append", failing_append)
    with pytest.raises(AuditUnavailable):  # an outage, said as one: not "not permitted"
        engine.release(_request(engine, authority), CALLER)
    monkeypatch.setattr(audit, "append", real_append)
    with pytest.raises(PermissionDenied) as info:
        engine.release(_request(engine, authority), CALLER)  # now judged by the edit
    assert info.value.reason == "CALLER_NOT_ALLOWED"
    tail = records()[3:]
    # Nothing was decided under the edit while its record failed (the outage's refusal is not
    # recorded either: the log is what failed).
    assert [(r["action"], r["reason"], r["policy_sha256"]) for r in tail] == [
        ("policy_in_force", "POLICY_IN_FORCE", second),
        ("key_release", "CALLER_NOT_ALLOWED", second),
    ]
    assert tail[0]["claims"] == {"previous_policy_sha256": first}
    assert verify_audit_log(tmp_path / "audit.log", public_key=audit_key.public_key()).intact


def test_refusals_the_budget_never_leaves_out(authority, tmp_path) -> None:
    """Past a caller's budget for a reason its refusals are counted, but not the broker's own
    failures (here a bug, recorded INTERNAL, and an HSM outage), nor the denial that follows a
    decision's ALLOWED record (its outcome); a count whose record the log refuses in full is
    still written, on the record of who asked."""
    now = [1000.0]
    engine, log = _real_audit_engine(authority, tmp_path, monotonic=lambda: now[0])
    context = {**ReleaseEngine._context(CALLER, b"report"), "key_id": "k1"}
    for _ in range(64 + 1 + 2):  # the budget, a counting record, 2 counted
        engine._refused(InvalidArgument("bad", reason="NONCE_EXPIRED"), context)
    for _ in range(66):
        engine._refused(RuntimeError("bug"), context)
        engine._refused(HsmUnavailable("the token went away"), context)
        engine._refused(
            InvalidArgument("bad", reason="NONCE_EXPIRED"), {**context, "decision_id": "d1"}
        )
    now[0] += 60.0  # refilled: the next is recorded on its own, with the 2 counted
    engine._refused(
        InvalidArgument("bad", reason="NONCE_EXPIRED"), {**context, "policy_version": "v" * 300}
    )
    engine.record_counted_refusals(every=True)  # nothing left to count
    records = read_audit_records(log)
    reasons = [(r["reason"], r["decision_id"] == "d1") for r in records]
    assert reasons.count(("INTERNAL", False)) == 66
    assert reasons.count(("HSM_UNAVAILABLE", False)) == 66
    assert reasons.count(("NONCE_EXPIRED", True)) == 66
    assert [r["claims"] for r in records if r["reason"] in ("NONCE_EXPIRED", "REFUSALS_COUNTED")][
        64:
    ] == [{"refusals_unrecorded": 0}, *[{}] * 66, {"refusals_unrecorded": 2}]
    assert (records[-1]["policy_version"], records[-1]["caller"]["spiffe_id"]) == (
        None,
        CALLER.spiffe_id,
    )


def test_a_vcek_the_brokers_kds_url_serves_from_another_chain_is_audited_as_the_brokers(
    authority, tmp_path
) -> None:
    """A release whose VCEK the broker fetched from a kds_url that is not AMD KDS (a certificate
    of another chain) was refused ROOT_NOT_TRUSTED, the caller's fault, counted against its
    budget. Its refusal is the broker's now (UNAVAILABLE VCEK_FETCHED_UNTRUSTED; the URL, the
    broker's internal endpoint, is in its log line, not in the caller's message nor the audit),
    audited with that reason, and outside the caller's refusal budget."""
    server = FakeCollateralServer()
    try:
        foreign = SimulatedAuthority.generate(product="Genoa").snp()
        settings = FetchSettings(kds_url=server.url, pcs_url=server.url, retries=0)
        service = CollateralService(
            CollateralCache(tmp_path / "collateral", authority.trust_store()),
            settings,
            retry_after_seconds=0.0,  # every release asks again: each is the broker's failure
        )
        engine, log = _real_audit_engine(authority, tmp_path, collateral=service)
        for _ in range(2):
            request = _request(engine, authority)
            platform_report = request.evidence.report
            report = parse_snp_report(platform_report)
            server.vcek("Milan", report.chip_id, report.reported_tcb.components(),
                        foreign.certificate_der)  # fmt: skip
            unsent = dataclasses.replace(request.evidence, certificates=())
            with pytest.raises(Unavailable) as info:
                engine.release(dataclasses.replace(request, evidence=unsent), CALLER)
            assert info.value.reason == "VCEK_FETCHED_UNTRUSTED" and not caused_by_caller(
                info.value
            )
            # The broker's internal endpoint is its operators' (the log line names it), never
            # the caller's: the message is the gRPC status's.
            assert server.url.removeprefix("http://") not in info.value.message
            assert "the broker's kds_url" in info.value.message
    finally:
        server.close()
    records = read_audit_records(log)
    assert [r["reason"] for r in records] == ["VCEK_FETCHED_UNTRUSTED"] * 2
    assert server.url.removeprefix("http://") not in log.read_text()
    assert {(r["decision"], r["caller"]["spiffe_id"]) for r in records} == {
        ("denied", CALLER.spiffe_id)
    }
