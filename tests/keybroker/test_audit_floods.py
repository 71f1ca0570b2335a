"""Requests a caller can repeat to have the key broker write audit records: each is budgeted
(recorded one by one up to a budget, counted past it) and still accounted for in the log.

A real release engine: keys on this test's SoftHSM2 token, a real signed audit log, a policy
store on disk, simulated SEV-SNP evidence, and for the collateral the broker's own service
fetching from a loopback KDS.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.attestation.binding import report_data_for
from strongroom.attestation.collateral import CollateralSource
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import CollateralService, FetchSettings
from strongroom.attestation.release_signature import ReleaseSigner
from strongroom.dev.devstack import read_audit_records
from strongroom.dev.simulated import SimulatedAuthority, SimulatedSnp
from strongroom.errors import InvalidArgument, PermissionDenied, StrongroomError, Unavailable
from strongroom.keybroker import fetch_budget, refusals
from strongroom.keybroker.audit import AuditLog
from strongroom.keybroker.challenge import ChallengeIssuer
from strongroom.keybroker.config import MAX_RELEASE_BURST, MAX_RELEASE_RATE
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.keybroker.grant_budget import GrantLimits
from strongroom.keybroker.keys import WRAPPED_DEK_BYTES, DataKey, KeyManager
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.release import Caller, ReleaseEngine, ReleaseRequest
from strongroom.oaep import OaepHash
from strongroom.runtime.secrets import Secret
from tests.attestation.collateral_server import FakeCollateralServer
from tests.keybroker.helpers import MEASUREMENT, MODEL, POLICY, bound, spki

OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
BURST, BROKER_BURST = refusals.REFUSAL_BURST, refusals.BROKER_REFUSAL_BURST


@dataclasses.dataclass
class Broker:
    engine: ReleaseEngine
    log: Path
    caller: Caller
    ephemeral: rsa.RSAPrivateKey
    data_key: DataKey
    platform: SimulatedSnp

    def request(self, **overrides: Any) -> ReleaseRequest:
        """A release of k1 with fresh, genuine evidence from the caller's one platform
        (``certificates``: what the evidence carries besides the report)."""
        nonce = self.engine.challenge("k1", self.caller).nonce
        ephemeral = spki(self.ephemeral)
        evidence = self.platform.evidence(
            report_data_for(nonce, ephemeral, self.caller.tls_public_key_der),
            measurement=MEASUREMENT,
        )
        if "certificates" in overrides:
            evidence = dataclasses.replace(evidence, certificates=overrides.pop("certificates"))
        fields: dict[str, Any] = {
            "key_id": "k1",
            "key_version": self.data_key.version,
            "wrapped_data_key": self.data_key.wrapped,
            "evidence": evidence,
            "ephemeral_public_key_der": ephemeral,
            "nonce": nonce,
            "accepted_mechanisms": [OaepHash.SHA1],
        }
        return ReleaseRequest(**{**fields, **overrides})

    def refuse(self, request: ReleaseRequest) -> StrongroomError:
        with pytest.raises(StrongroomError) as info:
            self.engine.release(request, self.caller)
        return info.value

    def records(self) -> list[dict[str, Any]]:
        return read_audit_records(self.log)


@contextmanager
def _broker(
    km: KeyManager,
    authority: SimulatedAuthority,
    tee_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    collateral: CollateralSource,
    **engine_args: Any,
) -> Iterator[Broker]:
    """A broker whose refusal budgets never refill (its monotonic clock stands still, unless
    ``engine_args`` give it another)."""
    km.create_key("k1")
    data_key = km.generate_data_key("k1", *MODEL)
    audit = AuditLog.open(tmp_path / "audit.log", Ed25519PrivateKey.generate())
    policies = PolicyStore(tmp_path / "policies", production=False)
    policies.put("k1", POLICY)
    engine = ReleaseEngine(
        keys=km,
        challenges=ChallengeIssuer(Secret(os.urandom(32))),
        policies=policies,
        trust=authority.trust_store(),
        audit=audit,
        collateral=collateral,
        signer=ReleaseSigner(Ed25519PrivateKey.generate()),
        **{"monotonic": lambda: 1000.0, **engine_args},
    )
    tls = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    caller = Caller("spiffe://strongroom.test/inference", 0x2A, spki(tls))
    try:
        yield Broker(engine, tmp_path / "audit.log", caller, tee_key, data_key, authority.snp())
    finally:
        audit.close()


@pytest.fixture
def broker(
    km: KeyManager, sim_authority: SimulatedAuthority, tee_key: rsa.RSAPrivateKey, tmp_path: Path
) -> Iterator[Broker]:
    """A broker verifying with the simulated authority's collateral."""
    with _broker(km, sim_authority, tee_key, tmp_path, sim_authority.collateral_source()) as b:
        yield b


@pytest.fixture
def grants_unbudgeted(
    km: KeyManager, sim_authority: SimulatedAuthority, tee_key: rsa.RSAPrivateKey, tmp_path: Path
) -> Iterator[Broker]:
    """:func:`broker` with a grant budget no test here meets: a made-up wrapped key spends its
    caller's grant (:mod:`strongroom.keybroker.grant_budget`), 64 per certificate by default, the
    number of failures after ``ALLOWED`` unwrap_first admits; these tests go past that."""
    limits = GrantLimits(
        certificate_burst=MAX_RELEASE_BURST,
        certificate_rate=MAX_RELEASE_RATE,
        identity_burst=MAX_RELEASE_BURST,
        identity_rate=MAX_RELEASE_RATE,
    )
    collateral = sim_authority.collateral_source()
    with _broker(km, sim_authority, tee_key, tmp_path, collateral, grant_limits=limits) as b:
        yield b


@pytest.fixture
def broker_kds_down(
    km: KeyManager, sim_authority: SimulatedAuthority, tee_key: rsa.RSAPrivateKey, tmp_path: Path
) -> Iterator[Broker]:
    """A broker with its own collateral service: the CRLs cached, AMD KDS answering 503 to
    everything (no retries; a failed fetch is backed off for the default minute)."""
    server = FakeCollateralServer()
    server.status = 503
    cache = CollateralCache(tmp_path / "collateral", sim_authority.trust_store())
    sim_authority.fill_cache(cache)
    service = CollateralService(
        cache, FetchSettings(kds_url=server.url, pcs_url=server.url, retries=0)
    )
    try:
        with _broker(km, sim_authority, tee_key, tmp_path, service) as b:
            yield b
    finally:
        server.close()


def _accounted(records: list[dict[str, Any]], reason: str) -> int:
    """Refusals of ``reason`` the log accounts for: one per record of it, plus the counts."""
    return sum(
        (r["reason"] == reason) + r["claims"].get("refusals_unrecorded", 0)
        for r in records
        if r["reason"] == reason or r["claims"].get("counted_reason") == reason
    )


def test_reports_naming_a_chip_whose_vcek_fetch_is_backed_off_cannot_fill_the_log(
    broker_kds_down: Broker,
) -> None:
    """While a chip and TCB's VCEK fetch was backed off after KDS failed, every report naming
    them (forged or not, from any caller the policy names) was refused COLLATERAL_MISSING, the
    broker's failure, and each was an audit record outside any budget: at the caller's pace.
    The broker's failures have a budget of their own now, larger than the caller's: the first
    256 per caller and reason in full, then counted; the caller's own budget is untouched, and a
    release once the VCEK is at hand goes through."""
    b = broker_kds_down
    flood = BROKER_BURST + 40
    reasons = [b.refuse(b.request(certificates=())) for _ in range(flood)]
    assert all(isinstance(r, Unavailable) for r in reasons)
    assert [r.reason for r in reasons[:2]] == ["COLLATERAL_FETCH_FAILED", "COLLATERAL_MISSING"]
    assert {r.reason for r in reasons[1:]} == {"COLLATERAL_MISSING"}
    records = b.records()
    # Before: one record per refusal, `flood` of them.
    assert len(records) == 1 + BROKER_BURST + 1  # the fetch's failure, the burst, a counting one
    assert records[-1]["claims"] == {**records[-1]["claims"], "refusals_unrecorded": 0}
    # The caller's own refusals were not spent by the outage: recorded in full.
    wrong_nonce = b.request(nonce=os.urandom(32))
    assert b.refuse(wrong_nonce).reason.startswith("NONCE")
    own = b.records()[-1]
    assert own["reason"].startswith("NONCE") and "refusals_unrecorded" not in own["claims"]
    # The VCEK at hand (carried in the evidence): released, and the answer opens to the key.
    outcome = b.engine.release(b.request(), b.caller)
    assert bound(b.ephemeral.decrypt(outcome.wrapped_data_key, OAEP_SHA1)) == b.data_key.dek
    b.engine.record_counted_refusals(every=True)
    records = b.records()
    assert records[-1]["reason"] == "REFUSALS_COUNTED"
    assert records[-1]["claims"] == {
        "refusals_unrecorded": flood - 1 - BROKER_BURST - 1,
        "counted_reason": "COLLATERAL_MISSING",
    }
    assert _accounted(records, "COLLATERAL_MISSING") == flood - 1
    assert [r["reason"] for r in records].count("RELEASED") == 1


def test_a_policy_that_does_not_load_cannot_have_its_refusals_fill_the_log(
    broker: Broker,
) -> None:
    """A key whose stored policy does not read (the broker's configuration error) had every
    release of it by any caller with the role recorded, POLICY_UNREADABLE outside any budget,
    without the caller having to send valid evidence (the policy is read first). Budgeted as the
    broker's failure now, and accounted for by count past it."""
    path = Path(broker.engine._policies._dir) / "k1.yaml"
    path.write_bytes(path.read_bytes() + b'description: "caf\xe9"\n')
    flood = BROKER_BURST + 10
    for _ in range(flood):
        refusal = broker.refuse(broker.request())
        assert isinstance(refusal, PermissionDenied) and refusal.reason == "CALLER_NOT_ALLOWED"
    assert len(broker.records()) == BROKER_BURST + 1  # before: `flood`
    broker.engine.record_counted_refusals(every=True)
    assert _accounted(broker.records(), "POLICY_UNREADABLE") == flood


def test_a_genuine_caller_sending_garbage_wrapped_keys_cannot_fill_the_log(
    grants_unbudgeted: Broker,
) -> None:
    """The HSM re-wraps once the ALLOWED record has its place in the log: a wrapped data key
    that does not unwrap was an ALLOWED record and then a DENIED one, both outside any budget,
    for every call of a genuinely attested caller. Past 64 such failures its releases are
    unwrapped before their record: a garbage key is then an ordinary refusal of the caller's,
    under its budget per reason, and a good one is still released (and recorded)."""
    broker = grants_unbudgeted
    garbage = bytes(WRAPPED_DEK_BYTES)
    extra = 20
    flood = BURST + BURST + 1 + extra
    for _ in range(flood):
        refusal = broker.refuse(broker.request(wrapped_data_key=garbage))
        assert isinstance(refusal, InvalidArgument) and refusal.reason == "WRAPPED_KEY_INVALID"
    records = broker.records()
    # Before: 2 * flood records, an ALLOWED and a DENIED for each.
    assert len(records) == 2 * BURST + BURST + 1
    decided, first = records[: 2 * BURST], records[2 * BURST :]
    assert [r["decision"] for r in decided] == ["allowed", "denied"] * BURST
    assert all(r["decision_id"] for r in decided)
    assert {(r["decision"], r["reason"]) for r in first} == {("denied", "WRAPPED_KEY_INVALID")}
    assert [r["claims"].get("refusals_unrecorded") for r in first][-2:] == [None, 0]
    # A good key from the same caller: released, its ALLOWED record written before the answer.
    outcome = broker.engine.release(broker.request(), broker.caller)
    assert bound(broker.ephemeral.decrypt(outcome.wrapped_data_key, OAEP_SHA1)) == (
        broker.data_key.dek
    )
    assert (broker.records()[-1]["reason"], broker.records()[-1]["decision_id"]) == (
        "RELEASED",
        outcome.decision_id,
    )
    broker.engine.record_counted_refusals(every=True)
    records = broker.records()
    assert records[-1]["claims"] == {
        "refusals_unrecorded": extra,
        "counted_reason": "WRAPPED_KEY_INVALID",
    }
    assert _accounted(records, "WRAPPED_KEY_INVALID") == flood


def _replica(b: Broker, serial: int) -> Broker:
    """Another replica of the caller's fleet: the same SPIFFE ID, a certificate of its own."""
    tls = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return dataclasses.replace(b, caller=Caller(b.caller.spiffe_id, serial, spki(tls)))


def _decided_allowed_first(records: list[dict[str, Any]]) -> bool:
    """Whether the last record (a denial) follows an ALLOWED record of its decision."""
    last = records[-1]
    assert (last["decision"], last["reason"]) == ("denied", "WRAPPED_KEY_INVALID")
    return any(
        r["decision"] == "allowed" and r["decision_id"] == last["decision_id"] for r in records
    )


def _garbage(b: Broker, times: int) -> None:
    for _ in range(times):
        refusal = b.refuse(b.request(wrapped_data_key=bytes(WRAPPED_DEK_BYTES)))
        assert refusal.reason == "WRAPPED_KEY_INVALID"


def test_one_bad_replica_puts_only_itself_on_the_unwrap_first_path(
    grants_unbudgeted: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """unwrap_first was keyed on the SPIFFE ID, which a fleet's replicas share: one replica
    sending wrapped keys that do not unwrap put every replica's releases on the slower path
    (the re-wrap no longer overlapping the record's sync) for as long as it went on, and nothing
    said so. It is per certificate now (and per SPIFFE ID only four times further: a replica
    minting certificates gains little, see below), and the switch is logged with the caller's
    certificate serial."""
    broker = grants_unbudgeted
    bad, other = broker, _replica(broker, 0x2B)
    _garbage(bad, BURST + 1)
    assert not _decided_allowed_first(bad.records())  # its own: refused before any record
    [line] = [r for r in caplog.records if r.getMessage().startswith("key releases of a caller")]
    assert line.levelname == "WARNING"
    assert (line.__dict__["caller"], line.__dict__["caller_cert_serial"]) == (
        bad.caller.spiffe_id,
        "2a",
    )
    # Another replica of the fleet: its failure after ALLOWED is still decided as before (an
    # ALLOWED and a DENIED record under one decision id); before, it was unwrapped first too.
    _garbage(other, 1)
    allowed, denied = other.records()[-2:]
    assert (allowed["reason"], denied["reason"]) == ("RELEASED", "WRAPPED_KEY_INVALID")
    assert allowed["decision_id"] == denied["decision_id"]
    assert allowed["caller"]["cert_serial"] == "2b"


def test_a_replica_minting_certificates_still_has_its_fleet_unwrap_first(broker: Broker) -> None:
    """Per certificate alone, a replica holding its service's provisioner could mint a
    certificate per 64 failures and have two records written per call again: the fleet's
    failures after ALLOWED together have four certificates' worth (256, then 4 a second),
    past which every replica of it unwraps first."""
    fleet = [_replica(broker, 0x100 + i) for i in range(refusals.REASONS_PER_CALLER)]
    for replica in fleet:
        _garbage(replica, BURST)
    allowed = [r for r in broker.records() if r["reason"] == "RELEASED"]
    assert len(allowed) == BURST * refusals.REASONS_PER_CALLER
    newest = _replica(broker, 0x200)
    _garbage(newest, 1)
    assert broker.records()[-1]["caller"]["cert_serial"] == "200"
    assert not _decided_allowed_first(broker.records())
    # A good key is still released to it, recorded before the answer.
    outcome = newest.engine.release(newest.request(), newest.caller)
    assert bound(newest.ephemeral.decrypt(outcome.wrapped_data_key, OAEP_SHA1)) == (
        broker.data_key.dek
    )
    assert broker.records()[-1]["decision_id"] == outcome.decision_id


@pytest.fixture
def broker_kds(
    km: KeyManager, sim_authority: SimulatedAuthority, tee_key: rsa.RSAPrivateKey, tmp_path: Path
) -> Iterator[tuple[Broker, FakeCollateralServer]]:
    """A broker with its own collateral service, its VCEK fetches budgeted as the broker's are
    (``VcekFetchBudget``, its clock standing still): the CRLs cached, a loopback AMD KDS that
    answers 404 for any chip a test has not given it."""
    server = FakeCollateralServer()
    cache = CollateralCache(tmp_path / "collateral", sim_authority.trust_store())
    sim_authority.fill_cache(cache)
    service = CollateralService(
        cache,
        FetchSettings(kds_url=server.url, pcs_url=server.url, retries=0),
        vcek_fetch_gate=fetch_budget.VcekFetchBudget(lambda: 1000.0),
    )
    try:
        with _broker(km, sim_authority, tee_key, tmp_path, service) as b:
            yield b, server
    finally:
        server.close()


def test_one_replica_naming_made_up_chips_cannot_hold_back_its_fleets_vcek_fetches(
    broker_kds: tuple[Broker, FakeCollateralServer], sim_authority: SimulatedAuthority
) -> None:
    """The broker's VCEK fetch budget was keyed on the caller's SPIFFE ID, which a fleet's
    replicas share: a replica sending reports of made-up chips spent the fleet's 64 fetches,
    and a genuine replica started on a new machine was refused COLLATERAL_FETCH_RATE_LIMITED.
    The release engine counts fetches per certificate first: the bad replica is refused past
    its own 4 with nothing asked of KDS, and the new machine's VCEK is fetched and its key
    released."""
    b, kds = broker_kds
    bad = _replica(b, 0x2A)
    flood = fetch_budget.VCEK_FETCH_BURST + 4

    def made_up_chip() -> str:
        forged = dataclasses.replace(bad, platform=sim_authority.snp())  # a chip of its own
        return forged.refuse(forged.request(certificates=())).reason

    reasons = [made_up_chip() for _ in range(flood)]
    own = fetch_budget.VCEK_FETCH_CERTIFICATE_BURST
    assert reasons == ["VCEK_NOT_FOUND"] * own + ["COLLATERAL_FETCH_RATE_LIMITED"] * (flood - own)
    assert len(kds.requests) == own
    # A genuine replica on a machine new to the broker: its chip's VCEK is fetched.
    fresh = dataclasses.replace(_replica(b, 0x2B), platform=sim_authority.snp())
    kds.vcek("Milan", fresh.platform.chip_id, fresh.platform.tcb.components(),
             fresh.platform.certificate_der)  # fmt: skip
    outcome = fresh.engine.release(fresh.request(certificates=()), fresh.caller)
    assert bound(fresh.ephemeral.decrypt(outcome.wrapped_data_key, OAEP_SHA1)) == b.data_key.dek
    assert len(kds.requests) == own + 1
    # Every refusal is in the log, by count past the budget.
    b.engine.record_counted_refusals(every=True)
    assert _accounted(b.records(), "COLLATERAL_FETCH_RATE_LIMITED") == flood - own


def test_broker_failures_whose_records_the_log_refuses_are_still_accounted_for(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records plus counts equal refusals for the broker's own failures too when the audit log
    refuses a record (full: what a flood brings about) in the burst, on the first counting
    record past it and on the pass's REFUSALS_COUNTED; all of it reaches the log once it takes
    records again."""
    path = Path(broker.engine._policies._dir) / "k1.yaml"
    path.write_bytes(path.read_bytes() + b'description: "caf\xe9"\n')
    audit = broker.engine._audit
    real_append = audit.append

    def full(event: Any, **kwargs: Any) -> Any:
        raise AuditUnavailable("the audit log is full", reason="AUDIT_LOG_FULL")

    for _ in range(BROKER_BURST - 1):
        broker.refuse(broker.request())
    monkeypatch.setattr(audit, "append", full)
    for _ in range(3):  # the last of the burst, the first past it (due), one counted
        broker.refuse(broker.request())
    broker.engine.record_counted_refusals(every=True)  # refused too: kept
    monkeypatch.setattr(audit, "append", real_append)
    broker.refuse(broker.request())  # counted
    broker.engine.record_counted_refusals(every=True)
    records = broker.records()
    assert len(records) == BROKER_BURST - 1 + 1
    assert records[-1]["reason"] == "REFUSALS_COUNTED"
    assert _accounted(records, "POLICY_UNREADABLE") == BROKER_BURST - 1 + 3 + 1
