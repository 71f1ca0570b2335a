"""Key releases granted to a genuine caller are budgeted: per certificate and per SPIFFE ID.

A caller whose evidence is genuine had ``ReleaseKey`` granted at the broker's pace, each an
fsync'd ``ALLOWED`` record and an HSM unwrap and re-wrap, without limit. A real release engine
(keys on this test's SoftHSM2 token, a real signed audit log, a policy store on disk, simulated
SEV-SNP evidence), with small grant limits and a clock the test drives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.attestation import Evidence
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import ResourceExhausted
from strongroom.keybroker import release as release_module
from strongroom.keybroker.errors import AuditUnavailable, KeyStateMoving
from strongroom.keybroker.grant_budget import GrantBudget, GrantLimits
from strongroom.keybroker.keys import WRAPPED_DEK_BYTES, KeyManager
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller
from tests.keybroker.helpers import POLICY, flap_during, spki
from tests.keybroker.test_audit_floods import OAEP_SHA1, Broker, _accounted, _broker, _replica

REASON = "RELEASES_RATE_LIMITED"
CERTIFICATE_BURST, IDENTITY_BURST = 3, 5
# Slow enough that a minute refills nothing (the counting records are a minute apart).
RATE = 1.0 / 600
OTHER = "spiffe://strongroom.test/inference-b"


@pytest.fixture
def now() -> list[float]:
    return [1000.0]


@pytest.fixture
def broker(
    km: KeyManager,
    sim_authority: SimulatedAuthority,
    tee_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    now: list[float],
) -> Iterator[Broker]:
    """A broker granting 3 releases at once per certificate and 5 per SPIFFE ID, then one each
    10 minutes, on the test's clock; its policy names a second identity too."""
    limits = GrantLimits(
        certificate_burst=CERTIFICATE_BURST,
        certificate_rate=RATE,
        identity_burst=IDENTITY_BURST,
        identity_rate=RATE,
    )
    with _broker(
        km,
        sim_authority,
        tee_key,
        tmp_path,
        sim_authority.collateral_source(),
        monotonic=lambda: now[0],
        grant_limits=limits,
    ) as b:
        policies: PolicyStore = b.engine._policies
        policies.put(
            "k1",
            POLICY.replace('version: "p1"', 'version: "p2"').replace(
                '"]\ntee_types', f'", "{OTHER}"]\ntee_types'
            ),
        )
        yield b


@pytest.fixture
def hsm_calls(broker: Broker, km: KeyManager, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key ids the real HSM was asked to re-wrap for a release, from now on."""
    calls: list[str] = []
    real = km.begin_release

    def counted(key_id: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(key_id)
        return real(key_id, *args, **kwargs)

    monkeypatch.setattr(km, "begin_release", counted)
    return calls


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The reports the broker verified (the real verification), from now on."""
    reports: list[bytes] = []
    real = release_module.verify_evidence

    def counted(evidence: Evidence, **kwargs: Any) -> Any:
        reports.append(evidence.report)
        return real(evidence, **kwargs)

    monkeypatch.setattr(release_module, "verify_evidence", counted)
    return reports


def _grant(b: Broker, times: int = 1) -> None:
    for _ in range(times):
        outcome = b.engine.release(b.request(), b.caller)
        assert b.ephemeral.decrypt(outcome.wrapped_data_key, OAEP_SHA1)


def _limited(b: Broker) -> ResourceExhausted:
    refusal = b.refuse(b.request())
    assert isinstance(refusal, ResourceExhausted) and refusal.reason == REASON
    return refusal


def _reasons(b: Broker) -> list[str]:
    return [r["reason"] for r in b.records()]


def test_a_certificate_past_its_burst_is_refused_before_the_hsm(
    broker: Broker, hsm_calls: list[str]
) -> None:
    _grant(broker, CERTIFICATE_BURST)
    assert len(hsm_calls) == CERTIFICATE_BURST
    refusal = _limited(broker)  # before: granted, a fourth ALLOWED record and re-wrap
    assert "to this certificate" in refusal.message and "retry later" in refusal.message
    assert len(hsm_calls) == CERTIFICATE_BURST
    records = broker.records()
    assert [r["reason"] for r in records].count("RELEASED") == CERTIFICATE_BURST
    last = records[-1]
    assert (last["decision"], last["reason"]) == ("denied", REASON)
    assert last["caller"] == {**last["caller"], "cert_serial": "2a"}
    assert last["claims"]["refusals_unrecorded"] == 0  # the first of its run, carrying none


def test_certificates_of_one_identity_share_its_budget_and_other_identities_keep_theirs(
    broker: Broker, hsm_calls: list[str]
) -> None:
    first, second, minted = broker, _replica(broker, 0x2B), _replica(broker, 0x2C)
    _grant(first, CERTIFICATE_BURST)
    for _ in range(10):  # refused on its own budget: the identity's is not spent by them
        _limited(first)
    _grant(second, IDENTITY_BURST - CERTIFICATE_BURST)
    refusal = _limited(second)  # its own budget has one left; its SPIFFE ID's has none
    assert "to this SPIFFE ID" in refusal.message
    assert "to this SPIFFE ID" in _limited(minted).message  # a new certificate buys nothing
    assert len(hsm_calls) == IDENTITY_BURST
    tls = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = dataclasses.replace(broker, caller=Caller(OTHER, 0x2A, spki(tls)))
    _grant(other, CERTIFICATE_BURST)  # the same serial, another identity: budgets of its own
    assert len(hsm_calls) == IDENTITY_BURST + CERTIFICATE_BURST


def test_rate_limited_releases_are_recorded_once_a_minute_and_counted_in_between(
    broker: Broker, now: list[float]
) -> None:
    _grant(broker, CERTIFICATE_BURST)
    flood = 200
    for _ in range(flood):
        _limited(broker)
    # Before: 200 more RELEASED records. One record of the run, the rest counted.
    assert _reasons(broker) == ["RELEASED"] * CERTIFICATE_BURST + [REASON]
    now[0] += 60.0
    _limited(broker)
    last = broker.records()[-1]
    assert (last["reason"], last["claims"]["refusals_unrecorded"]) == (REASON, flood - 1)
    for _ in range(7):
        _limited(broker)
    broker.engine.record_counted_refusals(every=True)  # at shutdown: what a stopped caller left
    records = broker.records()
    assert len(records) == CERTIFICATE_BURST + 3
    assert (records[-1]["reason"], records[-1]["claims"]) == (
        "REFUSALS_COUNTED",
        {"refusals_unrecorded": 7, "counted_reason": REASON},
    )
    assert _accounted(records, REASON) == flood + 1 + 7


def test_releases_whose_wrapped_key_does_not_unwrap_spend_their_grants(
    broker: Broker, hsm_calls: list[str]
) -> None:
    """A genuine caller controls the wrapped data key it sends: one that does not unwrap failed
    after its take (after its ALLOWED record, or once its releases unwrap first, in the HSM), and
    each such refusal gave its grant back, so a caller sending made-up keys had the HSM's unwrap
    and two records a call (unwrap_first's 64 per certificate, then the HSM's work alone)
    outside the grant budget, at the broker's pace. A refusal the caller caused after its take
    now spends its grant, as a release would have."""
    flood = 20
    refusals = [
        broker.refuse(broker.request(wrapped_data_key=bytes(WRAPPED_DEK_BYTES))).reason
        for _ in range(flood)
    ]
    # Before: 20 WRAPPED_KEY_INVALID, 20 re-wraps and 20 ALLOWED records.
    assert refusals == ["WRAPPED_KEY_INVALID"] * CERTIFICATE_BURST + [REASON] * (
        flood - CERTIFICATE_BURST
    )
    assert len(hsm_calls) == CERTIFICATE_BURST
    assert _reasons(broker).count("RELEASED") == CERTIFICATE_BURST
    _limited(broker)  # its genuine releases too: the grants went to the made-up keys


def test_the_budget_refills_and_a_release_refused_for_the_brokers_failure_gives_it_back(
    broker: Broker, now: list[float], hsm_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = broker.engine._audit
    real_append = audit.append

    def full(event: Any, **kwargs: Any) -> Any:
        raise AuditUnavailable("the audit log is full", reason="AUDIT_LOG_FULL")

    monkeypatch.setattr(audit, "append", full)
    for _ in range(CERTIFICATE_BURST + 2):  # refused after their take by an outage: not grants
        assert broker.refuse(broker.request()).reason == "AUDIT_LOG_FULL"
    monkeypatch.setattr(audit, "append", real_append)
    _grant(broker, CERTIFICATE_BURST)
    _limited(broker)  # before: granted
    now[0] += 1.0 / RATE - 1.0
    _limited(broker)
    now[0] += 1.0
    _grant(broker)
    _limited(broker)
    assert len(hsm_calls) == 2 * CERTIFICATE_BURST + 2 + 1


def test_a_release_refused_as_its_version_flaps_between_replicas_gives_its_grant_back(
    broker: Broker, replica: Callable[[], KeyManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release whose key version another replica disabled (and enabled again) under each of its
    attempts is refused KEY_DISABLED, and that refusal spent the caller's grant, as if the caller
    had chosen it: the broker's own replicas moved the version's state (only an admin disables,
    no command or RPC enables), and its old answer, HSM_UNAVAILABLE, gave the grant back. Now
    it is given back (and the caller's releases are not put on the unwrap-first path)."""
    flap_during(monkeypatch, "_release_with", replica(), "k1", 1, times=1000)
    for _ in range(CERTIFICATE_BURST + 2):
        refusal = broker.refuse(broker.request())
        assert (type(refusal), refusal.reason) == (KeyStateMoving, "KEY_DISABLED")
    monkeypatch.undo()
    _grant(broker, CERTIFICATE_BURST)  # before: RELEASES_RATE_LIMITED from the first
    _limited(broker)
    assert broker.engine._unwrap_first.certificates_tracked() == 0


def test_a_caller_past_its_budget_is_refused_before_its_evidence_is_verified(
    broker: Broker, now: list[float], verifications: list[bytes]
) -> None:
    """A caller past its budget was refused only after its evidence was verified (a P-384
    signature and the VCEK chain to AMD's root, collateral looked up, per call): every refusal
    cost the broker what a release's verification does. It is refused before that now, taking
    nothing; one whose evidence is then refused (here: a report signed by another chip's key)
    loses no grant to that refusal."""
    _grant(broker, CERTIFICATE_BURST)
    assert len(verifications) == CERTIFICATE_BURST
    for _ in range(5):
        _limited(broker)
    assert len(verifications) == CERTIFICATE_BURST  # before: one verification per refusal
    minted = _replica(broker, 0x2B)
    _grant(minted, IDENTITY_BURST - CERTIFICATE_BURST)
    assert "to this SPIFFE ID" in _limited(_replica(broker, 0x2C)).message
    assert len(verifications) == IDENTITY_BURST
    # A grant back for the certificate and its SPIFFE ID: evidence refused after the check takes
    # none of it, and the next genuine release has it.
    now[0] += 1.0 / RATE
    genuine = broker.request()
    report = bytearray(genuine.evidence.report)
    report[0x2A0] ^= 1  # the report's signature
    evidence = dataclasses.replace(genuine.evidence, report=bytes(report))
    forged = dataclasses.replace(genuine, evidence=evidence)
    assert broker.refuse(forged).reason not in (REASON, "RELEASED")
    _grant(broker)
    _limited(broker)


def test_a_take_its_spiffe_id_refuses_leaves_the_certificate_its_grant(now: list[float]) -> None:
    """A take past the SPIFFE ID's budget (reached only by releases racing past the check before
    verification) counts nothing against the certificate either: its replica is refused for its
    fleet's budget, not made to wait out its own as well."""
    budget = GrantBudget(GrantLimits(2, RATE, 1, RATE), lambda: now[0])
    budget.take(OTHER, 0x2A)  # the SPIFFE ID's one grant
    for _ in range(3):
        with pytest.raises(ResourceExhausted, match="to this SPIFFE ID"):
            budget.take(OTHER, 0x2A)  # without the refund: "to this certificate" from the second
    now[0] += 1.0 / RATE
    budget.take(OTHER, 0x2A)
