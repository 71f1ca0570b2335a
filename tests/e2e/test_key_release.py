"""Attested key release end to end: real step-ca, real mTLS, real SoftHSM2, simulated TEE.

A simulated confidential VM obtains the data key the publisher got; every bad piece of evidence or
request is refused with a precise status, leaves an audit record with its reason, and releases
nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from strongroom.api.attestation.v1 import evidence_pb2
from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.attestation.abi import snp as snp_abi
from strongroom.attestation.binding import report_data_for
from strongroom.attesters import SimulatedAttester, TeeType
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.dev.simulated import SimulatedAuthority, SimulatedSnp
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.challenge import ChallengeIssuer
from strongroom.keybroker.hsm import Hsm
from strongroom.keybroker.keys import KeyManager
from strongroom.keybroker.refusals import REFUSAL_BURST
from strongroom.keybroker.service import MESSAGE_LIMITS
from strongroom.pki import WorkloadIdentity
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.callers import ROLELESS
from strongroom.runtime.config import LoggingConfig
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from strongroom.runtime.logs import configure_logging
from strongroom.runtime.secrets import Secret
from strongroom.wire import append_bytes_field
from tests.conftest import stack_root
from tests.keybroker.helpers import bound, data_key_request, unwraps_counted

GOOD = bytes.fromhex("11" * 48)
OTHER = bytes.fromhex("22" * 48)
KEY = "model-a"


def policy(
    stack: DevStack, *, measurements: list[bytes], allow_simulated: bool = True, extra: str = ""
) -> str:
    return f"""
version: "test-1"
allowed_spiffe_ids: [{stack.spiffe_id("inference")}]
tee_types: [SEV_SNP]
sev_snp:
  allow_simulated: {str(allow_simulated).lower()}
  measurements: [{", ".join(repr(m.hex()) for m in measurements)}]
  min_reported_tcb: any
{extra}
"""


@dataclasses.dataclass
class World:
    stack: DevStack
    admin: pb_grpc.KeyAdminServiceStub
    publisher: pb_grpc.KeyBrokerServiceStub
    inference_id: WorkloadIdentity
    broker: pb_grpc.KeyBrokerServiceStub
    authority: SimulatedAuthority
    platform: SimulatedSnp
    data_key: bytes
    wrapped: bytes
    version: int
    audit_path: Path


@pytest.fixture(scope="module")
def world(stack: DevStack) -> World:
    return make_world(stack)


def make_world(stack: DevStack) -> World:
    """A release key with :func:`policy` on ``stack``'s broker, and a data key under it."""
    admin_id = stack.identity("admin")
    publisher_id = stack.identity("publisher")
    inference_id = stack.identity("inference")
    admin = pb_grpc.KeyAdminServiceStub(stack.channel(admin_id, "keybroker"))
    admin.CreateKey(pb.CreateKeyRequest(key_id=KEY), timeout=30)
    admin.SetReleasePolicy(
        pb.SetReleasePolicyRequest(key_id=KEY, policy_document=policy(stack, measurements=[GOOD])),
        timeout=10,
    )
    publisher = pb_grpc.KeyBrokerServiceStub(stack.channel(publisher_id, "keybroker"))
    generated = publisher.GenerateDataKey(data_key_request(KEY), timeout=10)
    authority = SimulatedAuthority.load(stack.root / "simulated-tee")
    return World(
        stack=stack,
        admin=admin,
        publisher=publisher,
        inference_id=inference_id,
        broker=pb_grpc.KeyBrokerServiceStub(stack.channel(inference_id, "keybroker")),
        authority=authority,
        platform=authority.snp(),
        data_key=generated.data_key,
        wrapped=generated.wrapped_data_key,
        version=generated.key_version,
        audit_path=Path(stack.root / "state" / "keybroker" / "audit.log"),
    )


def audit_records(world: World) -> list[dict[str, Any]]:
    return read_audit_records(world.audit_path)


def test_simulated_vm_gets_the_publishers_data_key(world: World) -> None:
    attester = SimulatedAttester(
        world.platform, TeeType.SEV_SNP, production=False, claims={"measurement": GOOD}
    )
    client = KeyReleaseClient(
        world.stack.channel(world.inference_id, "keybroker"),
        attester,
        world.inference_id.public_key_der,
        verifier=world.stack.release_verifier(),
    )
    released = client.release(KEY, world.version, world.wrapped)
    assert bound(released.dek) == world.data_key
    assert len(world.data_key) == 32
    # SoftHSM2 offers OAEP with SHA-1 only: negotiated, and recorded in the audit log.
    assert released.mechanism == pb.WRAP_MECHANISM_RSA_OAEP_SHA1
    record = next(r for r in audit_records(world) if r.get("decision_id") == released.decision_id)
    assert record["decision"] == "allowed"
    assert record["caller"]["spiffe_id"] == world.stack.spiffe_id("inference")
    assert record["claims"]["measurement"] == GOOD.hex()
    assert record["oaep_mechanism"] == "RSA-OAEP/SHA-1/MGF1-SHA-1"
    assert record["policy_version"] == "test-1"
    # The document that judged it, by digest, recorded in force before the first decision
    # under it (the broker's wiring gives its policy store the audit log).
    document = (world.stack.root / "state" / "keybroker" / "policies" / f"{KEY}.yaml").read_bytes()
    assert record["policy_sha256"] == hashlib.sha256(document).hexdigest()
    in_force = [r for r in audit_records(world) if r["action"] == "policy_in_force"]
    assert [r["policy_sha256"] for r in in_force][-1] == record["policy_sha256"]
    assert in_force[-1]["seq"] < record["seq"]


def test_audit_log_verifies(world: World) -> None:
    public = (world.stack.secrets_dir / "audit-key.pub.pem").read_bytes()
    from strongroom.keybroker.audit import load_public_key

    result = verify_audit_log(world.audit_path, public_key=load_public_key(public))
    assert result.intact, result.message


def test_only_the_inference_identity_may_release(world: World) -> None:
    with pytest.raises(grpc.RpcError) as info:
        world.publisher.GetChallenge(pb.GetChallengeRequest(key_id=KEY), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_a_data_key_is_generated_only_for_a_named_model(world: World) -> None:
    """An older client that names no model gets a clear refusal, never an unbound key."""
    with pytest.raises(grpc.RpcError) as info:
        world.publisher.GenerateDataKey(pb.GenerateDataKeyRequest(key_id=KEY), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = info.value.details() or ""  # type: ignore[attr-defined]
    assert details.startswith("INVALID_MODEL_NAME: ") and "model_name and model_version" in details


def test_a_key_policy_scopes_its_publishers_to_model_names(world: World) -> None:
    world.admin.CreateKey(pb.CreateKeyRequest(key_id="scoped"), timeout=30)
    publisher = world.stack.spiffe_id("publisher")
    scoped = f"publishers:\n  - {{spiffe_id: '{publisher}', model_names: ['tenant-a/']}}\n"
    world.admin.SetReleasePolicy(
        pb.SetReleasePolicyRequest(
            key_id="scoped", policy_document=policy(world.stack, measurements=[GOOD], extra=scoped)
        ),
        timeout=10,
    )
    world.publisher.GenerateDataKey(data_key_request("scoped", ("tenant-a/m", "1")), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        world.publisher.GenerateDataKey(data_key_request("scoped", ("tenant-b/m", "1")), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert (info.value.details() or "").startswith("MODEL_NAME_NOT_ALLOWED: ")  # type: ignore[attr-defined]
    denied = [r for r in audit_records(world) if r["action"] == "generate_data_key"][-1]
    assert (denied["decision"], denied["claims"]["model_name"]) == ("denied", "tenant-b/m")


def test_only_the_publisher_may_generate(world: World) -> None:
    with pytest.raises(grpc.RpcError) as info:
        world.broker.GenerateDataKey(data_key_request(KEY), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- bad evidence


@dataclasses.dataclass
class Attempt:
    """A release request being built; cases mutate it."""

    world: World
    private: rsa.RSAPrivateKey
    ephemeral_der: bytes
    nonce: bytes
    tls_key: bytes
    request: pb.ReleaseKeyRequest

    def report_data(self) -> bytes:
        return report_data_for(self.nonce, self.ephemeral_der, self.tls_key)

    def set_report(self, report: bytes, certificates: list[bytes] | None = None) -> None:
        self.request.evidence.report = report
        if certificates is not None:
            del self.request.evidence.certificates[:]
            self.request.evidence.certificates.extend(certificates)


def der(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


_EPHEMERAL = rsa.generate_private_key(65537, 3072)


def new_attempt(
    world: World, *, key_id: str = KEY, measurement: bytes = GOOD, **report_kwargs: Any
) -> Attempt:
    nonce = world.broker.GetChallenge(pb.GetChallengeRequest(key_id=key_id), timeout=10).nonce
    ephemeral_der = der(_EPHEMERAL.public_key())
    tls_key = world.inference_id.public_key_der()
    report = world.platform.report(
        report_data_for(nonce, ephemeral_der, tls_key), measurement=measurement, **report_kwargs
    )
    request = pb.ReleaseKeyRequest(
        key_id=key_id,
        key_version=world.version,
        wrapped_data_key=world.wrapped,
        evidence=evidence_pb2.Evidence(
            tee_type=evidence_pb2.TEE_TYPE_SEV_SNP,
            report=report,
            certificates=[world.platform.certificate_der],
        ),
        ephemeral_public_key=ephemeral_der,
        nonce=nonce,
        accepted_mechanisms=[pb.WRAP_MECHANISM_RSA_OAEP_SHA256, pb.WRAP_MECHANISM_RSA_OAEP_SHA1],
    )
    return Attempt(world, _EPHEMERAL, ephemeral_der, nonce, tls_key, request)


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def resign(a: Attempt, **kwargs: Any) -> None:
    """A correctly signed report with different content."""
    kwargs.setdefault("measurement", GOOD)
    a.set_report(a.world.platform.report(kwargs.pop("report_data", a.report_data()), **kwargs))


def nonce_from(
    world: World,
    *,
    caller: str | None = None,
    key_id: str = KEY,
    clock: Callable[[], float] | None = None,
) -> bytes:
    key = Secret((world.stack.secrets_dir / "nonce-key").read_bytes())
    issuer = ChallengeIssuer(key, clock=clock) if clock else ChallengeIssuer(key)
    return issuer.issue(key_id, caller or world.stack.spiffe_id("inference")).nonce


def rebind_nonce(a: Attempt, nonce: bytes) -> None:
    a.nonce = nonce
    a.request.nonce = nonce
    resign(a)


def foreign_platform() -> SimulatedSnp:
    return SimulatedAuthority.generate().snp()


FOREIGN = foreign_platform()


def case_foreign_chain(a: Attempt) -> None:
    a.set_report(FOREIGN.report(a.report_data(), measurement=GOOD), [FOREIGN.certificate_der])


def case_vcek_of_other_chip(a: Attempt) -> None:
    other = a.world.authority.snp(chip_id=os.urandom(64))
    report = other.report(a.report_data(), measurement=GOOD, chip_id=a.world.platform.chip_id)
    a.set_report(report, [other.certificate_der])


def case_tcb_mismatch(a: Attempt) -> None:
    tcb = a.world.platform.tcb
    # One more SNP firmware SVN than the VCEK was issued for (byte 6 of TCB_VERSION on Milan).
    resign(a, reported_tcb=snp_abi.TcbVersion.decode(tcb.raw + (1 << 48), turin_layout=False))


def case_vlek_not_allowed(a: Attempt) -> None:
    vlek = a.world.authority.snp(signing_key="VLEK")
    a.set_report(vlek.report(a.report_data(), measurement=GOOD), [vlek.certificate_der])


def case_expired_nonce(a: Attempt) -> None:
    rebind_nonce(a, nonce_from(a.world, clock=lambda: datetime.now(UTC).timestamp() - 3600))


def case_padded_report_data(a: Attempt) -> None:
    resign(a, report_data=a.nonce[:32].ljust(64, b"\0"))


def case_other_rsa_key(a: Attempt) -> None:
    a.request.ephemeral_public_key = der(rsa.generate_private_key(65537, 3072).public_key())


CASES: list[tuple[str, Callable[[Attempt], None], grpc.StatusCode, str]] = [
    (
        "report signature forged",
        lambda a: a.set_report(flip(a.request.evidence.report, 0x2A0 + 5)),
        grpc.StatusCode.PERMISSION_DENIED,
        "REPORT_SIGNATURE_INVALID",
    ),
    (
        "measurement byte flipped after signing",
        lambda a: a.set_report(flip(a.request.evidence.report, 0x90)),
        grpc.StatusCode.PERMISSION_DENIED,
        "REPORT_SIGNATURE_INVALID",
    ),
    (
        "report_data byte flipped after signing",
        lambda a: a.set_report(flip(a.request.evidence.report, 0x50)),
        grpc.StatusCode.PERMISSION_DENIED,
        "REPORT_SIGNATURE_INVALID",
    ),
    (
        "chain to a foreign ARK",
        case_foreign_chain,
        grpc.StatusCode.PERMISSION_DENIED,
        "CERT_CHAIN_INVALID",
    ),
    (
        "VCEK of another chip",
        case_vcek_of_other_chip,
        grpc.StatusCode.PERMISSION_DENIED,
        "HWID_MISMATCH",
    ),
    (
        "reported TCB differs from VCEK",
        case_tcb_mismatch,
        grpc.StatusCode.PERMISSION_DENIED,
        "TCB_MISMATCH",
    ),
    (
        "VLEK when policy allows VCEK only",
        case_vlek_not_allowed,
        grpc.StatusCode.PERMISSION_DENIED,
        "SIGNING_KEY_NOT_ALLOWED",
    ),
    (
        "no VCEK certificate",
        lambda a: a.set_report(a.request.evidence.report, []),
        grpc.StatusCode.UNAVAILABLE,
        "COLLATERAL_MISSING",
    ),
    (
        "garbage certificate",
        lambda a: a.set_report(a.request.evidence.report, [b"not a certificate"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_CERTIFICATE",
    ),
    (
        "truncated report",
        lambda a: a.set_report(a.request.evidence.report[:1000]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TRUNCATED",
    ),
    (
        "oversized report",
        lambda a: a.set_report(a.request.evidence.report * 20),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EVIDENCE_SIZE",
    ),
    (
        "empty report",
        lambda a: a.set_report(b""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EVIDENCE_SIZE",
    ),
    (
        "TEE type unspecified",
        lambda a: setattr(a.request.evidence, "tee_type", 0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TEE_TYPE_UNSPECIFIED",
    ),
    (
        "SNP report labelled TDX",
        lambda a: setattr(a.request.evidence, "tee_type", evidence_pb2.TEE_TYPE_TDX),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNSUPPORTED_VERSION",
    ),
    (
        "unsupported report version",
        lambda a: resign(a, version=1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNSUPPORTED_VERSION",
    ),
    (
        "debug policy bit",
        lambda a: resign(a, policy=0x30000 | (1 << 19)),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEBUG_FORBIDDEN",
    ),
    ("VMPL 1", lambda a: resign(a, vmpl=1), grpc.StatusCode.PERMISSION_DENIED, "VMPL_NOT_ALLOWED"),
    (
        "migration agent allowed",
        lambda a: resign(a, policy=0x30000 | (1 << 18)),
        grpc.StatusCode.PERMISSION_DENIED,
        "MIGRATE_MA_FORBIDDEN",
    ),
    (
        "measurement not allowed",
        lambda a: resign(a, measurement=OTHER),
        grpc.StatusCode.PERMISSION_DENIED,
        "MEASUREMENT_NOT_ALLOWED",
    ),
    ("stale nonce", case_expired_nonce, grpc.StatusCode.FAILED_PRECONDITION, "NONCE_EXPIRED"),
    (
        "forged nonce",
        lambda a: rebind_nonce(a, a.nonce[:1] + os.urandom(len(a.nonce) - 1)),
        grpc.StatusCode.PERMISSION_DENIED,
        "NONCE_INVALID",
    ),
    (
        "nonce issued for another key",
        lambda a: rebind_nonce(a, nonce_from(a.world, key_id="model-b")),
        grpc.StatusCode.PERMISSION_DENIED,
        "NONCE_INVALID",
    ),
    (
        "nonce issued to another caller",
        lambda a: rebind_nonce(a, nonce_from(a.world, caller=a.world.stack.spiffe_id("other"))),
        grpc.StatusCode.PERMISSION_DENIED,
        "NONCE_INVALID",
    ),
    (
        "nonce of wrong length",
        lambda a: setattr(a.request, "nonce", a.nonce[:20]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NONCE_MALFORMED",
    ),
    (
        "REPORT_DATA bound to another ephemeral key",
        case_other_rsa_key,
        grpc.StatusCode.PERMISSION_DENIED,
        "REPORT_DATA_MISMATCH",
    ),
    (
        "REPORT_DATA bound to another TLS key",
        lambda a: resign(
            a,
            report_data=report_data_for(
                a.nonce, a.ephemeral_der, der(ec.generate_private_key(ec.SECP256R1()).public_key())
            ),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "REPORT_DATA_MISMATCH",
    ),
    (
        "REPORT_DATA is the zero-padded nonce",
        case_padded_report_data,
        grpc.StatusCode.PERMISSION_DENIED,
        "REPORT_DATA_MISMATCH",
    ),
    (
        "wrapped data key tampered",
        lambda a: setattr(a.request, "wrapped_data_key", flip(a.world.wrapped, 10)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WRAPPED_KEY_INVALID",
    ),
    (
        "wrapped data key truncated",
        lambda a: setattr(a.request, "wrapped_data_key", a.world.wrapped[:-8]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WRAPPED_KEY_INVALID",
    ),
    (
        "ephemeral RSA key too small",
        lambda a: setattr(
            a.request,
            "ephemeral_public_key",
            der(rsa.generate_private_key(65537, 1024).public_key()),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EPHEMERAL_KEY_UNSUPPORTED",
    ),
    (
        "ephemeral key is EC",
        lambda a: setattr(
            a.request,
            "ephemeral_public_key",
            der(ec.generate_private_key(ec.SECP384R1()).public_key()),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EPHEMERAL_KEY_UNSUPPORTED",
    ),
    (
        "no OAEP mechanism accepted",
        lambda a: a.request.ClearField("accepted_mechanisms"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "OAEP_MECHANISM_INVALID",
    ),
    (
        "AES key wrap offered as OAEP",
        lambda a: setattr_list(a.request, [pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "OAEP_MECHANISM_INVALID",
    ),
    (
        "only OAEP-SHA-256 accepted, HSM lacks it",
        lambda a: setattr_list(a.request, [pb.WRAP_MECHANISM_RSA_OAEP_SHA256]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "OAEP_MECHANISM_UNSUPPORTED",
    ),
    (
        "wrong key version",
        lambda a: setattr(a.request, "key_version", a.world.version + 5),
        grpc.StatusCode.NOT_FOUND,
        "KEY_VERSION_NOT_FOUND",
    ),
    (
        "invalid key id",
        lambda a: setattr(a.request, "key_id", "Bad Key!"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "KEY_ID_INVALID",
    ),
]


def setattr_list(request: pb.ReleaseKeyRequest, mechanisms: list[int]) -> None:
    del request.accepted_mechanisms[:]
    request.accepted_mechanisms.extend(mechanisms)  # type: ignore[arg-type]


#: Cases that pass every check before the HSM, which then refuses the re-wrap.
REFUSED_BY_THE_HSM = {"wrapped data key tampered"}


@pytest.mark.parametrize(("name", "mutate", "code", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_release_is_refused_audited_and_releases_nothing(
    world: World, name: str, mutate: Callable[[Attempt], None], code: grpc.StatusCode, reason: str
) -> None:
    attempt = new_attempt(world)
    mutate(attempt)
    before = len(audit_records(world))
    with pytest.raises(grpc.RpcError) as info:
        world.broker.ReleaseKey(attempt.request, timeout=30)
    err = info.value
    assert (err.code(), err.details().split(":")[0]) == (code, reason), err.details()  # type: ignore[attr-defined]
    assert ("strongroom-reason", reason) in tuple(err.trailing_metadata())  # type: ignore[attr-defined]
    assert "Traceback" not in err.details()  # type: ignore[attr-defined]
    records = audit_records(world)[before:]
    # One decision, whose last record is the refusal. Only the HSM can tell that a wrapped key was
    # tampered with, and it re-wraps once the decision's ALLOWED record is being made durable: the
    # refusal follows that record, under the same decision_id.
    expected = ["allowed", "denied"] if name in REFUSED_BY_THE_HSM else ["denied"]
    assert [r["decision"] for r in records] == expected
    assert len({r["decision_id"] for r in records}) == 1
    assert records[-1]["reason"] == reason
    assert records[-1]["caller"]["spiffe_id"] == world.stack.spiffe_id("inference")


RELEASE_KEY = "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey"


def _raw_release(world: World, identity: WorkloadIdentity, body: bytes) -> grpc.RpcError:
    """ReleaseKey with ``body`` sent as it is (bytes the client's own serialiser would refuse)."""
    call = world.stack.channel(identity, "keybroker").unary_unary(
        RELEASE_KEY,
        request_serializer=None,
        response_deserializer=pb.ReleaseKeyResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(body, timeout=30)
    return info.value


def test_an_undecodable_release_request_is_audited(world: World) -> None:
    """A request gRPC cannot deserialise (here a key_id, a proto3 string, that is not UTF-8) was
    refused MALFORMED_REQUEST by the runtime before the servicer ran, so never audited: an
    inference identity could send any number of release attempts the audit log never saw."""
    body = new_attempt(world).request.SerializeToString() + b"\x0a\x02\xff\xfe"
    before = len(audit_records(world))
    err = _raw_release(world, world.inference_id, body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert err.details().startswith("MALFORMED_REQUEST")  # type: ignore[attr-defined]
    added = audit_records(world)[before:]
    assert [(r["decision"], r["reason"]) for r in added] == [("denied", "MALFORMED_REQUEST")]
    assert added[0]["caller"]["spiffe_id"] == world.stack.spiffe_id("inference")
    assert added[0]["key"]["id"] is None  # nothing the broker did not read


def test_a_release_by_an_identity_without_the_inference_role_is_audited(world: World) -> None:
    """Refused by the authoriser before the servicer ran: it was only logged."""
    body = new_attempt(world).request.SerializeToString()
    before = len(audit_records(world))
    err = _raw_release(world, world.stack.identity("publisher"), body)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    added = audit_records(world)[before:]
    assert [(r["decision"], r["reason"]) for r in added] == [("denied", "PEER_NOT_ALLOWED")]
    assert added[0]["caller"]["spiffe_id"] == world.stack.spiffe_id("publisher")


@pytest.mark.parametrize("gave_up", ["DEADLINE_EXCEEDED", "CANCELLED"])
def test_a_release_whose_caller_gave_up_before_sending_its_request_is_audited_as_it_did(
    world: World, gave_up: str
) -> None:
    """A ReleaseKey whose request never came was audited DENIED with CANCELLED however its
    caller gave up: its client ends the call at its deadline as it would cancel it, and the
    runtime read any end as a cancellation. The broker now audits DEADLINE_EXCEEDED when its
    caller's deadline ended it (the one rule, strongroom.runtime.gave_up), CANCELLED when the
    caller cancelled it well before."""
    channel = world.stack.channel(world.inference_id, "keybroker")
    # The channel's TLS handshake, made before the call's deadline starts.
    pb_grpc.KeyBrokerServiceStub(channel).GetChallenge(
        pb.GetChallengeRequest(key_id=KEY), timeout=30
    )
    sent = threading.Event()

    def never_sent() -> Iterator[bytes]:
        sent.wait(60)
        return
        yield b""

    call = channel.stream_unary(RELEASE_KEY, None, None)
    before = len(audit_records(world))
    try:
        if gave_up == "DEADLINE_EXCEEDED":
            with pytest.raises(grpc.RpcError) as info:
                call(never_sent(), timeout=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        else:
            future = call.future(never_sent(), timeout=600)
            shares = world.stack.services["keybroker"].handle.host.shares
            caller = world.stack.spiffe_id("inference")
            # The broker's handler holds its worker while it waits for the request.
            assert wait_until(lambda: shares.held_now(caller) == 1)
            assert future.cancel()
        for _ in range(1500):  # the broker hears of the end, then audits it
            added = [r for r in audit_records(world)[before:] if r["action"] == "key_release"]
            if added:
                break
            time.sleep(0.02)
    finally:
        sent.set()
    assert [(r["decision"], r["reason"]) for r in added] == [("denied", gave_up)]
    assert added[0]["caller"]["spiffe_id"] == world.stack.spiffe_id("inference")


def _sized_release(world: World, size: int) -> bytes:
    """A genuine release request, padded with an unknown field (which protobuf keeps unread) to
    exactly ``size`` bytes."""
    body = new_attempt(world).request.SerializeToString()
    pad = size - len(body) - 1 - 3  # the field's one-byte tag and three-byte length
    padded = append_bytes_field(body, 15, bytes(pad))
    assert len(padded) == size
    return padded


def test_a_release_over_the_message_limit_is_refused_for_it_and_audited_so(world: World) -> None:
    """gRPC refused a ReleaseKey over the broker's 256 KiB limit itself: the caller learnt
    RESOURCE_EXHAUSTED with no reason, and the broker, which saw the call end before its request
    was read, audited it DENIED CANCELLED. It is refused by the runtime now, MESSAGE_TOO_LARGE
    naming the limit, and audited so, naming the caller and nothing of the request."""
    body = _sized_release(world, MESSAGE_LIMITS.receive + 1)
    before = len(audit_records(world))
    err: Any = _raw_release(world, world.inference_id, body)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.trailing_metadata() or ())[REASON_TRAILER] == "MESSAGE_TOO_LARGE"
    assert f"larger than the limit of {MESSAGE_LIMITS.receive} bytes" in err.details()
    added = audit_records(world)[before:]
    assert [(r["decision"], r["reason"]) for r in added] == [("denied", "MESSAGE_TOO_LARGE")]
    assert added[0]["caller"]["spiffe_id"] == world.stack.spiffe_id("inference")
    assert added[0]["key"]["id"] is None


def test_a_release_exactly_at_the_message_limit_is_granted(world: World) -> None:
    call = world.stack.channel(world.inference_id, "keybroker").unary_unary(
        RELEASE_KEY,
        request_serializer=None,
        response_deserializer=pb.ReleaseKeyResponse.FromString,
    )
    before = len(audit_records(world))
    response = call(_sized_release(world, MESSAGE_LIMITS.receive), timeout=30)
    added = audit_records(world)[before:]
    assert [(r["decision"], r["decision_id"]) for r in added] == [("allowed", response.decision_id)]


def test_a_flood_of_releases_over_the_message_limit_is_audited_within_the_budget(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> None:
    """Releases refused MESSAGE_TOO_LARGE are refused before their request is read, so within
    the caller's budget of such refusals: 64 records one by one, then the first past it, the
    rest counted (the log still accounts for every one)."""
    root = stack_root(tmp_path_factory, "oversize-audit", simulated_tee_dir)
    sent = REFUSAL_BURST + 16
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        # Its budgets do not refill while the test runs.
        broker = dev.start_in_process("keybroker", build_args={"monotonic": lambda: 1000.0})
        release = dev.channel(dev.identity("inference"), "keybroker").unary_unary(
            RELEASE_KEY,
            request_serializer=None,
            response_deserializer=pb.ReleaseKeyResponse.FromString,
        )
        body = append_bytes_field(b"", 15, bytes(MESSAGE_LIMITS.receive))
        for _ in range(sent):
            with pytest.raises(grpc.RpcError) as info:
                release(body, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        broker.handle.close()
        records = read_audit_records(dev.root / "state" / "keybroker" / "audit.log")
    one_by_one = [r for r in records if r["reason"] == "MESSAGE_TOO_LARGE"]
    counted = [r for r in records if r["reason"] == "REFUSALS_COUNTED"]
    assert len(one_by_one) == REFUSAL_BURST + 1  # the budget, then the first past it
    assert len(one_by_one) + sum(r["claims"]["refusals_unrecorded"] for r in counted) == sent


def test_releases_past_the_configured_grant_budget_are_refused_over_the_wire(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> None:
    """``keybroker.release_budget_*`` reaches the broker's engine: with one grant per certificate,
    a genuine caller's second release is refused RESOURCE_EXHAUSTED RELEASES_RATE_LIMITED over
    mTLS, with a message and no trace, and recorded DENIED with nothing released after it."""
    root = stack_root(tmp_path_factory, "grant-budget", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        section = {
            **dev.default_section("keybroker"),
            "release_budget_certificate_burst": 1,
            "release_budget_certificate_rate": 0.001,
        }
        # Its budgets do not refill while the test runs.
        dev.start_in_process("keybroker", section, build_args={"monotonic": lambda: 1000.0})
        world = make_world(dev)
        granted = world.broker.ReleaseKey(new_attempt(world).request, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            world.broker.ReleaseKey(new_attempt(world).request, timeout=30)
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert ("strongroom-reason", "RELEASES_RATE_LIMITED") in tuple(
            error.trailing_metadata()  # type: ignore[attr-defined]
        )
        details = error.details()  # type: ignore[attr-defined]
        assert "to this certificate; retry later" in details and "Traceback" not in details
        records = audit_records(world)
    assert [(r["decision"], r["reason"]) for r in records[-2:]] == [
        ("allowed", "RELEASED"),
        ("denied", "RELEASES_RATE_LIMITED"),
    ]
    assert records[-2]["decision_id"] == granted.decision_id


@pytest.fixture(scope="module")
def narrow_world(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[World]:
    """A broker of its own with 4 workers (1 reserved for key administration, 3 for the data
    plane, 2 unary calls per identity) whose HSM operations may wait a minute, so that a test can
    hold them for as long as it needs."""
    root = stack_root(tmp_path_factory, "narrow", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        section = {**dev.default_section("keybroker"), "hsm_operation_timeout_seconds": 60}
        server = {"max_workers": 4, "max_unary_calls_per_identity": 2}
        dev.start_in_process("keybroker", section, server=server)
        yield make_world(dev)


def test_a_release_refused_for_too_many_calls_at_once_is_audited(narrow_world: World) -> None:
    """Releases held at the HSM (its one worker busy with an operation of the test's) hold the
    inference identity's unary slots; its next release is refused at once with
    TOO_MANY_UNARY_CALLS_PER_IDENTITY and audited like every refused release, then the held ones
    complete."""
    world = narrow_world
    broker = world.stack.services["keybroker"].handle
    caller = world.stack.spiffe_id("inference")
    slots = broker.host.unary  # 2 per identity (the narrow broker's setting)
    attempts = [new_attempt(world) for _ in range(3)]
    gate = threading.Event()
    hold = broker.hsm.submit(lambda _session: gate.wait(60), timeout=60, name="test hold")
    try:
        assert wait_until(lambda: hold.started)
        held = [world.broker.ReleaseKey.future(a.request, timeout=60) for a in attempts[:2]]
        assert wait_until(lambda: slots.running(caller) == 2)
        before = len(audit_records(world))
        with pytest.raises(grpc.RpcError) as info:
            world.broker.ReleaseKey(attempts[2].request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert ("strongroom-reason", "TOO_MANY_UNARY_CALLS_PER_IDENTITY") in tuple(
            info.value.trailing_metadata()  # type: ignore[attr-defined]
        )
        refused = [
            r
            for r in audit_records(world)[before:]
            if r["reason"] == "TOO_MANY_UNARY_CALLS_PER_IDENTITY"
        ]
        assert [(r["decision"], r["caller"]["spiffe_id"]) for r in refused] == [("denied", caller)]
        assert refused[0]["key"]["id"] is None  # refused before the request was read
    finally:
        gate.set()
    assert all(f.result(timeout=60).wrapped_data_key for f in held)
    assert slots.running(caller) == 0


def test_a_release_refused_past_the_callers_bound_across_kinds_is_audited(
    narrow_world: World,
) -> None:
    """A health Watch of the inference identity whose message has not come holds a data-plane
    worker in that identity's bound across kinds (2 here), outside its unary cap, beside a
    release held at the HSM: its next release, within its unary cap, is refused at once with
    TOO_MANY_WORKERS_PER_IDENTITY and audited like every refused release."""
    world = narrow_world
    broker = world.stack.services["keybroker"].handle
    caller = world.stack.spiffe_id("inference")
    shares = broker.host.shares
    assert shares.per_identity == 2
    attempts = [new_attempt(world) for _ in range(2)]
    gate, silent = threading.Event(), threading.Event()

    def never() -> Iterator[bytes]:  # the call's headers go; its message never does
        silent.wait(60)
        yield from ()

    channel = world.stack.channel(world.inference_id, "keybroker")
    hold = broker.hsm.submit(lambda _session: gate.wait(60), timeout=60, name="test hold")
    try:
        assert wait_until(lambda: hold.started)
        held = world.broker.ReleaseKey.future(attempts[0].request, timeout=60)
        assert wait_until(lambda: broker.host.unary.running(caller) == 1)
        watch = channel.stream_stream("/grpc.health.v1.Health/Watch", bytes, bytes)
        stalled = watch(never(), timeout=60)
        assert wait_until(lambda: shares.held_now(caller) == 2)
        before = len(audit_records(world))
        with pytest.raises(grpc.RpcError) as info:
            world.broker.ReleaseKey(attempts[1].request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert ("strongroom-reason", "TOO_MANY_WORKERS_PER_IDENTITY") in tuple(
            info.value.trailing_metadata()  # type: ignore[attr-defined]
        )
        assert "server.max_data_plane_workers_per_identity" in info.value.details()  # type: ignore[attr-defined]
        refused = [
            r
            for r in audit_records(world)[before:]
            if r["reason"] == "TOO_MANY_WORKERS_PER_IDENTITY"
        ]
        assert [(r["decision"], r["caller"]["spiffe_id"]) for r in refused] == [("denied", caller)]
    finally:
        silent.set()
        gate.set()
    with pytest.raises(grpc.RpcError):
        next(stalled)  # it ended without a message
    channel.close()
    assert held.result(timeout=60).wrapped_data_key
    assert wait_until(lambda: shares.held_now() == 0)


def test_a_release_refused_for_a_busy_data_plane_is_audited(narrow_world: World) -> None:
    """A publisher's data keys and one release, all held at the HSM, hold every data-plane worker
    (the fourth is key administration's): the inference identity's next release, within its own
    cap, is refused at once with DATA_PLANE_WORKERS_BUSY and audited like every refused release;
    the held calls then complete and give their workers back."""
    world = narrow_world
    broker = world.stack.services["keybroker"].handle
    caller = world.stack.spiffe_id("inference")
    shares = broker.host.shares
    assert shares.data_plane == 3
    assert shares.is_control_plane("/strongroom.api.keybroker.v1.KeyAdminService/DisableKey")
    assert not shares.is_control_plane("/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey")
    attempts = [new_attempt(world) for _ in range(2)]
    gate = threading.Event()
    hold = broker.hsm.submit(lambda _session: gate.wait(60), timeout=60, name="test hold")
    try:
        assert wait_until(lambda: hold.started)
        held: list[grpc.Future[Any]] = [
            world.publisher.GenerateDataKey.future(
                data_key_request(KEY, (f"busy/{i}", "1")), timeout=60
            )
            for i in range(2)
        ]
        held.append(world.broker.ReleaseKey.future(attempts[0].request, timeout=60))
        assert wait_until(lambda: shares.held_now() == 3)
        before = len(audit_records(world))
        with pytest.raises(grpc.RpcError) as info:
            world.broker.ReleaseKey(attempts[1].request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert ("strongroom-reason", "DATA_PLANE_WORKERS_BUSY") in tuple(
            info.value.trailing_metadata()  # type: ignore[attr-defined]
        )
        refused = [
            r for r in audit_records(world)[before:] if r["reason"] == "DATA_PLANE_WORKERS_BUSY"
        ]
        assert [(r["decision"], r["caller"]["spiffe_id"]) for r in refused] == [("denied", caller)]
        assert refused[0]["key"]["id"] is None  # refused before the request was read
    finally:
        gate.set()
    assert all(f.result(timeout=60).wrapped_data_key for f in held)
    assert wait_until(lambda: shares.held_now() == 0)


def test_callers_never_sending_a_health_request_leave_key_administration_its_reserve(
    narrow_world: World,
) -> None:
    """With every data-plane worker held (data keys and a release held at the HSM), identities
    without any role on the broker opened health Checks over mTLS and never sent the message:
    each had one wait outside the data plane, so they held the worker reserved for key
    administration and the admin's call queued behind them. A health request is awaited within
    the data plane now: such calls are refused at once and key administration is answered."""
    world = narrow_world
    broker = world.stack.services["keybroker"].handle
    shares = broker.host.shares
    gate, silent = threading.Event(), threading.Event()

    def never() -> Iterator[bytes]:  # the call's headers go; its message never does
        silent.wait(60)
        yield from ()

    check = "/grpc.health.v1.Health/Check"
    strangers = [
        world.stack.channel(world.stack.identity(name), "keybroker")
        for name in ("client", "stranger-1", "stranger-2")
    ]
    hold = broker.hsm.submit(lambda _session: gate.wait(60), timeout=60, name="test hold")
    try:
        assert wait_until(lambda: hold.started)
        held: list[grpc.Future[Any]] = [
            world.publisher.GenerateDataKey.future(
                data_key_request(KEY, (f"reserve/{i}", "1")), timeout=60
            )
            for i in range(2)
        ]
        held.append(world.broker.ReleaseKey.future(new_attempt(world).request, timeout=60))
        assert wait_until(lambda: shares.held_now() == 3)  # the data plane is full
        stalled = [
            c.stream_unary(check, bytes, bytes).future(never(), timeout=60) for c in strangers
        ]
        for call in stalled:
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert ("strongroom-reason", "DATA_PLANE_WORKERS_BUSY") in tuple(
                info.value.trailing_metadata()  # type: ignore[attr-defined]
            )
        policy = world.admin.GetReleasePolicy(pb.GetReleasePolicyRequest(key_id=KEY), timeout=30)
        assert policy.policy_document
    finally:
        silent.set()
        gate.set()
        for channel in strangers:
            channel.close()
    assert all(f.result(timeout=60).wrapped_data_key for f in held)
    assert wait_until(lambda: shares.held_now() == 0)


def wait_until(condition: Callable[[], bool]) -> bool:
    """Waits (bounded) for ``condition``, which the broker reaches on its own threads."""
    deadline = time.monotonic() + 30
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_key_without_policy_releases_nothing(world: World) -> None:
    world.admin.CreateKey(pb.CreateKeyRequest(key_id="no-policy"), timeout=30)
    attempt = new_attempt(world, key_id="no-policy")
    before = len(audit_records(world))
    with pytest.raises(grpc.RpcError) as info:
        world.broker.ReleaseKey(attempt.request, timeout=30)
    # The answer any caller the key's policy does not admit gets (it must not learn which keys
    # have a policy); the audit record says why.
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert info.value.details().startswith("CALLER_NOT_ALLOWED")  # type: ignore[attr-defined]
    assert [(r["decision"], r["reason"]) for r in audit_records(world)[before:]] == [
        ("denied", "NO_RELEASE_POLICY")
    ]


def test_a_policy_file_that_is_not_utf8_gives_no_internal_errors(world: World) -> None:
    """A policy hand-edited in Latin-1: ReleaseKey answered INTERNAL, and so did ListKeys, for
    every key, since it names each key's policy version."""
    key_id = "latin1-policy"
    world.admin.CreateKey(pb.CreateKeyRequest(key_id=key_id), timeout=30)
    world.admin.SetReleasePolicy(
        pb.SetReleasePolicyRequest(
            key_id=key_id, policy_document=policy(world.stack, measurements=[GOOD])
        ),
        timeout=10,
    )
    path = world.stack.root / "state" / "keybroker" / "policies" / f"{key_id}.yaml"
    original = path.read_bytes()
    path.write_bytes(original + b'description: "caf\xe9"\n')
    try:
        before = len(audit_records(world))
        with pytest.raises(grpc.RpcError) as info:
            world.broker.ReleaseKey(new_attempt(world, key_id=key_id).request, timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert [r["reason"] for r in audit_records(world)[before:]] == ["POLICY_UNREADABLE"]
        listed = world.admin.ListKeys(pb.ListKeysRequest(), timeout=30)
        versions = {k.key_id: k.policy_version for k in listed.keys}
        assert (versions[key_id], versions[KEY]) == ("", "test-1")
    finally:
        path.write_bytes(original)


def test_simulated_evidence_needs_explicit_policy_opt_in(world: World) -> None:
    world.admin.CreateKey(pb.CreateKeyRequest(key_id="prod-only"), timeout=30)
    world.admin.SetReleasePolicy(
        pb.SetReleasePolicyRequest(
            key_id="prod-only",
            policy_document=policy(world.stack, measurements=[GOOD], allow_simulated=False),
        ),
        timeout=10,
    )
    generated = world.publisher.GenerateDataKey(data_key_request("prod-only"), timeout=10)
    attempt = new_attempt(world, key_id="prod-only")
    attempt.request.wrapped_data_key = generated.wrapped_data_key
    with pytest.raises(grpc.RpcError) as info:
        world.broker.ReleaseKey(attempt.request, timeout=30)
    assert info.value.details().startswith("SIMULATED_TEE_NOT_ALLOWED")  # type: ignore[attr-defined]


def test_a_version_another_broker_disabled_is_refused_and_audited(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disable made by another broker on the same HSM, which this broker's lookup cache has not
    seen, is caught by the still-enabled read the release's one C call makes before its unwrap
    (it was caught only by the read after the re-wrap, the data key unwrapped and re-wrapped in the
    HSM first): the token is asked for no unwrap, the caller gets FAILED_PRECONDITION KEY_DISABLED
    over gRPC, and the decision's ALLOWED record is followed by its DENIED KEY_DISABLED record
    under the same decision_id, as before."""
    broker = world.stack.services["keybroker"].handle
    monkeypatch.setattr(broker.keys, "_ttl", 3600.0)  # the cache outlives the test: no timing
    world.admin.CreateKey(pb.CreateKeyRequest(key_id="replicated"), timeout=30)
    world.admin.SetReleasePolicy(
        pb.SetReleasePolicyRequest(
            key_id="replicated", policy_document=policy(world.stack, measurements=[GOOD])
        ),
        timeout=10,
    )
    generated = world.publisher.GenerateDataKey(data_key_request("replicated"), timeout=10)

    def release() -> pb.ReleaseKeyResponse:
        attempt = new_attempt(world, key_id="replicated")
        attempt.request.wrapped_data_key = generated.wrapped_data_key
        attempt.request.key_version = generated.key_version
        return world.broker.ReleaseKey(attempt.request, timeout=30)

    with unwraps_counted(broker.hsm) as unwraps:
        release()  # its versions now cached, for an hour
    assert len(unwraps) == 1  # the count sees this broker's unwraps
    # The other broker: its own SoftHSM2 instance (a private copy of the module) on the token.
    module = tmp_path / "libsofthsm2-other.so"
    shutil.copyfile(broker.hsm.config.module_path, module)
    other = Hsm.open(dataclasses.replace(broker.hsm.config, module_path=module))
    try:
        KeyManager(other).disable_key("replicated", generated.key_version)
    finally:
        other.close()
    assert broker.keys._cache["replicated"][2][0].enabled  # this broker has not seen it
    seen = len(audit_records(world))
    with unwraps_counted(broker.hsm) as unwraps, pytest.raises(grpc.RpcError) as info:
        release()
    assert unwraps == []
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    details = info.value.details() or ""  # type: ignore[attr-defined]
    assert details == f"KEY_DISABLED: key 'replicated' version {generated.key_version} is disabled"
    added = [r for r in audit_records(world)[seen:] if r["action"] == "key_release"]
    assert [(r["decision"], r["reason"]) for r in added] == [
        ("allowed", "RELEASED"),
        ("denied", "KEY_DISABLED"),
    ]
    assert added[0]["decision_id"] == added[1]["decision_id"]
    assert added[1]["key"] == {"id": "replicated", "version": generated.key_version}
    assert broker.keys.unusable_keys() == {}


def test_disabled_key_releases_nothing_and_rotation_keeps_old_versions(world: World) -> None:
    world.admin.CreateKey(pb.CreateKeyRequest(key_id="rotating"), timeout=30)
    world.admin.SetReleasePolicy(
        pb.SetReleasePolicyRequest(
            key_id="rotating", policy_document=policy(world.stack, measurements=[GOOD])
        ),
        timeout=10,
    )
    old = world.publisher.GenerateDataKey(data_key_request("rotating"), timeout=10)
    rotated = world.admin.RotateKey(pb.RotateKeyRequest(key_id="rotating"), timeout=30)
    assert rotated.key.current_version == old.key_version + 1
    # The old version still releases.
    attempt = new_attempt(world, key_id="rotating")
    attempt.request.wrapped_data_key = old.wrapped_data_key
    attempt.request.key_version = old.key_version
    response = world.broker.ReleaseKey(attempt.request, timeout=30)
    dek = attempt.private.decrypt(
        response.wrapped_data_key,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )
    assert bound(dek) == old.data_key
    # ReWrap moves it to the new version without exposing it.
    moved = world.publisher.ReWrap(
        pb.ReWrapRequest(
            key_id="rotating", key_version=old.key_version, wrapped_data_key=old.wrapped_data_key
        ),
        timeout=10,
    )
    assert moved.key_version == rotated.key.current_version
    # Disabled: refused.
    world.admin.DisableKey(
        pb.DisableKeyRequest(key_id="rotating", version=old.key_version), timeout=10
    )
    attempt = new_attempt(world, key_id="rotating")
    attempt.request.wrapped_data_key = old.wrapped_data_key
    attempt.request.key_version = old.key_version
    with pytest.raises(grpc.RpcError) as info:
        world.broker.ReleaseKey(attempt.request, timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert info.value.details().startswith("KEY_DISABLED")  # type: ignore[attr-defined]


def test_invalid_policy_is_rejected_and_old_one_kept(world: World) -> None:
    with pytest.raises(grpc.RpcError) as info:
        world.admin.SetReleasePolicy(
            pb.SetReleasePolicyRequest(
                key_id=KEY, policy_document="version: x\nallowed_spiffe_ids: []\n"
            ),
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    current = world.admin.GetReleasePolicy(pb.GetReleasePolicyRequest(key_id=KEY), timeout=10)
    assert current.policy_version == "test-1"


def test_each_release_uses_a_fresh_ephemeral_key(world: World) -> None:
    attester = SimulatedAttester(
        world.platform, TeeType.SEV_SNP, production=False, claims={"measurement": GOOD}
    )
    client = KeyReleaseClient(
        world.stack.channel(world.inference_id, "keybroker"),
        attester,
        world.inference_id.public_key_der,
        verifier=world.stack.release_verifier(),
    )
    keys = {client._take_key().public_key().public_numbers().n for _ in range(3)}
    assert len(keys) == 3
    first = client.release(KEY, world.version, world.wrapped)
    second = client.release(KEY, world.version, world.wrapped)
    assert bytes(first.dek) == bytes(second.dek)
    assert bound(first.dek) == world.data_key
    records = {r["decision_id"]: r for r in audit_records(world)}
    assert (
        records[first.decision_id]["evidence_sha256"]
        != records[second.decision_id]["evidence_sha256"]
    )


# ---------------------------------------------------------------------------- collateral, fuzz


def _refused(a: Attempt) -> tuple[grpc.StatusCode, str, int]:
    """Sends the attempt; returns (status, reason trailer, audit records added)."""
    before = len(audit_records(a.world))
    with pytest.raises(grpc.RpcError) as info:
        a.world.broker.ReleaseKey(a.request, timeout=30)
    err = info.value
    trailers: dict[str, Any] = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined,arg-type]
    return err.code(), trailers.get("strongroom-reason", ""), len(audit_records(a.world)) - before  # type: ignore[attr-defined]


def test_evidence_carried_crl_cannot_replace_the_brokers(world: World) -> None:
    """Collateral in the evidence is ignored: a CRL the attester sends changes nothing, and the
    broker's own (current) CRL is what judges the chain."""
    a = new_attempt(world)
    bogus = world.authority.crl("ark", [world.authority.ask.serial_number])
    a.request.evidence.collateral.add(kind=evidence_pb2.COLLATERAL_KIND_CRL, data=bogus)
    released = world.broker.ReleaseKey(a.request, timeout=30)
    assert released.wrapped_data_key


def test_withheld_crl_fails_closed_and_is_audited(world: World) -> None:
    """With the ARK CRL gone from the broker's cache the release is refused, audited, with
    COLLATERAL_MISSING (readers reload the cache within its reload interval)."""
    import time

    crl_dir = world.stack.root / "collateral" / "crl"
    moved = []
    for path in crl_dir.glob("*-vcek.der"):
        target = path.with_name(path.name + ".withheld")
        path.rename(target)
        moved.append((target, path))
    generation = world.stack.root / "collateral" / "generation"
    generation.write_text(f"withheld {time.time_ns()}\n")
    try:
        deadline = time.monotonic() + 10
        while True:
            code, reason, added = _refused_or_none(new_attempt(world))
            if reason or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert (code, reason, added) == (grpc.StatusCode.UNAVAILABLE, "COLLATERAL_MISSING", 1)
        last = audit_records(world)[-1]
        assert last["decision"] == "denied" and last["reason"] == "COLLATERAL_MISSING"
    finally:
        for target, path in moved:
            target.rename(path)
        generation.write_text(f"restored {time.time_ns()}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # bounded: the cache reloads within 2 s
        try:
            world.broker.ReleaseKey(new_attempt(world).request, timeout=30)
            break
        except grpc.RpcError:
            time.sleep(0.5)
    else:
        pytest.fail("release did not recover after the CRL came back")


def _refused_or_none(a: Attempt) -> tuple[grpc.StatusCode | None, str, int]:
    before = len(audit_records(a.world))
    try:
        a.world.broker.ReleaseKey(a.request, timeout=30)
    except grpc.RpcError as err:
        trailers: dict[str, Any] = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined,arg-type]
        return (
            err.code(),
            trailers.get("strongroom-reason", ""),
            len(audit_records(a.world)) - before,
        )  # type: ignore[attr-defined]
    return None, "", len(audit_records(a.world)) - before


# 40 examples stay within the caller's 64 records per reason: each refusal is recorded.
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_mutated_evidence_gets_a_typed_refusal_and_one_audit_record(
    world: World, data: st.DataObject
) -> None:
    a = new_attempt(world)
    report = bytearray(a.request.evidence.report)
    cert = bytearray(world.platform.certificate_der)
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from(["report", "cert", "truncate", "junk-cert"]))
        if target == "report" and report:
            # the signed part and the signature (bytes past 0x330 are reserved, unsigned)
            report[data.draw(st.integers(0, min(len(report), 0x330) - 1))] ^= data.draw(
                st.integers(1, 255)
            )
        elif target == "cert":
            cert[data.draw(st.integers(0, len(cert) - 1))] ^= data.draw(st.integers(1, 255))
        elif target == "truncate" and report:
            report = report[: data.draw(st.integers(0, len(report) - 1))]
        elif target == "junk-cert":
            cert = bytearray(data.draw(st.binary(min_size=1, max_size=300)))
    # Mutations may cancel out (the same bit flipped twice): only changed evidence is a case.
    assume(
        bytes(report) != a.request.evidence.report or bytes(cert) != world.platform.certificate_der
    )
    a.set_report(bytes(report), [bytes(cert)])
    code, reason, added = _refused(a)
    assert code != grpc.StatusCode.INTERNAL and reason and reason != "INTERNAL"
    assert added == 1


def test_refusals_counted_past_a_budget_are_recorded_when_the_broker_stops(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> None:
    """A caller without the role refused 70 times: 64 records one by one, one counting record,
    and 5 only counted, which no later refusal of its carries. Stopping the broker records them."""
    root = stack_root(tmp_path_factory, "counted", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        broker = dev.start_in_process("keybroker").handle
        release = dev.channel(dev.identity("publisher"), "keybroker").unary_unary(
            RELEASE_KEY,
            request_serializer=None,
            response_deserializer=pb.ReleaseKeyResponse.FromString,
        )
        for _ in range(64 + 1 + 5):
            with pytest.raises(grpc.RpcError):
                release(b"", timeout=30)
        broker.close()
        audit_path = dev.root / "state" / "keybroker" / "audit.log"
        records = read_audit_records(audit_path)
    refused = [r for r in records if r["caller"]["spiffe_id"] == dev.spiffe_id("publisher")]
    assert [r["reason"] for r in refused] == ["PEER_NOT_ALLOWED"] * 65 + ["REFUSALS_COUNTED"]
    assert refused[-1]["claims"] == {"refusals_unrecorded": 5, "counted_reason": "PEER_NOT_ALLOWED"}


def test_callers_without_a_role_share_one_budget_of_audited_refusals(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> None:
    """The broker's budget of releases refused unread was per SPIFFE ID, while the runtime's
    limits count every caller without a role as one: each identity no rule names (a holder of
    a provisioner mints as many as it likes) had 64 records at once and one a second of its
    own. They share one budget now, the runtime's bucket, told to the broker with the refusal;
    a caller with another role (the publisher) keeps its own, and the log accounts for every
    refusal, the shared count naming the bucket (claims.refusals_bucket) and no caller."""
    root = stack_root(tmp_path_factory, "roleless-audit", simulated_tee_dir)
    strangers, each = 3, 40  # 120 together, past the one budget; each within a budget of its own
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        # Its budgets do not refill while the test runs.
        broker = dev.start_in_process("keybroker", build_args={"monotonic": lambda: 1000.0})
        callers = [dev.foreign_identity(dev.spiffe_id(f"nobody-{i}")) for i in range(strangers)]
        for identity in [*callers, dev.identity("publisher")]:
            release = dev.channel(identity, "keybroker").unary_unary(
                RELEASE_KEY,
                request_serializer=None,
                response_deserializer=pb.ReleaseKeyResponse.FromString,
            )
            for _ in range(each):
                with pytest.raises(grpc.RpcError) as info:
                    release(b"", timeout=30)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        broker.handle.close()
        audit_path = dev.root / "state" / "keybroker" / "audit.log"
        records = [json.loads(line) for line in audit_path.read_text().splitlines()]
        publisher = dev.spiffe_id("publisher")
    refused = [r for r in records if r["reason"] in ("PEER_NOT_ALLOWED", "REFUSALS_COUNTED")]
    own = [r for r in refused if r["caller"]["spiffe_id"] == publisher]
    assert [(r["reason"], r["claims"]) for r in own] == [("PEER_NOT_ALLOWED", {})] * each
    shared = [r for r in refused if r["caller"]["spiffe_id"] != publisher]
    assert {r["claims"]["refusals_bucket"] for r in shared} == {ROLELESS}
    one_by_one = [r for r in shared if r["reason"] == "PEER_NOT_ALLOWED"]
    # Before: all 120, each identity's 40 within its own 64.
    assert len(one_by_one) == REFUSAL_BURST + 1  # the budget, then the first past it
    # In turn: the second identity had what the first left, the third nothing of its own.
    assert [r["caller"]["spiffe_id"] for r in one_by_one] == [dev.spiffe_id("nobody-0")] * each + [
        dev.spiffe_id("nobody-1")
    ] * (REFUSAL_BURST + 1 - each)
    counted = sum(r["claims"].get("refusals_unrecorded", 0) for r in shared)
    assert len(one_by_one) + counted == strangers * each
    assert (shared[-1]["reason"], shared[-1]["caller"]["spiffe_id"]) == ("REFUSALS_COUNTED", None)


def test_a_flood_of_refused_releases_logs_a_bounded_number_of_lines_and_audits_every_one(
    step_ca_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_tee_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """Two certificates our CA issued, one of a workload without the inference role and one no
    rule names, each send 100 releases: each refused call wrote three lines (the authoriser's
    denial, the broker's, the error mapping's), 600 lines a slow log pipe then held the workers
    on. Each caller now has REFUSED_CALLS_BURST calls logged and the rest counted in the summary;
    the audit log, which no log budget touches, still accounts for all 200."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    handler = configure_logging(LoggingConfig(format="json"), "keybroker", clock=lambda: 0.0)
    root = stack_root(tmp_path_factory, "log-budget", simulated_tee_dir)
    flood = 100
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        broker = dev.start_in_process("keybroker").handle
        callers = {
            dev.spiffe_id("publisher"): dev.identity("publisher"),
            dev.spiffe_id("nobody"): dev.foreign_identity(dev.spiffe_id("nobody")),
        }
        for identity in callers.values():
            release = dev.channel(identity, "keybroker").unary_unary(
                RELEASE_KEY,
                request_serializer=None,
                response_deserializer=pb.ReleaseKeyResponse.FromString,
            )
            for _ in range(flood):
                with pytest.raises(grpc.RpcError):
                    release(b"", timeout=30)
        broker.close()  # writes the audit counts still held
        handler.close()  # writes the log's summary
        records = read_audit_records(dev.root / "state" / "keybroker" / "audit.log")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    counted: dict[str, int] = {}
    for summary in (r for r in lines if r["msg"] == "refused calls not logged"):
        for caller, _reason, calls in summary["by_caller_and_reason"]:
            counted[caller] = counted.get(caller, 0) + calls
    for spiffe_id in callers:
        # The role-less caller's lines and counts are its bucket's, which names no caller.
        roleless = spiffe_id == dev.spiffe_id("nobody")
        denied = [r for r in lines if r["msg"].startswith("denied RPC") and spiffe_id in r["msg"]]
        assert len(denied) == REFUSED_CALLS_BURST
        assert counted[ROLELESS if roleless else spiffe_id] == flood - REFUSED_CALLS_BURST
        audited = [
            r
            for r in records
            if r["caller"]["spiffe_id"] == spiffe_id
            or (roleless and r["claims"].get("refusals_bucket") == ROLELESS)
        ]
        one_by_one = [r for r in audited if r["reason"] == "PEER_NOT_ALLOWED"]
        by_count = sum(r["claims"].get("refusals_unrecorded", 0) for r in audited)
        assert len(one_by_one) + by_count == flood
    refusal_lines = {"rpc failed", "key release denied"}
    assert len([r for r in lines if r["msg"] in refusal_lines]) == 2 * 2 * REFUSED_CALLS_BURST


def test_refused_releases_of_a_caller_with_the_role_are_recorded_up_to_a_budget_per_reason(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> None:
    """A caller holding the inference role got an fsync'd record for every refused release whose
    request was read (stale nonce, bad signature, ...): one compromised replica could grow the
    log to ``audit_max_bytes``, after which every decision is refused AUDIT_LOG_FULL. Now each
    caller has 64 records per reason, then 1 a second, then counts; every refusal is still
    answered with its own status and reason. The broker's own failures, and ALLOWED releases, are
    recorded one by one whatever the budget."""
    now = [1000.0]  # the broker's refusal budgets refill by this clock, not by the test's pace
    root = stack_root(tmp_path_factory, "release-budget", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        broker = dev.start_in_process(
            "keybroker",
            roles={"inference": ["inference-b"]},
            build_args={"monotonic": lambda: now[0]},
        ).handle
        world = make_world(dev)
        other_id = dev.identity("inference-b")
        other = pb_grpc.KeyBrokerServiceStub(dev.channel(other_id, "keybroker"))
        inference = dev.spiffe_id("inference")
        past = datetime.now(UTC).timestamp() - 3600

        def refused(
            stub: pb_grpc.KeyBrokerServiceStub, request: pb.ReleaseKeyRequest
        ) -> tuple[str, str]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ReleaseKey(request, timeout=30)
            trailers: dict[str, Any] = dict(info.value.trailing_metadata() or ())  # type: ignore[attr-defined,arg-type]
            return info.value.code().name, trailers["strongroom-reason"]  # type: ignore[attr-defined]

        def stale(caller: str) -> pb.ReleaseKeyRequest:
            a = new_attempt(world)
            a.request.nonce = nonce_from(world, caller=caller, clock=lambda: past)
            return a.request

        stale_request = stale(inference)
        answers = {refused(world.broker, stale_request) for _ in range(64 + 1 + 5)}
        now[0] += 60.0  # refilled: 60 more one by one; the broker's pass writes the 5 counted
        broker.record_counted_refusals()
        answers |= {refused(world.broker, stale_request) for _ in range(60 + 3)}
        assert answers == {("FAILED_PRECONDITION", "NONCE_EXPIRED")}  # never the budget's
        # Another reason of the same caller, and another caller with the role, have their own.
        forged = new_attempt(world)
        forged.set_report(flip(forged.request.evidence.report, 0x2A0 + 5))
        assert refused(world.broker, forged.request) == (
            "PERMISSION_DENIED",
            "REPORT_SIGNATURE_INVALID",
        )
        other_stale = stale(dev.spiffe_id("inference-b"))
        for _ in range(3):
            assert refused(other, other_stale) == ("FAILED_PRECONDITION", "NONCE_EXPIRED")
        # A policy the broker cannot read is its own failure: recorded every time.
        policy_file = dev.root / "state" / "keybroker" / "policies" / f"{KEY}.yaml"
        document = policy_file.read_bytes()
        policy_file.write_bytes(document + b'description: "caf\xe9"\n')
        for _ in range(64 + 2):
            a = new_attempt(world)
            assert refused(world.broker, a.request) == ("PERMISSION_DENIED", "CALLER_NOT_ALLOWED")
        policy_file.write_bytes(document)
        allowed = world.broker.ReleaseKey(new_attempt(world).request, timeout=30)
        broker.close()  # writes the counts still held
        records = audit_records(world)
    releases = [r for r in records if r["action"] == "key_release"]
    mine = [
        (r["reason"], r["claims"].get("refusals_unrecorded"), r["claims"].get("counted_reason"))
        for r in releases
        if r["caller"]["spiffe_id"] == inference and r["decision"] == "denied"
    ]
    stale_records = [m for m in mine if "NONCE_EXPIRED" in (m[0], m[2])]
    assert stale_records == (
        [("NONCE_EXPIRED", None, None)] * 64
        + [("NONCE_EXPIRED", 0, None)]  # the first past the budget: a counting record
        + [("REFUSALS_COUNTED", 5, "NONCE_EXPIRED")]  # the broker's pass
        + [("NONCE_EXPIRED", None, None)] * 60
        + [("REFUSALS_COUNTED", 3, "NONCE_EXPIRED")]  # at close
    )
    assert ("REPORT_SIGNATURE_INVALID", None, None) in mine
    assert [m for m in mine if m[0] == "POLICY_UNREADABLE"] == [
        ("POLICY_UNREADABLE", None, None)
    ] * (64 + 2)
    assert [
        r["reason"] for r in releases if r["caller"]["spiffe_id"] == dev.spiffe_id("inference-b")
    ] == ["NONCE_EXPIRED"] * 3
    [last] = [r for r in releases if r["decision_id"] == allowed.decision_id]
    assert (last["decision"], last["reason"]) == ("allowed", "RELEASED")
    # The stale records name the caller and what it sent, as every record of a refusal does.
    first = next(r for r in releases if r["reason"] == "NONCE_EXPIRED")
    assert first["key"]["id"] == KEY and first["evidence_sha256"]
