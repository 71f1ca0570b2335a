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

Which keys the server trusts, and until when (a key given as a certificate only within its
validity, judged at each verification): :mod:`strongroom.attestation.release_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom.attestation.release_keys import TrustedKey, judge, load_trusted_keys
from strongroom.cryptoparse import ed25519_private_key
from strongroom.errors import InvalidArgument, Unauthenticated
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

LABEL = b"strongroom/keybroker/release-response/v1\x00"
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 32
#: A trusted key whose certificate ends within this is warned of (inference's default).
DEFAULT_WARN_WITHIN = timedelta(days=30)
#: How often verifications repeat the warning of a key ending soon, per key.
WARN_EVERY = timedelta(days=1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


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


class ReleaseVerifier:
    """The inference server's side: which release-signing keys it trusts, until when
    (:mod:`strongroom.attestation.release_keys`), and whether an unsigned answer may pass
    (development only, and only when its configuration says so).

    ``clock`` is the time each verification judges a key's validity at; a verified answer
    signed with a key whose certificate ends within ``warn_within`` logs a WARNING, at most once
    per :data:`WARN_EVERY` for each key (the start-up warning is :meth:`warn_about_expiry`)."""

    def __init__(
        self,
        keys: Iterable[Ed25519PublicKey | TrustedKey],
        *,
        allow_unsigned: bool = False,
        clock: Callable[[], datetime] = _utc_now,
        warn_within: timedelta = DEFAULT_WARN_WITHIN,
    ) -> None:
        self._keys: dict[bytes, list[TrustedKey]] = {}
        for key in keys:
            trusted = key if isinstance(key, TrustedKey) else TrustedKey(key, "a public key")
            self._keys.setdefault(signing_key_id(trusted.key), []).append(trusted)
        if not self._keys and not allow_unsigned:
            raise InvalidArgument(
                "no release-signing public key: a release answer could not be verified",
                reason=Reason.RELEASE_SIGNING_KEY_MISSING,
            )
        self.allow_unsigned = allow_unsigned
        self._clock = clock
        self._warn_within = warn_within
        self._warned: dict[bytes, datetime] = {}
        self._warned_lock = threading.Lock()

    def __repr__(self) -> str:
        ids = ", ".join(k.hex()[:16] for k in self._keys)
        return f"ReleaseVerifier(keys=[{ids}], allow_unsigned={self.allow_unsigned})"

    @classmethod
    def from_files(
        cls,
        paths: Sequence[Path],
        *,
        allow_unsigned: bool = False,
        clock: Callable[[], datetime] = _utc_now,
        warn_within: timedelta = DEFAULT_WARN_WITHIN,
    ) -> ReleaseVerifier:
        """The keys in the PEM files ``paths`` (each one or more keys or certificates)."""
        keys: list[TrustedKey] = []
        for location in paths:
            try:
                pem = location.read_bytes()
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot read the release-signing public key {location}: {exc.strerror}",
                    reason=Reason.RELEASE_SIGNING_KEY_INVALID,
                ) from None
            keys.extend(load_trusted_keys(pem, source=str(location)))
        return cls(keys, allow_unsigned=allow_unsigned, clock=clock, warn_within=warn_within)

    def warn_about_expiry(self) -> None:
        """Logs each trusted key that has expired or is not yet valid (ERROR: answers signed
        with it are refused), whose certificate ends within ``warn_within`` (WARNING) or that is
        also listed bare, so that its certificate bounds nothing (WARNING); and, ERROR, when no
        key is valid now, since every answer would then be refused. Each key is judged as
        verification judges it (:func:`~strongroom.attestation.release_keys.judge`): an expired
        certificate beside its valid renewal is no refusal."""
        now = self._clock()
        any_valid = False
        for key_id, entries in self._keys.items():
            extra = {"release_signing_key_id": key_id.hex()}
            judged = judge(entries, now)
            if isinstance(judged, Unauthenticated):
                for entry in entries:  # each says why (expired, not yet valid) and where
                    refused = entry.refusal(now)
                    assert refused is not None
                    log.error(refused.message, extra=extra)
                continue
            any_valid = True
            if judged is not None:
                note = judged.expiry_note(now, self._warn_within)
                if note is not None:
                    log.warning(note, extra=extra)
                continue
            certified = [entry.source for entry in entries if entry.not_after is not None]
            if certified:
                bare = [entry.source for entry in entries if entry.not_after is None]
                log.warning(
                    "the release-signing key of %s is also listed as a bare public key (%s), "
                    "which is trusted until it is removed: its certificate does not bound its "
                    "life; list the certificate alone (deploy/README.md, 'Rotating the "
                    "release-signing key')",
                    "; ".join(certified),
                    "; ".join(bare),
                    extra=extra,
                )
        if self._keys and not any_valid:
            log.error(
                "no release-signing key this server trusts is valid now: every key release "
                "will be refused until a valid one is listed"
            )

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
        entries = next(
            (k for known, k in self._keys.items() if hmac.compare_digest(known, key_id)), None
        )
        if entries is None:
            raise Unauthenticated(
                "the key broker's release answer is signed by a key this server does not trust "
                f"(key id {key_id.hex()[:16] or 'empty'}; trusted: "
                f"{', '.join(k.hex()[:16] for k in self._keys) or 'none'})",
                reason=Reason.RELEASE_SIGNING_KEY_UNKNOWN,
            )
        try:
            if len(signature) != SIGNATURE_BYTES:
                raise InvalidSignature
            entries[0].key.verify(signature, statement.message())
        except InvalidSignature:
            raise Unauthenticated(
                "the key broker's release answer does not verify: its signature does not cover "
                "this request's nonce, ephemeral key and key slot with the key it carries",
                reason=Reason.RELEASE_SIGNATURE_INVALID,
            ) from None
        # Judged after the signature: a refusal for the key's dates then says that the holder
        # of a key no longer (or not yet) trusted signed this very answer.
        self._check_validity(key_id, entries)
        return True

    def _check_validity(self, key_id: bytes, entries: list[TrustedKey]) -> None:
        """Refuses a key none of whose entries is valid now (the same key may be listed in
        several certificates: a renewed one beside the old); warns of one ending soon."""
        now = self._clock()
        judged = judge(entries, now)
        if isinstance(judged, Unauthenticated):
            raise judged
        if judged is None:  # listed bare too: for ever
            return
        note = judged.expiry_note(now, self._warn_within)
        if note is None:
            return
        with self._warned_lock:
            warned = self._warned.get(key_id)
            if warned is not None and now - warned < WARN_EVERY:
                return
            self._warned[key_id] = now
        log.warning(note, extra={"release_signing_key_id": key_id.hex()})
