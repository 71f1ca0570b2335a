"""How many key releases the broker grants one caller, per certificate and per SPIFFE ID.

Every refusal of the broker is budgeted (:mod:`strongroom.keybroker.refusals`), but a caller whose
evidence is genuine (a real, measured VM: a compromised inference replica, a loader looping) had
``ReleaseKey`` granted as fast as the broker answered, about 340 a second: each an fsync'd
``ALLOWED`` record of about 2.5 KB and an HSM unwrap and re-wrap. That filled a capped audit log
(``AUDIT_LOG_FULL`` then stops every release, everyone's), or with rotation pushed the oldest sealed
files, the evidence of what happened, out of retention within minutes, and took the HSM from the
rest of the fleet.

So a release the policy allowed takes a token from its caller's certificate
(:func:`~strongroom.runtime.callers.certificate_bucket`) and from its SPIFFE ID before the HSM is
asked or anything is recorded ``ALLOWED``; past either it is refused ``RESOURCE_EXHAUSTED``
``RELEASES_RATE_LIMITED`` (the release engine records that refusal once, then counts it, as the
other budgets' refusals); a caller with no grant left is refused so before its evidence is
verified (:meth:`GrantBudget.check`, taking nothing), so that its refusals cost no signature and
chain check each. The certificate's budget first: one replica past its own spends none of
its fleet's. The SPIFFE ID's is the real bound: a replica holding its service's provisioner mints
certificates at will, each with a budget of its own, and every replica of a fleet shares the one
SPIFFE ID. A release refused after its token was taken for the broker's failure (the HSM's, the
audit log's, a bug) gives it back: only grants and the caller's own refusals count. A refusal the
caller caused after its take (a wrapped key it sent that does not unwrap, a key version disabled)
spends it: the caller chooses its wrapped key, and made-up ones, refunded, had the HSM's unwrap
(and, until its releases unwrap first, an ``ALLOWED`` and a ``DENIED`` record) on every call
outside the budget.

The defaults (:class:`GrantLimits`) are sized so that an honest fleet never meets them; see
there. The certificates remembered are bounded (:data:`MAX_CERTIFICATES_TRACKED`), as in the
broker's other per-certificate budgets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from strongroom.errors import ResourceExhausted
from strongroom.reasons import Reason
from strongroom.runtime.callers import MAX_CERTIFICATES_TRACKED, certificate_bucket
from strongroom.runtime.ratelimit import CallerBuckets


@dataclass(frozen=True)
class GrantLimits:
    """Granted releases per caller: ``*_burst`` at once, then ``*_rate`` a second.

    Sized against an honest fleet. Per SPIFFE ID (the fleet's): a cold start of 100 replicas with
    4 models each, all releasing within a minute, is 400 grants; 1,024 at once holds it with room
    to spare (or 250 such replicas) before any refill, and 8 a second after that (480 a minute)
    is a whole such fleet reloading every model every minute, which no honest fleet does. At that
    rate a compromised identity writes about 20 KB of ``ALLOWED`` records a second (72 MB an hour,
    against 3 GB an hour at the broker's 340 a second) and takes about 2 % of its HSM capacity.
    Per certificate (one replica): 64 at once is one replica loading 64 models in a burst of
    ``LoadModel`` calls; 1 a second after that is more than its reloads and failed-load retries
    (at most one per model each 30 s) ever need.
    """

    certificate_burst: int = 64
    certificate_rate: float = 1.0
    identity_burst: int = 1024
    identity_rate: float = 8.0


DEFAULT_GRANT_LIMITS = GrantLimits()


class GrantBudget:
    """The granted releases each caller certificate and SPIFFE ID may still have."""

    def __init__(self, limits: GrantLimits, clock: Callable[[], float]) -> None:
        self._limits = limits
        # At most so many certificates (a replica may mint them): one forgotten starts again at
        # its burst, within its SPIFFE ID's bound.
        self._certificates = CallerBuckets(
            limits.certificate_rate,
            limits.certificate_burst,
            clock=clock,
            max_tracked=MAX_CERTIFICATES_TRACKED,
        )
        self._identities = CallerBuckets(limits.identity_rate, limits.identity_burst, clock=clock)

    def certificates_tracked(self) -> int:
        """How many caller certificates the budget remembers now (at most
        :data:`~strongroom.runtime.callers.MAX_CERTIFICATES_TRACKED`)."""
        return len(self._certificates)

    def check(self, spiffe_id: str, serial: int) -> None:
        """Refuses, as :meth:`take` would, a caller with no grant left in either budget, taking
        nothing: called before its evidence is verified, so that a caller past its budget costs
        the broker no signature and chain check per call, and one within it loses nothing to a
        refusal that follows (its evidence, its policy)."""
        certificate = certificate_bucket(spiffe_id, serial)
        if not self._certificates.available(certificate):
            raise self._past_certificate()
        if not self._identities.available(spiffe_id):
            raise self._past_identity()

    def take(self, spiffe_id: str, serial: int) -> None:
        """Counts one grant to this caller's certificate and SPIFFE ID; past either budget,
        :class:`ResourceExhausted` ``RELEASES_RATE_LIMITED`` (nothing counted)."""
        certificate = certificate_bucket(spiffe_id, serial)
        if not self._certificates.take(certificate):
            raise self._past_certificate()
        if not self._identities.take(spiffe_id):
            self._certificates.refund(certificate)  # no grant: its own budget stays whole
            raise self._past_identity()

    def _past_certificate(self) -> ResourceExhausted:
        limits = self._limits
        return ResourceExhausted(
            f"more than {limits.certificate_burst} key releases granted at once, or more "
            f"than {limits.certificate_rate:g} a second after that, to this certificate; "
            "retry later",
            reason=Reason.RELEASES_RATE_LIMITED,
        )

    def _past_identity(self) -> ResourceExhausted:
        limits = self._limits
        return ResourceExhausted(
            f"more than {limits.identity_burst} key releases granted at once, or more than "
            f"{limits.identity_rate:g} a second after that, to this SPIFFE ID (all its "
            "certificates together); retry later",
            reason=Reason.RELEASES_RATE_LIMITED,
        )

    def refund(self, spiffe_id: str, serial: int) -> None:
        """Gives back the grant :meth:`take` counted for a release that was then refused."""
        self._certificates.refund(certificate_bucket(spiffe_id, serial))
        self._identities.refund(spiffe_id)
