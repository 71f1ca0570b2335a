"""Storage backends: the filesystem one (real files, real SQLite) and the S3 one (a real S3 server).

Tests taking ``storage`` run on both backends; ``fs_storage`` / ``store_root`` tests are about the
filesystem backend's own mechanisms (its root lock, its start-up sweep of a directory).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from strongroom.artifact import StructureValidator
from strongroom.artifact.format import MAX_HEAD_SIZE
from strongroom.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from strongroom.identifiers import MAX_NAME_LENGTH, MAX_VERSION_LENGTH
from strongroom.modelstore._pagetoken import decode as decode_page_token
from strongroom.modelstore._pagetoken import encode as encode_page_token
from strongroom.modelstore.errors import (
    ArtifactTooLarge,
    EmptyUpload,
    ModelExists,
    ModelNotFound,
    OutOfRange,
    StorageLocked,
    StorageUnavailable,
    StoredDataCorrupt,
    UploadMismatch,
)
from strongroom.modelstore.publishers import PublisherScopes
from strongroom.modelstore.records import MAX_UNREADABLE_LOGGED, UnreadableEntries, listed_text
from strongroom.modelstore.storage import (
    FilesystemStorage,
    IntegrityProblem,
    S3Storage,
    Storage,
    UploadClaims,
    verify_all,
)
from tests.modelstore import rewrap_case
from tests.modelstore.artifacts import chunked, make_artifact, with_header
from tests.modelstore.backends import (
    AnyStorage,
    assert_clean,
    blob_count,
    edit_index_entry,
    overwrite_blob,
    read_blob,
    remove_blob,
)
from tests.modelstore.shortreads import force_short_body_reads, force_short_reads


def body(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(n)


def put(storage: Storage, data: bytes, **claims: object) -> object:
    return storage.put(chunked(data), StructureValidator(), UploadClaims(**claims))  # type: ignore[arg-type]


def read_all(storage: Storage, name: str, version: str, **kw: int) -> bytes:
    with storage.open(name, version, **kw) as reader:
        return b"".join(reader.chunks(7919))


def test_both_backends_are_storages(storage: AnyStorage) -> None:
    s: Storage = storage
    assert s is storage


def test_put_stat_read_verify(storage: AnyStorage) -> None:
    created = datetime(2025, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    art = make_artifact("acme/fraud", "1.0.0", body(300_000), created_at=created)
    record = storage.put(chunked(art), StructureValidator())
    assert (record.name, record.version) == ("acme/fraud", "1.0.0")
    assert record.artifact_sha256 == hashlib.sha256(art).hexdigest()
    assert record.artifact_size == len(art)
    assert record.plaintext_size == 300_000
    assert record.key_id == "kek-test" and record.key_version == 3
    assert record.content_type == "application/onnx"
    assert record.created_at == created
    assert record.stored_at.tzinfo is not None
    assert storage.stat("acme/fraud", "1.0.0") == record
    assert read_all(storage, "acme/fraud", "1.0.0") == art
    assert storage.verify("acme/fraud", "1.0.0") == record
    assert read_blob(storage, record) == art
    if isinstance(storage, FilesystemStorage):
        blob = (
            storage.root / "blobs" / "sha256" / record.artifact_sha256[:2] / record.artifact_sha256
        )
        assert stat.S_IMODE(blob.stat().st_mode) == 0o400, "stored data is never modified in place"
    assert_clean(storage)


@pytest.mark.parametrize("artifact_format", [1, 2, 3])
def test_the_artifact_format_is_recorded_from_the_header(
    storage: AnyStorage, artifact_format: int
) -> None:
    art = make_artifact("m", "1", body(1000), format_version=artifact_format)
    record = storage.put(chunked(art), StructureValidator())
    assert record.artifact_format == artifact_format
    assert storage.stat("m", "1") == record
    assert storage.list().models == (record,)


def test_rows_from_before_the_format_column_get_it_from_their_header_at_start(
    store_root: Path,
) -> None:
    """An index an older store wrote has no artifact_format column: the column is added in place
    (the older store can still use the index) and each row's format read from its blob's header."""
    with FilesystemStorage(store_root) as s:
        s.put([make_artifact("legacy", "1", b"a", format_version=1)], StructureValidator())
        s.put([make_artifact("current", "1", b"b")], StructureValidator())
    db = sqlite3.connect(store_root / "index.sqlite3")
    db.execute("ALTER TABLE models DROP COLUMN artifact_format")
    db.commit()
    db.close()
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.formats_recorded == 2
        assert {r.name: r.artifact_format for r in s.records()} == {"legacy": 1, "current": 3}
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.formats_recorded == 0
        assert s.stat("legacy", "1").artifact_format == 1


def test_record_survives_reopen(store_root: Path) -> None:
    art = make_artifact("m", "1", body(1000))
    with FilesystemStorage(store_root) as s:
        record = s.put([art], StructureValidator())
    with FilesystemStorage(store_root) as s:
        assert s.stat("m", "1") == record
        assert s.last_sweep.temp_files_removed == 0
        assert s.last_sweep.orphan_blobs_quarantined == ()
        assert read_all(s, "m", "1") == art


def test_injected_clock_sets_stored_at(store_root: Path) -> None:
    moment = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    with FilesystemStorage(store_root, clock=lambda: moment) as s:
        assert s.put([make_artifact("m", "1", b"x")], StructureValidator()).stored_at == moment


def test_range_reads(storage: AnyStorage) -> None:
    art = make_artifact("m", "1", body(100_000))
    storage.put(chunked(art), StructureValidator())
    size = len(art)
    assert read_all(storage, "m", "1", offset=1234) == art[1234:]
    assert read_all(storage, "m", "1", offset=10, length=50_000) == art[10:50_010]
    assert read_all(storage, "m", "1", offset=size - 1) == art[-1:]
    with storage.open("m", "1", offset=size) as reader:
        assert reader.length == 0 and list(reader.chunks(1024)) == []
    with storage.open("m", "1", offset=5, length=0) as reader:
        assert reader.length == 0 and list(reader.chunks(1024)) == []
    with pytest.raises(OutOfRange):
        storage.open("m", "1", offset=size + 1)
    with pytest.raises(OutOfRange):
        storage.open("m", "1", offset=size - 10, length=11)
    with pytest.raises(InvalidArgument):
        storage.open("m", "1", offset=-1)
    with pytest.raises(ModelNotFound):
        storage.open("m", "2")


def test_reader_keeps_working_after_delete(storage: AnyStorage) -> None:
    art = make_artifact("m", "1", body(200_000))
    storage.put(chunked(art), StructureValidator())
    with storage.open("m", "1") as reader:
        chunks = reader.chunks(50_000)
        first = next(chunks)
        storage.delete("m", "1")
        assert first + b"".join(chunks) == art
    assert_clean(storage)


def test_second_put_of_same_version_is_rejected_and_first_intact(
    storage: AnyStorage,
) -> None:
    first = make_artifact("m", "1", body(5000, 1))
    record = storage.put(chunked(first), StructureValidator())
    with pytest.raises(ModelExists) as info:
        storage.put(chunked(make_artifact("m", "1", body(5000, 2))), StructureValidator())
    assert info.value.reason == "MODEL_EXISTS"
    with pytest.raises(ModelExists):
        storage.put(chunked(first), StructureValidator())  # identical bytes: still immutable
    assert storage.stat("m", "1") == record
    assert read_all(storage, "m", "1") == first
    storage.verify("m", "1")
    assert_clean(storage)


def test_existing_version_fails_after_header_not_after_body(storage: AnyStorage) -> None:
    storage.put([make_artifact("m", "1", b"a")], StructureValidator())
    consumed = 0

    def chunks() -> Iterator[bytes]:
        nonlocal consumed
        for c in chunked(make_artifact("m", "1", body(1_000_000)), 1024):
            consumed += 1
            yield c

    with pytest.raises(ModelExists):
        storage.put(chunks(), StructureValidator())
    assert consumed == 1


def test_concurrent_uploads_of_one_version_have_exactly_one_winner(storage: AnyStorage) -> None:
    n = 8
    arts = [make_artifact("race", "1", body(200_000, i)) for i in range(n)]
    barrier = threading.Barrier(n)
    outcomes: list[object] = [None] * n

    def upload(i: int) -> None:
        def chunks() -> Iterator[bytes]:
            barrier.wait()
            yield from chunked(arts[i], 8192)

        try:
            outcomes[i] = storage.put(chunks(), StructureValidator())
        except ModelExists as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, ModelExists)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, ModelExists) for i, o in enumerate(outcomes) if i != winners[0])
    assert read_all(storage, "race", "1") == arts[winners[0]]
    storage.verify("race", "1")
    assert len(storage.records()) == 1
    assert_clean(storage)


def test_losing_concurrent_upload_fails_fast(storage: AnyStorage) -> None:
    """While one upload of a version is in flight, another fails right after its header."""
    in_flight, release = threading.Event(), threading.Event()
    winner_art = make_artifact("m", "1", body(100_000, 1))

    def slow_chunks() -> Iterator[bytes]:
        parts = chunked(winner_art, 1024)
        yield parts[0]
        in_flight.set()
        release.wait(10)
        yield from parts[1:]

    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(storage.put(slow_chunks(), StructureValidator()))
    )
    t.start()
    assert in_flight.wait(10)
    consumed = 0

    def loser_chunks() -> Iterator[bytes]:
        nonlocal consumed
        for c in chunked(make_artifact("m", "1", body(100_000, 2)), 1024):
            consumed += 1
            yield c

    try:
        with pytest.raises(ModelExists) as info:
            storage.put(loser_chunks(), StructureValidator())
        assert info.value.reason == "UPLOAD_IN_PROGRESS"
        assert consumed == 1
    finally:
        release.set()
        t.join(10)
    assert read_all(storage, "m", "1") == winner_art


def test_reservation_is_released_when_an_upload_fails(storage: AnyStorage) -> None:
    art = make_artifact("m", "1", body(10_000))
    with pytest.raises(InvalidArgument):
        storage.put(chunked(art[:-1]), StructureValidator())  # truncated
    with pytest.raises(UploadMismatch):
        storage.put(chunked(art), StructureValidator(), UploadClaims(sha256="0" * 64))
    assert storage.put(chunked(art), StructureValidator()).name == "m"


def test_an_upload_its_authoriser_refuses_stops_at_the_header_and_stores_nothing(
    storage: AnyStorage,
) -> None:
    asked: list[tuple[str, str]] = []
    consumed = 0

    def only_team_a(name: str, version: str) -> None:
        asked.append((name, version))
        PublisherScopes({"spiffe://t.test/p": ("team-a/",)}).check("spiffe://t.test/p", name)

    def chunks(name: str) -> Iterator[bytes]:
        nonlocal consumed
        for c in chunked(make_artifact(name, "1", body(1_000_000)), 1024):
            consumed += 1
            yield c

    with pytest.raises(PermissionDenied) as info:
        storage.put(chunks("team-b/m"), StructureValidator(), authorize=only_team_a)
    assert info.value.reason == "MODEL_NAME_NOT_ALLOWED"
    # Asked with the header's name, once, before the body: the version was never reserved.
    assert asked == [("team-b/m", "1")] and consumed == 1
    assert storage.records() == ()
    assert_clean(storage)
    assert storage.put(chunks("team-b/m"), StructureValidator()).name == "team-b/m"
    assert storage.put(chunks("team-a/m"), StructureValidator(), authorize=only_team_a).name


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"NOTANART" + b"\0" * 100, "BAD_MAGIC"),
        (make_artifact("m", "1", b"abc") + b"!", "TRAILING_DATA"),
        (make_artifact("m", "1", b"abc")[:-1], "TRUNCATED"),
        (make_artifact("m", "1", b"abc")[:10], "TRUNCATED"),
        (with_header(make_artifact("m", "1", b"abc"), model_name="bad name"), "INVALID_MODEL_NAME"),
        (
            with_header(make_artifact("m", "1", b"abc"), model_version="1/2"),
            "INVALID_MODEL_VERSION",
        ),
    ],
)
def test_invalid_artifacts_are_rejected_and_nothing_is_stored(
    storage: AnyStorage, data: bytes, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        storage.put(chunked(data, 16), StructureValidator())
    assert info.value.reason == reason
    assert storage.records() == ()
    assert blob_count(storage) == 0
    assert_clean(storage)


def test_empty_upload(storage: AnyStorage) -> None:
    with pytest.raises(EmptyUpload):
        storage.put([], StructureValidator())
    with pytest.raises(EmptyUpload):
        storage.put([b"", b""], StructureValidator())
    assert_clean(storage)


def test_client_claims_are_checked(storage: AnyStorage) -> None:
    art = make_artifact("m", "1", body(50_000))
    digest = hashlib.sha256(art).hexdigest()
    with pytest.raises(UploadMismatch) as info:
        put(storage, art, size=len(art) + 1)
    assert info.value.reason == "SIZE_MISMATCH"
    with pytest.raises(UploadMismatch) as info:
        put(storage, art, size=len(art) - 1)
    assert info.value.reason == "SIZE_MISMATCH"
    with pytest.raises(UploadMismatch) as info:
        put(storage, art, sha256=hashlib.sha256(b"other").hexdigest())
    assert info.value.reason == "DIGEST_MISMATCH"
    with pytest.raises(InvalidArgument) as info2:
        put(storage, art, sha256=digest.upper())
    assert info2.value.reason == "INVALID_SHA256"
    assert storage.records() == ()
    assert_clean(storage)
    record = put(storage, art, size=len(art), sha256=digest)
    assert record == storage.stat("m", "1")


def test_too_small_claimed_size_fails_before_the_whole_upload(storage: AnyStorage) -> None:
    consumed = 0

    def chunks() -> Iterator[bytes]:
        nonlocal consumed
        for c in chunked(make_artifact("m", "1", body(100_000)), 1000):
            consumed += 1
            yield c

    with pytest.raises(UploadMismatch):
        storage.put(chunks(), StructureValidator(), UploadClaims(size=5000))
    assert consumed == 6


def test_size_limit(store_root: Path) -> None:
    with FilesystemStorage(store_root, max_artifact_size=10_000) as s:
        consumed = 0

        def chunks() -> Iterator[bytes]:
            nonlocal consumed
            for c in chunked(make_artifact("m", "1", body(50_000)), 1000):
                consumed += 1
                yield c

        with pytest.raises(ArtifactTooLarge) as info:
            s.put(chunks(), StructureValidator())
        assert info.value.status_name == "RESOURCE_EXHAUSTED"
        assert consumed == 11
        consumed = 0
        with pytest.raises(ArtifactTooLarge):
            s.put(chunks(), StructureValidator(), UploadClaims(size=50_000))
        assert consumed == 1, "an announced size over the limit fails on the first chunk"
        art = make_artifact("m", "1", body(9000))
        assert len(art) <= 10_000
        s.put([art], StructureValidator())
        assert_clean(s)


def test_each_model_has_its_own_blob(storage: AnyStorage) -> None:
    # An artifact's header names its model, so two models never hold identical bytes (the fake
    # format this test once used let one blob be shared by two names; production cannot).
    data = body(40_000)
    a = storage.put(chunked(make_artifact("a", "1", data)), StructureValidator())
    b_art = make_artifact("b", "1", data)
    b = storage.put(chunked(b_art), StructureValidator())
    assert a.artifact_sha256 != b.artifact_sha256
    assert blob_count(storage) == 2
    storage.delete("a", "1")
    assert blob_count(storage) == 1, "b's bytes stay"
    assert read_all(storage, "b", "1") == b_art
    storage.verify("b", "1")
    storage.delete("b", "1")
    assert blob_count(storage) == 0
    assert_clean(storage)


def test_failed_reupload_of_identical_bytes_keeps_the_blob(storage: AnyStorage) -> None:
    # Identical bytes for one (name, version): the second upload fails and must not take the
    # first one's (content-addressed, on the filesystem) blob with it.
    data = make_artifact("a", "1", body(1000))
    storage.put([data], StructureValidator())
    with pytest.raises(ModelExists):
        storage.put([data], StructureValidator())
    assert read_all(storage, "a", "1") == data
    storage.verify("a", "1")
    assert blob_count(storage) == 1
    assert_clean(storage)


def test_delete(storage: AnyStorage) -> None:
    art = make_artifact("m", "1", body(1000))
    storage.put([art], StructureValidator())
    storage.delete("m", "1")
    with pytest.raises(ModelNotFound):
        storage.stat("m", "1")
    with pytest.raises(ModelNotFound):
        storage.delete("m", "1")
    assert_clean(storage)
    assert storage.put([art], StructureValidator()).name == "m", (
        "a deleted version can be re-published"
    )
    assert read_all(storage, "m", "1") == art


def test_list_with_prefix_and_pagination(storage: AnyStorage) -> None:
    names = ["acme/a", "acme/b", "acme-x/c", "acmez", "beta/a", "acme/a/deep"]
    for name in names:
        for version in ("1", "2", "10"):
            storage.put([make_artifact(name, version, b"x")], StructureValidator())

    def collect(prefix: str, page_size: int) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        token = ""
        while True:
            page = storage.list(prefix=prefix, page_size=page_size, page_token=token)
            assert len(page.models) <= page_size
            seen += [(m.name, m.version) for m in page.models]
            token = page.next_page_token
            if not token:
                return seen

    expected_all = sorted((n, v) for n in names for v in ("1", "2", "10"))
    for page_size in (1, 2, 3, 7, 1000):
        assert collect("", page_size) == expected_all
    assert collect("acme/", 4) == [k for k in expected_all if k[0].startswith("acme/")]
    assert collect("acme", 5) == [k for k in expected_all if k[0].startswith("acme")]
    assert collect("acme/a", 2) == [k for k in expected_all if k[0].startswith("acme/a")]
    assert collect("zzz", 5) == []
    # A page that ends exactly at the last item has no next token.
    assert storage.list(prefix="beta/", page_size=3).next_page_token == ""


def test_list_rejects_bad_tokens_and_sizes(storage: AnyStorage) -> None:
    for name in ("a", "b", "c"):
        storage.put([make_artifact(name, "1", b"x")], StructureValidator())
    token = storage.list(prefix="", page_size=1).next_page_token
    assert token
    for bad in ("garbage!", "e30", token[:-2], "A" * 2000):
        with pytest.raises(InvalidArgument) as info:
            storage.list(page_token=bad)
        assert info.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgument) as info:
        storage.list(prefix="b", page_token=token)
    assert info.value.reason == "INVALID_PAGE_TOKEN"
    for size in (0, -1, 1001):
        with pytest.raises(InvalidArgument) as info:
            storage.list(page_size=size)
        assert info.value.reason == "INVALID_PAGE_SIZE"
    with pytest.raises(InvalidArgument) as info:
        storage.list(prefix="a b")
    assert info.value.reason == "INVALID_NAME_PREFIX"


def test_a_page_token_naming_no_key_the_store_can_hold_is_invalid(storage: AnyStorage) -> None:
    """A token is JSON, whose escapes make any code point, and its key was held to lengths only:
    a lone surrogate failed both backends' encoding of the resume point with an untyped
    UnicodeEncodeError (any reader's forged token answered INTERNAL, a traceback logged each
    time), and on S3 a key no listing of it names (a NUL, U+FFFF) went into ListObjectsV2's
    StartAfter, answered 500 (UNAVAILABLE, an object-store ERROR, retried). Each is
    INVALID_PAGE_TOKEN; a filesystem row's bytes that are not UTF-8 still resume a listing."""
    storage.put([make_artifact("a", "1", b"x")], StructureValidator())
    refused = [("\ud800", "1"), ("a", "\ud800")]
    resumable = [("a\udcff", "1"), ("a\x00b", "1"), ("\uffff", "1"), ("a b", "1")]
    if isinstance(storage, S3Storage):
        refused += resumable  # S3 lists only keys in the grammar: no token names another
        resumable = []
    for name, version in refused:
        with pytest.raises(InvalidArgument) as info:
            storage.list(page_token=encode_page_token("", name, version))
        assert info.value.reason == "INVALID_PAGE_TOKEN", (name, version)
    for name, version in resumable:
        page = storage.list(page_token=encode_page_token("", name, version))
        assert page.models == () and page.next_page_token == ""


def test_a_later_page_is_read_from_its_resume_point_not_from_the_start(
    fs_storage: FilesystemStorage,
) -> None:
    """The filesystem index's page query bounded the primary-key range below by the prefix only,
    so SQLite walked every row before a page's resume point: listing N models cost O(N^2), and any
    reader could send a token near the end of a large index to make one call read all of it while
    holding the index's lock (every Stat, download and upload commit waits on it). A late page now
    costs what the first one does (SQLite's virtual-machine steps, counted per 100). 500 models
    tell the two apart as surely as 2,000 did, at a quarter of the (fsynced) uploads: against the
    bound of 4x, the old query took 67 steps to the first page's 2 at 500 (261 to 3 at 2,000)."""
    models = 500
    for i in range(models):
        fs_storage.put([make_artifact(f"m{i:05d}", "1", b"x")], StructureValidator())
    token = fs_storage.list(page_size=models - 10).next_page_token
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    db = fs_storage._index._db
    db.set_progress_handler(count, 100)
    try:
        first = fs_storage.list(page_size=10)
        first_steps, steps = steps, 0
        late = fs_storage.list(page_size=10, page_token=token)
        late_steps = steps
    finally:
        db.set_progress_handler(None, 0)
    assert [m.name for m in first.models] == [f"m{i:05d}" for i in range(10)]
    assert [m.name for m in late.models] == [f"m{i:05d}" for i in range(models - 10, models)]
    assert late_steps <= 4 * max(first_steps, 1), (first_steps, late_steps)


def test_verify_detects_same_size_corruption(storage: AnyStorage) -> None:
    art = make_artifact("m", "1", body(10_000))
    record = storage.put([art], StructureValidator())
    damaged = bytearray(art)
    damaged[-1] ^= 1
    overwrite_blob(storage, record, bytes(damaged))
    with pytest.raises(StoredDataCorrupt) as info:
        storage.verify("m", "1")
    assert info.value.status_name == "DATA_LOSS"
    assert info.value.reason == "DIGEST_MISMATCH"


def test_verify_all_reports_each_damaged_model(storage: AnyStorage) -> None:
    records = [
        storage.put([make_artifact(f"m{i}", "1", body(5000, i))], StructureValidator())
        for i in range(4)
    ]
    assert verify_all(storage) == ()
    data = bytearray(read_blob(storage, records[1]))
    data[0] ^= 0xFF
    overwrite_blob(storage, records[1], bytes(data))
    remove_blob(storage, records[3])
    assert verify_all(storage) == (
        IntegrityProblem("m1", "1", "DIGEST_MISMATCH"),
        IntegrityProblem("m3", "1", "BLOB_MISSING"),
    )
    assert verify_all(storage, prefix="m0") == ()


def test_reads_detect_truncated_and_missing_blobs(storage: AnyStorage) -> None:
    s = storage
    t = s.put([make_artifact("t", "1", body(10_000, 1))], StructureValidator())
    m = s.put([make_artifact("m", "1", body(10_000, 2))], StructureValidator())
    overwrite_blob(s, t, read_blob(s, t)[:100])
    with pytest.raises(StoredDataCorrupt) as info:
        s.open("t", "1")
    assert info.value.reason == "BLOB_SIZE_MISMATCH"
    remove_blob(s, m)
    with pytest.raises(StoredDataCorrupt) as info:
        s.open("m", "1")
    assert info.value.reason == "BLOB_MISSING"
    with pytest.raises(StoredDataCorrupt):
        s.verify("m", "1")
    s.close()
    if isinstance(s, FilesystemStorage):
        reopened: AnyStorage = FilesystemStorage(s.root)
    else:
        reopened = S3Storage(s._client, s.bucket, prefix=s.prefix)
    with reopened:
        assert reopened.last_sweep is not None
        assert reopened.last_sweep.missing_blobs == (("m", "1"),)
        assert reopened.last_sweep.damaged_blobs == (("t", "1"),)


def test_startup_sweeps_temp_files_and_quarantines_orphan_blobs(store_root: Path) -> None:
    with FilesystemStorage(store_root) as s:
        kept = s.put([make_artifact("m", "1", b"keep")], StructureValidator())
    (store_root / "tmp" / f"{'0f' * 16}.part").write_bytes(b"partial upload")
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (store_root / "blobs" / "sha256" / orphan[:2]).mkdir(exist_ok=True)
    (store_root / "blobs" / "sha256" / orphan[:2] / orphan).write_bytes(b"orphan")
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.temp_files_removed == 1
        assert s.last_sweep.orphan_blobs_quarantined == (orphan,)
        assert s.last_sweep.quarantine_files == 1
        assert s.blob_digests() == {kept.artifact_sha256}
        assert_clean(s)
    assert (store_root / "quarantine" / orphan).read_bytes() == b"orphan"


def _copy_index(source: Path, target: Path) -> None:
    """The index files of a closed store root, as a backup or a restore copies them (a restore
    replaces the -wal file too, or removes it when the backup has none)."""
    target.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        src, dst = source / f"index.sqlite3{suffix}", target / f"index.sqlite3{suffix}"
        dst.unlink(missing_ok=True)
        if src.exists():
            shutil.copy2(src, dst)


def test_an_index_restored_from_an_older_backup_loses_no_blob(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up sweep deleted every blob the index did not name: an index restored from an
    older backup (or without its -wal file) made every model published since an orphan, and the
    next start deleted them all. Now they are moved to quarantine/ (never served, logged with
    their digests), the store serves the rows it has, the same bytes can be published again, and
    restoring the newer index brings the quarantined blob back."""
    old_art = make_artifact("m", "1", body(5000, 1))
    new_art = make_artifact("m", "2", body(5000, 2))
    with FilesystemStorage(store_root) as s:
        old = s.put(chunked(old_art), StructureValidator())
    _copy_index(store_root, tmp_path / "backup")
    with FilesystemStorage(store_root) as s:
        new = s.put(chunked(new_art), StructureValidator())
    _copy_index(store_root, tmp_path / "newer")
    _copy_index(tmp_path / "backup", store_root)

    with caplog.at_level(logging.WARNING), FilesystemStorage(store_root) as s:
        assert s.last_sweep.orphan_blobs_quarantined == (new.artifact_sha256,)
        assert s.last_sweep.quarantine_files == 1
        assert [(r.name, r.version) for r in s.records()] == [("m", "1")]
        assert read_all(s, "m", "1") == old_art
        with pytest.raises(ModelNotFound):
            s.stat("m", "2")
    assert new.artifact_sha256 in caplog.text
    assert (store_root / "quarantine" / new.artifact_sha256).read_bytes() == new_art
    assert old.artifact_sha256 != new.artifact_sha256

    # The newer index found after all: its row gets the quarantined blob back.
    _copy_index(tmp_path / "newer", store_root)
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.restored_from_quarantine == (new.artifact_sha256,)
        assert s.last_sweep.missing_blobs == () and s.last_sweep.quarantine_files == 0
        assert read_all(s, "m", "2") == new_art
        assert_clean(s)

    # Or, without it, the quarantined artifact published again as it is.
    _copy_index(tmp_path / "backup", store_root)
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.orphan_blobs_quarantined == (new.artifact_sha256,)
        assert s.put(chunked(new_art), StructureValidator()) == dataclasses.replace(
            new, stored_at=s.stat("m", "2").stored_at
        )
        assert read_all(s, "m", "2") == new_art
        assert_clean(s)
    assert (store_root / "quarantine" / new.artifact_sha256).exists()  # the operator purges it


def test_a_quarantined_file_is_restored_only_if_its_content_has_its_digest(
    store_root: Path,
) -> None:
    """A quarantined file went back to the blob tree if its name was the row's digest and its
    size the row's size: a file of that name and size put there by hand (or damaged while it
    waited) became the model's blob and was served. Now its SHA-256 must be the digest; another
    copy of the same digest (``<digest>.1``) is taken if it is the right one."""
    art = make_artifact("m", "1", body(3000, 7))
    with FilesystemStorage(store_root) as s:
        record = s.put(chunked(art), StructureValidator())
    blob = store_root / "blobs" / "sha256" / record.artifact_sha256[:2] / record.artifact_sha256
    quarantine = store_root / "quarantine"
    quarantine.mkdir()
    forged = quarantine / record.artifact_sha256
    forged.write_bytes(bytes(len(art)))  # the right name and size, other bytes
    blob.chmod(0o600)
    blob.unlink()
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.restored_from_quarantine == ()
        assert s.last_sweep.missing_blobs == (("m", "1"),)
        assert s.last_sweep.quarantine_files == 1
    assert forged.read_bytes() == bytes(len(art)) and not blob.exists()

    (quarantine / f"{record.artifact_sha256}.1").write_bytes(art)
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.restored_from_quarantine == (record.artifact_sha256,)
        assert s.last_sweep.missing_blobs == () and s.last_sweep.quarantine_files == 1
        assert read_all(s, "m", "1") == art
        assert_clean(s)
    assert forged.exists()


def test_an_orphan_that_cannot_be_quarantined_is_left_in_place(store_root: Path) -> None:
    with FilesystemStorage(store_root) as s:
        s.put([make_artifact("m", "1", b"keep")], StructureValidator())
    orphan = hashlib.sha256(b"orphan").hexdigest()
    blob = store_root / "blobs" / "sha256" / orphan[:2] / orphan
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(b"orphan")
    (store_root / "quarantine").write_bytes(b"not a directory")  # the move cannot happen
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.orphan_blobs_quarantined == ()
        assert s.last_sweep.orphan_blobs_left == (orphan,)
        assert [r.name for r in s.records()] == ["m"]
    assert blob.read_bytes() == b"orphan"


def test_a_damaged_file_under_an_uploads_digest_gives_way_to_the_verified_upload(
    store_root: Path,
) -> None:
    """An unreferenced blob left in place (its removal or quarantine failed) and damaged there,
    without changing its size: publishing the same artifact again kept that file, since it had
    the upload's size, and discarded the verified upload, so the model failed verification as
    soon as it was stored. The verified upload replaces it now."""
    art = make_artifact("m", "1", body(10_000))
    with FilesystemStorage(store_root) as s:
        record = s.put([art], StructureValidator())
        s.delete("m", "1")
        damaged = bytearray(art)
        damaged[-1] ^= 1
        blob = store_root / "blobs" / "sha256" / record.artifact_sha256[:2] / record.artifact_sha256
        blob.write_bytes(damaged)
        s.put([art], StructureValidator())
        s.verify("m", "1")
        assert read_all(s, "m", "1") == art
        assert_clean(s)


def test_a_blob_that_is_not_a_regular_file_is_never_followed_nor_waited_on(
    store_root: Path, tmp_path: Path
) -> None:
    """Whoever could write the blob tree could put a symlink at a blob's name: the store followed
    it, and GetModel served whatever file of the recorded size the store could read (here a
    stand-in for its TLS key). A FIFO there blocked the open for ever under the commit lock,
    hanging every call of the store (here a writer is held open so the old code fails instead of
    hanging). Both are DATA_LOSS BLOB_NOT_A_FILE now, and the other models are served."""
    art = make_artifact("m", "1", body(5000))
    secret = tmp_path / "tls.key"
    secret.write_bytes(b"k" * len(art))
    with FilesystemStorage(store_root) as s:
        record = s.put([art], StructureValidator())
        other = make_artifact("o", "1", body(100))
        s.put([other], StructureValidator())
        blob = store_root / "blobs" / "sha256" / record.artifact_sha256[:2] / record.artifact_sha256
        blob.unlink()
        blob.symlink_to(secret)
        for call in (lambda: read_all(s, "m", "1"), lambda: s.verify("m", "1")):
            with pytest.raises(StoredDataCorrupt) as info:
                call()
            assert info.value.reason == "BLOB_NOT_A_FILE"
        blob.unlink()
        os.mkfifo(blob)
        writer = os.open(blob, os.O_RDWR | os.O_NONBLOCK)
        try:
            with pytest.raises(StoredDataCorrupt) as info:
                read_all(s, "m", "1")
            assert info.value.reason == "BLOB_NOT_A_FILE"
        finally:
            os.close(writer)
        # A socket's open fails (ENXIO) before any check: it was UNAVAILABLE STORAGE_IO, a
        # transient every loader retries for ever, not what the name holds.
        blob.unlink()
        os.mknod(blob, stat.S_IFSOCK | 0o600)
        for call in (lambda: read_all(s, "m", "1"), lambda: s.verify("m", "1")):
            with pytest.raises(StoredDataCorrupt) as info:
                call()
            assert info.value.reason == "BLOB_NOT_A_FILE"
        assert read_all(s, "o", "1") == other


def test_the_sweep_reports_a_symlinked_blob_as_damaged(store_root: Path, tmp_path: Path) -> None:
    """A symlink at a blob's name, to a file of the recorded size, passed the start-up sweep as
    an intact blob (its size was the target's): nothing said the model could no longer be read.
    It is reported (and logged) as damaged now."""
    art = make_artifact("m", "1", body(3000))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"z" * len(art))
    with FilesystemStorage(store_root) as s:
        digest = s.put([art], StructureValidator()).artifact_sha256
    blob = store_root / "blobs" / "sha256" / digest[:2] / digest
    blob.unlink()
    blob.symlink_to(target)
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.damaged_blobs == (("m", "1"),)
        assert s.last_sweep.missing_blobs == ()


def test_startup_sweep_removes_only_the_stores_own_temp_files(
    store_root: Path, tmp_path: Path
) -> None:
    """The sweep removed every file in ``tmp/``: with ``tmp`` a symlink to a scratch directory
    (an operator's way to put uploads elsewhere), each start deleted whatever else lived there.
    Now only the store's own upload files go; anything else is a stray, kept and logged."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    store_root.mkdir()
    (store_root / "tmp").symlink_to(scratch)
    (scratch / "notes.txt").write_text("not the store's")
    (scratch / "download.part").write_bytes(b"another program's partial file")
    (scratch / f"{'a1' * 16}.part").write_bytes(b"an interrupted upload")
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.temp_files_removed == 1
        assert s.last_sweep.stray_files == 2
    assert sorted(p.name for p in scratch.iterdir()) == ["download.part", "notes.txt"]


def test_startup_sweep_removes_nothing_through_a_symlinked_blob_directory(
    store_root: Path, tmp_path: Path
) -> None:
    """A fan-out directory of the blob tree that is a symlink (to another store's, say) was
    walked like the store's own: every blob-named file there that this index does not name was
    deleted as an orphan at each start. Now such a directory is a stray, logged and left alone;
    a blob the index names through it is still read."""
    with FilesystemStorage(store_root) as s:
        kept = put(s, make_artifact("m", "1", b"keep"))
    digest: str = kept.artifact_sha256  # type: ignore[attr-defined]
    fanout = store_root / "blobs" / "sha256" / digest[:2]
    elsewhere = tmp_path / "elsewhere"
    fanout.rename(elsewhere)
    fanout.symlink_to(elsewhere)
    foreign = elsewhere / (digest[:2] + "f" * 62)
    foreign.write_bytes(b"another store's blob")
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.orphan_blobs_quarantined == ()
        assert s.last_sweep.stray_files == 1
        assert read_all(s, "m", "1") == read_blob(s, kept)  # type: ignore[arg-type]
    assert foreign.read_bytes() == b"another store's blob"


def test_the_sweep_neither_follows_nor_counts_a_symlink_at_a_blob_name(
    store_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The blob listing followed a symlink at a blob's name: with no index, one such link (to any
    file) refused the start as INDEX_MISSING, and with an index it was moved into the quarantine as
    an orphan blob. It is a stray now: not followed, not counted, left where it is and logged."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not a blob")
    digest = "ab" + "c" * 62
    fanout = store_root / "blobs" / "sha256" / digest[:2]
    fanout.mkdir(parents=True)
    (fanout / digest).symlink_to(target)
    with caplog.at_level(logging.WARNING), FilesystemStorage(store_root) as s:
        assert s.last_sweep.orphan_blobs_quarantined == ()
        assert s.last_sweep.stray_files == 1
        assert s.blob_digests() == set()
    assert (fanout / digest).is_symlink() and target.read_bytes() == b"not a blob"
    assert any("symbolic link in the blob tree" in r.getMessage() for r in caplog.records)


def test_a_root_whose_uploads_and_blobs_are_on_two_volumes_is_refused_at_start(
    store_root: Path,
) -> None:
    """An upload is published by renaming its file from ``tmp/`` into ``blobs/``: with one of them
    a symlink to another filesystem, the store started and every upload failed after its last
    byte (UNAVAILABLE STORAGE_IO, EXDEV only in the log). Now the start is refused, naming both."""
    other_volume = Path("/dev/shm")
    if not other_volume.is_dir() or other_volume.stat().st_dev == store_root.parent.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to place tmp/ on")
    elsewhere = Path(tempfile.mkdtemp(dir=other_volume))
    try:
        store_root.mkdir()
        (store_root / "tmp").symlink_to(elsewhere)
        with pytest.raises(FailedPrecondition) as info:
            FilesystemStorage(store_root).close()
        assert info.value.reason == "STORAGE_SPANS_VOLUMES"
        assert "tmp" in info.value.message and "blobs" in info.value.message
        (store_root / "tmp").unlink()
        with FilesystemStorage(store_root) as s:  # the lock was released: fixed, it starts
            put(s, make_artifact("m", "1", b"x"))
    finally:
        shutil.rmtree(elsewhere)


def test_one_process_per_root(store_root: Path) -> None:
    with FilesystemStorage(store_root):
        with pytest.raises(StorageLocked) as info:
            FilesystemStorage(store_root)
        assert info.value.status_name == "FAILED_PRECONDITION"
    with FilesystemStorage(store_root):
        pass


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("", "1"),
        ("m", ""),
        ("a" * 129, "1"),
        ("m", "v" * 65),
        ("/m", "1"),
        ("m/", "1"),
        ("a//b", "1"),
        ("../x", "1"),
        ("m", "../1"),
        ("m", ".1"),
        ("ü", "1"),
        ("m\n", "1"),
    ],
)
def test_names_are_validated_on_every_call(storage: AnyStorage, name: str, version: str) -> None:
    for call in (storage.stat, storage.delete, storage.open, storage.verify):
        with pytest.raises(InvalidArgument):
            call(name, version)


def test_readers_racing_delete_and_republish_never_see_data_loss(
    storage: AnyStorage,
) -> None:
    versions = [make_artifact("hot", "1", body(50_000, i)) for i in range(2)]
    stop = threading.Event()
    problems: list[BaseException] = []
    reads = 0

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                storage.put([versions[i % 2]], StructureValidator())
                storage.delete("hot", "1")
            except BaseException as exc:
                problems.append(exc)
                return
            i += 1

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                data = read_all(storage, "hot", "1")
                storage.verify("hot", "1")
            except ModelNotFound:
                continue
            except BaseException as exc:
                problems.append(exc)
                return
            if data not in versions:
                problems.append(AssertionError("a read returned bytes of no stored version"))
                return
            reads += 1

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not problems:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    assert problems == []
    assert reads > 0
    assert_clean(storage)


def test_unreadable_index_is_unavailable_and_releases_the_lock(store_root: Path) -> None:
    store_root.mkdir()
    (store_root / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageUnavailable) as info:
        FilesystemStorage(store_root)
    assert info.value.status_name == "UNAVAILABLE"
    (store_root / "index.sqlite3").unlink()
    with FilesystemStorage(store_root) as s:
        assert s.records() == ()


def test_a_lost_index_stops_the_start_instead_of_sweeping_every_blob(store_root: Path) -> None:
    """With index.sqlite3 gone (removed by hand to 'reset' it, or a restore that missed it), the
    store made a new empty index and its start-up sweep deleted every blob as an orphan: every
    model lost for good, though each artifact names itself. Now the start is refused and nothing
    is deleted or created."""
    with FilesystemStorage(store_root) as s:
        kept = {
            put(s, make_artifact("m", v, body(1000, i))).artifact_sha256 for i, v in enumerate("12")
        }  # type: ignore[attr-defined]
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (store_root / name).unlink(missing_ok=True)
    with pytest.raises(FailedPrecondition) as info:
        FilesystemStorage(store_root)
    assert info.value.reason == "INDEX_MISSING"
    assert "2 blobs" in info.value.message
    assert not (store_root / "index.sqlite3").exists()
    assert {p.name for p in (store_root / "blobs" / "sha256").glob("*/*")} == kept
    with FilesystemStorage(store_root / "elsewhere") as fresh:  # a new, empty root still opens
        assert fresh.records() == ()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("stored_at_us", 2**63 - 1),  # past what a datetime holds: OverflowError, not ValueError
        ("created_at_us", -(2**63)),
        ("artifact_size", "large"),  # SQLite keeps text in an INTEGER column (CHECK passes)
        ("key_version", "two"),
        # Read unchecked before (the S3 index's rules were not applied to a row): a KEK version
        # no broker numbers (or one ModelInfo's uint32 cannot hold: INTERNAL), a header past its artifact's end (the sweep's header read ran past the blob), a
        # content type or key id no header may carry (a long one overflowed a ListModels page).
        ("key_version", -1),
        ("key_version", 2**32),
        ("key_version", 0),
        ("header_size", 10**9),
        ("header_size", 0),
        ("content_type", "x" * 5000),
        ("key_id", ""),
        # Only a uint64 bound before: a size the format cannot hold (over 2^40), or one no
        # smaller than the artifact that would carry it.
        ("plaintext_size", 2**40 + 1),
        ("plaintext_size", 10**6),
    ],
    ids=[
        "time-too-late",
        "time-too-early",
        "text-size",
        "text-key-version",
        "negative-key-version",
        "key-version-past-uint32",
        "key-version-zero",
        "header-past-the-artifact",
        "empty-header",
        "content-type-too-long",
        "empty-key-id",
        "plaintext-past-the-format",
        "plaintext-past-the-artifact",
    ],
)
def test_an_edited_index_row_is_stored_data_corrupt(
    store_root: Path, column: str, value: object
) -> None:
    """A row this store cannot have written escaped as an untyped error (OverflowError from the
    time, TypeError later from a text size) instead of DATA_LOSS INDEX_CORRUPT, and the start-up
    sweep raised it, so the store did not open at all. Now the store opens, names the row and the
    field, keeps the row and its blob, and serves and lists the other models (the listing names
    the row as corrupt)."""
    with FilesystemStorage(store_root) as storage:
        bad = put(storage, make_artifact("acme/bad", "1", b"x"))
        put(storage, make_artifact("acme/good", "1", b"y"))
    with sqlite3.connect(store_root / "index.sqlite3") as db:
        db.execute(f"UPDATE models SET {column} = ? WHERE name = 'acme/bad'", (value,))
    with FilesystemStorage(store_root) as storage:
        assert storage.last_sweep.unreadable_rows == (("acme/bad", "1"),)
        assert storage.last_sweep.orphan_blobs_quarantined == ()
        for call in (
            lambda: storage.stat("acme/bad", "1"),
            lambda: read_all(storage, "acme/bad", "1"),
        ):
            with pytest.raises(StoredDataCorrupt) as info:
                call()
            assert info.value.reason == "INDEX_CORRUPT"
            assert info.value.status_name == "DATA_LOSS"
            assert "acme/bad" in info.value.message and column in info.value.message
        with pytest.raises(StoredDataCorrupt):
            storage.records()
        assert storage.stat("acme/good", "1").name == "acme/good"
        page = storage.list(prefix="acme/")
        assert [m.name for m in page.models] == ["acme/good"]
        ((name, version, problem),) = [(e.name, e.version, e.problem) for e in page.corrupt]
        assert (name, version) == ("acme/bad", "1") and column in problem
        assert bad.artifact_sha256 in storage.blob_digests()  # type: ignore[attr-defined]
    with contextlib.closing(sqlite3.connect(store_root / "index.sqlite3")) as db:
        kept = db.execute(f"SELECT {column} FROM models WHERE name = 'acme/bad'").fetchall()
    assert kept == [(value,)]


def test_a_corrupt_index_entry_is_named_by_the_listing_which_goes_on_past_it(
    storage: AnyStorage,
) -> None:
    """One edited or damaged index entry failed every page of a listing that covered it (DATA_LOSS
    INDEX_CORRUPT), on both backends: ``keys rewrap-models`` and ``keys disable``'s check stopped
    at it, so one planted record kept an operator from rotating. Every page is answered now, the
    entry named in the page's ``corrupt`` (never among its models), each page size walking every
    entry once; reads of the entry stay DATA_LOSS, and verify_all reports it."""
    for i in range(5):
        put(storage, make_artifact(f"acme/m{i}", "1", b"x"))
    edit_index_entry(storage, storage.stat("acme/m2", "1"), key_version=0)
    good = [f"acme/m{i}" for i in (0, 1, 3, 4)]
    for page_size in (1, 2, 3, 1000):
        pages = [storage.list(prefix="acme/", page_size=page_size)]
        while token := pages[-1].next_page_token:
            pages.append(storage.list(prefix="acme/", page_size=page_size, page_token=token))
        assert [m.name for p in pages for m in p.models] == good
        corrupt = [e for p in pages for e in p.corrupt]
        assert [(e.name, e.version) for e in corrupt] == [("acme/m2", "1")]
        assert "key_version" in corrupt[0].problem
        assert all(len(p.models) + len(p.corrupt) <= page_size for p in pages)
    for call in (lambda: storage.stat("acme/m2", "1"), lambda: read_all(storage, "acme/m2", "1")):
        with pytest.raises(StoredDataCorrupt) as info:
            call()
        assert info.value.reason == "INDEX_CORRUPT"
    assert verify_all(storage) == (IntegrityProblem("acme/m2", "1", "INDEX_CORRUPT"),)


def test_a_corrupt_entry_is_logged_once_not_on_every_page_that_covers_it(
    storage: AnyStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """Every listing page logged one ERROR per corrupt entry it covered, and every read of it
    another: a reader paging through the store again and again flooded the log with the same
    lines. Each entry is logged once per storage now (again only if what is wrong changes); the
    listing still names it on every page, and reads of it stay DATA_LOSS."""
    for i in range(3):
        put(storage, make_artifact(f"acme/m{i}", "1", b"x"))
    record = storage.stat("acme/m1", "1")
    edit_index_entry(storage, record, key_version=0)
    with caplog.at_level(logging.ERROR):
        for page_size in (1, 10, 10, 10):
            token = ""
            while True:
                page = storage.list(prefix="acme/", page_size=page_size, page_token=token)
                if not (token := page.next_page_token):
                    break
            assert [e.name for e in storage.list(prefix="acme/").corrupt] == ["acme/m1"]
        with pytest.raises(StoredDataCorrupt):
            storage.stat("acme/m1", "1")
    unreadable = [r for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(unreadable) == 1 and "acme/m1" in unreadable[0].getMessage()
    caplog.clear()
    edit_index_entry(storage, record, key_version=1, content_type="")
    with caplog.at_level(logging.ERROR):
        storage.list(prefix="acme/")
        storage.list(prefix="acme/")
    (changed,) = [r for r in caplog.records if "is unreadable" in r.getMessage()]
    assert "content_type" in changed.getMessage()


def test_a_corrupt_entry_deleted_and_made_unreadable_again_is_logged_again(
    storage: AnyStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreadable entry was remembered as logged for the life of the process, deleted or
    not: a model whose corrupt entry an admin deleted (plainly or with ``corrupt_entry``) and
    re-published, then edited again the same way by whoever can write the storage, was never
    logged again. A deletion forgets the entry, so each new corruption is logged once."""
    with caplog.at_level(logging.ERROR):
        for delete in (storage.delete, storage.delete_corrupt, None):
            put(storage, make_artifact("acme/m", "1", b"x"))
            edit_index_entry(storage, storage.stat("acme/m", "1"), key_version=0)
            storage.list(prefix="acme/")
            storage.list(prefix="acme/")
            if delete is not None:
                delete("acme/m", "1")
    unreadable = [r for r in caplog.records if "is unreadable" in r.getMessage()]
    assert len(unreadable) == 3


def test_planted_corrupt_entries_neither_grow_the_memory_nor_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past MAX_UNREADABLE_LOGGED distinct entries one line says the rest go unlogged: planting
    entries grows neither what the store remembers nor, by making it forget, the log again."""
    unreadable = UnreadableEntries(logging.getLogger("tests.unreadable"))
    with caplog.at_level(logging.ERROR, logger="tests.unreadable"):
        for _ in range(2):
            for i in range(MAX_UNREADABLE_LOGGED + 50):
                unreadable.report(f"index row of m{i}", "key_version")
    assert len(caplog.records) == MAX_UNREADABLE_LOGGED + 1
    assert "later ones are not logged" in caplog.records[-1].getMessage()


def test_remembered_corrupt_entries_hold_little_memory_whatever_their_names() -> None:
    """What a store remembers of the unreadable entries it logged was their names as a message
    names them: a filesystem row's name is quoted up to 256 characters, each a 6-character
    escape for a byte that is not UTF-8, so 4,096 planted rows held about 13 MB for good. It
    remembers a fixed-size digest of each now."""
    logger = logging.getLogger("tests.unreadable.memory")
    logger.disabled = True  # the log's own records (pytest keeps them) are not what is measured
    unreadable = UnreadableEntries(logger)
    names = [f"{i:06d}" + "\udcff" * 250 for i in range(MAX_UNREADABLE_LOGGED)]
    problem = "name is outside the model-name grammar"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in names:  # each entry's text made as a read makes it, and let go
            unreadable.report(f"index row of {name!r} {name!r}", problem)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        logger.disabled = False
    assert held < 2 * 1024 * 1024, held


def test_an_index_row_that_is_not_utf8_is_corrupt_and_the_store_starts(store_root: Path) -> None:
    """A row whose name (or any text) holds bytes that are not UTF-8 (an edit of the index, a
    damaged page) raised from SQLite's text decoding on every read that met it: the start-up
    sweep failed (INDEX_IO) and the store did not start at all. It starts now; the row is
    unreadable (the sweep names it, reads of it are INDEX_CORRUPT) and listings go on past it."""
    with FilesystemStorage(store_root) as storage:
        for name in ("acme/a", "acme/b", "acme/c"):
            put(storage, make_artifact(name, "1", b"x"))
    with contextlib.closing(sqlite3.connect(store_root / "index.sqlite3")) as db, db:
        db.execute("UPDATE models SET name = CAST(X'61636d652f62ff' AS TEXT) WHERE name = 'acme/b'")
    with FilesystemStorage(store_root) as storage:
        assert storage.last_sweep.unreadable_rows == (("acme/b\udcff", "1"),)
        for page_size in (1, 10):
            pages = [storage.list(prefix="acme/", page_size=page_size)]
            while token := pages[-1].next_page_token:
                pages.append(storage.list(prefix="acme/", page_size=page_size, page_token=token))
            assert [m.name for p in pages for m in p.models] == ["acme/a", "acme/c"]
            assert [e.name for p in pages for e in p.corrupt] == ["acme/b\udcff"]
        with pytest.raises(ModelNotFound):
            storage.stat("acme/b", "1")


def test_a_row_mixing_a_literal_escape_and_a_raw_byte_is_deleted_exactly_as_listed(
    fs_storage: FilesystemStorage,
) -> None:
    """A listing writes a byte that is not UTF-8 as ``\\xHH``, which a row may also hold as text.
    A corrupt-entry delete looked up only the listed text read all as text or all as bytes: a
    row holding both (a literal ``\\x80`` and a raw byte, planted by whoever can write the
    volume) was listed but could never be deleted but by an edit of the index, and one listed
    alike beside a row it did find went unseen, so that row was deleted without
    INDEX_ENTRY_AMBIGUOUS. Every row a listing names so is found now."""
    for name in ("acme/a", "acme/b", "acme/c", "acme/d"):
        put(fs_storage, make_artifact(name, "1", b"x"))
    with contextlib.closing(sqlite3.connect(fs_storage.root / "index.sqlite3")) as db, db:
        for name, stored in [
            ("acme/b", b"acme/b\\x80\xff"),  # a literal escape, then a raw byte
            ("acme/c", b"acme/c\\x80\\x81"),  # both literal
            ("acme/d", b"acme/c\\x80\x81"),  # a literal escape, then a raw byte: listed alike
        ]:
            db.execute("UPDATE models SET name = CAST(? AS TEXT) WHERE name = ?", (stored, name))
    listed = [listed_text(e.name) for e in fs_storage.list(prefix="acme/").corrupt]
    listed_b, listed_c = "acme/b\\x80\\xff", "acme/c\\x80\\x81"
    assert listed == [listed_b, listed_c, listed_c]
    with pytest.raises(FailedPrecondition) as ambiguous:
        fs_storage.delete_corrupt(listed_c, "1")
    assert ambiguous.value.reason == "INDEX_ENTRY_AMBIGUOUS"
    fs_storage.delete_corrupt(listed_b, "1")
    page = fs_storage.list(prefix="acme/")
    assert [m.name for m in page.models] == ["acme/a"]
    assert [listed_text(e.name) for e in page.corrupt] == [listed_c, listed_c]
    with pytest.raises(FailedPrecondition) as readable:
        fs_storage.delete_corrupt("acme/a", "1")
    assert readable.value.reason == "INDEX_ENTRY_NOT_CORRUPT"


def test_a_header_size_larger_than_any_head_is_index_corrupt(storage: AnyStorage) -> None:
    """A header size was only held below the artifact's size: an entry edited to name one up to
    that (a 10 GiB model's: 10 GiB) made the start-up sweep, recording an older entry's format,
    and every re-wrap read that many bytes into memory to parse a head of at most MAX_HEAD_SIZE
    bytes (the store killed for memory at each start). Such an entry is now INDEX_CORRUPT, named
    by its field, and no read of it is made."""
    record = storage.put(
        [make_artifact("acme/big-head", "1", body(MAX_HEAD_SIZE + 1000))], StructureValidator()
    )
    assert record.header_size < MAX_HEAD_SIZE < record.artifact_size - 1
    edit_index_entry(storage, record, header_size=MAX_HEAD_SIZE + 1, artifact_format=0)
    with pytest.raises(StoredDataCorrupt) as info:
        storage.stat("acme/big-head", "1")
    assert info.value.reason == "INDEX_CORRUPT" and "header_size" in info.value.message
    edit_index_entry(storage, record, header_size=MAX_HEAD_SIZE)  # the largest head: readable
    assert storage.stat("acme/big-head", "1").header_size == MAX_HEAD_SIZE


def test_deleting_an_unreadable_row_removes_it_and_its_blob_and_says_so(store_root: Path) -> None:
    """DeleteModel of a row the index cannot read deleted the row, then answered DATA_LOSS
    INDEX_CORRUPT: the admin was told it failed though the model was gone, and its blob stayed
    until the next start. Now the delete succeeds and removes the blob like any other."""
    with FilesystemStorage(store_root) as storage:
        bad = put(storage, make_artifact("acme/bad", "1", b"x"))
    with sqlite3.connect(store_root / "index.sqlite3") as db:
        db.execute("UPDATE models SET key_version = 'two' WHERE name = 'acme/bad'")
    with FilesystemStorage(store_root) as storage:
        storage.delete("acme/bad", "1")
        with pytest.raises(ModelNotFound):
            storage.stat("acme/bad", "1")
        assert bad.artifact_sha256 not in storage.blob_digests()  # type: ignore[attr-defined]


@pytest.mark.parametrize("column", ["artifact_sha256", "name"])
def test_an_index_row_naming_a_file_outside_the_store_is_index_corrupt(
    store_root: Path, tmp_path: Path, column: str
) -> None:
    """A row's digest was joined to the blob directory unchecked: an edited (or restored, or
    damaged) index whose digest is a path gave readers that file's bytes and made a delete unlink
    it, anywhere the store's user may. A row whose digest, name or version this store cannot have
    written is now DATA_LOSS INDEX_CORRUPT (a listing names it as corrupt), and nothing outside the
    blob tree is read or removed."""
    with FilesystemStorage(store_root) as storage:
        bad = put(storage, make_artifact("acme/bad", "1", b"x"))
        put(storage, make_artifact("acme/good", "1", b"y"))
    outside = tmp_path / "not-a-blob"
    outside.write_bytes(b"s" * bad.artifact_size)  # type: ignore[attr-defined]
    edit = {"artifact_sha256": str(outside), "name": "acme/bad\n"}[column]
    with sqlite3.connect(store_root / "index.sqlite3") as db:
        db.execute(f"UPDATE models SET {column} = ? WHERE name = 'acme/bad'", (edit,))
    with FilesystemStorage(store_root) as storage:
        assert len(storage.last_sweep.unreadable_rows) == 1
        bad_name = "acme/bad" if column == "artifact_sha256" else edit
        for page_size in (1, 10):  # a page that ends at the row (whatever its name), and one past
            pages = [storage.list(prefix="acme/", page_size=page_size)]
            while token := pages[-1].next_page_token:
                pages.append(storage.list(prefix="acme/", page_size=page_size, page_token=token))
            assert [m.name for p in pages for m in p.models] == ["acme/good"]
            assert [e.name for p in pages for e in p.corrupt] == [bad_name]
        if column == "artifact_sha256":
            with pytest.raises(StoredDataCorrupt) as info:
                read_all(storage, "acme/bad", "1")
            assert info.value.reason == "INDEX_CORRUPT"
            with contextlib.suppress(StoredDataCorrupt):
                storage.delete("acme/bad", "1")
        assert storage.stat("acme/good", "1").name == "acme/good"
    assert outside.read_bytes() == b"s" * bad.artifact_size  # type: ignore[attr-defined]


def test_a_deeply_nested_page_token_is_invalid_from_any_stack_depth() -> None:
    """A 1,024-character token of ``[`` decodes to 768 levels of nesting: from a shallow call json
    reports a clean JSONDecodeError, but from a few hundred frames deeper (a handler wrapped in
    interceptors, a deeper caller) it raised RecursionError, which escaped as an untyped error."""
    token = base64.urlsafe_b64encode(b"[" * 768).rstrip(b"=").decode()
    assert len(token) == 1024

    def at_depth(frames: int) -> str:
        if frames:
            return at_depth(frames - 1)
        with pytest.raises(InvalidArgument) as info:
            decode_page_token(token, "")
        return info.value.reason

    assert at_depth(0) == "INVALID_PAGE_TOKEN"
    assert at_depth(300) == "INVALID_PAGE_TOKEN"


def test_reads_that_return_fewer_bytes_than_asked_are_not_data_loss(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On FUSE and NFS one read may return fewer bytes than asked before the end of the file.
    The store took one read for the whole head: verify, a range read past the head, a re-wrap
    and the start's reading of a row's format each found the head cut short and reported a
    healthy blob DATA_LOSS HEADER_CORRUPT (or no format). Each reads until it has it all now."""
    with FilesystemStorage(store_root) as s:
        s.put([rewrap_case.artifact("acme/m", "1", 3000)], StructureValidator())
    db = sqlite3.connect(store_root / "index.sqlite3")
    db.execute("ALTER TABLE models DROP COLUMN artifact_format")
    db.commit()
    db.close()
    force_short_reads(monkeypatch)
    with FilesystemStorage(store_root) as s:
        assert s.last_sweep.formats_recorded == 1
        record = s.stat("acme/m", "1")
        assert record.artifact_format == 2
        assert s.verify("acme/m", "1") == record
        stored = rewrap_case.artifact("acme/m", "1", 3000)
        assert (
            read_all(s, "acme/m", "1", offset=record.header_size + 5, length=40)
            == (stored[record.header_size + 5 : record.header_size + 45])
        )
        after = s.replace_key_slot(
            "acme/m",
            "1",
            expected_key_version=1,
            key_version=2,
            wrapped_dek=rewrap_case.wrapped("acme/m", "1", 2),
        )
        assert s.verify("acme/m", "1") == after
        assert rewrap_case.decrypt_stored(read_all(s, "acme/m", "1")) == (
            rewrap_case.plaintext_of("acme/m", "1", 3000)
        )


def test_a_head_read_of_a_file_that_shrinks_meanwhile_ends(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading until the head is whole must end where the file now ends: a blob cut short
    between two short reads (whoever can write the volume truncated it) is DATA_LOSS, not a
    read that waits for bytes that never come."""
    with FilesystemStorage(store_root) as s:
        record = s.put([rewrap_case.artifact("acme/m", "1", 3000)], StructureValidator())
        digest = record.artifact_sha256
        blob = store_root / "blobs" / "sha256" / digest[:2] / digest
        real_preadv = os.preadv
        reads = 0

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            nonlocal reads
            reads += 1
            if reads == 2:
                os.truncate(blob, 20)
            first = memoryview(buffers[0])
            return real_preadv(fd, [first[: min(len(first), 7)]], offset)

        monkeypatch.setattr(os, "preadv", preadv)
        with pytest.raises(StoredDataCorrupt):
            read_all(s, "acme/m", "1", offset=record.header_size + 5, length=40)
        assert 2 < reads < 10


OLDER_STORES_MAX_TOKEN = 1024
"""The longest page token a store before corrupt-entry listings (e43795d) accepts."""


def test_every_page_token_an_older_replica_could_accept_fits_its_length_limit() -> None:
    """The token's limit went from 1,024 characters to 4,096 so that a page may end at a
    filesystem row outside the grammar (up to 12 characters per escaped character). During a
    rolling upgrade of S3 replicas a token one hands out is read by another; S3 lists only keys
    in the grammar, whose longest token is far below the older limit, so an older replica never
    refuses one for its length (a token naming a row outside the grammar it refuses whatever its
    length, and the filesystem backend runs one replica)."""
    name = "a/" * (MAX_NAME_LENGTH // 2)
    longest = encode_page_token(name, name, "1" * MAX_VERSION_LENGTH)
    assert len(longest) <= OLDER_STORES_MAX_TOKEN // 2
    assert decode_page_token(longest, name) == (name, "1" * MAX_VERSION_LENGTH)


def _framed_read(
    storage: AnyStorage, name: str, version: str, chunk: int, **kw: int
) -> tuple[list[bytearray], list[memoryview]]:
    """``chunks_into`` with each frame a buffer of its own: the buffers and the views yielded."""
    frames: list[bytearray] = []

    def frame(size: int) -> memoryview:
        frames.append(bytearray(b"\xa5" * (size + 3)))  # 3 bytes of a message's head before
        return memoryview(frames[-1])[3:]

    with storage.open(name, version, **kw) as reader:
        return frames, list(reader.chunks_into(chunk, frame))


@pytest.mark.parametrize("short", [False, True])
def test_chunks_into_reads_each_piece_whole_into_its_frame(
    storage: AnyStorage, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    """A download's messages are made before their data is read into them: each piece fills
    its frame exactly, whole even where the file or the object's body reads short."""
    art = make_artifact("acme/framed", "1", body(100_000, 7))
    record = put(storage, art)
    if short:
        force_short_reads(monkeypatch, 1000)
        force_short_body_reads(monkeypatch, 1000)
    offset = record.header_size + 11  # type: ignore[attr-defined]
    frames, pieces = _framed_read(storage, "acme/framed", "1", 7919, offset=offset)
    assert len(frames) == len(pieces) > 1
    for frame, piece in zip(frames, pieces, strict=True):
        assert piece.obj is frame and piece.nbytes == len(frame) - 3
        assert frame[:3] == b"\xa5" * 3
    assert b"".join(pieces) == art[offset:] == read_all(storage, "acme/framed", "1", offset=offset)


def test_chunks_into_a_blob_cut_short_while_read_yields_no_partial_piece(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob truncated under a framed read is DATA_LOSS BLOB_TRUNCATED at the piece it cuts:
    that piece's frame, partly filled, is never yielded."""
    with FilesystemStorage(store_root) as s:
        record = put(s, make_artifact("acme/cut", "1", body(100_000, 8)))
        digest = record.artifact_sha256  # type: ignore[attr-defined]
        blob = store_root / "blobs" / "sha256" / digest[:2] / digest
        force_short_reads(monkeypatch, 5000)
        real_preadv = os.preadv
        reads = 0

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            nonlocal reads
            reads += 1
            if reads == 4:  # inside the second piece of 8,000 bytes
                os.truncate(blob, 9000)
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)
        pieces: list[memoryview] = []
        with s.open("acme/cut", "1") as reader, pytest.raises(StoredDataCorrupt) as info:
            for piece in reader.chunks_into(8000, lambda size: memoryview(bytearray(size))):
                pieces.append(piece)
        assert info.value.reason == "BLOB_TRUNCATED"
        assert [p.nbytes for p in pieces] == [8000]
