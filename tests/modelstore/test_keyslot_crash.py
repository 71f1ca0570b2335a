"""Key-slot replacement under SIGKILL: every artifact stays whole and decryptable under one version."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from strongroom.artifact import StructureValidator
from strongroom.modelstore.storage import FilesystemStorage
from tests.modelstore.artifacts import chunked
from tests.modelstore.rewrap_case import artifact, decrypt_stored, plaintext_of
from tests.modelstore.test_crash import run_until_dead

REPO = Path(__file__).resolve().parents[2]
KILLS = 12
MODELS = [(f"rewrap/m{i}", "1", 600_000 + 150_000 * i) for i in range(4)]


def _check(storage: FilesystemStorage, sizes: dict[tuple[str, str], int]) -> list[int]:
    """Nothing partial: tmp empty, blobs = index, every model verifies and decrypts; its versions."""
    assert list((storage.root / "tmp").iterdir()) == []
    assert storage.last_sweep.missing_blobs == () and storage.last_sweep.damaged_blobs == ()
    records = storage.records()
    assert storage.blob_digests() == {r.artifact_sha256 for r in records}
    versions = []
    for r in records:
        assert storage.verify(r.name, r.version) == r
        with storage.open(r.name, r.version) as reader:
            data = b"".join(reader.chunks(1 << 20))
        assert decrypt_stored(data) == plaintext_of(r.name, r.version, sizes[(r.name, r.version)])
        versions.append(r.key_version)
    return versions


def test_kill_after_the_new_blob_before_the_swap(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FilesystemStorage(root) as storage:
        storage.put(chunked(artifact("rewrap/victim", "1")), StructureValidator())
    run_until_dead(root, "before-slot-swap")
    with FilesystemStorage(root) as storage:
        assert len(storage.last_sweep.orphan_blobs_quarantined) == 1
        assert _check(storage, {("rewrap/victim", "1"): 100_000}) == [1]


def test_kill_after_the_swap_before_the_old_blob_goes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FilesystemStorage(root) as storage:
        storage.put(chunked(artifact("rewrap/victim", "1")), StructureValidator())
    run_until_dead(root, "before-slot-unlink")
    with FilesystemStorage(root) as storage:
        assert len(storage.last_sweep.orphan_blobs_quarantined) == 1
        assert _check(storage, {("rewrap/victim", "1"): 100_000}) == [2]


def test_sigkill_at_random_moments_of_a_rewrap_loop(tmp_path: Path) -> None:
    root = tmp_path / "store"
    sizes = {(name, version): size for name, version, size in MODELS}
    with FilesystemStorage(root) as storage:
        for name, version, size in MODELS:
            storage.put(chunked(artifact(name, version, size), 1 << 16), StructureValidator())
    rng = random.Random()
    swept = 0
    highest = 1
    for _ in range(KILLS):
        with open(tmp_path / "worker.err", "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.modelstore.crash_worker",
                    str(root),
                    "0",
                    "rewrap-loop",
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
            )
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline() == b"ready\n", (tmp_path / "worker.err").read_text()
                time.sleep(rng.uniform(0.0, 0.3))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker.err").read_text()
        with FilesystemStorage(root) as storage:
            swept += storage.last_sweep.temp_files_removed + len(
                storage.last_sweep.orphan_blobs_quarantined
            )
            highest = max(highest, *_check(storage, sizes))
    # The kills landed in the middle of replacements, and replacements completed between them.
    assert swept > 0
    assert highest > 1


S3_MODELS = [("rewrap/s0", "1", 100_000), ("rewrap/s1", "1", 6_000_000)]


def test_sigkill_at_random_moments_of_an_s3_rewrap_loop(
    tmp_path: Path, s3_server: Any, s3_bucket: str
) -> None:
    """The S3 backend under SIGKILL mid-replacement (a store replica crashing between its
    writes: blob parts, blob commit, index swap, old blob delete): after every kill each model is
    whole, verifies, decrypts under the one KEK version its record names, and that version never
    goes back; once past the grace period, a sweep leaves exactly the referenced blobs."""
    from strongroom.modelstore.storage import S3Storage
    from tests.modelstore import s3server
    from tests.modelstore.conftest import S3_TEST_PART_SIZE

    def open_store(**kw: Any) -> S3Storage:
        return S3Storage(
            s3server.client(s3_server.endpoint),
            s3_bucket,
            prefix="p/",
            part_size=S3_TEST_PART_SIZE,
            **kw,
        )

    store = open_store()
    sizes = {(name, version): size for name, version, size in S3_MODELS}
    for name, version, size in S3_MODELS:
        store.put(chunked(artifact(name, version, size), 1 << 20), StructureValidator())
    rng = random.Random()
    last = {key: 1 for key in sizes}
    for _ in range(KILLS):
        with open(tmp_path / "worker.err", "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.modelstore.crash_worker",
                    f"{s3_server.endpoint}|{s3_bucket}",
                    "0",
                    "s3-rewrap-loop",
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
            )
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline() == b"ready\n", (tmp_path / "worker.err").read_text()
                time.sleep(rng.uniform(0.0, 1.0))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker.err").read_text()
        for r in store.records():
            assert store.verify(r.name, r.version) == r
            with store.open(r.name, r.version) as reader:
                data = b"".join(reader.chunks(1 << 20))
            assert decrypt_stored(data) == plaintext_of(
                r.name, r.version, sizes[(r.name, r.version)]
            )
            assert r.key_version >= last[(r.name, r.version)]
            last[(r.name, r.version)] = r.key_version
    assert max(last.values()) > 1  # replacements completed between the kills
    later = open_store(clock=lambda: datetime.now(UTC) + timedelta(days=2))
    assert later.last_sweep is not None
    assert later.last_sweep.missing_blobs == () and later.last_sweep.damaged_blobs == ()
    # The kills landed in the middle of replacements: they left blobs or uploads to sweep.
    assert len(later.last_sweep.orphan_blobs) + later.last_sweep.uploads_aborted > 0
    # Every unfinished upload aborted; every blob no record names reported (and kept).
    assert later.pending_uploads() == []
    assert set(later.last_sweep.orphan_blobs) == set(later.blob_sizes()) - set(
        later.referenced_blobs()
    )
