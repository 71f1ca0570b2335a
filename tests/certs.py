"""Self-signed certificates for tests that need a certificate over a key and nothing more."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID


def self_signed_pem(
    key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> bytes:
    """A PEM certificate over ``key``, signed by it, valid from ``not_before`` (default now) to
    ``not_after`` (default a day later)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = not_before or dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(not_after or now + dt.timedelta(days=1))
        # Ed25519 signs without a separate digest.
        .sign(key, None if isinstance(key, Ed25519PrivateKey) else hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def oddly_dated_pem(key: Ed25519PrivateKey, not_before: bytes, not_after: bytes) -> bytes:
    """A PEM certificate over ``key`` whose validity is the GeneralizedTime values ``not_before``
    and ``not_after`` as given (``b"00010101000000Z"``): dates the certificate builder refuses
    (before 1950, ending before they begin) or that no datetime holds (year 0). Its signature no
    longer verifies; nothing that reads a release-signing certificate checks it."""
    placeholders = (dt.datetime(2050, 1, 1), dt.datetime(2051, 1, 1))  # GeneralizedTime, 15 bytes
    der = x509.load_pem_x509_certificate(
        self_signed_pem(key, "oddly dated", not_before=placeholders[0], not_after=placeholders[1])
    ).public_bytes(serialization.Encoding.DER)
    for placeholder, value in zip(placeholders, (not_before, not_after), strict=True):
        encoded = placeholder.strftime("%Y%m%d%H%M%SZ").encode()
        assert len(value) == len(encoded) and der.count(encoded) == 1
        der = der.replace(encoded, value)
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
