"""The SQLite metadata index of the filesystem backend: one row per (name, version).

WAL mode with ``synchronous=FULL``: a commit that returned is durable, and readers never block the
writer. The primary key on (name, version) is the final arbiter of immutability: whatever the
reservations upstream do, two rows for one name and version cannot exist. Blob reference counts are
derived from the rows (``COUNT(*) ... WHERE artifact_sha256 = ?``), never stored separately, so they
cannot drift from what is listed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from strongroom.errors import FailedPrecondition
from strongroom.identifiers import MAX_NAME_LENGTH, MAX_VERSION_LENGTH, is_sha256_hex
from strongroom.modelstore.errors import (
    ModelExists,
    ModelNotFound,
    StorageFull,
    StorageReadOnly,
    StorageUnavailable,
    StoredDataCorrupt,
)
from strongroom.modelstore.records import (
    STORED_FIELDS,
    CorruptEntry,
    ModelRecord,
    UnreadableEntries,
    held_text,
    listed_prefix,
    listed_text,
    problem_text,
    stored_record,
    to_micros,
)
from strongroom.reasons import Reason

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name             TEXT    NOT NULL,
    version          TEXT    NOT NULL,
    artifact_sha256  TEXT    NOT NULL,
    artifact_size    INTEGER NOT NULL CHECK (artifact_size > 0),
    plaintext_size   INTEGER NOT NULL CHECK (plaintext_size >= 0),
    plaintext_sha256 TEXT    NOT NULL,
    content_type     TEXT    NOT NULL,
    key_id           TEXT    NOT NULL,
    key_version      INTEGER NOT NULL,
    header_size      INTEGER NOT NULL,
    created_at_us    INTEGER NOT NULL,
    stored_at_us     INTEGER NOT NULL,
    artifact_format  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS models_by_digest ON models (artifact_sha256);
"""
# ``artifact_format`` came after schema version 1 and is added to an older index in place (ALTER
# TABLE ... ADD COLUMN) without a new version: every statement names its columns, so a store
# older than the column still reads and writes the index (its rows get 0, "not known", which the
# next start of a newer store fills in from the stored header).
_ADD_FORMAT = "ALTER TABLE models ADD COLUMN artifact_format INTEGER NOT NULL DEFAULT 0"

_SELECT = """SELECT name, version, artifact_sha256, artifact_size, plaintext_size, plaintext_sha256,
    content_type, key_id, key_version, header_size, created_at_us, stored_at_us, artifact_format
    FROM models"""
_GET = _SELECT + " WHERE name = ? AND version = ?"
# A key bound as its bytes (a row's name may hold bytes that are not UTF-8, see _PAGE).
# The rows whose name's bytes lie in [?, ?): those starting with a prefix (see _after_prefix).
_SCAN_NAMES = _SELECT + " WHERE name >= CAST(? AS TEXT) AND name < CAST(? AS TEXT)"
_DELETE_KEY = "DELETE FROM models WHERE name = CAST(? AS TEXT) AND version = CAST(? AS TEXT)"
_ALL = _SELECT + " ORDER BY name, version"
# Every clause is always present (an empty prefix and an empty "after" key match everything), so
# the query text is constant; the range clause lets SQLite answer from the primary key. Its lower
# bound (:lower) is the larger of the prefix and the resume point's name, computed by the caller:
# SQLite seeks on only one lower bound of a column, and given two (or the row value) it picked
# the prefix, so each later page scanned every row before its resume point (a page token near the
# end of a large index read the whole index, under the index's lock).
# The resume point is bound as the key's bytes and cast to TEXT (SQLite keeps the bytes): a row an
# edit left with bytes that are not UTF-8 reads as text with surrogate escapes (:func:`_text`),
# which cannot be bound as text, and a page must be able to end at it.
# A row whose name or version has more bytes than any (only an edit of the index can make one) is
# left out: a page token could not name it to resume after it, and a page of such rows could pass
# the store's send limit. The start-up sweep names it (unreadable_rows).
_PAGE = (
    _SELECT + " WHERE substr(name, 1, length(:prefix)) = :prefix"
    " AND name >= CAST(:lower AS TEXT) AND name < :prefix_end"
    " AND (name, version) > (CAST(:after_name AS TEXT), CAST(:after_version AS TEXT))"
    f" AND length(CAST(name AS BLOB)) <= {MAX_NAME_LENGTH}"
    f" AND length(CAST(version AS BLOB)) <= {MAX_VERSION_LENGTH}"
    " ORDER BY name, version LIMIT :limit"
)
_INSERT = """INSERT INTO models (name, version, artifact_sha256, artifact_size, plaintext_size,
    plaintext_sha256, content_type, key_id, key_version, header_size, created_at_us, stored_at_us,
    artifact_format) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

# Every name character sorts below DEL, so [prefix, prefix + DEL) holds exactly the names
# starting with prefix, and SQLite can answer it from the primary key.
_PREFIX_END = "\x7f"


_OPEN_ROOM = 1024 * 1024
"""Free space below which a failure to open the index is put down to a full volume: SQLite's
-shm file alone takes 32 KiB, and the first writes grow the -wal file."""


def _volume_full(directory: Path) -> bool:
    """True if the volume holding ``directory`` has less than :data:`_OPEN_ROOM` bytes free."""
    try:
        info = os.statvfs(directory)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < _OPEN_ROOM


def _volume_read_only(directory: Path) -> bool:
    """True if the volume holding ``directory`` is mounted read-only. SQLite reports a write the
    kernel refused with EROFS as a plain I/O error once the database is open, so the mount is
    asked instead."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# _SELECT's columns, in order.
_COLUMNS = STORED_FIELDS


def _text(value: bytes) -> str:
    """A TEXT value as read (the connection's ``text_factory``): UTF-8, with any byte that is not
    (an edit of the index, a damaged page) kept as a surrogate escape. The default factory raised
    on such a row, which failed every read that met it, the start-up sweep's included: the store
    did not start. The row is then unreadable by the index's rules (INDEX_CORRUPT), no more."""
    return value.decode("utf-8", "surrogateescape")


def key_bytes(text: str) -> bytes:
    """The stored bytes of a key read by :func:`_text` (or of any str)."""
    return text.encode("utf-8", "surrogateescape")


def _entry(row: Any, unreadable: UnreadableEntries) -> ModelRecord | CorruptEntry:
    """The record of one row, or, for a row this store cannot have written (edited or damaged on
    disk), the entry naming it (logged) with the first field that breaks the rules of
    :func:`~strongroom.modelstore.records.stored_record`, which the S3 index shares. The digest
    names the blob's file (joined to the blob directory) and the name and version reach every
    caller of a listing: a row this store cannot have written must not make it read or delete a
    file elsewhere, nor hand a client a name it would refuse. Logged once (``unreadable``),
    not on every page that covers it."""
    try:
        return stored_record(dict(zip(_COLUMNS, row, strict=True)))
    except ValueError as exc:
        problem = problem_text(exc)
        unreadable.report(_logged_as(row), problem)
        return CorruptEntry(str(row[0]), str(row[1]), problem)


def _after_prefix(prefix: bytes) -> bytes | None:
    """The least byte string above every one starting with ``prefix`` (SQLite's BINARY order is
    the bytes' order); None if there is none (empty, or all 0xff bytes)."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes((stripped[-1] + 1,)) if stripped else None


def _readable(row: Any) -> bool:
    """Whether a row holds a record this store can have written (not logged: the caller asks)."""
    try:
        stored_record(dict(zip(_COLUMNS, row, strict=True)))
    except ValueError:
        return False
    return True


def _logged_as(row: Any) -> str:
    """How :class:`~strongroom.modelstore.records.UnreadableEntries` names a row."""
    return f"index row of {_where(row)}"


def _where(row: Any) -> str:
    """A row's name and version for a message: quoted, escaped and cut short (an edited row's
    could hold line breaks or megabytes)."""
    return f"{str(row[0])[:256]!r} {str(row[1])[:256]!r}"


def _record(row: Any, unreadable: UnreadableEntries) -> ModelRecord:
    """The record of one row; ``StoredDataCorrupt(INDEX_CORRUPT)``, naming the model and the
    field, for a row this store cannot have written (:func:`_entry`)."""
    entry = _entry(row, unreadable)
    if isinstance(entry, CorruptEntry):
        raise StoredDataCorrupt(
            f"the index row of {_where(row)} is unreadable: {entry.problem}",
            reason=Reason.INDEX_CORRUPT,
        )
    return entry


class Index:
    """Thread-safe access to the index database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._directory = path.parent
        self._unreadable = UnreadableEntries(log)
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self._db.text_factory = _text
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageUnavailable(
                    f"index database refused WAL mode (got {mode})", reason=Reason.INDEX_UNAVAILABLE
                )
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StorageUnavailable(
                    f"index schema version {version} is not supported (expected {SCHEMA_VERSION})",
                    reason=Reason.INDEX_SCHEMA,
                )
            self._db.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(models)")}
            if "artifact_format" not in columns:
                self._db.execute(_ADD_FORMAT)
        except BaseException as exc:
            # Closed now: left to the collector (the exception's traceback holds this frame),
            # a failed open kept its file descriptors and its -shm mapping for an unknown time,
            # and the next open of the same index in this process could fail on their account.
            if hasattr(self, "_db"):
                self._db.close()
            if not isinstance(exc, sqlite3.Error):
                raise
            log.error("cannot open index %s: %s", path, exc)
            if _volume_read_only(path.parent):
                raise StorageReadOnly(
                    "the storage volume is read-only: the model index cannot be opened"
                ) from None
            if _volume_full(path.parent):
                # SQLite reports a -shm file it cannot extend as a "disk I/O error", which points
                # at failing hardware; the operator's task is to make room.
                raise StorageFull(
                    "no space left on the storage volume to open the model index (SQLite needs "
                    f"room for its -wal and -shm files; at least {_OPEN_ROOM} bytes)"
                ) from None
            raise StorageUnavailable(
                "cannot open the model index database", reason=Reason.INDEX_UNAVAILABLE
            ) from None

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            try:
                yield self._db.cursor()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                log.error("index operation failed: %s", exc)
                code = getattr(exc, "sqlite_errorcode", None)
                if code == sqlite3.SQLITE_FULL:
                    # The volume is full: no retry helps until the operator makes room, so it is
                    # the same answer as an upload's own ENOSPC, not a passing I/O failure.
                    raise StorageFull(
                        "no space left on the storage volume for the model index"
                    ) from None
                if code == sqlite3.SQLITE_READONLY or _volume_read_only(self._directory):
                    raise StorageReadOnly(
                        "the storage volume is read-only: the model index cannot be written"
                    ) from None
                raise StorageUnavailable(
                    "the model index database failed", reason=Reason.INDEX_IO
                ) from None

    def get(self, name: str, version: str) -> ModelRecord | None:
        """The record for ``name``/``version``, or None."""
        with self._cursor() as cur:
            row = cur.execute(_GET, (name, version)).fetchone()
        return None if row is None else _record(row, self._unreadable)

    def insert(self, record: ModelRecord) -> None:
        """Adds ``record`` in its own transaction; ModelExists if the name and version are taken."""
        values = (
            record.name,
            record.version,
            record.artifact_sha256,
            record.artifact_size,
            record.plaintext_size,
            record.plaintext_sha256,
            record.content_type,
            record.key_id,
            record.key_version,
            record.header_size,
            to_micros(record.created_at),
            to_micros(record.stored_at),
            record.artifact_format,
        )
        try:
            with self._cursor() as cur:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    cur.execute(_INSERT, values)
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
        except sqlite3.IntegrityError:
            raise ModelExists(
                f"model {record.name} version {record.version} already exists"
            ) from None

    def replace(self, old: ModelRecord, new: ModelRecord) -> int | None:
        """Swaps ``old``'s row for ``new`` (same name and version) if the row still points at old's blob.

        One transaction: the compare (the row's ``artifact_sha256``) and the update are atomic, so
        of two concurrent replacements one wins. Returns how many rows still point at old's blob, or
        None if the row changed meanwhile (or is gone).
        """
        with self._cursor() as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                updated = cur.execute(
                    "UPDATE models SET artifact_sha256 = ?, artifact_size = ?, key_version = ?,"
                    " header_size = ? WHERE name = ? AND version = ? AND artifact_sha256 = ?",
                    (
                        new.artifact_sha256,
                        new.artifact_size,
                        new.key_version,
                        new.header_size,
                        old.name,
                        old.version,
                        old.artifact_sha256,
                    ),
                ).rowcount
                if updated != 1:
                    cur.execute("ROLLBACK")
                    return None
                remaining = cur.execute(
                    "SELECT COUNT(*) FROM models WHERE artifact_sha256 = ?", (old.artifact_sha256,)
                ).fetchone()[0]
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
        return int(remaining)

    def delete(self, name: str, version: str) -> tuple[str | None, int] | None:
        """Removes the row; returns its blob's digest and how many rows still share that blob, or
        None if absent.

        An unreadable row (edited or damaged on disk) is removed too: deleting it is how an admin
        gets rid of it. Its digest is None if it is not one this store writes (no file is named
        after it)."""
        with self._cursor() as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute(_GET, (name, version)).fetchone()
                if row is None:
                    cur.execute("ROLLBACK")
                    return None
                cur.execute("DELETE FROM models WHERE name = ? AND version = ?", (name, version))
                remaining = cur.execute(
                    "SELECT COUNT(*) FROM models WHERE artifact_sha256 = ?", (row[2],)
                ).fetchone()[0]
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
        self._unreadable.forget(_logged_as(row))
        digest = row[2] if is_sha256_hex(row[2]) else None
        return digest, int(remaining)

    def delete_corrupt(self, listed_name: str, listed_version: str) -> str:
        """Removes the one unreadable row a listing names ``listed_name`` ``listed_version``
        (:func:`~strongroom.modelstore.records.listed_text` of its name and version), in one
        transaction, and returns what it held (:func:`~strongroom.modelstore.records.held_text`
        of its columns) for the caller's log. ModelNotFound if no row is listed so,
        FailedPrecondition INDEX_ENTRY_NOT_CORRUPT if the row is readable, INDEX_ENTRY_AMBIGUOUS
        if several unreadable rows are (a literal ``\\x`` beside an escaped byte): nothing is
        deleted then."""
        # Every row whose name starts with the listed name's literal part, its listed text
        # compared: looking up only the text read all literally and all as bytes missed a row
        # mixing the two (listed, never deletable so) and so an ambiguity beside a row it found.
        low = key_bytes(listed_prefix(listed_name))
        high = _after_prefix(low)
        scan = (_ALL, ()) if high is None else (_SCAN_NAMES, (low, high))
        where = f"{listed_name[:256]!r} {listed_version[:256]!r}"
        with self._cursor() as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                rows = [
                    row
                    for row in cur.execute(*scan)  # streamed: a scan may cover the index
                    if (listed_text(row[0]), listed_text(row[1])) == (listed_name, listed_version)
                ]
                corrupt = [row for row in rows if not _readable(row)]
                if len(corrupt) != 1:
                    if corrupt:
                        raise FailedPrecondition(
                            f"{len(corrupt)} unreadable index rows are listed as {where}: "
                            "delete them from the index by hand",
                            reason=Reason.INDEX_ENTRY_AMBIGUOUS,
                        )
                    if rows:
                        raise FailedPrecondition(
                            f"the index row of {where} is readable: delete the model without "
                            "corrupt_entry (strongroom model rm without --corrupt)",
                            reason=Reason.INDEX_ENTRY_NOT_CORRUPT,
                        )
                    raise ModelNotFound(f"no index row is listed as {where}")
                cur.execute(_DELETE_KEY, (key_bytes(corrupt[0][0]), key_bytes(corrupt[0][1])))
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
        self._unreadable.forget(_logged_as(corrupt[0]))
        return held_text(dict(zip(_COLUMNS, corrupt[0], strict=True)))

    def references(self, digest: str) -> int:
        """How many rows point at the blob with this digest."""
        with self._cursor() as cur:
            count = cur.execute(
                "SELECT COUNT(*) FROM models WHERE artifact_sha256 = ?", (digest,)
            ).fetchone()[0]
        return int(count)

    def page(
        self, prefix: str, after: tuple[str, str] | None, limit: int
    ) -> list[ModelRecord | CorruptEntry]:
        """Up to ``limit`` entries whose name starts with ``prefix``, after ``after``, in key
        order: a record for each readable row, a :class:`CorruptEntry` for each other (one
        edited row failed every page that covered it)."""
        after_name, after_version = after if after else ("", "")
        params = {
            "prefix": prefix,
            "prefix_end": prefix + _PREFIX_END,
            # Compared as bytes, SQLite's BINARY order (a corrupt row's name need not be ASCII).
            "lower": max(key_bytes(prefix), key_bytes(after_name)),
            "after_name": key_bytes(after_name),
            "after_version": key_bytes(after_version),
            "limit": limit,
        }
        with self._cursor() as cur:
            rows = cur.execute(_PAGE, params).fetchall()
        return [_entry(row, self._unreadable) for row in rows]

    def all_records(self) -> list[ModelRecord]:
        """Every record (for tests); ``StoredDataCorrupt`` if a row is unreadable."""
        with self._cursor() as cur:
            rows = cur.execute(_ALL).fetchall()
        return [_record(row, self._unreadable) for row in rows]

    def readable_records(self) -> tuple[list[ModelRecord], list[tuple[str, str]]]:
        """Every readable record, and the (name, version) of the rows that are not, each logged
        (start-up checks: one edited row must not keep the others from being served)."""
        with self._cursor() as cur:
            rows = cur.execute(_ALL).fetchall()
        records: list[ModelRecord] = []
        unreadable: list[tuple[str, str]] = []
        for row in rows:
            try:
                records.append(_record(row, self._unreadable))
            except StoredDataCorrupt:
                unreadable.append((str(row[0]), str(row[1])))
        return records, unreadable

    def set_artifact_formats(self, formats: list[tuple[ModelRecord, int]]) -> None:
        """Records the format of each record's artifact, in one transaction (one sync however
        many rows an older index holds), where its row still has none and still points at the
        same blob (a row a newer upload or a re-wrap changed meanwhile is left alone)."""
        if not formats:
            return
        with self._cursor() as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(
                    "UPDATE models SET artifact_format = ? WHERE name = ? AND version = ?"
                    " AND artifact_sha256 = ? AND artifact_format = 0",
                    [(f, r.name, r.version, r.artifact_sha256) for r, f in formats],
                )
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def referenced_digests(self) -> set[str]:
        """The blob digest of every row, readable or not (a blob any row names is never an
        orphan)."""
        with self._cursor() as cur:
            rows = cur.execute("SELECT DISTINCT artifact_sha256 FROM models").fetchall()
        return {str(row[0]) for row in rows}

    def close(self) -> None:
        """Closes the connection (idempotent)."""
        with self._lock:
            self._db.close()
