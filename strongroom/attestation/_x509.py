"""Certificate and CRL signature checks shared by the SNP and TDX verifiers."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from strongroom.attestation.errors import (
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.reasons import Reason

AMD_PSS_SALT = 48


def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "<unparseable subject>"


def public_key_of(cert: x509.Certificate) -> CertificatePublicKeyTypes:
    """The certificate's public key; an unknown or malformed key algorithm is malformed input."""
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise MalformedEvidence(
            f"certificate {_name(cert)!r} holds a key of an unsupported or malformed algorithm",
            reason=Reason.BAD_CERTIFICATE,
        ) from None


def verify_issued_by(
    cert: x509.Certificate, issuer: x509.Certificate, *, amd_pss: bool = False
) -> None:
    """Checks that ``issuer`` signed ``cert`` (and that the names chain).

    With ``amd_pss`` the signature must be RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt
    (the only scheme AMD uses); otherwise ECDSA with SHA-256 or SHA-384 is accepted.
    """
    if cert.issuer != issuer.subject:
        raise VerificationFailed(
            f"certificate {_name(cert)!r} was not issued by {_name(issuer)!r}",
            reason=Reason.CERT_CHAIN_INVALID,
        )
    key = public_key_of(issuer)
    try:
        hash_alg = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        hash_alg = None
    try:
        if amd_pss:
            try:
                params = cert.signature_algorithm_parameters
            except (ValueError, UnsupportedAlgorithm):
                params = None
            if not (
                isinstance(key, rsa.RSAPublicKey)
                and isinstance(params, padding.PSS)
                and isinstance(hash_alg, hashes.SHA384)
                and isinstance(params.mgf, padding.MGF1)
                and isinstance(params.mgf._algorithm, hashes.SHA384)
                and params._salt_length == AMD_PSS_SALT
            ):
                raise VerificationFailed(
                    f"certificate {_name(cert)!r} is not signed with RSASSA-PSS/SHA-384/salt 48",
                    reason=Reason.CERT_CHAIN_INVALID,
                )
            key.verify(cert.signature, cert.tbs_certificate_bytes, params, hash_alg)
        else:
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
                hash_alg, hashes.SHA256 | hashes.SHA384
            ):
                raise VerificationFailed(
                    f"certificate {_name(cert)!r} is not ECDSA-signed as expected",
                    reason=Reason.CERT_CHAIN_INVALID,
                )
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise VerificationFailed(
            f"signature on certificate {_name(cert)!r} does not verify with {_name(issuer)!r}",
            reason=Reason.CERT_CHAIN_INVALID,
        ) from None


def check_valid_at(cert: x509.Certificate, now: datetime, what: str) -> None:
    """Checks ``notBefore <= now <= notAfter``."""
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise VerificationFailed(
            f"{what} certificate {_name(cert)!r} is not valid at {now.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} .. "
            f"{cert.not_valid_after_utc.isoformat()})",
            reason=Reason.CERT_NOT_VALID_AT_TIME,
        )


def validity_window(*certs: x509.Certificate) -> tuple[datetime, datetime]:
    """The interval in which every certificate is valid."""
    return (
        max(c.not_valid_before_utc for c in certs),
        min(c.not_valid_after_utc for c in certs),
    )


def ec_public_key(
    cert: x509.Certificate, curve: type[ec.EllipticCurve]
) -> ec.EllipticCurvePublicKey:
    """The certificate's public key, which must be on ``curve``."""
    key = public_key_of(cert)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
        raise VerificationFailed(
            f"certificate {_name(cert)!r} does not hold an {curve.name} key",
            reason=Reason.WRONG_CERTIFICATE_TYPE,
        )
    return key


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """A DER or PEM CRL (structure only); what ``cryptography`` raises for anything else."""
    raw = bytes(data)
    if raw.lstrip().startswith(b"-----BEGIN"):
        crl = x509.load_pem_x509_crl(raw)
    else:
        crl = x509.load_der_x509_crl(raw)
    # The issuer name is parsed only when first read: read here, so that a name that does not
    # parse is this parse's ValueError, not one raised where the CRL is first matched to its CA.
    _ = crl.issuer
    return crl


def verify_crl_signature(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """True when ``issuer`` signed ``crl`` (RSASSA-PSS for AMD, ECDSA for Intel)."""
    try:
        key = issuer.public_key()
        hash_alg = crl.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey):
            params = crl.signature_algorithm_parameters
            if not isinstance(params, padding.PSS | padding.PKCS1v15) or hash_alg is None:
                return False
            key.verify(crl.signature, crl.tbs_certlist_bytes, params, hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey) and hash_alg is not None:
            key.verify(crl.signature, crl.tbs_certlist_bytes, ec.ECDSA(hash_alg))
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    return True
