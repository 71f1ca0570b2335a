"""Subprocess for the full-volume tests: a filesystem store on a small tmpfs of its own.

Usage: ``unshare --user --map-root-user --mount python -m tests.modelstore.volume_worker SCENARIO``.
In its own mount namespace the process mounts a 2 MiB tmpfs (a real filesystem that runs out of
space exactly when its pages do), runs the scenario on a store rooted there and prints one JSON
object of what it saw. Each failure is recorded as ``"<class> <reason>"``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strongroom.artifact import StructureValidator
from strongroom.errors import StrongroomError
from strongroom.modelstore.storage import FilesystemStorage
from tests.modelstore.artifacts import chunked, make_artifact

VOLUME_BYTES = 2 * 1024 * 1024
MODEL_BYTES = 100_000


def outcome(action: Callable[[], object]) -> str:
    """``ok``, or the StrongroomError's class and reason."""
    try:
        action()
    except StrongroomError as exc:
        return f"{type(exc).__name__} {exc.reason}"
    return "ok"


def put(storage: FilesystemStorage, version: str) -> object:
    payload = hashlib.shake_256(version.encode()).digest(MODEL_BYTES)
    return storage.put(chunked(make_artifact("m", version, payload)), StructureValidator())


def fill(volume: Path) -> Path:
    """Writes a file until the volume has no page left; returns it."""
    filler = volume / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def index_on_a_full_volume(volume: Path) -> dict[str, Any]:
    """Another writer fills the volume: a delete cannot write the index."""
    seen: dict[str, Any] = {}
    with FilesystemStorage(volume / "store") as storage:
        for version in ("1", "2"):
            put(storage, version)
        filler = fill(volume)
        seen["delete"] = outcome(lambda: storage.delete("m", "1"))
        seen["stat"] = outcome(lambda: storage.stat("m", "1"))
        seen["listed"] = len(storage.records())
        filler.unlink()
        seen["delete_after_room"] = outcome(lambda: storage.delete("m", "1"))
    return seen


def start_on_a_full_volume(volume: Path) -> dict[str, Any]:
    """The store restarts on a volume another writer filled: SQLite cannot make its -shm file."""
    seen: dict[str, Any] = {}
    root = volume / "store"
    with FilesystemStorage(root) as storage:
        put(storage, "1")
    filler = fill(volume)
    seen["start"] = outcome(lambda: FilesystemStorage(root).close())
    filler.unlink()
    seen["start_after_room"] = outcome(lambda: FilesystemStorage(root).close())
    return seen


def start_on_a_read_only_volume(volume: Path) -> dict[str, Any]:
    """The store restarts on its volume remounted read-only (as ext4 does after I/O errors)."""
    root = volume / "store"
    with FilesystemStorage(root) as storage:
        put(storage, "1")
    subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
    return {"start": outcome(lambda: FilesystemStorage(root).close())}


ROWS = 60
"""Rows of the older index: enough pages that rewriting them needs more room than opening."""


def _without_wal(root: Path) -> None:
    for suffix in ("-wal", "-shm"):
        (root / f"index.sqlite3{suffix}").unlink(missing_ok=True)


def format_backfill_on_a_nearly_full_volume(volume: Path) -> dict[str, Any]:
    """An index from before ModelInfo.artifact_format (its rows' formats 0) opened on a volume
    with room to open the index but not to rewrite its rows."""
    seen: dict[str, Any] = {}
    root = volume / "store"
    with FilesystemStorage(root) as storage:
        for i in range(ROWS):
            storage.put([make_artifact(f"m{i:03}", "1", b"w" * 64)], StructureValidator())
    index = root / "index.sqlite3"
    recorded = index.read_bytes()
    with contextlib.closing(sqlite3.connect(index)) as db:
        db.execute("UPDATE models SET artifact_format = 0")
        db.commit()
    _without_wal(root)
    older = index.read_bytes()
    assert len(older) == len(recorded)
    filler = fill(volume)
    size = filler.stat().st_size
    # The least room in which the store starts when it has nothing to record.
    for pages in range(1, 256):
        os.truncate(filler, size - pages * 4096)
        index.write_bytes(recorded)
        _without_wal(root)
        if outcome(lambda: FilesystemStorage(root).close()) == "ok":
            break
    index.write_bytes(older)
    _without_wal(root)
    opened: list[FilesystemStorage] = []
    seen["start"] = outcome(lambda: opened.append(FilesystemStorage(root)))
    for started in opened:
        seen["formats_recorded"] = started.last_sweep.formats_recorded
        seen["stat"] = outcome(lambda: started.stat("m000", "1"))  # noqa: B023
        started.close()
    filler.unlink()
    with FilesystemStorage(root) as storage:
        seen["formats_recorded_after_room"] = storage.last_sweep.formats_recorded
    return seen


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "format-backfill-on-a-nearly-full-volume": format_backfill_on_a_nearly_full_volume,
    "index-on-a-full-volume": index_on_a_full_volume,
    "start-on-a-full-volume": start_on_a_full_volume,
    "start-on-a-read-only-volume": start_on_a_read_only_volume,
}


def main() -> None:
    scenario = SCENARIOS[sys.argv[1]]
    volume = Path(tempfile.mkdtemp(prefix="strongroom-volume-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_BYTES},mode=0700", "tmpfs", str(volume)],
        check=True,
    )
    try:
        print(json.dumps(scenario(volume)), flush=True)
    finally:
        subprocess.run(["umount", "--lazy", str(volume)], check=False)
        os.rmdir(volume)


if __name__ == "__main__":
    main()
