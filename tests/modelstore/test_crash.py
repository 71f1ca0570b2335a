"""Crash safety: SIGKILL an uploading process at random moments, then check what a restart sees."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from strongroom.artifact import StructureValidator
from strongroom.modelstore.storage import FilesystemStorage
from tests.modelstore.artifacts import make_artifact
from tests.modelstore.crash_worker import REAL_PREFIX

REPO = Path(__file__).resolve().parents[2]
KILLS = 40


def check_consistent(storage: FilesystemStorage) -> int:
    """Every visible object verifies and is a whole artifact; tmp is empty; blobs match the index."""
    assert list((storage.root / "tmp").iterdir()) == []
    report = storage.last_sweep
    assert report.missing_blobs == () and report.damaged_blobs == () and report.stray_files == 0
    records = storage.records()
    assert storage.blob_digests() == {r.artifact_sha256 for r in records}
    for r in records:
        assert storage.verify(r.name, r.version) == r
        validator = StructureValidator()
        with storage.open(r.name, r.version) as reader:
            for chunk in reader.chunks(1 << 20):
                validator.feed(chunk)
        summary = validator.finish()
        assert (summary.name, summary.version) == (r.name, r.version)
        assert summary.artifact_size == r.artifact_size
    return len(records)


@pytest.mark.slow
def test_sigkill_during_uploads_never_exposes_partial_state(tmp_path: Path) -> None:
    root = tmp_path / "store"
    rng = random.Random()
    totals: Counter[str] = Counter()
    for i in range(KILLS):
        with open(tmp_path / "worker.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.modelstore.crash_worker", str(root), str(i)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=err,
            )
            try:
                assert proc.stdout is not None
                ready = proc.stdout.readline()
                assert ready == b"ready\n", (tmp_path / "worker.err").read_text()
                time.sleep(rng.uniform(0.0, 0.15))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker.err").read_text()
        with FilesystemStorage(root) as storage:
            totals["temp_files_swept"] += storage.last_sweep.temp_files_removed
            totals["orphans_swept"] += len(storage.last_sweep.orphan_blobs_quarantined)
            totals["max_visible"] = max(totals["max_visible"], check_consistent(storage))
            totals["real_seen"] += sum(r.name.startswith(REAL_PREFIX) for r in storage.records())
    # The kills must have landed in the middle of uploads, and uploads must have completed.
    assert totals["temp_files_swept"] > 0, totals
    assert totals["max_visible"] > 0, totals
    assert totals["real_seen"] > 0, totals


def run_until_dead(root: Path, point: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.modelstore.crash_worker", str(root), "0", point],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_kill_between_rename_and_insert_leaves_an_orphan_that_is_quarantined(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    run_until_dead(root, "before-insert")
    with FilesystemStorage(root) as storage:
        assert len(storage.last_sweep.orphan_blobs_quarantined) == 1
        assert storage.records() == ()
        assert check_consistent(storage) == 0


def test_kill_between_delete_and_unlink_leaves_an_orphan_that_is_quarantined(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    with FilesystemStorage(root) as storage:
        storage.put([make_artifact("victim", "1", b"v" * 100_000)], StructureValidator())
        storage.put([make_artifact("other", "1", b"o")], StructureValidator())
    run_until_dead(root, "before-unlink")
    with FilesystemStorage(root) as storage:
        assert len(storage.last_sweep.orphan_blobs_quarantined) == 1
        assert [r.name for r in storage.records()] == ["other"]
        assert check_consistent(storage) == 1
