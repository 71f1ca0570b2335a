"""GetEvidence over real gRPC: nonce rules, REPORT_DATA binding, TLS key, verification, busy."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import threading
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.api.attestation.v1 import evidence_pb2
from strongroom.api.inference.v1 import attestation_pb2 as pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as pb_grpc
from strongroom.attestation import binding
from strongroom.attestation.errors import VerificationFailed
from strongroom.attestation.evidence import Evidence
from strongroom.attestation.verify import verify_evidence
from strongroom.attesters import (
    EvidenceBundle,
    SevGuestAttester,
    SimulatedAttester,
    TeeType,
)
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.inference.evidence_service import InferenceAttestationServicer
from strongroom.inference.models import ModelRepository
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from tests.inference.conftest import Starter
from tests.inference.fake_tee import FakeSevGuest

MEASUREMENT = bytes(range(48))


def spki() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def reason_of(error: grpc.RpcError) -> object:
    return next((m.value for m in error.trailing_metadata() or () if m.key == REASON_TRAILER), None)


@pytest.fixture
def simulated(sim_authority: SimulatedAuthority, sim_now: dt.datetime) -> SimulatedAttester:
    snp = sim_authority.snp(now=sim_now)
    return SimulatedAttester(
        snp, TeeType.SEV_SNP, production=False, claims={"measurement": MEASUREMENT}
    )


def test_evidence_binds_the_nonce_and_the_current_tls_key(
    start_server: Starter,
    simulated: SimulatedAttester,
    sim_authority: SimulatedAuthority,
    sim_now: dt.datetime,
) -> None:
    keys = [spki()]
    servicer = InferenceAttestationServicer(simulated, lambda: keys[-1])
    running = start_server(ModelRepository(), evidence=servicer)
    nonce = bytes(range(32))
    response = running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=nonce))
    assert response.report_data == binding.client_report_data_for(nonce, keys[0])
    assert response.tls_public_key_sha256 == hashlib.sha256(keys[0]).digest()
    assert response.evidence.tee_type == evidence_pb2.TEE_TYPE_SEV_SNP
    claims = verify_evidence(
        Evidence.from_proto(response.evidence),
        trust=sim_authority.trust_store(),
        now=sim_now,
        collateral=sim_authority.collateral_source(now=sim_now),
    )
    assert claims.report_data == response.report_data

    keys.append(spki())  # the certificate was renewed with a new key
    renewed = running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=nonce))
    assert renewed.report_data == binding.client_report_data_for(nonce, keys[1])
    assert renewed.tls_public_key_sha256 == hashlib.sha256(keys[1]).digest()
    assert renewed.report_data != response.report_data


@pytest.mark.parametrize("length", [16, 64])
def test_nonce_length_bounds_accepted(start_server: Starter, length: int) -> None:
    servicer = InferenceAttestationServicer(SevGuestAttester(io=FakeSevGuest()), spki)
    running = start_server(ModelRepository(), evidence=servicer)
    response = running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(length)))
    assert len(response.report_data) == 64
    assert response.evidence.report[0x50:0x90] == response.report_data


@pytest.mark.parametrize("length", [0, 15, 65, 1024])
def test_nonce_length_rejected(start_server: Starter, length: int) -> None:
    device = FakeSevGuest()
    servicer = InferenceAttestationServicer(SevGuestAttester(io=device), spki)
    running = start_server(ModelRepository(), evidence=servicer)
    with pytest.raises(grpc.RpcError) as info:
        running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(length)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(info.value) == "NONCE_LENGTH"
    assert device.calls == []


def test_hardware_failure_is_unavailable(start_server: Starter) -> None:
    device = FakeSevGuest()
    device.fail_next = (errno.EIO, 0, 3)
    servicer = InferenceAttestationServicer(SevGuestAttester(io=device), spki)
    running = start_server(ModelRepository(), evidence=servicer)
    with pytest.raises(grpc.RpcError) as info:
        running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(32)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(info.value) == "SNP_HOST_ERROR"


def test_disabled_vmpck_is_a_failed_precondition(start_server: Starter) -> None:
    device = FakeSevGuest()
    device.vmpck_disabled = True
    servicer = InferenceAttestationServicer(SevGuestAttester(io=device), spki)
    running = start_server(ModelRepository(), evidence=servicer)
    with pytest.raises(grpc.RpcError) as info:
        running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(32)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == "SNP_REQUEST_UNSUPPORTED"


class _BlockingAttester:
    """Holds the hardware until released, to fill the concurrency slots."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.entries = threading.Semaphore(0)  # one per request that reached the hardware
        self.release = threading.Event()
        self.inner = SevGuestAttester(io=FakeSevGuest())

    @property
    def tee_type(self) -> TeeType:
        return TeeType.SEV_SNP

    def attest(self, report_data: bytes) -> EvidenceBundle:
        self.entered.set()
        self.entries.release()
        assert self.release.wait(30)
        return self.inner.attest(report_data)


def test_concurrent_requests_beyond_the_limit_are_refused(start_server: Starter) -> None:
    attester = _BlockingAttester()
    servicer = InferenceAttestationServicer(attester, spki, max_concurrent=1)
    running = start_server(ModelRepository(), evidence=servicer)
    first = running.evidence.GetEvidence.future(pb.GetEvidenceRequest(nonce=bytes(16)))
    assert attester.entered.wait(10)
    other = grpc.insecure_channel(running.address)  # another caller: the slots are all taken
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceAttestationServiceStub(other).GetEvidence(
                pb.GetEvidenceRequest(nonce=bytes(16))
            )
    finally:
        other.close()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(info.value) == "ATTESTATION_BUSY"
    attester.release.set()
    assert len(first.result(timeout=10).report_data) == 64
    # The slot is free again.
    assert running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(16))).report_data


def test_a_request_refused_as_busy_costs_the_caller_no_token(start_server: Starter) -> None:
    """ATTESTATION_BUSY was answered after the caller's token was taken: while other callers
    filled the slots, each retry spent the caller's rate on reports it never got, and it was then
    ATTESTATION_RATE_LIMITED once the hardware was free."""
    attester = _BlockingAttester()
    servicer = InferenceAttestationServicer(
        attester, spki, max_concurrent=1, per_caller_rate=0.001, per_caller_burst=2
    )
    running = start_server(ModelRepository(), evidence=servicer)
    other = grpc.insecure_channel(running.address)  # another caller holds the one slot
    try:
        first = pb_grpc.InferenceAttestationServiceStub(other).GetEvidence.future(
            pb.GetEvidenceRequest(nonce=bytes(16))
        )
        assert attester.entered.wait(10)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(16)))
            assert reason_of(info.value) == "ATTESTATION_BUSY"
        attester.release.set()
        assert first.result(timeout=10).report_data
    finally:
        other.close()
    for _ in range(2):  # its whole burst is still there
        assert running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=bytes(16))).report_data


def test_one_caller_cannot_hold_every_hardware_request(start_server: Starter) -> None:
    """The 4 hardware requests GetEvidence runs at once were first come, first served: one
    client whose reports the firmware answered slowly (the host throttles guest requests) held
    all 4 at its own rate, and every other tenant checking the server was ATTESTATION_BUSY for
    as long as it kept them. A caller now holds just under half of them (1 of 4); more of its
    own are refused at once, TOO_MANY_ATTESTATIONS_PER_IDENTITY (its rate untouched), and the
    other callers' requests reach the hardware."""
    attester = _BlockingAttester()
    servicer = InferenceAttestationServicer(
        attester, spki, per_caller_rate=0.001, per_caller_burst=2
    )
    running = start_server(ModelRepository(), evidence=servicer)
    request = pb.GetEvidenceRequest(nonce=bytes(16))

    def started(call: grpc.Future[Any]) -> None:
        """Returns once ``call`` holds the hardware or was answered."""
        while not call.done() and not attester.entries.acquire(timeout=0.05):
            pass

    flood = []
    for _ in range(4):  # the whole default capacity, asked for by one caller
        flood.append(running.evidence.GetEvidence.future(request))
        started(flood[-1])
    refused = [call for call in flood if call.done()]
    errors = [e for e in (call.exception() for call in refused) if isinstance(e, grpc.RpcError)]
    assert [reason_of(e) for e in errors] == ["TOO_MANY_ATTESTATIONS_PER_IDENTITY"] * 3
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    other = grpc.insecure_channel(running.address)  # another tenant checks the server meanwhile
    try:
        theirs = pb_grpc.InferenceAttestationServiceStub(other).GetEvidence.future(request)
        started(theirs)
        attester.release.set()
        assert len(theirs.result(timeout=30).report_data) == 64
    finally:
        other.close()
    assert [len(c.result(timeout=30).report_data) for c in flood if c not in refused] == [64]
    # The refused requests cost the flooding caller none of its burst (2): one report is left.
    assert running.evidence.GetEvidence(request).report_data
    with pytest.raises(grpc.RpcError) as info:
        running.evidence.GetEvidence(request)
    assert reason_of(info.value) == "ATTESTATION_RATE_LIMITED"


def test_one_caller_cannot_keep_the_hardware_busy(
    start_server: Starter, simulated: SimulatedAttester
) -> None:
    """GetEvidence had a cap on requests in flight but none per caller: one certified client
    could ask the firmware for reports back to back for ever (each a guest request the host
    throttles; on SEV-SNP a request stalled long enough disables the VM's firmware channel until
    it restarts). Each caller now gets a burst, then a steady rate; others are not affected."""
    clock = [1000.0]
    servicer = InferenceAttestationServicer(
        simulated, spki, per_caller_rate=0.5, per_caller_burst=3, clock=lambda: clock[0]
    )
    running = start_server(ModelRepository(), evidence=servicer)
    request = pb.GetEvidenceRequest(nonce=bytes(16))
    for _ in range(3):
        assert running.evidence.GetEvidence(request).report_data
    with pytest.raises(grpc.RpcError) as info:
        running.evidence.GetEvidence(request)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(info.value) == "ATTESTATION_RATE_LIMITED"
    other = grpc.insecure_channel(running.address)  # another caller (here: another peer)
    try:
        stub = pb_grpc.InferenceAttestationServiceStub(other)
        assert stub.GetEvidence(request).report_data
    finally:
        other.close()
    clock[0] += 2.0  # one report's worth of time at 0.5 a second
    assert running.evidence.GetEvidence(request).report_data
    with pytest.raises(grpc.RpcError):
        running.evidence.GetEvidence(request)


def test_get_evidence_is_no_signing_oracle_for_key_release(
    start_server: Starter,
    simulated: SimulatedAttester,
    sim_authority: SimulatedAuthority,
    sim_now: dt.datetime,
) -> None:
    """A certified caller picks only the nonce: REPORT_DATA is the inference-client binding of it
    and the server's own TLS key, under its own label, so evidence it obtains never satisfies the
    key-release binding (nonce, ephemeral key, TLS key) the broker checks, even with the broker's
    challenge as the nonce and the server's TLS key, and it cannot bind a key of its choosing."""
    assert [f.name for f in pb.GetEvidenceRequest.DESCRIPTOR.fields] == ["nonce"]
    server_tls = spki()
    servicer = InferenceAttestationServicer(simulated, lambda: server_tls)
    running = start_server(ModelRepository(), evidence=servicer)
    challenge = bytes(range(32))  # as if relayed from the broker's GetChallenge
    response = running.evidence.GetEvidence(pb.GetEvidenceRequest(nonce=challenge))
    claims = verify_evidence(
        Evidence.from_proto(response.evidence),
        trust=sim_authority.trust_store(),
        now=sim_now,
        collateral=sim_authority.collateral_source(now=sim_now),
    )
    assert claims.report_data == binding.client_report_data_for(challenge, server_tls)
    for ephemeral in (spki(), server_tls):
        with pytest.raises(VerificationFailed) as info:
            binding.check_report_data(
                claims.report_data, binding.report_data_for(challenge, ephemeral, server_tls)
            )
        assert info.value.reason == "REPORT_DATA_MISMATCH"
