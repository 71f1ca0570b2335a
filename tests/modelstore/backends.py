"""Backend-neutral helpers for the store tests: each works on the filesystem and the S3 backend.

The suite runs every storage test against both backends (the ``storage`` fixture is parametrised);
these helpers do what a test needs to reach under the interface — damage a stored blob, check that
nothing of a failed upload is left — in each backend's own terms.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from typing import Any

from strongroom.modelstore.records import ModelRecord
from strongroom.modelstore.storage import FilesystemStorage, S3Storage

AnyStorage = FilesystemStorage | S3Storage


def assert_clean(storage: AnyStorage) -> None:
    """Nothing of a failed or finished upload is left: exactly the blobs the index references."""
    if isinstance(storage, FilesystemStorage):
        assert list((storage.root / "tmp").iterdir()) == []
        assert storage.blob_digests() == {r.artifact_sha256 for r in storage.records()}
    else:
        assert storage.pending_uploads() == [], "an unfinished multipart upload was left"
        assert set(storage.blob_sizes()) == set(storage.referenced_blobs())


def blob_count(storage: AnyStorage) -> int:
    """How many artifact blobs exist (referenced or not)."""
    if isinstance(storage, FilesystemStorage):
        return len(storage.blob_digests())
    return len(storage.blob_sizes())


def _s3_blob(storage: S3Storage, record: ModelRecord) -> str:
    for blob, r in storage.referenced_blobs().items():
        if (r.name, r.version) == (record.name, record.version):
            return storage.prefix + blob
    raise AssertionError(f"no blob for {record.name} {record.version}")


def _raw(storage: S3Storage) -> Any:
    return storage._client  # the test reaches under the interface on purpose


def read_blob(storage: AnyStorage, record: ModelRecord) -> bytes:
    """The stored bytes of ``record``'s blob, read directly."""
    if isinstance(storage, FilesystemStorage):
        return _fs_blob(storage, record).read_bytes()
    body = _raw(storage).get_object(Bucket=storage.bucket, Key=_s3_blob(storage, record))["Body"]
    return bytes(body.read())


def overwrite_blob(storage: AnyStorage, record: ModelRecord, data: bytes) -> None:
    """Replaces ``record``'s stored bytes behind the store's back (corruption, truncation)."""
    if isinstance(storage, FilesystemStorage):
        path = _fs_blob(storage, record)
        path.chmod(0o600)
        path.write_bytes(data)
        return
    _raw(storage).put_object(Bucket=storage.bucket, Key=_s3_blob(storage, record), Body=data)


def remove_blob(storage: AnyStorage, record: ModelRecord) -> None:
    """Deletes ``record``'s blob behind the store's back."""
    if isinstance(storage, FilesystemStorage):
        os.unlink(_fs_blob(storage, record))
        return
    _raw(storage).delete_object(Bucket=storage.bucket, Key=_s3_blob(storage, record))


def point_at_blob_of(storage: AnyStorage, record: ModelRecord, other: ModelRecord) -> None:
    """Edits ``record``'s index entry behind the store's back to name ``other``'s blob (with its
    digest and sizes, so that nothing but the blob's own header tells the two apart)."""
    fields = ("artifact_sha256", "artifact_size", "plaintext_size", "plaintext_sha256")
    if isinstance(storage, FilesystemStorage):
        with contextlib.closing(sqlite3.connect(storage.root / "index.sqlite3")) as db, db:
            db.execute(
                f"UPDATE models SET {', '.join(f'{f} = ?' for f in fields)}, header_size = ?"
                " WHERE name = ? AND version = ?",
                (
                    *(getattr(other, f) for f in fields),
                    other.header_size,
                    record.name,
                    record.version,
                ),
            )
        return
    key = f"{storage.prefix}index/{record.name}!{record.version}"
    raw = _raw(storage)
    entry = json.loads(raw.get_object(Bucket=storage.bucket, Key=key)["Body"].read())
    entry |= {f: getattr(other, f) for f in (*fields, "header_size")}
    entry["blob"] = _s3_blob(storage, other).removeprefix(storage.prefix)
    raw.put_object(Bucket=storage.bucket, Key=key, Body=json.dumps(entry).encode())


def edit_index_entry(storage: AnyStorage, record: ModelRecord, **values: object) -> None:
    """Sets fields of ``record``'s index entry behind the store's back (names as in
    ``records.STORED_FIELDS``: a filesystem row's columns, an S3 index object's keys)."""
    if isinstance(storage, FilesystemStorage):
        with contextlib.closing(sqlite3.connect(storage.root / "index.sqlite3")) as db, db:
            db.execute(
                f"UPDATE models SET {', '.join(f'{f} = ?' for f in values)}"
                " WHERE name = ? AND version = ?",
                (*values.values(), record.name, record.version),
            )
        return
    key = f"{storage.prefix}index/{record.name}!{record.version}"
    raw = _raw(storage)
    entry = json.loads(raw.get_object(Bucket=storage.bucket, Key=key)["Body"].read())
    raw.put_object(Bucket=storage.bucket, Key=key, Body=json.dumps(entry | values).encode())


def _fs_blob(storage: FilesystemStorage, record: ModelRecord) -> Any:
    digest = record.artifact_sha256
    return storage.root / "blobs" / "sha256" / digest[:2] / digest
