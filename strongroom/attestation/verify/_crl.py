"""Revocation and freshness checks against the verifier's own CRLs.

Each CA of a verified chain that publishes a CRL must have one from the verifier's collateral
source: its issuer must be that CA, its signature must verify with the CA's key, and it must be
current (``thisUpdate <= now <= nextUpdate + grace``). A missing CRL fails closed
(``Reason.COLLATERAL_MISSING``), a CRL past its next update by more than the grace, or with no
next update at all, is ``Reason.COLLATERAL_STALE``, and a listed certificate is
``Reason.CERT_REVOKED``. The caller names the certificates the CRL must speak for; one its issuer
did not issue is ``Reason.COLLATERAL_MISMATCH`` (it would otherwise pass unchecked). CRLs carried
by the evidence are never consulted.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509

from strongroom.attestation._x509 import parse_crl, verify_crl_signature
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.cryptoparse import X509_PARSE_ERRORS
from strongroom.reasons import Reason

logger = logging.getLogger(__name__)


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Loads a DER or PEM CRL (structure only)."""
    try:
        return parse_crl(data)
    except X509_PARSE_ERRORS:
        raise MalformedEvidence("cannot parse CRL", reason=Reason.BAD_COLLATERAL) from None


@functools.lru_cache(maxsize=64)
def _verified_crl(
    crl_data: bytes, issuer: x509.Certificate
) -> x509.CertificateRevocationList | None:
    """The parsed CRL if ``issuer`` issued and signed it, else ``None`` (cached: a release
    re-checks the same few CRLs, and their signatures do not change)."""
    crl = load_crl(crl_data)
    if crl.issuer != issuer.subject or not verify_crl_signature(crl, issuer):
        return None
    return crl


def check_fresh(
    what: str,
    issued: datetime,
    next_update: datetime | None,
    now: datetime,
    grace: timedelta,
) -> None:
    """Raises unless ``issued <= now <= next_update + grace`` (one rule for CRLs and documents).

    A document without a next update (a CRL may omit it) is stale: nothing says until when its
    issuer vouches for it, and treating it as current would make it current forever.
    """
    if issued > now:
        # The verifier's clock or its own collateral source is wrong, not the evidence:
        # UNAVAILABLE (retry once fixed), as stale collateral is, not a verdict on the caller.
        raise CollateralUnavailable(
            f"{what} is not valid yet at {now.isoformat()} (issued {issued.isoformat()}): is "
            "this verifier's clock behind?",
            reason=Reason.COLLATERAL_NOT_YET_VALID,
        )
    if next_update is None:
        raise CollateralUnavailable(
            f"{what} has no next update, so it cannot be judged current",
            reason=Reason.COLLATERAL_STALE,
        )
    if now > next_update + grace:
        raise CollateralUnavailable(
            f"{what} is stale at {now.isoformat()}: its next update was due "
            f"{next_update.isoformat()} (grace {int(grace.total_seconds())} s)",
            reason=Reason.COLLATERAL_STALE,
        )


def check_revocation(
    crl_data: bytes | None,
    issuer: x509.Certificate,
    covered: Sequence[x509.Certificate],
    now: datetime,
    *,
    grace: timedelta,
    what: str,
) -> None:
    """Checks ``covered``, the certificates of a verified chain that ``issuer`` issued, against
    ``issuer``'s CRL (see the module docstring)."""
    if crl_data is None:
        raise CollateralUnavailable(
            f"no CRL of {what} ({issuer.subject.rfc4514_string()!r}) in the verifier's collateral",
            reason=Reason.COLLATERAL_MISSING,
        )
    data = bytes(crl_data)
    crl = _verified_crl(data, issuer)
    if crl is None:
        raise VerificationFailed(
            f"the CRL held for {what} is not signed by {issuer.subject.rfc4514_string()!r}",
            reason=Reason.CRL_SIGNATURE_INVALID,
        )
    check_fresh(f"CRL of {what}", crl.last_update_utc, crl.next_update_utc, now, grace)
    revoked = _revoked_subject(data, issuer, tuple(covered))
    if revoked is not None:
        raise VerificationFailed(
            f"certificate {revoked!r} is revoked by its issuer's CRL", reason=Reason.CERT_REVOKED
        )


@functools.lru_cache(maxsize=64)
def _revoked_subject(
    crl_data: bytes, issuer: x509.Certificate, covered: tuple[x509.Certificate, ...]
) -> str | None:
    """The subject of the first certificate of ``covered`` that the CRL ``crl_data`` (already
    verified by :func:`_verified_crl`) lists, or ``None``.

    Cached by the CRL's bytes and the certificates: a CRL's list does not change (a new CRL is new
    bytes), and every release re-checks the same chain against the same CRL. A refusal raises
    and so is never cached.
    """
    crl = _verified_crl(crl_data, issuer)
    assert crl is not None  # the caller checked it
    for cert in covered:
        if cert.issuer != crl.issuer:
            # A CRL lists serials of its own issuer's certificates only: skipping this one would
            # report it revocation-checked when nothing was checked.
            raise VerificationFailed(
                f"certificate {cert.subject.rfc4514_string()!r} is issued by "
                f"{cert.issuer.rfc4514_string()!r}, which the CRL of {crl.issuer.rfc4514_string()!r} "
                "cannot speak for",
                reason=Reason.COLLATERAL_MISMATCH,
            )
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            return cert.subject.rfc4514_string()
    return None
