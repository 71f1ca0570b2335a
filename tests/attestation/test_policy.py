"""Release policy: strict loading and precise denials."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from strongroom.attestation import (
    Evidence,
    StaticCollateralSource,
    TdxClaims,
    TeeType,
    TrustStore,
    verify_evidence,
)
from strongroom.attestation.abi.snp import TcbVersion
from strongroom.attestation.errors import (
    PolicyInvalid,
    PolicyViolation,
)
from strongroom.attestation.policy import ReleasePolicy
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.reasons import Reason
from tests.conftest import REPO

CALLER = "spiffe://strongroom.test/inference"
RD = hashlib.sha512(b"rd").digest()
MEAS = bytes(range(48))
MRTD = bytes(range(48, 96))
DEBUG_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"


# fmc too: a policy that may accept Turin must state its FMC minimum.
ZERO_TCB = {"fmc": 0, "bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}


def policy(*, production: bool = True, **overrides: object) -> ReleasePolicy:
    doc: dict[str, object] = {
        "version": "test-1",
        "allowed_spiffe_ids": [CALLER],
        "tee_types": ["SEV_SNP", "TDX"],
        "sev_snp": {
            "measurements": [MEAS.hex()],
            "allow_simulated": True,
            "min_reported_tcb": ZERO_TCB,
        },
        "tdx": {"mrtds": [MRTD.hex()], "allow_simulated": True},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field == "min_reported_tcb" and isinstance(value, dict):
            doc[section][field] = {**ZERO_TCB, **value}  # type: ignore[index]
        elif field:
            doc[section][field] = value  # type: ignore[index]
        elif value is None:
            doc.pop(section)
        else:
            doc[section] = value
    return ReleasePolicy.load(json.dumps(doc), production=production)


@pytest.fixture(scope="module")
def snp(authority: SimulatedAuthority):  # type: ignore[no-untyped-def]
    return authority.snp()


def snp_claims(snp, trust, now, **kw):  # type: ignore[no-untyped-def]
    return verify_evidence(
        snp.evidence(RD, measurement=kw.pop("measurement", MEAS), **kw),
        trust=trust,
        now=now,
        collateral=snp.authority.collateral_source(now=now),
    )


def tdx_claims(authority, trust, now, status="UpToDate", number=17, **kw):  # type: ignore[no-untyped-def]
    tdx = authority.tdx()
    ev = Evidence(TeeType.TDX, tdx.quote(RD, mrtd=kw.pop("mrtd", MRTD), **kw))
    source = StaticCollateralSource(
        tcb_infos=(tdx.tcb_info(now=now, status=status, evaluation_number=number),),
        qe_identity=tdx.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
        crl_list=tuple(authority.crl(i, now=now) for i in ("intel_root", "pck_ca")),
    )
    return verify_evidence(ev, trust=trust, now=now, collateral=source)


def completed(claims):  # type: ignore[no-untyped-def]
    """Real vectors lack some collateral in the public record; judge the rest of the policy."""
    assert not claims.collateral_complete
    deny(Reason.COLLATERAL_INCOMPLETE, _permissive(claims), claims)
    if isinstance(claims, TdxClaims):
        return dataclasses.replace(
            claims, revocation_checked=True, qe_identity_checked=True, collateral_evaluated=True,
            tcb_evaluation_data_number=0,
        )  # fmt: skip
    return dataclasses.replace(claims, revocation_checked=True)


def _permissive(claims):  # type: ignore[no-untyped-def]
    if isinstance(claims, TdxClaims):
        return policy(tdx={"mrtds": [claims.mrtd.hex()], "allow_debug": True})
    return policy(sev_snp={"measurements": [claims.measurement.hex()], "allow_debug": True,
                           "min_reported_tcb": ZERO_TCB})  # fmt: skip


def deny(reason: str, pol: ReleasePolicy, claims, caller: str = CALLER) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyViolation) as err:
        pol.evaluate(claims, caller)
    assert err.value.reason == reason, str(err.value)


def test_allows_matching_snp_and_tdx(snp, authority, sim_trust, now) -> None:
    decision = policy().evaluate(snp_claims(snp, sim_trust, now), CALLER)
    assert decision.as_dict() == {
        "policy_version": "test-1", "tee_type": "SEV_SNP", "caller_spiffe_id": CALLER, "measurement": MEAS.hex(),
    }  # fmt: skip
    assert policy().evaluate(tdx_claims(authority, sim_trust, now), CALLER).tee_type is TeeType.TDX


def test_snp_denials(snp, authority, sim_trust, now) -> None:
    c = snp_claims(snp, sim_trust, now)
    deny(Reason.CALLER_NOT_ALLOWED, policy(), c, "spiffe://strongroom.test/other")
    deny(Reason.TEE_TYPE_NOT_ALLOWED, policy(tee_types=["TDX"], sev_snp=None), c)
    deny(
        Reason.MEASUREMENT_NOT_ALLOWED,
        policy(),
        snp_claims(snp, sim_trust, now, measurement=bytes(48)),
    )
    deny(Reason.DEBUG_FORBIDDEN, policy(), snp_claims(snp, sim_trust, now, policy=0xB0000))
    deny(Reason.VMPL_NOT_ALLOWED, policy(), snp_claims(snp, sim_trust, now, vmpl=1))
    deny(Reason.SMT_FORBIDDEN, policy(sev_snp__allow_smt=False), c)
    deny(Reason.MIGRATE_MA_FORBIDDEN, policy(), snp_claims(snp, sim_trust, now, policy=0x70000))
    deny(
        Reason.SIGNING_KEY_NOT_ALLOWED,
        policy(),
        snp_claims(authority.snp(signing_key="VLEK"), sim_trust, now),
    )
    deny(Reason.PRODUCT_NOT_ALLOWED, policy(sev_snp__products=["Genoa"]), c)
    signed_svn = policy(sev_snp__min_guest_svn=3, sev_snp__id_key_digests=[bytes(48).hex()])
    deny(Reason.GUEST_SVN_TOO_OLD, signed_svn, c)
    deny(Reason.TCB_TOO_OLD, policy(sev_snp__min_reported_tcb={"snp": 25}), c)
    deny(Reason.HOST_DATA_NOT_ALLOWED, policy(sev_snp__host_data=["11" * 32]), c)
    deny(Reason.SIMULATED_TEE_NOT_ALLOWED, policy(sev_snp__allow_simulated=False), c)
    allowed = policy(
        sev_snp__vmpl=1,
        sev_snp__signing_keys=["VCEK", "VLEK"],
        sev_snp__min_reported_tcb={"snp": 24, "fmc": 9},
    )
    allowed.evaluate(snp_claims(snp, sim_trust, now, vmpl=1), CALLER)


ID_KEY, AUTHOR_KEY, HOST_KEY = (bytes([n]) * 48 for n in (0x1D, 0xA7, 0x05))


def test_a_guest_svn_minimum_needs_the_key_that_signs_it() -> None:
    """GUEST_SVN comes from the ID block, which the host that launches the VM may sign with an ID
    key of its own: a minimum loaded without a pinned key, and any host met it."""
    with pytest.raises(PolicyInvalid) as err:
        policy(sev_snp__min_guest_svn=2)
    assert err.value.reason == Reason.POLICY_MISSING_KEY
    assert "sev_snp.min_guest_svn: needs id_key_digests or author_key_digests" in str(err.value)
    policy(sev_snp__min_guest_svn=2, sev_snp__id_key_digests=[ID_KEY.hex()])
    policy(sev_snp__min_guest_svn=2, sev_snp__author_key_digests=[AUTHOR_KEY.hex()])
    policy(sev_snp__min_guest_svn=0)  # no minimum: nothing to vouch for


def test_id_and_author_keys_are_judged_before_the_guest_svn(snp, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    # The host signs an ID block of its own claiming a new SVN for the (allowed) image.
    forged = snp_claims(snp, sim_trust, now, guest_svn=9, id_key_digest=HOST_KEY)
    by_id = policy(sev_snp__min_guest_svn=2, sev_snp__id_key_digests=[ID_KEY.hex()])
    deny(Reason.ID_KEY_NOT_ALLOWED, by_id, forged)
    deny(Reason.GUEST_SVN_TOO_OLD, by_id, snp_claims(snp, sim_trust, now, id_key_digest=ID_KEY))
    by_id.evaluate(snp_claims(snp, sim_trust, now, guest_svn=2, id_key_digest=ID_KEY), CALLER)
    by_author = policy(sev_snp__min_guest_svn=2, sev_snp__author_key_digests=[AUTHOR_KEY.hex()])
    deny(Reason.AUTHOR_KEY_NOT_ALLOWED, by_author, forged)
    signed = snp_claims(
        snp, sim_trust, now, guest_svn=3, id_key_digest=HOST_KEY, author_key_digest=AUTHOR_KEY
    )
    by_author.evaluate(signed, CALLER)


def test_real_debug_report_is_denied(vectors: Path, production: TrustStore) -> None:
    ev = Evidence(
        TeeType.SEV_SNP,
        (vectors / "snp/milan_v2_debug_gosevguest.bin").read_bytes(),
        ((vectors / "snp/milan_v2_debug_gosevguest_vcek.der").read_bytes(),),
    )
    claims = completed(
        verify_evidence(
            ev, trust=production, now=dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
            require_collateral=False,
        )
    )  # fmt: skip
    pol = policy(sev_snp={"measurements": [DEBUG_MEASUREMENT], "min_reported_tcb": ZERO_TCB})
    deny(Reason.DEBUG_FORBIDDEN, pol, claims)
    policy(
        sev_snp={
            "measurements": [DEBUG_MEASUREMENT],
            "allow_debug": True,
            "min_reported_tcb": ZERO_TCB,
        }
    ).evaluate(claims, CALLER)


def test_real_tdx_debug_quote_is_denied(vectors: Path, production: TrustStore) -> None:
    ev = Evidence(TeeType.TDX, (vectors / "tdx/v4_debug_trustee.dat").read_bytes())
    claims = completed(
        verify_evidence(
            ev, trust=production, now=dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
            require_collateral=False,
        )
    )  # fmt: skip
    pol = policy(tdx={"mrtds": [claims.mrtd.hex()], "accepted_tcb_statuses": ["UpToDate"]})
    deny(Reason.DEBUG_FORBIDDEN, pol, claims)
    # Without collateral the TCB status is NotEvaluated, which no policy can accept.
    deny(
        Reason.TCB_STATUS_NOT_ACCEPTED,
        policy(tdx={"mrtds": [claims.mrtd.hex()], "allow_debug": True}),
        claims,
    )


def test_tdx_denials(authority, sim_trust, now) -> None:
    c = tdx_claims(authority, sim_trust, now)
    deny(Reason.MRTD_NOT_ALLOWED, policy(), tdx_claims(authority, sim_trust, now, mrtd=bytes(48)))
    deny(
        Reason.DEBUG_FORBIDDEN,
        policy(),
        tdx_claims(authority, sim_trust, now, td_attributes=bytes.fromhex("0100001000000000")),
    )
    deny(Reason.RTMR_NOT_ALLOWED, policy(tdx__rtmr2=["ab" * 48]), c)
    deny(Reason.MRCONFIGID_NOT_ALLOWED, policy(tdx__mrconfigids=["ab" * 48]), c)
    deny(Reason.MROWNER_NOT_ALLOWED, policy(tdx__mrowners=["ab" * 48]), c)
    deny(Reason.MROWNERCONFIG_NOT_ALLOWED, policy(tdx__mrownerconfigs=["ab" * 48]), c)
    deny(Reason.FMSPC_NOT_ALLOWED, policy(tdx__fmspcs=["00a06d080000"]), c)
    out_of_date = tdx_claims(authority, sim_trust, now, status="OutOfDate")
    deny(Reason.TCB_STATUS_NOT_ACCEPTED, policy(), out_of_date)
    policy(tdx__accepted_tcb_statuses=["UpToDate", "OutOfDate"]).evaluate(out_of_date, CALLER)
    policy(tdx__rtmr0=["00" * 48], tdx__fmspcs=[c.fmspc.hex()]).evaluate(c, CALLER)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("version: [", Reason.POLICY_SYNTAX),
        ("[]", Reason.POLICY_BAD_TYPE),
        (
            '{"allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["'
            + "00" * 48
            + '"]}}',
            Reason.POLICY_MISSING_KEY,
        ),
        ('{"version": "", "allowed_spiffe_ids": ["spiffe://a/b"]}', Reason.POLICY_BAD_TYPE),
        ('{"version": 3, "allowed_spiffe_ids": ["spiffe://a/b"]}', Reason.POLICY_BAD_TYPE),
        ('{"version": "1", "extra": 1}', Reason.POLICY_UNKNOWN_KEY),
        (
            '{"version": "1", "allowed_spiffe_ids": [], "tee_types": ["TDX"]}',
            Reason.POLICY_EMPTY_ALLOW_LIST,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["https://x"], "tee_types": ["TDX"]}',
            Reason.POLICY_BAD_VALUE,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["SGX"]}',
            Reason.POLICY_BAD_VALUE,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"]}',
            Reason.POLICY_MISSING_KEY,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": []}}',
            Reason.POLICY_EMPTY_ALLOW_LIST,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["abcd"]}}',
            Reason.POLICY_BAD_HEX,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["'
            + "zz" * 48
            + '"]}}',
            Reason.POLICY_BAD_HEX,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["'
            + "00" * 48
            + '"], "mrtd": 1}}',
            Reason.POLICY_UNKNOWN_KEY,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["'
            + "00" * 48
            + '"], "accepted_tcb_statuses": ["Revoked"]}}',
            Reason.POLICY_BAD_VALUE,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["'
            + "00" * 48
            + '"], "allow_debug": "no"}}',
            Reason.POLICY_BAD_TYPE,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["TDX"], "tdx": {"mrtds": ["'
            + "00" * 48
            + '"]}, "sev_snp": {"measurements": ["'
            + "00" * 48
            + '"]}}',
            Reason.POLICY_BAD_VALUE,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["SEV_SNP"], "sev_snp": {"measurements": ["'
            + "00" * 48
            + '"], "vmpl": 4}}',
            Reason.POLICY_BAD_VALUE,
        ),
        (
            '{"version": "1", "allowed_spiffe_ids": ["spiffe://a/b"], "tee_types": ["SEV_SNP"], "sev_snp": {"measurements": ["'
            + "00" * 48
            + '"], "min_reported_tcb": {"ucode": 1}}}',
            Reason.POLICY_UNKNOWN_KEY,
        ),
        ("version: '1'\nversion: '2'\n", Reason.POLICY_SYNTAX),
    ],
)
def test_policy_load_errors(text: str, reason: str) -> None:
    with pytest.raises(PolicyInvalid) as err:
        ReleasePolicy.load(text)
    assert err.value.reason == reason, str(err.value)


def test_documented_example_loads() -> None:
    doc = (Path(__file__).resolve().parents[2] / "services/keybroker/POLICY.md").read_text()
    example = doc.split("```yaml", 1)[1].split("```", 1)[0]
    pol = ReleasePolicy.load(example)
    assert pol.version and set(pol.rules) == {TeeType.SEV_SNP, TeeType.TDX}
    assert pol.publishers is not None and len(pol.publishers) == 2


def test_tcb_fmc_minimum_applies_only_to_turin(snp, sim_trust, now) -> None:
    c = snp_claims(snp, sim_trust, now)
    assert "fmc" not in c.reported_tcb.components()
    policy(sev_snp__min_reported_tcb={"fmc": 200}).evaluate(c, CALLER)
    assert (
        TcbVersion.from_components(bootloader=1, tee=1, snp=1, microcode=1, fmc=2).components()[
            "fmc"
        ]
        == 2
    )


def test_snp_policy_must_state_a_minimum_reported_tcb() -> None:
    for production in (True, False):
        with pytest.raises(PolicyInvalid) as err:
            policy(production=production, sev_snp={"measurements": [MEAS.hex()]})
        assert err.value.reason == Reason.POLICY_MISSING_KEY
    partial = {"measurements": [MEAS.hex()], "min_reported_tcb": {"snp": 3}}
    with pytest.raises(PolicyInvalid) as err:
        policy(sev_snp=partial)
    assert err.value.reason == Reason.POLICY_MISSING_KEY


def test_any_reported_tcb_only_in_development(snp, sim_trust, now) -> None:
    with pytest.raises(PolicyInvalid) as err:
        policy(sev_snp__min_reported_tcb="any")
    assert err.value.reason == Reason.POLICY_BAD_VALUE
    dev = policy(production=False, sev_snp__min_reported_tcb="any")
    dev.evaluate(snp_claims(snp, sim_trust, now), CALLER)


def test_zero_tcb_vcek_is_refused_by_a_stated_minimum(authority, sim_trust, now) -> None:
    zero = TcbVersion.from_components(bootloader=0, tee=0, snp=0, microcode=0)
    platform = authority.snp(tcb=zero)
    claims = snp_claims(platform, sim_trust, now)
    deny(Reason.TCB_TOO_OLD, policy(sev_snp__min_reported_tcb={"snp": 1}), claims)


def test_min_tcb_evaluation_data_number(authority, sim_trust, now) -> None:
    claims = tdx_claims(authority, sim_trust, now, number=17)
    policy(tdx__min_tcb_evaluation_data_number=17).evaluate(claims, CALLER)
    deny(Reason.TCB_EVALUATION_TOO_OLD, policy(tdx__min_tcb_evaluation_data_number=18), claims)


def test_min_tcb_evaluation_data_number_holds_for_the_qe_identity_too(
    authority, sim_trust, now
) -> None:
    """The QE is judged by the QE identity, which Intel numbers like the TCB info (a TCB recovery
    raises both). The claim was the TCB info's number alone, so a TCB info of recovery 18 beside
    a QE identity of 17 (fetched at another time: the cache refreshes each near its own
    nextUpdate) met a minimum of 18 while the QE was judged by pre-recovery levels. Like Intel's
    tcb_eval_ref_num, the claim is the lower of the two."""
    claims = tdx_claims(authority, sim_trust, now, number=18)  # the QE identity is 17
    assert claims.tcb_evaluation_data_number == 17
    policy(tdx__min_tcb_evaluation_data_number=17).evaluate(claims, CALLER)
    deny(Reason.TCB_EVALUATION_TOO_OLD, policy(tdx__min_tcb_evaluation_data_number=18), claims)


def test_incomplete_collateral_never_releases(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    ev = Evidence(TeeType.TDX, tdx.quote(RD, mrtd=MRTD))
    claims = verify_evidence(ev, trust=sim_trust, now=now, require_collateral=False)
    deny(Reason.COLLATERAL_INCOMPLETE, policy(), claims)


# --- TDX launch settings: what the host chose when it created the TD --------------------------
# ATTRIBUTES, XFAM and MR_SERVICETD are set by the host and are in neither MRTD nor the RTMRs: a
# policy that pins the image (MRTD and every RTMR) says nothing about them unless these rules do.

SEPT_VE_DISABLE = 28


def attrs(*bits: int) -> bytes:
    """TD ATTRIBUTES with ``bits`` set, as the quote carries them (8 bytes, little-endian)."""
    return sum(1 << b for b in bits).to_bytes(8, "little")


def pinned_image() -> ReleasePolicy:
    """The reviewer's policy: the approved image, MRTD and all four RTMRs pinned."""
    rtmrs: dict[str, Any] = {f"tdx__rtmr{i}": ["00" * 48] for i in range(4)}
    return policy(**rtmrs)


def deny_message(reason: str, pol: ReleasePolicy, claims, *words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyViolation) as err:
        pol.evaluate(claims, CALLER)
    assert err.value.reason == reason, str(err.value)
    for word in words:
        assert word in err.value.message, err.value.message


@pytest.mark.parametrize(
    ("launch", "reason", "named"),
    [
        ({"td_attributes": attrs(SEPT_VE_DISABLE, 29)}, Reason.MIGRATABLE_FORBIDDEN, "bit 29"),
        (
            {"td_attributes": attrs(1, 2, 3, 4, 5, 6, 7, SEPT_VE_DISABLE)},
            Reason.DEBUG_FORBIDDEN,
            "bit(s) 1, 2, 3, 4, 5, 6, 7",
        ),
        (
            {"version": 5, "body_type": 3, "mr_servicetd": b"\xab" * 48},
            Reason.MR_SERVICETD_NOT_ALLOWED,
            "MR_SERVICETD abab",
        ),
    ],
    ids=["migratable", "tud-bits-1-7", "service-td-bound"],
)
def test_tdx_host_chosen_launch_settings_are_judged(  # type: ignore[no-untyped-def]
    authority, sim_trust, now, launch, reason, named
) -> None:
    pinned_image().evaluate(tdx_claims(authority, sim_trust, now), CALLER)  # the intended launch
    deny_message(reason, pinned_image(), tdx_claims(authority, sim_trust, now, **launch), named)


@pytest.mark.parametrize("bit", range(1, 8))
def test_tdx_every_tud_bit_counts_as_debug(authority, sim_trust, now, bit: int) -> None:  # type: ignore[no-untyped-def]
    claims = tdx_claims(authority, sim_trust, now, td_attributes=attrs(bit, SEPT_VE_DISABLE))
    assert claims.debug and claims.as_dict()["debug"] is True
    deny_message(Reason.DEBUG_FORBIDDEN, policy(), claims, f"bit(s) {bit} ")
    policy(tdx__allow_debug=True).evaluate(claims, CALLER)


@pytest.mark.parametrize("bit", [8, 15, 18, 26, 32, 61])
def test_tdx_reserved_attribute_bits_are_refused(authority, sim_trust, now, bit: int) -> None:  # type: ignore[no-untyped-def]
    claims = tdx_claims(authority, sim_trust, now, td_attributes=attrs(bit, SEPT_VE_DISABLE))
    deny_message(Reason.TD_ATTRIBUTES_RESERVED, policy(), claims, f"bit(s) {bit},")


@pytest.mark.parametrize(
    "bits",
    [(), (SEPT_VE_DISABLE,), (16, 27, SEPT_VE_DISABLE, 30, 31, 62, 63)],
    ids=["none", "sept-ve-disable", "defined-positive-and-other-bits"],
)
def test_tdx_defined_non_debug_attributes_pass(authority, sim_trust, now, bits) -> None:  # type: ignore[no-untyped-def]
    # ICSSD (16), LASS (27), PKS (30), KL (31), TPA (62), PERFMON (63) weaken nothing.
    policy().evaluate(tdx_claims(authority, sim_trust, now, td_attributes=attrs(*bits)), CALLER)


def test_tdx_migratable_only_when_the_policy_allows_it(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    claims = tdx_claims(authority, sim_trust, now, td_attributes=attrs(SEPT_VE_DISABLE, 29))
    deny_message(Reason.MIGRATABLE_FORBIDDEN, policy(), claims, "MIGRATABLE (bit 29)")
    policy(tdx__allow_migratable=True).evaluate(claims, CALLER)


def test_tdx_service_td_must_be_listed(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    def td15(servicetd: bytes):  # type: ignore[no-untyped-def]
        return tdx_claims(authority, sim_trust, now, version=5, body_type=3, mr_servicetd=servicetd)

    bound = td15(b"\xab" * 48)
    deny_message(Reason.MR_SERVICETD_NOT_ALLOWED, policy(), bound, "ab" * 48)
    listed = policy(tdx__mr_servicetds=["ab" * 48])
    listed.evaluate(bound, CALLER)
    deny(Reason.MR_SERVICETD_NOT_ALLOWED, listed, td15(b"\xcd" * 48))
    # All zeros: nothing bound; a TD 1.0 body has no such field.
    policy().evaluate(td15(bytes(48)), CALLER)
    listed.evaluate(td15(bytes(48)), CALLER)
    policy().evaluate(tdx_claims(authority, sim_trust, now), CALLER)


def test_tdx_sept_ve_disable_is_opt_in(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    cleared = tdx_claims(authority, sim_trust, now, td_attributes=attrs())
    policy().evaluate(cleared, CALLER)  # default: real TDs run with it clear (see below)
    required = policy(tdx__require_sept_ve_disable=True)
    deny_message(Reason.SEPT_VE_DISABLE_REQUIRED, required, cleared, "SEPT_VE_DISABLE (bit 28)")
    required.evaluate(
        tdx_claims(authority, sim_trust, now, td_attributes=attrs(SEPT_VE_DISABLE)), CALLER
    )


def test_tdx_exact_attributes_and_xfam_allow_lists(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    claims = tdx_claims(authority, sim_trust, now)  # attributes 0000001000000000, xfam e742…
    exact = policy(tdx__td_attributes=["0000001000000000"], tdx__xfams=["e742060000000000"])
    exact.evaluate(claims, CALLER)
    other_attrs = tdx_claims(authority, sim_trust, now, td_attributes=attrs(SEPT_VE_DISABLE, 30))
    deny_message(Reason.TD_ATTRIBUTES_NOT_ALLOWED, exact, other_attrs, "0000005000000000")
    other_xfam = tdx_claims(authority, sim_trust, now, xfam=bytes.fromhex("ff06060000000000"))
    deny_message(Reason.XFAM_NOT_ALLOWED, exact, other_xfam, "XFAM ff06060000000000")
    policy().evaluate(other_xfam, CALLER)  # no allow-list: any XFAM


@pytest.mark.parametrize(
    ("field", "value", "reason", "message"),
    [
        ("td_attributes", ["00000010"], Reason.POLICY_BAD_HEX, "16 hex characters (8 bytes)"),
        ("xfams", ["e7420600000000zz"], Reason.POLICY_BAD_HEX, "16 hex characters (8 bytes)"),
        ("xfams", [], Reason.POLICY_EMPTY_ALLOW_LIST, "empty allow-list"),
        ("td_attributes", None, Reason.POLICY_BAD_TYPE, "must be a list"),
        ("mr_servicetds", ["ab"], Reason.POLICY_BAD_HEX, "96 hex characters"),
        ("allow_migratable", "yes", Reason.POLICY_BAD_TYPE, "true or false"),
        ("require_sept_ve_disable", 1, Reason.POLICY_BAD_TYPE, "true or false"),
    ],
)
def test_tdx_launch_setting_fields_are_validated_on_load(
    field: str, value: object, reason: str, message: str
) -> None:
    override: dict[str, Any] = {f"tdx__{field}": value}
    with pytest.raises(PolicyInvalid) as err:
        policy(**override)
    assert err.value.reason == reason, str(err.value)
    assert f"policy tdx.{field}: " in err.value.message and message in err.value.message


def test_real_tdx_vectors_launch_settings(vectors: Path, production: TrustStore) -> None:
    """The real quotes: SEPT_VE_DISABLE is clear on two real TDs (Azure's, and go-tdx-guest's
    Sapphire Rapids quote), so requiring it stays opt-in; trustee's TD 1.5 quote has a service TD
    bound, refused unless listed."""
    when = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)

    def real(name: str) -> TdxClaims:
        ev = Evidence(TeeType.TDX, (vectors / "tdx" / name).read_bytes())
        claims = verify_evidence(ev, trust=production, now=when, require_collateral=False)
        assert isinstance(claims, TdxClaims)
        return completed(claims)  # type: ignore[no-any-return]

    for name in ("v4_azure_trustee.dat", "v4_spr_gotdxguest.dat"):
        claims = real(name)
        assert not claims.td_attributes[3] & 0x10, name  # bit 28 clear
        pol = policy(tdx={"mrtds": [claims.mrtd.hex()]})
        # Passes every launch-setting rule; only the TCB status (no collateral) is left.
        deny(Reason.TCB_STATUS_NOT_ACCEPTED, pol, claims)
        strict = policy(tdx={"mrtds": [claims.mrtd.hex()], "require_sept_ve_disable": True})
        deny(Reason.SEPT_VE_DISABLE_REQUIRED, strict, claims)
    for name in ("v4_gnr_trustee.dat", "v5_td15_gotdxguest.dat"):
        claims = real(name)
        strict = policy(tdx={"mrtds": [claims.mrtd.hex()], "require_sept_ve_disable": True})
        deny(Reason.TCB_STATUS_NOT_ACCEPTED, strict, claims)

    bound = real("v5_td15_trustee.dat")
    assert bound.mr_servicetd is not None and any(bound.mr_servicetd)
    deny(Reason.MR_SERVICETD_NOT_ALLOWED, policy(tdx={"mrtds": [bound.mrtd.hex()]}), bound)
    listed = {"mrtds": [bound.mrtd.hex()], "mr_servicetds": [bound.mr_servicetd.hex()]}
    deny(Reason.TCB_STATUS_NOT_ACCEPTED, policy(tdx=listed), bound)


# --- SEV-SNP: the launch TCB, and FMC on Turin -------------------------------------------------

NEW_TCB = {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219}
OLD_TCB = {"bootloader": 1, "tee": 0, "snp": 1, "microcode": 1}


def test_snp_launch_tcb_is_held_to_the_reported_minimum_by_default(snp, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    # Launched on old firmware, live-updated since: reported_tcb is new, launch_tcb is not.
    updated = snp_claims(
        snp, sim_trust, now,
        reported_tcb=TcbVersion.from_components(**NEW_TCB),
        launch_tcb=TcbVersion.from_components(**OLD_TCB),
    )  # fmt: skip
    assert updated.reported_tcb.components() == NEW_TCB
    minimum = policy(sev_snp__min_reported_tcb=NEW_TCB)
    with pytest.raises(PolicyViolation) as err:
        minimum.evaluate(updated, CALLER)
    assert err.value.reason == Reason.LAUNCH_TCB_TOO_OLD
    assert "launch TCB bootloader=1 is below the minimum 4 (min_reported_tcb)" in str(err.value)
    # A VM launched on the current firmware passes.
    fresh = TcbVersion.from_components(**NEW_TCB)
    minimum.evaluate(snp_claims(snp, sim_trust, now, reported_tcb=fresh, launch_tcb=fresh), CALLER)


def test_snp_min_launch_tcb_replaces_the_default(snp, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    updated = snp_claims(
        snp, sim_trust, now,
        reported_tcb=TcbVersion.from_components(**NEW_TCB),
        launch_tcb=TcbVersion.from_components(**OLD_TCB),
    )  # fmt: skip
    lenient = policy(
        sev_snp__min_reported_tcb=NEW_TCB, sev_snp__min_launch_tcb={**ZERO_TCB, **OLD_TCB}
    )
    lenient.evaluate(updated, CALLER)
    stricter = policy(sev_snp__min_launch_tcb={**ZERO_TCB, "snp": 2})
    with pytest.raises(PolicyViolation) as err:
        stricter.evaluate(updated, CALLER)
    assert err.value.reason == Reason.LAUNCH_TCB_TOO_OLD
    assert "launch TCB snp=1 is below the minimum 2 (min_launch_tcb)" in str(err.value)
    # The reported TCB is judged first, by its own minimum.
    deny(Reason.TCB_TOO_OLD, policy(sev_snp__min_reported_tcb={"snp": 25}), updated)


def test_snp_any_tcb_in_development_leaves_the_launch_tcb_alone(snp, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    old = TcbVersion.from_components(**OLD_TCB)
    claims = snp_claims(snp, sim_trust, now, launch_tcb=old)
    policy(production=False, sev_snp__min_reported_tcb="any").evaluate(claims, CALLER)
    deny(
        Reason.LAUNCH_TCB_TOO_OLD,
        policy(production=False, sev_snp__min_reported_tcb="any",
               sev_snp__min_launch_tcb={**ZERO_TCB, "snp": 2}),
        claims,
    )  # fmt: skip


def test_snp_committed_tcb_is_held_to_the_reported_minimum(snp, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    """A platform running provisional firmware (a live update not yet committed) reports its new
    TCB, and the host may roll the firmware back to the committed one under the running VM once
    the key is released: a committed TCB below the minimum was never looked at."""
    new, old = TcbVersion.from_components(**NEW_TCB), TcbVersion.from_components(**OLD_TCB)
    provisional = snp_claims(
        snp, sim_trust, now, reported_tcb=new, launch_tcb=new, committed_tcb=old
    )
    assert provisional.committed_tcb.components() == OLD_TCB
    with pytest.raises(PolicyViolation) as err:
        policy(sev_snp__min_reported_tcb=NEW_TCB).evaluate(provisional, CALLER)
    assert err.value.reason == Reason.COMMITTED_TCB_TOO_OLD
    assert "committed TCB bootloader=1 is below the minimum 4 (min_reported_tcb)" in str(err.value)
    # Once the update is committed the same platform passes; a lower minimum passes already.
    committed = snp_claims(snp, sim_trust, now, reported_tcb=new, launch_tcb=new, committed_tcb=new)
    policy(sev_snp__min_reported_tcb=NEW_TCB).evaluate(committed, CALLER)
    policy(sev_snp__min_reported_tcb=OLD_TCB).evaluate(provisional, CALLER)
    # A development "any" states no minimum to hold it to.
    policy(production=False, sev_snp__min_reported_tcb="any").evaluate(provisional, CALLER)


def test_real_snp_vectors_pass_their_own_minimum_at_launch(
    vectors: Path, production: TrustStore
) -> None:
    """Fail closed is safe for real VMs: every real report's launch TCB is at least its reported
    TCB (the AWS VLEK report even reports microcode 217 below its launch 219), so a minimum the
    reported TCB meets is met at launch too, and by the committed TCB (the AWS one commits 219;
    the Azure Milan ones run microcode 206/210 uncommitted over a committed 115)."""
    files = {
        "milan_v2_virtee.bin": "milan_v2_virtee_vcek.der",
        "milan_v2_trustee.bin": "milan_v2_trustee_vcek.der",
        "milan_v3_vlek_aws_trustee.bin": "milan_v3_vlek_aws_trustee_vlek.der",
        "genoa_v3_azure_ms.bin": "genoa_v3_azure_ms_vcek.pem",
        "turin_v5_azure_ms.bin": "turin_v5_azure_ms_vcek.pem",
    }
    for report, cert in files.items():
        der = (vectors / "snp" / cert).read_bytes()
        if cert.endswith(".pem"):
            der = x509.load_pem_x509_certificate(der).public_bytes(Encoding.DER)
        ev = Evidence(TeeType.SEV_SNP, (vectors / "snp" / report).read_bytes(), (der,))
        year = 2025 if "vlek" in cert else 2026  # AWS's VLEK (a 1-year cert) expired in 2025-12
        when = dt.datetime(year, 3, 1, tzinfo=dt.UTC)
        claims = completed(
            verify_evidence(ev, trust=production, now=when, require_collateral=False)
        )
        reported = claims.reported_tcb.components()
        section = {
            "measurements": [claims.measurement.hex()],
            "vmpl": claims.vmpl,
            "signing_keys": [claims.signing_key],
            "min_reported_tcb": {"fmc": 0, **reported},
        }
        policy(sev_snp=section).evaluate(claims, CALLER)
        committed = claims.committed_tcb.components()
        assert all(committed[k] >= v for k, v in reported.items()), (report, committed)
        above = {"fmc": 0, **reported, "microcode": reported["microcode"] + 1}
        deny(Reason.TCB_TOO_OLD, policy(sev_snp={**section, "min_reported_tcb": above}), claims)


AWS_CSP = "CN=cc-us-east-2.amazonaws.com"


def test_a_vlek_policy_can_pin_the_cloud_its_vlek_was_issued_to(
    vectors: Path, production: TrustStore
) -> None:
    """Every cloud's VLEK chains to AMD's ASVK: a policy that allowed VLEK-signed reports trusted
    every cloud AMD issued a VLEK to, with nothing to say which. ``vlek_csp_ids`` pins the CSP_ID
    of the VLEK (here the real AWS report's); VCEK-signed reports are not affected."""
    snp = vectors / "snp"
    ev = Evidence(
        TeeType.SEV_SNP,
        (snp / "milan_v3_vlek_aws_trustee.bin").read_bytes(),
        ((snp / "milan_v3_vlek_aws_trustee_vlek.der").read_bytes(),),
    )
    when = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)  # AWS's VLEK (a 1-year cert) expired 2025-12
    claims = completed(verify_evidence(ev, trust=production, now=when, require_collateral=False))
    assert claims.as_dict()["vlek_csp_id"] == AWS_CSP
    section = {
        "measurements": [claims.measurement.hex()],
        "vmpl": claims.vmpl,
        "signing_keys": ["VCEK", "VLEK"],
        "min_reported_tcb": {"fmc": 0, **claims.reported_tcb.components()},
    }
    policy(sev_snp=section).evaluate(claims, CALLER)  # no pin: any cloud
    policy(sev_snp={**section, "vlek_csp_ids": [AWS_CSP]}).evaluate(claims, CALLER)
    other = policy(sev_snp={**section, "vlek_csp_ids": ["CN=cloud.example"]})
    deny_message(Reason.VLEK_CSP_NOT_ALLOWED, other, claims, AWS_CSP, "vlek_csp_ids")
    # A VLEK without the extension matches no pin.
    deny(Reason.VLEK_CSP_NOT_ALLOWED, other, dataclasses.replace(claims, vlek_csp_id=None))


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"vlek_csp_ids": [AWS_CSP]}, "signing_keys does not allow VLEK"),
        ({"signing_keys": ["VLEK"], "vlek_csp_ids": []}, "empty allow-list"),
        ({"signing_keys": ["VLEK"], "vlek_csp_ids": [""]}, "non-empty printable ASCII"),
        ({"signing_keys": ["VLEK"], "vlek_csp_ids": ["CN=a\nb"]}, "non-empty printable ASCII"),
        ({"signing_keys": ["VLEK"], "vlek_csp_ids": AWS_CSP}, "must be a list"),
    ],
)
def test_a_vlek_cloud_pin_that_could_never_match_is_a_load_error(
    section: dict[str, Any], words: str
) -> None:
    with pytest.raises(PolicyInvalid) as err:
        policy(sev_snp={"measurements": [MEAS.hex()], "min_reported_tcb": ZERO_TCB, **section})
    assert "sev_snp.vlek_csp_ids" in str(err.value), str(err.value)
    assert words in str(err.value), str(err.value)


def test_snp_fmc_minimum_is_optional_without_turin() -> None:
    no_fmc = {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219}
    for products in (["Milan"], ["Milan", "Genoa"]):
        policy(sev_snp={"measurements": [MEAS.hex()], "products": products,
                        "min_reported_tcb": no_fmc, "min_launch_tcb": no_fmc})  # fmt: skip


@pytest.mark.parametrize("field", ["min_reported_tcb", "min_launch_tcb"])
def test_snp_a_minimum_without_fmc_with_turin_listed_is_a_load_error(field: str) -> None:
    """A minimum with no fmc refuses every Turin report (TCB_MINIMUM_INCOMPLETE). Loaded with
    Turin listed in products, such a policy could never pass a Turin report and said so only
    at each refused release (as a by-product minimum with no Turin entry did not: it was
    POLICY_MISSING_KEY at load)."""
    no_fmc = {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219}
    section = {"measurements": [MEAS.hex()], "min_reported_tcb": ZERO_TCB, field: no_fmc}
    for products in (["Turin"], ["Milan", "Turin"]):
        with pytest.raises(PolicyInvalid) as err:
            policy(sev_snp={**section, "products": products})
        assert err.value.reason == Reason.POLICY_MISSING_KEY, str(err.value)
        assert f"{field} states no fmc (Turin's FMC SPL), and products lists Turin" in str(
            err.value
        )
    policy(sev_snp={**section, "products": ["Milan"]})


@pytest.fixture(scope="module")
def turin(now: dt.datetime) -> SimulatedAuthority:
    return SimulatedAuthority.generate(product="Turin", now=now)


def test_snp_turin_fmc_below_the_minimum_is_refused(turin: SimulatedAuthority, now) -> None:  # type: ignore[no-untyped-def]
    tcb = TcbVersion.from_components(fmc=0, **NEW_TCB)
    claims = snp_claims(turin.snp(tcb=tcb), turin.trust_store(), now, version=5)
    assert claims.product == "Turin" and claims.reported_tcb.components()["fmc"] == 0
    with pytest.raises(PolicyViolation) as err:
        policy(sev_snp__min_reported_tcb={**NEW_TCB, "fmc": 1}).evaluate(claims, CALLER)
    assert err.value.reason == Reason.TCB_TOO_OLD
    assert "reported TCB fmc=0 is below the minimum 1" in str(err.value)
    policy(sev_snp__min_reported_tcb={**NEW_TCB, "fmc": 0}).evaluate(claims, CALLER)


@pytest.mark.parametrize("field", ["min_reported_tcb", "min_launch_tcb"])
def test_a_minimum_without_fmc_refuses_turin_and_keeps_serving_milan(
    turin: SimulatedAuthority,
    snp,
    sim_trust,
    now,
    field: str,  # type: ignore[no-untyped-def]
) -> None:
    """Without ``fmc`` a minimum accepted any FMC SPL (even 0) on a Turin report. A load error for
    such policies would have stopped every release under policies written before Turin (the old
    POLICY.md example: no fmc, no products) at the upgrade; they load, serve Milan and Genoa, and
    refuse Turin."""
    no_fmc = {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}
    section = {"measurements": [MEAS.hex()], "allow_simulated": True}
    section |= {"min_reported_tcb": ZERO_TCB, field: no_fmc}
    tcb = TcbVersion.from_components(fmc=9, **NEW_TCB)
    turin_claims = snp_claims(turin.snp(tcb=tcb), turin.trust_store(), now, version=5)
    with pytest.raises(PolicyViolation) as err:
        policy(sev_snp=section).evaluate(turin_claims, CALLER)
    assert err.value.reason == Reason.TCB_MINIMUM_INCOMPLETE
    assert "states no fmc" in str(err.value)
    policy(sev_snp=section).evaluate(snp_claims(snp, sim_trust, now), CALLER)  # Milan: served


# Current SPLs of real platforms (tests/data/attestation: Azure Milan and Genoa, 2025): each
# product numbers its own, so Milan's microcode 219 and Genoa's 84 are both current.
MILAN_TCB = {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219}
GENOA_TCB = {"bootloader": 10, "tee": 0, "snp": 23, "microcode": 84}


def test_snp_minimum_by_product(  # type: ignore[no-untyped-def]
    authority: SimulatedAuthority, genoa: SimulatedAuthority, turin: SimulatedAuthority, now
) -> None:
    """One minimum judged every product by the same numbers, though each numbers its own SPLs: a
    fleet of current Milan and Genoa hosts could only be served by the lower of each component
    (bootloader 4, snp 23, microcode 84), which admitted Milan microcode 209, ten patch levels
    behind. A minimum per product judges each by its own numbers; a product it states none for is
    refused (TCB_MINIMUM_INCOMPLETE), as is Turin without fmc."""

    def by(minimum: dict[str, Any], **more: Any) -> ReleasePolicy:
        section = {"measurements": [MEAS.hex()], "allow_simulated": True}
        return policy(sev_snp={**section, "min_reported_tcb": minimum, **more})

    def claims(auth: SimulatedAuthority, **tcb: int) -> Any:
        platform = auth.snp(tcb=TcbVersion.from_components(**tcb))
        return snp_claims(platform, auth.trust_store(), now, version=5 if "fmc" in tcb else 3)

    old_milan = claims(authority, **{**MILAN_TCB, "microcode": 209})
    lowest = {k: min(MILAN_TCB[k], GENOA_TCB[k]) for k in MILAN_TCB}
    policy(sev_snp__min_reported_tcb=lowest).evaluate(old_milan, CALLER)  # what one minimum did
    by_product = {"Milan": MILAN_TCB, "Genoa": GENOA_TCB}
    fleet = by(by_product)
    deny(Reason.TCB_TOO_OLD, fleet, old_milan)
    fleet.evaluate(claims(authority, **MILAN_TCB), CALLER)
    fleet.evaluate(claims(genoa, **GENOA_TCB), CALLER)
    deny(Reason.TCB_TOO_OLD, fleet, claims(genoa, **{**GENOA_TCB, "bootloader": 9}))
    current_turin = claims(turin, fmc=1, bootloader=1, tee=1, snp=4, microcode=81)
    with pytest.raises(PolicyViolation) as err:
        fleet.evaluate(current_turin, CALLER)
    assert err.value.reason == Reason.TCB_MINIMUM_INCOMPLETE
    assert "min_reported_tcb states no minimum for Turin" in str(err.value)
    turin_min = {"fmc": 1, "bootloader": 1, "tee": 1, "snp": 4, "microcode": 81}
    by({**by_product, "Turin": turin_min}).evaluate(current_turin, CALLER)
    # The launch and committed TCBs are judged by the product's minimum too; a by-product
    # min_launch_tcb without the product leaves it to min_reported_tcb's.
    launched_old = snp_claims(
        genoa.snp(tcb=TcbVersion.from_components(**GENOA_TCB)), genoa.trust_store(), now,
        launch_tcb=TcbVersion.from_components(**{**GENOA_TCB, "snp": 22}),
    )  # fmt: skip
    deny(Reason.LAUNCH_TCB_TOO_OLD, fleet, launched_old)
    lenient = {"Genoa": {**GENOA_TCB, "snp": 22}}
    by(by_product, min_launch_tcb=lenient).evaluate(launched_old, CALLER)
    deny(
        Reason.LAUNCH_TCB_TOO_OLD, by(by_product, min_launch_tcb={"Milan": MILAN_TCB}), launched_old
    )
    provisional = snp_claims(
        genoa.snp(tcb=TcbVersion.from_components(**GENOA_TCB)), genoa.trust_store(), now,
        committed_tcb=TcbVersion.from_components(**{**GENOA_TCB, "microcode": 80}),
    )  # fmt: skip
    deny(Reason.COMMITTED_TCB_TOO_OLD, fleet, provisional)


@pytest.mark.parametrize(
    ("minimum", "extra", "reason", "words"),
    [
        ({"Milan": MILAN_TCB, "Genoa": {**GENOA_TCB, "snp": 256}}, {}, Reason.POLICY_BAD_VALUE,
         "sev_snp.min_reported_tcb.Genoa.snp: must be an integer 0..255"),
        ({"Milan": MILAN_TCB, "Turin": MILAN_TCB}, {}, Reason.POLICY_MISSING_KEY,
         "Turin: fmc is required"),
        ({"Genoa": {**GENOA_TCB, "fmc": 1}}, {}, Reason.POLICY_BAD_VALUE, "Genoa: fmc is Turin only"),
        ({"Milan": MILAN_TCB, "snp": 3}, {}, Reason.POLICY_UNKNOWN_KEY,
         "sev_snp.min_reported_tcb.snp: is not a known key"),
        ({"Milan": MILAN_TCB}, {"products": ["Milan", "Genoa"]}, Reason.POLICY_MISSING_KEY,
         "states no minimum for Genoa, which products lists"),
        # An explicit null loaded as an absent minimum: its author may have meant "no minimum"
        # (min_reported_tcb then refused the product; min_launch_tcb used min_reported_tcb's).
        ({"Milan": None, "Genoa": GENOA_TCB}, {}, Reason.POLICY_BAD_TYPE,
         "sev_snp.min_reported_tcb.Milan: must be a mapping, not null"),
        ({"Milan": MILAN_TCB}, {"min_launch_tcb": {"Milan": None, "Genoa": GENOA_TCB}},
         Reason.POLICY_BAD_TYPE, "sev_snp.min_launch_tcb.Milan: must be a mapping, not null"),
        ({"Milan": MILAN_TCB}, {"min_launch_tcb": None}, Reason.POLICY_BAD_TYPE,
         "sev_snp.min_launch_tcb: must be a mapping, not null"),
    ],
)  # fmt: skip
def test_snp_minimum_by_product_is_checked_when_loaded(
    minimum: dict[str, Any], extra: dict[str, Any], reason: str, words: str
) -> None:
    section = {"measurements": [MEAS.hex()], "min_reported_tcb": minimum, **extra}
    with pytest.raises(PolicyInvalid) as err:
        policy(sev_snp=section)
    assert err.value.reason == reason and words in str(err.value), str(err.value)


# -- publishers: who may get data keys under the key, for which model names ---------------------

PUBLISHER = "spiffe://strongroom.test/publisher"


def test_without_publishers_every_publisher_gets_keys_for_every_name() -> None:
    loaded = policy()
    assert loaded.publishers is None
    loaded.check_publisher("spiffe://strongroom.test/anyone", "any/model")


def test_publishers_admit_exact_names_and_everything_under_a_slash() -> None:
    loaded = policy(
        publishers=[
            {"spiffe_id": PUBLISHER, "model_names": ["tenant-a/", "shared/model"]},
            {"spiffe_id": "spiffe://strongroom.test/b", "model_names": ["tenant-b/x"]},
        ]
    )
    for name in ("tenant-a/m", "tenant-a/deep/m", "shared/model"):
        loaded.check_publisher(PUBLISHER, name)
    loaded.check_publisher("spiffe://strongroom.test/b", "tenant-b/x")
    for caller, name, reason in [
        (PUBLISHER, "tenant-a", "MODEL_NAME_NOT_ALLOWED"),  # the folder itself is not under it
        (PUBLISHER, "tenant-ab/m", "MODEL_NAME_NOT_ALLOWED"),  # a prefix only at a '/'
        (PUBLISHER, "shared/model2", "MODEL_NAME_NOT_ALLOWED"),  # exact means exact
        (PUBLISHER, "tenant-b/x", "MODEL_NAME_NOT_ALLOWED"),
        ("spiffe://strongroom.test/b", "tenant-b/x/y", "MODEL_NAME_NOT_ALLOWED"),
        ("spiffe://strongroom.test/c", "tenant-a/m", "PUBLISHER_NOT_ALLOWED"),
    ]:
        with pytest.raises(PolicyViolation) as info:
            loaded.check_publisher(caller, name)
        assert info.value.reason == reason, (caller, name)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([], "POLICY_EMPTY_ALLOW_LIST"),
        ("*", "POLICY_BAD_TYPE"),
        ([{"spiffe_id": "publisher", "model_names": ["a/"]}], "POLICY_BAD_VALUE"),
        ([{"spiffe_id": PUBLISHER, "model_names": []}], "POLICY_EMPTY_ALLOW_LIST"),
        ([{"spiffe_id": PUBLISHER, "model_names": "a/"}], "POLICY_BAD_TYPE"),
        ([{"spiffe_id": PUBLISHER, "model_names": [""]}], "POLICY_BAD_VALUE"),
        ([{"spiffe_id": PUBLISHER, "model_names": ["/"]}], "POLICY_BAD_VALUE"),
        ([{"spiffe_id": PUBLISHER, "model_names": ["a//"]}], "POLICY_BAD_VALUE"),
        ([{"spiffe_id": PUBLISHER, "model_names": ["*"]}], "POLICY_BAD_VALUE"),
        ([{"spiffe_id": PUBLISHER}], "POLICY_BAD_VALUE"),
        ([{"spiffe_id": PUBLISHER, "model_names": ["a/"], "key": 1}], "POLICY_BAD_VALUE"),
        ([PUBLISHER], "POLICY_BAD_VALUE"),
        (
            [
                {"spiffe_id": PUBLISHER, "model_names": ["a/"]},
                {"spiffe_id": PUBLISHER, "model_names": ["b/"]},
            ],
            "POLICY_BAD_VALUE",
        ),
    ],
)
def test_a_malformed_publishers_list_is_refused(value: object, reason: str) -> None:
    with pytest.raises(PolicyInvalid) as info:
        policy(publishers=value)
    assert info.value.reason == reason
    assert "publishers" in info.value.message


def test_an_explicit_null_publishers_is_not_an_absent_one() -> None:
    text = "version: v\nallowed_spiffe_ids: [spiffe://strongroom.test/i]\ntee_types: [TDX]\n"
    text += f"tdx: {{mrtds: ['{MRTD.hex()}'], allow_simulated: true}}\npublishers: null\n"
    with pytest.raises(PolicyInvalid) as info:
        ReleasePolicy.load(text, production=False)
    assert info.value.reason == "POLICY_BAD_TYPE"


def test_a_policy_loaded_in_development_mode_is_refused_where_deployed_in_production() -> None:
    loaded = policy(
        production=False, sev_snp__allow_simulated=False, tdx=None, tee_types=["SEV_SNP"]
    )
    loaded.check_deployment(trust_domain="strongroom.test", production=False)
    with pytest.raises(PolicyInvalid) as info:
        loaded.check_deployment(trust_domain="strongroom.test", production=True)
    assert info.value.reason == "POLICY_DEVELOPMENT_MODE"
    policy(sev_snp__allow_simulated=False, tdx=None, tee_types=["SEV_SNP"]).check_deployment(
        trust_domain="strongroom.test", production=True
    )


@pytest.mark.parametrize("text", ["[" * 20_000 + "]" * 20_000, "a: " + "{b: " * 5_000 + "1"])
def test_a_policy_nested_too_deeply_for_the_yaml_reader_is_invalid(text: str) -> None:
    """Outside the key broker (which bounds documents first) this was a RecursionError."""
    with pytest.raises(PolicyInvalid) as info:
        ReleasePolicy.load(text)
    assert info.value.reason == "POLICY_TOO_DEEP"


def test_a_publisher_outside_the_trust_domain_is_refused_where_deployed() -> None:
    loaded = policy(
        production=False,
        publishers=[{"spiffe_id": "spiffe://elsewhere.test/p", "model_names": ["a/"]}],
    )
    with pytest.raises(PolicyInvalid) as info:
        loaded.check_deployment(trust_domain="strongroom.test", production=False)
    assert info.value.reason == "POLICY_FOREIGN_TRUST_DOMAIN"
    assert "publishers" in info.value.message


SINGLE_SOCKET, CXL_ALLOW, ALIAS_CHECK_COMPLETE, PLATFORM_SMT = 1 << 20, 1 << 21, 1 << 5, 1 << 0


def test_snp_guest_policy_and_platform_flags_can_be_required_and_forbidden(
    snp, sim_trust, now
) -> None:  # type: ignore[no-untyped-def]
    def claims(guest: int = 0, platform: int = PLATFORM_SMT):  # type: ignore[no-untyped-def]
        return snp_claims(snp, sim_trust, now, policy=0x30000 | guest, platform_info=platform)

    single = policy(sev_snp__required_guest_policy_flags=["single_socket"])
    deny(Reason.GUEST_POLICY_FLAG_MISSING, single, claims())
    single.evaluate(claims(SINGLE_SOCKET), CALLER)

    no_cxl = policy(sev_snp__forbidden_guest_policy_flags=["cxl_allow"])
    deny(Reason.GUEST_POLICY_FLAG_FORBIDDEN, no_cxl, claims(CXL_ALLOW))
    no_cxl.evaluate(claims(), CALLER)

    badram = policy(sev_snp__required_platform_flags=["alias_check_complete"])
    deny(Reason.PLATFORM_FLAG_MISSING, badram, claims())
    badram.evaluate(claims(platform=PLATFORM_SMT | ALIAS_CHECK_COMPLETE), CALLER)

    no_smt = policy(sev_snp__forbidden_platform_flags=["smt_enabled"])
    deny(Reason.PLATFORM_FLAG_FORBIDDEN, no_smt, claims())
    no_smt.evaluate(claims(platform=ALIAS_CHECK_COMPLETE), CALLER)

    # Unstated, the flags judge nothing: policies written before these keys keep their meaning.
    policy().evaluate(claims(SINGLE_SOCKET | CXL_ALLOW, PLATFORM_SMT), CALLER)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        # debug, SMT and the migration agent have keys of their own; bit 17 is the verifier's.
        ({"required_guest_policy_flags": ["debug"]}, Reason.POLICY_BAD_VALUE),
        ({"forbidden_guest_policy_flags": ["reserved_1"]}, Reason.POLICY_BAD_VALUE),
        ({"required_platform_flags": ["alias_check"]}, Reason.POLICY_BAD_VALUE),
        ({"required_guest_policy_flags": []}, Reason.POLICY_EMPTY_ALLOW_LIST),
        ({"forbidden_platform_flags": "smt_enabled"}, Reason.POLICY_BAD_TYPE),
        (
            {
                "required_guest_policy_flags": ["single_socket", "cxl_allow"],
                "forbidden_guest_policy_flags": ["cxl_allow"],
            },
            Reason.POLICY_BAD_VALUE,
        ),
        (
            {
                "required_platform_flags": ["tsme_enabled"],
                "forbidden_platform_flags": ["tsme_enabled"],
            },
            Reason.POLICY_BAD_VALUE,
        ),
    ],
)
def test_snp_flag_rules_are_checked_when_the_policy_loads(
    overrides: dict[str, object], reason: str
) -> None:
    prefixed: dict[str, Any] = {f"sev_snp__{k}": v for k, v in overrides.items()}
    with pytest.raises(PolicyInvalid) as err:
        policy(**prefixed)
    assert err.value.reason == reason, str(err.value)


def test_the_documented_example_policy_loads() -> None:
    """POLICY.md's example is what operators copy: it must be a policy the broker accepts."""
    doc = (REPO / "services" / "keybroker" / "POLICY.md").read_text()
    (example,) = re.findall(r"## Example\n\n```yaml\n(.*?)```", doc, re.DOTALL)
    loaded = ReleasePolicy.load(example)
    assert loaded.version == "2026-03-01.1"


def test_tdx_advisories_outside_the_accepted_list_are_refused(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    tdx = authority.tdx()

    def claims(*advisories: str):  # type: ignore[no-untyped-def]
        source = StaticCollateralSource(
            tcb_infos=(tdx.tcb_info(now=now, status="SWHardeningNeeded", advisory_ids=advisories),),
            qe_identity=tdx.qe_identity(now=now),
            signing_chain=authority.tcb_signing_chain_pem(),
            crl_list=tuple(authority.crl(i, now=now) for i in ("intel_root", "pck_ca")),
        )
        evidence = Evidence(TeeType.TDX, tdx.quote(RD, mrtd=MRTD))
        return verify_evidence(evidence, trust=sim_trust, now=now, collateral=source)

    hardening: dict[str, Any] = {"tdx__accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"]}
    reviewed = policy(**hardening, tdx__accepted_advisory_ids=["INTEL-SA-00615"])
    reviewed.evaluate(claims("INTEL-SA-00615"), CALLER)
    deny(Reason.ADVISORY_NOT_ACCEPTED, reviewed, claims("INTEL-SA-00615", "INTEL-SA-00828"))
    # Without the list, the status alone decides (policies written before it keep their meaning).
    policy(**hardening).evaluate(claims("INTEL-SA-00828"), CALLER)
    assert claims("INTEL-SA-00828").advisory_ids == ("INTEL-SA-00828",)


@pytest.mark.parametrize(
    ("ids", "reason"),
    [
        ([], Reason.POLICY_EMPTY_ALLOW_LIST),
        (["INTEL-SA-00615", "CVE-2023-1234"], Reason.POLICY_BAD_VALUE),
        (["intel-sa-00615"], Reason.POLICY_BAD_VALUE),
        ([615], Reason.POLICY_BAD_VALUE),
        ("INTEL-SA-00615", Reason.POLICY_BAD_TYPE),
    ],
)
def test_tdx_accepted_advisory_ids_are_checked_when_the_policy_loads(
    ids: object, reason: str
) -> None:
    with pytest.raises(PolicyInvalid) as err:
        policy(tdx__accepted_advisory_ids=ids)
    assert err.value.reason == reason, str(err.value)
