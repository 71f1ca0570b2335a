"""Release policies per key: one YAML document per key in a directory, versioned and validated."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from strongroom.attestation.policy import ReleasePolicy
from strongroom.errors import FailedPrecondition, StrongroomError
from strongroom.files import NotDurable, atomic_write
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.keybroker.errors import (
    PolicyChanged,
    PolicyStoreBusy,
    PolicyUnreadable,
    StoredPolicyInvalid,
)
from strongroom.keybroker.keys import validate_key_id
from strongroom.keybroker.policy_bounds import check_policy_bounds
from strongroom.keybroker.policy_file import policy_stat, read_policy_text, unreadable
from strongroom.keybroker.policy_lines import PolicyLoadLines
from strongroom.reasons import Reason

_log = logging.getLogger(__name__)

LOCK_FILE = ".policy-changes.lock"
"""The file in the policy directory whose record lock (an open-file-description lock,
``F_OFD_SETLK``) every change holds, in every broker process, while it checks a key's live policy
and writes the new one: the one critical section of a policy change across replicas sharing the
directory. Its leading dot keeps it out of the key id grammar (no key's policy is named so)."""

LOCK_WAIT = 10.0
"""Seconds a policy change waits for the lock before it is refused ``POLICY_STORE_BUSY``. A holder
only reads one policy file and writes another, so a lock held longer is a stuck holder (a hung
NFS server, a stopped process), which must not hold an admin's call (and a worker) for ever."""

_LOCK_POLL = 0.01

# An open-file-description lock (Linux's F_OFD_SETLK), not a classic POSIX record lock (lockf),
# which belongs to the process: two threads of one process both "held" that one, and closing any
# descriptor of the file released it, so this process's threads took turns per directory path,
# and two paths to one directory (two bind mounts of one share) in one broker did not exclude each
# other. An OFD lock belongs to one open of the file: every change opens the file anew, so two in
# one process exclude each other through the kernel like two in two processes, whatever path
# reached the file. OFD and classic record locks on one file conflict with each other (an older
# broker's lockf still excludes this one), and NFS carries both to the server.
_WRITE_LOCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
"""A ``struct flock`` (Linux, 64-bit ``off_t``): a write lock on the whole file, ``l_pid`` 0 as
OFD locks require."""


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

RACY_WINDOW_NS = 2_000_000_000
"""How close (ns) to the moment a policy file was read its last change may be for the read to be
trusted by its :func:`_stamp` alone. A change within the kernel's clock tick (~4 ms; a second on
file systems with coarse timestamps; plus the skew of an NFS server's clock) of another leaves
the same times, and a replacement of the same size on a reused inode the same stamp: a document
read then is compared with the file again at every use until it was read this long after its
last change (Git's racy-timestamp rule). The cost is a re-read of a small file for a few seconds
after a change."""


def _stamp(st: os.stat_result) -> _Stamp:
    """What identifies a version of a policy file without reading it.

    mtime and size alone miss a replacement by a file of the same size whose mtime a tool kept
    (rsync -a, cp -p, tar x): a revoked caller swapped for an ID of the same length kept its keys
    until a restart. A replaced file has another inode, and any change to a file sets its ctime,
    which no tool can set. Not a change made within the tick of the clock that set the first
    one's ctime: the store does not trust a stamp read that soon (:data:`RACY_WINDOW_NS`).
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _racy(stamp: _Stamp, read_at: int) -> bool:
    """Whether a read started at ``read_at`` (ns) came too soon after the file's last change
    (:data:`RACY_WINDOW_NS`) for its stamp to tell it from a change made in the same tick."""
    # The ctime: every change sets it to the kernel's now, whereas a tool can set the mtime
    # anywhere (ahead, and every use would re-read the file until then).
    return read_at - stamp[4] < RACY_WINDOW_NS


def _again(invalid: StoredPolicyInvalid) -> StoredPolicyInvalid:
    """A new exception saying what ``invalid`` says: each call raises its own (a raised
    exception keeps its traceback, and with it the frames of the call that raised it)."""
    return StoredPolicyInvalid(invalid.message, reason=invalid.reason)


def _read_only(key_id: str, exc: OSError) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot store the policy of {key_id!r}: {exc.strerror} (is the policy directory "
        "read-only because policies are managed by deployment configuration?)",
        reason=Reason.POLICY_STORE_READ_ONLY,
    )


def _unlockable(key_id: str, exc: OSError) -> FailedPrecondition:
    # EINVAL: the kernel does not know the command (OFD locks came with Linux 3.15) or the file
    # system refuses this kind of lock, which an older broker's lockf (a classic POSIX record
    # lock) may still have been granted there: "POSIX record locks" sent the operator to check
    # a file system that has them.
    where = (
        "this kernel (Linux 3.15 or later) and the directory's file system must offer them"
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP)
        else "the directory's file system must offer them across the machines that share it, "
        "as local file systems and NFSv4 do (NFSv3 with a working lockd)"
    )
    return FailedPrecondition(
        f"cannot store the policy of {key_id!r}: the policy directory cannot be locked "
        f"({exc.strerror}): a change holds open-file-description locks (F_OFD_SETLK) on its "
        f"{LOCK_FILE}, so that replicas sharing it change policies one at a time; {where}: "
        "nothing was stored",
        reason=Reason.POLICY_STORE_READ_ONLY,
    )


def _planted(key_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot store the policy of {key_id!r}: the policy directory's lock file {LOCK_FILE} is "
        "not a regular file (a symlink, directory or device was put there): nothing was "
        "stored; remove it (the broker creates the file itself)",
        reason=Reason.POLICY_STORE_READ_ONLY,
    )


def _lock_file_closed(key_id: str, exc: OSError) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot store the policy of {key_id!r}: the policy directory's lock file {LOCK_FILE} "
        f"cannot be opened ({exc.strerror}): it belongs to another user or its mode or "
        "attributes were changed; the broker's user must be able to read and write it (the "
        "broker creates it, mode 0600): nothing was stored",
        reason=Reason.POLICY_STORE_READ_ONLY,
    )


def _busy(key_id: str, wait: float) -> PolicyStoreBusy:
    return PolicyStoreBusy(
        f"cannot store the policy of {key_id!r}: another policy change held the policy "
        f"directory's lock for more than {wait:g} s; nothing was stored, retry"
    )


def _open_lock_file(directory: str, key_id: str) -> int:
    """A descriptor of the directory's :data:`LOCK_FILE`, created if missing.

    Never through a symlink, and only a regular file: whoever can write the directory could plant
    a link there, and the broker opened (and, dangling, created) whatever it pointed to for
    writing, wherever that was (another service's directory, a device whose opening acts)."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(
            path,
            # O_NONBLOCK: a FIFO planted there must not hang the open; it is refused below.
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
            0o600,
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):  # a symlink (O_NOFOLLOW), a directory
            raise _planted(key_id) from None
        if exc.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(path):
            # The file is there but not this user's to open (another user's, its mode changed,
            # immutable): not a read-only directory, which sent the operator to the wrong place.
            raise _lock_file_closed(key_id, exc) from None
        raise _read_only(key_id, exc) from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as exc:
        os.close(fd)
        raise _read_only(key_id, exc) from None
    if not regular:
        os.close(fd)
        raise _planted(key_id)
    return fd


class _LockLost(Exception):
    """The lock file a change locked is no longer the one at :data:`LOCK_FILE`'s path."""


def _is_at(fd: int, path: str) -> bool:
    """Whether the file open as ``fd`` is the one at ``path`` (same device and inode).

    The path is opened anew and that descriptor asked, not ``lstat``: an NFS client answers
    ``lstat`` from its attribute and lookup caches (up to ``acdirmax``, 60 s by default), which
    kept the deleted file's inode for a file another host had made again meanwhile, so a change
    took its lock on the deleted file for the directory's; an open makes the client look the name
    up again on the server (close-to-open consistency)."""
    try:
        # O_NOFOLLOW, O_NONBLOCK: a link or FIFO planted there is not the file locked, and must
        # neither be followed nor hang the check.
        now = os.open(
            path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        )
    except OSError:  # deleted and not made again yet, or something that is not the lock file
        return False
    try:
        # Closing this second descriptor leaves the lock alone: an OFD lock belongs to the
        # held open, not to the process (a classic record lock would have been released).
        there = os.fstat(now)
        held = os.fstat(fd)
    except OSError:
        # Over NFS a file another client deleted answers ESTALE: it is not the one at the path
        # (that escaped as a bare OSError, the descriptor and its lock never closed).
        return False
    finally:
        os.close(now)
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def _reasserted(fd: int) -> bool:
    """Whether the lock of ``fd`` is granted again now.

    Over NFSv4 a lock lives as long as the client's lease: a client cut off from the server
    longer than the lease (90 s by default) loses its locks without being told, and another
    replica may take the lock meanwhile. Asking for it again goes to the server: refused, another
    holds it (or the client knows its lock lost: an error) and this change must not write. Never
    refused to a holder that kept it (an OFD lock's owner is its open, whose own lock never
    conflicts), locally a no-op. ``F_OFD_GETLK`` could not tell a lock this open holds from none
    at all; taking it again cannot tell a lock lost and free again from one kept, which the
    caller checks otherwise (the live policy, read again)."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WRITE_LOCK)
    except OSError:
        return False
    return True


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
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._dir = os.fspath(directory)
        self._trust_domain = trust_domain
        self._production = production
        self._audit = audit
        self._lock = threading.Lock()
        # The wall clock (ns) the file system's times are compared with: the racy-timestamp rule.
        self._clock = clock
        # key id -> (stamp, document, when (clock) the read that gave it started).
        self._cache: dict[str, tuple[_Stamp, StoredPolicy, int]] = {}
        # key id -> (stamp, why it does not load, when its read started), for a stored document
        # that does not load: without it each call naming the key parsed the file again, before
        # its caller was checked. One entry per file in the directory, at most.
        self._failing: dict[str, tuple[_Stamp, StoredPolicyInvalid, int]] = {}
        # key id -> (SHA-256, version) of the document last recorded in force. Its own lock,
        # held across the record's fsync, so that two requests meeting a new file record it
        # once; rare (a policy change), unlike the cache's.
        self._in_force: dict[str, tuple[str, str]] = {}
        self._in_force_lock = threading.Lock()
        # Each failing policy's ERROR: once, then counted (it was one per call that named it).
        self._load_lines = PolicyLoadLines(_log)

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
        reading = self._clock()  # before the stat: a change after it cannot predate it
        st = self._stat(path, key_id)
        if st is None:
            self._load_lines.loaded(key_id)  # a failure of its file is over: there is none
            raise FailedPrecondition(
                f"key {key_id!r} has no release policy: nothing can be released",
                reason=Reason.NO_RELEASE_POLICY,
            )
        stamp = _stamp(st)
        with self._lock:
            cached = self._cache.get(key_id)
            failing = self._failing.get(key_id)
        if failing and failing[0] == stamp and not _racy(stamp, failing[2]):
            raise _again(failing[1])  # the same file: it still does not load
        if cached and cached[0] == stamp and not _racy(stamp, cached[2]):
            stored = cached[1]
        else:
            text = read_policy_text(path, self._dir, key_id)
            if cached and cached[0] == stamp and cached[1].document == text:
                stored = cached[1]  # the same bytes parse to the same policy
            else:
                try:
                    stored = StoredPolicy(text, self._load(text))
                except StrongroomError as exc:
                    # A stored policy that no longer loads is the broker's configuration error
                    # (not an INVALID_ARGUMENT of whoever asked); fail closed, with the loader's
                    # reason.
                    invalid = StoredPolicyInvalid(
                        f"the stored release policy of {key_id!r} does not load: {exc.message}",
                        reason=exc.reason,
                    )
                    with self._lock:
                        self._failing[key_id] = (stamp, invalid, reading)
                    raise _again(invalid) from None
            with self._lock:
                self._cache[key_id] = (stamp, stored, reading)
                self._failing.pop(key_id, None)
        if judge:
            # Cached or not, recorded before anything is judged by it: a record that fails (an
            # audit outage) leaves the document unused, and the next request tries again.
            self._record_in_force(key_id, stored)
        self._load_lines.loaded(key_id)
        return stored

    def does_not_load(self, key_id: str, exc: StrongroomError) -> None:
        """Logs that ``key_id``'s stored policy does not read or load (``exc``, from :meth:`get`):
        at ERROR naming its file, once per failure and then counted
        (:mod:`~strongroom.keybroker.policy_lines`). Only :class:`PolicyUnreadable` and
        :class:`StoredPolicyInvalid` are: NO_RELEASE_POLICY is no failure, and an audit log that
        refused the record of the policy in force (an outage, a tamper) has lines of its own and
        nothing to do with the file. Not in :meth:`get`: whoever meets it says whether it is the
        operator's to fix."""
        if isinstance(exc, PolicyUnreadable | StoredPolicyInvalid):
            self._load_lines.failed(key_id, self._path(key_id), exc)

    def close(self) -> None:
        """The broker stops: the failing policies' repeats not yet logged are logged now."""
        self._load_lines.closing()

    def _stat(self, path: str, key_id: str) -> os.stat_result | None:
        """What ``stat`` says of the key's policy file ``path``, its links resolved within the
        directory; None when the key has no policy: nothing at its name, or a link there to
        nothing within the directory (``ENOENT`` from the resolver). The one rule for "no
        policy", :meth:`get`'s and :meth:`live`'s: ``live`` asked ``lexists``, which a dangling
        link passes, so a change expecting no policy was refused ``POLICY_CHANGED`` for a key
        that ``get`` (``keys get-policy``) said had none. :class:`PolicyUnreadable` otherwise."""
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                # Not os.stat: a link leading out is judged by where it leads, not followed
                # there, whose answer (missing or not) would tell whether its target exists.
                st = policy_stat(path, self._dir, key_id)
        except FileNotFoundError:
            return None
        except OSError as exc:  # EACCES, ELOOP, ENOTDIR, EIO: the file is there, or may be
            raise unreadable(key_id, exc.strerror or type(exc).__name__) from None
        return st

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
        every key unlistable. It is logged instead (:meth:`does_not_load`), and releases report it.
        """
        try:
            return self.get(key_id, judge=False).policy.version
        except StrongroomError as exc:
            self.does_not_load(key_id, exc)
            return ""

    def live(self, key_id: str) -> StoredPolicy | None:
        """The key's policy as the file holds it now, read past the cache (None: it has none):
        what a change is checked against. The cache knows a file by its inode, size and times,
        which a file replaced twice within the clock's tick by one of the same size on a reused
        inode would not change, and a compare-and-swap must not take a stale version for the
        live one (the cache re-reads such a file, but trusts this process's clock against the file
        system's). :class:`PolicyUnreadable` / :class:`StoredPolicyInvalid` as :meth:`get`."""
        path = self._path(key_id)
        try:
            text = read_policy_text(path, self._dir, key_id)
        except PolicyUnreadable:
            if self._stat(path, key_id) is None:  # as get decides it
                return None
            raise
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None and cached[1].document == text:
            return cached[1]  # the same bytes parse to the same policy
        try:
            return StoredPolicy(text, self._load(text))
        except StrongroomError as exc:
            raise StoredPolicyInvalid(
                f"the stored release policy of {key_id!r} does not load: {exc.message}",
                reason=exc.reason,
            ) from None

    def refuse_conflict(
        self, key_id: str, new: StoredPolicy, expected_version: str | None
    ) -> StoredPolicy | None:
        """Refuses replacing the key's live policy by ``new`` (and returns the live one).

        With ``expected_version`` (a compare-and-swap; "" for "the key has no policy"), a live
        policy at another version, none when one was expected, or one that does not read or
        load (it has no version to compare) is :class:`PolicyChanged`, naming the live version.
        Another document under the live version is FailedPrecondition(POLICY_VERSION_REUSED):
        release records name a policy by its version. The same document again is a retry."""
        expected = f"at version {expected_version!r}" if expected_version else "to have none"
        try:
            live = self.live(key_id)
        except StrongroomError as exc:
            if expected_version is None:
                return None  # nothing a release could name: replacing it is the fix
            raise PolicyChanged(
                f"the release policy of {key_id!r} was expected {expected}, but the stored one "
                f"does not read or load ({exc.reason}); replace it without an expected version",
                live_version=None,
            ) from None
        live_version = None if live is None else live.policy.version
        if expected_version is not None and (live_version or "") != expected_version:
            now = f"is at version {live_version!r}" if live_version else "has none"
            raise PolicyChanged(
                f"the release policy of {key_id!r} was expected {expected}, but it {now} now "
                "(changed since it was read): nothing was stored; read the live policy, apply "
                "the change to it and set it again",
                live_version=live_version,
            )
        if (
            live is not None
            and live_version == new.policy.version
            and live.document != new.document
        ):
            raise FailedPrecondition(
                f"the release policy of {key_id!r} is already at version "
                f"{new.policy.version!r} with another document: give the new document a version "
                "of its own (release records name a policy by its version)",
                reason=Reason.POLICY_VERSION_REUSED,
            )
        return live

    def check(self, key_id: str, document: str) -> StoredPolicy:
        """Validates a policy for ``key_id`` as :meth:`put` would, without storing it."""
        self._path(key_id)  # the key id, before the document
        return StoredPolicy(document, self._load(document))

    def put(self, key_id: str, document: str) -> StoredPolicy:
        """Validates and stores a policy atomically; the old one stays if anything fails."""
        return self.write(key_id, self.check(key_id, document))

    def write(
        self,
        key_id: str,
        stored: StoredPolicy,
        *,
        expected_version: str | None = None,
        lock_wait: float = LOCK_WAIT,
        still_wanted: Callable[[], None] | None = None,
    ) -> StoredPolicy:
        """Stores a policy :meth:`check` returned, atomically; the old one stays if this fails.

        The live policy is checked (:meth:`refuse_conflict`, with ``expected_version``) and the
        new one written under the directory's change lock (:data:`LOCK_FILE`), held by every
        broker process sharing the directory for exactly that: of two changes expecting one
        version, one is written and the other refused, on one replica or two. Nothing slow is
        done under it (the document was validated before, the audit record is written before);
        it is waited for at most ``lock_wait`` seconds (:class:`PolicyStoreBusy`).

        ``still_wanted`` runs under the lock just before the new file replaces the old one (and
        between two tries of a lock that is held), and whatever it raises is the change's
        outcome, nothing stored: whoever asked for the change may have given up while it waited
        for the lock (its call's deadline passed), and a change nobody waits for any more must
        not go live, nor keep a worker waiting."""
        path = self._path(key_id)
        deadline = time.monotonic() + lock_wait
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            with self._changing(key_id, remaining, still_wanted) as still_held:
                seen = self._found(path, key_id)
                self.refuse_conflict(key_id, stored, expected_version)

                def last_checks(seen: tuple[str, str] = seen) -> None:
                    still_held()
                    if self._found(path, key_id) != seen:
                        # Changed under the lock: it was lost meanwhile (an NFSv4 lease that
                        # expired) and is free again, which taking it again cannot tell.
                        raise _LockLost
                    if still_wanted is not None:
                        still_wanted()

                try:
                    atomic_write(Path(path), stored.document.encode(), before_replace=last_checks)
                except _LockLost:
                    # The lock file was deleted (or replaced) while this change held it: another
                    # change may have locked a new one and gone ahead meanwhile. Nothing was
                    # written: take the lock again and check the live policy again.
                    _log.warning(
                        "a change lost the policy directory's lock while it held it: its lock "
                        "file was deleted or replaced (sync or back-up tooling must leave it "
                        "alone), or the lock itself was lost (an NFSv4 lease that expired); the "
                        "change is checked again under the lock taken again",
                        extra={"key_id": key_id},
                    )
                    if time.monotonic() >= deadline:
                        raise _busy(key_id, lock_wait) from None
                    continue
                except OSError as exc:
                    # NotDurable: the rename was made and only the directory's sync failed (EIO,
                    # a file system that refuses it), said by the write itself (read back from a
                    # disk failing so, the file answered the same EIO: a live change was recorded
                    # DENIED). Otherwise the file is read back: a rename whose answer was lost (a
                    # retried NFS RENAME) may have been made all the same. Either way the
                    # document is live for every replica, so this change was made and its
                    # ALLOWED record is its outcome, not a refusal the caller retries.
                    if not isinstance(exc, NotDurable) and not self._holds(
                        path, key_id, stored.document
                    ):
                        raise _read_only(key_id, exc) from None
                    _log.error(
                        "a release policy was stored but its directory could not be synced: the "
                        "change is live, but may not survive a crash of the host",
                        extra={"key_id": key_id, "error": exc.strerror or type(exc).__name__},
                    )
            return stored

    def _found(self, path: str, key_id: str) -> tuple[str, str]:
        """What the policy file at ``path`` holds now (``("text", …)``), or why it holds nothing
        (``("error", …)``): two looks differ if the file's text did between them."""
        try:
            return ("text", read_policy_text(path, self._dir, key_id))
        except StrongroomError as exc:
            return ("error", exc.message)

    def _holds(self, path: str, key_id: str, document: str) -> bool:
        """Whether the policy file at ``path`` holds ``document`` now."""
        return self._found(path, key_id) == ("text", document)

    @contextlib.contextmanager
    def _changing(
        self, key_id: str, wait: float, still_wanted: Callable[[], None] | None = None
    ) -> Iterator[Callable[[], None]]:
        """Holds the directory's change lock: the lock file's open-file-description lock.

        Yields a check that the file locked is still the one at :data:`LOCK_FILE`'s path
        (:class:`_LockLost` otherwise), which the holder makes just before it writes: a lock on
        a file that was deleted meanwhile excludes nobody who opens the path now."""
        deadline = time.monotonic() + wait
        lock_path = os.path.join(self._dir, LOCK_FILE)
        while True:
            fd = _open_lock_file(self._dir, key_id)
            try:
                self._take_lock(fd, key_id, wait, deadline, still_wanted)
                there = _is_at(fd, lock_path)
            except BaseException:
                os.close(fd)  # nothing between the open and the yield keeps it (nor its lock)
                raise
            if there:
                break
            # Deleted or replaced while this waited for it (its holder's lock excluded only
            # those that had opened it): the lock of the file now at the path is the one.
            os.close(fd)
            if time.monotonic() >= deadline:
                raise _busy(key_id, wait)

        def still_held() -> None:
            if not (_is_at(fd, lock_path) and _reasserted(fd)):
                raise _LockLost

        try:
            yield still_held
        finally:
            os.close(fd)  # the open's only descriptor: releases its lock

    @staticmethod
    def _take_lock(
        fd: int,
        key_id: str,
        wait: float,
        deadline: float,
        still_wanted: Callable[[], None] | None = None,
    ) -> None:
        """Takes ``fd``'s lock by ``deadline`` (:class:`PolicyStoreBusy`, naming ``wait``);
        between two tries, ``still_wanted`` may call the wait off (what it raises)."""
        # Polled, not blocking: a lock wait cannot be given a deadline, and a holder that is
        # stuck must not hold this admin call for ever.
        while True:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WRITE_LOCK)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _unlockable(key_id, exc) from None
            if still_wanted is not None:
                still_wanted()  # a caller that gave up must not keep a worker waiting
            if time.monotonic() >= deadline:
                raise _busy(key_id, wait)
            time.sleep(_LOCK_POLL)
