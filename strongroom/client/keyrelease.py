"""The inference server's side of attested key release.

For each release it makes a fresh ephemeral RSA-3072 key, asks the broker for a challenge, has the
hardware sign a report whose REPORT_DATA binds the nonce, the ephemeral key and this server's TLS
key, and unwraps the answer with the ephemeral private key, which is then dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.attestation.binding import report_data_for
from strongroom.attesters import Attester
from strongroom.errors import DataLoss, FailedPrecondition
from strongroom.oaep import OaepHash

log = logging.getLogger(__name__)

EPHEMERAL_KEY_BITS = 3072
# Preferred first. SHA-1 is listed because SoftHSM2 2.6 supports nothing else; a deployment with a
# real HSM can drop it (the broker never picks a mechanism that is not listed).
DEFAULT_MECHANISMS = (pb.WRAP_MECHANISM_RSA_OAEP_SHA256, pb.WRAP_MECHANISM_RSA_OAEP_SHA1)


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


class KeyReleaseClient:
    """Obtains data keys from the key broker by proving this server's TEE."""

    def __init__(
        self,
        channel: grpc.Channel,
        attester: Attester,
        tls_public_key: Callable[[], bytes],
        *,
        mechanisms: Sequence[pb.WrapMechanism.ValueType] = DEFAULT_MECHANISMS,
        timeout: float = 15.0,
    ) -> None:
        self._stub = pb_grpc.KeyBrokerServiceStub(channel)
        self._attester = attester
        self._tls_public_key = tls_public_key
        self._mechanisms = tuple(mechanisms)
        self._timeout = timeout
        # RSA-3072 key generation takes 0.1-0.3 s; the next ephemeral key is made in the background
        # after each use so that a model load does not wait for it. Each key is used exactly once.
        self._keygen = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ephemeral-rsa")
        self._next_key: Future[rsa.RSAPrivateKey] = self._keygen.submit(_new_ephemeral_key)
        self._key_lock = threading.Lock()

    def _take_key(self) -> rsa.RSAPrivateKey:
        with self._key_lock:
            future, self._next_key = self._next_key, self._keygen.submit(_new_ephemeral_key)
        return future.result()

    def release(self, key_id: str, key_version: int, wrapped_data_key: bytes) -> ReleasedDataKey:
        """Runs the challenge → evidence → release exchange; raises grpc.RpcError on denial."""
        private = self._take_key()
        try:
            public_der = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            challenge = self._stub.GetChallenge(
                pb.GetChallengeRequest(key_id=key_id), timeout=self._timeout
            )
            report_data = report_data_for(challenge.nonce, public_der, self._tls_public_key())
            evidence = self._attester.attest(report_data)
            response = self._stub.ReleaseKey(
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
            if response.mechanism not in self._mechanisms:
                raise FailedPrecondition(
                    f"the broker wrapped the key with mechanism {response.mechanism}, which we did "
                    "not offer",
                    reason="OAEP_MECHANISM_UNEXPECTED",
                )
            oaep_hash = OaepHash.from_mechanism(response.mechanism)
            try:
                dek = bytearray(
                    private.decrypt(
                        response.wrapped_data_key,
                        padding.OAEP(
                            mgf=padding.MGF1(oaep_hash.algorithm),
                            algorithm=oaep_hash.algorithm,
                            label=None,
                        ),
                    )
                )
            except ValueError:
                raise DataLoss(
                    "the released key does not decrypt with our ephemeral key",
                    reason="RELEASED_KEY_INVALID",
                ) from None
            log.info(
                "data key released",
                extra={"key_id": key_id, "decision_id": response.decision_id},
            )
            return ReleasedDataKey(
                dek, response.mechanism, response.decision_id, response.policy_version
            )
        finally:
            del private  # the ephemeral private key lives only for this exchange
