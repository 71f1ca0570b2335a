"""The filesystem store on a volume that runs out of space or turns read-only: clear errors,
nothing lost.

Each scenario runs in ``volume_worker`` on a real 2 MiB tmpfs mounted in a mount namespace of its
own (a user namespace maps this user to root there, so no privilege is needed where unprivileged
user namespaces are allowed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")


@cache
def _namespaces_unavailable() -> str:
    """Why a private tmpfs cannot be mounted here ('' when it can)."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        [*UNSHARE, "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
        check=False,
        capture_output=True,
        text=True,
    )
    return probe.stderr.strip() if probe.returncode else ""


def on_small_volume(scenario: str) -> dict[str, Any]:
    """Runs ``scenario`` of the worker on its own small tmpfs; what it saw."""
    if reason := _namespaces_unavailable():
        pytest.skip(f"cannot mount a private tmpfs: {reason}")
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-m", "tests.modelstore.volume_worker", scenario],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_an_index_write_on_a_full_volume_is_storage_full() -> None:
    """SQLite's 'database or disk is full' was UNAVAILABLE INDEX_IO ('retrying may help'): the
    operator was not told the volume is full. Reads go on; once there is room the write works."""
    seen = on_small_volume("index-on-a-full-volume")
    assert seen == {
        "delete": "StorageFull STORAGE_FULL",
        "stat": "ok",
        "listed": 2,
        "delete_after_room": "ok",
    }


def test_a_start_on_a_full_volume_is_storage_full() -> None:
    """SQLite cannot create its -shm file on a full volume and says 'disk I/O error': the start
    failed as UNAVAILABLE INDEX_UNAVAILABLE with that in the log, which points at a failing disk
    rather than at the full volume the operator has to make room on."""
    seen = on_small_volume("start-on-a-full-volume")
    assert seen == {"start": "StorageFull STORAGE_FULL", "start_after_room": "ok"}


def test_a_start_on_a_read_only_volume_says_so() -> None:
    """A read-only volume was UNAVAILABLE STORAGE_IO 'storage I/O error while opening the storage
    root' (retry, it suggests), with EROFS only in the log line before it."""
    seen = on_small_volume("start-on-a-read-only-volume")
    assert seen == {"start": "StorageReadOnly STORAGE_READ_ONLY"}


def test_a_start_with_too_little_room_to_record_artifact_formats_still_serves() -> None:
    """The first start on an index from before ModelInfo.artifact_format rewrites every row's
    format in one transaction; on a volume with room to open the index but not for that, the
    store refused to start (STORAGE_FULL) for a column only listings show. Now it starts with
    the formats unknown and records them at a start with room."""
    seen = on_small_volume("format-backfill-on-a-nearly-full-volume")
    assert seen == {
        "start": "ok",
        "formats_recorded": 0,
        "stat": "ok",
        "formats_recorded_after_room": 60,
    }
