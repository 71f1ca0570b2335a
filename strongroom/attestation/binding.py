"""REPORT_DATA binding shared by the key broker and the inference server.

The 64-byte REPORT_DATA of an SNP report or TDX quote is exactly::

    SHA-512( label || u32be(len(f1)) || f1 || u32be(len(f2)) || f2 || ... )

with a distinct, NUL-terminated domain-separation label per use, so a report made for one purpose
can never be accepted for another and no field boundary is ambiguous. SHA-512 output is already
64 bytes: nothing is padded or truncated, and comparison is constant-time over the full 64 bytes.

* key release (broker nonce, ephemeral wrapping key, mTLS key): :func:`report_data_for`;
* the inference server's client-facing evidence (client nonce, TLS key): :func:`client_report_data_for`.

Public keys are DER SubjectPublicKeyInfo and are parsed to make sure they are one.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from cryptography.hazmat.primitives.serialization import load_der_public_key

from strongroom.attestation.errors import VerificationFailed
from strongroom.cryptoparse import KEY_PARSE_ERRORS
from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason

REPORT_DATA_SIZE = 64
KEY_RELEASE_LABEL = b"strongroom/attestation/key-release/v1\x00"
INFERENCE_CLIENT_LABEL = b"strongroom/attestation/inference-client/v1\x00"
MIN_NONCE_BYTES = 16
MAX_FIELD_BYTES = 16 * 1024


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _check_nonce(nonce: bytes) -> None:
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_FIELD_BYTES:
        raise InvalidArgument(
            f"nonce must be {MIN_NONCE_BYTES}..{MAX_FIELD_BYTES} bytes, got {len(nonce)}",
            reason=Reason.BAD_NONCE,
        )


# Memoised by the bytes: a caller's TLS key is the same on every release over its connection.
# Small on purpose: every renewal brings a caller a new TLS key and every production release a new
# ephemeral key, so a larger memo fills with keys that never come back before it levels off (256
# keys, ~0.25 KiB each, take ~10 minutes of renewals at 60 s certificates). A miss costs 5-15 us.
@functools.lru_cache(maxsize=32)
def _parses_as_spki(der: bytes) -> bool:
    try:
        load_der_public_key(der)
    except KEY_PARSE_ERRORS:
        return False
    return True


def _check_spki(der: bytes, what: str) -> None:
    if not 0 < len(der) <= MAX_FIELD_BYTES:
        raise InvalidArgument(
            f"{what} public key is empty or too large", reason=Reason.BAD_PUBLIC_KEY
        )
    if not _parses_as_spki(bytes(der)):
        raise InvalidArgument(
            f"{what} public key is not a DER SubjectPublicKeyInfo", reason=Reason.BAD_PUBLIC_KEY
        )


def report_data_for(
    nonce: bytes, ephemeral_public_key_der: bytes, tls_public_key_der: bytes
) -> bytes:
    """REPORT_DATA for a key release: binds the broker nonce, ephemeral key and mTLS key."""
    _check_nonce(nonce)
    _check_spki(ephemeral_public_key_der, "ephemeral")
    _check_spki(tls_public_key_der, "TLS")
    digest = hashlib.sha512(
        KEY_RELEASE_LABEL
        + _field(bytes(nonce))
        + _field(bytes(ephemeral_public_key_der))
        + _field(bytes(tls_public_key_der))
    ).digest()
    assert len(digest) == REPORT_DATA_SIZE
    return digest


def client_report_data_for(nonce: bytes, tls_public_key_der: bytes) -> bytes:
    """REPORT_DATA for the inference server's client-facing evidence: client nonce and TLS key."""
    _check_nonce(nonce)
    _check_spki(tls_public_key_der, "TLS")
    digest = hashlib.sha512(
        INFERENCE_CLIENT_LABEL + _field(bytes(nonce)) + _field(bytes(tls_public_key_der))
    ).digest()
    assert len(digest) == REPORT_DATA_SIZE
    return digest


def check_report_data(claims_report_data: bytes, expected: bytes) -> None:
    """Raises :class:`VerificationFailed` unless both are exactly 64 bytes and equal.

    Constant-time; there is no "not provided" case: an expected value is always required.
    """
    if len(expected) != REPORT_DATA_SIZE:
        raise InvalidArgument(
            "expected REPORT_DATA must be 64 bytes", reason=Reason.BAD_REPORT_DATA
        )
    if len(claims_report_data) != REPORT_DATA_SIZE or not hmac.compare_digest(
        bytes(claims_report_data), bytes(expected)
    ):
        raise VerificationFailed(
            "REPORT_DATA does not bind this nonce and these keys",
            reason=Reason.REPORT_DATA_MISMATCH,
        )
