"""One-time tokens for step-ca's JWK provisioner (ES256 JWTs), minted locally: enrolment and revocation."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from datetime import timedelta
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from strongroom.cryptoparse import X509_PARSE_ERRORS
from strongroom.pki import _jose
from strongroom.pki.errors import InvalidPkiConfig
from strongroom.pki.layout import Provisioner
from strongroom.reasons import Reason
from strongroom.spiffe import (
    IDENTITY_DNS_SUFFIX,
    identity_dns_name,
    is_reserved_dns_name,
    is_workload_id,
)

DEFAULT_TOKEN_LIFETIME = timedelta(minutes=5)


def sign_audience(ca_url: str) -> str:
    """``https://<host>:<port>/1.0/sign``: the audience step-ca requires in sign tokens."""
    parts = urlsplit(ca_url)
    if parts.scheme != "https" or not parts.netloc:
        raise InvalidPkiConfig(f"CA URL {ca_url!r} must be https://host[:port]")
    return f"https://{parts.netloc}/1.0/sign"


def revoke_audience(ca_url: str) -> str:
    """``https://<host>:<port>/1.0/revoke``: the audience step-ca requires in revoke tokens."""
    return sign_audience(ca_url).removesuffix("/sign") + "/revoke"


def with_identity_names(sans: Sequence[str]) -> list[str]:
    """``sans`` with the DNS name derived from each workload SPIFFE ID among them
    (:func:`~strongroom.spiffe.identity_dns_name`) right after it, unless already there.

    Raises :class:`InvalidPkiConfig` (``DNS_NAME_RESERVED``) for a name in the reserved suffix
    that is not derived from one of ``sans``' IDs: a certificate carrying another workload's
    derived name would pass for that workload with every channel expecting it.
    """
    derived = {identity_dns_name(s) for s in sans if is_workload_id(s)}
    for name in sans:
        if is_reserved_dns_name(name) and name not in derived:
            raise InvalidPkiConfig(
                f"{name!r} is in the DNS suffix {IDENTITY_DNS_SUFFIX!r}, reserved for the names "
                "derived from SPIFFE IDs, and is not the name of an ID this token asks for",
                reason=Reason.DNS_NAME_RESERVED,
            )
    result: list[str] = []
    for name in sans:
        if name not in result:
            result.append(name)
        if is_workload_id(name) and identity_dns_name(name) not in sans:
            result.append(identity_dns_name(name))
    return result


def mint_token(
    provisioner: Provisioner,
    *,
    ca_url: str,
    subject: str,
    sans: Sequence[str],
    lifetime: timedelta = DEFAULT_TOKEN_LIFETIME,
    root_pem: bytes | None = None,
    now: float | None = None,
) -> str:
    """Mints a one-time token authorising one certificate for ``subject`` with exactly ``sans``
    and, for each workload SPIFFE ID among them, the DNS name derived from it
    (:func:`with_identity_names`: every workload certificate carries it, channels expecting that
    ID check it).

    The CSR presented with it must carry exactly these SANs (enrolment reads them from the
    token; no ``sans``: the subject, as step-ca reads such a token). A subject in the suffix
    reserved for derived names is refused (``DNS_NAME_RESERVED``), as such SANs are.
    ``root_pem``, when given, adds the root's SHA-256 fingerprint as ``sha`` (how step's clients
    bootstrap trust from a token).
    """
    if not subject:
        raise InvalidPkiConfig("a token needs a subject")
    if is_reserved_dns_name(subject):
        # step-ca makes a token without SANs a certificate naming its subject as its one SAN,
        # and gRPC's host-name check takes "*.<suffix>", upper case and a trailing dot too:
        # such a subject passed for every workload (or one) with every channel expecting it.
        raise InvalidPkiConfig(
            f"the subject {subject!r} is in the DNS suffix {IDENTITY_DNS_SUFFIX!r}, reserved for "
            "the names derived from SPIFFE IDs: a token's subject is its SPIFFE ID or a host name",
            reason=Reason.DNS_NAME_RESERVED,
        )
    # Without SANs, step-ca (and enrolment) ask for the subject: the token says so itself.
    extra: dict[str, object] = {"sans": with_identity_names(list(sans) or [subject])}
    if root_pem is not None:
        try:
            root = x509.load_pem_x509_certificate(root_pem)
        except X509_PARSE_ERRORS:
            raise InvalidPkiConfig("the CA's root certificate is not a PEM certificate") from None
        der = root.public_bytes(serialization.Encoding.DER)
        extra["sha"] = hashlib.sha256(der).hexdigest()
    audience = sign_audience(ca_url)
    return _signed(
        provisioner, subject=subject, audience=audience, lifetime=lifetime, now=now, extra=extra
    )


def mint_revoke_token(
    provisioner: Provisioner,
    *,
    ca_url: str,
    serial: int,
    lifetime: timedelta = DEFAULT_TOKEN_LIFETIME,
    now: float | None = None,
) -> str:
    """Mints a one-time token authorising the (passive) revocation of certificate ``serial``.

    As ``step ca revoke`` does, the subject is the serial in decimal. step-ca 0.19 does not compare
    it with the serial of the request: whoever holds the provisioner key may revoke any serial.
    """
    if serial <= 0:
        raise InvalidPkiConfig("a certificate serial is a positive integer")
    audience = revoke_audience(ca_url)
    return _signed(
        provisioner, subject=str(serial), audience=audience, lifetime=lifetime, now=now, extra={}
    )


def _signed(
    provisioner: Provisioner,
    *,
    subject: str,
    audience: str,
    lifetime: timedelta,
    now: float | None,
    extra: dict[str, object],
) -> str:
    """A one-time JWT for ``audience`` signed with the provisioner's key (``extra`` claims
    beside the standard ones)."""
    if lifetime <= timedelta(0) or lifetime > timedelta(hours=1):
        raise InvalidPkiConfig("token lifetime must be positive and at most 1h")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {
        "iss": provisioner.name,
        "sub": subject,
        "aud": audience,
        **extra,
        "jti": secrets.token_hex(32),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(lifetime.total_seconds()),
    }
    header = {"alg": "ES256", "kid": provisioner.kid, "typ": "JWT"}
    return _jose.sign_es256(provisioner.key, header, claims)
