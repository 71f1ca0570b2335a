"""Content-addressed blob files of the filesystem backend, and the crash-safe way to create them.

Layout under the storage root::

    blobs/sha256/ab/abcdef…   one read-only file per distinct artifact, named by its SHA-256
    tmp/<random>.part         uploads in progress, in the same filesystem so rename is atomic
    quarantine/abcdef…        blobs no index row pointed at when the store started (never served)

A blob appears under its final name only by ``rename`` of a complete, fsynced temporary file,
followed by an fsync of the directory, so a crash leaves either nothing or a whole blob. The upload
files a crash leaves in ``tmp/`` are removed at start-up; any other file there is left alone and
logged. A blob no index row points at is moved to ``quarantine/``, never deleted: it may be a
crash's leftover, or a model an index restored from an older backup no longer lists.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from strongroom.errors import FailedPrecondition
from strongroom.files import WRITEBACK_AVAILABLE, fsync_dir, start_writeback
from strongroom.modelstore.errors import StorageFull, StorageReadOnly, StorageUnavailable
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

_DIGEST_NAME = re.compile(r"[0-9a-f]{64}")
_TEMP_SUFFIX = ".part"
_TEMP_HEX_CHARS = 32
# Exactly the names TempBlob makes: ``tmp`` may be a symlink to a directory other programs use too.
_TEMP_NAME = re.compile(rf"[0-9a-f]{{{_TEMP_HEX_CHARS}}}{re.escape(_TEMP_SUFFIX)}")


def io_error(exc: OSError, what: str) -> StorageFull | StorageReadOnly | StorageUnavailable:
    """The domain error for an OS error while doing ``what`` (details go to the log)."""
    log.error("storage I/O error while %s: %s", what, exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on the storage volume while {what}")
    if exc.errno == errno.EFBIG:
        # The store's RLIMIT_FSIZE (systemd's LimitFSIZE=) or the filesystem's largest file:
        # every retry of the same artifact fails alike, so not UNAVAILABLE ("retrying may help").
        return StorageFull(
            f"the storage volume refuses a file this large (the store's file size limit or the "
            f"filesystem's) while {what}",
            reason=Reason.STORAGE_FILE_TOO_LARGE,
        )
    if exc.errno == errno.EROFS:
        return StorageReadOnly(f"the storage volume is read-only while {what}")
    return StorageUnavailable(f"storage I/O error while {what}")


def digest_fd(
    fd: int,
    *,
    buffer_size: int = 1 << 20,
    first: Callable[[memoryview], object] | None = None,
) -> tuple[str, int]:
    """The lower-case hex SHA-256 and the size of everything readable from ``fd``, from offset 0;
    ``first`` (if given) is called with the first block read (``buffer_size`` bytes, or all
    there is), before any other, and what it raises ends the digest."""
    hasher = hashlib.sha256()
    view = memoryview(bytearray(buffer_size))
    position = 0
    while n := _pread_into(fd, view, position):
        if first is not None and position == 0:
            first(view[:n])
        hasher.update(view[:n])
        position += n
    return hasher.hexdigest(), position


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fills ``view`` from ``fd`` at ``offset``; the byte count, short only at the end of file.

    One read may return fewer bytes than asked before the end of the file (FUSE and NFS may;
    local filesystems do not): taken as the whole, a head that arrived in two reads was
    HEADER_CORRUPT, a healthy blob reported as damaged."""
    got = 0
    while got < len(view) and (n := os.preadv(fd, [view[got:]], offset + got)):
        got += n
    return got


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes of ``fd`` from ``offset``, fewer only where the file ends (one ``pread``
    may return fewer before: see :func:`_pread_into`)."""
    buffer = bytearray(size)
    return bytes(buffer[: _pread_into(fd, memoryview(buffer), offset)])


#: How far a temporary file's written bytes run ahead of the writeback started for them.
WRITEBACK_STEP = 8 * 1024 * 1024


class NotABlobFile(OSError):
    """A blob's name holds something other than a regular file (a symlink, a FIFO, a directory)."""


class TempBlob:
    """A temporary file receiving an upload; it never becomes visible unless installed."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{secrets.token_hex(_TEMP_HEX_CHARS // 2)}{_TEMP_SUFFIX}"
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        self.size = 0
        self.writeback_started = 0
        """Bytes from offset 0 whose writeback to disk was started while the upload went on."""
        self._writeback = WRITEBACK_AVAILABLE

    def write(self, data: bytes | memoryview) -> None:
        """Appends ``data``; every :data:`WRITEBACK_STEP` bytes, starts their writeback."""
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)
        pending = self.size - self.writeback_started
        if self._writeback and pending >= WRITEBACK_STEP:
            # With gigabytes of memory free, the kernel starts no writeback of an upload until
            # seal()'s fsync, which then wrote all of it while the upload waited (a third of
            # a 512 MiB upload's time here). Started as the bytes come, the disk writes while
            # the next ones arrive, and the fsync finds little left to do.
            self._writeback = start_writeback(self._fd, self.writeback_started, pending)
            if self._writeback:
                self.writeback_started = self.size

    def seal(self) -> None:
        """Makes the content durable and read-only, and closes the file."""
        assert self._fd is not None
        os.fchmod(self._fd, 0o400)
        os.fsync(self._fd)
        # Forgotten before it is closed: close(2) releases the number even when it reports an
        # error (NFS, CIFS and FUSE report writeback errors there), and discard() closing it
        # again would close whatever file or socket the number was given to meanwhile.
        fd, self._fd = self._fd, None
        os.close(fd)

    def discard(self) -> None:
        """Closes and removes the file (idempotent, never raises)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass  # installed (renamed away) or already discarded
        except OSError as exc:
            log.warning("cannot remove temporary upload file %s: %s", self.path.name, exc)


class BlobStore:
    """The ``blobs/`` and ``tmp/`` directories under one storage root."""

    def __init__(self, root: Path) -> None:
        self._blobs = root / "blobs" / "sha256"
        self._tmp = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        """Where the start-up sweep moves unreferenced blobs (made when first needed)."""
        for directory in (self._blobs, self._tmp):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # An upload is published by rename(2) from tmp/ into blobs/, which cannot cross
        # filesystems: with either a symlink to another volume, every upload would fail with
        # EXDEV after its last byte. Refused before anything is swept or served.
        if os.stat(self._tmp).st_dev != os.stat(self._blobs).st_dev:
            raise FailedPrecondition(
                f"{self._tmp} and {self._blobs} are on different filesystems: uploads are moved "
                "from tmp into blobs by rename, so both must be on one volume (check for symlinks)",
                reason=Reason.STORAGE_SPANS_VOLUMES,
            )

    def path(self, digest: str) -> Path:
        """Where the blob with this lower-case hex SHA-256 lives."""
        return self._blobs / digest[:2] / digest

    def new_temp(self) -> TempBlob:
        """A fresh temporary file for an upload."""
        return TempBlob(self._tmp)

    def size(self, digest: str) -> int | None:
        """The blob's size in bytes, None if it does not exist, -1 if its name holds anything but
        a regular file (never followed: a symlink to a file of the recorded size passed the
        start-up sweep as an intact blob)."""
        try:
            info = os.lstat(self.path(digest))
        except FileNotFoundError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else -1

    def install(self, temp: TempBlob, digest: str) -> bool:
        """Moves a sealed temporary file to its content address, replacing whatever file is there.

        Returns True if the blob is new, False if a file with this digest's name was already there.
        That file is replaced even if it has the right size: the new bytes were just verified
        against the digest, the old ones never were since (an unreferenced blob whose removal or
        quarantine failed, left in place and damaged meanwhile, was kept and the verified upload
        discarded, so the re-published model failed verification). Replacing costs one rename;
        a reader holding the old file open keeps reading it.
        """
        target = self.path(digest)
        existing = self.size(digest)
        if existing is not None and existing != temp.size:
            log.error(
                "replacing damaged blob %s (size %d, expected %d)", digest, existing, temp.size
            )
        fanout = target.parent
        if not fanout.is_dir():
            fanout.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self._blobs)
        os.rename(temp.path, target)
        fsync_dir(fanout)
        return existing is None

    def remove(self, digest: str) -> None:
        """Deletes the blob (missing is fine) and makes the deletion durable."""
        target = self.path(digest)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
            fsync_dir(target.parent)

    def quarantine(self, digest: str) -> Path:
        """Moves the blob into the quarantine directory, durably, and returns its new path:
        ``quarantine/<digest>``, or ``<digest>.<n>`` if one of that name is there already (the
        same digest quarantined before; nothing there is overwritten). Raises OSError if it
        cannot be moved (the blob then stays where it was)."""
        source = self.path(digest)
        if not self.quarantine_dir.is_dir():
            self.quarantine_dir.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.quarantine_dir.parent)
        target = self.quarantine_dir / digest
        n = 0
        while os.path.lexists(target):
            n += 1
            target = self.quarantine_dir / f"{digest}.{n}"
        # rename(2) within the volume: nothing is copied, and it fails (EXDEV) rather than copy
        # when the blob tree is elsewhere, leaving the blob in place.
        os.rename(source, target)
        fsync_dir(self.quarantine_dir)
        fsync_dir(source.parent)
        return target

    def unquarantine(self, digest: str, size: int) -> bool:
        """Moves a quarantined copy of the blob back to its content address if no blob is there;
        True if it did (an index row names it again).

        The candidates are ``quarantine/<digest>`` and its ``<digest>.<n>`` siblings (see
        :meth:`quarantine`); the first regular file of ``size`` bytes whose content has this
        SHA-256 is moved back. Name and size alone are not enough: a file put there by hand, or
        damaged while it waited, would be served as the model under its digest's name.
        """
        if self.size(digest) is not None:
            return False
        for source in self._quarantined_copies(digest):
            try:
                # O_NONBLOCK: a FIFO under a quarantined blob's name would block the start.
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                    continue
                found, length = digest_fd(fd)
            finally:
                os.close(fd)
            if found != digest or length != size:
                log.error(
                    "quarantined file %s is not the blob its name says (SHA-256 %s): left there",
                    source.name,
                    found,
                )
                continue
            target = self.path(digest)
            if not target.parent.is_dir():
                target.parent.mkdir(mode=0o700, exist_ok=True)
                fsync_dir(self._blobs)
            os.rename(source, target)
            fsync_dir(target.parent)
            fsync_dir(self.quarantine_dir)
            return True
        return False

    def _quarantined_copies(self, digest: str) -> Iterator[Path]:
        """``quarantine/<digest>``, then ``<digest>.1``, ``<digest>.2``, ... while they exist
        (the names :meth:`quarantine` gives; probed one by one rather than by listing the
        directory once per missing blob)."""
        yield self.quarantine_dir / digest
        n = 1
        while os.path.lexists(copy := self.quarantine_dir / f"{digest}.{n}"):
            yield copy
            n += 1

    def quarantined(self) -> list[str]:
        """The names of the files in the quarantine directory, sorted (none if it does not exist)."""
        try:
            return sorted(entry.name for entry in self.quarantine_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []  # a file in its place: every move fails, and each is logged

    def _holds_a_non_file(self, digest: str) -> bool:
        """Whether the blob's name holds something other than a regular file (not followed;
        False if that cannot be told: the caller's own error is then the answer)."""
        try:
            return not stat.S_ISREG(os.lstat(self.path(digest)).st_mode)
        except OSError:
            return False

    def open_read(self, digest: str) -> int:
        """A read-only file descriptor on the blob: FileNotFoundError if missing, NotABlobFile if
        its name holds anything but a regular file.

        The store makes only regular files there. A symlink was followed: whoever could write the
        blob tree had GetModel serve any file the store can read, of the recorded size (its TLS
        key, its S3 credentials). A FIFO blocked the open for ever, under the commit lock, so
        every read, upload and delete of the store hung with it. Neither is followed or waited
        on now (O_NOFOLLOW, O_NONBLOCK, which a regular file's reads ignore).
        """
        try:
            fd = os.open(
                self.path(digest), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotABlobFile(f"blob {digest} is a symbolic link") from None
            # A socket (ENXIO) or a device node with no driver behind it fails the open itself:
            # that is what the name holds, not a failing volume (an UNAVAILABLE, retried for
            # ever by every loader), so it is named like any other non-file.
            if exc.errno != errno.ENOENT and self._holds_a_non_file(digest):
                raise NotABlobFile(f"blob {digest} is not a regular file") from None
            raise
        try:
            mode = os.fstat(fd).st_mode
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise NotABlobFile(f"blob {digest} is not a regular file")
        return fd

    def sweep_temps(self) -> tuple[int, list[Path]]:
        """Removes every leftover temporary file of an upload; returns how many, and the entries
        of ``tmp/`` this store did not make (left alone). Only safe with no upload running.

        Only names :class:`TempBlob` makes are removed: ``tmp`` may be a symlink into a directory
        other programs use, whose files are not the store's to delete.
        """
        removed = 0
        strays: list[Path] = []
        for entry in self._tmp.iterdir():
            if _TEMP_NAME.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
                entry.unlink()
                removed += 1
            else:
                strays.append(entry)
        return removed, strays

    def digests(self) -> tuple[set[str], list[Path]]:
        """The digests of all blobs present, and any file in the blob tree that is not a blob.

        A fan-out directory that is a symlink is not the store's (it makes real ones): it is a
        stray and is not walked, so the orphan sweep never deletes what lives behind it. So is a
        symlink at a blob's name (the store makes only regular files there): followed, one to any
        file made the store count it as a blob, refuse to start (INDEX_MISSING) over it alone, and
        move it into the quarantine as an orphan."""
        found: set[str] = set()
        strays: list[Path] = []
        for fanout in self._blobs.iterdir():
            if fanout.is_symlink() or not fanout.is_dir():
                strays.append(fanout)
                continue
            for entry in fanout.iterdir():
                name = entry.name
                if (
                    _DIGEST_NAME.fullmatch(name)
                    and name[:2] == fanout.name
                    and not entry.is_symlink()
                    and entry.is_file()
                ):
                    found.add(name)
                else:
                    strays.append(entry)
        return found, strays
