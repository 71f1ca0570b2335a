"""Release challenges: verifiable by any replica, single-purpose, short-lived."""

from __future__ import annotations

import os

import pytest

from strongroom.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from strongroom.keybroker.challenge import NONCE_LENGTH, ChallengeIssuer
from strongroom.runtime.secrets import Secret

CALLER = "spiffe://strongroom.test/inference"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> Secret:
    return Secret(os.urandom(32))


def test_another_replica_with_the_same_key_accepts(key: Secret) -> None:
    nonce = ChallengeIssuer(key).issue("model-a", CALLER).nonce
    assert len(nonce) == NONCE_LENGTH
    ChallengeIssuer(key).check(nonce, "model-a", CALLER)


def test_nonces_are_unique(key: Secret) -> None:
    issuer = ChallengeIssuer(key)
    assert len({issuer.issue("k", CALLER).nonce for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("key_id", "caller"),
    [("model-b", CALLER), ("model-a", "spiffe://strongroom.test/other")],
)
def test_bound_to_key_and_caller(key: Secret, key_id: str, caller: str) -> None:
    nonce = ChallengeIssuer(key).issue("model-a", CALLER).nonce
    with pytest.raises(PermissionDenied) as info:
        ChallengeIssuer(key).check(nonce, key_id, caller)
    assert info.value.reason == "NONCE_INVALID"


def test_foreign_key_rejected(key: Secret) -> None:
    nonce = ChallengeIssuer(key).issue("k", CALLER).nonce
    with pytest.raises(PermissionDenied):
        ChallengeIssuer(Secret(os.urandom(32))).check(nonce, "k", CALLER)


def test_every_flipped_byte_rejected(key: Secret) -> None:
    issuer = ChallengeIssuer(key)
    nonce = issuer.issue("k", CALLER).nonce
    for i in range(len(nonce)):
        forged = bytearray(nonce)
        forged[i] ^= 0x01
        with pytest.raises((PermissionDenied, InvalidArgument)):
            issuer.check(bytes(forged), "k", CALLER)


def test_expired_and_future(key: Secret) -> None:
    clock = Clock()
    issuer = ChallengeIssuer(key, lifetime=60, clock=clock)
    nonce = issuer.issue("k", CALLER).nonce
    clock.now += 59
    issuer.check(nonce, "k", CALLER)
    clock.now += 2
    with pytest.raises(FailedPrecondition) as info:
        issuer.check(nonce, "k", CALLER)
    assert info.value.reason == "NONCE_EXPIRED"
    clock.now -= 3600
    with pytest.raises(PermissionDenied, match="future"):
        issuer.check(nonce, "k", CALLER)


@pytest.mark.parametrize("length", [0, 1, NONCE_LENGTH - 1, NONCE_LENGTH + 1, 64])
def test_wrong_length_malformed(key: Secret, length: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        ChallengeIssuer(key).check(b"\0" * length, "k", CALLER)
    assert info.value.reason == "NONCE_MALFORMED"


def test_short_key_refused() -> None:
    with pytest.raises(FailedPrecondition):
        ChallengeIssuer(Secret(b"short"))
