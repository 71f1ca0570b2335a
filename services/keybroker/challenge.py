"""Stateless key-release challenges that any broker replica can verify.

A challenge is ``version || issued_at || expires_at || random || mac`` where the MAC (HMAC-SHA-256
under a nonce key shared by every replica) also covers the purpose label, the key id and the caller's
SPIFFE ID. So a nonce is single-purpose (key release only), short-lived, bound to one key and one
caller, and needs no shared state: brokers scale out freely. Replaying a report gains nothing because
the data key is wrapped to the ephemeral key bound in that very report.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from strongroom.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from strongroom.reasons import Reason
from strongroom.runtime.secrets import Secret

_VERSION = 1
_LABEL = b"strongroom/keybroker/release-challenge/v1"
_HEADER = struct.Struct(">BQQ16s")  # version, issued_at_ms, expires_at_ms, random
NONCE_LENGTH = _HEADER.size + 32
MIN_KEY_BYTES = 32


@dataclass(frozen=True)
class Challenge:
    """An issued challenge."""

    nonce: bytes
    expires_at: float  # seconds since the epoch


class ChallengeIssuer:
    """Issues and checks challenges with a key shared by all broker replicas."""

    def __init__(
        self,
        key: Secret,
        *,
        lifetime: float = 60.0,
        clock: Callable[[], float] = time.time,
        max_skew: float = 5.0,
    ) -> None:
        if len(key.reveal()) < MIN_KEY_BYTES:
            raise FailedPrecondition(
                f"the nonce key must be at least {MIN_KEY_BYTES} bytes",
                reason=Reason.NONCE_KEY_TOO_SHORT,
            )
        self._key = key
        self._lifetime = lifetime
        self._clock = clock
        self._max_skew = max_skew

    def _mac(self, header: bytes, key_id: str, caller: str) -> bytes:
        msg = b"\0".join((_LABEL, key_id.encode(), caller.encode(), header))
        return hmac.new(self._key.reveal(), msg, hashlib.sha256).digest()

    def issue(self, key_id: str, caller: str) -> Challenge:
        """A fresh challenge for releasing ``key_id`` to ``caller``."""
        now = self._clock()
        issued = int(now * 1000)
        expires = int((now + self._lifetime) * 1000)
        header = _HEADER.pack(_VERSION, issued, expires, os.urandom(16))
        return Challenge(header + self._mac(header, key_id, caller), expires / 1000)

    def check(self, nonce: bytes, key_id: str, caller: str) -> None:
        """Raises unless ``nonce`` was issued by a replica for this key and caller and is fresh."""
        if len(nonce) != NONCE_LENGTH:
            raise InvalidArgument(
                f"nonce must be {NONCE_LENGTH} bytes, got {len(nonce)}",
                reason=Reason.NONCE_MALFORMED,
            )
        header, mac = nonce[: _HEADER.size], nonce[_HEADER.size :]
        version, issued_ms, expires_ms, _random = _HEADER.unpack(header)
        if version != _VERSION:
            raise InvalidArgument(f"unknown nonce version {version}", reason=Reason.NONCE_MALFORMED)
        if not hmac.compare_digest(mac, self._mac(header, key_id, caller)):
            raise PermissionDenied(
                "nonce was not issued by this broker for this key and caller",
                reason=Reason.NONCE_INVALID,
            )
        now_ms = self._clock() * 1000
        if issued_ms > now_ms + self._max_skew * 1000:
            raise PermissionDenied("nonce is issued in the future", reason=Reason.NONCE_INVALID)
        if now_ms > expires_ms:
            raise FailedPrecondition(
                f"nonce expired {(now_ms - expires_ms) / 1000:.1f}s ago; get a new challenge",
                reason=Reason.NONCE_EXPIRED,
            )
