"""The workload identity every Strongroom service holds: key + chain, renewed in the background.

Renewal follows smallstep's ``ca/renew.go``: at 2/3 of the lifetime, with jitter, retried with
exponential back-off; every failure is logged, and :meth:`WorkloadIdentity.healthy` turns False when
renewal keeps failing close to expiry. gRPC servers pick the current certificate up at each new
handshake (``dynamic_ssl_server_credentials``); client channels are rebuilt on rotation by
:class:`~strongroom.pki.channel.RotatingChannel`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from strongroom.closing import Closing
from strongroom.cryptoparse import KEY_PARSE_ERRORS
from strongroom.errors import StrongroomError
from strongroom.pki import _jose
from strongroom.pki._state import (
    STATE_FILE,
    load_state,
    load_superseded,
    prepare_state_dir,
    save_state,
    save_superseded,
    superseded_files,
)
from strongroom.pki._x509 import all_sans, build_csr, generate_key, split_san, verify_chain
from strongroom.pki.channel import RotatingChannel
from strongroom.pki.client import REVOCATION_REASONS, CaClient, ClientCertificate
from strongroom.pki.credentials import Credentials
from strongroom.pki.errors import (
    CaRejected,
    CertificateInvalid,
    IdentityClosed,
    IdentityMismatch,
    InvalidPkiConfig,
    NoIdentity,
)
from strongroom.reasons import Reason
from strongroom.spiffe import SpiffeId

# What makes a persisted identity unusable (resume answers NoIdentity, and the service enrols).
_UNUSABLE_STATE: tuple[type[Exception], ...] = (PermissionError, StrongroomError, *KEY_PARSE_ERRORS)
# What makes a persisted identity not worth revoking when an enrolment replaces it.
_NOT_LIVE: tuple[type[Exception], ...] = (OSError, ValueError, *_UNUSABLE_STATE)
# What keeps a token from being compared with the persisted identity (enrolment reports a bad one).
_UNREADABLE_TOKEN_OR_STATE: tuple[type[Exception], ...] = (*_NOT_LIVE, KeyError, IndexError)
_log = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "IdentityStatus", "RenewalPolicy", "WorkloadIdentity", "utc_now"]

Clock = Callable[[], datetime]
RotationListener = Callable[[Credentials], None]


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class RenewalPolicy:
    """When to renew and when to call the identity unhealthy.

    ``fraction``: renew at this fraction of the lifetime (2/3), ± ``jitter`` * lifetime.
    ``backoff_initial``/``backoff_max``: seconds between failed attempts, doubling each time.
    ``unhealthy_fraction``/``unhealthy_min_remaining``: once renewal has failed, the identity is
    unhealthy when less than ``max(unhealthy_fraction * lifetime, unhealthy_min_remaining)`` is left.
    ``rekey``: renew onto a fresh key each time (``/1.0/rekey``) instead of the same key (``/renew``).
    """

    fraction: float = 2 / 3
    jitter: float = 0.05
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    unhealthy_fraction: float = 0.10
    unhealthy_min_remaining: timedelta = timedelta(seconds=30)
    rekey: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise InvalidPkiConfig("renewal fraction must be between 0 and 1")
        if not 0 <= self.jitter < min(self.fraction, 1 - self.fraction):
            raise InvalidPkiConfig("renewal jitter must keep the renewal time inside the lifetime")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise InvalidPkiConfig("back-off must satisfy 0 < initial <= max")
        if not 0 <= self.unhealthy_fraction < 1:
            raise InvalidPkiConfig("unhealthy_fraction must be in [0, 1)")


@dataclass(frozen=True)
class IdentityStatus:
    """A health snapshot for readiness probes and logs."""

    healthy: bool
    spiffe_id: SpiffeId
    serial: int
    not_after: datetime
    generation: int
    consecutive_failures: int
    last_error: str | None = field(default=None)
    #: Serials of superseded certificates (replaced by a rekey or a new enrolment) that step-ca has
    #: not confirmed revoked yet: each stays renewable by whoever holds a copy of its key.
    unrevoked_serials: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class _Superseded:
    """A certificate this identity replaced with a new key, to revoke at step-ca (key: never logged)."""

    presented: ClientCertificate = field(repr=False)
    serial: int
    not_after: datetime
    replaced_by: int
    attempts: int = 0
    next_attempt: datetime | None = None
    #: Its key + chain kept in the state directory until revoked (None without one).
    kept: Path | None = None


def _token_sans(token: str) -> tuple[str, list[str]]:
    try:
        claims = _jose.unverified_claims(token)
    except ValueError as exc:
        raise InvalidPkiConfig(
            f"the enrolment token is malformed: {exc}", reason=Reason.BAD_TOKEN
        ) from exc
    subject = claims.get("sub")
    sans = claims.get("sans") or [subject]
    if not isinstance(subject, str) or not all(isinstance(s, str) for s in sans):
        raise InvalidPkiConfig(
            "the enrolment token has no usable sub/sans", reason=Reason.BAD_TOKEN
        )
    return subject, list(sans)


def _check_token_names(sans: Sequence[str], expected: SpiffeId | str | None) -> None:
    """Raises :class:`IdentityMismatch` unless the token's ``sans`` carry exactly one URI SAN, the
    workload's own SPIFFE ID ``expected`` (None: any)."""
    if expected is None:
        return
    uris = [s for s in sans if isinstance(split_san(s), x509.UniformResourceIdentifier)]
    if uris != [str(expected)]:
        asked = ", ".join(uris) if uris else "no SPIFFE ID"
        raise IdentityMismatch(
            f"the enrolment token asks for {asked}, not for this workload's identity {expected}: "
            "it was not presented to the CA, and nothing persisted was changed (give "
            "a token minted for this workload's SPIFFE ID)"
        )


def _persisted_identity(ca: CaClient, state: Path, now: datetime) -> Credentials | None:
    """The live identity ``state`` holds (to revoke once replaced), or None."""
    try:
        key, chain, issued_at = load_state(state)
        verify_chain(chain, ca.roots, at=now)
        return Credentials(key, tuple(chain), issued_at=issued_at, generation=1)
    except _NOT_LIVE:
        return None  # nothing there, or nothing step-ca would renew


def _token_replaces(
    token: str, state: Path, now: datetime, roots: Sequence[x509.Certificate]
) -> str | None:
    """Why ``token`` replaces the identity persisted in ``state``: it is unexpired and asks for
    other SANs, or names (``sha``, the root's SHA-256 as ``strongroom pki token`` adds it)
    another of the pinned ``roots`` than the one the persisted chain leads to (a root
    rotation's new CA). None when it does not (or cannot tell: enrolment then reports a bad
    token, and a chain no pinned root issued is not resumed anyway)."""
    try:
        claims = _jose.unverified_claims(token)
        _, sans = _token_sans(token)
        _, chain, _ = load_state(state)
    except _UNREADABLE_TOKEN_OR_STATE:
        return None
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or expires <= now.timestamp():
        return None  # a used or stale token: it can enrol nothing
    persisted = all_sans(chain[0])
    if set(sans) != persisted:
        return (
            f"it asks for {sorted(set(sans))}, the identity persisted in {state} has "
            f"{sorted(persisted)} (renewals would keep those)"
        )
    wanted = claims.get("sha")
    issuer = _anchor_of(chain, roots)
    if isinstance(wanted, str) and issuer is not None:
        have = hashlib.sha256(issuer.public_bytes(serialization.Encoding.DER)).hexdigest()
        if wanted.lower() != have:
            return (
                f"it is for the CA whose root has SHA-256 {wanted.lower()}, the identity "
                f"persisted in {state} was issued under the root with SHA-256 {have} (its "
                "renewals there would fail)"
            )
    return None


def _anchor_of(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The one of ``roots`` that issued the top of ``chain`` (None: none of them)."""
    top = chain[-1]
    for root in roots:
        if top.issuer != root.subject:
            continue
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue  # a root of the same name with another key (a rotation's new root)
        return root
    return None


def _keep_superseded(state: Path, credentials: Credentials) -> Path | None:
    """Writes a certificate about to be replaced to the state directory (see ``_state``)."""
    try:
        return save_superseded(state, credentials)
    except OSError as exc:
        # Its revocation is still attempted; only a restart before it succeeds would forget it.
        _log.error(
            "could not keep superseded certificate 0x%x in %s: %s", credentials.serial, state, exc
        )
        return None


def _forget(kept: Path | None) -> None:
    """Removes a kept superseded certificate once it needs no revocation (a failure is logged:
    the next start retries it, and step-ca answers that it is already revoked)."""
    if kept is None:
        return
    try:
        kept.unlink(missing_ok=True)
    except OSError as exc:
        _log.warning("could not remove %s: %s", kept, exc)


class WorkloadIdentity(Closing):
    """A workload's current key and certificate chain, kept fresh by a background thread.

    Build one with :meth:`start`, :meth:`enrol` or :meth:`resume`; close it with :meth:`close` (or
    use it as a context manager). All methods are thread-safe.
    """

    def __init__(
        self,
        ca: CaClient,
        credentials: Credentials,
        *,
        state_dir: Path | None = None,
        policy: RenewalPolicy | None = None,
        clock: Clock = utc_now,
        auto_renew: bool = True,
    ) -> None:
        self._ca = ca
        self._policy = policy or RenewalPolicy()
        self._clock = clock
        self._state_dir = state_dir
        self._lock = threading.Lock()
        self._renew_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._credentials = credentials
        self._jitter: dict[int, float] = {}
        self._failures = 0
        self._last_error: str | None = None
        self._next_attempt: datetime | None = None
        self._listeners: list[RotationListener] = []
        self._superseded: list[_Superseded] = []
        self._revoke_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if auto_renew:
            self._thread = threading.Thread(
                target=self._run, name=f"pki-renew {credentials.spiffe_id}", daemon=True
            )
            self._thread.start()

    # ----------------------------------------------------------------- construction

    @classmethod
    def enrol(
        cls,
        ca: CaClient,
        token: str,
        *,
        lifetime: timedelta | None = None,
        state_dir: Path | str | None = None,
        policy: RenewalPolicy | None = None,
        clock: Clock = utc_now,
        auto_renew: bool = True,
        spiffe_id: SpiffeId | str | None = None,
    ) -> WorkloadIdentity:
        """Enrols with a one-time token: fresh P-256 key, CSR with exactly the token's SANs.

        ``lifetime`` asks for a certificate lifetime (the CA's default when None). ``spiffe_id``,
        when given, is the workload's own: a token asking for another is refused
        (:class:`IdentityMismatch`) before it is presented or anything persisted is touched.
        """
        _, sans = _token_sans(token)
        # A token for another workload (a secret mounted in the wrong place) enrolled, replaced
        # and revoked the identity persisted here, and only then failed the caller's check.
        _check_token_names(sans, spiffe_id)
        state = Path(state_dir) if state_dir is not None else None
        if state is not None:
            # Before the token is presented: step-ca takes it once, whatever happens after.
            prepare_state_dir(state)
        key = generate_key()
        chain = ca.sign(build_csr(key, sans), token, lifetime=lifetime)
        credentials = Credentials(key, tuple(chain), issued_at=clock(), generation=1)
        if credentials.sans != set(sans):
            raise CertificateInvalid(
                f"the CA issued SANs {sorted(credentials.sans)} instead of {sorted(sans)}",
                reason=Reason.SAN_MISMATCH,
            )
        previous = _persisted_identity(ca, state, clock()) if state is not None else None
        kept = None
        if state is not None:
            if previous is not None:
                kept = _keep_superseded(state, previous)
            save_state(state, credentials)
        _log.info(
            "enrolled workload identity",
            extra={"spiffe_id": str(credentials.spiffe_id), "serial": credentials.serial},
        )
        identity = cls(
            ca, credentials, state_dir=state, policy=policy, clock=clock, auto_renew=auto_renew
        )
        if previous is not None:
            # The state directory held a live identity that this enrolment replaces: revoke it.
            identity._supersede(previous, credentials, kept=kept)
        identity._adopt_superseded()
        return identity

    @classmethod
    def resume(
        cls,
        ca: CaClient,
        state_dir: Path | str,
        *,
        policy: RenewalPolicy | None = None,
        clock: Clock = utc_now,
        auto_renew: bool = True,
    ) -> WorkloadIdentity:
        """Resumes the identity persisted in ``state_dir`` (raises :class:`NoIdentity` if unusable)."""
        state = Path(state_dir)
        try:
            key, chain, issued_at = load_state(state)
        except FileNotFoundError as exc:
            raise NoIdentity(f"no identity persisted in {state}") from exc
        except _UNUSABLE_STATE as exc:
            raise NoIdentity(f"the identity persisted in {state} is unusable: {exc}") from exc
        now = clock()
        try:
            verify_chain(chain, ca.roots, at=now)
            credentials = Credentials(key, tuple(chain), issued_at=issued_at, generation=1)
        except StrongroomError as exc:
            raise NoIdentity(
                f"the identity persisted in {state} is expired or does not verify: {exc.message}"
            ) from exc
        _log.info(
            "resumed workload identity",
            extra={"spiffe_id": str(credentials.spiffe_id), "serial": credentials.serial},
        )
        identity = cls(
            ca, credentials, state_dir=state, policy=policy, clock=clock, auto_renew=auto_renew
        )
        identity._adopt_superseded()
        return identity

    @classmethod
    def start(
        cls,
        ca: CaClient,
        *,
        token: str | None = None,
        state_dir: Path | str | None = None,
        lifetime: timedelta | None = None,
        policy: RenewalPolicy | None = None,
        clock: Clock = utc_now,
        auto_renew: bool = True,
        spiffe_id: SpiffeId | str | None = None,
    ) -> WorkloadIdentity:
        """Resumes from ``state_dir`` when it holds a valid identity, else enrols with ``token``.

        A ``token`` that is still valid and asks for other SANs than the persisted identity has
        (another DNS name, another SPIFFE ID) is the operator's replacement for it: it enrols, and
        the identity it replaces is revoked. Renewals copy a certificate's names, so resuming
        would keep the old ones for ever. ``spiffe_id``, when given, is the workload's own: a
        token for another is refused before it is used (:meth:`enrol`).
        """
        replaced = None
        not_resumed = None
        if state_dir is not None and token is not None:
            replaced = _token_replaces(token, Path(state_dir), clock(), ca.roots)
            if replaced is not None:
                # Before the warning that it replaces the persisted identity: it may not.
                _check_token_names(_token_sans(token)[1], spiffe_id)
        if replaced is not None:
            _log.warning("enrolling with the enrolment token: %s", replaced)
        elif state_dir is not None:
            try:
                return cls.resume(ca, state_dir, policy=policy, clock=clock, auto_renew=auto_renew)
            except NoIdentity as exc:
                if token is None:
                    raise
                not_resumed = exc.message
                _log.info("enrolling with a token: %s", exc.message)
        if token is None:
            raise NoIdentity("no persisted identity and no enrolment token")
        try:
            return cls.enrol(
                ca,
                token,
                lifetime=lifetime,
                state_dir=state_dir,
                policy=policy,
                clock=clock,
                auto_renew=auto_renew,
                spiffe_id=spiffe_id,
            )
        except CaRejected as exc:
            if replaced is not None and "(HTTP 401)" in exc.message:
                # step-ca takes a token even when it refuses the certificate (a provisioner
                # template not yet updated): a restart on that token met a bare 401 for ever.
                raise CaRejected(
                    f"{exc.message}; the enrolment token was to replace the identity persisted "
                    f"in {state_dir} ({replaced}), which is left in place: a token the CA has "
                    "already taken (a restart on the token of an enrolment that failed) cannot "
                    "enrol again: give a fresh one (a Helm pod mints one when it restarts)",
                    reason=exc.reason,
                ) from exc
            if not_resumed is None:
                raise
            # Most often the token beside a damaged or lapsed identity is the one used for it
            # long ago: the CA's bare 401 would hide why this start had to enrol at all.
            raise CaRejected(
                f"{exc.message}; enrolling was needed because {not_resumed[0].lower()}"
                f"{not_resumed[1:]} (a token already used cannot enrol again: give a fresh one)",
                reason=exc.reason,
            ) from exc

    # ----------------------------------------------------------------- accessors

    @property
    def credentials(self) -> Credentials:
        """The current credentials snapshot."""
        with self._lock:
            return self._credentials

    @property
    def spiffe_id(self) -> SpiffeId:
        """This workload's SPIFFE ID (stable across renewals)."""
        return self.credentials.spiffe_id

    @property
    def trust_domain(self) -> str:
        """The trust domain of :attr:`spiffe_id`."""
        return self.spiffe_id.trust_domain

    @property
    def root_pem(self) -> bytes:
        """The pinned root (PEM)."""
        return self._ca.root_pem

    @property
    def generation(self) -> int:
        """Counts rotations: 1 for the first certificate, +1 for each renewal."""
        return self.credentials.generation

    def certificate_pem(self) -> bytes:
        """The current leaf certificate (PEM)."""
        return self.credentials.leaf.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """The current chain (leaf first, PEM)."""
        return self.credentials.chain_pem

    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER of the CURRENT TLS key (changes on rotation when rekeying)."""
        return self.credentials.public_key_der

    def status(self) -> IdentityStatus:
        """Health and renewal state in one snapshot."""
        now = self._clock()
        with self._lock:
            credentials, failures, error = self._credentials, self._failures, self._last_error
            closed = self._closed
            unrevoked = tuple(entry.serial for entry in self._superseded)
        healthy = not closed and credentials.time_valid(now)
        if healthy and failures:
            threshold = max(
                credentials.lifetime * self._policy.unhealthy_fraction,
                self._policy.unhealthy_min_remaining,
            )
            healthy = credentials.remaining(now) > threshold
        return IdentityStatus(
            healthy=healthy,
            spiffe_id=credentials.spiffe_id,
            serial=credentials.serial,
            not_after=credentials.not_after,
            generation=credentials.generation,
            consecutive_failures=failures,
            last_error=error,
            unrevoked_serials=unrevoked,
        )

    def healthy(self) -> bool:
        """False once expired, or when renewal keeps failing and expiry is close (see policy)."""
        return self.status().healthy

    # ----------------------------------------------------------------- rotation

    def add_rotation_listener(self, listener: RotationListener) -> None:
        """Calls ``listener(new_credentials)`` after each rotation (on the renewal thread)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_rotation_listener(self, listener: RotationListener) -> None:
        """Stops calling ``listener``."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def renew_now(self) -> Credentials:
        """Renews immediately in the calling thread; raises on failure (which is also logged)."""
        try:
            return self._rotate()
        except StrongroomError as exc:
            self._record_failure(exc)
            raise

    def _renew_due(self, credentials: Credentials) -> datetime:
        with self._lock:
            jitter = self._jitter.setdefault(
                credentials.generation,
                random.uniform(-self._policy.jitter, self._policy.jitter),  # noqa: S311 - not crypto
            )
        return credentials.effective_start + credentials.lifetime * (self._policy.fraction + jitter)

    def _rotate(self) -> Credentials:
        with self._renew_lock:
            if self._closed:
                raise IdentityClosed("the workload identity is closed")
            current = self.credentials
            presented = ClientCertificate(current.key_pem, current.chain_pem)
            if self._policy.rekey:
                key = generate_key()
                chain = self._ca.rekey(presented, build_csr(key, sorted(current.sans)))
            else:
                key = current.key
                chain = self._ca.renew(presented)
            renewed = Credentials(
                key, tuple(chain), issued_at=self._clock(), generation=current.generation + 1
            )
            if renewed.spiffe_id != current.spiffe_id or renewed.sans != current.sans:
                raise CertificateInvalid(
                    "the renewed certificate names a different identity", reason=Reason.SAN_MISMATCH
                )
            rekeyed = renewed.public_key_der != current.public_key_der
            kept = None
            if self._state_dir is not None:
                if rekeyed:
                    kept = _keep_superseded(self._state_dir, current)
                try:
                    save_state(self._state_dir, renewed)
                except OSError as exc:
                    # The new identity is valid; only a restart would miss it. Loud, not fatal.
                    _log.error(
                        "could not persist the renewed identity to %s: %s", self._state_dir, exc
                    )
            with self._lock:
                self._credentials = renewed
                self._failures = 0
                self._last_error = None
                self._next_attempt = None
                self._jitter.pop(current.generation, None)
                listeners = list(self._listeners)
        _log.info(
            "renewed workload certificate",
            extra={
                "spiffe_id": str(renewed.spiffe_id),
                "serial": renewed.serial,
                "not_after": renewed.not_after.isoformat(),
                "generation": renewed.generation,
            },
        )
        for listener in listeners:
            try:
                listener(renewed)
            except Exception:
                _log.exception("a certificate rotation listener failed")
        self._wake.set()
        if rekeyed:
            # Re-keyed: the old certificate (and whoever copied its key) must not renew any more.
            self._supersede(current, renewed, kept=kept)
        return renewed

    # ----------------------------------------------------------------- revocation

    def revoke_superseded(self) -> tuple[int, ...]:
        """Retries, now, revoking every superseded certificate not yet revoked; returns their serials.

        A certificate this identity replaced with a new key (a rekey, or an enrolment over a live
        persisted identity) is revoked at step-ca right away, authenticated by itself over mTLS,
        so that nobody can renew it any more. When that fails the new identity is kept and used
        regardless; the failure is logged at ERROR with the serial, the renewal thread retries
        (with the renewal back-off) until it succeeds or the old certificate expires, and
        :meth:`status` lists the serial in ``unrevoked_serials``. Never raises for a CA failure.
        """
        self._revoke_pending(force=True)
        with self._lock:
            return tuple(entry.serial for entry in self._superseded)

    def _adopt_superseded(self) -> None:
        """Resumes revoking the superseded certificates a previous run kept in the state
        directory (it stopped before step-ca confirmed their revocation)."""
        if self._state_dir is None:
            return
        current = self.credentials
        with self._lock:
            tracked = {entry.kept for entry in self._superseded}
        for path in superseded_files(self._state_dir):
            if path in tracked:  # an enrolment over a live identity kept it moments ago
                continue
            try:
                key, chain = load_superseded(path)
                old = Credentials(key, tuple(chain), issued_at=self._clock(), generation=0)
            except _NOT_LIVE as exc:
                _log.error(
                    "cannot read the superseded certificate kept in %s (%s); it is left there "
                    "for an operator ('strongroom pki revoke --cert' it)",
                    path,
                    exc,
                )
                continue
            # With a renewal thread, it revokes them: a start must not wait on an unreachable CA.
            self._supersede(old, current, kept=path, at_once=self._thread is None)

    def _supersede(
        self, old: Credentials, new: Credentials, *, kept: Path | None = None, at_once: bool = True
    ) -> None:
        if old.serial == new.serial:
            # Kept by a run that stopped before the new identity replaced it: it is the current one.
            _forget(kept)
            return
        anchor = self._anchor(old)
        if anchor is None or anchor != self._anchor(new):
            # Issued under another root (another CA, e.g. a root rotation): this CA's TLS would
            # not even accept it, and it is not this CA's to revoke. Another intermediate under
            # the same root is this CA's renewed intermediate: the CA renews certificates issued
            # under it, so it revokes them too.
            _log.warning(
                "the replaced certificate 0x%x of %s was issued by another CA than its "
                "replacement 0x%x; it is not revoked here and stays renewable there until it expires",
                old.serial,
                old.spiffe_id,
                new.serial,
            )
            _forget(kept)
            return
        entry = _Superseded(
            ClientCertificate(old.key_pem, old.chain_pem),
            old.serial,
            old.not_after,
            new.serial,
            next_attempt=None if at_once else self._clock(),
            kept=kept,
        )
        with self._lock:
            self._superseded.append(entry)
        if at_once:
            self._revoke_pending(force=True)
        else:
            self._wake.set()

    def _anchor(self, credentials: Credentials) -> x509.Certificate | None:
        """The pinned root that issued the top of ``credentials``' chain (None: none of them)."""
        return _anchor_of(credentials.chain, self._ca.roots)

    def _revoke_pending(self, *, force: bool = False) -> None:
        with self._revoke_lock:
            with self._lock:
                pending = list(self._superseded)
            for entry in pending:
                now = self._clock()
                if not force and entry.next_attempt is not None and entry.next_attempt > now:
                    continue
                outcome = self._revoke_one(entry, now)
                with self._lock:
                    index = next(i for i, e in enumerate(self._superseded) if e is entry)
                    if outcome is None:
                        del self._superseded[index]
                        _forget(entry.kept)
                    else:
                        self._superseded[index] = outcome
        self._wake.set()

    def _revoke_one(self, entry: _Superseded, now: datetime) -> _Superseded | None:
        """One attempt: None once revoked (or moot), else the entry with its next attempt."""
        spiffe_id = str(self.credentials.spiffe_id)
        extra = {"spiffe_id": spiffe_id, "serial": entry.serial, "replaced_by": entry.replaced_by}
        if now >= entry.not_after:
            _log.warning(
                "superseded certificate 0x%x of %s expired (%s) before step-ca confirmed its "
                "revocation; an expired certificate cannot be renewed, so nothing is left to do",
                entry.serial,
                spiffe_id,
                entry.not_after.isoformat(),
                extra=extra,
            )
            return None
        try:
            revoked_now = self._ca.revoke(
                entry.serial,
                reason_code=REVOCATION_REASONS["superseded"],
                comment=f"superseded by 0x{entry.replaced_by:x}",
                certificate=entry.presented,
            )
        except Exception as exc:  # a failure to revoke must never cost the new identity
            attempts = entry.attempts + 1
            delay = min(
                self._policy.backoff_max, self._policy.backoff_initial * 2.0 ** (attempts - 1)
            )
            detail = str(exc) if isinstance(exc, StrongroomError) else type(exc).__name__
            _log.error(
                "could not revoke superseded certificate 0x%x (decimal %d) of %s at the CA "
                "(attempt %d), retrying in %.1fs: %s. Until it is revoked or expires (%s), whoever "
                "holds a copy of its key can keep renewing it; an operator can revoke it with "
                "'strongroom pki revoke --serial 0x%x'",
                entry.serial,
                entry.serial,
                spiffe_id,
                attempts,
                delay,
                detail,
                entry.not_after.isoformat(),
                entry.serial,
                extra=extra,
            )
            return replace(entry, attempts=attempts, next_attempt=now + timedelta(seconds=delay))
        _log.info(
            "revoked superseded certificate 0x%x of %s%s",
            entry.serial,
            spiffe_id,
            "" if revoked_now else " (step-ca had already revoked it)",
            extra=extra,
        )
        return None

    def _record_failure(self, exc: StrongroomError) -> float:
        now = self._clock()
        with self._lock:
            self._failures += 1
            failures = self._failures
            self._last_error = str(exc)
            delay = min(
                self._policy.backoff_max, self._policy.backoff_initial * 2.0 ** (failures - 1)
            )
            self._next_attempt = now + timedelta(seconds=delay)
            credentials = self._credentials
        remaining = credentials.remaining(now).total_seconds()
        hint = ""
        if isinstance(exc, CaRejected):
            hint = " (the CA refused: this will not fix itself)"
        if remaining <= 0:
            hint = " (the certificate has expired: a new enrolment token is needed)"
        _log.error(
            "certificate renewal failed (attempt %d, %.0fs left before expiry), retrying in %.1fs%s: %s",
            failures,
            remaining,
            delay,
            hint,
            exc,
            extra={"spiffe_id": str(credentials.spiffe_id), "serial": credentials.serial},
        )
        return delay

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                credentials, next_attempt = self._credentials, self._next_attempt
                revocation_due = min(
                    (e.next_attempt for e in self._superseded if e.next_attempt is not None),
                    default=None,
                )
            if revocation_due is not None and revocation_due <= self._clock():
                self._revoke_pending()
                continue
            due = next_attempt or self._renew_due(credentials)
            if revocation_due is not None:
                due = min(due, revocation_due)
            wait = (due - self._clock()).total_seconds()
            if wait > 0:
                self._wake.wait(min(wait, 60.0))
                self._wake.clear()
                continue
            try:
                self._rotate()
            except StrongroomError as exc:
                self._record_failure(exc)
            except Exception as exc:  # a bug must not silently stop renewal
                _log.exception("unexpected error during certificate renewal")
                self._record_failure(StrongroomError(f"unexpected {type(exc).__name__}"))

    # ----------------------------------------------------------------- gRPC

    def server_credentials(self) -> grpc.ServerCredentials:
        """mTLS server credentials that always serve the CURRENT certificate.

        Client certificates are required and verified against the pinned root during the TLS
        handshake; SPIFFE authorisation happens in :class:`~strongroom.pki.authz.SpiffeAuthorizer`.
        """
        root = self.root_pem

        def config(credentials: Credentials) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(credentials.key_pem, credentials.chain_pem)], root_certificates=root
            )

        initial = self.credentials
        served = [initial.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each new handshake: None keeps the current certificate.
            current = self.credentials
            if current.generation == served[0]:
                return None
            served[0] = current.generation
            return config(current)

        return grpc.dynamic_ssl_server_credentials(
            config(initial),
            fetch,  # type: ignore[arg-type]  # gRPC documents None as "unchanged"; the stub omits it
            require_client_authentication=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials for the CURRENT certificate (a fixed snapshot: prefer :meth:`channel`)."""
        credentials = self.credentials
        return grpc.ssl_channel_credentials(
            self.root_pem, credentials.key_pem, credentials.chain_pem
        )

    def channel(
        self,
        target: str,
        *,
        server_name: str | None = None,
        server_id: str | None = None,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> RotatingChannel:
        """A client channel that follows certificate rotation (see :class:`RotatingChannel`).

        ``server_id`` is the SPIFFE ID the server must present: gRPC's own handshake checks, on
        every connection it makes, the DNS name derived from it, which only that workload's
        certificates carry. Without ``server_id``, ``server_name`` overrides the name checked in
        the server's certificate (for targets like ``localhost:port`` whose certificate carries
        ``keybroker``); with it, ``server_name`` is not what is checked.
        """
        return RotatingChannel(
            self, target, server_name=server_name, server_id=server_id, options=options
        )

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stops renewal; the identity can no longer rotate. Idempotent."""
        with self._lock:
            self._closed = True
            unrevoked = [entry.serial for entry in self._superseded]
        if unrevoked:
            _log.error(
                "closing with superseded certificates step-ca has not revoked: %s; they stay "
                "renewable by whoever holds a copy of their keys until revoked "
                "('strongroom pki revoke --serial ...'; an identity with a state directory "
                "retries when it next starts) or expired",
                ", ".join(f"0x{serial:x}" for serial in unrevoked),
            )
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def __repr__(self) -> str:
        credentials = self.credentials
        return (
            f"WorkloadIdentity({credentials.spiffe_id}, serial={credentials.serial}, "
            f"not_after={credentials.not_after.isoformat()})"
        )
