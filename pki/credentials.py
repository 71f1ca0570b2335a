"""One issued identity: key, verified chain, and the facts derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.pki._x509 import (
    all_sans,
    cert_spki_der,
    certs_pem,
    not_after,
    not_before,
    private_key_pem,
    single_spiffe_id,
    spki_der,
)
from strongroom.pki.errors import CertificateInvalid
from strongroom.reasons import Reason
from strongroom.spiffe import SpiffeId


@dataclass(frozen=True)
class Credentials:
    """An immutable snapshot of a workload's TLS identity. The key never appears in ``repr``.

    ``issued_at`` is when we received the certificate: step-ca backdates ``notBefore`` (1 minute by
    default), so lifetimes and renewal times are measured from ``max(notBefore, issued_at)``.
    """

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    issued_at: datetime
    generation: int
    spiffe_id: SpiffeId = field(init=False)
    serial: int = field(init=False)
    not_after: datetime = field(init=False)
    key_pem: bytes = field(init=False, repr=False)
    chain_pem: bytes = field(init=False, repr=False)
    public_key_der: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        leaf = self.chain[0]
        if cert_spki_der(leaf) != spki_der(self.key):
            raise CertificateInvalid(
                "the certificate does not belong to the key", reason=Reason.KEY_MISMATCH
            )
        set_ = object.__setattr__
        set_(self, "spiffe_id", single_spiffe_id(leaf))
        set_(self, "serial", leaf.serial_number)
        set_(self, "not_after", not_after(leaf))
        set_(self, "key_pem", private_key_pem(self.key))
        set_(self, "chain_pem", certs_pem(self.chain))
        set_(self, "public_key_der", spki_der(self.key))

    @property
    def leaf(self) -> x509.Certificate:
        """The workload certificate."""
        return self.chain[0]

    @property
    def sans(self) -> set[str]:
        """Every SAN of the leaf as text."""
        return all_sans(self.leaf)

    @property
    def effective_start(self) -> datetime:
        """``max(notBefore, issued_at)``: the start of the lifetime renewal is scheduled on."""
        return max(not_before(self.leaf), min(self.issued_at, self.not_after))

    @property
    def lifetime(self) -> timedelta:
        """Usable lifetime: from :attr:`effective_start` to ``notAfter``."""
        return self.not_after - self.effective_start

    def remaining(self, now: datetime) -> timedelta:
        """Time left until ``notAfter`` (negative once expired)."""
        return self.not_after - now

    def time_valid(self, now: datetime) -> bool:
        """Tells whether ``now`` lies within the leaf's validity."""
        return not_before(self.leaf) <= now <= self.not_after
