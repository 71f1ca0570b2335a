"""The embedded storage backend: content-addressed blob files plus a SQLite index, under one root.

Upload protocol (every step before the index insert is invisible to readers, so an interrupted
upload is never visible):

1. stream the chunks into ``tmp/<random>.part`` while the validator checks the structure, the
   SHA-256 is computed and the size limits are enforced; reserve (name, version) as soon as the
   validator knows them, so a concurrent or repeated upload of the same version fails fast;
2. check the final size and digest against the validator's summary and the client's claims;
3. fsync the file, make it read-only, rename it to ``blobs/sha256/ab/abcdef…``, fsync the directory;
4. insert the index row in its own transaction (the primary key makes (name, version) immutable).

A crash before 4 leaves a temporary file, removed at the next start (the storage root is locked to
one process, so nothing else can be writing then), or an unreferenced blob. Blobs are shared by
identical content and deleted when the last row pointing at them is.

The start-up sweep never deletes a blob: one that no row points at is moved to ``quarantine/``
(never served) and logged. It may be a crash's leftover, but it may as well be a model that an
index restored from an older backup (or without its ``-wal`` file) no longer lists, and deleting
it then would lose every model published since that backup. A row whose blob is missing gets it
back from the quarantine (the newer index restored after all). README, "Operating it", says how
an operator re-publishes or purges what stays there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

from strongroom.artifact import InvalidArtifact, StructureValidator, parse_header
from strongroom.closing import Closing
from strongroom.errors import FailedPrecondition
from strongroom.identifiers import (
    validate_name,
    validate_version,
)
from strongroom.modelstore import _keyslot, _pagetoken, _ranges
from strongroom.modelstore._blobs import (
    BlobStore,
    NotABlobFile,
    TempBlob,
    digest_fd,
    io_error,
    pread_full,
)
from strongroom.modelstore._heads import Piece, head_checked, stored_header
from strongroom.modelstore._index import Index
from strongroom.modelstore._ranges import Frame
from strongroom.modelstore._upload import Authorize, Uploads, utcnow
from strongroom.modelstore.errors import (
    KeySlotRejected,
    ModelNotFound,
    StorageFull,
    StorageLocked,
    StorageReadOnly,
    StorageUnavailable,
    StoredDataCorrupt,
)
from strongroom.modelstore.limits import DEFAULT_MAX_ARTIFACT_SIZE, DEFAULT_PAGE_SIZE
from strongroom.modelstore.records import ModelPage, ModelRecord, UploadClaims
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

_LOCK_FILE = "LOCK"
_INDEX_FILE = "index.sqlite3"
_COPY_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class SweepReport:
    """What the start-up sweep found and did."""

    temp_files_removed: int
    """Interrupted uploads removed from ``tmp/``."""
    orphan_blobs_quarantined: tuple[str, ...]
    """Digests of the blobs no index row pointed at (a crash between rename and insert or during
    a delete, or an index restored from an older backup), moved to ``quarantine/``."""
    missing_blobs: tuple[tuple[str, str], ...]
    """(name, version) of rows whose blob is gone: reads of them fail with DATA_LOSS."""
    damaged_blobs: tuple[tuple[str, str], ...]
    """(name, version) of rows whose blob has the wrong size: reads fail with DATA_LOSS."""
    stray_files: int
    """Files in the blob tree that are not blobs, and entries of ``tmp/`` that are not the store's
    upload files (left alone, logged)."""
    unreadable_rows: tuple[tuple[str, str], ...] = ()
    """(name, version) of index rows this store cannot have written (edited or damaged on disk):
    reads of them fail with DATA_LOSS INDEX_CORRUPT; their blobs are kept."""
    orphan_blobs_left: tuple[str, ...] = ()
    """Digests of unreferenced blobs that could not be moved to ``quarantine/`` (logged): left
    where they were (no row names them, so nothing serves them), tried again at the next start."""
    restored_from_quarantine: tuple[str, ...] = ()
    """Digests of quarantined blobs moved back because an index row names them again."""
    quarantine_files: int = 0
    """Files in ``quarantine/`` after the sweep (each start logs them until they are dealt with)."""
    formats_recorded: int = 0
    """Rows stored before the index had an artifact format, given their blob's header format."""


class FileRangeReader(Closing):
    """An open byte range of one stored artifact; close it (or use ``with``) when done."""

    def __init__(
        self, fd: int, record: ModelRecord, offset: int, length: int, *, check_head: bool = False
    ) -> None:
        self._fd: int | None = fd
        self.record = record
        self.offset = offset
        self.length = length
        self._check_head = check_head

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        """Yields the range in pieces of ``chunk_size`` bytes (the last may be shorter).

        ``check_head`` (a range from the first byte that holds the head): nothing is yielded
        before the head has arrived and names the record's model (``_heads.head_checked``)."""
        return self._checked(self._chunks(self._size(chunk_size)))

    def chunks_into(self, chunk_size: int, frame: Frame) -> Iterator[memoryview]:
        """:meth:`chunks`, each piece read from the file straight into ``frame(n)``."""
        return self._checked(self._chunks_into(self._size(chunk_size), frame))

    @staticmethod
    def _size(chunk_size: int) -> int:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        return chunk_size

    def _checked(self, pieces: Iterator[Piece]) -> Iterator[Piece]:
        return head_checked(self.record, pieces) if self._check_head else pieces

    def _chunks(self, chunk_size: int) -> Iterator[bytes]:
        position, end = self.offset, self.offset + self.length
        while position < end:
            try:
                data = os.pread(self._open_fd(), min(chunk_size, end - position), position)
            except OSError as exc:
                raise io_error(exc, "reading an artifact") from None
            if not data:
                raise self._truncated(position)
            position += len(data)  # a regular file reads short only at its end: next, none
            yield data

    def _chunks_into(self, chunk_size: int, frame: Frame) -> Iterator[memoryview]:
        position, end = self.offset, self.offset + self.length
        while position < end:
            size = min(chunk_size, end - position)
            view, got = frame(size), 0
            while got < size:
                try:
                    read = os.preadv(self._open_fd(), [view[got:]], position + got)
                except OSError as exc:
                    raise io_error(exc, "reading an artifact") from None
                if not read:
                    raise self._truncated(position + got)
                got += read
            position += size
            yield view

    def _open_fd(self) -> int:
        if self._fd is None:
            raise FailedPrecondition("the reader is closed", reason=Reason.READER_CLOSED)
        return self._fd

    def _truncated(self, position: int) -> StoredDataCorrupt:
        log.error(
            "blob %s ends at %d, expected %d bytes",
            self.record.artifact_sha256,
            position,
            self.record.artifact_size,
        )
        return StoredDataCorrupt(
            f"stored artifact {self.record.name} {self.record.version} is truncated",
            reason=Reason.BLOB_TRUNCATED,
        )

    def close(self) -> None:
        """Releases the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FilesystemStorage(Closing):
    """Durable model storage in a local directory (see the module docstring for the protocol).

    Thread-safe. Only one process may open a given root at a time (an exclusive ``flock`` on
    ``root/LOCK``); a second one gets StorageLocked. Opening sweeps what a crash left behind and
    records it in :attr:`last_sweep`.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if max_artifact_size <= 0:
            raise ValueError("max_artifact_size must be positive")
        self.root = Path(root)
        self.max_artifact_size = max_artifact_size
        self._clock = clock
        self._uploads = Uploads(max_artifact_size, self._exists)
        # Serialises "blob present? rename / insert" against "delete row, unlink unreferenced blob".
        self._commit_lock = threading.Lock()
        self._closed = False
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(
                self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise io_error(exc, "opening the storage root") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StorageLocked(f"storage root {self.root} is in use by another process") from None
        try:
            self._blobs = BlobStore(self.root)
            self._refuse_blobs_without_index()
            self._index = Index(self.root / _INDEX_FILE)
        except OSError as exc:
            os.close(self._lock_fd)
            raise io_error(exc, "opening the storage root") from None
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self.last_sweep = self._sweep()
        except OSError as exc:
            self.close()
            raise io_error(exc, "sweeping the storage root") from None
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the index and releases the root lock (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._index.close()
        os.close(self._lock_fd)  # closing the descriptor releases the flock

    def _refuse_blobs_without_index(self) -> None:
        """FailedPrecondition(INDEX_MISSING) if blobs exist but the index file does not.

        Every blob is written after the index exists, so that is a lost index (removed by hand, a
        restore without it), not a crash: opening would create an empty index, serve nothing and
        move every blob to the quarantine as an orphan; the operator should restore the index.
        """
        if (self.root / _INDEX_FILE).exists():
            return
        present, _ = self._blobs.digests()
        if present:
            log.error("storage root %s holds %d blobs but no index", self.root, len(present))
            raise FailedPrecondition(
                f"the storage root {self.root} holds {len(present)} blobs but no index "
                f"({_INDEX_FILE}): restore the index (with its -wal file) or move blobs/ away; "
                "starting would serve none of them and quarantine them all",
                reason=Reason.INDEX_MISSING,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the storage is closed", reason=Reason.STORAGE_CLOSED)

    def _sweep(self) -> SweepReport:
        temps, temp_strays = self._blobs.sweep_temps()
        present, blob_strays = self._blobs.digests()
        strays = temp_strays + blob_strays
        records, unreadable = self._index.readable_records()
        restored: list[str] = []
        formats: list[tuple[ModelRecord, int]] = []
        missing: list[tuple[str, str]] = []
        damaged: list[tuple[str, str]] = []
        for r in records:
            size = self._blobs.size(r.artifact_sha256)
            if size is None and self._blobs.unquarantine(r.artifact_sha256, r.artifact_size):
                log.warning(
                    "blob %s of model %s version %s restored from quarantine",
                    r.artifact_sha256,
                    r.name,
                    r.version,
                )
                restored.append(r.artifact_sha256)
                present.add(r.artifact_sha256)
                size = r.artifact_size
            if size is None:
                missing.append((r.name, r.version))
            elif size != r.artifact_size:
                damaged.append((r.name, r.version))
            elif r.artifact_format == 0 and (found := self._header_format(r)) is not None:
                formats.append((r, found))
        try:
            self._index.set_artifact_formats(formats)
        except (StorageFull, StorageReadOnly, StorageUnavailable) as exc:
            # Only what ModelInfo.artifact_format shows: a volume too full (or read-only) for it
            # must not keep the store from serving; the next start tries again.
            log.warning("cannot record the artifact format of %d rows: %s", len(formats), exc)
            formats = []
        quarantined, left = self._quarantine(present - self._index.referenced_digests())
        in_quarantine = self._blobs.quarantined()
        report = SweepReport(
            temp_files_removed=temps,
            orphan_blobs_quarantined=tuple(quarantined),
            missing_blobs=tuple(missing),
            damaged_blobs=tuple(damaged),
            stray_files=len(strays),
            unreadable_rows=tuple(unreadable),
            orphan_blobs_left=tuple(left),
            restored_from_quarantine=tuple(restored),
            quarantine_files=len(in_quarantine),
            formats_recorded=len(formats),
        )
        if temps:
            log.info("swept interrupted uploads", extra={"temp_files": temps})
        if in_quarantine:
            log.warning(
                "%d files in %s: blobs no index row pointed at when the store started; "
                "re-publish or purge them (README, Operating it)",
                len(in_quarantine),
                self._blobs.quarantine_dir,
            )
        for name, version in missing:
            log.error("blob of model %s version %s is missing", name, version)
        for name, version in damaged:
            log.error("blob of model %s version %s has the wrong size", name, version)
        for path in temp_strays:
            log.warning("unexpected file in the upload directory, left alone: %s", path)
        for path in blob_strays:
            if path.is_symlink():
                log.warning("symbolic link in the blob tree, not followed nor counted: %s", path)
            else:
                log.warning("unexpected file in the blob tree: %s", path)
        return report

    def _header_format(self, record: ModelRecord) -> int | None:
        """The format of ``record``'s artifact, read from its stored header (for a row from before
        the index had the column); None, logged, if the header does not read."""
        try:
            fd = self._blobs.open_read(record.artifact_sha256)
            try:
                head = pread_full(fd, record.header_size, 0)
            finally:
                os.close(fd)
            header = parse_header(head)
        except (OSError, InvalidArtifact) as exc:
            log.warning(
                "cannot read the artifact format of %s %s from its header: %s",
                record.name,
                record.version,
                exc,
            )
            return None
        if header.header_size != record.header_size:
            log.warning("the header of %s %s disagrees with its row", record.name, record.version)
            return None
        return header.format_version

    def _quarantine(self, orphans: set[str]) -> tuple[list[str], list[str]]:
        """Moves each unreferenced blob to the quarantine; returns the digests moved and those
        left in place (their move failed: logged, kept, tried again at the next start)."""
        moved: list[str] = []
        left: list[str] = []
        for digest in sorted(orphans):
            try:
                target = self._blobs.quarantine(digest)
            except OSError as exc:
                log.error(
                    "blob %s is referenced by no index row and cannot be quarantined, left in "
                    "place: %s",
                    digest,
                    exc,
                )
                left.append(digest)
                continue
            log.warning(
                "blob %s is referenced by no index row: moved to %s (a crash's leftover, or a "
                "model an index restored from an older backup does not list)",
                digest,
                target,
            )
            moved.append(digest)
        return moved, left

    # -- writes --------------------------------------------------------------------------------

    def _exists(self, name: str, version: str) -> bool:
        return self._index.get(name, version) is not None

    def put(
        self,
        chunks: Iterable[bytes | memoryview],
        validator: StructureValidator,
        claims: UploadClaims | None = None,
        *,
        authorize: Authorize | None = None,
    ) -> ModelRecord:
        """Stores the artifact made of ``chunks``; name and version come from ``validator``, and
        ``authorize`` (if given) is asked about them as soon as the header names them.

        Raises InvalidArgument (malformed artifact, EmptyUpload, UploadMismatch for a size or digest
        that disagrees with ``claims`` or the header), ModelExists, ArtifactTooLarge, StorageFull,
        StorageReadOnly or StorageUnavailable. On any failure nothing is stored.
        """
        self._check_open()
        try:
            temp = self._blobs.new_temp()
        except OSError as exc:
            raise io_error(exc, "creating an upload file") from None
        with self._uploads.begin(validator, claims, authorize) as upload:
            try:
                for chunk in upload.accept(chunks):
                    temp.write(chunk)
                record = upload.finish(self._clock())
                temp.seal()
                self._commit(temp, record)
            except OSError as exc:
                raise io_error(exc, "storing an upload") from None
            finally:
                temp.discard()
        log.info(
            "stored model",
            extra={"model": record.name, "version": record.version, "size": record.artifact_size},
        )
        return record

    def _commit(self, temp: TempBlob, record: ModelRecord) -> None:
        with self._commit_lock:
            created = self._blobs.install(temp, record.artifact_sha256)
            try:
                self._index.insert(record)
            except BaseException:
                if created and self._index.references(record.artifact_sha256) == 0:
                    self._blobs.remove(record.artifact_sha256)
                raise

    def replace_key_slot(
        self,
        name: str,
        version: str,
        *,
        expected_key_version: int,
        key_version: int,
        wrapped_dek: bytes,
        expected_wrapped_dek: bytes = b"",
    ) -> ModelRecord:
        """Replaces a format-2 artifact's key slot (a re-wrapped data key); returns the new record.

        The rules are :mod:`strongroom.modelstore._keyslot`'s. Crash-safe by the upload protocol:
        the new artifact (new head, same body and footer, copied) becomes a blob of its own, then
        one index transaction swaps the row from the old blob to the new one, if the row still
        points at the old one; the old blob is removed last. A crash at any point leaves the row on
        the old blob or on the new one, each a whole, valid artifact; leftovers are swept at start.
        """
        self._check_open()
        record, fd = self._open_blob(name, version)
        temp: TempBlob | None = None
        try:
            head = pread_full(fd, record.header_size, 0)
            new_head = _keyslot.plan(
                record,
                head,
                expected_key_version=expected_key_version,
                new_key_version=key_version,
                new_wrapped_dek=wrapped_dek,
                expected_wrapped_dek=expected_wrapped_dek,
            )
            if new_head is None:
                return record
            temp = self._blobs.new_temp()
            hasher = hashlib.sha256(new_head.head)
            # The copied body is checked against the recorded digest as it is read: recording the
            # copy's own digest unchecked would turn a damaged blob into one that verifies.
            old_hasher = hashlib.sha256(head)
            temp.write(new_head.head)
            position = record.header_size
            while position < record.artifact_size:
                data = os.pread(fd, min(_COPY_BLOCK, record.artifact_size - position), position)
                if not data:
                    raise StoredDataCorrupt(
                        f"stored artifact {name} {version} is truncated",
                        reason=Reason.BLOB_TRUNCATED,
                    )
                hasher.update(data)
                old_hasher.update(data)
                temp.write(data)
                position += len(data)
            if old_hasher.hexdigest() != record.artifact_sha256:
                log.error(
                    "blob %s of %s %s fails verification", record.artifact_sha256, name, version
                )
                raise StoredDataCorrupt(
                    f"stored artifact {name} {version} does not match its recorded digest",
                    reason=Reason.DIGEST_MISMATCH,
                )
            temp.seal()
            new_record = dataclasses.replace(
                record,
                artifact_sha256=hasher.hexdigest(),
                artifact_size=temp.size,
                key_version=key_version,
                header_size=new_head.header_size,
            )
            self._swap(temp, record, new_record)
        except OSError as exc:
            raise io_error(exc, "replacing a key slot") from None
        finally:
            os.close(fd)
            if temp is not None:
                temp.discard()
        _keyslot.log_replaced(log, name, version, record, key_version)
        return new_record

    def _swap(self, temp: TempBlob, old: ModelRecord, new: ModelRecord) -> None:
        """Installs ``temp`` as ``new``'s blob and moves the row to it, if it is still ``old``."""
        with self._commit_lock:
            created = self._blobs.install(temp, new.artifact_sha256)
            try:
                remaining = self._index.replace(old, new)
            except BaseException:
                if created and self._index.references(new.artifact_sha256) == 0:
                    self._blobs.remove(new.artifact_sha256)
                raise
            if remaining is None:
                if created and self._index.references(new.artifact_sha256) == 0:
                    self._blobs.remove(new.artifact_sha256)
                current = self._index.get(old.name, old.version)
                if current is None:
                    # Deleted during the copy: the rotation client reports that as gone, not as
                    # a failure (KEY_SLOT_CHANGED).
                    raise ModelNotFound(
                        f"model {old.name} version {old.version} was deleted during the re-wrap"
                    )
                if current.artifact_sha256 == new.artifact_sha256:
                    # Another call made the same replacement meanwhile (a concurrent rotation
                    # run: the broker re-wraps a data key to the same bytes): done, not refused.
                    return
                raise KeySlotRejected(
                    f"model {old.name} {old.version} changed during the re-wrap",
                    reason=Reason.KEY_SLOT_CHANGED,
                )
            if remaining == 0:
                try:
                    self._blobs.remove(old.artifact_sha256)
                except OSError as exc:
                    # The row moved, so the re-wrap is done; the old blob is quarantined at next start.
                    log.warning("cannot remove blob %s now: %s", old.artifact_sha256, exc)

    def delete(self, name: str, version: str) -> None:
        """Removes the model; its blob goes when no other model shares it. ModelNotFound if absent."""
        self._check_open()
        validate_name(name)
        validate_version(version)
        with self._commit_lock:
            result = self._index.delete(name, version)
            if result is None:
                raise ModelNotFound(f"model {name} version {version} does not exist")
            digest, remaining = result
            if digest is not None and remaining == 0:
                try:
                    self._blobs.remove(digest)
                except OSError as exc:
                    # The row is gone, so the model is deleted; the blob is quarantined at next start.
                    log.warning("cannot remove blob %s now: %s", digest, exc)
        log.info("deleted model", extra={"model": name, "version": version})

    def delete_corrupt(self, listed_name: str, listed_version: str) -> str:
        """Removes the one unreadable index row a listing names so (``Index.delete_corrupt``);
        returns what it held (its columns, bounded) for the caller's log.

        Its blob is not deleted: the row's name lies outside the grammar (or another field is
        wrong), so its blob's header cannot show the blob is its model's, and it may be another
        model's. The start-up sweep moves it to ``quarantine/`` once no row names it."""
        self._check_open()
        with self._commit_lock:
            return self._index.delete_corrupt(listed_name, listed_version)

    # -- reads ---------------------------------------------------------------------------------

    def stat(self, name: str, version: str) -> ModelRecord:
        """The model's record; ModelNotFound if absent."""
        self._check_open()
        record = self._index.get(validate_name(name), validate_version(version))
        if record is None:
            raise ModelNotFound(f"model {name} version {version} does not exist")
        return record

    def _open_blob(self, name: str, version: str) -> tuple[ModelRecord, int]:
        """The record and a read-only descriptor on its blob, looked up atomically.

        Under the commit lock a concurrent delete (or delete and re-publish) cannot slip between the
        index lookup and the open, so a missing blob really is data loss. Once open, the descriptor
        reads the same bytes even if the model is deleted meanwhile.
        """
        self._check_open()
        validate_name(name)
        validate_version(version)
        with self._commit_lock:
            record = self._index.get(name, version)
            if record is None:
                raise ModelNotFound(f"model {name} version {version} does not exist")
            try:
                fd = self._blobs.open_read(record.artifact_sha256)
            except FileNotFoundError:
                log.error("blob %s of %s %s is missing", record.artifact_sha256, name, version)
                raise StoredDataCorrupt(
                    f"stored artifact {name} {version} is missing", reason=Reason.BLOB_MISSING
                ) from None
            except NotABlobFile as exc:
                log.error("%s (model %s version %s): not served", exc, name, version)
                raise StoredDataCorrupt(
                    f"stored artifact {name} {version} is not a file the store wrote",
                    reason=Reason.BLOB_NOT_A_FILE,
                ) from None
            except OSError as exc:
                raise io_error(exc, "opening an artifact") from None
        return record, fd

    def open(
        self, name: str, version: str, *, offset: int = 0, length: int | None = None
    ) -> FileRangeReader:
        """Opens ``length`` bytes (None: to the end) from ``offset`` of the stored artifact.

        OutOfRange if the range ends past the artifact; StoredDataCorrupt if the blob is missing or
        has the wrong size (checked on every open, it costs one fstat).
        """
        _ranges.check_bounds(offset, length)
        record, fd = self._open_blob(name, version)
        try:
            size = record.artifact_size
            length = _ranges.range_length(offset, length, size)
            actual = os.fstat(fd).st_size
            if actual != size:
                log.error("blob %s is %d bytes, expected %d", record.artifact_sha256, actual, size)
                raise StoredDataCorrupt(
                    f"stored artifact {name} {version} has the wrong size",
                    reason=Reason.BLOB_SIZE_MISMATCH,
                )
            # The blob must be this record's model's (an edited row can name another's, with
            # its digest and sizes): a range that holds the head is checked from its own bytes
            # as they stream (no read of its own), any other range with bytes to serve here.
            covers_head = offset == 0 and length >= record.header_size
            if length and not covers_head:
                try:
                    head = pread_full(fd, record.header_size, 0)
                except OSError as exc:
                    raise io_error(exc, "reading an artifact's header") from None
                stored_header(record, head)
            if length:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(fd)
            raise
        return FileRangeReader(fd, record, offset, length, check_head=covers_head)

    def verify(self, name: str, version: str) -> ModelRecord:
        """Recomputes the stored artifact's SHA-256; StoredDataCorrupt (DATA_LOSS) on any mismatch."""
        record, fd = self._open_blob(name, version)
        try:
            # The head is kept from the digest's own first read, and checked once the bytes are
            # known to be the recorded ones: an edited row naming another model's blob, with its
            # digest and size, verified (damaged bytes stay DIGEST_MISMATCH).
            heads: list[bytes] = []
            digest, size = digest_fd(
                fd, first=lambda block: heads.append(bytes(block[: record.header_size]))
            )
        except OSError as exc:
            raise io_error(exc, "verifying an artifact") from None
        finally:
            os.close(fd)
        if size != record.artifact_size or digest != record.artifact_sha256:
            log.error(
                "blob %s of %s %s fails verification (size %d, digest %s)",
                record.artifact_sha256,
                name,
                version,
                size,
                digest,
            )
            raise StoredDataCorrupt(
                f"stored artifact {name} {version} does not match its recorded digest",
                reason=Reason.DIGEST_MISMATCH,
            )
        stored_header(record, heads[0])
        return record

    def list(
        self, *, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> ModelPage:
        """One page of models whose name starts with ``prefix``, ordered by (name, version).

        ``page_size`` must be between 1 and MAX_PAGE_SIZE; ``page_token`` is the previous page's
        ``next_page_token`` for the same prefix (InvalidArgument otherwise). A row the index
        cannot read is in the page's ``corrupt``, not its models (reads of it stay DATA_LOSS).
        """
        self._check_open()
        after = _pagetoken.start(prefix, page_size, page_token)
        rows = self._index.page(prefix, after, page_size + 1)
        return _pagetoken.page_of(prefix, rows[:page_size], more=len(rows) > page_size)

    def records(self) -> tuple[ModelRecord, ...]:
        """Every stored record, in (name, version) order (for checks and tests; unpaginated)."""
        self._check_open()
        return tuple(self._index.all_records())

    def blob_digests(self) -> set[str]:
        """The digests of all blob files present (for consistency checks and tests)."""
        self._check_open()
        return self._blobs.digests()[0]
