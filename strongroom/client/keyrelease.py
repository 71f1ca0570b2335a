"""The inference server's side of attested key release.

For each release it makes a fresh ephemeral RSA-3072 key, asks the broker for a challenge, has the
hardware sign a report whose REPORT_DATA binds the nonce, the ephemeral key and this server's TLS
key, and unwraps the answer with the ephemeral private key, which is then dropped.

**One credential per exchange.** The TLS key bound into REPORT_DATA must be the key of the
connection that carries ReleaseKey. A :class:`~strongroom.pki.channel.RotatingChannel` may switch
to a renewed certificate between the bind and the send, and the broker then refuses with
``REPORT_DATA_MISMATCH``. :class:`PinnedChannels` gives each exchange a channel that presents one
credential snapshot (one channel per certificate generation, shared by the exchanges of that
generation and closed once a newer one exists and it is idle), and the key bound is that
snapshot's.

**What is retried** (each retry is a complete new exchange: fresh ephemeral key, fresh challenge,
fresh report; at most :data:`MAX_EXCHANGES` exchanges per release):

- ``REPORT_DATA_MISMATCH`` — the binding raced a certificate renewal;
- ``NONCE_INVALID`` and ``NONCE_EXPIRED`` — the challenge was issued under a nonce key that was
  rotated meanwhile, or the exchange outlived the challenge.

Everything else is returned to the caller at once: every other refusal (measurement, policy, TCB,
disabled key ...) would be refused again, and ``UNAVAILABLE`` is left to the caller's own bounded
retry (the model loader's), which also covers the model store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf.message import DecodeError

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.artifact import wipe, wipe_bytes
from strongroom.artifact.keybinding import KEY_SIZE
from strongroom.attestation.binding import report_data_for
from strongroom.attestation.release_signature import ReleaseStatement, ReleaseVerifier
from strongroom.attesters import Attester
from strongroom.client.cancel import call_unary
from strongroom.client.remote import peer_reason
from strongroom.errors import DataLoss, FailedPrecondition, StrongroomError
from strongroom.identifiers import DECISION_ID_PATTERN
from strongroom.oaep import OaepHash
from strongroom.pki.channel import ChannelCredentials, CredentialSource, RotatingChannel
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

EPHEMERAL_KEY_BITS = 3072
# Preferred first. SHA-1 is listed because SoftHSM2 2.6 supports nothing else; a deployment with a
# real HSM can drop it (the broker never picks a mechanism that is not listed).
DEFAULT_MECHANISMS = (pb.WRAP_MECHANISM_RSA_OAEP_SHA256, pb.WRAP_MECHANISM_RSA_OAEP_SHA1)
#: At most this many challenge → release exchanges per :meth:`KeyReleaseClient.release`.
MAX_EXCHANGES = 2
#: Broker refusals that a fresh exchange can cure (see the module docstring).
RETRIED_REASONS = frozenset(
    {Reason.REPORT_DATA_MISMATCH, Reason.NONCE_INVALID, Reason.NONCE_EXPIRED}
)
#: The broker's ReleaseKey, called for its answer's bytes (:func:`_parse_answer` reads them).
RELEASE_KEY_METHOD = (
    "/" + pb.DESCRIPTOR.services_by_name["KeyBrokerService"].full_name + "/ReleaseKey"
)
#: A decision id as the broker's audit log writes them (it refuses any other).
#: The longest policy version the policy schema admits (``strongroom.attestation.policy``'s
#: MAX_POLICY_VERSION_LENGTH, not imported: that module brings pydantic and every TEE's rules
#: into the release client and the CLI for one number; a test holds the two equal).
MAX_POLICY_VERSION_LENGTH = 256


_MODEL: ContextVar[tuple[str, str] | None] = ContextVar("strongroom_release_model", default=None)


@contextlib.contextmanager
def releasing_for(name: str, version: str) -> Iterator[None]:
    """Names the model ``name``/``version`` in the ERROR line of a release answer refused within
    the block (in this context, or in a thread started in a copy of it: a load's key release
    runs on a thread of its own)."""
    token = _MODEL.set((name, version))
    try:
        yield
    finally:
        _MODEL.reset(token)


class _CredentialsLike(ChannelCredentials, Protocol):
    @property
    def public_key_der(self) -> bytes: ...


class IdentityLike(CredentialSource, Protocol):
    """What :class:`PinnedChannels` reads: a channel's credential source whose credentials also
    name their public key (the key a release binds into the attestation report)."""

    @property
    def credentials(self) -> _CredentialsLike: ...


@dataclass(frozen=True)
class BoundChannel:
    """A channel that presents exactly the TLS key ``tls_public_key_der`` for one exchange."""

    channel: grpc.Channel
    tls_public_key_der: bytes = field(repr=False)


@dataclass(frozen=True)
class _Frozen:
    """A credential source that never rotates: one snapshot and the root."""

    credentials: _CredentialsLike
    root_pem: bytes


@dataclass
class _Pinned:
    raw: RotatingChannel
    channel: grpc.Channel
    users: int = 0
    retired: bool = False


class PinnedChannels:
    """Channels to one target, each pinned to one certificate generation of ``identity``.

    ``wrap`` decorates each new channel (tracing interceptors, for instance); ``server_id`` is
    the SPIFFE ID the server must present (see :class:`RotatingChannel`).
    """

    def __init__(
        self,
        identity: IdentityLike,
        target: str,
        *,
        server_name: str | None = None,
        server_id: str | None = None,
        wrap: Callable[[grpc.Channel], grpc.Channel] = lambda channel: channel,
    ) -> None:
        self._identity = identity
        self._target = target
        self._server_name = server_name
        self._server_id = server_id
        self._wrap = wrap
        self._lock = threading.Lock()
        self._by_generation: dict[int, _Pinned] = {}
        self._closed = False

    @contextlib.contextmanager
    def exchange(self) -> Iterator[BoundChannel]:
        """A channel and the TLS key it presents, both from one credential snapshot."""
        credentials = self._identity.credentials
        idle: list[_Pinned] = []
        with self._lock:
            if self._closed:
                raise ValueError("the pinned channels are closed")
            pinned = self._by_generation.get(credentials.generation)
            if pinned is None:
                raw = RotatingChannel(
                    _Frozen(credentials, self._identity.root_pem),
                    self._target,
                    server_name=self._server_name,
                    server_id=self._server_id,
                )
                pinned = _Pinned(raw, self._wrap(raw))
                self._by_generation[credentials.generation] = pinned
                for generation, older in list(self._by_generation.items()):
                    if generation < credentials.generation:
                        older.retired = True
                        if older.users == 0:
                            idle.append(self._by_generation.pop(generation))
            pinned.users += 1
        for old in idle:
            old.raw.close()
        try:
            yield BoundChannel(pinned.channel, credentials.public_key_der)
        finally:
            with self._lock:
                pinned.users -= 1
                close = pinned.retired and pinned.users == 0
                if close:
                    self._by_generation = {
                        g: p for g, p in self._by_generation.items() if p is not pinned
                    }
            if close:
                pinned.raw.close()

    @property
    def target(self) -> str:
        """The address the channels connect to (as configured)."""
        return self._target

    @property
    def open_channels(self) -> int:
        """How many pinned channels are open (one per generation still in use, plus the current)."""
        with self._lock:
            return len(self._by_generation)

    def close(self) -> None:
        """Closes every channel; idempotent."""
        with self._lock:
            self._closed = True
            pinned, self._by_generation = list(self._by_generation.values()), {}
        for p in pinned:
            p.raw.close()


@dataclass(frozen=True)
class ReleasedDataKey:
    """A released data key (wipe ``dek`` once used) and how it was released."""

    dek: bytearray
    mechanism: int
    decision_id: str
    policy_version: str

    def __repr__(self) -> str:
        return f"ReleasedDataKey(decision_id={self.decision_id!r}, dek=***)"


def _new_ephemeral_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=EPHEMERAL_KEY_BITS)


def _yield_the_cpu() -> None:
    """Gives the calling thread the lowest CPU priority (Linux niceness is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class KeyReleaseClient:
    """Obtains data keys from the key broker by proving this server's TEE."""

    def __init__(
        self,
        channel: grpc.Channel | PinnedChannels,
        attester: Attester,
        tls_public_key: Callable[[], bytes] | None = None,
        *,
        verifier: ReleaseVerifier,
        mechanisms: Sequence[pb.WrapMechanism.ValueType] = DEFAULT_MECHANISMS,
        timeout: float = 15.0,
        broker: str | None = None,
    ) -> None:
        """``channel`` is either :class:`PinnedChannels` (the TLS key comes with each channel) or
        a plain channel plus ``tls_public_key``, read at bind time: then a renewal between bind
        and send costs one retry (see the module docstring). ``verifier`` holds the broker's
        release-signing public keys: an answer they do not verify is refused before anything is
        decrypted (:mod:`strongroom.attestation.release_signature`). ``broker`` names the broker
        peer in the ERROR line of a refused answer (default: the pinned channels' target; a
        plain channel does not say where it leads, and gRPC's client calls do not tell their
        peer)."""
        if isinstance(channel, PinnedChannels):
            self._pinned: PinnedChannels | None = channel
            self._plain: grpc.Channel | None = None
            broker = broker if broker is not None else channel.target
        else:
            if tls_public_key is None:
                raise TypeError("a plain channel needs tls_public_key")
            self._pinned, self._plain = None, channel
        self._broker = broker
        self._attester = attester
        self._tls_public_key = tls_public_key
        self._verifier = verifier
        self._mechanisms = tuple(mechanisms)
        self._timeout = timeout
        # RSA-3072 key generation takes 0.1-0.3 s of CPU; the next ephemeral key is made in the
        # background after each use so that a model load does not wait for it. That thread runs at
        # the lowest priority (cryptography releases the interpreter lock while it generates, so
        # the priority is all that holds it back), and not at all while a caller defers it
        # (:meth:`deferring_key_generation`: a model load, whose download and decryption it would
        # otherwise compete with). A key not ready when needed is made at once on the caller's
        # thread instead, and the one being made is kept for the next exchange. Each key is used
        # exactly once.
        self._keygen = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ephemeral-rsa", initializer=_yield_the_cpu
        )
        self._key_lock = threading.Lock()
        self._deferring = 0
        self._next_key: Future[rsa.RSAPrivateKey] | None = self._keygen.submit(_new_ephemeral_key)

    @contextlib.contextmanager
    def deferring_key_generation(self) -> Iterator[None]:
        """Within the block, a key taken is not replaced in the background until the block (and
        every other such block) has ended. The model loader holds it around a download: on the
        512 MB cold start (2 cores) the best load took 1.007-1.010 s with it against
        1.022-1.029 s without, the key then made beside ONNX Runtime's load (README, "Cold
        start")."""
        with self._key_lock:
            self._deferring += 1
        try:
            yield
        finally:
            with self._key_lock:
                self._deferring -= 1
                if not self._deferring and self._next_key is None:
                    self._next_key = self._keygen.submit(_new_ephemeral_key)

    def _take_key(self) -> rsa.RSAPrivateKey:
        with self._key_lock:
            future = self._next_key
            if future is not None and future.done():
                self._next_key = (
                    None if self._deferring else self._keygen.submit(_new_ephemeral_key)
                )
                return future.result()
            if future is None or (self._deferring and future.cancel()):
                self._next_key = (
                    None if self._deferring else self._keygen.submit(_new_ephemeral_key)
                )
            # else: a key being made (or queued, when nothing defers) stays the next exchange's
            # rather than being made for nothing.
        # None ready: one now, at the caller's priority.
        return _new_ephemeral_key()

    @contextlib.contextmanager
    def _bound(self) -> Iterator[BoundChannel]:
        if self._pinned is not None:
            with self._pinned.exchange() as bound:
                yield bound
            return
        assert self._plain is not None and self._tls_public_key is not None
        yield BoundChannel(self._plain, self._tls_public_key())

    def release(self, key_id: str, key_version: int, wrapped_data_key: bytes) -> ReleasedDataKey:
        """Runs the challenge → evidence → release exchange; raises grpc.RpcError on denial.

        Refusals in :data:`RETRIED_REASONS` get one fresh exchange (module docstring). In a
        :class:`~strongroom.client.cancel.CallScope` (a model load's), each call's timeout ends by
        the scope's deadline, and cancelling the scope cancels the call in flight: the scope's
        error (CANCELLED ``LOAD_CANCELLED`` / ``LOAD_DEADLINE_EXCEEDED``) is raised instead.
        """
        for attempt in range(1, MAX_EXCHANGES + 1):
            try:
                return self._exchange(key_id, key_version, wrapped_data_key)
            except grpc.RpcError as exc:
                reason = peer_reason(exc)
                if attempt == MAX_EXCHANGES or reason not in RETRIED_REASONS:
                    raise
                log.warning(
                    "key release refused (%s); retrying once with a fresh challenge",
                    reason,
                    extra={"key_id": key_id, "reason": reason},
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(self, key_id: str, key_version: int, wrapped_data_key: bytes) -> ReleasedDataKey:
        private = self._take_key()
        try:
            public_der = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            with self._bound() as bound:
                stub = pb_grpc.KeyBrokerServiceStub(bound.channel)
                # Each call ends by the load's deadline and with its cancellation (a key that
                # arrived for a caller already gone would only be wiped); none starts after it.
                challenge = call_unary(
                    stub.GetChallenge, pb.GetChallengeRequest(key_id=key_id), timeout=self._timeout
                )
                report_data = report_data_for(challenge.nonce, public_der, bound.tls_public_key_der)
                evidence = self._attester.attest(report_data)
                # The answer's bytes, parsed below: bytes that are no ReleaseKeyResponse are the
                # answer's fault (someone other than the broker answered), not a gRPC INTERNAL
                # error read as the broker's refusal.
                release_key = bound.channel.unary_unary(
                    RELEASE_KEY_METHOD,
                    request_serializer=pb.ReleaseKeyRequest.SerializeToString,
                    response_deserializer=None,
                )
                answer: bytes = call_unary(
                    release_key,
                    pb.ReleaseKeyRequest(
                        key_id=key_id,
                        key_version=key_version,
                        wrapped_data_key=wrapped_data_key,
                        evidence=evidence.to_proto(),
                        ephemeral_public_key=public_der,
                        nonce=challenge.nonce,
                        accepted_mechanisms=self._mechanisms,
                    ),
                    timeout=self._timeout,
                )
            try:
                response = _parse_answer(answer)
                statement = ReleaseStatement(
                    nonce=challenge.nonce,
                    ephemeral_public_key_der=public_der,
                    key_id=key_id,
                    key_version=key_version,
                    request_wrapped_key=wrapped_data_key,
                    mechanism=response.mechanism,
                    released_wrapped_key=response.wrapped_data_key,
                    decision_id=response.decision_id,
                    policy_version=response.policy_version,
                )
                signed = self._judge(response, statement)
                return self._unwrap(private, response, key_id=key_id, signed=signed)
            except StrongroomError as exc:
                # Not a refusal by the broker: an answer the broker did not make for this
                # request (an impersonating peer, a broken broker, or one signing with a key not
                # configured here), whether its shape or its signature gave it away; or a signed
                # answer whose key fails its checks (RELEASED_KEY_INVALID): a broken or hostile
                # broker, which was logged nowhere above INFO. Once per answer, never the key.
                model, version = _MODEL.get() or (None, None)
                log.error(
                    "key broker's release answer refused, nothing decrypted: %s",
                    exc.message,
                    extra={
                        "key_id": key_id,
                        "reason": exc.reason,
                        "model": model,
                        "version": version,
                        "peer": self._broker,
                    },
                )
                raise
        finally:
            del private  # the ephemeral private key lives only for this exchange

    def _judge(self, response: pb.ReleaseKeyResponse, statement: ReleaseStatement) -> bool:
        """Refuses an answer no broker sends for ``statement``'s request; returns whether its
        signature was verified (False: taken unverified, development only)."""
        if response.mechanism not in self._mechanisms:
            raise FailedPrecondition(
                f"the broker wrapped the key with mechanism {response.mechanism}, which we did "
                "not offer",
                reason=Reason.OAEP_MECHANISM_UNEXPECTED,
            )
        _check_answer(response)
        # Before anything is decrypted: an answer not signed over this very request (its nonce,
        # our ephemeral key, the key slot we sent) may come from a peer that only holds a broker
        # certificate, with a data key of its own choosing.
        return self._verifier.verify(
            statement, response.release_signature, response.release_signing_key_id
        )

    def _unwrap(
        self,
        private: rsa.RSAPrivateKey,
        response: pb.ReleaseKeyResponse,
        *,
        key_id: str,
        signed: bool,
    ) -> ReleasedDataKey:
        if not signed:
            log.warning(
                "the key broker's release answer was accepted unverified (unsigned, or no "
                "release-signing key configured; inference.allow_unsigned_releases: development "
                "only)",
                extra={"key_id": key_id, "decision_id": response.decision_id},
            )
        oaep_hash = OaepHash.from_mechanism(response.mechanism)
        try:
            decrypted = private.decrypt(
                response.wrapped_data_key,
                padding.OAEP(
                    mgf=padding.MGF1(oaep_hash.algorithm),
                    algorithm=oaep_hash.algorithm,
                    label=None,
                ),
            )
        except ValueError:
            raise DataLoss(
                "the released key does not decrypt with our ephemeral key",
                reason=Reason.RELEASED_KEY_INVALID,
            ) from None
        # cryptography returns the key as a new bytes object that only this frame holds: once
        # copied into the bytearray the caller wipes, it is zeroed too, so no copy of the data key
        # goes back to the allocator intact.
        dek = bytearray(decrypted)
        wipe_bytes(decrypted)
        del decrypted
        if len(dek) != KEY_SIZE:
            # Checked here, where the broker's answer is judged: further on, the body-key
            # derivation would refuse it as an invalid argument of whoever asked for the load.
            size = len(dek)
            wipe(dek)
            raise DataLoss(
                f"the broker released a data key of {size} bytes; a data key is {KEY_SIZE} bytes",
                reason=Reason.RELEASED_KEY_INVALID,
            )
        log.info(
            "data key released",
            extra={"key_id": key_id, "decision_id": response.decision_id},
        )
        return ReleasedDataKey(
            dek, response.mechanism, response.decision_id, response.policy_version
        )


def _parse_answer(answer: bytes) -> pb.ReleaseKeyResponse:
    """The release answer in ``answer``; refuses bytes that are no ReleaseKeyResponse."""
    try:
        return pb.ReleaseKeyResponse.FromString(answer)
    except DecodeError:
        raise DataLoss(
            f"the broker's release answer is not a ReleaseKeyResponse ({len(answer)} bytes "
            "that do not parse)",
            reason=Reason.RELEASE_ANSWER_MALFORMED,
        ) from None


def _check_answer(response: pb.ReleaseKeyResponse) -> None:
    """Refuses a release answer whose decision id or policy version no broker writes (its audit
    log's ids; 1-256 printable characters, as the policy schema requires): they go into this
    server's log and LoadModel's answer, and from there to an operator's terminal."""
    if not DECISION_ID_PATTERN.fullmatch(response.decision_id):
        raise DataLoss(
            "the broker's release answer has a malformed decision id "
            f"({len(response.decision_id)} characters)",
            reason=Reason.RELEASE_ANSWER_MALFORMED,
        )
    policy = response.policy_version
    if not policy or len(policy) > MAX_POLICY_VERSION_LENGTH or not policy.isprintable():
        raise DataLoss(
            "the broker's release answer has a malformed policy version "
            f"({len(policy)} characters)",
            reason=Reason.RELEASE_ANSWER_MALFORMED,
        )
