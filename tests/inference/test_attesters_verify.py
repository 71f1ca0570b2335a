"""Evidence from every attester path verifies end to end when the "hardware" signs like real hardware.

The emulated kernel interfaces are fed reports and quotes from the simulated TEE (test-signed,
byte-exact), and the bundles the attesters return go through the wire form into the key broker's
verifier, against a trust store holding the simulated roots.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from strongroom.attestation.collateral import StaticCollateralSource
from strongroom.attestation.evidence import Evidence
from strongroom.attestation.trust import TrustStore
from strongroom.attestation.verify import verify_evidence
from strongroom.attesters import (
    ARK_GUID,
    ASK_GUID,
    VCEK_GUID,
    VLEK_GUID,
    ConfigfsTsmAttester,
    EvidenceBundle,
    SevGuestAttester,
    SimulatedAttester,
    TdxGuestAttester,
    TeeType,
)
from strongroom.attesters import _tdxguest as tdx
from strongroom.dev.simulated import SimulatedAuthority, SimulatedSnp, SimulatedTdx
from tests.inference.fake_tee import (
    FAKE_ARK,
    FAKE_ASK,
    EmulatedConfigfs,
    FakeSevGuest,
    FakeTdxGuest,
)

MEASUREMENT = bytes(range(48))
MRTD = bytes(range(100, 148))
RD = bytes(range(64, 128))


@pytest.fixture(scope="module")
def now(sim_now: dt.datetime) -> dt.datetime:
    return sim_now


@pytest.fixture(scope="module")
def authority(sim_authority: SimulatedAuthority) -> SimulatedAuthority:
    return sim_authority


@pytest.fixture(scope="module")
def trust(authority: SimulatedAuthority) -> TrustStore:
    return authority.trust_store()


@pytest.fixture(scope="module")
def snp(authority: SimulatedAuthority, now: dt.datetime) -> SimulatedSnp:
    return authority.snp(now=now)


@pytest.fixture(scope="module")
def tdx_sim(authority: SimulatedAuthority, now: dt.datetime) -> SimulatedTdx:
    return authority.tdx(now=now)


@pytest.fixture(scope="module")
def verifier_collateral(
    authority: SimulatedAuthority, tdx_sim: SimulatedTdx, now: dt.datetime
) -> StaticCollateralSource:
    """The verifier's own collateral for the simulated chain (as the broker's cache holds it)."""
    return authority.collateral_source(tdx=[tdx_sim], now=now)


_COLLATERAL: list[StaticCollateralSource] = []


@pytest.fixture(autouse=True)
def _collateral(verifier_collateral: StaticCollateralSource) -> None:
    _COLLATERAL[:] = [verifier_collateral]


def verified_report_data(bundle: EvidenceBundle, trust: TrustStore, now: dt.datetime) -> bytes:
    """Through the wire form and the broker's verifier (with the verifier's own collateral,
    never the bundle's); returns the verified REPORT_DATA."""
    evidence = Evidence.from_proto(bundle.to_proto())
    claims = verify_evidence(evidence, trust=trust, now=now, collateral=_COLLATERAL[0])
    return claims.report_data


def test_simulated_snp(snp: SimulatedSnp, trust: TrustStore, now: dt.datetime) -> None:
    attester = SimulatedAttester(
        snp, TeeType.SEV_SNP, production=False, claims={"measurement": MEASUREMENT}
    )
    assert verified_report_data(attester.attest(RD), trust, now) == RD


def test_simulated_tdx(tdx_sim: SimulatedTdx, trust: TrustStore, now: dt.datetime) -> None:
    attester = SimulatedAttester(tdx_sim, TeeType.TDX, production=False, claims={"mrtd": MRTD})
    bundle = attester.attest(RD)
    assert bundle.collateral  # TCB info, QE identity and signing chain travel with the quote
    assert verified_report_data(bundle, trust, now) == RD


def test_simulated_evidence_fails_against_the_production_roots(
    snp: SimulatedSnp, now: dt.datetime
) -> None:
    attester = SimulatedAttester(
        snp, TeeType.SEV_SNP, production=False, claims={"measurement": MEASUREMENT}
    )
    with pytest.raises(Exception) as info:
        verified_report_data(attester.attest(RD), TrustStore.production(), now)
    assert getattr(info.value, "reason", None)


def test_configfs_snp_with_signed_reports(
    tmp_path: Path, snp: SimulatedSnp, trust: TrustStore, now: dt.datetime
) -> None:
    fs = EmulatedConfigfs(
        tmp_path / "report",
        cert_chain=((VCEK_GUID, snp.certificate_der),),
        snp_report=lambda data, vmpl: snp.report(data, measurement=MEASUREMENT, vmpl=vmpl),
    )
    bundle = ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert bundle.certificates == (snp.certificate_der,)
    assert verified_report_data(bundle, trust, now) == RD


def test_a_host_listing_both_a_vcek_and_a_vlek_still_verifies(
    tmp_path: Path, authority: SimulatedAuthority, trust: TrustStore, now: dt.datetime
) -> None:
    """The host fills the certificate table; one provisioned with a VLEK that still lists its
    VCEK made every piece of evidence carry two endorsement keys, which the verifier refuses."""
    vlek = authority.snp(signing_key="VLEK", now=now)
    vcek = authority.snp(now=now)
    fs = EmulatedConfigfs(
        tmp_path / "report",
        cert_chain=((VCEK_GUID, vcek.certificate_der), (VLEK_GUID, vlek.certificate_der)),
        snp_report=lambda data, vmpl: vlek.report(data, measurement=MEASUREMENT, vmpl=vmpl),
    )
    bundle = ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    assert bundle.certificates == (vlek.certificate_der,)
    assert verified_report_data(bundle, trust, now) == RD


def test_sev_guest_with_signed_reports(
    snp: SimulatedSnp, trust: TrustStore, now: dt.datetime
) -> None:
    device = FakeSevGuest(
        cert_chain=((ARK_GUID, FAKE_ARK), (VCEK_GUID, snp.certificate_der), (ASK_GUID, FAKE_ASK)),
        snp_report=lambda data, vmpl: snp.report(data, measurement=MEASUREMENT, vmpl=vmpl),
    )
    bundle = SevGuestAttester(io=device, certs_buffer_size=4096).attest(RD)
    assert bundle.certificates[0] == snp.certificate_der
    # The endorsement key comes first; the fake ASK/ARK are not DER, so verify with it alone
    # (the verifier pins its own roots anyway).
    assert (
        verified_report_data(
            EvidenceBundle(bundle.tee_type, bundle.report, bundle.certificates[:1]), trust, now
        )
        == RD
    )


def test_configfs_tdx_with_signed_quotes(
    tmp_path: Path, tdx_sim: SimulatedTdx, trust: TrustStore, now: dt.datetime
) -> None:
    fs = EmulatedConfigfs(
        tmp_path / "report",
        provider="tdx_guest",
        tdx_quote=lambda data: tdx_sim.quote(data, mrtd=MRTD),
    )
    bundle = ConfigfsTsmAttester(fs.root, fs=fs).attest(RD)
    # configfs-tsm returns the quote only: the collateral comes from Intel PCS (or a cache).
    with_collateral = EvidenceBundle(
        bundle.tee_type, bundle.report, collateral=tdx_sim.collateral(now=now)
    )
    assert verified_report_data(with_collateral, trust, now) == RD


def test_tdx_guest_get_quote_with_signed_quotes(
    tdx_sim: SimulatedTdx, trust: TrustStore, now: dt.datetime
) -> None:
    device = FakeTdxGuest(
        quote_command=tdx.TDX_CMD_GET_QUOTE_INTEL,
        tdx_quote=lambda data: tdx_sim.quote(data, mrtd=MRTD),
    )
    bundle = TdxGuestAttester(io=device).attest(RD)
    with_collateral = EvidenceBundle(
        bundle.tee_type, bundle.report, collateral=tdx_sim.collateral(now=now)
    )
    assert verified_report_data(with_collateral, trust, now) == RD
