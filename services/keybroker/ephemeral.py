"""Parsing and validation of the TEE's ephemeral RSA public key (the target of a key release).

The key arrives as DER SubjectPublicKeyInfo, bound into an attestation report by the inference
server. It must be RSA with exponent 65537 and a modulus of 3072 to 4096 bits. 3072 is the floor
because the wrapped data key protects a model for as long as the model is valuable, and RSA-2048
(~112-bit security) is below the 128-bit level of the AES-256 keys it carries; 4096 is the ceiling
so one request cannot make the HSM do arbitrarily expensive work.

Malformed bytes, and a modulus no RSA key has (an even one), raise
``InvalidArgument(EPHEMERAL_KEY_INVALID)``; a well-formed key of the wrong kind (EC, too small,
another exponent) raises ``InvalidArgument(EPHEMERAL_KEY_UNSUPPORTED)``.

:class:`ReleaseTarget` is what a release wraps to: the parsed key plus the OAEP hashes the caller
accepts, validated once at the door and then handed to the HSM layer as it is.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.errors import InvalidArgument
from strongroom.oaep import OaepHash, check_accepted
from strongroom.reasons import Reason

MIN_RSA_BITS = 3072
MAX_RSA_BITS = 4096
RSA_EXPONENT = 65537
#: An RSA-4096 SubjectPublicKeyInfo is 550 bytes; anything much larger is not a key we accept.
MAX_SPKI_BYTES = 1024


@dataclass(frozen=True)
class EphemeralPublicKey:
    """A validated RSA public key, ready to be imported into the HSM as a session object."""

    modulus: bytes  # big-endian, no leading zero byte
    public_exponent: bytes  # big-endian
    bits: int
    spki_sha256: str  # hex digest of the DER, for logs and audit records

    def __repr__(self) -> str:
        return f"EphemeralPublicKey(rsa-{self.bits}, spki_sha256={self.spki_sha256[:16]}...)"


def parse_ephemeral_public_key(der: object) -> EphemeralPublicKey:
    """Parses and validates DER SubjectPublicKeyInfo; see the module docstring for the rules.

    Results are memoised by the DER bytes in a small bounded memo (they are immutable; failures
    are not kept): an inference server releases to the same ephemeral key for every model it loads.
    """
    if not isinstance(der, bytes | bytearray | memoryview):
        raise InvalidArgument(
            "the ephemeral public key must be DER bytes", reason=Reason.EPHEMERAL_KEY_INVALID
        )
    return _parse(bytes(der))


@dataclass(frozen=True)
class ReleaseTarget:
    """Where a released data key goes: the TEE's validated ephemeral RSA key and the OAEP hashes the
    caller accepts (the caller's order, duplicates dropped, at least one).

    Build it with :meth:`parse`; :meth:`KeyManager.release_to_ephemeral
    <strongroom.keybroker.keys.KeyManager.release_to_ephemeral>` takes it without checking again.
    """

    public_key: EphemeralPublicKey
    mechanisms: tuple[OaepHash, ...]

    @classmethod
    def parse(cls, der: object, accepted: Iterable[object]) -> ReleaseTarget:
        """Validates the DER SubjectPublicKeyInfo (see the module docstring) and then the accepted
        hashes; raises InvalidArgument with ``EPHEMERAL_KEY_INVALID``,
        ``EPHEMERAL_KEY_UNSUPPORTED`` or ``OAEP_MECHANISM_INVALID``."""
        # A caller may hold the parsed key already.
        key = der if isinstance(der, EphemeralPublicKey) else parse_ephemeral_public_key(der)
        return cls(key, check_accepted(accepted))


@functools.lru_cache(maxsize=64)
def _parse(data: bytes) -> EphemeralPublicKey:
    if not data or len(data) > MAX_SPKI_BYTES:
        raise InvalidArgument(
            f"the ephemeral public key must be 1-{MAX_SPKI_BYTES} bytes of DER, got {len(data)}",
            reason=Reason.EPHEMERAL_KEY_INVALID,
        )
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        raise InvalidArgument(
            "the ephemeral public key is not a DER SubjectPublicKeyInfo",
            reason=Reason.EPHEMERAL_KEY_INVALID,
        ) from None
    except UnsupportedAlgorithm:  # e.g. an EC key on a curve the library cannot load
        raise InvalidArgument(
            "the ephemeral public key must be RSA, got a key of an unsupported algorithm",
            reason=Reason.EPHEMERAL_KEY_UNSUPPORTED,
        ) from None
    # Re-encoding must give the same bytes: no trailing data, no non-canonical encodings that
    # another parser might read differently from the one that checked the attestation binding.
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != data:
        raise InvalidArgument(
            "the ephemeral public key is not canonical DER", reason=Reason.EPHEMERAL_KEY_INVALID
        )
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidArgument(
            f"the ephemeral public key must be RSA, got {type(key).__name__.removesuffix('PublicKey')}",
            reason=Reason.EPHEMERAL_KEY_UNSUPPORTED,
        )
    numbers = key.public_numbers()
    bits = key.key_size
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise InvalidArgument(
            f"the ephemeral RSA key has {bits} bits; {MIN_RSA_BITS}-{MAX_RSA_BITS} are accepted",
            reason=Reason.EPHEMERAL_KEY_UNSUPPORTED,
        )
    if numbers.e != RSA_EXPONENT:
        raise InvalidArgument(
            f"the ephemeral RSA key must use exponent {RSA_EXPONENT}",
            reason=Reason.EPHEMERAL_KEY_UNSUPPORTED,
        )
    if not numbers.n & 1:
        # No RSA modulus is even, and an HSM's arithmetic may fail on one rather than refuse it.
        raise InvalidArgument(
            "the ephemeral RSA key's modulus is even: not an RSA key",
            reason=Reason.EPHEMERAL_KEY_INVALID,
        )
    return EphemeralPublicKey(
        modulus=numbers.n.to_bytes((bits + 7) // 8, "big"),
        public_exponent=numbers.e.to_bytes(3, "big"),
        bits=bits,
        spki_sha256=hashlib.sha256(data).hexdigest(),
    )
