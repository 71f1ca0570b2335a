"""Revocation checks against supplied CRLs.

A CRL is honoured when its issuer is a certificate of the verified chain: its signature must verify
with that certificate, it must be current at ``now``, and no chain certificate that the same issuer
signed may be listed. CRLs from unrelated issuers are ignored (evidence may carry both the root and
the PCK CA CRL, or an AMD CRL for another product).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509

from strongroom.attestation._x509 import verify_crl_signature
from strongroom.attestation.errors import (
    BAD_COLLATERAL,
    CERT_REVOKED,
    COLLATERAL_EXPIRED,
    CRL_SIGNATURE_INVALID,
    MalformedEvidence,
    VerificationFailed,
)

logger = logging.getLogger(__name__)


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Loads a DER or PEM CRL."""
    try:
        if bytes(data).lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(bytes(data))
        return x509.load_der_x509_crl(bytes(data))
    except ValueError:
        raise MalformedEvidence("cannot parse CRL", reason=BAD_COLLATERAL) from None


def check_revocation(
    crls: Sequence[bytes], chain: Sequence[x509.Certificate], now: datetime
) -> None:
    """Raises :class:`VerificationFailed` if a CRL from a chain issuer revokes a chain certificate."""
    for data in crls:
        crl = load_crl(data)
        issuer = next((c for c in chain if c.subject == crl.issuer), None)
        if issuer is None:
            logger.debug("ignoring CRL from %s: not an issuer in this chain", crl.issuer)
            continue
        if not verify_crl_signature(crl, issuer):
            raise VerificationFailed(
                f"CRL from {crl.issuer.rfc4514_string()!r} is not signed by that issuer",
                reason=CRL_SIGNATURE_INVALID,
            )
        next_update = crl.next_update_utc
        if not (crl.last_update_utc <= now and (next_update is None or now <= next_update)):
            raise VerificationFailed(
                f"CRL from {crl.issuer.rfc4514_string()!r} is not current at {now.isoformat()} "
                f"(this update {crl.last_update_utc.isoformat()}, next update "
                f"{next_update.isoformat() if next_update else 'none'})",
                reason=COLLATERAL_EXPIRED,
            )
        for cert in chain:
            if cert is issuer or cert.issuer != crl.issuer:
                continue
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise VerificationFailed(
                    f"certificate {cert.subject.rfc4514_string()!r} is revoked by its issuer's CRL",
                    reason=CERT_REVOKED,
                )
