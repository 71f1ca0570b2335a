"""Subprocess for the full-volume tests: a filesystem store on a small tmpfs of its own.

Usage: ``unshare --user --map-root-user --mount python -m tests.modelstore.volume_worker SCENARIO``.
In its own mount namespace the process mounts a 2 MiB tmpfs (a real filesystem that runs out of
space exactly when its pages do), runs the scenario on a store rooted there and prints one JSON
object of what it saw. Each failure is recorded as ``"<class> <reason>"``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
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


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
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
