"""The release-signing keys an inference server trusts, and what it makes of an answer's signature.

(The exchange itself, over real mTLS against a real broker and an impersonating one, is
tests/e2e/test_release_signature.py's.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.attestation.release_signature import (
    ReleaseSigner,
    ReleaseStatement,
    ReleaseVerifier,
    load_public_keys,
    load_signing_key,
    signing_key_id,
)
from strongroom.errors import StrongroomError
from tests.certs import self_signed_pem

STATEMENT = ReleaseStatement(
    nonce=b"n" * 89,
    ephemeral_public_key_der=b"spki",
    key_id="models-kek",
    key_version=3,
    request_wrapped_key=b"slot",
    mechanism=2,
    released_wrapped_key=b"wrapped",
    decision_id="d" * 32,
    policy_version="p1",
)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_each_field_is_length_prefixed_under_its_own_label() -> None:
    message = STATEMENT.message()
    assert message.startswith(b"strongroom/keybroker/release-response/v1\x00")
    # Moving a byte from one field to the next changes the message (no ambiguous boundary).
    shifted = ReleaseStatement(
        **{**vars(STATEMENT), "key_id": "models-ke", "policy_version": "tp1"}
    )
    assert shifted.message() != message


def test_a_bundle_of_keys_and_certificates_is_read_whole(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    bundle = tmp_path / "keys.pem"
    bundle.write_bytes(_pem(old) + self_signed_pem(new, "release-signing"))
    verifier = ReleaseVerifier.from_files([bundle])
    assert verifier.key_ids == (
        signing_key_id(old.public_key()),
        signing_key_id(new.public_key()),
    )
    for key in (old, new):
        signed = ReleaseSigner(key).sign(STATEMENT)
        assert verifier.verify(STATEMENT, signed.signature, signed.key_id)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a key",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
)
def test_anything_but_ed25519_public_keys_is_refused(pem: bytes) -> None:
    with pytest.raises(StrongroomError) as info:
        load_public_keys(pem, source="keys.pem")
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert "keys.pem" in info.value.message


def test_a_missing_file_and_an_empty_list_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StrongroomError) as info:
        ReleaseVerifier.from_files([tmp_path / "absent.pem"])
    assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    with pytest.raises(StrongroomError) as info:
        ReleaseVerifier([])
    assert info.value.reason == "RELEASE_SIGNING_KEY_MISSING"


def test_the_signing_key_is_ed25519_only() -> None:
    key = Ed25519PrivateKey.generate()
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert signing_key_id(load_signing_key(pkcs8).public_key()) == signing_key_id(key.public_key())
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for raw in (other, b"short", b""):
        with pytest.raises(StrongroomError) as info:
            load_signing_key(raw)
        assert info.value.reason == "RELEASE_SIGNING_KEY_INVALID"
    assert "key_id=" in repr(ReleaseSigner(key)) and "PRIVATE" not in repr(ReleaseSigner(key))


def test_unsigned_answers_pass_only_when_allowed() -> None:
    key = Ed25519PrivateKey.generate()
    strict = ReleaseVerifier([key.public_key()])
    with pytest.raises(StrongroomError) as info:
        strict.verify(STATEMENT, b"", b"")
    assert (info.value.reason, info.value.status_name) == ("RELEASE_UNSIGNED", "UNAUTHENTICATED")
    assert ReleaseVerifier([], allow_unsigned=True).verify(STATEMENT, b"", b"") is False
    # Allowed unsigned or not, a signature that is there is judged.
    lenient = ReleaseVerifier([key.public_key()], allow_unsigned=True)
    signed = ReleaseSigner(key).sign(STATEMENT)
    with pytest.raises(StrongroomError) as info:
        lenient.verify(STATEMENT, signed.signature[:-1], signed.key_id)
    assert info.value.reason == "RELEASE_SIGNATURE_INVALID"


def test_a_statement_differing_in_any_field_fails() -> None:
    key = Ed25519PrivateKey.generate()
    signed = ReleaseSigner(key).sign(STATEMENT)
    verifier = ReleaseVerifier([key.public_key()])
    for name, value in vars(STATEMENT).items():
        changed = (value + 1) if isinstance(value, int) else value + value[:1]
        altered = ReleaseStatement(**{**vars(STATEMENT), name: changed})
        with pytest.raises(StrongroomError) as info:
            verifier.verify(altered, signed.signature, signed.key_id)
        assert info.value.reason == "RELEASE_SIGNATURE_INVALID", name
