"""Verifying an artifact's OpenSSF model signature against the decrypted plaintext, in memory.

``model-signing``'s own verifier reads the model from disk, which the plaintext must never touch;
this checks the same bundle without it: the DSSE signature (ECDSA over the DSSE pre-authentication
encoding, hash chosen by curve size as ``model-signing`` does) with the configured public key, then
that the signed in-toto statement describes exactly one file whose SHA-256 equals a digest
*recomputed* over the decrypted plaintext (never the artifact's own footer: whoever holds the data
key could pair any plaintext with a legitimately signed digest).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom import jsonparse
from strongroom.cryptoparse import KEY_PARSE_ERRORS
from strongroom.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from strongroom.model_statement import PAYLOAD_TYPE, signed_file_digest
from strongroom.reasons import Reason

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_HASHES: dict[int, hashes.HashAlgorithm] = {
    256: hashes.SHA256(),
    384: hashes.SHA384(),
    521: hashes.SHA512(),
}


class SignatureInvalid(PermissionDenied):
    """The model's signature does not verify, or does not describe this plaintext."""

    default_reason = Reason.MODEL_SIGNATURE_INVALID


@dataclass(frozen=True)
class SignaturePolicy:
    """Which key signs models, and whether an unsigned model may load."""

    public_key: ec.EllipticCurvePublicKey
    required: bool = True

    @classmethod
    def from_pem(cls, pem: bytes, *, required: bool = True) -> SignaturePolicy:
        """Loads an EC public key (SPKI PEM)."""
        try:
            key = serialization.load_pem_public_key(pem)
        except KEY_PARSE_ERRORS:
            raise InvalidArgument(
                "the model signing key is not a PEM public key", reason=Reason.SIGNING_KEY_INVALID
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size not in _HASHES:
            raise InvalidArgument(
                "the model signing key must be EC P-256, P-384 or P-521",
                reason=Reason.SIGNING_KEY_INVALID,
            )
        return cls(key, required)

    def check(
        self, bundle: bytes, media_type: str, plaintext: bytes | bytearray | memoryview
    ) -> None:
        """Raises unless ``bundle`` is a valid signature by our key over exactly ``plaintext``."""
        if not bundle:
            if self.required:
                raise FailedPrecondition(
                    "the model is not signed, and a signature is required",
                    reason=Reason.MODEL_SIGNATURE_MISSING,
                )
            return
        if media_type != BUNDLE_MEDIA_TYPE:
            raise SignatureInvalid(f"unsupported signature bundle type {media_type[:80]!r}")
        statement = self._verified_statement(bundle)
        try:
            signed = signed_file_digest(statement)
        except ValueError as exc:
            raise SignatureInvalid(str(exc)) from None
        digest = hashlib.sha256(plaintext).hexdigest()
        if not hmac.compare_digest(signed, digest):
            raise SignatureInvalid("the signature is for another model: digests differ")

    def _verified_statement(self, bundle: bytes) -> dict[str, Any]:
        try:
            document = jsonparse.loads(bundle)
            envelope = document["dsseEnvelope"]
            payload = base64.b64decode(envelope["payload"], validate=True)
            signatures = envelope["signatures"]
            if envelope["payloadType"] != PAYLOAD_TYPE or len(signatures) != 1:
                raise ValueError("unexpected envelope")
            signature = base64.b64decode(signatures[0]["sig"], validate=True)
        except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
            raise SignatureInvalid("the signature bundle is malformed") from None
        pae = b"DSSEv1 %d %s %d %s" % (
            len(PAYLOAD_TYPE),
            PAYLOAD_TYPE.encode(),
            len(payload),
            payload,
        )
        algorithm = _HASHES[self.public_key.curve.key_size]
        try:
            self.public_key.verify(signature, pae, ec.ECDSA(algorithm))
        except InvalidSignature:
            raise SignatureInvalid(
                "the model signature does not verify with the configured key"
            ) from None
        try:
            statement = jsonparse.loads(payload)
        except ValueError:
            raise SignatureInvalid("the signed statement is not JSON") from None
        if not isinstance(statement, dict):
            raise SignatureInvalid("the signed statement is not an object")
        return statement
