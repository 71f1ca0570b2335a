"""Every real vector in shared/attestation-vectors/SOURCES.md parses to exactly the values listed
there and verifies against the pinned production roots as of a time inside its validity window."""

from __future__ import annotations

import ast
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from strongroom.attestation import (
    CollateralUnavailable,
    Evidence,
    SnpClaims,
    StaticCollateralSource,
    TdxClaims,
    TeeType,
    TrustStore,
    verify_evidence,
)
from strongroom.attestation.abi.snp import parse_snp_report
from strongroom.attestation.abi.tdx import parse_tdx_quote
from strongroom.attestation.encoding import detect_evidence
from strongroom.attestation.errors import VerificationFailed
from strongroom.reasons import Reason
from tests.conftest import DATA

UTC = dt.UTC
# SNP certificates are valid at this time except the one-year AWS VLEK (see SOURCES.md).
SNP_TIME = dt.datetime(2026, 3, 1, tzinfo=UTC)
VLEK_TIME = dt.datetime(2025, 6, 1, tzinfo=UTC)
TDX_TIME = dt.datetime(2026, 3, 1, tzinfo=UTC)
NEW_TCB_SIGNING = Path(__file__).resolve().parent / "data" / "intel_tcb_signing_2025.pem"


@dataclass
class Vector:
    name: str
    tee: str
    fields: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def _sources() -> dict[str, Vector]:
    root = DATA / "attestation"
    out: dict[str, Vector] = {}
    current: Vector | None = None
    tee = ""
    for line in (root / "SOURCES.md").read_text().splitlines():
        if line.startswith("### "):
            tee = "SNP" if "SEV-SNP" in line else "TDX"
        elif line.startswith("#### `"):
            name = line.split("`")[1]
            current = out[name] = Vector(name, tee)
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("- "):
            current.lines.append(line[2:])
            for key, value in re.findall(r"(\w+): `([0-9a-f]+)`", line):
                current.fields[key] = value
            for key, value in re.findall(r"(\w+)=`([0-9a-f]+)`", line):
                current.fields[key] = value
    return out


SOURCES = _sources()
SNP_VECTORS = sorted(n for n, v in SOURCES.items() if v.tee == "SNP")
TDX_VECTORS = sorted(n for n, v in SOURCES.items() if v.tee == "TDX")


def _line(v: Vector, prefix: str) -> str:
    return next(line for line in v.lines if line.startswith(prefix))


def test_sources_lists_all_vectors(vectors: Path) -> None:
    assert len(SNP_VECTORS) == 10 and len(TDX_VECTORS) == 7


def _snp_evidence(vectors: Path, v: Vector) -> Evidence:
    verify_with = _line(v, "verify with:")
    files = dict.fromkeys(re.findall(r"`([^`]+)`", verify_with))
    certs = tuple((vectors / f).read_bytes() for f in files)
    detected = detect_evidence((vectors / v.name).read_bytes())
    assert detected.tee_type is TeeType.SEV_SNP
    fmt = _line(v, "input format:").split(":", 1)[1].split()[0]
    assert detected.encoding == ("hex" if fmt == "hex" else "raw")
    assert detected.container == ("azure-hcl" if fmt == "hcl" else "snp")
    return Evidence(TeeType.SEV_SNP, detected.data, certs)


@pytest.mark.parametrize("name", SNP_VECTORS)
def test_snp_vector_parses_and_verifies(vectors: Path, production: TrustStore, name: str) -> None:
    v = SOURCES[name]
    evidence = _snp_evidence(vectors, v)
    summary = _line(v, "product=")
    m = re.search(
        r"product=(\w+) .*report version=(\d+), signing key=(\w+), vmpl=(\d+), guest_svn=(\d+), "
        r"policy=(0x[0-9a-f]+) \(debug=(\w+).*platform_info=(0x[0-9a-f]+), "
        r"reported_tcb=(\{[^}]*\}), fw=([\d.]+)",
        summary,
    )
    assert m, summary
    product, version, key, vmpl, svn, policy, debug, pinfo, tcb, fw = m.groups()

    report = parse_snp_report(evidence.report)
    assert report.version == int(version)
    assert report.vmpl == int(vmpl)
    assert report.guest_svn == int(svn)
    assert report.policy.raw == int(policy, 16)
    assert report.policy.debug is (debug == "True")
    assert report.platform_info.raw == int(pinfo, 16)
    assert report.reported_tcb.components() == ast.literal_eval(tcb)
    assert list(report.reported_tcb.components()) == list(ast.literal_eval(tcb))  # order too
    assert str(report.current_version) == fw
    assert report.signing_key_name == key
    # Version 2 reports carry no CPUID fields: the product is then known only from the VCEK.
    assert report.product == (product if report.version >= 3 else None)
    for f in ("measurement", "report_data", "host_data", "chip_id"):
        assert getattr(report, f).hex() == v.fields[f], f

    when = VLEK_TIME if key == "VLEK" else SNP_TIME
    # AMD's ARK CRLs are not in the public record these vectors come from: signatures, chain and
    # bindings verify, and the claims say revocation was not checked (no policy releases them).
    claims = verify_evidence(evidence, trust=production, now=when, require_collateral=False)
    assert not claims.collateral_complete
    with pytest.raises(CollateralUnavailable) as missing:
        verify_evidence(evidence, trust=production, now=when)
    assert missing.value.reason == "COLLATERAL_MISSING"
    assert isinstance(claims, SnpClaims)
    assert (claims.product, claims.signing_key, claims.version) == (product, key, int(version))
    d = claims.as_dict()
    for f in ("measurement", "report_data", "host_data", "chip_id"):
        assert d[f] == v.fields[f]
    assert d["policy"] == policy and d["vmpl"] == int(vmpl) and d["debug"] is (debug == "True")
    assert d["reported_tcb"] == ast.literal_eval(tcb)
    assert not claims.simulated


def test_expired_vlek_fails_today(vectors: Path, production: TrustStore) -> None:
    evidence = _snp_evidence(vectors, SOURCES["snp/milan_v3_vlek_aws_trustee.bin"])
    with pytest.raises(VerificationFailed) as err:
        verify_evidence(evidence, trust=production, now=dt.datetime(2026, 11, 25, tzinfo=UTC))
    assert err.value.reason == Reason.CERT_NOT_VALID_AT_TIME


@pytest.mark.parametrize("name", TDX_VECTORS)
def test_tdx_vector_parses_and_verifies(vectors: Path, production: TrustStore, name: str) -> None:
    v = SOURCES[name]
    raw = (vectors / name).read_bytes()
    detected = detect_evidence(raw)
    assert (detected.tee_type, detected.encoding) == (TeeType.TDX, "raw")
    m = re.search(
        r"quote version=(\d+), body=(TD1\.[05]).*length=(\d+) bytes.*sig_data_len=(\d+), "
        r"trailing bytes after signature data=(\d+)",
        _line(v, "quote version="),
    )
    assert m
    version, body, length, sig_len, trailing = m.groups()
    pck = re.search(r"FMSPC=([0-9a-f]+), PCESVN=(\d+), sgx_type=(\d+)", _line(v, "PCK chain:"))
    assert pck
    fmspc, pcesvn, sgx_type = pck.groups()

    quote = parse_tdx_quote(raw)
    assert len(raw) == int(length)
    assert quote.header.version == int(version)
    assert quote.body.body_name == body
    assert quote.trailing_bytes == int(trailing)
    assert len(raw) - quote.signed_length - 4 - quote.trailing_bytes == int(sig_len)
    b = quote.body
    assert b.tee_tcb_svn.hex() == v.fields["tee_tcb_svn"]
    assert b.td_attributes.hex() == v.fields["td_attributes"]
    assert b.xfam.hex() == v.fields["xfam"]
    assert b.mr_seam.hex() == v.fields["mr_seam"]
    assert b.mr_td.hex() == v.fields["mr_td"]
    for i in range(4):
        assert b.rtmrs[i].hex() == v.fields[f"rtmr{i}"]
    assert b.report_data.hex() == v.fields["report_data"]
    if body == "TD1.5":
        assert b.tee_tcb_svn2 is not None and b.mr_servicetd is not None
        assert b.tee_tcb_svn2.hex() == v.fields["tee_tcb_svn2"]
        assert b.mr_servicetd.hex() == v.fields["mr_servicetd"]

    claims = verify_evidence(
        Evidence(TeeType.TDX, raw), trust=production, now=TDX_TIME, require_collateral=False
    )
    assert isinstance(claims, TdxClaims) and not claims.collateral_complete
    with pytest.raises(CollateralUnavailable) as missing:  # fail closed without collateral
        verify_evidence(Evidence(TeeType.TDX, raw), trust=production, now=TDX_TIME)
    assert missing.value.reason == "COLLATERAL_MISSING"
    d = claims.as_dict()
    assert (d["fmspc"], d["pcesvn"], d["sgx_type"]) == (fmspc, int(pcesvn), int(sgx_type))
    assert d["mrtd"] == v.fields["mr_td"] and d["report_data"] == v.fields["report_data"]
    assert d["version"] == int(version) and d["body_type"] == body
    assert d["debug"] is bool(b.td_attributes[0])  # any of bits 0-7 ("TD under debug")
    assert d["tcb_status"] == "NotEvaluated"  # no collateral given


def _collateral(vectors: Path, chain: Path, *files: str) -> StaticCollateralSource:
    """The verifier's own collateral (what an operator passes with ``--collateral``)."""
    tcb = tuple((vectors / f).read_bytes() for f in files if "tcbinfo" in f)
    qe = [(vectors / f).read_bytes() for f in files if "qe_identity" in f]
    crls = tuple((vectors / f).read_bytes() for f in files if f.endswith(".der"))
    return StaticCollateralSource(
        tcb_infos=tcb, qe_identity=qe[0] if qe else None, signing_chain=chain.read_bytes(),
        crl_list=crls,
    )  # fmt: skip


COLLATERAL_CASES = [
    # (quote, as of, new TCB-signing cert?, collateral files, expected status, platform, module, qe)
    # Only the first has every document (CRLs and QE identity) valid at one time in the public
    # record: it verifies completely; the others are evaluated with what exists (offline mode).
    (
        "tdx/v4_spr_gotdxguest.dat", dt.datetime(2023, 6, 20, tzinfo=UTC), False,
        ("tdx/tcbinfo_50806f000000_gotdxguest.json", "tdx/qe_identity_gotdxguest.json",
         "roots/intel/intel_sgx_root_ca_crl.der", "roots/intel/intel_pck_platform_ca_crl.der"),
        "NoMatchingTcbLevel", "NoMatchingTcbLevel", None, None,
    ),
    (
        "tdx/v5_td15_gotdxguest.dat", dt.datetime(2026, 2, 15, tzinfo=UTC), True,
        ("tdx/tcbinfo_90c06f000000_gotdxguest.json",),
        "UpToDate", "UpToDate", "UpToDate", None,
    ),
    (
        "tdx/v5_td15_trustee.dat", dt.datetime(2026, 2, 15, tzinfo=UTC), True,
        ("tdx/tcbinfo_90c06f000000_gotdxguest.json",),
        "NoMatchingTcbLevel", "NoMatchingTcbLevel", None, None,
    ),
    (
        "tdx/v4_gnr_trustee.dat", dt.datetime(2025, 11, 1, tzinfo=UTC), True,
        ("tdx/tcbinfo_00a06d080000_trustee.json", "tdx/qe_identity_trustee.json"),
        "OutOfDate", "OutOfDate", "UpToDate", "UpToDate",
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", COLLATERAL_CASES, ids=[c[0] for c in COLLATERAL_CASES])
def test_tdx_collateral_and_tcb_status(vectors: Path, production: TrustStore, case) -> None:  # type: ignore[no-untyped-def]
    name, when, new_chain, files, status, platform, module, qe = case
    chain = NEW_TCB_SIGNING if new_chain else vectors / "roots/intel/intel_tcb_signing_chain.pem"
    evidence = Evidence(TeeType.TDX, (vectors / name).read_bytes())
    source = _collateral(vectors, chain, *files)
    complete = len(files) == 4
    claims = verify_evidence(
        evidence, trust=production, now=when, collateral=source, require_collateral=complete
    )
    assert isinstance(claims, TdxClaims)
    assert claims.collateral_evaluated
    assert claims.collateral_complete is complete
    assert (claims.tcb_status, claims.platform_tcb_status) == (status, platform)
    assert (claims.tdx_module_tcb_status, claims.qe_tcb_status) == (module, qe)


def test_reissued_tcb_signing_cert_chains_to_pinned_root(production: TrustStore) -> None:
    from strongroom.attestation._x509 import verify_issued_by
    from strongroom.attestation.abi.certs import load_certificate

    cert = load_certificate(NEW_TCB_SIGNING.read_bytes())
    verify_issued_by(cert, production.intel_roots()[0].cert)
