"""What the key-release client and the publisher accept from the broker: only complete,
well-formed answers.

The broker peer here is a real gRPC server whose servicer answers each release (or data-key
generation) as the test says: what a broker with a bug, or a man in the middle holding a broker
certificate, could send. The key in a release answer is genuinely wrapped (RSA-OAEP) to the
ephemeral key of the request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact.manifest import ManifestLayout
from strongroom.attestation.release_signature import ReleaseVerifier
from strongroom.attesters import EvidenceBundle, TeeType
from strongroom.client import keyrelease
from strongroom.client.keyrelease import EPHEMERAL_KEY_BITS, KeyReleaseClient
from strongroom.client.multipart import PartFile, publish_parts
from strongroom.client.publish import publish_model
from strongroom.errors import DataLoss
from strongroom.reasons import Reason
from tests.inference.fake_tee import fake_snp_report

#: This broker peer signs nothing: what is judged here is everything but the signature (a signed
#: answer is tests/e2e/test_release_signature.py's).
UNSIGNED_OK = ReleaseVerifier([], allow_unsigned=True)
Answer = Callable[[pb.ReleaseKeyRequest], pb.ReleaseKeyResponse]
WRAPPED = bytes(40)  # what the artifact's slot would carry; this broker never unwraps it
#: The TLS key the report binds (this broker checks no binding).
TLS_KEY = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
)


class FakeTee:
    """The TEE hardware (the one stand-in the suite allows): a report that binds REPORT_DATA."""

    @property
    def tee_type(self) -> TeeType:
        return TeeType.SEV_SNP

    def attest(self, report_data: bytes) -> EvidenceBundle:
        return EvidenceBundle(TeeType.SEV_SNP, fake_snp_report(report_data), source="fake")


class AnsweringBroker(pb_grpc.KeyBrokerServiceServicer):
    """A broker peer whose ReleaseKey answer is whatever ``answer`` makes of the request, and
    whose GenerateDataKey answer is ``generated``."""

    def __init__(self) -> None:
        self.answer: Answer = lambda request: answer_with(request, os.urandom(32))
        self.generated = pb.GenerateDataKeyResponse()

    def GetChallenge(
        self, request: pb.GetChallengeRequest, context: grpc.ServicerContext
    ) -> pb.GetChallengeResponse:
        return pb.GetChallengeResponse(nonce=os.urandom(32))

    def ReleaseKey(
        self, request: pb.ReleaseKeyRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseKeyResponse:
        return self.answer(request)

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        return self.generated


def answer_with(
    request: pb.ReleaseKeyRequest,
    key: bytes,
    *,
    decision_id: str = "0123456789abcdef0123456789abcdef",
    policy_version: str = "v1",
) -> pb.ReleaseKeyResponse:
    """``key`` wrapped with RSA-OAEP-SHA-256 to the request's ephemeral key, as a broker does."""
    public = serialization.load_der_public_key(request.ephemeral_public_key)
    assert isinstance(public, rsa.RSAPublicKey)
    wrapped = public.encrypt(
        key,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    return pb.ReleaseKeyResponse(
        wrapped_data_key=wrapped,
        mechanism=pb.WRAP_MECHANISM_RSA_OAEP_SHA256,
        decision_id=decision_id,
        policy_version=policy_version,
    )


class EmptyStore(store_grpc.ModelStoreServiceServicer):
    """A model store holding nothing, which a multi-part publish asks before its data key; any
    other call is UNIMPLEMENTED."""

    def StatModel(
        self, request: store_pb.StatModelRequest, context: grpc.ServicerContext
    ) -> store_pb.StatModelResponse:
        context.abort(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND: nothing is stored")


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[AnsweringBroker, str]]:
    """The answering broker, and an empty store at the same address."""
    servicer = AnsweringBroker()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_KeyBrokerServiceServicer_to_server(servicer, server)
    store_grpc.add_ModelStoreServiceServicer_to_server(EmptyStore(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def release(broker: tuple[AnsweringBroker, str]) -> Iterator[Callable[[Answer], object]]:
    servicer, address = broker
    channel = grpc.insecure_channel(address)
    client = KeyReleaseClient(
        channel, FakeTee(), lambda: TLS_KEY, verifier=UNSIGNED_OK, broker=address
    )

    def run(answer: Answer) -> object:
        servicer.answer = answer
        return client.release("models-kek", 1, WRAPPED)

    yield run
    client._keygen.shutdown(wait=True, cancel_futures=True)
    channel.close()


def test_a_well_formed_answer_gives_the_key(release: Callable[[Answer], object]) -> None:
    key = os.urandom(32)
    released = release(lambda request: answer_with(request, key))
    assert released.dek == key  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_released_key_that_is_not_32_bytes_is_refused(
    release: Callable[[Answer], object],
    broker: tuple[AnsweringBroker, str],
    caplog: pytest.LogCaptureFixture,
    size: int,
) -> None:
    # A 16-byte key reached the body-key derivation, which refused it as INVALID_ARGUMENT
    # DATA_KEY_INVALID: LoadModel's caller was blamed for the broker's answer. It was then
    # refused with no line above INFO: a broken or hostile broker is an ERROR, once, naming the
    # broker peer and nothing of the key.
    key = os.urandom(size)
    with (
        caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"),
        pytest.raises(DataLoss) as info,
    ):
        release(lambda request: answer_with(request, key))
    assert info.value.reason == Reason.RELEASED_KEY_INVALID
    assert f"{size} bytes" in info.value.message
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.reason == Reason.RELEASED_KEY_INVALID  # type: ignore[attr-defined]
    assert record.peer == broker[1]  # type: ignore[attr-defined]
    assert record.model is None  # type: ignore[attr-defined]  # no load named one here
    if key:
        assert key.hex() not in repr(vars(record)) and repr(key)[2:-1] not in repr(vars(record))


def test_a_key_that_does_not_decrypt_is_refused_and_logged_once(
    release: Callable[[Answer], object], caplog: pytest.LogCaptureFixture
) -> None:
    """Wrapped to another key than our ephemeral one: RELEASED_KEY_INVALID, one ERROR line."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()

    def elsewhere(request: pb.ReleaseKeyRequest) -> pb.ReleaseKeyResponse:
        answer = answer_with(request, os.urandom(32))
        answer.wrapped_data_key = other.encrypt(
            os.urandom(32),
            padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
        )
        return answer

    with (
        caplog.at_level(logging.ERROR, logger="strongroom.client.keyrelease"),
        pytest.raises(DataLoss) as info,
    ):
        release(elsewhere)
    assert info.value.reason == Reason.RELEASED_KEY_INVALID
    assert [(r.levelno, r.reason) for r in caplog.records] == [  # type: ignore[attr-defined]
        (logging.ERROR, Reason.RELEASED_KEY_INVALID)
    ]


def test_the_policy_version_bound_is_the_policy_schemas() -> None:
    # The release client keeps its own copy of the number rather than import the policy schema.
    from strongroom.attestation.policy import MAX_POLICY_VERSION_LENGTH
    from strongroom.client.keyrelease import MAX_POLICY_VERSION_LENGTH as RELEASE_BOUND

    assert RELEASE_BOUND == MAX_POLICY_VERSION_LENGTH


@pytest.mark.parametrize(
    ("decision_id", "policy_version"),
    [
        ("", "v1"),
        ("d" * 65, "v1"),
        ("0123\nFORGED log line", "v1"),
        ("décision", "v1"),
        ("0123456789abcdef", ""),
        ("0123456789abcdef", "v" * 257),
        ("0123456789abcdef", "v1\x1b[2J"),
    ],
    ids=["no-id", "long-id", "newline-id", "non-ascii-id", "no-policy", "long-policy", "escape"],
)
def test_an_answer_whose_decision_or_policy_is_malformed_is_refused(
    release: Callable[[Answer], object], decision_id: str, policy_version: str
) -> None:
    # They reached the log line of the release, LoadModel's answer and the caller's terminal as
    # they came: a broker's decision ids are its audit log's ([A-Za-z0-9._-]{1,64}), and its
    # policy versions the policy schema's (1-256 printable characters).
    with pytest.raises(DataLoss) as info:
        release(
            lambda request: answer_with(
                request, os.urandom(32), decision_id=decision_id, policy_version=policy_version
            )
        )
    assert info.value.reason == Reason.RELEASE_ANSWER_MALFORMED
    assert "\n" not in info.value.message and "\x1b" not in info.value.message


class RecordingKey:
    """A real ephemeral RSA key that keeps each plaintext its decryption returned, to look at."""

    def __init__(self) -> None:
        self.inner = rsa.generate_private_key(public_exponent=65537, key_size=EPHEMERAL_KEY_BITS)
        self.outputs: list[bytes] = []

    def public_key(self) -> rsa.RSAPublicKey:
        return self.inner.public_key()

    def decrypt(self, ciphertext: bytes, scheme: padding.AsymmetricPadding) -> bytes:
        plaintext = self.inner.decrypt(ciphertext, scheme)
        self.outputs.append(plaintext)
        return plaintext


def test_no_intact_copy_of_the_released_key_is_left_behind(
    broker: tuple[AnsweringBroker, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key was copied out of cryptography's bytes object into the bytearray the loader wipes,
    # and the bytes object went back to the allocator with the data key in it.
    made: list[RecordingKey] = []

    def new_key() -> RecordingKey:
        made.append(RecordingKey())
        return made[-1]

    monkeypatch.setattr(keyrelease, "_new_ephemeral_key", new_key)
    servicer, address = broker
    key = os.urandom(32)
    servicer.answer = lambda request: answer_with(request, key)
    with grpc.insecure_channel(address) as channel:
        client = KeyReleaseClient(
            channel, FakeTee(), lambda: TLS_KEY, verifier=UNSIGNED_OK, broker=address
        )
        try:
            released = client.release("models-kek", 1, WRAPPED)
        finally:
            client._keygen.shutdown(wait=True, cancel_futures=True)
    assert released.dek == key
    outputs = [plaintext for made_key in made for plaintext in made_key.outputs]
    assert len(outputs) == 1
    assert outputs[0] == bytes(32)


# -- the publisher: GenerateDataKey's answer -------------------------------------------------


def _generated(**changes: object) -> pb.GenerateDataKeyResponse:
    fields: dict[str, object] = {
        "data_key": os.urandom(32),
        "wrapped_data_key": os.urandom(40),
        "key_version": 3,
        "mechanism": pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD,
    }
    fields.update(changes)
    return pb.GenerateDataKeyResponse(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "answer",
    [
        _generated(data_key=os.urandom(16)),
        _generated(data_key=b""),
        _generated(wrapped_data_key=b""),
        _generated(wrapped_data_key=os.urandom(48)),
        _generated(key_version=0),
        _generated(key_version=2**31),
    ],
    ids=[
        "short-key",
        "no-key",
        "no-wrapped-key",
        "wrapped-key-of-another-size",
        "no-kek-version",
        "kek-version-no-broker-numbers",
    ],
)
@pytest.mark.parametrize("multipart", [False, True], ids=["one-file", "parts"])
def test_a_publish_refuses_a_generated_key_no_broker_sends(
    broker: tuple[AnsweringBroker, str],
    tmp_path: Path,
    answer: pb.GenerateDataKeyResponse,
    multipart: bool,
) -> None:
    # They failed as the publisher's invalid argument (INVALID_DEK_SIZE, INVALID_WRAPPED_DEK,
    # INVALID_KEY_VERSION), or, for a wrapped key of another size, went on to publish a model
    # that no server can load. Nothing is uploaded: a single file's store channel leads nowhere,
    # and the parts' store (asked first whether the version is free) implements nothing else.
    servicer, address = broker
    servicer.generated = answer
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(1000))
    with (
        grpc.insecure_channel(address) as channel,
        grpc.insecure_channel("127.0.0.1:9") as nowhere,
        pytest.raises(DataLoss) as info,
    ):
        if multipart:
            publish_parts(
                [PartFile("model.onnx", model, "application/vnd.onnx")],
                name="acme/odd",
                version="1",
                key_id="models-kek",
                broker=channel,
                store=channel,
                layout=ManifestLayout.FILES,
            )
        else:
            publish_model(
                model,
                name="acme/odd",
                version="1",
                key_id="models-kek",
                broker=channel,
                store=nowhere,
            )
    assert info.value.reason == Reason.GENERATED_KEY_INVALID
