"""The verifier's own collateral: the cache, the KDS/PCS fetchers (against a loopback server with
the real URL layouts and headers), fail-closed verdicts, rollback refusal, and hardening of every
parser that sees untrusted bytes."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    collateral_cache,
    collateral_fetch,
    verify_evidence,
)
from strongroom.attestation.abi import _der
from strongroom.attestation.abi import certs as oids
from strongroom.attestation.abi.snp import TcbVersion, parse_snp_report
from strongroom.attestation.collateral import crl_issuer_name, parse_qe_identity, parse_tcb_info
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import CollateralService, FetchSettings
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import StrongroomError, caused_by_caller
from strongroom.reasons import Reason
from tests.attestation.collateral_server import FakeCollateralServer, serve
from tests.certs import self_signed_pem

UTC = dt.UTC
RD = hashlib.sha512(b"collateral").digest()
MEAS = bytes(range(48))
SPR_TIME = dt.datetime(2023, 6, 20, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[FakeCollateralServer]:
    yield from serve()


def fast(server: FakeCollateralServer, **kw: Any) -> FetchSettings:
    kw.setdefault("retries", 1)
    kw.setdefault("backoff_seconds", 0.01)
    kw.setdefault("timeout_seconds", 2.0)
    return FetchSettings(pcs_url=server.url, kds_url=server.url, **kw)


def real_intel(server: FakeCollateralServer, vectors: Path) -> None:
    """The vectors' real Intel collateral under the exact PCS/PCCS paths and headers."""
    chain = (vectors / "roots/intel/intel_tcb_signing_chain.pem").read_bytes()
    server.tcb_info(
        "50806f000000", (vectors / "tdx/tcbinfo_50806f000000_gotdxguest.json").read_bytes(), chain
    )
    server.qe_identity((vectors / "tdx/qe_identity_gotdxguest.json").read_bytes(), chain)
    server.pck_crl(
        "platform",
        (vectors / "roots/intel/intel_pck_platform_ca_crl.der").read_bytes(),
        (vectors / "roots/intel/intel_pck_platform_ca_chain.pem").read_bytes(),
    )
    server.root_ca_crl((vectors / "roots/intel/intel_sgx_root_ca_crl.der").read_bytes())


# --- real collateral through the fetcher and the cache ---------------------------------------------


def test_real_tdx_quote_verifies_with_fetched_collateral(
    vectors, production, server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    real_intel(server, vectors)
    service = CollateralService(
        CollateralCache(tmp_path, production), fast(server), clock=lambda: SPR_TIME
    )
    quote = (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes()
    claims = verify_evidence(
        Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=service
    )
    assert claims.collateral_complete and claims.tcb_evaluation_data_number == 15
    assert "/tdx/certification/v4/tcb?fmspc=50806F000000" in server.requests
    assert "/sgx/certification/v4/pckcrl?ca=platform&encoding=der" in server.requests
    assert "/sgx/certification/v4/rootcacrl" in server.requests
    # A second verification is served from the cache: no new request.
    count = len(server.requests)
    verify_evidence(
        Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=service
    )
    assert len(server.requests) == count
    kinds = sorted(e.kind for e in service.cache.entries())
    assert kinds == ["crl", "crl", "tdx-qe-identity", "tdx-tcb-info"]


def test_cache_survives_restart_and_outage(vectors, production, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    real_intel(server, vectors)
    CollateralService(CollateralCache(tmp_path, production), fast(server)).fetch_all(
        fmspcs=(bytes.fromhex("50806f000000"),)
    )
    server.status = 503  # upstream down: the reopened cache still serves
    service = CollateralService(CollateralCache(tmp_path, production), fast(server))
    quote = (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes()
    verify_evidence(
        Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=service
    )


def test_outage_with_empty_cache_fails_closed_after_bounded_retries(
    vectors, production, server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    server.status = 503
    service = CollateralService(CollateralCache(tmp_path, production), fast(server, retries=2))
    quote = (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes()
    with pytest.raises(CollateralUnavailable) as err:
        verify_evidence(
            Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=service
        )
    assert err.value.reason == Reason.COLLATERAL_MISSING
    tcb_requests = [r for r in server.requests if r.startswith("/tdx/certification/v4/tcb")]
    assert len(tcb_requests) == 3  # one try and two retries, then no hammering
    with pytest.raises(CollateralUnavailable):
        verify_evidence(
            Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=service
        )
    assert len([r for r in server.requests if r.startswith("/tdx/certification/v4/tcb")]) == 3


def test_a_pcs_404_is_backed_off_like_an_outage(vectors, production, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A PCS/PCCS without the TCB info of a quote's FMSPC (a PCCS not caching it answers 404)
    made the fetch return nothing, unremembered: every release with such a quote (a genuine one,
    or any genuine quote replayed: its FMSPC is the PCK certificate's, not the caller's pick)
    sent PCS another request on its thread, at the callers' pace. A 404 is now remembered for
    ``retry_after_seconds`` as an outage is; the release is refused COLLATERAL_MISSING either
    way, and once the document is there it is fetched after the back-off."""
    quote = (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes()

    def tcb_requests() -> int:
        return len([r for r in server.requests if r.startswith("/tdx/certification/v4/tcb")])

    def refused(service: CollateralService) -> str:
        with pytest.raises(CollateralUnavailable) as err:
            verify_evidence(
                Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=service
            )
        return err.value.reason

    service = CollateralService(
        CollateralCache(tmp_path / "a", production), fast(server), clock=lambda: SPR_TIME
    )
    assert refused(service) == Reason.COLLATERAL_MISSING
    assert tcb_requests() == 1
    qe = server.requests.count("/tdx/certification/v4/qe/identity")
    for _ in range(5):
        assert refused(service) == Reason.COLLATERAL_MISSING
    assert tcb_requests() == 1  # before: 6, one per verification
    assert server.requests.count("/tdx/certification/v4/qe/identity") == qe
    # Once the back-off has passed (none here), a document now served is fetched and used.
    again = CollateralService(
        CollateralCache(tmp_path / "b", production),
        fast(server),
        clock=lambda: SPR_TIME,
        retry_after_seconds=0.0,
    )
    assert refused(again) == Reason.COLLATERAL_MISSING
    real_intel(server, vectors)
    verify_evidence(Evidence(TeeType.TDX, quote), trust=production, now=SPR_TIME, collateral=again)


@contextlib.contextmanager
def _garbage_upstream(answer: bytes) -> Iterator[tuple[str, list[int]]]:
    """A loopback 'service' that answers every request with ``answer`` (not HTTP); yields its
    URL and a list that counts the connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                seen.append(1)
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen
    finally:
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"GARBAGE\r\n\r\n",  # http.client.BadStatusLine
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",  # LineTooLong
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",  # IncompleteRead
    ],
)
def test_an_upstream_that_does_not_speak_http_is_a_failed_fetch(
    vectors, production, authority, sim_trust, now, tmp_path, answer: bytes
) -> None:  # type: ignore[no-untyped-def]
    """What a PCS/PCCS/KDS (or whatever answers at its address) sends is untrusted input: an answer
    that is not HTTP raised http.client's own exceptions (neither OSError nor URLError) out of the
    getter, through the verifier's safety net, so a release failed INTERNAL with a traceback and the
    failure was not remembered, every release fetching again. It is a failed fetch, retried and
    then backed off like an outage, and the verdict is COLLATERAL_MISSING / FETCH_FAILED."""
    with _garbage_upstream(answer) as (url, seen):
        settings = FetchSettings(
            pcs_url=url, kds_url=url, retries=1, backoff_seconds=0.01, timeout_seconds=2.0
        )
        service = CollateralService(CollateralCache(tmp_path / "tdx", production), settings)
        quote = Evidence(TeeType.TDX, (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes())
        for _ in range(2):
            with pytest.raises(CollateralUnavailable) as err:
                verify_evidence(quote, trust=production, now=SPR_TIME, collateral=service)
            assert err.value.reason == Reason.COLLATERAL_MISSING
            # TCB info and QE identity: a try and a retry each, then backed off.
            assert len(seen) == 4
        snp = CollateralService(CollateralCache(tmp_path / "snp", sim_trust), settings)
        report = Evidence(TeeType.SEV_SNP, authority.snp().report(RD, measurement=MEAS))
        with pytest.raises(CollateralUnavailable) as vcek:
            verify_evidence(report, trust=sim_trust, now=now, collateral=snp)
        assert vcek.value.reason == Reason.COLLATERAL_FETCH_FAILED
        # What was missing, not where the broker fetches it from (its internal endpoint).
        assert "fetching the Milan VCEK from AMD KDS failed" in vcek.value.message
        assert url.removeprefix("http://") not in vcek.value.message


def _unparseable_name(der: bytes, value: bytes) -> bytes:
    """``der`` with the first byte of the name attribute ``value`` (the DER string's content)
    made 0xFF: the certificate or CRL still loads, its name no longer parses."""
    assert der.count(value) >= 1
    return der.replace(value, b"\xff" + value[1:], 1)


def test_an_upstream_document_whose_names_do_not_parse_is_a_failed_fetch(
    vectors, production, server, tmp_path, authority, sim_trust, now
) -> None:  # type: ignore[no-untyped-def]
    """``cryptography`` parses a certificate's or CRL's names only when first read. A PCK CRL from
    PCS/PCCS whose issuer name does not parse (its CN a UTF8String that is not UTF-8) raised
    ValueError out of the cache's checks, past the fetcher (which handles typed refusals only),
    into the verifier's safety net: the release was refused INVALID_ARGUMENT UNPARSEABLE_INPUT,
    the caller's fault for its broker's upstream, and the failure was not remembered, so every
    release fetched it again. The document is now malformed where it is parsed: not cached,
    COLLATERAL_MISSING (the broker's), backed off. A quote's PCK chain with such a name is
    BAD_CERTIFICATE, no longer a parser safety-net catch."""
    real_intel(server, vectors)
    chain = (vectors / "roots/intel/intel_pck_platform_ca_chain.pem").read_bytes()
    crl = (vectors / "roots/intel/intel_pck_platform_ca_crl.der").read_bytes()
    bad = _unparseable_name(crl, b"Intel SGX PCK Platform CA")
    server.pck_crl("platform", bad, chain)
    service = CollateralService(
        CollateralCache(tmp_path, production), fast(server), clock=lambda: SPR_TIME
    )
    quote = Evidence(TeeType.TDX, (vectors / "tdx/v4_spr_gotdxguest.dat").read_bytes())
    path = "/sgx/certification/v4/pckcrl?ca=platform&encoding=der"
    for _ in range(2):
        with pytest.raises(CollateralUnavailable) as err:
            verify_evidence(quote, trust=production, now=SPR_TIME, collateral=service)
        assert err.value.reason == Reason.COLLATERAL_MISSING
        assert not caused_by_caller(err.value)
        assert server.requests.count(path) == 1  # fetched once, then backed off
    with pytest.raises(MalformedEvidence) as stored:
        service.cache.put_crl(bad, issuer_chain=chain)
    assert stored.value.reason == Reason.BAD_COLLATERAL

    tdx = authority.tdx()
    ca = authority.pck_ca.public_bytes(serialization.Encoding.DER)
    root_cn = authority.intel_root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    weird = _unparseable_name(ca, str(root_cn[0].value).encode())  # the CA's issuer name
    pem = tdx.pck.public_bytes(serialization.Encoding.PEM) + x509.load_der_x509_certificate(
        weird
    ).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(MalformedEvidence) as pck:
        verify_evidence(
            Evidence(TeeType.TDX, tdx.quote(RD, mrtd=MEAS, pck_chain_pem=pem)), trust=sim_trust,
            now=now, collateral=authority.collateral_source(tdx=[tdx], now=now),
        )  # fmt: skip
    assert pck.value.reason == Reason.BAD_CERTIFICATE


def test_slow_upstream_times_out(vectors, production, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    real_intel(server, vectors)
    server.delay = 1.0
    service = CollateralService(
        CollateralCache(tmp_path, production), fast(server, timeout_seconds=0.2, retries=0)
    )
    assert service.tdx_qe_identity() is None  # timed out: nothing cached, the verifier refuses


def test_wrong_issuer_chain_is_refused(vectors, production, server, tmp_path, authority) -> None:  # type: ignore[no-untyped-def]
    real_intel(server, vectors)
    server.qe_identity(
        (vectors / "tdx/qe_identity_gotdxguest.json").read_bytes(),
        authority.tcb_signing_chain_pem(),
    )
    cache = CollateralCache(tmp_path, production)
    with pytest.raises(VerificationFailed) as err:
        CollateralService(cache, fast(server)).fetch_qe_identity()
    assert err.value.reason == Reason.ROOT_NOT_TRUSTED
    assert cache.tdx_qe_identity() is None


def test_missing_issuer_chain_header_is_refused(vectors, production, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.attestation.collateral_server import Doc

    server.docs["/tdx/certification/v4/qe/identity"] = Doc(
        (vectors / "tdx/qe_identity_gotdxguest.json").read_bytes()
    )
    with pytest.raises(CollateralUnavailable) as err:
        CollateralService(CollateralCache(tmp_path, production), fast(server)).fetch_qe_identity()
    assert err.value.reason == Reason.COLLATERAL_FETCH_FAILED
    assert "TD_QE identity" in err.value.message and server.url not in err.value.message


def test_kds_layout_vcek_and_crl(authority, sim_trust, server, tmp_path, now) -> None:  # type: ignore[no-untyped-def]
    snp = authority.snp()
    report = snp.report(RD, measurement=MEAS)
    tcb = snp.tcb.components()
    server.vcek("Milan", snp.chip_id, tcb, snp.certificate_der)
    server.amd_crl("Milan", authority.crl("ark", now=now))
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    claims = verify_evidence(
        Evidence(TeeType.SEV_SNP, report), trust=sim_trust, now=now, collateral=service
    )
    assert claims.collateral_complete
    assert (
        f"/vcek/v1/Milan/{snp.chip_id.hex()}?blSPL=04&teeSPL=00&snpSPL=24&ucodeSPL=219"
        in server.requests
    )
    assert "/vcek/v1/Milan/crl" in server.requests


def test_a_vlek_or_unsigned_report_fetches_no_vcek(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now
) -> None:
    """KDS publishes VCEKs only. A VLEK-signed report whose evidence lacks the VLEK (the host can
    strip it from the certificate table) made the broker fetch this chip's VCEK on every release
    (one that does not verify is not remembered) and then call the report forged
    (REPORT_SIGNATURE_INVALID); an unsigned report (SIGNING_KEY none) likewise. Now neither asks
    KDS, and each is named; a reserved SIGNING_KEY value is malformed."""
    vlek = authority.snp(signing_key="VLEK")
    vcek = authority.snp(chip_id=vlek.chip_id)  # the same chip's VCEK, as KDS would serve it
    server.vcek("Milan", vlek.chip_id, vlek.tcb.components(), vcek.certificate_der)
    for scope in ("vcek", "vlek"):
        server.amd_crl("Milan", authority.crl("ark", now=now), scope=scope)
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))

    def verify(report: bytes, *certs: bytes) -> Any:
        ev = Evidence(TeeType.SEV_SNP, report, certs)
        return verify_evidence(ev, trust=sim_trust, now=now, collateral=service)

    with pytest.raises(MalformedEvidence) as bare:
        verify(vlek.report(RD, measurement=MEAS))
    assert bare.value.reason == Reason.VLEK_CERTIFICATE_MISSING
    unsigned = bytearray(vcek.report(RD, measurement=MEAS, signing_key_field=7))
    unsigned[0x2A0:0x330] = bytes(0x90)  # MASK_CHIP_KEY: the firmware signs nothing
    for certs in ((), (vcek.certificate_der,)):
        with pytest.raises(VerificationFailed) as none:
            verify(bytes(unsigned), *certs)
        assert none.value.reason == Reason.REPORT_UNSIGNED
    assert not [r for r in server.requests if r.startswith("/vcek/v1/Milan/") and "crl" not in r]
    with pytest.raises(MalformedEvidence) as reserved:
        verify(vcek.report(RD, measurement=MEAS, signing_key_field=3), vcek.certificate_der)
    assert reserved.value.reason == Reason.BAD_FIELD
    # With its VLEK the report verifies, and a VCEK-signed one without a certificate is fetched.
    assert verify(vlek.report(RD, measurement=MEAS), vlek.certificate_der).collateral_complete
    assert verify(vcek.report(RD, measurement=MEAS)).collateral_complete


def test_a_vcek_report_with_a_masked_chip_id_fetches_no_vcek(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now
) -> None:
    """A platform that masks its chip id (MASK_CHIP_ID: CHIP_ID zeros, as the AWS VLEK report in
    tests/data has it) and signs with its VCEK: without the VCEK in the evidence the broker asked
    KDS for chip 00..00, which has none, and refused UNAVAILABLE COLLATERAL_MISSING, the broker's
    own failure (recorded outside the caller's budget, whoever sent it); with it, HWID_MISMATCH.
    Both are now CHIP_ID_MASKED, with no KDS request."""
    snp = authority.snp()
    server.amd_crl("Milan", authority.crl("ark", now=now))
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    masked = snp.report(RD, measurement=MEAS, chip_id=bytes(64))
    for certs in ((), (snp.certificate_der,)):
        with pytest.raises(VerificationFailed) as err:
            verify_evidence(
                Evidence(TeeType.SEV_SNP, masked, certs), trust=sim_trust, now=now,
                collateral=service,
            )  # fmt: skip
        assert err.value.reason == Reason.CHIP_ID_MASKED, str(err.value)
    assert not [r for r in server.requests if r.startswith("/vcek/v1/Milan/") and "crl" not in r]


def _vcek_files(directory: Path) -> list[str]:
    return sorted(p.stem for p in (directory / "amd" / "vcek").glob("*.der"))


def test_a_fetched_vcek_is_cached_only_once_a_report_verifies_with_it(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now
) -> None:
    """An unsigned or forged report names the chip and TCB fetched; what KDS answered was written
    to the shared cache (and the generation bumped, so every replica re-read it) before the
    report's signature was checked. Now only the genuine report's verification stores it."""
    snp = authority.snp()
    server.vcek("Milan", snp.chip_id, snp.tcb.components(), snp.certificate_der)
    server.amd_crl("Milan", authority.crl("ark", now=now))
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    forger = ec.generate_private_key(ec.SECP384R1())
    forged = snp.report(RD, measurement=MEAS, sign_with=forger)
    with pytest.raises(VerificationFailed) as err:
        verify_evidence(
            Evidence(TeeType.SEV_SNP, forged), trust=sim_trust, now=now, collateral=service
        )
    assert err.value.reason == Reason.REPORT_SIGNATURE_INVALID
    assert _vcek_files(tmp_path) == [] and not (tmp_path / "generation").exists()
    # A report signed by this chip's key but naming another chip, for which the source (wrongly:
    # KDS answers for the chip asked) answers with this chip's VCEK: the signature holds, the
    # hwID not. Not the VCEK asked for, so the source's failure (VCEK_FETCHED_MISMATCH).
    other_chip = bytes(range(64))
    server.vcek("Milan", other_chip, snp.tcb.components(), snp.certificate_der)
    misnamed = snp.report(RD, measurement=MEAS, chip_id=other_chip)
    with pytest.raises(CollateralUnavailable) as mismatch:
        verify_evidence(
            Evidence(TeeType.SEV_SNP, misnamed), trust=sim_trust, now=now, collateral=service
        )
    assert mismatch.value.reason == Reason.VCEK_FETCHED_MISMATCH
    assert _vcek_files(tmp_path) == []
    with pytest.raises(VerificationFailed) as supplied:  # carried in the evidence: the caller's
        verify_evidence(
            Evidence(TeeType.SEV_SNP, misnamed, (snp.certificate_der,)),
            trust=sim_trust,
            now=now,
            collateral=service,
        )
    assert supplied.value.reason == Reason.HWID_MISMATCH
    # The genuine report stores it, and its next verification fetches nothing.
    genuine = Evidence(TeeType.SEV_SNP, snp.report(RD, measurement=MEAS))
    assert verify_evidence(
        genuine, trust=sim_trust, now=now, collateral=service
    ).collateral_complete
    assert len(_vcek_files(tmp_path)) == 1
    count = len(server.requests)
    verify_evidence(genuine, trust=sim_trust, now=now, collateral=service)
    assert len(server.requests) == count
    replica = CollateralCache(tmp_path, sim_trust, writable=False)
    assert replica.snp_key_certificate(parse_snp_report(genuine.report)) == snp.certificate_der


def _disk_full(path: Path, data: bytes, **kw: Any) -> None:
    """``atomic_write`` of a full cache volume."""
    raise OSError(28, "No space left on device")


def test_a_cache_that_cannot_be_written_is_no_internal_error(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now, monkeypatch
) -> None:
    """A full or read-only cache volume made every fetch that stored something raise the OSError
    out of the collateral service and the verifier's safety net: a genuine report's release failed
    INTERNAL although the VCEK it needed had been fetched, and with a missing CRL nothing was
    backed off, each release fetching again. The fetched document still serves the verification
    that fetched it (the cache and the verifier check it either way); what could not be stored is
    logged and backed off like a failed fetch. A VCEK the report verified with is held in memory
    meanwhile: it was fetched again for every release (each spending its caller's fetch budget)."""
    snp = authority.snp()
    server.vcek("Milan", snp.chip_id, snp.tcb.components(), snp.certificate_der)
    server.amd_crl("Milan", authority.crl("ark", now=now))
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))

    monkeypatch.setattr(collateral_cache, "atomic_write", _disk_full)
    genuine = Evidence(TeeType.SEV_SNP, snp.report(RD, measurement=MEAS))
    with pytest.raises(CollateralUnavailable) as err:  # the VCEK served; the CRL could not be kept
        verify_evidence(genuine, trust=sim_trust, now=now, collateral=service)
    assert err.value.reason == Reason.COLLATERAL_MISSING
    count = len(server.requests)
    with pytest.raises(CollateralUnavailable):
        verify_evidence(genuine, trust=sim_trust, now=now, collateral=service)
    assert len(server.requests) == count  # the VCEK held in memory, the CRL backed off
    monkeypatch.undo()
    with_crl = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    assert verify_evidence(
        genuine, trust=sim_trust, now=now, collateral=with_crl
    ).collateral_complete


def test_vceks_held_in_memory_are_bounded(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now, monkeypatch
) -> None:
    """The VCEKs a full cache volume could not take are held in memory up to a bound, oldest
    dropped first (fetched again when next needed)."""
    monkeypatch.setattr(collateral_fetch, "MAX_UNSTORED_VCEKS", 1)
    platforms = [authority.snp(chip_id=bytes([n]) * 64) for n in (1, 2)]
    for snp in platforms:
        server.vcek("Milan", snp.chip_id, snp.tcb.components(), snp.certificate_der)
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))

    monkeypatch.setattr(collateral_cache, "atomic_write", _disk_full)

    def fetches(snp: Any) -> int:
        before = len(server.requests)
        report = parse_snp_report(snp.report(RD, measurement=MEAS))
        assert service.snp_key_certificate(report) == snp.certificate_der
        return len([r for r in server.requests[before:] if r.startswith("/vcek/")])

    first, second = platforms
    assert [fetches(first), fetches(first)] == [1, 0]
    assert [fetches(second), fetches(second)] == [1, 0]
    assert fetches(first) == 1  # dropped for the second


def test_a_kds_404_is_remembered_per_chip_and_tcb(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now, monkeypatch
) -> None:
    """A 404 (KDS has no such VCEK) was asked again for every report naming the chip; now it is
    backed off like an error, keyed by product, chip id and TCB, in a bounded memory. Fresh or
    remembered, it refuses the report as the evidence's fault (VCEK_NOT_FOUND): as
    COLLATERAL_MISSING, the broker's own failure, each refusal was recorded outside the caller's
    budget, so reports naming a made-up chip filled the audit log."""
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    snp = authority.snp()

    def fetches_for(report: bytes) -> int:
        before = len(server.requests)
        with pytest.raises(VerificationFailed) as err:
            verify_evidence(
                Evidence(TeeType.SEV_SNP, report), trust=sim_trust, now=now, collateral=service
            )
        assert (err.value.reason, err.value.status_name) == ("VCEK_NOT_FOUND", "PERMISSION_DENIED")
        assert caused_by_caller(err.value)
        return len(server.requests) - before

    report = snp.report(RD, measurement=MEAS)
    assert fetches_for(report) == 1
    assert fetches_for(report) == 0
    other_tcb = TcbVersion.from_components(bootloader=4, tee=0, snp=25, microcode=219)
    assert fetches_for(snp.report(RD, measurement=MEAS, reported_tcb=other_tcb)) == 1
    monkeypatch.setattr(collateral_fetch, "MAX_FAILURES", 2)
    for chip in (b"\x01" * 64, b"\x02" * 64):  # two more: the first 404 is forgotten
        assert fetches_for(snp.report(RD, measurement=MEAS, chip_id=chip)) == 1
    assert fetches_for(report) == 1


@pytest.mark.parametrize(
    "answer", [b"<html>proxy sign-in</html>", b"\x30\x82\x05\x00\x30"], ids=["page", "cut-der"]
)
def test_a_kds_answer_that_is_no_certificate_is_a_failed_fetch(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now, answer: bytes
) -> None:
    """KDS (or whatever answers at its address) sending something that is no certificate at all
    for a genuine report's VCEK was handed to the verifier, which refused the report
    BAD_CERTIFICATE: INVALID_ARGUMENT, the caller's fault (never retried by the inference loader),
    and the fetch was not remembered, every release asking again. It is a failed fetch now:
    UNAVAILABLE COLLATERAL_FETCH_FAILED, then backed off like an outage (COLLATERAL_MISSING)."""
    snp = authority.snp()
    server.vcek("Milan", snp.chip_id, snp.tcb.components(), answer)
    server.amd_crl("Milan", authority.crl("ark", now=now))
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    genuine = Evidence(TeeType.SEV_SNP, snp.report(RD, measurement=MEAS))
    path = f"/vcek/v1/Milan/{snp.chip_id.hex()}?"
    for reason in (Reason.COLLATERAL_FETCH_FAILED, Reason.COLLATERAL_MISSING):
        with pytest.raises(CollateralUnavailable) as err:
            verify_evidence(genuine, trust=sim_trust, now=now, collateral=service)
        assert err.value.reason == reason
        assert err.value.status_name == "UNAVAILABLE" and not caused_by_caller(err.value)
        assert len([r for r in server.requests if r.startswith(path)]) == 1
    assert _vcek_files(tmp_path) == []
    server.vcek("Milan", snp.chip_id, snp.tcb.components(), snp.certificate_der)
    fixed = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    assert verify_evidence(genuine, trust=sim_trust, now=now, collateral=fixed).collateral_complete


@pytest.mark.parametrize("chain", ["same-names-other-keys", "unknown-issuer"])
def test_a_fetched_vcek_of_another_chain_is_the_brokers_fault(  # type: ignore[no-untyped-def]
    authority, other_authority, sim_trust, server, tmp_path, now, caplog, chain: str
) -> None:
    """A VCEK that KDS (or whatever answers at the broker's kds_url) sends and that parses but
    does not chain to a pinned AMD root was handed to the verifier, which refused the report
    as the caller's (ROOT_NOT_TRUSTED or CERT_CHAIN_INVALID, PERMISSION_DENIED: its refusal
    budget spent) for the broker's own misconfigured source. It is the broker's now: UNAVAILABLE
    VCEK_FETCHED_UNTRUSTED naming the URL, nothing cached, backed off like an outage. The same
    VCEK supplied with the evidence stays the caller's fault."""
    snp = authority.snp()
    issuer = (
        other_authority
        if chain == "same-names-other-keys"
        else SimulatedAuthority.generate(product="Genoa", now=now)
    )
    foreign = issuer.snp(chip_id=snp.chip_id, tcb=snp.tcb)
    server.vcek("Milan", snp.chip_id, snp.tcb.components(), foreign.certificate_der)
    server.amd_crl("Milan", authority.crl("ark", now=now))
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    report = snp.report(RD, measurement=MEAS)
    url = f"{server.url}/vcek/v1/Milan/{snp.chip_id.hex()}?"
    message, theirs = _the_brokers_fetch_refused(
        server, service, report, sim_trust, now, tmp_path, url, "VCEK_FETCHED_UNTRUSTED",
        foreign.certificate_der, caplog,
    )  # fmt: skip
    wrong = "CERT_CHAIN_INVALID" if chain == "same-names-other-keys" else "ROOT_NOT_TRUSTED"
    assert "kds_url" in message and wrong in message
    assert theirs == wrong


def _the_brokers_fetch_refused(  # type: ignore[no-untyped-def]
    server, service, report, trust, now, tmp_path, url: str, reason: str, served: bytes, caplog
) -> tuple[str, str]:
    """A genuine ``report`` whose VCEK, fetched from ``url``, is ``served``: refused UNAVAILABLE
    ``reason``, the broker's fault, nothing cached, backed off like an outage (not asked again at
    once); the URL is in the broker's log line, never in the message (which reaches the caller
    and the audit); the same certificate supplied with the evidence is the caller's fault.
    Returns the refusal's message and the supplied one's reason."""
    fetched = Evidence(TeeType.SEV_SNP, report)
    with (
        caplog.at_level(logging.WARNING, logger="strongroom.attestation.collateral_fetch"),
        pytest.raises(CollateralUnavailable) as err,
    ):
        verify_evidence(fetched, trust=trust, now=now, collateral=service)
    assert (err.value.reason, err.value.status_name) == (reason, "UNAVAILABLE")
    assert not caused_by_caller(err.value)
    assert server.url.removeprefix("http://") not in err.value.message
    assert "the broker's kds_url" in err.value.message
    assert any(getattr(r, "url", "").startswith(url) for r in caplog.records)
    assert _vcek_files(tmp_path) == []
    with pytest.raises(CollateralUnavailable) as again:
        verify_evidence(fetched, trust=trust, now=now, collateral=service)
    assert again.value.reason == Reason.COLLATERAL_MISSING
    assert len([r for r in server.requests if r.startswith(url.removeprefix(server.url))]) == 1
    supplied = Evidence(TeeType.SEV_SNP, report, (served,))
    with pytest.raises(VerificationFailed) as theirs:
        verify_evidence(supplied, trust=trust, now=now, collateral=service)
    assert caused_by_caller(theirs.value)
    return err.value.message, theirs.value.reason


@pytest.mark.parametrize("answer", ["other-chip", "other-tcb", "other-product", "vlek"])
def test_a_fetched_vcek_that_is_not_the_one_asked_for_is_the_brokers_fault(  # type: ignore[no-untyped-def]
    authority, genoa, sim_trust, server, tmp_path, now, caplog, answer: str
) -> None:
    """KDS answers a request for a chip id and TCB with that VCEK or a 404, whatever the report.
    A genuine AMD certificate of another chip, TCB or product (a proxy or mirror that ignores
    the query, keyed wrongly) was judged with the report: a genuine report was then named forged,
    REPORT_SIGNATURE_INVALID, the caller's fault for the broker's source. It is the broker's now:
    UNAVAILABLE VCEK_FETCHED_MISMATCH naming the URL, nothing cached, backed off; the same
    certificate supplied with the evidence stays the caller's."""
    trust = genoa.trust_store(sim_trust)
    if answer == "other-product":
        snp = genoa.snp()
        report = snp.report(RD, measurement=MEAS, cpuid=(0x19, 0x11, 0x01))
        product = "Genoa"
    else:
        snp = authority.snp()
        report = snp.report(RD, measurement=MEAS)
        product = "Milan"
    other_tcb = TcbVersion.from_components(bootloader=9, tee=0, snp=24, microcode=219)
    served = {
        "other-chip": lambda: authority.snp(tcb=snp.tcb),
        "other-tcb": lambda: authority.snp(chip_id=snp.chip_id, tcb=other_tcb),
        "other-product": lambda: authority.snp(chip_id=snp.chip_id, tcb=snp.tcb),
        "vlek": lambda: authority.snp(signing_key="VLEK", tcb=snp.tcb),
    }[answer]()
    server.vcek(product, snp.chip_id, snp.tcb.components(), served.certificate_der)
    service = CollateralService(CollateralCache(tmp_path, trust), fast(server))
    url = f"{server.url}/vcek/v1/{product}/{snp.chip_id.hex()}?"
    message, _ = _the_brokers_fetch_refused(
        server, service, report, trust, now, tmp_path, url, "VCEK_FETCHED_MISMATCH",
        served.certificate_der, caplog,
    )  # fmt: skip
    assert "not the one asked for" in message


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # the Azure VCEK's own serial
def test_a_fetched_vcek_outside_its_validity_is_the_brokers_fault(  # type: ignore[no-untyped-def]
    production, vectors, server, tmp_path, caplog
) -> None:
    """A real VCEK that KDS (or a proxy answering for it, serving an old one) sends outside its
    validity period was handed to the verifier, which refused the genuine report as the caller's
    CERT_NOT_VALID_AT_TIME (PERMISSION_DENIED: its refusal budget spent) for the broker's own
    fetch. It is the broker's now: UNAVAILABLE VCEK_FETCHED_NOT_VALID, nothing cached, backed
    off; the same certificate supplied with the evidence stays the caller's."""
    report = (vectors / "snp/milan_v3_azure_ms.bin").read_bytes()
    pem = (vectors / "snp/milan_v3_azure_ms_vcek.pem").read_bytes()
    served = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    parsed = parse_snp_report(report)
    server.vcek("Milan", parsed.chip_id_for_kds(), parsed.reported_tcb.components(), served)
    expired = dt.datetime(2034, 1, 1, tzinfo=UTC)  # the VCEK's notAfter is 2033-02-05
    cache = CollateralCache(tmp_path, production, clock=lambda: expired)
    service = CollateralService(cache, fast(server), clock=lambda: expired)
    url = f"{server.url}/vcek/v1/Milan/{parsed.chip_id_for_kds().hex()}?"
    message, theirs = _the_brokers_fetch_refused(
        server, service, report, production, expired, tmp_path, url, "VCEK_FETCHED_NOT_VALID",
        served, caplog,
    )  # fmt: skip
    assert "outside its validity period" in message and "2033-02-05" in message
    assert theirs == Reason.CERT_NOT_VALID_AT_TIME


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # the Azure VCEK's own serial
def test_a_cached_vcek_past_its_validity_is_fetched_again_not_the_callers_fault(  # type: ignore[no-untyped-def]
    production, vectors, server, tmp_path
) -> None:
    """A VCEK the broker cached while it was valid was handed to the verifier once it had aged
    out: the genuine report was refused as the caller's CERT_NOT_VALID_AT_TIME (PERMISSION_DENIED,
    its refusal budget spent) for the broker's own copy, and KDS was never asked again. The cache
    no longer holds it then: KDS is asked (here it serves the same old certificate:
    VCEK_FETCHED_NOT_VALID, the broker's), and a broker that does not fetch refuses
    COLLATERAL_MISSING, its own."""
    report = (vectors / "snp/milan_v3_azure_ms.bin").read_bytes()
    pem = (vectors / "snp/milan_v3_azure_ms_vcek.pem").read_bytes()
    served = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    parsed = parse_snp_report(report)
    server.vcek("Milan", parsed.chip_id_for_kds(), parsed.reported_tcb.components(), served)
    valid = dt.datetime(2026, 6, 1, tzinfo=UTC)
    CollateralCache(tmp_path, production, clock=lambda: valid).put_vcek(served, parsed)
    assert len(_vcek_files(tmp_path)) == 1
    expired = dt.datetime(2034, 1, 1, tzinfo=UTC)  # the VCEK's notAfter is 2033-02-05
    evidence = Evidence(TeeType.SEV_SNP, report)
    for fetching, reason in ((True, "VCEK_FETCHED_NOT_VALID"), (False, "COLLATERAL_MISSING")):
        cache = CollateralCache(tmp_path, production, clock=lambda: expired)
        service = CollateralService(cache, fast(server) if fetching else None)
        with pytest.raises(CollateralUnavailable) as err:
            verify_evidence(evidence, trust=production, now=expired, collateral=service)
        assert err.value.reason == reason and not caused_by_caller(err.value)
    assert len([r for r in server.requests if r.startswith("/vcek/v1/Milan/")]) == 1
    held = CollateralCache(tmp_path, production, clock=lambda: valid)
    assert held.snp_key_certificate(parsed) == served  # still held, and served while valid


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # the Azure VCEK's own serial
def test_a_forged_report_whose_fetched_vcek_is_outside_its_validity_stays_the_callers(  # type: ignore[no-untyped-def]
    production, vectors, server, tmp_path
) -> None:
    """What is fetched depends only on the chip id and TCB the unverified report names: a forged
    report (here the real Milan report claiming another measurement) naming a chip whose VCEK is
    served outside its validity was refused as the broker's VCEK_FETCHED_NOT_VALID (UNAVAILABLE:
    outside the caller's refusal budget) and backed off the genuine platform's fetch. It is the
    forgery's refusal now (REPORT_SIGNATURE_INVALID, the caller's), nothing backed off: the
    genuine report's own fetch still goes out and is the broker's."""
    genuine = (vectors / "snp/milan_v3_azure_ms.bin").read_bytes()
    forged = genuine[:0x90] + bytes([genuine[0x90] ^ 1]) + genuine[0x91:]  # MEASUREMENT
    pem = (vectors / "snp/milan_v3_azure_ms_vcek.pem").read_bytes()
    served = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    parsed = parse_snp_report(genuine)
    server.vcek("Milan", parsed.chip_id_for_kds(), parsed.reported_tcb.components(), served)
    expired = dt.datetime(2034, 1, 1, tzinfo=UTC)  # the VCEK's notAfter is 2033-02-05
    cache = CollateralCache(tmp_path, production, clock=lambda: expired)
    service = CollateralService(cache, fast(server), clock=lambda: expired)
    with pytest.raises(VerificationFailed) as err:
        verify_evidence(
            Evidence(TeeType.SEV_SNP, forged), trust=production, now=expired, collateral=service
        )
    assert err.value.reason == Reason.REPORT_SIGNATURE_INVALID and caused_by_caller(err.value)
    assert _vcek_files(tmp_path) == []
    with pytest.raises(CollateralUnavailable) as brokers:
        verify_evidence(
            Evidence(TeeType.SEV_SNP, genuine), trust=production, now=expired, collateral=service
        )
    assert brokers.value.reason == Reason.VCEK_FETCHED_NOT_VALID
    assert len([r for r in server.requests if r.startswith("/vcek/v1/Milan/")]) == 2


def test_a_failed_fetch_names_neither_the_source_nor_its_error_text_to_the_caller(  # type: ignore[no-untyped-def]
    vectors, production, tmp_path, monkeypatch, caplog
) -> None:
    """A fetch that fails below HTTP (TLS, a proxy's refused tunnel, the network) put the error's
    own text in the refusal that reaches the caller as the gRPC status and the audit: here a
    kds_url whose TLS certificate is for another name, and the message named the host the broker
    asked ("certificate is not valid for 'localhost'"), as a proxy's refusal carries its own
    words. It says the kind of failure now (the error's class and its cause's); the broker's log
    keeps the URL and the text."""
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "cert.pem").write_bytes(self_signed_pem(key, "kds-mirror.example"))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # trusted: only the name fails
    server = FakeCollateralServer(tls=tls)
    try:
        url = server.url.replace("127.0.0.1", "localhost")
        settings = FetchSettings(pcs_url=url, kds_url=url, retries=0, timeout_seconds=5.0)
        service = CollateralService(CollateralCache(tmp_path / "cache", production), settings)
        report = parse_snp_report((vectors / "snp/milan_v3_azure_ms.bin").read_bytes())
        with (
            caplog.at_level(logging.WARNING, logger="strongroom.attestation.collateral_fetch"),
            pytest.raises(CollateralUnavailable) as err,
        ):
            service.snp_key_certificate(report)
    finally:
        server.close()
    assert err.value.reason == Reason.COLLATERAL_FETCH_FAILED
    message = err.value.message
    assert "the Milan VCEK from AMD KDS" in message and "SSLCertVerificationError" in message
    assert "localhost" not in message and url.rsplit(":", 1)[1] not in message
    assert any(
        getattr(r, "url", "").startswith(url) and "localhost" in getattr(r, "error", "")
        for r in caplog.records
    )


@pytest.mark.parametrize("answer", ["no-vcek", "vcek-of-another-issuer"])
def test_a_fetched_certificates_own_names_stay_in_the_brokers_log(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now, caplog, answer: str
) -> None:
    """What answers at the broker's kds_url (an internal cache, an inspecting proxy) chose the
    names in the certificate it sent, and the refusal quoted them to the caller (gRPC status,
    audit): a certificate that is no VCEK by its common name ("certificate 'kds-cache...' is not
    an AMD VCEK"), a VCEK-shaped one by its issuer ("issued by 'CN=egress-inspection...'"). The
    message says the reason now; the broker's log keeps the names."""
    snp = authority.snp()
    name = "kds-cache.corp.example" if answer == "no-vcek" else "egress-inspection.corp.example"
    key = ec.generate_private_key(ec.SECP384R1())
    if answer == "no-vcek":
        served = x509.load_pem_x509_certificate(self_signed_pem(key, name))
    else:  # the genuine VCEK's subject, key and extensions, issued by another name
        vcek = x509.load_der_x509_certificate(snp.certificate_der)
        builder = (
            x509.CertificateBuilder()
            .subject_name(vcek.subject)
            .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
            .public_key(vcek.public_key())
            .serial_number(1)
            .not_valid_before(vcek.not_valid_before_utc)
            .not_valid_after(vcek.not_valid_after_utc)
        )
        for extension in vcek.extensions:
            builder = builder.add_extension(extension.value, extension.critical)
        served = builder.sign(key, hashes.SHA384())
    der = served.public_bytes(serialization.Encoding.DER)
    server.vcek("Milan", snp.chip_id, snp.tcb.components(), der)
    service = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    report = snp.report(RD, measurement=MEAS)
    with (
        caplog.at_level(logging.WARNING, logger="strongroom.attestation"),
        pytest.raises(CollateralUnavailable) as err,
    ):
        verify_evidence(Evidence(TeeType.SEV_SNP, report), trust=sim_trust, now=now,
                        collateral=service)  # fmt: skip
    expected = "COLLATERAL_FETCH_FAILED" if answer == "no-vcek" else "VCEK_FETCHED_UNTRUSTED"
    assert err.value.reason == expected and not caused_by_caller(err.value)
    assert name not in err.value.message
    assert ("BAD_CERTIFICATE" if answer == "no-vcek" else "ROOT_NOT_TRUSTED") in err.value.message
    assert any(name in str(getattr(r, "detail", "")) for r in caplog.records)


def test_cached_vceks_are_bounded_oldest_evicted(authority, sim_trust, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = CollateralCache(tmp_path, sim_trust, max_vceks=2)
    platforms = [authority.snp() for _ in range(3)]
    reports = [parse_snp_report(p.report(RD, measurement=MEAS)) for p in platforms]
    for platform, report in zip(platforms, reports, strict=True):
        cache.put_vcek(platform.certificate_der, report)
    assert len(_vcek_files(tmp_path)) == 2
    for reader in (cache, CollateralCache(tmp_path, sim_trust, max_vceks=2)):
        assert reader.snp_key_certificate(reports[0]) is None
        assert reader.snp_key_certificate(reports[2]) == platforms[2].certificate_der
    # Re-storing the oldest held makes it the newest: the other one goes.
    cache.put_vcek(platforms[1].certificate_der, reports[1])
    cache.put_vcek(platforms[0].certificate_der, reports[0])
    assert cache.snp_key_certificate(reports[2]) is None
    assert cache.snp_key_certificate(reports[1]) is not None
    # A reader with a smaller bound than the writer holds the newest only.
    assert (
        CollateralCache(tmp_path, sim_trust, writable=False, max_vceks=1).snp_key_certificate(
            reports[0]
        )
        == platforms[0].certificate_der
    )
    with pytest.raises(CollateralUnavailable) as err:  # another chip's VCEK: refused, not stored
        cache.put_vcek(platforms[2].certificate_der, reports[1])
    assert err.value.reason == Reason.VCEK_FETCHED_MISMATCH
    assert len(_vcek_files(tmp_path)) == 2


# --- fail closed, and the evidence's collateral never decides -----------------------------------------


def test_revoked_vcek_chain_with_crl_omitted_is_refused(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    snp = authority.snp()
    revoked_crl = authority.crl("ark", [authority.ask.serial_number], now=now)
    clean_crl = authority.crl("ark", [], now=now)
    # The attester omits the CRL and even sends a clean one: the broker's source has none.
    ev = Evidence(
        TeeType.SEV_SNP, snp.report(RD, measurement=MEAS), (snp.certificate_der,),
        (Collateral(CollateralKind.CRL, clean_crl),),
    )  # fmt: skip
    from strongroom.attestation import StaticCollateralSource

    with pytest.raises(CollateralUnavailable) as err:
        verify_evidence(ev, trust=sim_trust, now=now, collateral=StaticCollateralSource())
    assert err.value.reason == Reason.COLLATERAL_MISSING
    with pytest.raises(VerificationFailed) as err2:
        verify_evidence(
            ev, trust=sim_trust, now=now, collateral=StaticCollateralSource(crl_list=(revoked_crl,))
        )
    assert err2.value.reason == Reason.CERT_REVOKED


def test_forged_td_from_a_non_intel_qe_is_refused(authority, sim_trust, now, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The PCE PCK-signs any enclave's report: a host's own 'quoting enclave' (another MRSIGNER)
    signs any TD body. Refused with the QE identity; refused without it too (never optional)."""
    tdx = authority.tdx()
    forged = tdx.quote(RD, mrtd=bytes(48), qe_mrsigner=b"\xee" * 32)
    cache = CollateralCache(tmp_path, sim_trust)
    authority.fill_cache(cache, tdx=[tdx], now=now)
    with pytest.raises(VerificationFailed) as err:
        verify_evidence(Evidence(TeeType.TDX, forged), trust=sim_trust, now=now, collateral=cache)
    assert err.value.reason == Reason.QE_IDENTITY_MISMATCH
    (tmp_path / "tdx" / "qe_identity.json").unlink()
    (tmp_path / "generation").write_text("qe identity removed")
    fresh = CollateralCache(tmp_path, sim_trust, writable=False)
    with pytest.raises(CollateralUnavailable) as err2:
        verify_evidence(Evidence(TeeType.TDX, forged), trust=sim_trust, now=now, collateral=fresh)
    assert err2.value.reason == Reason.COLLATERAL_MISSING


def test_evidence_tcb_info_cannot_improve_the_verdict(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    tdx = authority.tdx()
    source = authority.collateral_source(now=now)
    source = type(source)(
        tcb_infos=(tdx.tcb_info(now=now, status="OutOfDate"),),
        qe_identity=tdx.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
        crl_list=source.crl_list,
    )
    quote = tdx.quote(RD, mrtd=MEAS)
    plain = verify_evidence(
        Evidence(TeeType.TDX, quote), trust=sim_trust, now=now, collateral=source
    )
    carried = Evidence(TeeType.TDX, quote, (), tdx.collateral(now=now, status="UpToDate"))
    assert (
        verify_evidence(carried, trust=sim_trust, now=now, collateral=source).tcb_status
        == plain.tcb_status
        == "OutOfDate"
    )


def test_stale_collateral_past_grace_is_refused(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    tdx = authority.tdx()
    source = authority.collateral_source(tdx=[tdx], now=now, days=1)
    quote = tdx.quote(RD, mrtd=MEAS)
    later = now + dt.timedelta(days=2)
    with pytest.raises(CollateralUnavailable) as err:
        verify_evidence(Evidence(TeeType.TDX, quote), trust=sim_trust, now=later, collateral=source)
    assert err.value.reason == Reason.COLLATERAL_STALE
    claims = verify_evidence(
        Evidence(TeeType.TDX, quote), trust=sim_trust, now=later, collateral=source,
        collateral_grace=dt.timedelta(days=2),
    )  # fmt: skip
    assert claims.collateral_complete


def _without_next_update(authority: SimulatedAuthority, issuer: str, now: dt.datetime) -> bytes:
    """``issuer``'s CRL with no nextUpdate (optional in RFC 5280; cryptography's builder cannot
    make one): the TBS re-encoded without the field and signed again with the issuer's key."""
    tbs, alg, _sig = _der.read_all(_der.read_one(authority.crl(issuer, now=now), _der.TAG_SEQUENCE))
    fields = _der.read_all(tbs.value)
    times = [i for i, f in enumerate(fields) if f.tag in (0x17, 0x18)]  # UTCTime, GeneralizedTime
    del fields[times[1]]  # thisUpdate stays, nextUpdate goes
    new_tbs = _der.encode(_der.TAG_SEQUENCE, b"".join(_der.encode(f.tag, f.value) for f in fields))
    key = getattr(authority, f"{issuer}_key")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    else:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
        signature = key.sign(new_tbs, pss, hashes.SHA384())
    crl = _der.encode(
        _der.TAG_SEQUENCE,
        new_tbs + _der.encode(alg.tag, alg.value) + _der.encode(0x03, b"\0" + signature),
    )
    assert x509.load_der_x509_crl(crl).next_update_utc is None
    return crl


def test_a_crl_without_next_update_is_stale(authority, sim_trust, now, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A CRL may omit nextUpdate; it was held current forever (the chain verified against a
    CRL of any age). Now stale in the verifier, and refused by the cache at the door."""
    snp = authority.snp()
    ark_crl = _without_next_update(authority, "ark", now)
    ev = snp.evidence(RD, measurement=MEAS)
    with pytest.raises(CollateralUnavailable) as err:
        verify_evidence(
            ev, trust=sim_trust, now=now, collateral=StaticCollateralSource(crl_list=(ark_crl,))
        )
    assert err.value.reason == Reason.COLLATERAL_STALE
    cache = CollateralCache(tmp_path, sim_trust)
    with pytest.raises(CollateralUnavailable) as refused:
        cache.put_crl(ark_crl, scope="vcek")
    assert refused.value.reason == Reason.COLLATERAL_STALE
    assert cache.crl(authority.ark, "vcek") is None
    # The same CRL with its nextUpdate verifies.
    fine = StaticCollateralSource(crl_list=(authority.crl("ark", now=now),))
    assert verify_evidence(ev, trust=sim_trust, now=now, collateral=fine).collateral_complete


def _ark_crl(
    authority: SimulatedAuthority, revoked: list[int], now: dt.datetime, *,
    scope: str | None = None, age: dt.timedelta = dt.timedelta(hours=1),
) -> bytes:  # fmt: skip
    """An ARK CRL issued ``age`` ago, with an issuing distribution point naming the KDS URL of
    ``scope`` when given (``authority.crl`` makes none)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.ark.subject)
        .last_update(now - age)
        .next_update(now + dt.timedelta(days=30))
    )
    if scope is not None:
        url = f"https://kdsintf.amd.com/{scope}/v1/{authority.product}/crl"
        builder = builder.add_extension(
            x509.IssuingDistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)], relative_name=None,
                only_contains_user_certs=False, only_contains_ca_certs=False,
                only_some_reasons=None, indirect_crl=False, only_contains_attribute_certs=False,
            ),
            critical=True,
        )  # fmt: skip
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - age)
            .build()
        )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    crl = builder.sign(authority.ark_key, hashes.SHA384(), rsa_padding=pss)
    return crl.public_bytes(serialization.Encoding.DER)


def test_static_crls_of_one_ark_are_told_apart_by_scope(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    """The ARK signs its VCEK and its VLEK CRL under one name; `attest verify --collateral` took
    the first CRL with that name for either, so a VLEK chain whose ASVK the VLEK CRL revokes was
    accepted when the VCEK CRL came first. Unclassifiable, the pair is refused; classified by
    their issuing distribution points, each chain meets its own CRL, in either order."""
    vlek_ev = authority.snp(signing_key="VLEK").evidence(RD, measurement=MEAS)
    vcek_ev = authority.snp().evidence(RD, measurement=MEAS)
    asvk_revoked = [authority.asvk.serial_number]
    plain = (_ark_crl(authority, [], now), _ark_crl(authority, asvk_revoked, now))
    with pytest.raises(CollateralUnavailable) as ambiguous:
        verify_evidence(
            vlek_ev, trust=sim_trust, now=now, collateral=StaticCollateralSource(crl_list=plain)
        )
    assert ambiguous.value.reason == Reason.COLLATERAL_AMBIGUOUS
    vcek_crl = _ark_crl(authority, [], now, scope="vcek")
    vlek_crl = _ark_crl(authority, asvk_revoked, now, scope="vlek")
    for crls in ((vcek_crl, vlek_crl), (vlek_crl, vcek_crl)):
        source = StaticCollateralSource(crl_list=crls)
        with pytest.raises(VerificationFailed) as revoked:
            verify_evidence(vlek_ev, trust=sim_trust, now=now, collateral=source)
        assert revoked.value.reason == Reason.CERT_REVOKED
        assert verify_evidence(
            vcek_ev, trust=sim_trust, now=now, collateral=source
        ).collateral_complete
    # One ARK CRL without a distribution point is still the ARK's CRL for either scope, and a
    # classified one of the other scope does not make an unclassified one ambiguous.
    lone = StaticCollateralSource(crl_list=(plain[1],))
    with pytest.raises(VerificationFailed):
        verify_evidence(vlek_ev, trust=sim_trust, now=now, collateral=lone)
    mixed = StaticCollateralSource(crl_list=(vcek_crl, plain[1]))
    with pytest.raises(VerificationFailed) as mixed_err:
        verify_evidence(vlek_ev, trust=sim_trust, now=now, collateral=mixed)
    assert mixed_err.value.reason == Reason.CERT_REVOKED


def test_an_ark_crl_is_never_taken_for_the_other_scope(authority, sim_trust, now, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The ARK signs its VCEK and its VLEK CRL under one name, and the broker's cache filed a CRL
    under whatever scope it was handed (the fetch URL, or an import's file name): the VCEK CRL
    imported as ``<ark>-vlek.der`` was served for VLEK chains, so an ASVK the VLEK CRL revokes
    was accepted, and its rollback mark then refused the genuine VLEK CRL. A CRL whose issuing
    distribution point names the other scope is refused, by the cache and by the verifier."""
    vlek_ev = authority.snp(signing_key="VLEK").evidence(RD, measurement=MEAS)
    vcek_crl = _ark_crl(authority, [], now, scope="vcek")
    vlek_crl = _ark_crl(
        authority, [authority.asvk.serial_number], now, scope="vlek", age=dt.timedelta(hours=2)
    )
    source = tmp_path / "carried"
    (source / "crl").mkdir(parents=True)
    cache = CollateralCache(tmp_path / "cache", sim_trust)
    key = f"{collateral_cache.issuer_id(authority.ark)}"
    (source / "crl" / f"{key}-vlek.der").write_bytes(vcek_crl)
    with pytest.raises(StrongroomError) as imported:
        cache.import_directory(source)
    assert imported.value.reason == Reason.COLLATERAL_MISMATCH
    with pytest.raises(StrongroomError) as put:
        cache.put_crl(vlek_crl, scope="vcek")
    assert put.value.reason == Reason.COLLATERAL_MISMATCH
    cache.put_crl(vlek_crl, scope="vlek")  # the genuine one is not held back by a mark
    with pytest.raises(VerificationFailed) as revoked:
        verify_evidence(vlek_ev, trust=sim_trust, now=now, collateral=cache)
    assert revoked.value.reason == Reason.CERT_REVOKED

    class Misfiled:
        """A source that hands the ARK's VCEK CRL out for either scope."""

        def crl(self, issuer: x509.Certificate, scope: str = "") -> bytes | None:
            return vcek_crl

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    with pytest.raises(StrongroomError) as misfiled:
        verify_evidence(vlek_ev, trust=sim_trust, now=now, collateral=Misfiled())  # type: ignore[arg-type]
    assert misfiled.value.reason == Reason.COLLATERAL_MISMATCH


def test_static_source_prefers_the_newest_of_equal_crls(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    """Two issues of one CRL: the newest thisUpdate judges, whatever the order given (the first
    was taken, so an older clean CRL listed first hid a revocation)."""
    vlek_ev = authority.snp(signing_key="VLEK").evidence(RD, measurement=MEAS)
    older = _ark_crl(authority, [], now, scope="vlek", age=dt.timedelta(days=2))
    newer = _ark_crl(authority, [authority.asvk.serial_number], now, scope="vlek")
    for crls in ((older, newer), (newer, older)):
        with pytest.raises(VerificationFailed) as err:
            verify_evidence(
                vlek_ev, trust=sim_trust, now=now, collateral=StaticCollateralSource(crl_list=crls)
            )
        assert err.value.reason == Reason.CERT_REVOKED
    tdx = authority.tdx()
    root_old = authority.crl("intel_root", now=now - dt.timedelta(days=1))
    root_new = authority.crl("intel_root", [authority.pck_ca.serial_number], now=now)
    base = authority.collateral_source(tdx=[tdx], now=now)
    source = StaticCollateralSource(
        tcb_infos=base.tcb_infos, qe_identity=base.qe_identity, signing_chain=base.signing_chain,
        crl_list=(root_old, root_new, authority.crl("pck_ca", now=now)),
    )  # fmt: skip
    with pytest.raises(VerificationFailed) as tdx_err:
        verify_evidence(
            Evidence(TeeType.TDX, tdx.quote(RD, mrtd=MEAS)), trust=sim_trust, now=now,
            collateral=source,
        )  # fmt: skip
    assert tdx_err.value.reason == Reason.CERT_REVOKED


# --- rollback --------------------------------------------------------------------------------------


def test_older_tcb_info_is_refused_and_the_mark_survives_restart(
    authority, sim_trust, now, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    tdx = authority.tdx()
    chain = authority.tcb_signing_chain_pem()
    cache = CollateralCache(tmp_path, sim_trust)
    cache.put_tdx_tcb_info(tdx.tcb_info(now=now, evaluation_number=18, status="OutOfDate"), chain)
    older = tdx.tcb_info(now=now, evaluation_number=17, status="UpToDate")  # in window, signed
    for reopened in (cache, CollateralCache(tmp_path, sim_trust)):
        with pytest.raises(VerificationFailed) as err:
            reopened.put_tdx_tcb_info(older, chain)
        assert err.value.reason == Reason.COLLATERAL_ROLLBACK
    # Same number issued earlier: also a rollback.
    earlier = tdx.tcb_info(now=now, evaluation_number=18, issued=now - dt.timedelta(days=3))
    with pytest.raises(VerificationFailed):
        cache.put_tdx_tcb_info(earlier, chain)
    assert parse_tcb_info(cache.tdx_tcb_info(tdx.fmspc).data).tcb_evaluation_data_number == 18  # type: ignore[union-attr]
    cache.put_tdx_tcb_info(tdx.tcb_info(now=now, evaluation_number=19), chain)  # newer: fine


def test_upstream_rollback_keeps_the_newer_document(
    authority, sim_trust, now, tmp_path, server
) -> None:  # type: ignore[no-untyped-def]
    tdx = authority.tdx()
    chain = authority.tcb_signing_chain_pem()
    cache = CollateralCache(tmp_path, sim_trust)
    cache.put_tdx_tcb_info(tdx.tcb_info(now=now, evaluation_number=18), chain)
    server.tcb_info(tdx.fmspc.hex(), tdx.tcb_info(now=now, evaluation_number=17), chain)
    service = CollateralService(cache, fast(server))
    with pytest.raises(VerificationFailed):
        service.fetch_tcb_info(tdx.fmspc)
    assert parse_tcb_info(cache.tdx_tcb_info(tdx.fmspc).data).tcb_evaluation_data_number == 18  # type: ignore[union-attr]


def test_older_crl_is_refused(authority, sim_trust, now, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cache = CollateralCache(tmp_path, sim_trust)
    cache.put_crl(authority.crl("intel_root", now=now))
    with pytest.raises(VerificationFailed) as err:
        cache.put_crl(authority.crl("intel_root", now=now - dt.timedelta(days=2)))
    assert err.value.reason == Reason.COLLATERAL_ROLLBACK


def _with_crl_version(der: bytes, version: int) -> bytes:
    """A DER CRL with its version field (v2 is INTEGER 1) set to ``version``; its signature no
    longer matches, but the parser meets the version first."""
    v2 = b"\x02\x01\x01"
    at = der.find(v2, 0, 16)
    assert at > 0
    return der[:at] + b"\x02\x01" + bytes([version]) + der[at + 3 :]


@pytest.mark.parametrize("version", [2, 0x7F])
def test_a_crl_with_an_unknown_version_is_bad_collateral(  # type: ignore[no-untyped-def]
    authority, sim_trust, now, tmp_path, version: int
) -> None:
    """cryptography raises InvalidVersion, which is not a ValueError, for a CRL version other than
    v1/v2: a fetched or imported CRL like that escaped as an untyped error."""
    bad = _with_crl_version(authority.crl("intel_root", now=now), version)
    with pytest.raises(MalformedEvidence) as err:
        CollateralCache(tmp_path, sim_trust).put_crl(bad)
    assert err.value.reason == Reason.BAD_COLLATERAL
    assert crl_issuer_name(bad) is None


def test_a_cached_crl_with_an_unknown_version_is_skipped_when_the_cache_opens(  # type: ignore[no-untyped-def]
    authority, sim_trust, now, tmp_path
) -> None:
    """One such file in the cache directory stopped the cache (and so the broker) from opening.
    Skipped, it is named when its CRL is asked for (COLLATERAL_MISSING, the file and why)."""
    cache = CollateralCache(tmp_path, sim_trust)
    cache.put_crl(authority.crl("intel_root", now=now))
    (stored,) = (tmp_path / "crl").glob("*.der")
    cache.put_crl(authority.crl("pck_ca", now=now), issuer_chain=authority.pck_crl_chain_pem())
    stored.write_bytes(_with_crl_version(stored.read_bytes(), 2))
    reopened = CollateralCache(tmp_path, sim_trust)
    with pytest.raises(CollateralUnavailable) as err:
        reopened.crl(authority.intel_root)
    assert err.value.reason == Reason.COLLATERAL_MISSING
    assert "the cached CA CRL of 'Intel SGX Root CA' was refused" in err.value.message
    # The broker's file system layout is not the caller's (nor the audit's) business.
    assert str(tmp_path) not in err.value.message and stored.name not in err.value.message
    assert reopened.crl(authority.pck_ca) is not None


def test_import_and_read_only_share(authority, sim_trust, now, tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = CollateralCache(tmp_path / "carried", sim_trust)
    tdx = authority.tdx()
    authority.fill_cache(src, tdx=[tdx], now=now)
    dest = CollateralCache(tmp_path / "cache", sim_trust)
    entries = dest.import_directory(tmp_path / "carried")
    assert {e.kind for e in entries} == {"crl", "tdx-tcb-info", "tdx-qe-identity"}
    replica = CollateralCache(tmp_path / "cache", sim_trust, writable=False)
    assert replica.tdx_qe_identity() is not None
    with pytest.raises(PermissionError):
        replica.put_crl(authority.crl("intel_root", now=now))


# --- no crash on any input -------------------------------------------------------------------------


def _vcek_with(authority: SimulatedAuthority, now: dt.datetime, extensions: list[Any]) -> bytes:
    from strongroom.dev.simulated import _cert, _name

    key = ec.generate_private_key(ec.SECP384R1())
    cert = _cert(
        _name("SEV-VCEK"), authority.ask.subject, key.public_key(), authority.ask_key, now,
        ca=False, years=7, extensions=extensions, pss=True,
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


def _amd_exts(product: bytes) -> list[Any]:
    ext = lambda oid, v: x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), v)  # noqa: E731
    return [
        ext(oids.OID_AMD_PRODUCT_NAME, _der.encode(_der.TAG_IA5STRING, product)),
        ext(oids.OID_AMD_BL_SPL, _der.encode_unsigned(4)),
        ext(oids.OID_AMD_TEE_SPL, _der.encode_unsigned(0)),
        ext(oids.OID_AMD_SNP_SPL, _der.encode_unsigned(24)),
        ext(oids.OID_AMD_UCODE_SPL, _der.encode_unsigned(219)),
        ext(oids.OID_AMD_HWID, bytes(64)),
    ]


def _snp_with_cert(authority: SimulatedAuthority, der: bytes) -> Evidence:
    report = authority.snp().report(RD, measurement=MEAS)
    return Evidence(TeeType.SEV_SNP, report, (der,))


def _duplicate_first_extension(der: bytes) -> bytes:
    """Re-encodes a certificate with its first extension twice (signature left stale: the parser
    must refuse before any signature is looked at)."""
    cert_seq = _der.read_one(der, _der.TAG_SEQUENCE)
    tbs, alg, sig = _der.read_all(cert_seq)
    fields = _der.read_all(tbs.value)
    ext_wrapper = fields[-1]
    exts = _der.read_all(_der.read_one(ext_wrapper.value, _der.TAG_SEQUENCE))
    first = _der.encode(exts[0].tag, exts[0].value)
    body = b"".join(_der.encode(e.tag, e.value) for e in exts)
    new_exts = _der.encode(0xA3, _der.encode(_der.TAG_SEQUENCE, first + body))
    new_tbs = b"".join(_der.encode(f.tag, f.value) for f in fields[:-1]) + new_exts
    return _der.encode(
        _der.TAG_SEQUENCE,
        _der.encode(_der.TAG_SEQUENCE, new_tbs)
        + _der.encode(alg.tag, alg.value)
        + _der.encode(sig.tag, sig.value),
    )


@pytest.mark.parametrize(
    "case", ["non-ascii-product", "duplicate-extension", "bad-basic-constraints"]
)
def test_hostile_vcek_is_malformed_not_a_crash(authority, sim_trust, now, case) -> None:  # type: ignore[no-untyped-def]
    if case == "non-ascii-product":
        der = _vcek_with(authority, now, _amd_exts("Milän".encode()))
    elif case == "duplicate-extension":
        der = _duplicate_first_extension(_vcek_with(authority, now, _amd_exts(b"Milan")))
    else:
        good = _vcek_with(authority, now, _amd_exts(b"Milan"))
        at = good.index(b"\x06\x03\x55\x1d\x13")  # basicConstraints: SEQUENCE {} -> NULL
        value = good.index(b"\x04\x02\x30\x00", at)
        der = good[:value] + b"\x04\x02\x05\x00" + good[value + 4 :]
    source = authority.collateral_source(now=now)
    with pytest.raises(MalformedEvidence) as err:
        verify_evidence(_snp_with_cert(authority, der), trust=sim_trust, now=now, collateral=source)
    assert err.value.reason in (Reason.BAD_CERTIFICATE, Reason.UNPARSEABLE_INPUT)


def test_pck_ca_with_unknown_key_algorithm_is_malformed(authority, sim_trust, now) -> None:  # type: ignore[no-untyped-def]
    tdx = authority.tdx()
    ca_der = authority.pck_ca.public_bytes(serialization.Encoding.DER)
    ec_oid = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
    assert ec_oid in ca_der
    weird = ca_der.replace(ec_oid, bytes.fromhex("06072a8648ce3d0209"), 1)  # unknown algorithm
    pem = (
        tdx.pck.public_bytes(serialization.Encoding.PEM)
        + x509.load_der_x509_certificate(weird).public_bytes(serialization.Encoding.PEM)
        + authority.intel_root_pem()
    )
    quote = tdx.quote(RD, mrtd=MEAS, pck_chain_pem=pem)
    with pytest.raises(StrongroomError) as err:
        verify_evidence(
            Evidence(TeeType.TDX, quote), trust=sim_trust, now=now,
            collateral=authority.collateral_source(tdx=[tdx], now=now),
        )  # fmt: skip
    assert isinstance(err.value, MalformedEvidence | VerificationFailed)


@pytest.mark.parametrize(
    "body",
    [
        b'{"tcbInfo":' + b"[" * 100_000 + b"]" * 100_000 + b',"signature":"00"}',
        b'{"tcbInfo":{"id":"TDX","version":3,"tcbEvaluationDataNumber":'
        + b"9" * 5000
        + b'},"signature":"'
        + b"00" * 64
        + b'"}',
        b'{"tcbInfo":{"id":"TDX","version":3,"tdxModuleIdentities":7,"tcbLevels":"x"},"signature":"'
        + b"00" * 64
        + b'"}',
        b'{"tcbInfo":{"id":"TDX","version":3,"tcbLevels":[{"tcb":{"sgxtcbcomponents":[1],"pcesvn":1},"advisoryIDs":5}]},"signature":"'
        + b"00" * 64
        + b'"}',
    ],
    ids=["deep-nesting", "5000-digit-int", "non-list-fields", "non-list-advisories"],
)
def test_hostile_collateral_json_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedEvidence) as err:
        parse_tcb_info(body)
    assert err.value.reason == Reason.BAD_COLLATERAL
    with pytest.raises(MalformedEvidence):
        parse_qe_identity(body.replace(b"tcbInfo", b"enclaveIdentity"))


@pytest.fixture(scope="module")
def fuzz_base(authority, now):  # type: ignore[no-untyped-def]
    snp, tdx = authority.snp(), authority.tdx()
    return (
        snp.report(RD, measurement=MEAS), snp.certificate_der, tdx.quote(RD, mrtd=MEAS),
        authority.collateral_source(tdx=[tdx], now=now),
    )  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_and_mutated_evidence_yields_only_typed_errors(
    fuzz_base, sim_trust, now, data
) -> None:  # type: ignore[no-untyped-def]
    snp_report, snp_cert, tdx_quote, source = fuzz_base
    kind = data.draw(st.sampled_from(["snp", "tdx", "random"]))
    if kind == "random":
        tee = data.draw(st.sampled_from([TeeType.SEV_SNP, TeeType.TDX]))
        ev = Evidence(
            tee,
            data.draw(st.binary(max_size=6000)),
            tuple(data.draw(st.lists(st.binary(max_size=400), max_size=2))),
        )
    else:
        if kind == "snp":
            report, certs = bytearray(snp_report), [bytearray(snp_cert)]
        else:
            report, certs = bytearray(tdx_quote), []
        for _ in range(data.draw(st.integers(1, 5))):
            what = data.draw(st.sampled_from(["report", "cert", "cut"]))
            if what == "report" and report:
                report[data.draw(st.integers(0, len(report) - 1))] ^= data.draw(st.integers(1, 255))
            elif what == "cert" and certs:
                c = certs[0]
                c[data.draw(st.integers(0, len(c) - 1))] ^= data.draw(st.integers(1, 255))
            elif report:
                report = report[: data.draw(st.integers(0, len(report)))]
        ev = Evidence(
            TeeType.SEV_SNP if kind == "snp" else TeeType.TDX,
            bytes(report),
            tuple(bytes(c) for c in certs),
        )
    try:
        verify_evidence(ev, trust=sim_trust, now=now, collateral=source)
    except StrongroomError as exc:
        assert exc.reason and exc.reason != "INTERNAL"


@settings(max_examples=150, deadline=None)
@given(
    doc=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
            ["id", "version", "tcbLevels", "tcb", "fmspc", "issueDate", "nextUpdate", "tdxModule",
             "tcbEvaluationDataNumber", "advisoryIDs", "sgxtcbcomponents", "svn", "mrsigner"]), inner, max_size=6),
        max_leaves=30,
    )
)  # fmt: skip
def test_random_collateral_json_yields_only_typed_errors(doc: Any) -> None:
    body = json.dumps({"tcbInfo": doc, "signature": "00" * 64}).encode()
    for parse in (parse_tcb_info, parse_qe_identity):
        with contextlib.suppress(MalformedEvidence):
            parse(body if parse is parse_tcb_info else body.replace(b"tcbInfo", b"enclaveIdentity"))


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=2000))
def test_random_crl_bytes_are_refused_by_the_cache(
    blob: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = CollateralCache(tmp_path_factory.mktemp("c"), TrustStore.production())
    with pytest.raises(StrongroomError):
        cache.put_crl(blob)


def test_a_deeply_nested_state_file_is_bad_collateral(  # type: ignore[no-untyped-def]
    vectors, production, server, tmp_path
) -> None:
    """json raises RecursionError (not a ValueError) for state.json nested past the interpreter's
    limit; the cache's 'never start over silently' check let it escape as an untyped error."""
    real_intel(server, vectors)
    (tmp_path / "state.json").write_bytes(b"[" * 100_000)
    service = CollateralService(CollateralCache(tmp_path, production), fast(server))
    with pytest.raises(StrongroomError) as info:
        service.fetch_all(fmspcs=(bytes.fromhex("50806f000000"),))
    assert info.value.reason == Reason.COLLATERAL_STATE_CORRUPT
    assert "state.json is unreadable" in info.value.message


@pytest.mark.parametrize(
    "state",
    [
        {"tcb_info": {"50806f000000": "not a mark"}},
        {"tcb_info": {"50806f000000": {"n": 17}}},
        {"qe_identity": {"td_qe": {"n": "17", "issued": "2026-11-01T00:00:00+00:00"}}},
        {"crl": {"x": {"n": None, "issued": "yesterday"}}},
        {"crl": []},
        ["not", "an", "object"],
    ],
    ids=["mark-string", "mark-without-issued", "n-string", "issued-not-a-time", "list", "top"],
)
def test_a_state_file_of_the_wrong_shape_is_the_brokers_problem(  # type: ignore[no-untyped-def]
    vectors, production, server, tmp_path, state
) -> None:
    """A mark of the wrong shape in state.json (a hand edit, a bad restore) raised AttributeError,
    TypeError or KeyError out of the cache: an untyped error for the release that needed collateral
    stored; a wrong top level was BAD_COLLATERAL, INVALID_ARGUMENT to that caller. Both are now
    the broker's own COLLATERAL_STATE_CORRUPT (UNAVAILABLE), and nothing is stored."""
    real_intel(server, vectors)
    (tmp_path / "state.json").write_text(json.dumps(state))
    service = CollateralService(CollateralCache(tmp_path, production), fast(server))
    with pytest.raises(StrongroomError) as info:
        service.fetch_all(fmspcs=(bytes.fromhex("50806f000000"),))
    assert info.value.reason == Reason.COLLATERAL_STATE_CORRUPT
    assert info.value.status_name == "UNAVAILABLE"
    assert json.loads((tmp_path / "state.json").read_text()) == state


@pytest.mark.parametrize("case", ["missing", "a file", "empty", "chain missing"])
def test_an_import_that_would_import_nothing_or_cannot_read_says_so(  # type: ignore[no-untyped-def]
    authority, sim_trust, now, tmp_path, case: str
) -> None:
    """A mistyped source imported nothing and exited 0 (an air-gapped broker then refuses every
    release for want of collateral); a document without its chain was an OSError traceback."""
    source = tmp_path / "carried"
    expected = f"{source} is not a directory"
    if case == "a file":
        source.write_bytes(b"not a directory")
    elif case == "empty":
        source.mkdir()
        expected = f"{source} holds no collateral"
    elif case == "chain missing":
        authority.fill_cache(CollateralCache(source, sim_trust), tdx=[authority.tdx()], now=now)
        (chain,) = (source / "tdx" / "tcbinfo").glob("*.chain.pem")
        chain.unlink()
        expected = f"cannot read {chain}: No such file or directory"
    with pytest.raises(StrongroomError) as err:
        CollateralCache(tmp_path / "cache", sim_trust).import_directory(source)
    assert (err.value.status_name, err.value.reason) == ("INVALID_ARGUMENT", "FILE_UNREADABLE")
    assert expected in err.value.message


def test_a_cached_document_the_parser_now_refuses_is_named_in_the_refusal(  # type: ignore[no-untyped-def]
    authority, sim_trust, now, tmp_path, server
) -> None:
    """A document an older (laxer) broker cached and this parser refuses is skipped with a
    WARNING; the release it was needed for was refused COLLATERAL_MISSING saying the collateral
    "holds none", so the operator looked for a fetch or import that never happened while the
    file to replace sat in the directory. The refusal now names the file and why it was refused;
    a fetching broker replaces it from upstream."""
    tdx = authority.tdx()
    body = json.loads(tdx.tcb_info(now=now))["tcbInfo"]
    body["tcbLevels"].reverse()  # oldest first: stored before the parser required newest first
    stale_parser_doc = authority.sign_collateral("tcbInfo", body)
    chain = authority.tcb_signing_chain_pem()
    path = tmp_path / "tdx" / "tcbinfo" / f"{tdx.fmspc.hex()}.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(stale_parser_doc)
    path.with_suffix(".chain.pem").write_bytes(chain)
    cache = CollateralCache(tmp_path, sim_trust)
    authority.fill_cache(cache, now=now)  # the CRLs
    cache.put_tdx_qe_identity(tdx.qe_identity(now=now), chain)
    assert set(cache.refused()) == {path}
    quote = Evidence(TeeType.TDX, tdx.quote(RD, mrtd=MEAS))
    offline = CollateralService(CollateralCache(tmp_path, sim_trust, writable=False), None)
    server.status = 503  # an upstream that cannot replace it
    down = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server, retries=0))
    for source in (cache, offline, down):
        with pytest.raises(CollateralUnavailable) as err:
            verify_evidence(quote, trust=sim_trust, now=now, collateral=source)
        assert err.value.reason == Reason.COLLATERAL_MISSING and not caused_by_caller(err.value)
        assert f"the cached TDX TCB info for FMSPC {tdx.fmspc.hex()} was refused" in (
            err.value.message
        )
        assert "tcbinfo/" not in err.value.message and str(tmp_path) not in err.value.message
        assert "newest first" in err.value.message and "collateral ls" in err.value.message
    # A CRL too (here one that is no CRL at all), for an SNP release.
    snp = authority.snp()
    ark_crl = tmp_path / "crl" / f"{collateral_cache.issuer_id(authority.ark)}-vcek.der"
    ark_crl.write_bytes(b"\x30\x03not a CRL")
    reread = CollateralCache(tmp_path, sim_trust)
    with pytest.raises(CollateralUnavailable) as crl_err:
        verify_evidence(
            snp.evidence(RD, measurement=MEAS), trust=sim_trust, now=now, collateral=reread
        )
    assert crl_err.value.reason == Reason.COLLATERAL_MISSING
    assert "the cached vcek CRL of 'ARK-Milan' was refused" in crl_err.value.message
    assert ark_crl.name not in crl_err.value.message
    # A fetching broker whose upstream has the document replaces the refused file.
    server.status = None
    server.tcb_info(tdx.fmspc.hex(), tdx.tcb_info(now=now), chain)
    fixed = CollateralService(CollateralCache(tmp_path, sim_trust), fast(server))
    claims = verify_evidence(quote, trust=sim_trust, now=now, collateral=fixed)
    assert claims.collateral_complete and path not in fixed.cache.refused()


def test_a_background_refresh_failing_unexpectedly_is_logged_and_backed_off(  # type: ignore[no-untyped-def]
    authority, sim_trust, server, tmp_path, now, monkeypatch, caplog
) -> None:
    """A refresh of a cached but due document runs on a thread of its own. An exception other than
    the project's own (a defect in a parser or the cache) ended that thread with a bare traceback
    and was not remembered as a failure, so every release while the document was due started
    another fetch. It is logged by class and backed off like any failed fetch."""
    server.amd_crl("Milan", authority.crl("ark", now=now))
    cache = CollateralCache(tmp_path, sim_trust)
    # Everything cached is due at once: each read of it asks for a refresh in the background.
    service = CollateralService(cache, fast(server), refresh_before=dt.timedelta(days=365_000))
    assert service.crl(authority.ark, "vcek") is not None  # missing: fetched in the foreground
    stored: list[int] = []

    def defect(self: CollateralCache, data: bytes, **kw: Any) -> None:
        stored.append(len(data))
        raise KeyError("a defect's text, with whatever the upstream sent")

    monkeypatch.setattr(CollateralCache, "put_crl", defect)
    caplog.set_level(logging.ERROR, logger="strongroom")
    for _ in range(5):
        assert service.crl(authority.ark, "vcek") is not None  # the cached CRL still serves
        for thread in threading.enumerate():
            if thread.name == "collateral-refresh":
                thread.join(10)
    assert len(stored) == 1  # backed off: one refresh, not one per read
    (line,) = [r for r in caplog.records if "refresh failed unexpectedly" in r.getMessage()]
    assert line.error == "KeyError" and "upstream sent" not in caplog.text  # type: ignore[attr-defined]
