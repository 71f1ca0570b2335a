"""The verifier's collateral cache: a directory of verified CRLs, TDX TCB info and QE identities.

Everything that can be withheld or rolled back — CRLs, TCB info, the QE identity — is judged by
the broker from this cache, never taken from the evidence. Documents are verified on the way in
(signature by an issuer that chains to the pinned roots, the issuer chain valid when the document
was issued) and refused if they would roll back what the cache already holds:

* a TDX TCB info with a lower ``tcbEvaluationDataNumber`` than the highest this cache has accepted
  for its FMSPC, or the same number issued earlier (``Reason.COLLATERAL_ROLLBACK``);
* likewise for the QE identity, and a CRL whose ``thisUpdate`` is older than the one held.

A CRL without ``nextUpdate`` is refused (``Reason.COLLATERAL_STALE``): the verifier never holds
one current.

A file in the directory that no longer passes these checks when read (stored by an older broker
whose parser was laxer, damaged, foreign) is skipped with a WARNING and listed by :meth:`refused`;
asked for the document it was, the cache raises ``COLLATERAL_MISSING`` naming the file and why,
not "none held", so that the operator replaces it.

The high-water marks live in ``state.json`` and survive restarts. Layout (stable, documented in
``services/keybroker/POLICY.md``; ``strongroom attest collateral import`` reads the same layout)::

    DIR/crl/<issuer SPKI sha256[:16]>-<scope>.der   CRLs by issuing CA (scope vcek|vlek for AMD)
    DIR/crl/<...>.chain.pem                         the issuer chain the CRL arrived with
    DIR/tdx/tcbinfo/<fmspc>.json (+ .chain.pem)     TDX TCB info per FMSPC, with its issuer chain
    DIR/tdx/qe_identity.json (+ .chain.pem)         TD_QE identity
    DIR/amd/vcek/<hwid>-<tcb>.der                   VCEKs by chip id and reported TCB (bounded)
    DIR/state.json                                  rollback high-water marks
    DIR/generation                                  bumped on every write (readers reload)

A VCEK fetched from KDS is stored only once the report it was fetched for verified with it (its
chain to the pinned ASK and ARK, the report's signature, chip id and TCB): the report names the
chip and TCB that are fetched, and before that check anyone can send one. At most ``max_vceks``
(default :data:`MAX_VCEKS`) are held, on disk and in memory; storing one more removes the oldest
stored. 4,096 VCEKs are about 6 MB, and more chip-and-TCB pairs than that calling one broker
only cost a KDS fetch each when an evicted one returns.

Several broker replicas may share the directory read-only (``writable=False``); writers serialise
with a lock file and replace files atomically, and readers reload when ``generation`` changes
(checked at most every ``reload_interval`` seconds, so the release path does not touch the disk),
holding the same lock file shared while they read, so that no reload pairs a document with the
issuer chain of another write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from strongroom import jsonparse
from strongroom.attestation._x509 import check_valid_at, verify_crl_signature, verify_issued_by
from strongroom.attestation.abi.certs import certificates_from_bytes, common_name, load_certificate
from strongroom.attestation.abi.snp import SnpReport
from strongroom.attestation.collateral import (
    QeIdentity,
    SignedDocument,
    TcbInfo,
    amd_crl_scope,
    parse_qe_identity,
    parse_tcb_info,
)
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.attestation.trust import TrustStore
from strongroom.attestation.verify import _crl
from strongroom.errors import InvalidArgument, StrongroomError
from strongroom.files import (
    BoundedFlock,
    LockFailed,
    LockHeld,
    atomic_write,
    lock_held,
    read_file,
    shared_flock,
)
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

AMD_CRL_SCOPES = ("vcek", "vlek")
_QE_KEY = "TD_QE"
#: The most VCEKs a cache holds (see the module docstring).
MAX_VCEKS = 4096
#: The longest a reload (in a release) or a write waits for ``.lock``: any process that can open
#: the file can hold its ``flock`` for ever (read access is enough). A write holds it while it
#: reads the directory twice and replaces a few files: milliseconds to a second for a full cache.
LOCK_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class CacheEntry:
    """What one cached document covers and until when (for ``collateral ls`` and refresh)."""

    kind: str  # "crl", "tdx-tcb-info", "tdx-qe-identity", "vcek"
    key: str  # issuer CN + scope, FMSPC, "TD_QE", hwid-tcb
    path: Path
    issued: datetime
    next_update: datetime | None
    tcb_evaluation_data_number: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able view."""
        return {
            "kind": self.kind,
            "key": self.key,
            "path": str(self.path),
            "issued": self.issued.isoformat(),
            "next_update": self.next_update.isoformat() if self.next_update else None,
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
        }


@dataclass(frozen=True)
class _CachedCrl:
    data: bytes
    issuer: x509.Certificate
    entry: CacheEntry


def issuer_id(cert: x509.Certificate) -> str:
    """A short stable id of a CA: the first 16 hex digits of its SPKI SHA-256."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:16]


def _crl_key(issuer: x509.Certificate, scope: str) -> str:
    return f"{issuer_id(issuer)}-{scope or 'ca'}"


def _bad(what: str) -> MalformedEvidence:
    return MalformedEvidence(f"collateral: {what}", reason=Reason.BAD_COLLATERAL)


def _corrupt_state(problem: str) -> CollateralUnavailable:
    return CollateralUnavailable(
        f"the collateral cache's state.json is {problem}: restore it, or remove it deliberately "
        "(it holds the marks that refuse rolled-back collateral)",
        reason=Reason.COLLATERAL_STATE_CORRUPT,
    )


def _valid_mark(mark: object) -> bool:
    """A high-water mark as :meth:`CollateralCache._check_high_water` writes it."""
    if not isinstance(mark, dict) or set(mark) != {"n", "issued"}:
        return False
    number, issued = mark["n"], mark["issued"]
    if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
        return False
    try:
        return isinstance(issued, str) and _utc(issued).tzinfo is not None
    except ValueError:
        return False


def _lock_held(path: Path, waited: float) -> str:
    """Why ``.lock`` (``path``) could not be had: another process held it all ``waited`` s."""
    return lock_held(
        f"the collateral cache's lock file {path}", waited, "a write holds it for well under that"
    )


def _rollback(what: str) -> VerificationFailed:
    return VerificationFailed(what, reason=Reason.COLLATERAL_ROLLBACK)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


class CollateralCache:
    """A directory of verified collateral; a :class:`CollateralSource` for the verifiers."""

    def __init__(
        self,
        directory: Path,
        trust: TrustStore,
        *,
        writable: bool = True,
        reload_interval: float = 2.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_vceks: int = MAX_VCEKS,
    ) -> None:
        if max_vceks < 1:
            raise ValueError("max_vceks must be positive")
        self.directory = Path(directory)
        self._max_vceks = max_vceks
        self._trust = trust
        self._writable = writable
        self._reload_interval = reload_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._generation: bytes | None = None
        self._crls: dict[str, _CachedCrl] = {}
        self._tcb: dict[bytes, tuple[SignedDocument, TcbInfo, CacheEntry]] = {}
        self._qe: tuple[SignedDocument, QeIdentity, CacheEntry] | None = None
        self._vceks: dict[str, bytes] = {}
        # The validity (notBefore, notAfter) of each held VCEK looked up since the last load, by
        # its bytes: parsed once, not on every release.
        self._vcek_windows: dict[bytes, tuple[datetime, datetime]] = {}
        self._refused: dict[Path, str] = {}
        # The last reload read without the lock (held past LOCK_WAIT_SECONDS): reload again.
        self._unlocked = False
        # Why the last reload read without the lock, as logged (None: it had the lock). A file
        # system whose flock always fails logged the same ERROR at every reload (every check,
        # 2 s by default): logged once now, and again only when that changes. A held lock is
        # logged at each reload: each waited LOCK_WAIT_SECONDS inside a release.
        self._lock_trouble: str | None = None
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._load()

    def __repr__(self) -> str:
        return f"CollateralCache({str(self.directory)!r}, writable={self._writable})"

    # ---------------------------------------------------------------- reading -----------------

    def _load(self) -> None:
        """(Re)reads the directory as writers leave it: under a shared ``flock`` of ``.lock``,
        which a writer holds exclusively while it replaces files (:meth:`_writing`), so a
        document is never read beside the issuer chain of another write.

        That lock held past :data:`LOCK_WAIT_SECONDS` (anyone who can open the file can hold
        it), or ``flock`` failing on it, the directory is read without it, as where there is no
        lock file, and the next check reloads again: a holder that is no writer keeps every
        writer out, so the files are one write's; what a writer stuck in a write left
        half-replaced fails its checks and is refused as an unreadable file is
        (COLLATERAL_MISSING naming it), never trusted. Logged at ERROR: each reload that waited
        out a held lock (it held the release that checked), a ``flock`` that fails (no wait) once
        and again when why changes; the lock working again is logged at INFO."""
        lock_path = self.directory / ".lock"
        try:
            lock = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no writer has written here yet
            self._read_all()
            return
        try:
            waited = LOCK_WAIT_SECONDS  # read now: tests shorten it
            try:
                with shared_flock(lock, seconds=waited):
                    self._read_all()
                    self._unlocked = False
                if self._lock_trouble_is(None):
                    log.info("the collateral cache's lock file %s locks again", lock_path)
                return
            except LockHeld:
                # Each such reload held the release that checked for the whole wait: logged
                # each time, the line that ties that wait to its cause.
                self._lock_trouble_is(why := _lock_held(lock_path, waited))
                log.error("%s; reading the collateral cache without it", why)
            except LockFailed as exc:
                why = f"cannot lock the collateral cache's lock file {lock_path}: {exc}"
                if self._lock_trouble_is(why):
                    log.error(
                        "%s; reading the collateral cache without it at each check until it "
                        "locks (not logged again unless that changes)",
                        why,
                    )
            self._read_all()
            self._unlocked = True
        finally:
            os.close(lock)

    def _lock_trouble_is(self, why: str | None) -> bool:
        """Records ``why`` the reload read without the lock (None: it had it); whether that
        changed, and so is to be logged (reloads of several threads log it once)."""
        with self._lock:
            changed, self._lock_trouble = why != self._lock_trouble, why
        return changed

    def _read_all(self) -> None:
        """Reads the directory; documents that no longer parse are skipped with a warning."""
        gen_path = self.directory / "generation"
        try:
            self._generation = gen_path.read_bytes()
        except OSError:
            self._generation = None
        refused: dict[Path, str] = {}
        crls: dict[str, _CachedCrl] = {}
        for path in sorted((self.directory / "crl").glob("*.der")):
            try:
                data = path.read_bytes()
                chain_path = path.with_suffix(".chain.pem")
                chain = chain_path.read_bytes() if chain_path.exists() else None
                scope = path.stem.rsplit("-", 1)[1]
                issuer, entry = self._check_crl(data, chain, "" if scope == "ca" else scope)
                crls[path.stem] = _CachedCrl(data, issuer, entry)
            except (OSError, IndexError, StrongroomError) as exc:
                log.warning("skipping cached CRL %s: %s", path, exc)
                refused[path] = _why(exc)
        tcb: dict[bytes, tuple[SignedDocument, TcbInfo, CacheEntry]] = {}
        for path in sorted((self.directory / "tdx" / "tcbinfo").glob("*.json")):
            try:
                signed = SignedDocument(
                    path.read_bytes(), path.with_suffix(".chain.pem").read_bytes()
                )
                info = self._check_signed(signed, tcb_info=True)
                assert isinstance(info, TcbInfo)
                tcb[info.fmspc] = (signed, info, self._entry(info, path))
            except (OSError, StrongroomError) as exc:
                log.warning("skipping cached TCB info %s: %s", path, exc)
                refused[path] = _why(exc)
        qe = None
        qe_path = self.directory / "tdx" / "qe_identity.json"
        if qe_path.exists():
            try:
                signed = SignedDocument(
                    qe_path.read_bytes(), qe_path.with_suffix(".chain.pem").read_bytes()
                )
                ident = self._check_signed(signed, tcb_info=False)
                assert isinstance(ident, QeIdentity)
                qe = (signed, ident, self._entry(ident, qe_path))
            except (OSError, StrongroomError) as exc:
                log.warning("skipping cached QE identity %s: %s", qe_path, exc)
                refused[qe_path] = _why(exc)
        vceks: dict[str, bytes] = {}
        # The newest only, should the directory hold more (a writer with a larger bound).
        for path in _oldest_first(self._vcek_dir().glob("*.der"))[-self._max_vceks :]:
            with contextlib.suppress(OSError):
                vceks[path.stem] = path.read_bytes()
        with self._lock:
            self._crls, self._tcb, self._qe, self._vceks = crls, tcb, qe, vceks
            self._vcek_windows = {}
            self._refused = refused

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self._reload_interval:
            return
        self._checked_at = now
        try:
            generation = (self.directory / "generation").read_bytes()
        except OSError:
            generation = None
        if generation != self._generation or self._unlocked:
            self._load()

    def crl(self, issuer: x509.Certificate, scope: str = "") -> bytes | None:
        """The held CRL of ``issuer`` (for ``scope``), or ``None``; a refused file in its place
        is :class:`CollateralUnavailable` saying why (:meth:`_refused_in_place`)."""
        self._maybe_reload()
        key = _crl_key(issuer, scope)
        held = self._crls.get(key)
        if held is None:
            self._refused_in_place(
                self.directory / "crl" / f"{key}.der",
                f"{scope or 'CA'} CRL of {common_name(issuer) or issuer.subject.rfc4514_string()!r}",
            )
        return held.data if held is not None else None

    def tdx_tcb_info(self, fmspc: bytes) -> SignedDocument | None:
        """The held TCB info for the FMSPC, or ``None``; a refused file in its place is
        :class:`CollateralUnavailable` saying why."""
        self._maybe_reload()
        held = self._tcb.get(bytes(fmspc))
        if held is None:
            self._refused_in_place(
                self.directory / "tdx" / "tcbinfo" / f"{bytes(fmspc).hex()}.json",
                f"TDX TCB info for FMSPC {bytes(fmspc).hex()}",
            )
        return held[0] if held is not None else None

    def tdx_qe_identity(self) -> SignedDocument | None:
        """The held TD_QE identity, or ``None``; a refused file in its place is
        :class:`CollateralUnavailable` saying why."""
        self._maybe_reload()
        held = self._qe
        if held is None:
            self._refused_in_place(self.directory / "tdx" / "qe_identity.json", "TD_QE identity")
        return held[0] if held is not None else None

    def _refused_in_place(self, path: Path, what: str) -> None:
        """Raises COLLATERAL_MISSING naming the document ``what`` and why, if the last read refused the file
        there (a document an older, laxer broker stored, a damaged or foreign file). Said as "the
        collateral holds none", the operator looked for a fetch or import that had not happened,
        while the document to replace sat in the directory, named only in a WARNING."""
        with self._lock:
            why = self._refused.get(path)
        if why is not None:
            # Named as a document, not by its file: the message reaches the caller whose
            # release needed it (the gRPC status) and the audit, to whom the broker's file system
            # layout is none of their business; the operator finds the file in the WARNING the
            # read logged and in `collateral ls`.
            raise CollateralUnavailable(
                f"the cached {what} was refused when the collateral cache read it ({why}): "
                "replace it (strongroom attest collateral fetch or import; `strongroom attest "
                "collateral ls` lists every refused file)",
                reason=Reason.COLLATERAL_MISSING,
            )

    def snp_key_certificate(self, report: SnpReport) -> bytes | None:
        """The held VCEK for the report's chip id and reported TCB, or ``None`` (also when the
        held one is outside its validity period at this cache's clock)."""
        self._maybe_reload()
        held = self._vceks
        der = held.get(vcek_key(report.chip_id_for_kds(), report.reported_tcb.components()))
        if der is None:
            return None
        window = self._vcek_windows.get(der)
        if window is None:
            try:
                cert = load_certificate(der)
            except StrongroomError:
                return der  # the verifier names what is wrong with it
            window = (cert.not_valid_before_utc, cert.not_valid_after_utc)
            with self._lock:
                if self._vceks is held:  # not a copy a reload has dropped meanwhile (bounded)
                    self._vcek_windows[der] = window
        if not window[0] <= self._clock() <= window[1]:
            # The broker's copy has aged out (VCEKs are valid seven years; KDS serves each
            # within it): handed to the verifier it refused the genuine report as the caller's
            # CERT_NOT_VALID_AT_TIME (PERMISSION_DENIED, its refusal budget spent), and never
            # fetched again. Not held: a fetching broker asks KDS (VCEK_FETCHED_NOT_VALID if it
            # serves the same), one that does not fetch refuses COLLATERAL_MISSING, its own.
            return None
        return der

    def entries(self) -> list[CacheEntry]:
        """Every held document, for listing and refreshing."""
        self._maybe_reload()
        out = [c.entry for c in self._crls.values()]
        out += [t[2] for t in self._tcb.values()]
        if self._qe is not None:
            out.append(self._qe[2])
        return sorted(out, key=lambda e: (e.kind, e.key))

    def refused(self) -> dict[Path, str]:
        """Documents in the directory that the last read skipped, with why (an older broker's
        document a stricter parser refuses, a damaged or foreign file): a release needing one is
        refused ``COLLATERAL_MISSING`` although the file is there, so ``collateral ls`` shows them."""
        self._maybe_reload()
        with self._lock:
            return dict(self._refused)

    def held_crl_issuers(self) -> list[tuple[x509.Certificate, str]]:
        """(issuer, scope) of every held CRL (what a refresher re-fetches)."""
        self._maybe_reload()
        return [(c.issuer, k.rsplit("-", 1)[1]) for k, c in self._crls.items()]

    def held_fmspcs(self) -> list[bytes]:
        """The FMSPCs a TCB info is held for."""
        self._maybe_reload()
        return list(self._tcb)

    # ---------------------------------------------------------------- verification ------------

    def _entry(self, doc: TcbInfo | QeIdentity, path: Path) -> CacheEntry:
        if isinstance(doc, TcbInfo):
            return CacheEntry(
                "tdx-tcb-info", doc.fmspc.hex(), path, doc.issue_date, doc.next_update,
                doc.tcb_evaluation_data_number,
            )  # fmt: skip
        return CacheEntry(
            "tdx-qe-identity", _QE_KEY, path, doc.issue_date, doc.next_update,
            doc.tcb_evaluation_data_number,
        )  # fmt: skip

    def _check_signed(self, signed: SignedDocument, *, tcb_info: bool) -> TcbInfo | QeIdentity:
        from strongroom.attestation.verify.tdx import check_signed_document

        doc: TcbInfo | QeIdentity = (
            parse_tcb_info(signed.data) if tcb_info else parse_qe_identity(signed.data)
        )
        # The issuer chain must have been valid when the document was issued (Intel's 2018
        # TCB-signing certificate expired in 2025; documents it signed before then stay good).
        check_signed_document(doc, signed.issuer_chain, self._trust, doc.issue_date)
        return doc

    def _crl_issuers(self, chain: bytes | None) -> list[x509.Certificate]:
        """Pinned CAs plus the chain's CAs that chain to a pinned root (PCK CAs)."""
        pinned: list[x509.Certificate] = [r.cert for r in self._trust.intel_roots()]
        for roots in self._trust.amd_roots():
            pinned.append(roots.ark.cert)
        out = list(pinned)
        if chain:
            for der in certificates_from_bytes(chain):
                cert = load_certificate(der)
                for root in pinned:
                    if cert.issuer == root.subject and cert.subject != root.subject:
                        try:
                            verify_issued_by(cert, root)
                        except VerificationFailed:
                            continue
                        out.append(cert)
        return out

    def _check_crl(
        self, data: bytes, chain: bytes | None, scope: str
    ) -> tuple[x509.Certificate, CacheEntry]:
        crl = _crl.load_crl(data)
        for issuer in self._crl_issuers(chain):
            if issuer.subject == crl.issuer and verify_crl_signature(crl, issuer):
                break
        else:
            raise VerificationFailed(
                f"CRL from {crl.issuer.rfc4514_string()!r} is not signed by a pinned CA or a CA "
                "of its issuer chain",
                reason=Reason.CRL_SIGNATURE_INVALID if chain else Reason.ROOT_NOT_TRUSTED,
            )
        if issuer not in pinned_list(self._trust):
            check_valid_at(issuer, crl.last_update_utc, "CRL issuer")
        if crl.next_update_utc is None:
            # The verifier holds such a CRL stale (it would be current forever); cached, it would
            # also be "due" on every release and re-fetched each time.
            raise CollateralUnavailable(
                f"CRL from {crl.issuer.rfc4514_string()!r} has no nextUpdate",
                reason=Reason.COLLATERAL_STALE,
            )
        is_amd = common_name(issuer).startswith("ARK-")
        if is_amd != (scope in AMD_CRL_SCOPES):
            raise _bad("an AMD ARK CRL needs scope vcek or vlek; an Intel CRL none")
        named = amd_crl_scope(crl) if is_amd else None
        if named is not None and named != scope:
            # Filed under the other scope (an import's file name, a fetch's URL), it would judge
            # the other chains and its rollback mark would refuse the genuine CRL of that scope.
            raise VerificationFailed(
                f"CRL of {common_name(issuer)} is its {named} CRL (issuing distribution point), "
                f"not its {scope} CRL",
                reason=Reason.COLLATERAL_MISMATCH,
            )
        key = _crl_key(issuer, scope)
        entry = CacheEntry(
            "crl",
            f"{common_name(issuer)}{'/' + scope if scope else ''}",
            self.directory / "crl" / f"{key}.der",
            crl.last_update_utc,
            crl.next_update_utc,
        )
        return issuer, entry

    # ---------------------------------------------------------------- writing -----------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict[str, Any]]:
        if not self._writable:
            raise PermissionError(f"collateral cache {self.directory} is read-only here")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_path = self.directory / ".lock"
            with open(lock_path, "a+b") as lock:
                waited = LOCK_WAIT_SECONDS  # read now: tests shorten it
                if not BoundedFlock(lock.fileno(), fcntl.LOCK_EX).acquire(waited):
                    # As a full or read-only volume: nothing stored, the caller backs off.
                    raise OSError(errno.EWOULDBLOCK, _lock_held(lock_path, waited))
                try:
                    self._read_all()  # another writer may have moved the high-water marks
                    state = self._read_state()
                    yield state
                    atomic_write(
                        self.directory / "state.json",
                        json.dumps(state, indent=1, sort_keys=True).encode(),
                    )
                    generation = f"{time.time_ns()}\n".encode()
                    atomic_write(self.directory / "generation", generation)
                    self._read_all()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as exc:
            # A full or read-only volume: what was being stored is not kept (callers that fetched
            # it log this and back off like a failed fetch), never an untyped error on a release.
            raise CollateralUnavailable(
                f"collateral cache {self.directory} cannot be written: "
                f"{exc.strerror or type(exc).__name__}",
                reason=Reason.COLLATERAL_STORE_FAILED,
            ) from None

    def _read_state(self) -> dict[str, Any]:
        """The high-water marks. A state.json that cannot be read or has the wrong shape is the
        broker's own problem, never the caller's: CollateralUnavailable (COLLATERAL_STATE_CORRUPT)
        and nothing stored, rather than INVALID_ARGUMENT to whoever's release needed collateral
        stored, or an untyped error on a mark of the wrong shape."""
        path = self.directory / "state.json"
        try:
            state = jsonparse.loads(path.read_bytes())
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as exc:
            # The high-water marks are what stops rollback: never start over silently.
            raise _corrupt_state(f"unreadable ({exc})") from None
        if not isinstance(state, dict):
            raise _corrupt_state("not a JSON object")
        for key in ("tcb_info", "qe_identity", "crl"):
            marks = state.setdefault(key, {})
            if not isinstance(marks, dict) or not all(map(_valid_mark, marks.values())):
                raise _corrupt_state(f"its {key} marks are not objects of n and issued")
        return state

    @staticmethod
    def _check_high_water(
        marks: dict[str, Any], key: str, number: int | None, issued: datetime, what: str
    ) -> None:
        """Refuses a document older than the newest accepted one for ``key``; records it."""
        mark = marks.get(key)
        if mark is None:
            marks[key] = {"n": number, "issued": issued.isoformat()}
            return
        best_n: int | None = mark.get("n")
        best_issued = _utc(mark["issued"])
        if number is not None and best_n is not None and number < best_n:
            raise _rollback(
                f"{what} has tcbEvaluationDataNumber {number}, older than {best_n} already accepted"
            )
        if (number is None or number == best_n) and issued < best_issued:
            raise _rollback(
                f"{what} was issued {issued.isoformat()}, before the one already accepted "
                f"({best_issued.isoformat()})"
            )
        numbers = [n for n in (number, best_n) if n is not None]
        marks[key] = {
            "n": max(numbers) if numbers else None,
            "issued": max(issued, best_issued).isoformat(),
        }

    def put_tdx_tcb_info(self, data: bytes, issuer_chain: bytes) -> CacheEntry:
        """Verifies and stores a TDX TCB info (refusing a rollback for its FMSPC)."""
        signed = SignedDocument(bytes(data), bytes(issuer_chain))
        info = self._check_signed(signed, tcb_info=True)
        assert isinstance(info, TcbInfo)
        path = self.directory / "tdx" / "tcbinfo" / f"{info.fmspc.hex()}.json"
        with self._writing() as state:
            self._check_high_water(
                state["tcb_info"], info.fmspc.hex(), info.tcb_evaluation_data_number,
                info.issue_date, f"TCB info for FMSPC {info.fmspc.hex()}",
            )  # fmt: skip
            atomic_write(path.with_suffix(".chain.pem"), signed.issuer_chain)
            atomic_write(path, signed.data)
        return self._entry(info, path)

    def put_tdx_qe_identity(self, data: bytes, issuer_chain: bytes) -> CacheEntry:
        """Verifies and stores the TD_QE identity (refusing a rollback)."""
        signed = SignedDocument(bytes(data), bytes(issuer_chain))
        ident = self._check_signed(signed, tcb_info=False)
        assert isinstance(ident, QeIdentity)
        path = self.directory / "tdx" / "qe_identity.json"
        with self._writing() as state:
            self._check_high_water(
                state["qe_identity"], _QE_KEY, ident.tcb_evaluation_data_number,
                ident.issue_date, "QE identity",
            )  # fmt: skip
            atomic_write(path.with_suffix(".chain.pem"), signed.issuer_chain)
            atomic_write(path, signed.data)
        return self._entry(ident, path)

    def put_crl(
        self, data: bytes, *, issuer_chain: bytes | None = None, scope: str = ""
    ) -> CacheEntry:
        """Verifies and stores a CRL (``scope`` ``vcek``/``vlek`` for an AMD ARK's)."""
        data = bytes(data)
        if not data.startswith(b"\x30"):
            data = _der_crl(data)
        _issuer, entry = self._check_crl(data, issuer_chain, scope)
        with self._writing() as state:
            self._check_high_water(
                state["crl"], entry.path.stem, None, entry.issued, f"CRL of {entry.key}"
            )
            if issuer_chain:
                atomic_write(entry.path.with_suffix(".chain.pem"), issuer_chain)
            atomic_write(entry.path, data)
        return entry

    def _vcek_dir(self) -> Path:
        return self.directory / "amd" / "vcek"

    def put_vcek(self, data: bytes, report: SnpReport) -> None:
        """Verifies and stores a VCEK fetched for ``report``,
        evicting the oldest beyond the bound.

        Stored only if ``report`` verifies with it (chain to the pinned ASK/ARK, signature, chip
        id and TCB bindings), else nothing is written: the file is shared with every replica and
        named after what the report claims. A certificate that does not chain to a pinned AMD
        root is the fetch's failure, whatever the report: :class:`CollateralUnavailable`
        (``VCEK_FETCHED_UNTRUSTED``), and so is one outside its validity period
        at this cache's clock (``VCEK_FETCHED_NOT_VALID``, once ``report`` verifies with it as of
        its notBefore: else the report's own refusal) and one of AMD's that is not the VCEK
        asked for (another chip, TCB or product: ``VCEK_FETCHED_MISMATCH``); otherwise the
        verifier's refusal.
        """
        from strongroom.attestation.verify.snp import (
            fetched_vcek_mismatch,
            verify_key_chain,
            verify_report_key,
        )

        der = certificates_from_bytes(data)[0]
        now = self._clock()
        try:
            verified = verify_key_chain(der, self._trust, now)
        except VerificationFailed as exc:
            if exc.reason == Reason.CERT_NOT_VALID_AT_TIME:
                # AMD KDS serves each VCEK within its validity: one outside it (an old one a
                # proxy or mirror kept) is the broker's source, not the caller's evidence. Handed
                # on, the verifier refused the report CERT_NOT_VALID_AT_TIME, the caller's fault
                # (PERMISSION_DENIED, its refusal budget spent) for the broker's own fetch.
                # Unless the report is not the chip's: what was fetched depends only on the chip
                # id and TCB the (unverified) report names, so a forged one naming a chip whose
                # VCEK is served expired made its own refusal the broker's (UNAVAILABLE, outside
                # its refusal budget, and the genuine platform's fetch backed off). It is judged
                # with the VCEK as of when that was valid: a report it does not verify is refused
                # as the verifier names it, the caller's.
                _judged_while_valid(report, der, self._trust)
                raise CollateralUnavailable(
                    "the VCEK fetched from AMD KDS (the broker's kds_url) is outside its "
                    "validity period "
                    f"({exc.message}): is the broker's kds_url AMD KDS, or a proxy serving an "
                    "old certificate?",
                    reason=Reason.VCEK_FETCHED_NOT_VALID,
                ) from None
            # AMD KDS serves only certificates of AMD's chain, for any chip id and TCB a report
            # can name: one that is not is the broker's source (a kds_url that is not KDS, a
            # proxy answering for it), never the caller's evidence (ROOT_NOT_TRUSTED, which
            # spent the caller's refusal budget and told it to fix what it sent).
            # The verifier's words name the certificate's issuer: whatever answered at the
            # broker's kds_url (an internal cache, an inspecting proxy) chose it, so they go to
            # the broker's log, and the message (the caller's status, the audit) says the kind.
            log.warning(
                "a VCEK fetched from the broker's kds_url does not chain to a pinned AMD root",
                extra={"reason": exc.reason, "detail": exc.message},
            )
            raise CollateralUnavailable(
                "the VCEK fetched from AMD KDS (the broker's kds_url) does not chain to a "
                f"pinned AMD root ({exc.reason}): is the broker's kds_url AMD KDS?",
                reason=Reason.VCEK_FETCHED_UNTRUSTED,
            ) from None
        # Before the report's signature: a VCEK of another chip or TCB does not verify a genuine
        # report, which was then named forged (REPORT_SIGNATURE_INVALID, the caller's fault).
        wrong = fetched_vcek_mismatch(report, verified)
        if wrong is not None:
            raise CollateralUnavailable(
                "the VCEK fetched from AMD KDS (the broker's kds_url) is not the one asked for "
                f"({wrong}): is the "
                "broker's kds_url AMD KDS, or a proxy that answers for another request?",
                reason=Reason.VCEK_FETCHED_MISMATCH,
            )
        verify_report_key(report, der, self._trust, now)
        key = vcek_key(report.chip_id_for_kds(), report.reported_tcb.components())
        path = self._vcek_dir() / f"{key}.der"
        with self._writing():
            atomic_write(path, der)
            others = [p for p in _oldest_first(self._vcek_dir().glob("*.der")) if p != path]
            # Stamped after every other, so that "oldest" is the order of writes even when two
            # land within the file system's timestamp granularity.
            newest = _mtime_ns(others[-1]) if others else 0
            stamp = max(time.time_ns(), newest + 1)
            os.utime(path, ns=(stamp, stamp))
            held = [*others, path]
            for old in held[: max(0, len(held) - self._max_vceks)]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def import_directory(self, source: Path) -> list[CacheEntry]:
        """Imports every document of a directory in this cache's layout (air-gapped transfer).

        Each document is verified and rollback-checked exactly as a fetched one; the first
        refusal stops the import with its reason. A source that is not a directory, holds no
        document, or has one (or its issuer chain) that cannot be read is InvalidArgument
        (FILE_UNREADABLE) naming the file: an import that quietly imported nothing would leave
        an air-gapped broker refusing releases for want of collateral.
        """
        src = Path(source)
        if not src.is_dir():
            raise InvalidArgument(f"{src} is not a directory", reason=Reason.FILE_UNREADABLE)
        done: list[CacheEntry] = []
        for path in sorted((src / "crl").glob("*.der")):
            chain = path.with_suffix(".chain.pem")
            scope = path.stem.rsplit("-", 1)[-1]
            done.append(
                self.put_crl(
                    read_file(path),
                    issuer_chain=read_file(chain) if chain.exists() else None,
                    scope="" if scope == "ca" else scope,
                )
            )
        for path in sorted((src / "tdx" / "tcbinfo").glob("*.json")):
            done.append(
                self.put_tdx_tcb_info(read_file(path), read_file(path.with_suffix(".chain.pem")))
            )
        qe = src / "tdx" / "qe_identity.json"
        if qe.exists():
            done.append(
                self.put_tdx_qe_identity(read_file(qe), read_file(qe.with_suffix(".chain.pem")))
            )
        if not done:
            raise InvalidArgument(
                f"{src} holds no collateral: expected crl/*.der, tdx/tcbinfo/*.json (each with "
                "its .chain.pem) or tdx/qe_identity.json",
                reason=Reason.FILE_UNREADABLE,
            )
        return done


def _judged_while_valid(report: SnpReport, der: bytes, trust: TrustStore) -> None:
    """Raises the verifier's refusal of ``report`` with the VCEK ``der`` (AMD's, fetched for it,
    outside its validity now) judged at the VCEK's notBefore: the signature and bindings a
    genuine report of that chip and TCB passes whenever it is judged. Returns when it passes, or
    when nothing can be judged then (a pinned ASK/ARK not valid at that time either: the broker's
    trust, not the caller's), or when the VCEK is not the one asked for (the source's fault)."""
    from strongroom.attestation.verify.snp import (
        fetched_vcek_mismatch,
        verify_key_chain,
        verify_report_key,
    )

    when = load_certificate(der).not_valid_before_utc
    try:
        held = verify_key_chain(der, trust, when)
    except VerificationFailed:
        return
    if fetched_vcek_mismatch(report, held) is None:
        verify_report_key(report, der, trust, when)


def pinned_list(trust: TrustStore) -> list[x509.Certificate]:
    """Every pinned root/ARK certificate of ``trust``."""
    return [r.cert for r in trust.intel_roots()] + [r.ark.cert for r in trust.amd_roots()]


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed meanwhile: the oldest
        return 0


def _oldest_first(paths: Iterable[Path]) -> list[Path]:
    """``paths`` by modification time (then name), oldest first."""
    return sorted(paths, key=lambda p: (_mtime_ns(p), p.name))


def _why(exc: Exception) -> str:
    """Why a cached file was refused, without its path (an OSError's text names it absolutely;
    the refusal reaches callers, and the file is named within the cache beside it)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def vcek_key(hwid: bytes, tcb: dict[str, int]) -> str:
    """The cache name of a VCEK: chip id hex and the TCB components it was derived for."""
    parts = "-".join(f"{name}{value}" for name, value in tcb.items())
    return f"{hwid.hex()}-{parts}"


def _der_crl(data: bytes) -> bytes:
    """A CRL body as PCS/PCCS may send it (PEM, or hex text from older PCCS) as DER."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        crl = _crl.load_crl(stripped)
        return crl.public_bytes(Encoding.DER)
    try:
        return bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _bad("CRL is neither DER, PEM nor hex") from None
