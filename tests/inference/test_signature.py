"""OpenSSF model signatures: signed at publish (model-signing), verified in memory at load."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from strongroom.client.signing import sign_model, signed_digest
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.inference.signature import BUNDLE_MEDIA_TYPE, SignatureInvalid, SignaturePolicy
from tests.keybroker.helpers import ec_spki_on_an_unsupported_curve

MODEL = b"\x08\x07" + b"onnx model bytes " * 4096


def keypair(tmp_path: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, bytes]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    path = tmp_path / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


@pytest.fixture
def signed(tmp_path: Path) -> tuple[bytes, bytes]:
    private, public = keypair(tmp_path, "signer")
    model = tmp_path / "model.onnx"
    model.write_bytes(MODEL)
    return sign_model(model, private), public


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_signing_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    """The publisher's signing key was used whatever its mode; the services refuse secret files
    group or others may read, and whoever reads this key signs models as the publisher."""
    private, _ = keypair(tmp_path, "signer")
    private.chmod(mode)
    model = tmp_path / "model.onnx"
    model.write_bytes(MODEL)
    with pytest.raises(FailedPrecondition) as info:
        sign_model(model, private)
    assert info.value.reason == "SECRET_FILE_PERMISSIONS"
    assert f"mode {mode:o}" in info.value.message and "0600" in info.value.message


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["P-256", "P-384"])
def test_a_signed_model_verifies_in_memory(tmp_path: Path, curve: ec.EllipticCurve) -> None:
    private, public = keypair(tmp_path, "k", curve)
    model = tmp_path / "model.onnx"
    model.write_bytes(MODEL)
    bundle = sign_model(model, private)
    SignaturePolicy.from_pem(public).check(bundle, BUNDLE_MEDIA_TYPE, MODEL)
    SignaturePolicy.from_pem(public).check(bundle, BUNDLE_MEDIA_TYPE, bytearray(MODEL))


def test_other_plaintext_is_refused(signed: tuple[bytes, bytes]) -> None:
    bundle, public = signed
    with pytest.raises(SignatureInvalid, match="digests differ"):
        SignaturePolicy.from_pem(public).check(bundle, BUNDLE_MEDIA_TYPE, MODEL + b"\0")


def test_another_key_is_refused(signed: tuple[bytes, bytes], tmp_path: Path) -> None:
    bundle, _ = signed
    _, other = keypair(tmp_path, "other")
    with pytest.raises(SignatureInvalid, match="does not verify"):
        SignaturePolicy.from_pem(other).check(bundle, BUNDLE_MEDIA_TYPE, MODEL)


def _edit(bundle: bytes, change: str) -> bytes:
    document = json.loads(bundle)
    envelope = document["dsseEnvelope"]
    if change == "payload":
        statement = json.loads(base64.b64decode(envelope["payload"]))
        statement["predicate"]["resources"][0]["digest"] = "00" * 32
        envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    elif change == "signature":
        sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        sig[-1] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    elif change == "payload_type":
        envelope["payloadType"] = "application/json"
    elif change == "two_signatures":
        envelope["signatures"].append(envelope["signatures"][0])
    return json.dumps(document).encode()


@pytest.mark.parametrize("change", ["payload", "signature", "payload_type", "two_signatures"])
def test_tampered_bundle_is_refused(signed: tuple[bytes, bytes], change: str) -> None:
    bundle, public = signed
    with pytest.raises(SignatureInvalid):
        SignaturePolicy.from_pem(public).check(_edit(bundle, change), BUNDLE_MEDIA_TYPE, MODEL)


@pytest.mark.parametrize(
    "bundle",
    [
        b"not json",
        b"{}",
        b'{"dsseEnvelope": {"payload": "!!"}}',
        # Within the header's 32 KiB bundle limit, nested past json's recursion limit: it raised
        # RecursionError (not a ValueError), an untyped error instead of a refused signature.
        b"[" * 16_000 + b"]" * 16_000,
    ],
)
def test_malformed_bundle_is_refused(signed: tuple[bytes, bytes], bundle: bytes) -> None:
    with pytest.raises(SignatureInvalid, match="malformed"):
        SignaturePolicy.from_pem(signed[1]).check(bundle, BUNDLE_MEDIA_TYPE, MODEL)


def test_the_publisher_reads_the_digest_its_bundle_signs(signed: tuple[bytes, bytes]) -> None:
    """What publish_model holds the bytes it encrypts to (a file changed after signing)."""
    assert signed_digest(signed[0]) == hashlib.sha256(MODEL).digest()


@pytest.mark.parametrize(
    "bundle", [b"not json", b"{}", b'{"dsseEnvelope": {"payload": "!!"}}', b"[" * 16_000]
)
def test_a_bundle_naming_no_one_sha256_digest_is_refused_to_the_publisher(bundle: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        signed_digest(bundle)
    assert info.value.reason == "SIGNING_FAILED"


@pytest.mark.parametrize(
    "change",
    [
        "algorithm",
        "digest",
        "two_files",
        # The publisher's own parser accepted these, which every server refuses: it stored a
        # bundle no server would load (one rule now, strongroom.model_statement).
        "uppercase_digest",
        "statement_type",
        "predicate_type",
        "serialization_method",
        "serialization_hash",
        "payload_type",
    ],
)
def test_a_statement_the_servers_would_refuse_is_refused_to_the_publisher(
    signed: tuple[bytes, bytes], change: str
) -> None:
    document = json.loads(signed[0])
    envelope = document["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    resources = statement["predicate"]["resources"]
    serialization_ = statement["predicate"]["serialization"]
    if change == "algorithm":
        resources[0]["algorithm"] = "sha512"
    elif change == "digest":
        resources[0]["digest"] = resources[0]["digest"][:-2]
    elif change == "two_files":
        resources.append(resources[0])
    elif change == "uppercase_digest":
        resources[0]["digest"] = resources[0]["digest"].upper()
    elif change == "statement_type":
        statement["_type"] = "https://in-toto.io/Statement/v0.1"
    elif change == "predicate_type":
        statement["predicateType"] = "https://model_signing/signature/v0.2"
    elif change == "serialization_method":
        serialization_["method"] = "shards"
    elif change == "serialization_hash":
        serialization_["hash_type"] = "blake2"
    else:
        envelope["payloadType"] = "application/json"
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    bundle = json.dumps(document).encode()
    with pytest.raises(InvalidArgument) as info:
        signed_digest(bundle)
    assert info.value.reason == "SIGNING_FAILED"
    # The servers refuse it too (before their signature check or after: either way, refused).
    with pytest.raises(SignatureInvalid):
        SignaturePolicy.from_pem(signed[1]).check(bundle, BUNDLE_MEDIA_TYPE, MODEL)


def test_unknown_bundle_type_is_refused(signed: tuple[bytes, bytes]) -> None:
    with pytest.raises(SignatureInvalid, match="unsupported"):
        SignaturePolicy.from_pem(signed[1]).check(signed[0], "application/pgp-signature", MODEL)


def test_unsigned_model_when_required_and_when_optional(signed: tuple[bytes, bytes]) -> None:
    with pytest.raises(FailedPrecondition) as info:
        SignaturePolicy.from_pem(signed[1]).check(b"", "", MODEL)
    assert info.value.reason == "MODEL_SIGNATURE_MISSING"
    SignaturePolicy.from_pem(signed[1], required=False).check(b"", "", MODEL)


def test_only_ec_public_keys_are_accepted() -> None:
    rsa_pem = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # An EC key on a curve cryptography cannot load raises UnsupportedAlgorithm, not ValueError.
    unknown_curve = base64.encodebytes(ec_spki_on_an_unsupported_curve())
    unknown_curve_pem = (
        b"-----BEGIN PUBLIC KEY-----\n" + unknown_curve + b"-----END PUBLIC KEY-----\n"
    )
    for pem in (rsa_pem, b"garbage", unknown_curve_pem):
        with pytest.raises(InvalidArgument) as info:
            SignaturePolicy.from_pem(pem)
        assert info.value.reason == "SIGNING_KEY_INVALID"


def _signed_statement(private: Path, statement: object) -> bytes:
    """A DSSE bundle over ``statement``, validly signed by ``private`` (what only the trusted
    signer can make: the checks after the signature must hold against it too)."""
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    payload_type = "application/vnd.in-toto+json"
    payload = json.dumps(statement).encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)
    sig = key.sign(pae, ec.ECDSA(hashes.SHA256()))
    envelope = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": payload_type,
        "signatures": [{"sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps({"dsseEnvelope": envelope}).encode()


@pytest.mark.parametrize(
    "predicate",
    ["a string", ["a", "list"], {"serialization": "files"}, {"serialization": 7}],
    ids=["predicate-string", "predicate-list", "serialization-string", "serialization-number"],
)
def test_a_signed_statement_of_the_wrong_shape_is_refused_not_crashed(
    tmp_path: Path, predicate: object
) -> None:
    """A statement the trusted key signed whose predicate (or its serialization) is not an object
    raised AttributeError, which stopped the background loader of configured models."""
    private, public = keypair(tmp_path, "signer")
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": predicate,
    }
    bundle = _signed_statement(private, statement)
    with pytest.raises(SignatureInvalid, match="does not describe one SHA-256-hashed model file"):
        SignaturePolicy.from_pem(public).check(bundle, BUNDLE_MEDIA_TYPE, MODEL)
