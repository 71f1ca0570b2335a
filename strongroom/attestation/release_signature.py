"""The key broker's signature over a release answer, bound to the request it answers.

The attestation report binds the request (nonce, ephemeral key, caller's TLS key) for the broker;
nothing bound the broker's *answer* for the inference server. Whoever holds a certificate with the
broker's SPIFFE ID (mis-issued or stolen) could then answer a release with a data key of its own
choosing wrapped to the server's ephemeral key, and, controlling the store too, have a model of its
choosing loaded under the name asked for. The broker therefore signs every granted answer with a
dedicated Ed25519 key, and the server verifies it against the public keys it is configured with.

The signed message is a domain-separation label followed by length-prefixed fields
(``u32be(len) || bytes`` each; fixed-width integers are length-prefixed too, so no field boundary
is ambiguous)::

    "strongroom/keybroker/release-response/v1\\0"
    nonce                         the challenge the request answered (it carries its expiry)
    SHA-256(ephemeral public key) the DER SubjectPublicKeyInfo the key was wrapped to
    key id (UTF-8), key version (u32be)
    SHA-256(request's wrapped data key)  the artifact's key slot the broker unwrapped
    mechanism (u32be)             the OAEP mechanism of the answer
    SHA-256(answer's wrapped data key)
    decision id, policy version (UTF-8)

What a valid signature proves: a holder of the release-signing key answered exactly this request
(this nonce, this ephemeral key, this key slot) with exactly these bytes. What it does not prove:
that the broker was honest. A compromised broker (or anyone with its signing key) can still sign
any answer; the signature takes away only what a broker *certificate* alone allowed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom.cryptoparse import KEY_PARSE_ERRORS, X509_PARSE_ERRORS, ed25519_private_key
from strongroom.errors import InvalidArgument, Unauthenticated
from strongroom.reasons import Reason

LABEL = b"strongroom/keybroker/release-response/v1\x00"
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 32


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _u32(value: int) -> bytes:
    return _field(value.to_bytes(4, "big"))


@dataclass(frozen=True)
class ReleaseStatement:
    """What a release answer says, bound to the request it answers."""

    nonce: bytes
    ephemeral_public_key_der: bytes = field(repr=False)
    key_id: str
    key_version: int
    request_wrapped_key: bytes = field(repr=False)
    mechanism: int
    released_wrapped_key: bytes = field(repr=False)
    decision_id: str
    policy_version: str

    def message(self) -> bytes:
        """The bytes the broker signs (module docstring)."""
        return LABEL + b"".join(
            (
                _field(self.nonce),
                _field(hashlib.sha256(self.ephemeral_public_key_der).digest()),
                _field(self.key_id.encode("utf-8")),
                _u32(self.key_version),
                _field(hashlib.sha256(self.request_wrapped_key).digest()),
                _u32(self.mechanism),
                _field(hashlib.sha256(self.released_wrapped_key).digest()),
                _field(self.decision_id.encode("utf-8")),
                _field(self.policy_version.encode("utf-8")),
            )
        )


def signing_key_id(public: Ed25519PublicKey) -> bytes:
    """SHA-256 of the raw public key: names the key in an answer (rotation keeps several)."""
    return hashlib.sha256(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).digest()


@dataclass(frozen=True)
class SignedRelease:
    """A signature over a :class:`ReleaseStatement` and the id of the key that made it."""

    signature: bytes
    key_id: bytes


class ReleaseSigner:
    """The broker's side: signs granted answers with its release-signing key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = signing_key_id(key.public_key())

    def __repr__(self) -> str:
        return f"ReleaseSigner(key_id={self.key_id.hex()[:16]}…)"

    def sign(self, statement: ReleaseStatement) -> SignedRelease:
        """The signature over ``statement``."""
        return SignedRelease(self._key.sign(statement.message()), self.key_id)


def load_signing_key(raw: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PKCS#8 PEM or its 32 raw bytes (a file or variable's value)."""
    key = ed25519_private_key(raw)
    if key is None:
        raise InvalidArgument(
            "the release-signing key is not an Ed25519 private key (PKCS#8 PEM or 32 raw bytes)",
            reason=Reason.RELEASE_SIGNING_KEY_INVALID,
        )
    return key


_PEM_BLOCK = re.compile(
    rb"-----BEGIN (PUBLIC KEY|CERTIFICATE)-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END \1-----"
)


def load_public_keys(pem: bytes, *, source: str) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in ``pem``: SPKI PEM blocks (``PUBLIC KEY``) or certificates, of
    which only the public key is used (Helm can make a certificate over a key it generated but
    cannot print the key itself; nothing else of the certificate, its dates or issuer, means
    anything here). One file may hold several: the old and the new key while the broker's is
    rotated. ``source`` names the file in errors."""
    blocks = [match.group(0) for match in _PEM_BLOCK.finditer(pem)]
    if not blocks:
        raise InvalidArgument(
            f"{source} holds no PEM public key (-----BEGIN PUBLIC KEY-----)",
            reason=Reason.RELEASE_SIGNING_KEY_INVALID,
        )
    keys = []
    for block in blocks:
        key: object
        try:
            if block.startswith(b"-----BEGIN CERTIFICATE-----"):
                key = x509.load_pem_x509_certificate(block).public_key()
            else:
                key = serialization.load_pem_public_key(block)
        except (*KEY_PARSE_ERRORS, *X509_PARSE_ERRORS):
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument(
                f"{source}: a key in it is not an Ed25519 public key",
                reason=Reason.RELEASE_SIGNING_KEY_INVALID,
            )
        keys.append(key)
    return keys


class ReleaseVerifier:
    """The inference server's side: which release-signing keys it trusts, and whether an unsigned
    answer may pass (development only, and only when its configuration says so)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey], *, allow_unsigned: bool = False) -> None:
        self._keys = {signing_key_id(k): k for k in keys}
        if not self._keys and not allow_unsigned:
            raise InvalidArgument(
                "no release-signing public key: a release answer could not be verified",
                reason=Reason.RELEASE_SIGNING_KEY_MISSING,
            )
        self.allow_unsigned = allow_unsigned

    def __repr__(self) -> str:
        ids = ", ".join(k.hex()[:16] for k in self._keys)
        return f"ReleaseVerifier(keys=[{ids}], allow_unsigned={self.allow_unsigned})"

    @classmethod
    def from_files(cls, paths: Sequence[Path], *, allow_unsigned: bool = False) -> ReleaseVerifier:
        """The keys in the PEM files ``paths`` (each one or more keys)."""
        keys: list[Ed25519PublicKey] = []
        for location in paths:
            try:
                pem = location.read_bytes()
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot read the release-signing public key {location}: {exc.strerror}",
                    reason=Reason.RELEASE_SIGNING_KEY_INVALID,
                ) from None
            keys.extend(load_public_keys(pem, source=str(location)))
        return cls(keys, allow_unsigned=allow_unsigned)

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        """The ids of the trusted keys."""
        return tuple(self._keys)

    def verify(self, statement: ReleaseStatement, signature: bytes, key_id: bytes) -> bool:
        """Raises :class:`Unauthenticated` unless ``signature`` is a trusted key's over
        ``statement``; returns False for an answer taken unverified (development, with
        ``allow_unsigned``): an unsigned one, or any when no key is configured, since nothing
        here could verify it (a current broker signs every answer)."""
        if self.allow_unsigned and not self._keys:
            return False
        if not signature and not key_id:
            if self.allow_unsigned:
                return False
            raise Unauthenticated(
                "the key broker's release answer is not signed; this server accepts only "
                "answers signed with its configured release-signing keys (a broker older than "
                "release signing, or not the broker)",
                reason=Reason.RELEASE_UNSIGNED,
            )
        public = next(
            (k for known, k in self._keys.items() if hmac.compare_digest(known, key_id)), None
        )
        if public is None:
            raise Unauthenticated(
                "the key broker's release answer is signed by a key this server does not trust "
                f"(key id {key_id.hex()[:16] or 'empty'}; trusted: "
                f"{', '.join(k.hex()[:16] for k in self._keys) or 'none'})",
                reason=Reason.RELEASE_SIGNING_KEY_UNKNOWN,
            )
        try:
            if len(signature) != SIGNATURE_BYTES:
                raise InvalidSignature
            public.verify(signature, statement.message())
        except InvalidSignature:
            raise Unauthenticated(
                "the key broker's release answer does not verify: its signature does not cover "
                "this request's nonce, ephemeral key and key slot with the key it carries",
                reason=Reason.RELEASE_SIGNATURE_INVALID,
            ) from None
        return True
