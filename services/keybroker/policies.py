"""Release policies per key: one YAML document per key in a directory, versioned and validated."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from strongroom.attestation.policy import ReleasePolicy
from strongroom.errors import FailedPrecondition, StrongroomError
from strongroom.files import atomic_write
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.keybroker.errors import PolicyUnreadable, StoredPolicyInvalid
from strongroom.keybroker.keys import validate_key_id
from strongroom.keybroker.policy_bounds import check_policy_bounds
from strongroom.reasons import Reason

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredPolicy:
    """A key's policy: the document as written, its parsed form, and the SHA-256 (hex) of the
    document's UTF-8 bytes, which names it in audit records beside its version."""

    document: str
    policy: ReleasePolicy
    sha256: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.document.encode()).hexdigest())


_Stamp = tuple[int, int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    """What identifies a version of a policy file without reading it.

    mtime and size alone miss a replacement by a file of the same size whose mtime a tool kept
    (rsync -a, cp -p, tar x): a revoked caller swapped for an ID of the same length kept its keys
    until a restart. A replaced file has another inode, and any change to a file sets its ctime,
    which no tool can set.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unreadable(key_id: str, problem: str) -> PolicyUnreadable:
    # The problem, not the path: the message may reach a caller; the operator knows the directory.
    return PolicyUnreadable(f"the release policy of {key_id!r} cannot be read: {problem}")


def _read_text(path: str, key_id: str) -> str:
    """The policy file's text; :class:`PolicyUnreadable` when it cannot be read as UTF-8 (a
    hand edit saved in Latin-1 or UTF-16 was a bare UnicodeDecodeError, INTERNAL).

    Read as stored (``newline=""``): universal newlines turned a CRLF document into its LF form,
    so the document judged, shown and hashed (``policy_sha256``) was not the file's bytes nor the
    document SetReleasePolicy recorded, and a retry of that document was POLICY_VERSION_REUSED."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            return file.read()
    except OSError as exc:
        raise _unreadable(key_id, exc.strerror or type(exc).__name__) from None
    except UnicodeDecodeError:
        raise _unreadable(key_id, "it is not UTF-8 text") from None


class PolicyStore:
    """Reads ``<dir>/<key_id>.yaml``; reloads a file when it changes on disk.

    Several broker replicas can share the directory (a ConfigMap, a volume): nothing here keeps
    state a request depends on beyond the file itself.

    With an ``audit`` log, each document this process starts judging a key by is recorded
    (``policy_in_force``, with its version and SHA-256, and the one it replaces) before anything
    is decided under it. Changes made through ``SetReleasePolicy`` were already recorded; a
    policy edited by hand in the directory, written by another replica, or put there by
    deployment tooling was not, and a hand edit that kept the version made every record of
    that version ambiguous: the log now says which document judged each decision.
    """

    def __init__(
        self,
        directory: Path,
        *,
        trust_domain: str | None = None,
        production: bool = True,
        audit: AuditLog | None = None,
    ) -> None:
        self._dir = os.fspath(directory)
        self._trust_domain = trust_domain
        self._production = production
        self._audit = audit
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[_Stamp, StoredPolicy]] = {}
        # key id -> (SHA-256, version) of the document last recorded in force. Its own lock,
        # held across the record's fsync, so that two requests meeting a new file record it
        # once; rare (a policy change), unlike the cache's.
        self._in_force: dict[str, tuple[str, str]] = {}
        self._in_force_lock = threading.Lock()

    def _path(self, key_id: str) -> str:
        # A str, not a Path: pathlib interns each part, and a per-request string that is interned
        # and then dropped leaves a dead slot in the interpreter's interned table, which the broker
        # saw grow and get rebuilt one size up (+0.9 MB) after ~10,000 releases.
        return os.path.join(self._dir, f"{validate_key_id(key_id)}.yaml")

    def get(self, key_id: str, *, judge: bool = True) -> StoredPolicy:
        """The key's current policy; FailedPrecondition(NO_RELEASE_POLICY) when it has none,
        :class:`PolicyUnreadable` when its file cannot be read, :class:`StoredPolicyInvalid`
        when it does not load.

        ``judge``: something is decided under it, so a document not yet recorded in force is
        recorded first (:class:`~strongroom.keybroker.errors.AuditUnavailable` when that fails).
        Without it (describing a key, showing its policy) nothing is decided: a new document is
        read (and cached) but not recorded, so that an audit outage does not make a key look as
        if it had no policy; the first decision under it records it."""
        path = self._path(key_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"key {key_id!r} has no release policy: nothing can be released",
                reason=Reason.NO_RELEASE_POLICY,
            ) from None
        except OSError as exc:  # EACCES, ELOOP, ENOTDIR, EIO: the file is there, or may be
            raise _unreadable(key_id, exc.strerror or type(exc).__name__) from None
        stamp = _stamp(st)
        with self._lock:
            cached = self._cache.get(key_id)
        if cached and cached[0] == stamp:
            stored = cached[1]
        else:
            text = _read_text(path, key_id)
            try:
                stored = StoredPolicy(text, self._load(text))
            except StrongroomError as exc:
                # A stored policy that no longer loads is the broker's configuration error (not
                # an INVALID_ARGUMENT of whoever asked); fail closed, with the loader's reason.
                raise StoredPolicyInvalid(
                    f"the stored release policy of {key_id!r} does not load: {exc.message}",
                    reason=exc.reason,
                ) from None
            with self._lock:
                self._cache[key_id] = (stamp, stored)
        if judge:
            # Cached or not, recorded before anything is judged by it: a record that fails (an
            # audit outage) leaves the document unused, and the next request tries again.
            self._record_in_force(key_id, stored)
        return stored

    def _record_in_force(self, key_id: str, stored: StoredPolicy) -> None:
        """Records ``stored`` as the key's policy in force unless it already is."""
        if self._audit is None:
            return
        recorded = self._in_force.get(key_id)  # every request's path: no lock once recorded
        if recorded is not None and recorded[0] == stored.sha256:
            return
        with self._in_force_lock:
            previous = self._in_force.get(key_id)
            if previous is not None and previous[0] == stored.sha256:
                return
            version = stored.policy.version
            if previous is not None and previous[1] == version:
                _log.warning(
                    "a release policy changed on disk under the version it had: records of that "
                    "version now name two documents (their policy_sha256 tells them apart)",
                    extra={"key_id": key_id, "policy_version": version},
                )
            self._audit.append(
                AuditEvent(
                    decision=Decision.ALLOWED,
                    reason=Reason.POLICY_IN_FORCE,
                    action="policy_in_force",
                    key_id=key_id,
                    policy_version=version,
                    policy_sha256=stored.sha256,
                    claims={} if previous is None else {"previous_policy_sha256": previous[0]},
                )
            )
            self._in_force[key_id] = (stored.sha256, version)

    def _load(self, document: str) -> ReleasePolicy:
        """Bounds, parses and validates a document, also against where this broker runs."""
        check_policy_bounds(document)
        policy = ReleasePolicy.load(document, production=self._production)
        # Always: a store built without a trust domain must still refuse, in production, the
        # debug and simulated-TEE policies (it skipped every deployment check before).
        policy.check_deployment(trust_domain=self._trust_domain, production=self._production)
        return policy

    def version(self, key_id: str) -> str:
        """The key's policy version, or "" when it has none that loads (nothing can be released
        under the key either way: a release refuses a policy that does not load).

        It describes a key in lifecycle answers (CreateKey, RotateKey, DisableKey, ListKeys), given
        after the change was made and audited: a stored policy that no longer loads (written for a
        development broker, edited by hand in a policy directory managed by deployment
        configuration, unreadable) must not turn a rotation that happened into an error, nor make
        every key unlistable. It is logged instead, and releases report it.
        """
        try:
            return self.get(key_id, judge=False).policy.version
        except StrongroomError as exc:
            if exc.reason != Reason.NO_RELEASE_POLICY:
                _log.warning(
                    "the release policy of a key does not load",
                    extra={"key_id": key_id, "reason": exc.reason, "detail": exc.message},
                )
            return ""

    def check(self, key_id: str, document: str) -> StoredPolicy:
        """Validates a policy for ``key_id`` as :meth:`put` would, without storing it."""
        self._path(key_id)  # the key id, before the document
        return StoredPolicy(document, self._load(document))

    def put(self, key_id: str, document: str) -> StoredPolicy:
        """Validates and stores a policy atomically; the old one stays if anything fails."""
        return self.write(key_id, self.check(key_id, document))

    def write(self, key_id: str, stored: StoredPolicy) -> StoredPolicy:
        """Stores a policy :meth:`check` returned, atomically; the old one stays if this fails."""
        path = self._path(key_id)
        try:
            atomic_write(Path(path), stored.document.encode())
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot store the policy of {key_id!r}: {exc.strerror} (is the policy directory "
                "read-only because policies are managed by deployment configuration?)",
                reason=Reason.POLICY_STORE_READ_ONLY,
            ) from None
        return stored
