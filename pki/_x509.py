"""X.509 helpers: keys, CSRs, SAN extraction and chain verification against the pinned root."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.cryptoparse import X509_PARSE_ERRORS
from strongroom.pki.errors import CertificateInvalid, InvalidPkiConfig
from strongroom.reasons import Reason
from strongroom.spiffe import SpiffeId

if TYPE_CHECKING:
    from cryptography.x509.verification import ClientVerifier


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (for gRPC, which takes keys only as PEM bytes)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Loads an unencrypted EC private key from PEM."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateInvalid("the stored TLS key is not an EC key", reason=Reason.KEY_INVALID)
    return key


def spki_der(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    """SubjectPublicKeyInfo DER of a key (what attestation binds)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_spki_der(cert: x509.Certificate) -> bytes:
    """SubjectPublicKeyInfo DER of a certificate's key."""
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def csr_spki_der(csr: x509.CertificateSigningRequest) -> bytes:
    """SubjectPublicKeyInfo DER of a CSR's key."""
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    """Concatenated PEM of ``certs`` in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_chain(pem: bytes) -> list[x509.Certificate]:
    """Parses a PEM bundle (leaf first); raises :class:`CertificateInvalid` if empty or malformed."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except X509_PARSE_ERRORS as exc:
        raise CertificateInvalid(
            f"malformed PEM certificate: {exc}", reason=Reason.MALFORMED
        ) from exc
    if not certs:
        raise CertificateInvalid("no certificate in PEM data", reason=Reason.MALFORMED)
    return certs


def split_san(name: str) -> x509.GeneralName:
    """Classifies a token SAN the way step-ca does: IP, e-mail, URI (has a scheme) or DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    if "@" in name:
        return x509.RFC822Name(name)
    return x509.DNSName(name)


def build_csr(key: ec.EllipticCurvePrivateKey, sans: Sequence[str]) -> bytes:
    """A PEM CSR with an empty subject (step-ca takes the CN from the token) and exactly ``sans``."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([split_san(s) for s in sans]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of the certificate, in order."""
    san = _san(cert)
    return [] if san is None else san.get_values_for_type(x509.UniformResourceIdentifier)


def dns_sans(cert: x509.Certificate) -> list[str]:
    """Every DNS SAN of the certificate, in order."""
    san = _san(cert)
    return [] if san is None else san.get_values_for_type(x509.DNSName)


def all_sans(cert: x509.Certificate) -> set[str]:
    """Every DNS, IP, e-mail and URI SAN as text (for comparing with a token's ``sans``)."""
    san = _san(cert)
    if san is None:
        return set()
    out: set[str] = set()
    out.update(san.get_values_for_type(x509.DNSName))
    out.update(san.get_values_for_type(x509.UniformResourceIdentifier))
    out.update(san.get_values_for_type(x509.RFC822Name))
    out.update(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return out


def single_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The certificate's SPIFFE ID: its one and only URI SAN, which must parse as a SPIFFE ID."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise CertificateInvalid(
            f"an X.509-SVID carries exactly one URI SAN, this certificate has {len(uris)}",
            reason=Reason.URI_SAN_COUNT,
        )
    return SpiffeId.parse(uris[0])


def signing_capability(cert: x509.Certificate) -> str | None:
    """Why ``cert`` may not stand for a workload: it is a CA certificate or may sign certificates
    or CRLs (an X.509-SVID leaf may not, SPIFFE X509-SVID §4.3-§4.4, §5.2); None for a leaf.

    TLS accepts such a certificate as a peer's leaf (and a chain through it where the issuer's
    path length allows), so whoever checks an identity checks this too.
    """
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        pass
    else:
        if constraints.ca:
            return "it is a CA certificate (basicConstraints CA:TRUE), not a workload's"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    signs = [
        name
        for name, on in (("keyCertSign", usage.key_cert_sign), ("cRLSign", usage.crl_sign))
        if on
    ]
    if signs:
        return f"its key usage allows {' and '.join(signs)}, which a workload's may not"
    return None


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string() or ", ".join(all_sans(cert)) or "(no subject)"
    return f"{subject!r} (serial 0x{cert.serial_number:x})"


def load_roots(pem: bytes) -> list[x509.Certificate]:
    """Parses a root file: one or more self-signed CA certificates, every one a trust anchor.

    A root file holds more than one certificate while a CA root is rotated (new root + old root,
    see pki/README.md). Anything else in it (an intermediate, a workload certificate) is refused:
    TLS would otherwise trust it as an anchor.
    """
    roots = load_chain(pem)
    for index, cert in enumerate(roots, start=1):
        problem = ""
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            problem = "it has no basicConstraints extension"
        else:
            if not constraints.ca:
                problem = "it is not a CA certificate (basicConstraints CA:FALSE)"
        if not problem and cert.subject != cert.issuer:
            problem = f"it is issued by {cert.issuer.rfc4514_string()!r}, not by itself"
        if not problem:
            try:
                cert.verify_directly_issued_by(cert)
            except (ValueError, TypeError, InvalidSignature) as exc:
                problem = f"its self-signature does not verify ({exc or type(exc).__name__})"
        if problem:
            raise InvalidPkiConfig(
                f"certificate {index} of {len(roots)} in the root file, {_describe(cert)}, is not a "
                f"self-signed root CA certificate: {problem}. The root file must hold only root CA "
                "certificates (during a root rotation: the new root and the old root)",
                reason=Reason.ROOT_BUNDLE_INVALID,
            )
    return roots


def verify_chain(
    chain: Sequence[x509.Certificate],
    roots: x509.Certificate | Sequence[x509.Certificate],
    *,
    at: datetime | None = None,
) -> None:
    """Verifies ``chain`` (leaf first, then intermediates) up to one of the pinned ``roots`` as of ``at``.

    Uses the RFC 5280 path validation of ``cryptography`` with its client-certificate profile (the
    leaf must allow clientAuth, which every Strongroom workload certificate does). A chain that
    fails only because a certificate of it is not valid yet at ``at`` is ``CERT_NOT_YET_VALID``,
    naming that ``notBefore`` and ``at``: what a clock behind the CA's looks like (step-ca backdates
    ``notBefore`` by one minute only).
    """
    from cryptography.x509.verification import VerificationError

    when = at or datetime.now(UTC)
    anchors = [roots] if isinstance(roots, x509.Certificate) else list(roots)
    try:
        _verifier(anchors, when).verify(chain[0], list(chain[1:]))
    except VerificationError as exc:
        _not_yet_valid(chain, anchors, when)
        raise CertificateInvalid(
            f"certificate chain does not verify against the pinned root: {exc}",
            reason=Reason.CHAIN_UNVERIFIED,
        ) from exc


def _verifier(anchors: list[x509.Certificate], when: datetime) -> ClientVerifier:
    from cryptography.x509.verification import PolicyBuilder, Store

    return PolicyBuilder().store(Store(anchors)).time(when).build_client_verifier()


def _not_yet_valid(
    chain: Sequence[x509.Certificate], anchors: list[x509.Certificate], when: datetime
) -> None:
    """Raises CERT_NOT_YET_VALID when the chain fails at ``when`` only for being too early."""
    from cryptography.x509.verification import VerificationError

    early = [(i, c) for i, c in enumerate(chain) if when < c.not_valid_before_utc]
    if not early:
        return
    latest = max(c.not_valid_before_utc for _, c in early)
    try:
        _verifier(anchors, latest).verify(chain[0], list(chain[1:]))
    except VerificationError:
        return  # something else is wrong too: CHAIN_UNVERIFIED says so
    position, cert = early[0]
    what = "the certificate" if position == 0 else "the intermediate CA certificate"
    starts = cert.not_valid_before_utc
    raise CertificateInvalid(
        f"{what} {_describe(cert)} is not valid yet at the local time: notBefore is "
        f"{starts.isoformat()}, the local time is {when.isoformat()} "
        f"({(starts - when).total_seconds():.0f}s earlier). This host's clock is probably behind "
        "the CA's by more than step-ca's one-minute backdate: fix the clock (NTP) on this host",
        reason=Reason.CERT_NOT_YET_VALID,
    )


def not_before(cert: x509.Certificate) -> datetime:
    """Start of validity (aware UTC)."""
    return cert.not_valid_before_utc


def not_after(cert: x509.Certificate) -> datetime:
    """End of validity (aware UTC)."""
    return cert.not_valid_after_utc
