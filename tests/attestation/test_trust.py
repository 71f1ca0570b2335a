"""Pinned trust anchors: fingerprints, and the simulated-root guard rails."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from strongroom.attestation.abi.certs import common_name, load_certificate, split_pem_certificates
from strongroom.attestation.errors import MalformedEvidence
from strongroom.attestation.trust import TrustStore
from strongroom.dev.simulated import SimulatedAuthority

# From the "Trust-anchor pins" table of shared/attestation-vectors/SOURCES.md: (SPKI, DER) SHA-256.
PINS = {
    "ark_milan.pem": (
        "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    ),
    "ark_genoa.pem": (
        "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
        "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    ),
    "ark_turin.pem": (
        "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
        "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    ),
    "ask_milan.pem": (
        "42491669ccb851d627ea9846cd24eccbeb7de7c2a62740120fff88001d38ebb6",
        "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    ),
    "ask_genoa.pem": (
        "0324d55bcd48ba877a8fd87c0e1b4934dec8448e3807a24384a34dc6a6c9ebb8",
        "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    ),
    "ask_turin.pem": (
        "0000ead352025f208bf55297c4192c34cd1b878002107366d8f2065a9ae7d3a9",
        "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    ),
    "intel_sgx_root_ca.pem": (
        "a0af031289f5d5d4132f9186068a7fc13628633ba235777472e29b6b6c67a49e",
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
    ),
}
TRUST = resources.files("strongroom.attestation.trust")


def _fingerprints(pem: bytes) -> tuple[str, str]:
    (der,) = split_pem_certificates(pem)
    cert = load_certificate(der)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest(), hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("name", sorted(PINS))
def test_pinned_root_fingerprints(name: str) -> None:
    assert _fingerprints(TRUST.joinpath(name).read_bytes()) == PINS[name]


@pytest.mark.parametrize("version", [b"\x03", b"\x7f"])
def test_a_certificate_with_an_unknown_version_is_bad_evidence(version: bytes) -> None:
    """Found by the evidence fuzzer: a version field other than v1..v3 made cryptography raise
    InvalidVersion, which is not a ValueError, and it escaped as an untyped error."""
    (der,) = split_pem_certificates(TRUST.joinpath("ark_milan.pem").read_bytes())
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2 (v3), the first in the DER
    assert v3 in der[:16]
    with pytest.raises(MalformedEvidence) as info:
        load_certificate(der.replace(v3, v3[:-1] + version, 1))
    assert info.value.reason == "BAD_CERTIFICATE"


@pytest.mark.parametrize("product", ["milan", "genoa", "turin"])
def test_asvk_bundles_carry_the_pinned_ark(product: str) -> None:
    asvk, ark = split_pem_certificates(TRUST.joinpath(f"asvk_ark_{product}.pem").read_bytes())
    assert common_name(load_certificate(asvk)) == f"SEV-VLEK-{product.capitalize()}"
    assert hashlib.sha256(ark).hexdigest() == PINS[f"ark_{product}.pem"][1]


def test_production_store_has_only_real_roots(production: TrustStore) -> None:
    assert not production.includes_simulated
    described = production.describe()
    assert {d["product"] for d in described if d["vendor"] == "AMD"} == {"Milan", "Genoa", "Turin"}
    assert not any(d["simulated"] for d in described)
    assert [r.spki_sha256 for r in production.intel_roots()] == [PINS["intel_sgx_root_ca.pem"][0]]


def test_simulated_roots_only_through_explicit_call(
    authority: SimulatedAuthority, production: TrustStore
) -> None:
    store = production.with_simulated_roots(amd=authority.amd_root_pems())
    assert store.includes_simulated
    assert not production.includes_simulated
    with pytest.raises(ValueError, match="not marked as a simulated"):
        production.with_simulated_roots(amd=[TRUST.joinpath("ark_milan.pem").read_bytes()])
    with pytest.raises(ValueError, match="with_simulated_roots"):
        TrustStore([], [load_pinned_sim(authority)])


def load_pinned_sim(authority: SimulatedAuthority):  # type: ignore[no-untyped-def]
    from strongroom.attestation.trust import _pinned

    return _pinned(authority.intel_root_pem())


def test_simulated_authority_round_trips(tmp_path, authority: SimulatedAuthority) -> None:  # type: ignore[no-untyped-def]
    authority.save(tmp_path)
    loaded = SimulatedAuthority.load(tmp_path)
    assert loaded.product == "Milan"
    assert loaded.amd_root_pems() == authority.amd_root_pems()
    assert "NOT FOR PRODUCTION" in (tmp_path / "README").read_text()


def test_fixture_regeneration_verifies(tmp_path, now) -> None:  # type: ignore[no-untyped-def]
    from strongroom.attestation import Evidence, TeeType, verify_evidence
    from strongroom.dev.simulated import write_fixtures

    authority = write_fixtures(tmp_path)
    loaded = SimulatedAuthority.load(tmp_path)
    assert loaded.intel_root_pem() == authority.intel_root_pem()
    ev = Evidence(
        TeeType.SEV_SNP,
        (tmp_path / "snp_report.bin").read_bytes(),
        ((tmp_path / "snp_vcek.der").read_bytes(),),
    )
    source = loaded.collateral_source(now=now)
    assert verify_evidence(ev, trust=loaded.trust_store(), now=now, collateral=source).simulated
