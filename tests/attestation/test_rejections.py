"""Bad evidence is rejected with the right error class and reason code.

Real vectors are corrupted byte by byte; the simulated attester builds evidence that is properly
signed but has bad content (wrong TCB, wrong chip, wrong key type, revoked PCK ...).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.attestation import (
    Collateral,
    CollateralKind,
    CollateralUnavailable,
    Evidence,
    MalformedEvidence,
    StaticCollateralSource,
    TeeType,
    TrustStore,
    VerificationFailed,
    verify_evidence,
)
from strongroom.attestation.abi.snp import TcbVersion, parse_snp_report
from strongroom.attestation.encoding import detect_evidence
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import StrongroomError, caused_by_caller
from strongroom.reasons import Reason
from tests.attestation.test_vectors import NEW_TCB_SIGNING

UTC = dt.UTC
SNP_TIME = dt.datetime(2026, 3, 1, tzinfo=UTC)
RD = hashlib.sha512(b"report data").digest()
MEAS = bytes(range(48))


def expect(cls: type[StrongroomError], reason: str, fn: Callable[[], Any]) -> StrongroomError:
    with pytest.raises(cls) as err:
        fn()
    assert err.value.reason == reason, str(err.value)
    return err.value


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


@pytest.fixture(scope="module")
def milan(vectors: Path) -> tuple[bytes, bytes]:
    return (
        (vectors / "snp/milan_v2_virtee.bin").read_bytes(),
        (vectors / "snp/milan_v2_virtee_vcek.der").read_bytes(),
    )


@pytest.fixture(scope="module")
def spr(vectors: Path) -> bytes:
    return (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes()


def snp_verify(
    report: bytes,
    certs: Sequence[bytes],
    trust: TrustStore,
    when: dt.datetime = SNP_TIME,
    **kw: Any,
) -> Any:
    # The real SNP vectors have no AMD CRL in the public record: these tests judge signatures,
    # chains and bindings (revocation has its own tests, with simulated CRLs).
    kw.setdefault("require_collateral", False)
    return verify_evidence(
        Evidence(TeeType.SEV_SNP, report, tuple(certs)), trust=trust, now=when, **kw
    )


def source_of(collateral: Sequence[Collateral]) -> StaticCollateralSource:
    """The verifier's own collateral made of these documents (never the evidence's)."""

    def of(kind: CollateralKind) -> tuple[bytes, ...]:
        return tuple(c.data for c in collateral if c.kind is kind)

    chains = of(CollateralKind.TCB_SIGNING_CHAIN)
    qe = of(CollateralKind.TDX_QE_IDENTITY)
    return StaticCollateralSource(
        tcb_infos=of(CollateralKind.TDX_TCB_INFO),
        qe_identity=qe[0] if qe else None,
        signing_chain=chains[0] if chains else None,
        crl_list=of(CollateralKind.CRL),
    )


def tdx_verify(
    quote: bytes,
    trust: TrustStore,
    when: dt.datetime,
    collateral: Sequence[Collateral] = (),
    certs: Sequence[bytes] = (),
    *,
    require: bool = False,
) -> Any:
    return verify_evidence(
        Evidence(TeeType.TDX, quote, tuple(certs)),
        trust=trust,
        now=when,
        collateral=source_of(collateral),
        require_collateral=require,
    )


# --- Malformed (parse-time) ------------------------------------------------------------------------


def test_snp_truncated(milan, production) -> None:
    expect(
        MalformedEvidence,
        Reason.TRUNCATED,
        lambda: snp_verify(milan[0][:1000], [milan[1]], production),
    )


def test_snp_too_long(milan, production) -> None:
    expect(
        MalformedEvidence,
        Reason.REPORT_SIZE,
        lambda: snp_verify(milan[0] + b"\0", [milan[1]], production),
    )


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_snp_unsupported_version(milan, production, version: int) -> None:
    bad = struct.pack("<I", version) + milan[0][4:]
    err = expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_VERSION,
        lambda: snp_verify(bad, [milan[1]], production),
    )
    assert "(supported: 2, 3, 4, 5)" in err.message


def test_snp_unsupported_signature_algorithm(milan, production) -> None:
    bad = flip(milan[0], 0x34, 0x02)
    expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_SIGNATURE_ALGORITHM,
        lambda: snp_verify(bad, [milan[1]], production),
    )


def test_snp_reserved_field_set(milan, production) -> None:
    expect(
        MalformedEvidence,
        Reason.BAD_FIELD,
        lambda: snp_verify(flip(milan[0], 0x1F8), [milan[1]], production),
    )


def test_tdx_truncated(spr, production) -> None:
    expect(
        MalformedEvidence, Reason.TRUNCATED, lambda: tdx_verify(spr[:3000], production, SNP_TIME)
    )


def test_tdx_unsupported_version(spr, production) -> None:
    expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_VERSION,
        lambda: tdx_verify(b"\x03" + spr[1:], production, SNP_TIME),
    )


def test_tdx_sgx_quote_rejected(spr, production) -> None:
    bad = spr[:4] + struct.pack("<I", 0) + spr[8:]
    expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_TEE_TYPE,
        lambda: tdx_verify(bad, production, SNP_TIME),
    )


def test_tdx_wrong_certification_data_type(spr, production) -> None:
    off = 632 + 4 + 128  # certification data type after the signature and attestation key
    bad = spr[:off] + struct.pack("<H", 5) + spr[off + 2 :]
    expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_CERTIFICATION_DATA,
        lambda: tdx_verify(bad, production, SNP_TIME),
    )


def test_tdx_sig_data_length_past_end(spr, production) -> None:
    bad = spr[:632] + struct.pack("<I", 10_000) + spr[636:]
    expect(MalformedEvidence, Reason.TRUNCATED, lambda: tdx_verify(bad, production, SNP_TIME))


def test_tdx_v5_body_type_sgx(vectors, production) -> None:
    quote = (vectors / "tdx/v5_td15_trustee.dat").read_bytes()
    bad = quote[:48] + struct.pack("<H", 1) + quote[50:]
    expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_BODY_TYPE,
        lambda: tdx_verify(bad, production, SNP_TIME),
    )


def test_unrecognised_evidence_format() -> None:
    expect(
        MalformedEvidence, Reason.UNKNOWN_EVIDENCE_FORMAT, lambda: detect_evidence(b"hello world")
    )


def test_unspecified_tee_type_in_proto() -> None:
    from strongroom.api.attestation.v1 import evidence_pb2

    expect(
        MalformedEvidence,
        Reason.TEE_TYPE_UNSPECIFIED,
        lambda: Evidence.from_proto(evidence_pb2.Evidence(report=b"x")),
    )


def test_tdx_evidence_with_certificates(spr, production, milan) -> None:
    expect(
        MalformedEvidence,
        Reason.BAD_CERTIFICATE,
        lambda: tdx_verify(spr, production, SNP_TIME, certs=[milan[1]]),
    )


# --- Corrupted real vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0x04, 0x90, 0xA0, 0x180, 0x1A0, 0x1E0])
def test_snp_signed_body_flip(milan, production, offset: int) -> None:
    expect(
        VerificationFailed,
        Reason.REPORT_SIGNATURE_INVALID,
        lambda: snp_verify(flip(milan[0], offset), [milan[1]], production),
    )


@pytest.mark.parametrize("offset", [0x2A0, 0x2C0, 0x2E8, 0x300])
def test_snp_signature_flip(milan, production, offset: int) -> None:
    expect(
        VerificationFailed,
        Reason.REPORT_SIGNATURE_INVALID,
        lambda: snp_verify(flip(milan[0], offset), [milan[1]], production),
    )


def test_snp_vcek_signature_flip(milan, production) -> None:
    bad_cert = flip(milan[1], len(milan[1]) - 5)
    expect(
        VerificationFailed,
        Reason.CERT_CHAIN_INVALID,
        lambda: snp_verify(milan[0], [bad_cert], production),
    )


def test_snp_vcek_of_another_chip(vectors, milan, production) -> None:
    other = (vectors / "snp/milan_v2_trustee_vcek.der").read_bytes()
    expect(
        VerificationFailed,
        Reason.REPORT_SIGNATURE_INVALID,
        lambda: snp_verify(milan[0], [other], production),
    )


def test_snp_vcek_of_another_product(vectors, milan, production) -> None:
    genoa = (vectors / "snp/genoa_v3_azure_ms_vcek.pem").read_bytes()
    expect(
        VerificationFailed,
        Reason.REPORT_SIGNATURE_INVALID,
        lambda: snp_verify(milan[0], [genoa], production),
    )


def test_snp_missing_vcek(milan, production) -> None:
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_MISSING,
        lambda: snp_verify(milan[0], [], production),
    )


def test_snp_vcek_fetched_from_collateral_source(milan, production) -> None:
    source = StaticCollateralSource(vceks=(milan[1],))
    assert snp_verify(milan[0], [], production, collateral=source).product == "Milan"


def test_snp_collateral_source_failure_is_unavailable(milan, production) -> None:
    class Failing(StaticCollateralSource):
        def snp_key_certificate(self, report):  # type: ignore[no-untyped-def]
            raise CollateralUnavailable("KDS unreachable", reason=Reason.COLLATERAL_FETCH_FAILED)

    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_FETCH_FAILED,
        lambda: snp_verify(milan[0], [], production, collateral=Failing()),
    )


def test_snp_two_vceks(vectors, milan, production) -> None:
    other = (vectors / "snp/milan_v2_trustee_vcek.der").read_bytes()
    expect(
        MalformedEvidence,
        Reason.BAD_CERTIFICATE,
        lambda: snp_verify(milan[0], [milan[1], other], production),
    )


def test_snp_ask_not_matching_pinned(milan, production, authority: SimulatedAuthority) -> None:
    ask = authority.amd_root_pems()[1]
    expect(
        VerificationFailed,
        Reason.INTERMEDIATE_NOT_PINNED,
        lambda: snp_verify(milan[0], [milan[1], ask], production),
    )


def test_snp_ark_not_matching_pinned(milan, production, authority: SimulatedAuthority) -> None:
    ark = authority.amd_root_pems()[0]
    expect(
        VerificationFailed,
        Reason.ROOT_NOT_TRUSTED,
        lambda: snp_verify(milan[0], [milan[1], ark], production),
    )


def test_snp_cert_not_yet_valid(milan, production) -> None:
    when = dt.datetime(2019, 1, 1, tzinfo=UTC)
    expect(
        VerificationFailed,
        Reason.CERT_NOT_VALID_AT_TIME,
        lambda: snp_verify(milan[0], [milan[1]], production, when),
    )


def test_tdx_body_flip(spr, production) -> None:
    expect(
        VerificationFailed,
        Reason.QUOTE_SIGNATURE_INVALID,
        lambda: tdx_verify(flip(spr, 200), production, SNP_TIME),
    )


def test_tdx_header_flip(spr, production) -> None:
    expect(
        VerificationFailed,
        Reason.QUOTE_SIGNATURE_INVALID,
        lambda: tdx_verify(flip(spr, 40), production, SNP_TIME),
    )


def test_tdx_quote_signature_flip(spr, production) -> None:
    expect(
        VerificationFailed,
        Reason.QUOTE_SIGNATURE_INVALID,
        lambda: tdx_verify(flip(spr, 636 + 10), production, SNP_TIME),
    )


def test_tdx_qe_report_flip(spr, production) -> None:
    expect(
        VerificationFailed,
        Reason.QE_REPORT_SIGNATURE_INVALID,
        lambda: tdx_verify(flip(spr, 636 + 134 + 100), production, SNP_TIME),
    )


def test_tdx_qe_auth_data_flip(spr, production) -> None:
    off = 636 + 134 + 384 + 64 + 2  # first QE auth data byte
    expect(
        VerificationFailed,
        Reason.QE_REPORT_DATA_MISMATCH,
        lambda: tdx_verify(flip(spr, off), production, SNP_TIME),
    )


def test_tdx_pck_chain_signature_flip(spr, production) -> None:
    end = spr.index(b"-----END CERTIFICATE-----")
    pos = end - 8
    assert chr(spr[pos]).isalnum()
    bad = bytearray(spr)
    bad[pos] = ord("A") if spr[pos] != ord("A") else ord("B")
    expect(
        VerificationFailed,
        Reason.CERT_CHAIN_INVALID,
        lambda: tdx_verify(bytes(bad), production, SNP_TIME),
    )


def _spr_tcb_info(vectors) -> list[Collateral]:
    """The SPR vector's TCB info (issued 2023-06-18T08:42:58Z, next update 2023-07-18) and the
    chain that signed it."""
    return [
        Collateral(
            CollateralKind.TCB_SIGNING_CHAIN,
            (vectors / "roots/intel/intel_tcb_signing_chain.pem").read_bytes(),
        ),
        Collateral(
            CollateralKind.TDX_TCB_INFO,
            (vectors / "tdx/tcbinfo_50806f000000_gotdxguest.json").read_bytes(),
        ),
    ]


def test_tdx_expired_collateral(vectors, spr, production) -> None:
    collateral = _spr_tcb_info(vectors)
    when = dt.datetime(2023, 8, 1, tzinfo=UTC)
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_STALE,
        lambda: tdx_verify(spr, production, when, collateral),
    )


def test_tdx_collateral_not_yet_valid_is_the_verifiers_problem(vectors, spr, production) -> None:
    """Collateral issued after the verification time says the verifier's clock (or its own
    collateral source) is wrong, not the evidence: it was PERMISSION_DENIED, the verdict on a
    caller's evidence, so the broker counted it against the caller's refusal budget instead of
    recording the broker's own fault one by one. It is UNAVAILABLE, as stale collateral is."""
    collateral = _spr_tcb_info(vectors)
    when = dt.datetime(2023, 6, 18, 8, 0, tzinfo=UTC)  # 43 minutes before its issueDate
    refused = expect(
        CollateralUnavailable,
        Reason.COLLATERAL_NOT_YET_VALID,
        lambda: tdx_verify(spr, production, when, collateral),
    )
    assert not caused_by_caller(refused)


def test_tdx_expired_crl(vectors, spr, production) -> None:
    crl = Collateral(
        CollateralKind.CRL, (vectors / "roots/intel/intel_pck_platform_ca_crl.der").read_bytes()
    )
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_STALE,
        lambda: tdx_verify(spr, production, SNP_TIME, [crl]),
    )


def test_tdx_expired_tcb_signing_certificate(vectors, production) -> None:
    quote = (vectors / "tdx/v4_gnr_trustee.dat").read_bytes()
    collateral = [
        Collateral(
            CollateralKind.TCB_SIGNING_CHAIN,
            (vectors / "roots/intel/intel_tcb_signing_chain.pem").read_bytes(),
        ),
        Collateral(
            CollateralKind.TDX_TCB_INFO,
            (vectors / "tdx/tcbinfo_00a06d080000_trustee.json").read_bytes(),
        ),
    ]
    when = dt.datetime(2025, 11, 1, tzinfo=UTC)
    expect(
        VerificationFailed,
        Reason.CERT_NOT_VALID_AT_TIME,
        lambda: tdx_verify(quote, production, when, collateral),
    )


def _gnr_collateral(vectors: Path, tcb_info: bytes) -> list[Collateral]:
    return [
        Collateral(CollateralKind.TCB_SIGNING_CHAIN, NEW_TCB_SIGNING.read_bytes()),
        Collateral(CollateralKind.TDX_TCB_INFO, tcb_info),
    ]


def test_tdx_tcb_info_tampered(vectors, production) -> None:
    quote = (vectors / "tdx/v4_gnr_trustee.dat").read_bytes()
    doc = (vectors / "tdx/tcbinfo_00a06d080000_trustee.json").read_bytes()
    tampered = doc.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"', 1)
    assert tampered != doc
    when = dt.datetime(2025, 11, 1, tzinfo=UTC)
    expect(
        VerificationFailed,
        Reason.COLLATERAL_SIGNATURE_INVALID,
        lambda: tdx_verify(quote, production, when, _gnr_collateral(vectors, tampered)),
    )


def test_tdx_tcb_info_signature_flipped(vectors, production) -> None:
    quote = (vectors / "tdx/v4_gnr_trustee.dat").read_bytes()
    doc = (vectors / "tdx/tcbinfo_00a06d080000_trustee.json").read_bytes()
    i = doc.index(b'"signature":"') + 20
    tampered = doc[:i] + (b"0" if doc[i : i + 1] != b"0" else b"1") + doc[i + 1 :]
    when = dt.datetime(2025, 11, 1, tzinfo=UTC)
    expect(
        VerificationFailed,
        Reason.COLLATERAL_SIGNATURE_INVALID,
        lambda: tdx_verify(quote, production, when, _gnr_collateral(vectors, tampered)),
    )


def test_tdx_fmspc_mismatch(vectors, production) -> None:
    quote = (vectors / "tdx/v4_gnr_trustee.dat").read_bytes()
    other = (vectors / "tdx/tcbinfo_90c06f000000_gotdxguest.json").read_bytes()
    when = dt.datetime(2026, 2, 15, tzinfo=UTC)
    expect(
        VerificationFailed,
        Reason.FMSPC_MISMATCH,
        lambda: tdx_verify(quote, production, when, _gnr_collateral(vectors, other)),
    )


def test_tdx_tcb_info_without_signing_chain(vectors, production) -> None:
    quote = (vectors / "tdx/v4_gnr_trustee.dat").read_bytes()
    doc = Collateral(
        CollateralKind.TDX_TCB_INFO,
        (vectors / "tdx/tcbinfo_00a06d080000_trustee.json").read_bytes(),
    )
    when = dt.datetime(2025, 11, 1, tzinfo=UTC)
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_MISSING,
        lambda: tdx_verify(quote, production, when, [doc], require=True),
    )


def test_tdx_malformed_tcb_info(vectors, production) -> None:
    quote = (vectors / "tdx/v4_gnr_trustee.dat").read_bytes()
    when = dt.datetime(2025, 11, 1, tzinfo=UTC)
    expect(
        MalformedEvidence,
        Reason.BAD_COLLATERAL,
        lambda: tdx_verify(quote, production, when, _gnr_collateral(vectors, b'{"tcbInfo":{}')),
    )


# --- Simulated: properly signed, bad content --------------------------------------------------------


def test_simulated_snp_rejected_by_production(authority, production, now) -> None:
    ev = authority.snp().evidence(RD, measurement=MEAS)
    expect(
        VerificationFailed,
        Reason.ROOT_NOT_TRUSTED,
        lambda: verify_evidence(ev, trust=production, now=now),
    )


def test_simulated_tdx_rejected_by_production(authority, production, now) -> None:
    ev = authority.tdx().evidence(RD, mrtd=MEAS, now=now)
    expect(
        VerificationFailed,
        Reason.ROOT_NOT_TRUSTED,
        lambda: verify_evidence(ev, trust=production, now=now),
    )


def test_simulated_tdx_chain_to_foreign_root(authority, other_authority, now) -> None:
    ev = other_authority.tdx().evidence(RD, mrtd=MEAS, now=now)
    expect(
        VerificationFailed,
        Reason.ROOT_NOT_TRUSTED,
        lambda: verify_evidence(ev, trust=authority.trust_store(), now=now),
    )


def test_simulated_snp_accepted_with_simulated_roots(authority, sim_trust, now) -> None:
    claims = verify_evidence(
        authority.snp().evidence(RD, measurement=MEAS),
        trust=sim_trust,
        now=now,
        collateral=authority.collateral_source(now=now),
    )
    assert claims.simulated and claims.report_data == RD and claims.collateral_complete


def test_tcb_mismatch_vs_vcek(authority, sim_trust, now) -> None:
    snp = authority.snp()
    newer = TcbVersion.from_components(bootloader=4, tee=0, snp=25, microcode=219)
    ev = Evidence(
        TeeType.SEV_SNP,
        snp.report(RD, measurement=MEAS, reported_tcb=newer),
        (snp.certificate_der,),
    )
    expect(
        VerificationFailed,
        Reason.TCB_MISMATCH,
        lambda: verify_evidence(ev, trust=sim_trust, now=now),
    )


def test_hwid_mismatch(authority, sim_trust, now) -> None:
    snp = authority.snp()
    ev = Evidence(
        TeeType.SEV_SNP,
        snp.report(RD, measurement=MEAS, chip_id=bytes(range(64))),
        (snp.certificate_der,),
    )
    expect(
        VerificationFailed,
        Reason.HWID_MISMATCH,
        lambda: verify_evidence(ev, trust=sim_trust, now=now),
    )


@pytest.mark.parametrize("bit", [26, 40, 63])
def test_snp_guest_policy_reserved_bits_are_refused(authority, sim_trust, now, bit: int) -> None:
    """GUEST_POLICY bits 26-63 are reserved (must be zero): the policy says what the guest owner
    let the host do (debug, a migration agent), so a bit a newer firmware defines must not pass
    unread, as every other reserved field of the report and TDX's reserved ATTRIBUTES do not.
    A well-signed report with one set was accepted."""
    snp = authority.snp()
    ev = snp.evidence(RD, measurement=MEAS, policy=0x30000 | 1 << bit)
    err = expect(
        MalformedEvidence, Reason.BAD_FIELD, lambda: verify_evidence(ev, trust=sim_trust, now=now)
    )
    assert f"reserved bit(s) {bit}" in err.message
    # Every bit the ABI defines (SMT .. PAGE_SWAP_DISABLE) still parses.
    defined = snp.evidence(RD, measurement=MEAS, policy=0x3FF0000)
    verify_evidence(
        defined, trust=sim_trust, now=now, collateral=authority.collateral_source(now=now)
    )


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"policy": 0x10000}, "clears bit 17"),  # GUEST_POLICY bit 17: reserved, must be one
        ({"platform_info": 0x1 | 1 << 8}, "PLATFORM_INFO 0x101 sets reserved bit(s) 8"),
        ({"platform_info": 1 << 63}, "reserved bit(s) 63"),
        ({"launch_tcb": TcbVersion.decode(0x08 << 24, turin_layout=False)}, "LAUNCH_TCB"),
        ({"committed_tcb": TcbVersion.decode(0x01 << 40, turin_layout=False)}, "COMMITTED_TCB"),
    ],
    ids=["policy-bit-17-clear", "platform-info-bit-8", "platform-info-bit-63", "launch", "commit"],
)
def test_snp_must_be_one_and_reserved_fields_are_refused(
    authority, sim_trust, now, fields: dict[str, Any], says: str
) -> None:
    """The ABI's must-be-one GUEST_POLICY bit 17, PLATFORM_INFO's reserved bits 8-63 and the
    reserved bytes of the firmware's TCB_VERSION fields: a well-signed report that broke them was
    accepted (only GUEST_POLICY 26-63, KEY_INFO and the RESERVED areas were checked)."""
    snp = authority.snp()
    ev = snp.evidence(RD, measurement=MEAS, **fields)
    err = expect(
        MalformedEvidence, Reason.BAD_FIELD, lambda: verify_evidence(ev, trust=sim_trust, now=now)
    )
    assert says in err.message
    # Every PLATFORM_INFO bit genuine firmware sets (0-7: bit 6 on Turin) still parses.
    ok = snp.evidence(RD, measurement=MEAS, platform_info=0xFF)
    source = authority.collateral_source(now=now)
    claims: Any = verify_evidence(ok, trust=sim_trust, now=now, collateral=source)
    assert claims.platform_info.raw == 0xFF


def test_vlek_presented_as_vcek(authority, sim_trust, now) -> None:
    vlek = authority.snp(signing_key="VLEK")
    ev = Evidence(
        TeeType.SEV_SNP,
        vlek.report(RD, measurement=MEAS, signing_key_field=0),
        (vlek.certificate_der,),
    )
    expect(
        VerificationFailed,
        Reason.SIGNING_KEY_MISMATCH,
        lambda: verify_evidence(ev, trust=sim_trust, now=now),
    )


def test_a_vlek_csp_id_that_is_not_ia5_is_a_bad_certificate(authority, sim_trust, now) -> None:
    """The CSP_ID extension is an IA5String (7-bit). One with other bytes was read with "replace"
    decoding: the VLEK verified and its claims (and the release's audit record) showed U+FFFD for
    each such byte, so different CSP_IDs read the same, and the value shown could never be
    written as a ``vlek_csp_ids`` pin (ASCII only). It is malformed, as a productName that is not
    IA5 is; a VLEK without the extension still verifies (with no CSP id: no pin admits it)."""
    source = authority.collateral_source(now=now)
    for csp in (b"CN=cloud\xff.example", b"CN=cloud\xfe.example"):
        vlek = authority.snp(signing_key="VLEK", csp_id=csp)
        expect(
            MalformedEvidence,
            Reason.BAD_CERTIFICATE,
            lambda v=vlek: verify_evidence(  # type: ignore[misc]
                v.evidence(RD, measurement=MEAS), trust=sim_trust, now=now, collateral=source
            ),
        )
    bare = authority.snp(signing_key="VLEK", csp_id=None)
    claims: Any = verify_evidence(
        bare.evidence(RD, measurement=MEAS), trust=sim_trust, now=now, collateral=source
    )
    assert claims.signing_key == "VLEK" and claims.vlek_csp_id is None
    named = authority.snp(signing_key="VLEK", csp_id=b"CN=cloud.example")
    claims = verify_evidence(
        named.evidence(RD, measurement=MEAS), trust=sim_trust, now=now, collateral=source
    )
    assert claims.vlek_csp_id == "CN=cloud.example"


def test_snp_host_requested_report(authority, sim_trust, now) -> None:
    """A report the hypervisor asked for (SNP_HV_REPORT_REQ, ABI 1.57: VMPL 0xFFFFFFFF, REPORT_DATA
    the firmware's zeros) is genuine but attests no guest: the verifier returned claims for it
    (``attest verify`` said it verified; a release was refused only as a REPORT_DATA mismatch).
    A VMPL no firmware writes (4 .. 0xFFFFFFFE) is malformed."""
    snp = authority.snp()
    source = authority.collateral_source(now=now)
    host = snp.evidence(bytes(64), measurement=MEAS, vmpl=0xFFFFFFFF)
    expect(
        VerificationFailed,
        Reason.HOST_REQUESTED_REPORT,
        lambda: verify_evidence(host, trust=sim_trust, now=now, collateral=source),
    )
    # Forged, it is named forged.
    rogue = ec.generate_private_key(ec.SECP384R1())
    forged = Evidence(
        TeeType.SEV_SNP,
        snp.report(bytes(64), measurement=MEAS, vmpl=0xFFFFFFFF, sign_with=rogue),
        (snp.certificate_der,),
    )
    expect(
        VerificationFailed,
        Reason.REPORT_SIGNATURE_INVALID,
        lambda: verify_evidence(forged, trust=sim_trust, now=now, collateral=source),
    )
    for vmpl in (4, 0xFFFFFFFE):
        odd = snp.evidence(RD, measurement=MEAS, vmpl=vmpl)
        expect(
            MalformedEvidence,
            Reason.BAD_FIELD,
            lambda: verify_evidence(odd, trust=sim_trust, now=now, collateral=source),  # noqa: B023
        )
    for vmpl in range(4):  # every guest VMPL still verifies
        ok = snp.evidence(RD, measurement=MEAS, vmpl=vmpl)
        assert verify_evidence(ok, trust=sim_trust, now=now, collateral=source).vmpl == vmpl  # type: ignore[attr-defined]


def test_snp_host_requested_report_under_a_revoked_ask_is_revoked(
    authority, sim_trust, now
) -> None:
    """HOST_REQUESTED_REPORT says the report is genuine. It was judged before revocation, so a
    report signed under a revoked ASK (whose keys' holder can sign anything) that set VMPL
    0xFFFFFFFF was audited as a hypervisor's genuine request instead of CERT_REVOKED: the
    forger chose the reason. Revocation is judged first."""
    snp = authority.snp()
    revoked = authority.collateral_source(now=now, revoked={"ark": [authority.ask.serial_number]})
    host = snp.evidence(bytes(64), measurement=MEAS, vmpl=0xFFFFFFFF)
    expect(
        VerificationFailed,
        Reason.CERT_REVOKED,
        lambda: verify_evidence(host, trust=sim_trust, now=now, collateral=revoked),
    )
    # Without the CRL it cannot be known genuine either: the broker's failure, as for any report.
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_MISSING,
        lambda: verify_evidence(host, trust=sim_trust, now=now, collateral=None),
    )


def test_wrong_product_cpuid(authority, sim_trust, now) -> None:
    snp = authority.snp()
    # A Turin report carries Turin-layout TCBs (a Milan layout read as Turin's sets its reserved
    # bytes, BAD_FIELD at parse): the product is what is wrong here.
    turin_tcb = TcbVersion.from_components(fmc=0, **snp.tcb.components())
    ev = Evidence(
        TeeType.SEV_SNP,
        snp.report(RD, measurement=MEAS, cpuid=(0x1A, 0x02, 0x01), reported_tcb=turin_tcb),
        (snp.certificate_der,),
    )
    expect(
        VerificationFailed,
        Reason.PRODUCT_MISMATCH,
        lambda: verify_evidence(ev, trust=sim_trust, now=now),
    )


def test_cpuid_model_of_another_product_under_the_chain(authority, sim_trust, now) -> None:
    """Milan and Genoa share CPUID family 0x19 and differ by model: a report whose CPUID says
    Genoa (model 0x11) signed under a Milan chain was accepted on the family alone and judged
    as Milan. A version-2 report (no CPUID fields) is judged by its chain, as before."""
    snp = authority.snp()
    assert authority.product == "Milan"
    genoa = snp.evidence(RD, measurement=MEAS, cpuid=(0x19, 0x11, 0x01))
    err = expect(
        VerificationFailed,
        Reason.PRODUCT_MISMATCH,
        lambda: verify_evidence(genoa, trust=sim_trust, now=now),
    )
    assert "Genoa processor" in err.message and "ARK-Milan" in err.message
    source = authority.collateral_source(now=now)
    for ok in (
        snp.evidence(RD, measurement=MEAS, cpuid=(0x19, 0x01, 0x02)),  # Milan-X stepping
        snp.evidence(RD, measurement=MEAS, version=2),
    ):
        claims: Any = verify_evidence(ok, trust=sim_trust, now=now, collateral=source)
        assert claims.product == "Milan"


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # the Azure VCEK's own serial
@pytest.mark.parametrize("model", [0x20, 0x21, 0x61, 0x9F, 0xB0, 0xFF])
def test_a_family_0x19_model_of_no_sev_snp_part_is_refused(  # type: ignore[no-untyped-def]
    vectors, production, model: int
) -> None:
    """Family 0x19 is Milan (models 0x00-0x0F), Genoa (0x10-0x1F) and Siena/Bergamo (0xA0-0xAF);
    its other models are client parts with no SEV-SNP. Every model from 0x10 was read as Genoa,
    so a report naming one was judged against Genoa's chain and TCB minimums (here the real Genoa
    report with its model byte changed: refused only by its signature). It is refused by name
    now, before any chain or fetch: INVALID_ARGUMENT UNSUPPORTED_PROCESSOR, the family and model
    in the message."""
    genuine = (vectors / "snp/genoa_v3_azure_ms.bin").read_bytes()
    vcek = (vectors / "snp/genoa_v3_azure_ms_vcek.pem").read_bytes()
    assert parse_snp_report(genuine).cpuid_mod_id == 0x11
    report = genuine[:0x189] + bytes([model]) + genuine[0x18A:]
    err = expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_PROCESSOR,
        lambda: snp_verify(report, [vcek], production),
    )
    assert f"family 0x19 model 0x{model:02X}" in err.message
    assert err.status_name == "INVALID_ARGUMENT" and caused_by_caller(err)
    for known, product in ((0x00, "Milan"), (0x0F, "Milan"), (0x10, "Genoa"), (0x1F, "Genoa")):
        assert parse_snp_report(genuine[:0x189] + bytes([known]) + genuine[0x18A:]).product == (
            product
        )


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # the Azure VCEK's own serial
@pytest.mark.parametrize("model", [0x20, 0x24, 0x44, 0x70, 0xFF])
def test_a_family_0x1a_model_of_no_sev_snp_part_is_refused(  # type: ignore[no-untyped-def]
    vectors, production, model: int
) -> None:
    """Family 0x1A is Turin (models 0x00-0x0F, Turin Dense 0x10-0x1F); its other models are client
    Zen 5 parts with no SEV-SNP (Strix Point, Granite Ridge, Krackan, Strix Halo). Every model
    was read as Turin on the family alone, as every family 0x19 model from 0x10 was read as Genoa
    (here the real Turin report with its model byte changed: refused only by its signature). It
    is refused by name, before any chain or fetch: INVALID_ARGUMENT UNSUPPORTED_PROCESSOR."""
    genuine = (vectors / "snp/turin_v5_azure_ms.bin").read_bytes()
    vcek = (vectors / "snp/turin_v5_azure_ms_vcek.pem").read_bytes()
    assert parse_snp_report(genuine).cpuid_mod_id == 0x02
    report = genuine[:0x189] + bytes([model]) + genuine[0x18A:]
    err = expect(
        MalformedEvidence,
        Reason.UNSUPPORTED_PROCESSOR,
        lambda: snp_verify(report, [vcek], production),
    )
    assert f"family 0x1A model 0x{model:02X}" in err.message
    assert err.status_name == "INVALID_ARGUMENT" and caused_by_caller(err)
    for known in (0x00, 0x0F, 0x10, 0x1F):
        parsed = parse_snp_report(genuine[:0x189] + bytes([known]) + genuine[0x18A:])
        assert parsed.product == "Turin"


@pytest.mark.parametrize("model", [0xA0, 0xA1, 0xAF])
def test_siena_is_judged_under_genoas_chain(  # type: ignore[no-untyped-def]
    genoa, authority, sim_trust, now, model: int
) -> None:
    """AMD signs Siena (family 0x19, models 0xA0-0xAF, with Bergamo: the Zen 4c parts) under
    Genoa's ARK and ASK, and KDS serves their VCEKs as Genoa's. Pinned: such a report is Genoa's
    product (its chain, its KDS product, its TCB minimums and `products` entry) and verifies under
    the Genoa chain; under Milan's it is PRODUCT_MISMATCH, whose message called it a Genoa
    processor (an operator looked for a Genoa host): it now names Siena/Bergamo and its chain."""
    cpuid = (0x19, model, 0x01)
    siena = genoa.snp().evidence(RD, measurement=MEAS, cpuid=cpuid)
    report = parse_snp_report(siena.report)
    assert (report.product, report.processor, report.turin_layout) == (
        "Genoa",
        "Siena/Bergamo",
        False,
    )
    source = genoa.collateral_source(now=now)
    claims: Any = verify_evidence(siena, trust=genoa.trust_store(), now=now, collateral=source)
    assert claims.product == "Genoa"
    under_milan = authority.snp().evidence(RD, measurement=MEAS, cpuid=cpuid)
    err = expect(
        VerificationFailed,
        Reason.PRODUCT_MISMATCH,
        lambda: verify_evidence(under_milan, trust=sim_trust, now=now),
    )
    assert f"model 0x{model:02X} is a Siena/Bergamo processor (signed under ARK-Genoa)" in (
        err.message
    )
    assert "chains to ARK-Milan" in err.message
    # Genoa itself (model 0x11) is named Genoa, and Milan is the only other family-0x19 product.
    assert parse_snp_report(genoa.snp().report(RD, measurement=MEAS)).processor == "Genoa"


def test_snp_version_4_is_read_with_the_version_3_layout(authority, sim_trust, now) -> None:
    """Version 4 (seen on GCP Milan, firmware 1.55.31) was refused UNSUPPORTED_VERSION, where
    go-sev-guest reads it as version 3: one layout, whose reserved bytes version 5 uses for its
    mitigation vectors. No real version-4 report is public: this one is the simulated
    attester's, signed by the test chain (not by AMD). It verifies with its CPUID judged against
    the chain as for version 3, and every byte the version-3 layout reserves must stay zero."""
    snp = authority.snp()
    source = authority.collateral_source(now=now)
    v4 = snp.report(RD, measurement=MEAS, version=4)
    parsed = parse_snp_report(v4)
    assert (parsed.version, parsed.product, parsed.cpuid_mod_id) == (4, "Milan", 0x01)
    assert (parsed.launch_mit_vector, parsed.current_mit_vector) == (None, None)
    ev = Evidence(TeeType.SEV_SNP, v4, (snp.certificate_der,))
    claims: Any = verify_evidence(ev, trust=sim_trust, now=now, collateral=source)
    assert (claims.version, claims.product, claims.measurement) == (4, "Milan", MEAS)
    # RESERVED1 after the CPUID fields; RESERVED4, where version 5 has its mitigation vectors.
    for offset in (0x18B, 0x19F, 0x1F8, 0x200, 0x208, 0x29F):
        bad = snp.evidence(RD, measurement=MEAS, version=4, patch={offset: b"\x01"})
        err = expect(
            MalformedEvidence,
            Reason.BAD_FIELD,
            lambda: verify_evidence(bad, trust=sim_trust, now=now, collateral=source),  # noqa: B023
        )
        assert "reserved field RESERVED" in err.message
    # The same bytes carry version 5's mitigation vectors.
    v5 = snp.evidence(RD, measurement=MEAS, version=5, patch={0x1F8: b"\x01"})
    assert verify_evidence(v5, trust=sim_trust, now=now, collateral=source).version == 5  # type: ignore[attr-defined]
    genoa = snp.evidence(RD, measurement=MEAS, version=4, cpuid=(0x19, 0x11, 0x01))
    expect(
        VerificationFailed,
        Reason.PRODUCT_MISMATCH,
        lambda: verify_evidence(genoa, trust=sim_trust, now=now, collateral=source),
    )


def test_snp_signed_by_other_key(authority, sim_trust, now) -> None:
    snp = authority.snp()
    rogue = ec.generate_private_key(ec.SECP384R1())
    ev = Evidence(
        TeeType.SEV_SNP, snp.report(RD, measurement=MEAS, sign_with=rogue), (snp.certificate_der,)
    )
    expect(
        VerificationFailed,
        Reason.REPORT_SIGNATURE_INVALID,
        lambda: verify_evidence(ev, trust=sim_trust, now=now),
    )


def test_snp_vcek_from_foreign_simulated_chain(authority, other_authority, now) -> None:
    # Same issuer name as a trusted (simulated) ASK, different key: the signature does not chain.
    ev = other_authority.snp().evidence(RD, measurement=MEAS)
    expect(
        VerificationFailed,
        Reason.CERT_CHAIN_INVALID,
        lambda: verify_evidence(ev, trust=authority.trust_store(), now=now),
    )


def test_snp_expired_vcek(authority, sim_trust, now) -> None:
    ev = authority.snp().evidence(RD, measurement=MEAS)
    later = now + dt.timedelta(days=365 * 8)
    expect(
        VerificationFailed,
        Reason.CERT_NOT_VALID_AT_TIME,
        lambda: verify_evidence(ev, trust=sim_trust, now=later),
    )


def test_snp_revoked_ask(authority, sim_trust, now) -> None:
    snp = authority.snp()
    ev = snp.evidence(RD, measurement=MEAS)
    revoked = authority.collateral_source(now=now, revoked={"ark": [authority.ask.serial_number]})
    expect(
        VerificationFailed,
        Reason.CERT_REVOKED,
        lambda: verify_evidence(ev, trust=sim_trust, now=now, collateral=revoked),
    )


def sim_tdx(
    authority: SimulatedAuthority,
    tdx: Any,
    quote: bytes,
    trust: TrustStore,
    now: dt.datetime,
    *,
    crls: Sequence[bytes] | None = None,
    **tcb: Any,
) -> Any:
    """Verifies a simulated quote with the verifier-side collateral of its authority."""
    source = StaticCollateralSource(
        tcb_infos=(tdx.tcb_info(now=now, **tcb),),
        qe_identity=tdx.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
        crl_list=tuple(crls)
        if crls is not None
        else tuple(authority.crl(i, now=now) for i in ("ark", "intel_root", "pck_ca")),
    )
    return verify_evidence(Evidence(TeeType.TDX, quote), trust=trust, now=now, collateral=source)


def test_tdx_simulated_accepted(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    claims = sim_tdx(authority, tdx, tdx.quote(RD, mrtd=MEAS), sim_trust, now)
    assert claims.tcb_status == "UpToDate" and claims.qe_tcb_status == "UpToDate"
    assert claims.collateral_complete


def test_tdx_bad_qe_report_signature(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    quote = tdx.quote(RD, mrtd=MEAS, qe_sign_with=ec.generate_private_key(ec.SECP256R1()))
    expect(
        VerificationFailed,
        Reason.QE_REPORT_SIGNATURE_INVALID,
        lambda: sim_tdx(authority, tdx, quote, sim_trust, now),
    )


def test_tdx_qe_report_data_not_binding_ak(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    quote = tdx.quote(RD, mrtd=MEAS, qe_report_data=hashlib.sha512(b"other").digest())
    expect(
        VerificationFailed,
        Reason.QE_REPORT_DATA_MISMATCH,
        lambda: sim_tdx(authority, tdx, quote, sim_trust, now),
    )


def test_tdx_revoked_pck(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    crls = [
        authority.crl("pck_ca", [tdx.pck.serial_number], now=now),
        authority.crl("intel_root", now=now),
    ]
    expect(
        VerificationFailed,
        Reason.CERT_REVOKED,
        lambda: sim_tdx(authority, tdx, tdx.quote(RD, mrtd=MEAS), sim_trust, now, crls=crls),
    )


def test_tdx_revoked_pck_with_crl_omitted_fails_closed(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    only_root = [authority.crl("intel_root", now=now)]
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_MISSING,
        lambda: sim_tdx(authority, tdx, tdx.quote(RD, mrtd=MEAS), sim_trust, now, crls=only_root),
    )


def test_tdx_unrevoked_pck_with_crls(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    crls = [authority.crl(i, [12345], now=now) for i in ("pck_ca", "intel_root")]
    sim_tdx(authority, tdx, tdx.quote(RD, mrtd=MEAS), sim_trust, now, crls=crls)


def test_tdx_crl_signed_by_wrong_key(authority, other_authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    # Same issuer name (both simulated PCK CAs share it), different key.
    crls = [other_authority.crl("pck_ca", [], now=now), authority.crl("intel_root", now=now)]
    expect(
        VerificationFailed,
        Reason.CRL_SIGNATURE_INVALID,
        lambda: sim_tdx(authority, tdx, tdx.quote(RD, mrtd=MEAS), sim_trust, now, crls=crls),
    )


def test_tdx_qe_identity_mismatch(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    quote = tdx.quote(RD, mrtd=MEAS, qe_mrsigner=bytes(32))
    expect(
        VerificationFailed,
        Reason.QE_IDENTITY_MISMATCH,
        lambda: sim_tdx(authority, tdx, quote, sim_trust, now),
    )


def test_tdx_module_mismatch(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    quote = tdx.quote(RD, mrtd=MEAS, mr_signer_seam=b"\x01" * 48)
    expect(
        VerificationFailed,
        Reason.TDX_MODULE_MISMATCH,
        lambda: sim_tdx(authority, tdx, quote, sim_trust, now),
    )


def test_tdx_out_of_date_status_reported(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    claims = sim_tdx(authority, tdx, tdx.quote(RD, mrtd=MEAS), sim_trust, now, status="OutOfDate")
    assert claims.tcb_status == "OutOfDate"


def test_tdx_collateral_from_source(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    source = authority.collateral_source(tdx=[tdx], now=now)
    ev = Evidence(TeeType.TDX, tdx.quote(RD, mrtd=MEAS))
    assert verify_evidence(ev, trust=sim_trust, now=now, collateral=source).tcb_status == "UpToDate"
    empty = StaticCollateralSource()
    expect(
        CollateralUnavailable,
        Reason.COLLATERAL_MISSING,
        lambda: verify_evidence(ev, trust=sim_trust, now=now, collateral=empty),
    )


def test_tdx_v5_td15_simulated(authority, sim_trust, now) -> None:
    tdx = authority.tdx()
    quote = tdx.quote(RD, mrtd=MEAS, version=5, body_type=3, trailing=bytes(70))
    claims = sim_tdx(authority, tdx, quote, sim_trust, now)
    assert claims.body_type == "TD1.5" and claims.version == 5


# --- Cache behaviour ------------------------------------------------------------------------------


def test_cached_chain_not_used_outside_its_window(milan) -> None:
    store = TrustStore.production()
    assert snp_verify(milan[0], [milan[1]], store).product == "Milan"
    expect(
        VerificationFailed,
        Reason.CERT_NOT_VALID_AT_TIME,
        lambda: snp_verify(milan[0], [milan[1]], store, dt.datetime(2040, 1, 1, tzinfo=UTC)),
    )


def test_failure_is_not_cached(milan) -> None:
    store = TrustStore.production()
    bad_cert = flip(milan[1], len(milan[1]) - 5)
    for _ in range(2):
        expect(
            VerificationFailed,
            Reason.CERT_CHAIN_INVALID,
            lambda: snp_verify(milan[0], [bad_cert], store),
        )
    assert snp_verify(milan[0], [milan[1]], store).product == "Milan"
