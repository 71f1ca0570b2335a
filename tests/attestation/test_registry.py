"""The per-TEE registries are the only path from evidence to a release decision.

A toy TEE, defined in this file only, is registered the way SEV-SNP and TDX are (one verifier
entry, one rules entry) and goes end to end: policy document -> verify_evidence -> evaluate. If
any step branched on the TEE types it knows, the toy would fail there.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import inspect
import json
from datetime import datetime
from typing import Annotated, Any, cast

import pytest

from strongroom.attestation import rules as tee_rules
from strongroom.attestation import verify as verifiers
from strongroom.attestation.claims import VerifiedClaims
from strongroom.attestation.errors import (
    MalformedEvidence,
    PolicyInvalid,
    PolicyViolation,
    VerificationFailed,
)
from strongroom.attestation.evidence import Evidence, TeeType
from strongroom.attestation.policy import ReleasePolicy
from strongroom.attestation.rules import schema
from strongroom.attestation.trust import TrustStore
from strongroom.attestation.verify import verify_evidence
from strongroom.reasons import Reason

CALLER = "spiffe://strongroom.test/inference"
MEAS = bytes(range(32))
RD = hashlib.sha512(b"rd").digest()
_TOY_KEY = b"toy TEE signing key (test only)"


class ToyTee(enum.Enum):
    """A TEE type that exists only in this test (TeeType cannot be extended at run time)."""

    TOY = "TOY"


TOY = cast(TeeType, ToyTee.TOY)


# --- the toy TEE's verifier module: parse -> verify -> claims --------------------------------


@dataclasses.dataclass(frozen=True)
class ToyClaims:
    measurement: bytes
    report_data: bytes
    simulated: bool = True
    collateral_complete: bool = True
    tee_type: TeeType = TOY

    def as_dict(self) -> dict[str, Any]:
        return {"tee_type": "TOY", "measurement": self.measurement.hex()}


def toy_report(measurement: bytes = MEAS, report_data: bytes = RD) -> bytes:
    body = b"TOY1" + measurement + report_data
    return body + hmac.new(_TOY_KEY, body, "sha256").digest()


def verify_toy(
    evidence: Evidence, *, trust: TrustStore, now: datetime, collateral: Any,
    require_collateral: bool, grace: Any,
) -> VerifiedClaims:  # fmt: skip
    raw = evidence.report
    if len(raw) != 4 + 32 + 64 + 32 or raw[:4] != b"TOY1":
        raise MalformedEvidence("not a toy report", reason=Reason.BAD_FIELD)
    body, signature = raw[:-32], raw[-32:]
    if not hmac.compare_digest(hmac.new(_TOY_KEY, body, "sha256").digest(), signature):
        raise VerificationFailed("toy signature", reason=Reason.REPORT_SIGNATURE_INVALID)
    return ToyClaims(measurement=body[4:36], report_data=body[36:])


# --- the toy TEE's rules module ---------------------------------------------------------------


class ToyRules(schema.Section):
    measurements: Annotated[frozenset[bytes], schema.hex_set(32)]
    allow_debug: schema.Bool = False
    allow_simulated: schema.Bool = False  # part of the TeeRules contract (refused in production)

    def evaluate(self, claims: VerifiedClaims) -> bytes:
        toy = cast(ToyClaims, claims)
        if toy.measurement not in self.measurements:
            raise PolicyViolation("toy measurement", reason=Reason.MEASUREMENT_NOT_ALLOWED)
        return toy.measurement


class _ToyPolicy:
    section = "toy"

    def parse(self, section: Any, *, production: bool) -> ToyRules:
        return schema.load(ToyRules, "toy", section)


TOY_POLICY = _ToyPolicy()


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers the toy TEE exactly as production registers SEV-SNP and TDX."""
    monkeypatch.setitem(verifiers._VERIFIERS, TOY, (__name__, "verify_toy"))
    monkeypatch.setitem(tee_rules._RULES, TOY, (__name__, "TOY_POLICY"))


def toy_policy(**toy: object) -> ReleasePolicy:
    doc = {
        "version": "toy-1",
        "allowed_spiffe_ids": [CALLER],
        "tee_types": ["TOY"],
        "toy": {"measurements": [MEAS.hex()], **toy},
    }
    return ReleasePolicy.load(json.dumps(doc))


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tee", list(TeeType))
def test_every_tee_type_has_a_verifier_and_rules(tee: TeeType) -> None:
    assert tee in verifiers._VERIFIERS and tee in tee_rules._RULES
    verifier = verifiers._verifier(tee)
    assert set(inspect.signature(verifier).parameters) == {
        "evidence", "trust", "now", "collateral", "require_collateral", "grace",
    }  # fmt: skip
    module = tee_rules.registered()[tee]
    assert isinstance(module.section, str) and callable(module.parse)
    # Registries name exactly the enum's members: nothing registered for a TEE that does not exist.
    assert set(verifiers._VERIFIERS) == set(TeeType) == set(tee_rules._RULES)


def test_sections_are_distinct_and_not_common_keys() -> None:
    sections = [m.section for m in tee_rules.registered().values()]
    assert len(set(sections)) == len(sections)
    assert not set(sections) & {"version", "description", "allowed_spiffe_ids", "tee_types"}


@pytest.mark.usefixtures("toy_registered")
def test_a_toy_tee_goes_end_to_end_through_the_registries(
    sim_trust: TrustStore, now: datetime
) -> None:
    policy = toy_policy()
    assert set(policy.rules) == {TOY}
    claims = verify_evidence(Evidence(TOY, toy_report()), trust=sim_trust, now=now)
    decision = policy.evaluate(claims, CALLER)
    assert decision.as_dict() == {
        "policy_version": "toy-1", "tee_type": "TOY", "caller_spiffe_id": CALLER,
        "measurement": MEAS.hex(),
    }  # fmt: skip
    policy.check_deployment(trust_domain="strongroom.test", production=True)


@pytest.mark.usefixtures("toy_registered")
def test_a_toy_tee_fails_closed_at_every_step(sim_trust: TrustStore, now: datetime) -> None:
    with pytest.raises(MalformedEvidence) as malformed:
        verify_evidence(Evidence(TOY, b"TOY1"), trust=sim_trust, now=now)
    assert malformed.value.reason == Reason.BAD_FIELD
    forged = bytearray(toy_report())
    forged[10] ^= 1
    with pytest.raises(VerificationFailed) as bad:
        verify_evidence(Evidence(TOY, bytes(forged)), trust=sim_trust, now=now)
    assert bad.value.reason == Reason.REPORT_SIGNATURE_INVALID
    other = verify_evidence(Evidence(TOY, toy_report(bytes(32))), trust=sim_trust, now=now)
    with pytest.raises(PolicyViolation) as denied:
        toy_policy().evaluate(other, CALLER)
    assert denied.value.reason == Reason.MEASUREMENT_NOT_ALLOWED
    incomplete = dataclasses.replace(cast(ToyClaims, other), collateral_complete=False)
    with pytest.raises(PolicyViolation) as gate:
        toy_policy().evaluate(incomplete, CALLER)
    assert gate.value.reason == Reason.COLLATERAL_INCOMPLETE
    with pytest.raises(PolicyInvalid) as unknown:
        toy_policy(mrtd="00")
    assert unknown.value.reason == Reason.POLICY_UNKNOWN_KEY
    assert unknown.value.message == "policy toy.mrtd: is not a known key"
    with pytest.raises(PolicyInvalid) as debug:
        toy_policy(allow_debug=True).check_deployment(
            trust_domain="strongroom.test", production=True
        )
    assert debug.value.reason == Reason.POLICY_DEBUG_IN_PRODUCTION
    assert "toy.allow_debug" in debug.value.message


@pytest.mark.usefixtures("toy_registered")
def test_a_toy_policy_denies_the_other_tees(
    authority: Any, sim_trust: TrustStore, now: datetime
) -> None:
    snp = authority.snp()
    claims = verify_evidence(
        snp.evidence(RD, measurement=bytes(48)), trust=sim_trust, now=now,
        collateral=authority.collateral_source(now=now),
    )  # fmt: skip
    with pytest.raises(PolicyViolation) as err:
        toy_policy().evaluate(claims, CALLER)
    assert err.value.reason == Reason.TEE_TYPE_NOT_ALLOWED


def test_an_unregistered_tee_is_unknown_everywhere(sim_trust: TrustStore, now: datetime) -> None:
    with pytest.raises(PolicyInvalid) as err:
        toy_policy()
    assert err.value.reason == Reason.POLICY_UNKNOWN_KEY  # "toy" is no registered section
    with pytest.raises(MalformedEvidence) as unsupported:
        verify_evidence(Evidence(TOY, toy_report()), trust=sim_trust, now=now)
    assert unsupported.value.reason == Reason.UNSUPPORTED_TEE_TYPE


def test_the_policy_names_no_tee() -> None:
    """policy.py reaches a TEE only through the rules registry."""
    import ast

    from tests.conftest import REPO

    tree = ast.parse((REPO / "strongroom/attestation/policy.py").read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"SEV_SNP", "TDX", "SnpClaims", "TdxClaims", "SnpRules", "TdxRules"}
    assert not [m for m in modules if m.endswith((".snp", ".tdx"))]
