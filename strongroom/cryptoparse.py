"""What the ``cryptography`` library raises for bytes it cannot parse, in one place.

Not everything it raises for malformed input is a ``ValueError``: a certificate or CRL whose
version field it does not know raises ``x509.InvalidVersion``, and a public key of an algorithm or
curve it does not support raises ``UnsupportedAlgorithm``. A parse of untrusted or operator-supplied
bytes that catches ``ValueError`` alone lets those escape as untyped errors (a caller's bad input
answered with INTERNAL, a bad cached file that stops a service from starting). Catch these tuples.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["KEY_PARSE_ERRORS", "X509_PARSE_ERRORS", "ed25519_private_key"]

X509_PARSE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, x509.InvalidVersion)
"""Raised by ``x509.load_*`` for a certificate or CRL that does not parse."""

KEY_PARSE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, UnsupportedAlgorithm)
"""Raised by ``serialization.load_*`` for a key that does not parse or cannot be used."""


def ed25519_private_key(raw: bytes) -> Ed25519PrivateKey | None:
    """An Ed25519 private key from PKCS#8 PEM or its 32 raw bytes (a secret file's or variable's
    value), or None when ``raw`` is neither; the caller raises its own error."""
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(raw, password=None)
        elif len(raw) == 32:
            key = Ed25519PrivateKey.from_private_bytes(raw)
        else:
            return None
    except KEY_PARSE_ERRORS:
        return None
    return key if isinstance(key, Ed25519PrivateKey) else None
