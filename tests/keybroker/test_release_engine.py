"""ReleaseEngine, the release decision, on its own: fakes for the HSM and the audit log, real
challenges, policies, simulated evidence and verifier-owned collateral.

What is checked is the order of the decision: nothing reaches the HSM before the request is well
formed, fresh, covered by a policy, verified and bound; every refusal is audited exactly once with
its reason; an allowed release whose record cannot be written is not answered.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.attestation.binding import report_data_for
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import InvalidArgument, PermissionDenied, StrongroomError
from strongroom.keybroker.audit import AuditEvent, AuditRecord, Decision
from strongroom.keybroker.challenge import ChallengeIssuer
from strongroom.keybroker.ephemeral import EphemeralPublicKey, parse_ephemeral_public_key
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.keybroker.keys import ReleasedKey
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller, ReleaseEngine, ReleaseRequest
from strongroom.oaep import OaepHash
from strongroom.runtime.secrets import Secret

MEASUREMENT = bytes.fromhex("5a" * 48)
POLICY = (
    'version: "p1"\n'
    'allowed_spiffe_ids: ["spiffe://strongroom.test/inference"]\n'
    "tee_types: [SEV_SNP]\n"
    "sev_snp:\n"
    "  allow_simulated: true\n"
    f'  measurements: ["{MEASUREMENT.hex()}"]\n'
    "  min_reported_tcb: any\n"
)


@dataclass
class FakeKeys:
    """Stands in for KeyManager: records what reached the 'HSM'."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail_with: Exception | None = None

    def release_to_ephemeral(self, *args: Any, **kwargs: Any) -> ReleasedKey:
        self.calls.append(args)
        if self.fail_with is not None:
            raise self.fail_with
        return ReleasedKey(b"wrapped-to-ephemeral", OaepHash.SHA1)


@dataclass
class FakeAudit:
    events: list[AuditEvent] = field(default_factory=list)
    fail_allowed: bool = False

    def append(self, event: AuditEvent) -> AuditRecord:
        if self.fail_allowed and event.decision is Decision.ALLOWED:
            raise AuditUnavailable("disk full")
        self.events.append(event)
        return AuditRecord(len(self.events), f"d{len(self.events)}", "now", "h")


@pytest.fixture(scope="module")
def authority() -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=dt.datetime.now(dt.UTC))


@pytest.fixture
def world(authority, tmp_path):
    keys, audit = FakeKeys(), FakeAudit()
    policies = PolicyStore(tmp_path / "policies", production=False)
    policies.put("k1", POLICY)
    engine = ReleaseEngine(
        keys=keys,  # type: ignore[arg-type]
        challenges=ChallengeIssuer(Secret(os.urandom(32))),
        policies=policies,
        trust=authority.trust_store(),
        audit=audit,  # type: ignore[arg-type]
        collateral=authority.collateral_source(),
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
    assert outcome.decision_id == "d1"


@pytest.mark.parametrize(
    ("overrides", "error", "reason"),
    [
        ({"key_id": "Bad Key"}, InvalidArgument, "KEY_ID_INVALID"),
        ({"key_version": 0}, InvalidArgument, "KEY_VERSION_INVALID"),
        ({"wrapped_data_key": b"x"}, InvalidArgument, "WRAPPED_KEY_INVALID"),
        ({"ephemeral_public_key_der": b"junk"}, InvalidArgument, "EPHEMERAL_KEY_INVALID"),
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
    with pytest.raises(StrongroomError):
        engine.release(request, CALLER)
    assert keys.calls == []
    assert [e.decision for e in audit.events] == [Decision.DENIED]


def test_without_a_durable_record_there_is_no_release(world, authority) -> None:
    engine, keys, audit = world
    audit.fail_allowed = True
    with pytest.raises(AuditUnavailable):
        engine.release(_request(engine, authority), CALLER)
    assert len(keys.calls) == 1  # the HSM answered, but the wrapped key is dropped
    assert audit.events == []  # the failure to audit is what is reported


def test_an_unexpected_error_is_audited_as_internal(world, authority) -> None:
    engine, keys, audit = world
    keys.fail_with = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        engine.release(_request(engine, authority), CALLER)
    [event] = audit.events
    assert (event.decision, event.reason) == (Decision.DENIED, "INTERNAL")
