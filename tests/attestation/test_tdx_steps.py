"""The steps of TDX verification, each on its own: chain, quote, collateral selection,
revocation, TCB evaluation. Real Intel vectors (tests/data/attestation) and the simulated authority.

``tests/attestation/test_vectors.py`` and ``test_rejections.py`` test the composed ``verify_tdx``;
here each step is called directly, so a regression names the step that broke.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import pytest

from strongroom.attestation import Evidence, StaticCollateralSource, TeeType, TrustStore
from strongroom.attestation.abi.certs import common_name
from strongroom.attestation.abi.tdx import parse_tdx_quote
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.attestation.verify import _crl, tdx
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.reasons import Reason
from tests.attestation.test_vectors import NEW_TCB_SIGNING, SOURCES

UTC = dt.UTC
TDX_TIME = dt.datetime(2026, 3, 1, tzinfo=UTC)
GNR = "tdx/v4_gnr_trustee.dat"  # real quote with TCB info and QE identity in the public record
GNR_TIME = dt.datetime(2025, 11, 1, tzinfo=UTC)
TD15 = "tdx/v5_td15_gotdxguest.dat"
TD15_TIME = dt.datetime(2026, 2, 15, tzinfo=UTC)
SPR_TIME = dt.datetime(2023, 6, 20, tzinfo=UTC)
RD = hashlib.sha512(b"steps").digest()
MRTD = bytes(range(48))


def _real(vectors: Path, name: str) -> Evidence:
    return Evidence(TeeType.TDX, (vectors / name).read_bytes())


def _gnr_collateral(vectors: Path) -> StaticCollateralSource:
    return StaticCollateralSource(
        tcb_infos=((vectors / "tdx/tcbinfo_00a06d080000_trustee.json").read_bytes(),),
        qe_identity=(vectors / "tdx/qe_identity_trustee.json").read_bytes(),
        signing_chain=NEW_TCB_SIGNING.read_bytes(),
    )


# --- step 1: the PCK chain --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tdx/v4_spr_gotdxguest.dat", GNR, TD15])
def test_chain_of_a_real_quote(vectors: Path, production: TrustStore, name: str) -> None:
    pem = parse_tdx_quote((vectors / name).read_bytes()).signature_data.pck_chain_pem
    pck = tdx.verify_pck_chain(pem, TrustStore.production(), TDX_TIME)
    assert common_name(pck.chain[0]) == tdx.PCK_LEAF_CN
    assert common_name(pck.chain[1]) in tdx.PCK_CA_CNS
    assert pck.chain[2] == production.intel_roots()[0].cert and not pck.simulated
    fmspc = SOURCES[name].lines
    assert any(f"FMSPC={pck.extensions.fmspc.hex()}" in line for line in fmspc)


def test_chain_refusals(vectors: Path, production: TrustStore) -> None:
    pem = parse_tdx_quote((vectors / GNR).read_bytes()).signature_data.pck_chain_pem
    with pytest.raises(VerificationFailed) as late:
        tdx.verify_pck_chain(pem, TrustStore.production(), dt.datetime(2045, 1, 1, tzinfo=UTC))
    assert late.value.reason == Reason.CERT_NOT_VALID_AT_TIME
    leaf_only = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
    with pytest.raises(MalformedEvidence) as short:
        tdx.verify_pck_chain(leaf_only, production, TDX_TIME)
    assert short.value.reason == Reason.BAD_CERTIFICATE


def _blocks(pem: bytes) -> list[bytes]:
    """The PEM blocks of a chain, exactly as they are written."""
    end = b"-----END CERTIFICATE-----"
    return [b + end for b in pem.split(end) if b"-----BEGIN" in b]


def test_chain_holds_exactly_leaf_ca_and_optionally_the_pinned_root(
    vectors: Path, production: TrustStore, authority: SimulatedAuthority
) -> None:
    """Real quotes carry PCK, Platform CA and root separated by newlines, with NUL padding after
    (all pass, and so does the chain without its root). An extra certificate, another third one
    than the pinned root, and data between the blocks were read past before."""
    pem = parse_tdx_quote((vectors / GNR).read_bytes()).signature_data.pck_chain_pem
    assert pem.endswith(b"\n\x00")
    leaf, ca, root = (b.strip() for b in _blocks(pem))
    tcb_signer = _blocks(NEW_TCB_SIGNING.read_bytes())[0].strip()
    other_root = authority.intel_root_pem().strip()

    def chain(*parts: bytes) -> bytes:
        return b"\n".join(parts) + b"\n\x00\x00"

    for good in (pem, chain(leaf, ca), chain(leaf, ca, root), b"\r\n".join((leaf, ca, root))):
        tdx.verify_pck_chain(good, production, TDX_TIME)
    refusals = {
        chain(leaf, ca, root, tcb_signer): Reason.CERT_CHAIN_INVALID,  # a fourth certificate
        chain(leaf, ca, root, root): Reason.CERT_CHAIN_INVALID,
        chain(leaf, ca, tcb_signer): Reason.CERT_CHAIN_INVALID,  # third, but not a root
        chain(leaf, ca, other_root): Reason.ROOT_NOT_TRUSTED,
        chain(leaf, b"junk", ca, root): Reason.BAD_CERTIFICATE,
        chain(b"# comment", leaf, ca, root): Reason.BAD_CERTIFICATE,
        chain(leaf, ca, root, b"trailer"): Reason.BAD_CERTIFICATE,
        chain(leaf, ca, root) + b"x": Reason.BAD_CERTIFICATE,  # after the NUL padding
    }
    for bad, reason in refusals.items():
        with pytest.raises((MalformedEvidence, VerificationFailed)) as err:
            tdx.verify_pck_chain(bad, production, TDX_TIME)
        assert err.value.reason == reason, bad[-60:]


def test_chain_of_a_simulated_quote(
    authority: SimulatedAuthority, sim_trust: TrustStore, now
) -> None:  # type: ignore[no-untyped-def]
    platform = authority.tdx()
    pck = tdx.verify_pck_chain(platform.pck_chain_pem(), sim_trust, now)
    assert pck.simulated and pck.extensions.fmspc == platform.fmspc
    with pytest.raises(VerificationFailed) as err:
        tdx.verify_pck_chain(platform.pck_chain_pem(), TrustStore.production(), now)
    assert err.value.reason == Reason.ROOT_NOT_TRUSTED


# --- step 2: the quote and its signatures -----------------------------------------------------


def test_quote_of_a_real_vector(vectors: Path, production: TrustStore) -> None:
    verified = tdx.verify_quote(_real(vectors, TD15), production, TDX_TIME)
    assert verified.quote.body.body_name == "TD1.5"
    assert verified.quote.body.mr_td.hex() == SOURCES[TD15].fields["mr_td"]


def test_quote_refusals(vectors: Path, production: TrustStore) -> None:
    raw = bytearray((vectors / GNR).read_bytes())
    quote = parse_tdx_quote(bytes(raw))
    raw[quote.signed_length - 1] ^= 1  # last byte of REPORT_DATA, inside the signed bytes
    with pytest.raises(VerificationFailed) as forged:
        tdx.verify_quote(Evidence(TeeType.TDX, bytes(raw)), production, TDX_TIME)
    assert forged.value.reason == Reason.QUOTE_SIGNATURE_INVALID
    with_certs = Evidence(TeeType.TDX, (vectors / GNR).read_bytes(), (b"x",))
    with pytest.raises(MalformedEvidence) as carried:
        tdx.verify_quote(with_certs, production, TDX_TIME)
    assert carried.value.reason == Reason.BAD_CERTIFICATE


def test_simulated_quote_refusals(
    authority: SimulatedAuthority, sim_trust: TrustStore, now
) -> None:  # type: ignore[no-untyped-def]
    platform = authority.tdx()
    ok = tdx.verify_quote(Evidence(TeeType.TDX, platform.quote(RD, mrtd=MRTD)), sim_trust, now)
    assert ok.quote.body.report_data == RD and ok.pck.simulated
    unbound = platform.quote(RD, mrtd=MRTD, qe_report_data=bytes(64))
    with pytest.raises(VerificationFailed) as err:
        tdx.verify_quote(Evidence(TeeType.TDX, unbound), sim_trust, now)
    assert err.value.reason == Reason.QE_REPORT_DATA_MISMATCH


# --- step 3: collateral selection -------------------------------------------------------------


def test_collateral_for_a_real_quote(vectors: Path, production: TrustStore) -> None:
    verified = tdx.verify_quote(_real(vectors, GNR), production, GNR_TIME)
    selected = tdx.select_collateral(
        verified, _gnr_collateral(vectors), production, GNR_TIME, dt.timedelta(0), True
    )
    assert selected.tcb_info is not None and selected.qe_identity is not None
    assert selected.tcb_info.fmspc == verified.pck.extensions.fmspc
    assert len(selected.signers) == 2 and not selected.simulated


def test_collateral_missing_is_refused_only_when_required(
    vectors: Path, production: TrustStore
) -> None:
    verified = tdx.verify_quote(_real(vectors, GNR), production, GNR_TIME)
    none = StaticCollateralSource()
    with pytest.raises(CollateralUnavailable) as err:
        tdx.select_collateral(verified, none, production, GNR_TIME, dt.timedelta(0), True)
    assert err.value.reason == Reason.COLLATERAL_MISSING
    empty = tdx.select_collateral(verified, None, production, GNR_TIME, dt.timedelta(0), False)
    assert (empty.tcb_info, empty.qe_identity, empty.signers) == (None, None, ())
    stale = GNR_TIME + dt.timedelta(days=400)
    with pytest.raises(CollateralUnavailable) as old:
        tdx.select_collateral(
            verified, _gnr_collateral(vectors), production, stale, dt.timedelta(0), True
        )
    assert old.value.reason == Reason.COLLATERAL_STALE


def test_simulated_collateral_selection(
    authority: SimulatedAuthority, sim_trust: TrustStore, now
) -> None:  # type: ignore[no-untyped-def]
    platform = authority.tdx()
    verified = tdx.verify_quote(
        Evidence(TeeType.TDX, platform.quote(RD, mrtd=MRTD)), sim_trust, now
    )
    source = authority.collateral_source(tdx=[platform], now=now)
    selected = tdx.select_collateral(verified, source, sim_trust, now, dt.timedelta(0), True)
    assert selected.simulated and selected.tcb_info is not None
    wrong_qe = StaticCollateralSource(
        tcb_infos=(platform.tcb_info(now=now),),
        qe_identity=platform.qe_identity(now=now, mrsigner=b"\x01" * 32),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    with pytest.raises(VerificationFailed) as err:
        tdx.select_collateral(verified, wrong_qe, sim_trust, now, dt.timedelta(0), True)
    assert err.value.reason == Reason.QE_IDENTITY_MISMATCH


# --- between 3 and 4: revocation --------------------------------------------------------------


def test_revocation(authority: SimulatedAuthority, sim_trust: TrustStore, now) -> None:  # type: ignore[no-untyped-def]
    platform = authority.tdx()
    pck = tdx.verify_pck_chain(platform.pck_chain_pem(), sim_trust, now)
    zero = dt.timedelta(0)
    assert tdx.check_revocation(authority.collateral_source(now=now), pck, [], now, zero, True)
    assert not tdx.check_revocation(StaticCollateralSource(), pck, [], now, zero, False)
    with pytest.raises(CollateralUnavailable):
        tdx.check_revocation(StaticCollateralSource(), pck, [], now, zero, True)
    revoked = authority.collateral_source(now=now, revoked={"pck_ca": [platform.pck.serial_number]})
    with pytest.raises(VerificationFailed) as err:
        tdx.check_revocation(revoked, pck, [], now, zero, True)
    assert err.value.reason == Reason.CERT_REVOKED


def test_a_crl_cannot_vouch_for_a_certificate_its_issuer_did_not_issue(
    vectors: Path, production: TrustStore
) -> None:
    """The real root CA CRL lists serials of the root's certificates only: the real PCK leaf
    (issued by the Platform CA) used to be skipped silently, i.e. reported checked unchecked."""
    pem = parse_tdx_quote((vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes())
    pck = tdx.verify_pck_chain(pem.signature_data.pck_chain_pem, production, SPR_TIME)
    leaf, ca, root = pck.chain
    root_crl = (vectors / "roots/intel/intel_sgx_root_ca_crl.der").read_bytes()
    zero = dt.timedelta(0)
    _crl.check_revocation(root_crl, root, (ca,), SPR_TIME, grace=zero, what="root")
    with pytest.raises(VerificationFailed) as err:
        _crl.check_revocation(root_crl, root, (ca, leaf), SPR_TIME, grace=zero, what="root")
    assert err.value.reason == Reason.COLLATERAL_MISMATCH


def test_a_tcb_signer_under_another_root_is_not_passed_unchecked(
    authority: SimulatedAuthority, sim_trust: TrustStore, now
) -> None:  # type: ignore[no-untyped-def]
    """sim_trust pins the real Intel root beside the simulated one: a TCB-signing certificate of
    the real root beside a simulated PCK chain was skipped by the simulated root's CRL."""
    platform = authority.tdx()
    pck = tdx.verify_pck_chain(platform.pck_chain_pem(), sim_trust, now)
    real_signer = tdx.verify_signing_chain(NEW_TCB_SIGNING.read_bytes(), sim_trust, now)
    source = authority.collateral_source(now=now)
    zero = dt.timedelta(0)
    with pytest.raises(VerificationFailed) as err:
        tdx.check_revocation(source, pck, [real_signer], now, zero, True)
    assert err.value.reason == Reason.COLLATERAL_MISMATCH


# --- step 4: TCB evaluation -------------------------------------------------------------------


def _evaluate(verified: tdx.VerifiedQuote, selected: tdx.SelectedCollateral):  # type: ignore[no-untyped-def]
    q = verified.quote
    return tdx.evaluate_tcb(
        q.body, q.signature_data.qe_report.isv_svn, verified.pck.extensions,
        selected.tcb_info, selected.qe_identity,
    )  # fmt: skip


def test_tcb_of_real_quotes(vectors: Path, production: TrustStore) -> None:
    gnr = tdx.verify_quote(_real(vectors, GNR), production, GNR_TIME)
    selected = tdx.select_collateral(
        gnr, _gnr_collateral(vectors), production, GNR_TIME, dt.timedelta(0), True
    )
    result = _evaluate(gnr, selected)
    assert (result.status, result.platform_status, result.module_status, result.qe_status) == (
        "OutOfDate", "OutOfDate", "UpToDate", "UpToDate",
    )  # fmt: skip
    td15 = tdx.verify_quote(_real(vectors, TD15), production, TD15_TIME)
    source = StaticCollateralSource(
        tcb_infos=((vectors / "tdx/tcbinfo_90c06f000000_gotdxguest.json").read_bytes(),),
        signing_chain=NEW_TCB_SIGNING.read_bytes(),
    )
    chosen = tdx.select_collateral(td15, source, production, TD15_TIME, dt.timedelta(0), False)
    assert _evaluate(td15, chosen).status == "UpToDate"
    spr = tdx.verify_quote(_real(vectors, "tdx/v4_spr_gotdxguest.dat"), production, SPR_TIME)
    source = StaticCollateralSource(
        tcb_infos=((vectors / "tdx/tcbinfo_50806f000000_gotdxguest.json").read_bytes(),),
        signing_chain=(vectors / "roots/intel/intel_tcb_signing_chain.pem").read_bytes(),
    )
    chosen = tdx.select_collateral(spr, source, production, SPR_TIME, dt.timedelta(0), False)
    assert _evaluate(spr, chosen).status == "NoMatchingTcbLevel"
    nothing = tdx.evaluate_tcb(td15.quote.body, 0, td15.pck.extensions, None, None)
    assert (nothing.status, nothing.platform_status) == ("NotEvaluated", "NotEvaluated")


@pytest.mark.parametrize("status", ["UpToDate", "OutOfDate", "Revoked", "SWHardeningNeeded"])
def test_tcb_of_simulated_quotes(
    authority: SimulatedAuthority, sim_trust: TrustStore, now, status: str
) -> None:  # type: ignore[no-untyped-def]
    platform = authority.tdx()
    verified = tdx.verify_quote(
        Evidence(TeeType.TDX, platform.quote(RD, mrtd=MRTD)), sim_trust, now
    )
    source = StaticCollateralSource(
        tcb_infos=(platform.tcb_info(now=now, status=status),),
        qe_identity=platform.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    selected = tdx.select_collateral(verified, source, sim_trust, now, dt.timedelta(0), False)
    assert _evaluate(verified, selected).status == status
    # A TEE_TCB_SVN below the platform's level falls to the simulated TCB info's 2018 level.
    low = dataclasses.replace(verified.quote.body, tee_tcb_svn=bytes(16))
    result = tdx.evaluate_tcb(
        low, verified.quote.signature_data.qe_report.isv_svn, verified.pck.extensions,
        selected.tcb_info, selected.qe_identity,
    )  # fmt: skip
    assert (result.status, result.tcb_date) == ("OutOfDate", "2018-01-04T00:00:00Z")


def _level(platform, tdx_components: tuple[int, ...], status: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "tcb": {
            "sgxtcbcomponents": [{"svn": c} for c in platform.cpusvn_components],
            "pcesvn": platform.pcesvn,
            "tdxtcbcomponents": [{"svn": c} for c in tdx_components],
        },
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": status,
    }


def _td15_tcb_info(  # type: ignore[no-untyped-def]
    authority: SimulatedAuthority,
    platform,
    now,
    newest_svn2: int,
    *,
    oldest_level_first: bool = False,
    module_levels: list[dict[str, object]] | None = None,
    tcb_type: int = 0,
) -> bytes:
    """A signed TCB info with a TDX_01 module identity (SVN 3 up to date, below out of date) and
    platform levels newest first: TEE_TCB_SVN[0..2] of (3, 0, ``newest_svn2``) up to date, then
    (3, 0, 5) SWHardeningNeeded when the newest asks for more, then a 2018 level out of date
    (listed first with ``oldest_level_first``)."""
    ident = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "ff" * 8}
    levels = [_level(platform, (3, 0, newest_svn2) + (0,) * 13, "UpToDate")]
    if newest_svn2 > 5:
        levels.append(_level(platform, (3, 0, 5) + (0,) * 13, "SWHardeningNeeded"))
    oldest = {**_level(platform, (0,) * 16, "OutOfDate"), "tcbDate": "2018-01-04T00:00:00Z"}
    levels = [oldest, *levels] if oldest_level_first else [*levels, oldest]
    module_levels = module_levels or [
        {"tcb": {"isvsvn": 3}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"},
        {"tcb": {"isvsvn": 0}, "tcbDate": "2018-01-04T00:00:00Z", "tcbStatus": "OutOfDate"},
    ]
    body = {
        "id": "TDX",
        "version": 3,
        "issueDate": (now - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nextUpdate": (now + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fmspc": platform.fmspc.hex(),
        "pceId": "0000",
        "tcbType": tcb_type,
        "tcbEvaluationDataNumber": 17,
        "tdxModule": ident,
        "tdxModuleIdentities": [{"id": "TDX_01", **ident, "tcbLevels": module_levels}],
        "tcbLevels": levels,
    }
    return authority.sign_collateral("tcbInfo", body)


@pytest.mark.parametrize(
    ("svn", "svn2", "newest_svn2", "status"),
    [
        # Intel's case: launched on an out-of-date module (SVN 2), now on the newest (SVN 3).
        ((2, 1, 5), (3, 1, 5), 5, "TdRelaunchAdvised"),
        # The module was never out of date; TEE_TCB_SVN[2] was: Intel says OutOfDate.
        ((3, 1, 4), (3, 1, 5), 5, "OutOfDate"),
        # A major-0 module has no module status (Intel's STATUS_OK): never a relaunch.
        ((2, 0, 5), (3, 0, 5), 5, "OutOfDate"),
        # TEE_TCB_SVN2 meets an older level (SWHardeningNeeded), not the newest one.
        ((2, 1, 5), (3, 1, 5), 6, "OutOfDate"),
    ],
    ids=["module-updated", "module-never-out-of-date", "major-0", "svn2-short-of-newest"],
)
def test_td15_relaunch_is_advised_only_as_intel_advises_it(  # type: ignore[no-untyped-def]
    authority: SimulatedAuthority, sim_trust: TrustStore, now, svn, svn2, newest_svn2, status
) -> None:
    """TEE_TCB_SVN2 was evaluated as a whole against any level, and TdRelaunchAdvised given
    whenever that was not out of date while TEE_TCB_SVN was: a policy accepting
    TdRelaunchAdvised (POLICY.md lists it) released to TDs Intel's QVL calls OutOfDate."""
    platform = authority.tdx()
    quote = platform.quote(
        RD, mrtd=MRTD, version=5, body_type=3,
        tee_tcb_svn=bytes(svn) + bytes(13), tee_tcb_svn2=bytes(svn2) + bytes(13),
    )  # fmt: skip
    verified = tdx.verify_quote(Evidence(TeeType.TDX, quote), sim_trust, now)
    source = StaticCollateralSource(
        tcb_infos=(_td15_tcb_info(authority, platform, now, newest_svn2),),
        qe_identity=platform.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    selected = tdx.select_collateral(verified, source, sim_trust, now, dt.timedelta(0), True)
    assert _evaluate(verified, selected).status == status


@pytest.mark.parametrize(
    ("tcb_info_kwargs", "says"),
    [
        ({"oldest_level_first": True}, "tcbInfo.tcbLevels are not newest first"),
        (
            {
                "module_levels": [
                    {
                        "tcb": {"isvsvn": 0},
                        "tcbDate": "2024-03-13T00:00:00Z",
                        "tcbStatus": "OutOfDate",
                    },
                    {
                        "tcb": {"isvsvn": 3},
                        "tcbDate": "2024-03-13T00:00:00Z",
                        "tcbStatus": "UpToDate",
                    },
                ]
            },
            "not highest ISVSVN first",
        ),
    ],
    ids=["platform-levels-oldest-first", "module-levels-lowest-svn-first"],
)
def test_tcb_levels_out_of_intels_order_are_refused(  # type: ignore[no-untyped-def]
    authority: SimulatedAuthority, sim_trust: TrustStore, now, tcb_info_kwargs, says: str
) -> None:
    """Levels were evaluated in document order (the first one met judges), so the status
    depended on an order Intel's PCS specifies (newest first) but the verifier never checked: a
    document with its 2018 level first judged an up-to-date TD by it. Out of order, the document
    is refused (BAD_COLLATERAL) rather than re-sorted (see collateral._check_newest_first)."""
    platform = authority.tdx()
    quote = platform.quote(
        RD, mrtd=MRTD, version=5, body_type=3,
        tee_tcb_svn=bytes((3, 1, 5)) + bytes(13), tee_tcb_svn2=bytes((3, 1, 5)) + bytes(13),
    )  # fmt: skip
    verified = tdx.verify_quote(Evidence(TeeType.TDX, quote), sim_trust, now)
    source = StaticCollateralSource(
        tcb_infos=(_td15_tcb_info(authority, platform, now, 5, **tcb_info_kwargs),),
        qe_identity=platform.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    with pytest.raises(MalformedEvidence) as err:
        tdx.select_collateral(verified, source, sim_trust, now, dt.timedelta(0), True)
    assert err.value.reason == Reason.BAD_COLLATERAL and says in err.value.message
    in_order = StaticCollateralSource(
        tcb_infos=(_td15_tcb_info(authority, platform, now, 5),),
        qe_identity=platform.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    selected = tdx.select_collateral(verified, in_order, sim_trust, now, dt.timedelta(0), True)
    assert _evaluate(verified, selected).status == "UpToDate"


def test_a_tcb_info_of_another_tcb_type_is_refused(  # type: ignore[no-untyped-def]
    authority: SimulatedAuthority, sim_trust: TrustStore, now
) -> None:
    """tcbType says how TCB levels compare; only 0 (component by component, what the evaluation
    does) is defined. It was not read, so a document of another type was judged as type 0."""
    platform = authority.tdx()
    verified = tdx.verify_quote(
        Evidence(TeeType.TDX, platform.quote(RD, mrtd=MRTD)), sim_trust, now
    )
    source = StaticCollateralSource(
        tcb_infos=(_td15_tcb_info(authority, platform, now, 5, tcb_type=1),),
        qe_identity=platform.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    with pytest.raises(MalformedEvidence) as err:
        tdx.select_collateral(verified, source, sim_trust, now, dt.timedelta(0), True)
    assert err.value.reason == Reason.BAD_COLLATERAL and "tcbType 1" in err.value.message


@pytest.mark.parametrize(
    ("qe_level", "status"),
    [
        ("UpToDate", "UpToDate"),
        ("OutOfDate", "OutOfDate"),
        ("Revoked", "Revoked"),
        ("OutOfDateConfigurationNeeded", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate"),
        ("SWHardeningNeeded", "OutOfDate"),
    ],
)
def test_a_qe_level_neither_up_to_date_nor_revoked_is_out_of_date(  # type: ignore[no-untyped-def]
    authority: SimulatedAuthority, sim_trust: TrustStore, now, qe_level: str, status: str
) -> None:
    """Intel's QVL (EnclaveReportVerifier) reads every QE identity level but UpToDate and Revoked
    as ISVSVN out of date. Only the exact "OutOfDate" was: a QE at a level labelled, say,
    OutOfDateConfigurationNeeded left an up-to-date platform UpToDate, as if the QE were."""
    platform = authority.tdx()
    verified = tdx.verify_quote(
        Evidence(TeeType.TDX, platform.quote(RD, mrtd=MRTD)), sim_trust, now
    )
    source = StaticCollateralSource(
        tcb_infos=(platform.tcb_info(now=now),),
        qe_identity=platform.qe_identity(now=now, status=qe_level),
        signing_chain=authority.tcb_signing_chain_pem(),
    )
    selected = tdx.select_collateral(verified, source, sim_trust, now, dt.timedelta(0), True)
    result = _evaluate(verified, selected)
    assert (result.status, result.qe_status) == (status, qe_level)
