"""The broker's release answer is signed over its request, and only a signed one is used.

Before, a peer holding a certificate with the broker's SPIFFE ID (mis-issued or stolen) could
answer an inference server's release with a data key of its own choosing wrapped to the server's
ephemeral key. Here such a peer is a real gRPC server over real mTLS with a broker certificate
from the stack's CA, placed between the release client and the real broker (real SoftHSM2): it
forwards each exchange (so it holds genuine, signed answers) and alters what it sends back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.attestation.release_signature import (
    ReleaseSigner,
    ReleaseStatement,
    ReleaseVerifier,
    load_signing_key,
)
from strongroom.attesters import SimulatedAttester, TeeType
from strongroom.client.keyrelease import KeyReleaseClient, PinnedChannels
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.dev.devstack.model import train
from strongroom.errors import FailedPrecondition, StrongroomError
from strongroom.inference.config import InferenceConfig
from strongroom.inference.loader import ModelLoader
from strongroom.inference.models import ModelRepository
from strongroom.inference.server import build as build_inference
from strongroom.inference.server import release_verifier
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.pki import WorkloadIdentity
from strongroom.pki.identity import RenewalPolicy
from strongroom.runtime.config import CommonConfig, load_service_config
from tests.certs import self_signed_pem
from tests.e2e.publishing import publish
from tests.e2e.test_key_release import GOOD, KEY, World, make_world
from tests.keybroker.helpers import MODEL, bound

#: What the peer sends back: an answer, or bytes that are none (sent as they are).
Tamper = Callable[[pb.ReleaseKeyRequest, pb.ReleaseKeyResponse], pb.ReleaseKeyResponse | bytes]


class ImpersonatingBroker:
    """A peer with a broker certificate: forwards each exchange to the real broker, then sends
    back what ``tamper`` makes of the genuine answer (and records the answers it saw)."""

    def __init__(self, upstream: pb_grpc.KeyBrokerServiceStub) -> None:
        self.upstream = upstream
        self.tamper: Tamper = lambda request, response: response
        self.seen: list[pb.ReleaseKeyResponse] = []

    def GetChallenge(
        self, request: pb.GetChallengeRequest, context: grpc.ServicerContext
    ) -> pb.GetChallengeResponse:
        return self.upstream.GetChallenge(request, timeout=10)  # type: ignore[no-any-return]

    def ReleaseKey(
        self, request: pb.ReleaseKeyRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseKeyResponse | bytes:
        genuine: pb.ReleaseKeyResponse = self.upstream.ReleaseKey(request, timeout=30)
        self.seen.append(genuine)
        return self.tamper(request, genuine)

    def add_to(self, server: grpc.Server) -> None:
        """Serves its two calls on ``server``; an answer ``tamper`` made bytes of goes out as
        those bytes (what a peer that is no broker at all could send)."""

        def serialize(answer: pb.ReleaseKeyResponse | bytes) -> bytes:
            return answer if isinstance(answer, bytes) else answer.SerializeToString()

        handlers = {
            "GetChallenge": grpc.unary_unary_rpc_method_handler(
                self.GetChallenge,
                request_deserializer=pb.GetChallengeRequest.FromString,
                response_serializer=pb.GetChallengeResponse.SerializeToString,
            ),
            "ReleaseKey": grpc.unary_unary_rpc_method_handler(
                self.ReleaseKey,
                request_deserializer=pb.ReleaseKeyRequest.FromString,
                response_serializer=serialize,
            ),
        }
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    pb.DESCRIPTOR.services_by_name["KeyBrokerService"].full_name, handlers
                ),
            )
        )


@dataclasses.dataclass
class Peer:
    world: World
    servicer: ImpersonatingBroker
    client: KeyReleaseClient
    address: str
    attester: SimulatedAttester

    def release(self, tamper: Tamper) -> bytes:
        self.servicer.tamper = tamper
        released = self.client.release(KEY, self.world.version, self.world.wrapped)
        return bound(released.dek)

    def refused(self, tamper: Tamper) -> StrongroomError:
        with pytest.raises(StrongroomError) as info:
            self.release(tamper)
        return info.value


@pytest.fixture(scope="module")
def world(stack: DevStack) -> World:
    return make_world(stack)


@pytest.fixture(scope="module")
def peer(world: World) -> Iterator[Peer]:
    stack = world.stack
    ca = stack.start_ca()
    # A certificate with the broker's SPIFFE ID and names, from the broker fleet's own CA.
    broker_cert = WorkloadIdentity.enrol(
        ca.client(), stack.token("keybroker", ["keybroker", "localhost"]), policy=RenewalPolicy()
    )
    # The peer reaches the real broker over a channel presenting the release client's TLS key:
    # the evidence binds it, and the broker checks the connection it arrives on.
    servicer = ImpersonatingBroker(world.broker)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer.add_to(server)
    port = server.add_secure_port("127.0.0.1:0", broker_cert.server_credentials())
    server.start()
    channel = world.inference_id.channel(
        f"127.0.0.1:{port}", server_name="keybroker", server_id=stack.spiffe_id("keybroker")
    )
    attester = SimulatedAttester(
        world.platform, TeeType.SEV_SNP, production=False, claims={"measurement": GOOD}
    )
    client = KeyReleaseClient(
        channel, attester, world.inference_id.public_key_der, verifier=stack.release_verifier()
    )
    try:
        yield Peer(world, servicer, client, f"127.0.0.1:{port}", attester)
    finally:
        client._keygen.shutdown(wait=True, cancel_futures=True)
        channel.close()
        server.stop(None).wait(30)
        broker_cert.close()


def _wrap_to_request(request: pb.ReleaseKeyRequest, key: bytes) -> bytes:
    """``key`` wrapped as the broker would (RSA-OAEP-SHA-1: SoftHSM2's) to the request's key."""
    public = serialization.load_der_public_key(request.ephemeral_public_key)
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(
        key, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    )


def _statement(request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse) -> ReleaseStatement:
    return ReleaseStatement(
        nonce=request.nonce,
        ephemeral_public_key_der=request.ephemeral_public_key,
        key_id=request.key_id,
        key_version=request.key_version,
        request_wrapped_key=request.wrapped_data_key,
        mechanism=response.mechanism,
        released_wrapped_key=response.wrapped_data_key,
        decision_id=response.decision_id,
        policy_version=response.policy_version,
    )


def _swapped(
    request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
) -> pb.ReleaseKeyResponse:
    forged = pb.ReleaseKeyResponse()
    forged.CopyFrom(response)
    forged.wrapped_data_key = _wrap_to_request(request, os.urandom(32))
    return forged


def test_a_genuine_answer_passed_on_unchanged_verifies(peer: Peer) -> None:
    assert peer.release(lambda request, response: response) == peer.world.data_key
    answer = peer.servicer.seen[-1]
    assert len(answer.release_signature) == 64
    assert answer.release_signing_key_id in peer.world.stack.release_verifier().key_ids


def test_a_data_key_of_the_peers_choosing_is_refused(
    peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack: the peer's own key, wrapped to our ephemeral key, under the broker's signature."""
    with caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"):
        refused = peer.refused(_swapped)
    assert refused.reason == "RELEASE_SIGNATURE_INVALID"
    assert refused.status_name == "UNAUTHENTICATED"
    # The operator hears of it: an answer no broker made for this request.
    (record,) = [r for r in caplog.records if r.name == "strongroom.client.keyrelease"]
    assert record.levelno == logging.ERROR and "nothing decrypted" in record.getMessage()
    assert record.reason == "RELEASE_SIGNATURE_INVALID"  # type: ignore[attr-defined]


def _malformed_decision(
    request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
) -> pb.ReleaseKeyResponse:
    forged = _swapped(request, response)
    forged.decision_id = "0123\nFORGED log line"
    return forged


def _mechanism_not_offered(
    request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
) -> pb.ReleaseKeyResponse:
    forged = _swapped(request, response)
    forged.mechanism = pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD
    return forged


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda request, response: b"\xff\xff\xff not a release answer",
            "RELEASE_ANSWER_MALFORMED",
        ),
        (_malformed_decision, "RELEASE_ANSWER_MALFORMED"),
        (_mechanism_not_offered, "OAEP_MECHANISM_UNEXPECTED"),
    ],
    ids=["not-protobuf", "malformed-decision-id", "mechanism-not-offered"],
)
def test_an_answer_refused_before_its_signature_is_checked_is_logged_as_loudly(
    peer: Peer, caplog: pytest.LogCaptureFixture, tamper: Tamper, reason: str
) -> None:
    """An answer whose shape no broker sends was refused before the signature check, and
    without the ERROR line of a bad signature: it says as much (someone other than the broker
    answered, or a broken one), and now says it as loudly. Bytes that are no ReleaseKeyResponse
    at all were a gRPC INTERNAL error ("Exception deserializing response!"), passed on as the
    broker's refusal; they are the answer's fault now, with a reason."""
    with caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"):
        refused = peer.refused(tamper)
    assert (refused.status_name, refused.reason) == (
        "DATA_LOSS" if reason != "OAEP_MECHANISM_UNEXPECTED" else "FAILED_PRECONDITION",
        reason,
    )
    (record,) = [r for r in caplog.records if r.name == "strongroom.client.keyrelease"]
    assert record.levelno == logging.ERROR and "nothing decrypted" in record.getMessage()
    assert record.reason == reason  # type: ignore[attr-defined]


def test_an_answer_read_as_bytes_keeps_grpcs_receive_limit(
    peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer is read as bytes and parsed here (RELEASE_ANSWER_MALFORMED), but the channel's
    limits still come first: an answer past gRPC's receive limit (4 MiB) is refused by gRPC,
    RESOURCE_EXHAUSTED, before a byte of it is parsed or logged."""
    with (
        caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"),
        pytest.raises(grpc.RpcError) as info,
    ):
        peer.release(lambda request, response: bytes(5 * 1024 * 1024))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.name == "strongroom.client.keyrelease"]


def test_an_answer_re_signed_with_the_peers_own_key_is_refused(peer: Peer) -> None:
    own = ReleaseSigner(Ed25519PrivateKey.generate())

    def re_signed(
        request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
    ) -> pb.ReleaseKeyResponse:
        forged = _swapped(request, response)
        signed = own.sign(_statement(request, forged))
        forged.release_signature, forged.release_signing_key_id = signed.signature, signed.key_id
        return forged

    assert peer.refused(re_signed).reason == "RELEASE_SIGNING_KEY_UNKNOWN"

    def claiming_the_brokers_key(
        request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
    ) -> pb.ReleaseKeyResponse:
        forged = re_signed(request, response)
        forged.release_signing_key_id = response.release_signing_key_id
        return forged

    assert peer.refused(claiming_the_brokers_key).reason == "RELEASE_SIGNATURE_INVALID"


def test_a_model_load_over_a_forged_answer_fails_closed(
    peer: Peer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Through the inference service's loader: the load of a published model fails with the
    precise reason, and the model is not served; the same load over the genuine answer works."""
    world = peer.world
    trained = train(tmp_path_factory.mktemp("model") / "model.onnx").path
    publish(world.stack, trained, MODEL[0], KEY, version=MODEL[1])
    repository = ModelRepository()
    loader = ModelLoader(
        repository,
        store_channel=world.stack.channel(world.inference_id, "modelstore"),
        key_release=peer.client,
    )
    peer.servicer.tamper = _swapped
    with pytest.raises(StrongroomError) as info:
        loader.load(*MODEL)
    assert (info.value.status_name, info.value.reason) == (
        "UNAUTHENTICATED",
        "RELEASE_SIGNATURE_INVALID",
    )
    assert not repository.is_ready(*MODEL)
    peer.servicer.tamper = lambda request, response: response
    loader.load(*MODEL)
    assert repository.is_ready(*MODEL)


def test_a_signed_answer_whose_key_fails_its_checks_is_logged_at_error_naming_model_and_peer(
    peer: Peer, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that signs an answer whose data key is no data key (16 bytes, wrapped to our
    ephemeral key: a broken broker, or a hostile one holding the signing key) is refused
    ``DATA_LOSS RELEASED_KEY_INVALID``, and was said only in the INFO ``rpc failed`` line: it is
    now one ERROR line naming the model, the key and the broker peer, and nothing of the key."""
    world = peer.world
    model = (MODEL[0], "released-key-invalid")
    trained = train(tmp_path_factory.mktemp("model") / "model.onnx").path
    publish(world.stack, trained, model[0], KEY, version=model[1])
    brokers = ReleaseSigner(
        load_signing_key((world.stack.secrets_dir / "release-signing-key.pem").read_bytes())
    )
    short = os.urandom(16)

    def short_key(
        request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
    ) -> pb.ReleaseKeyResponse:
        forged = pb.ReleaseKeyResponse()
        forged.CopyFrom(response)
        forged.wrapped_data_key = _wrap_to_request(request, short)
        signed = brokers.sign(_statement(request, forged))
        forged.release_signature, forged.release_signing_key_id = signed.signature, signed.key_id
        return forged

    # As the inference server makes it: channels pinned per certificate, to the peer's address.
    channels = PinnedChannels(
        world.inference_id,
        peer.address,
        server_name="keybroker",
        server_id=world.stack.spiffe_id("keybroker"),
    )
    client = KeyReleaseClient(channels, peer.attester, verifier=world.stack.release_verifier())
    repository = ModelRepository()
    loader = ModelLoader(
        repository,
        store_channel=world.stack.channel(world.inference_id, "modelstore"),
        key_release=client,
    )
    peer.servicer.tamper = short_key
    try:
        with (
            caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"),
            pytest.raises(StrongroomError) as info,
        ):
            loader.load(*model)
    finally:
        peer.servicer.tamper = lambda request, response: response
        client._keygen.shutdown(wait=True, cancel_futures=True)
        channels.close()
    assert (info.value.status_name, info.value.reason) == ("DATA_LOSS", "RELEASED_KEY_INVALID")
    assert not repository.is_ready(*model)
    (record,) = [r for r in caplog.records if r.name == "strongroom.client.keyrelease"]
    assert record.levelno == logging.ERROR and "16 bytes" in record.getMessage()
    assert record.reason == "RELEASED_KEY_INVALID"  # type: ignore[attr-defined]
    assert (record.model, record.version) == model  # type: ignore[attr-defined]
    assert record.key_id == KEY  # type: ignore[attr-defined]
    assert record.peer == peer.address  # type: ignore[attr-defined]
    said = repr(vars(record))
    assert short.hex() not in said and repr(short)[2:-1] not in said


def test_a_genuine_answer_to_another_exchange_is_refused(peer: Peer) -> None:
    """Another nonce and ephemeral key: an old signed answer replayed does not verify."""
    peer.release(lambda request, response: response)
    earlier = peer.servicer.seen[-1]
    refused = peer.refused(lambda request, response: earlier)
    assert refused.reason == "RELEASE_SIGNATURE_INVALID"


def test_an_unsigned_answer_is_refused(peer: Peer) -> None:
    def unsigned(
        request: pb.ReleaseKeyRequest, response: pb.ReleaseKeyResponse
    ) -> pb.ReleaseKeyResponse:
        forged = _swapped(request, response)
        forged.ClearField("release_signature")
        forged.ClearField("release_signing_key_id")
        return forged

    refused = peer.refused(unsigned)
    assert refused.reason == "RELEASE_UNSIGNED"
    assert "not signed" in refused.message


def test_keys_being_rotated_verify_with_either(
    peer: Peer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A server trusting the next key and the current one still verifies the broker's answers."""
    directory = tmp_path_factory.mktemp("rotation")
    bundle = directory / "release-keys.pem"
    following = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bundle.write_bytes(following + peer.world.stack.release_public_key.read_bytes())
    verifier = ReleaseVerifier.from_files([bundle])
    assert len(verifier.key_ids) == 2
    peer.client._verifier = verifier
    try:
        assert peer.release(lambda request, response: response) == peer.world.data_key
    finally:
        peer.client._verifier = peer.world.stack.release_verifier()


def test_the_audit_record_names_the_key_that_signed_each_release(peer: Peer) -> None:
    """With several release-signing keys trusted at once (a rotation), the audit log did not say
    which key vouched for which release: the granted release's record names the key id the
    answer carries, and ``audit verify`` counts the releases per key."""
    assert peer.release(lambda request, response: response) == peer.world.data_key
    answer = peer.servicer.seen[-1]
    assert len(answer.release_signing_key_id) == 32
    records = read_audit_records(peer.world.audit_path)
    [record] = [r for r in records if r["decision_id"] == answer.decision_id]
    assert record["decision"] == "allowed"
    assert record["release_signing_key_id"] == answer.release_signing_key_id.hex()
    named = sum(
        r.get("release_signing_key_id") == record["release_signing_key_id"] for r in records
    )
    verdict = verify_audit_log(peer.world.audit_path)
    assert verdict.intact
    assert dict(verdict.release_signing_keys)[record["release_signing_key_id"]] == named


def _certified_broker_key(
    stack: DevStack, directory: Path, not_before: dt.datetime, not_after: dt.datetime
) -> Path:
    """The broker's own release-signing key, given to inference as a certificate with these
    dates (what the chart publishes, or `openssl req -x509` makes: deploy/README.md)."""
    key = load_signing_key((stack.secrets_dir / "release-signing-key.pem").read_bytes())
    path = directory / f"release-signing-{not_after:%Y%m%d%H%M%S}.crt.pem"
    path.write_bytes(
        self_signed_pem(key, "release-signing", not_before=not_before, not_after=not_after)
    )
    return path


def test_the_brokers_answer_is_refused_once_its_keys_certificate_has_expired(
    peer: Peer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate's dates were ignored (only its public key was read), so a retired or stolen
    release-signing key stayed trusted until every inference configuration was edited. The
    broker's genuine answer, signed with its real key, is refused (nothing decrypted, an ERROR
    line naming the key) once the certificate inference was given for that key has expired, and
    taken while it is valid."""
    now = dt.datetime.now(dt.UTC)
    expired = _certified_broker_key(
        peer.world.stack, tmp_path, now - dt.timedelta(days=30), now - dt.timedelta(minutes=1)
    )
    valid = _certified_broker_key(
        peer.world.stack, tmp_path, now - dt.timedelta(minutes=1), now + dt.timedelta(days=1)
    )
    try:
        peer.client._verifier = ReleaseVerifier.from_files([valid])
        assert peer.release(lambda request, response: response) == peer.world.data_key
        peer.client._verifier = ReleaseVerifier.from_files([expired])
        with caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"):
            refused = peer.refused(lambda request, response: response)
    finally:
        peer.client._verifier = peer.world.stack.release_verifier()
    assert (refused.status_name, refused.reason) == (
        "UNAUTHENTICATED",
        "RELEASE_SIGNING_KEY_EXPIRED",
    )
    assert expired.name in refused.message and "expired at" in refused.message
    (record,) = [r for r in caplog.records if r.name == "strongroom.client.keyrelease"]
    assert record.levelno == logging.ERROR and "nothing decrypted" in record.getMessage()
    assert record.reason == "RELEASE_SIGNING_KEY_EXPIRED"  # type: ignore[attr-defined]


def test_an_inference_server_warns_at_start_of_keys_expired_or_ending_soon(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = dt.datetime.now(dt.UTC)
    ending = _certified_broker_key(
        world.stack, tmp_path, now - dt.timedelta(days=1), now + dt.timedelta(days=5)
    )
    expired = _certified_broker_key(
        world.stack, tmp_path, now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    )
    lasting = _certified_broker_key(
        world.stack, tmp_path, now - dt.timedelta(days=1), now + dt.timedelta(days=400)
    )
    logger = "strongroom.attestation.release_signature"

    def notes_at_start(*files: Path) -> list[tuple[int, str]]:
        settings = {
            **world.stack.default_section("inference"),
            "release_signing_public_keys": [str(f) for f in files],
            "release_signing_key_warning_seconds": 7 * 86400,
        }
        common, config = load_service_config(
            world.stack.write_config("inference", settings), "inference", InferenceConfig
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=logger):
            verifier = release_verifier(common, config)
        assert len(verifier.key_ids) == 1  # one key, however many certificates
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger]

    # The key is judged as a verification judges it, by its longest-lived valid certificate:
    # with the lasting one listed, the others are superseded and nothing needs saying.
    assert notes_at_start(ending, expired, lasting) == []
    ((level, message),) = notes_at_start(ending, expired)
    assert level == logging.WARNING and ending.name in message and "expires at" in message
    notes = notes_at_start(expired)
    assert [level for level, _ in notes] == [logging.ERROR, logging.ERROR]
    assert expired.name in notes[0][1] and "expired at" in notes[0][1]
    assert "every key release will be refused" in notes[1][1]


def _inference_config(
    stack: DevStack, mode: str, **section: object
) -> tuple[CommonConfig, InferenceConfig]:
    """The stack's inference configuration, without its release-signing keys (an inference
    configuration written before them), with ``section`` on top, loaded in ``mode``."""
    settings = {**stack.default_section("inference"), **section}
    del settings["release_signing_public_keys"]
    path = stack.write_config("inference", settings)
    document = yaml.safe_load(path.read_text())
    document["identity"]["dns_names"] = ["inference"]  # production refuses loopback names
    path.write_text(yaml.safe_dump(document))
    return load_service_config(
        path, "inference", InferenceConfig, environ={"STRONGROOM__MODE": mode}
    )


@pytest.mark.parametrize(
    ("mode", "section", "reason", "says"),
    [
        (
            "production",
            {},
            "RELEASE_SIGNING_KEY_MISSING",
            "inference.release_signing_public_keys is not set",
        ),
        (
            "development",
            {},
            "RELEASE_SIGNING_KEY_MISSING",
            "inference.allow_unsigned_releases: true",
        ),
        (
            "production",
            {"allow_unsigned_releases": True},
            "UNSIGNED_RELEASES_IN_PRODUCTION",
            "inference.allow_unsigned_releases is set in production mode",
        ),
    ],
)
def test_an_inference_server_without_the_brokers_key_refuses_to_start(
    world: World, mode: str, section: dict[str, object], reason: str, says: str
) -> None:
    common, config = _inference_config(world.stack, mode, **section)
    with pytest.raises(FailedPrecondition) as info:
        build_inference(common, config, identity=world.inference_id)
    assert info.value.reason == reason
    assert says in info.value.message


def test_unsigned_answers_pass_only_where_a_development_configuration_says_so(peer: Peer) -> None:
    common, config = _inference_config(
        peer.world.stack, "development", allow_unsigned_releases=True
    )
    verifier = release_verifier(common, config)
    assert verifier.allow_unsigned and not verifier.key_ids
    peer.client._verifier = verifier
    try:
        released = peer.release(
            lambda request, response: pb.ReleaseKeyResponse(
                wrapped_data_key=response.wrapped_data_key,
                mechanism=response.mechanism,
                decision_id=response.decision_id,
                policy_version=response.policy_version,
            )
        )
        assert released == peer.world.data_key
    finally:
        peer.client._verifier = peer.world.stack.release_verifier()


def test_a_development_server_without_keys_takes_the_brokers_signed_answers(peer: Peer) -> None:
    """The startup error of a development server without keys offers
    inference.allow_unsigned_releases, whose documentation says a signed answer is verified
    "when keys are set"; but with none set every answer of a current broker (all signed) was
    refused RELEASE_SIGNING_KEY_UNKNOWN, so the advice left a server that loaded nothing. Without
    keys a development server now takes a signed answer as it takes an unsigned one (it could
    not verify either); with keys set, one they do not verify is still refused."""
    common, config = _inference_config(
        peer.world.stack, "development", allow_unsigned_releases=True
    )
    peer.client._verifier = release_verifier(common, config)
    try:
        assert peer.release(lambda request, response: response) == peer.world.data_key
    finally:
        peer.client._verifier = peer.world.stack.release_verifier()
    with_keys = ReleaseVerifier([Ed25519PrivateKey.generate().public_key()], allow_unsigned=True)
    peer.client._verifier = with_keys
    try:
        assert peer.refused(lambda request, response: response).reason == (
            "RELEASE_SIGNING_KEY_UNKNOWN"
        )
    finally:
        peer.client._verifier = peer.world.stack.release_verifier()
