"""Subprocess for the crash test: uploads and deletes at random, forever, until it is SIGKILLed.

Usage: ``python -m tests.modelstore.crash_worker ROOT SEED [POINT]`` (for ``s3-rewrap-loop``,
ROOT is ``ENDPOINT|BUCKET`` of an S3 server). Prints ``ready`` once the
storage is open (after its start-up sweep), then never writes to stdout again. With POINT, the
process instead kills itself at that exact step of the first upload (``before-insert``: the blob is
renamed into place but its index row not yet written) or delete (``before-unlink``: the row is
deleted but the blob not yet removed), to hit the narrowest windows deterministically.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

from strongroom.artifact import StructureValidator

# The backend's own module, not strongroom.modelstore.storage (the same class): that one imports
# the S3 backend and botocore too, ~0.5 s of every worker's start-up, and the crash tests start
# dozens of workers (the S3 loop below imports it where it needs it).
from strongroom.modelstore._filesystem import FilesystemStorage
from strongroom.modelstore.errors import ModelExists, ModelNotFound
from tests.modelstore import rewrap_case
from tests.modelstore.artifacts import chunked, make_artifact

SHARED_PREFIX = "shared"
"""Models under this prefix are re-uploaded with identical bytes each time (the same blob again)."""
REAL_PREFIX = "real"
"""Models under this prefix carry random plaintexts (the others derive theirs from the seed)."""


def real_artifact(name: str, version: str, size: int) -> bytes:
    return make_artifact(name, version, os.urandom(size))


def _die(*_args: Any, **_kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_at(root: Path, point: str) -> None:
    storage = FilesystemStorage(root)
    print("ready", flush=True)
    art = make_artifact("victim", "1", b"v" * 100_000)
    if point == "before-insert":
        storage._index.insert = _die  # type: ignore[method-assign]
        storage.put(chunked(art), StructureValidator())
    elif point == "before-unlink":
        storage._blobs.remove = _die  # type: ignore[method-assign]
        storage.delete("victim", "1")
    elif point in ("before-slot-swap", "before-slot-unlink"):
        if point == "before-slot-swap":
            storage._index.replace = _die  # type: ignore[method-assign]
        else:
            storage._blobs.remove = _die  # type: ignore[method-assign]
        storage.replace_key_slot(
            "rewrap/victim",
            "1",
            expected_key_version=1,
            key_version=2,
            wrapped_dek=rewrap_case.wrapped("rewrap/victim", "1", 2),
        )
    raise SystemExit(f"unknown point {point} or the process survived it")


def rewrap_loop(root: Path) -> None:
    """Re-wraps the stored models to ever newer KEK versions, until killed."""
    storage = FilesystemStorage(root)
    print("ready", flush=True)
    records = storage.records()
    for _ in range(1_000_000):
        for r in records:
            current = storage.stat(r.name, r.version).key_version
            storage.replace_key_slot(
                r.name,
                r.version,
                expected_key_version=current,
                key_version=current + 1,
                wrapped_dek=rewrap_case.wrapped(r.name, r.version, current + 1),
            )


def s3_rewrap_loop(endpoint: str, bucket: str) -> None:
    """:func:`rewrap_loop` on the S3 backend (bucket ``bucket``, prefix ``p/``), until killed."""
    from strongroom.modelstore.storage import S3Storage
    from tests.modelstore import s3server

    storage = S3Storage(
        s3server.client(endpoint), bucket, prefix="p/", part_size=5 * 1024 * 1024, sweep=False
    )
    print("ready", flush=True)
    records = storage.records()
    for _ in range(1_000_000):
        for r in records:
            current = storage.stat(r.name, r.version).key_version
            storage.replace_key_slot(
                r.name,
                r.version,
                expected_key_version=current,
                key_version=current + 1,
                wrapped_dek=rewrap_case.wrapped(r.name, r.version, current + 1),
            )


def main(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    shared_arts = [
        make_artifact(
            f"{SHARED_PREFIX}{i}", "1", hashlib.shake_256(b"shared%d" % i).digest(300_000)
        )
        for i in range(3)
    ]
    storage = FilesystemStorage(root)
    print("ready", flush=True)
    counter = 0
    while True:
        counter += 1
        op = rng.random()
        try:
            if op < 0.35:
                size = rng.randrange(1, 1_500_000)
                body = hashlib.shake_256(f"{seed}/{counter}".encode()).digest(size)
                art = make_artifact(f"m{rng.randrange(12)}", str(rng.randrange(4)), body)
                storage.put(chunked(art, 32 * 1024), StructureValidator())
            elif op < 0.7:
                size = rng.randrange(0, 1_500_000)
                art = real_artifact(
                    f"{REAL_PREFIX}{rng.randrange(12)}", str(rng.randrange(4)), size
                )
                storage.put(chunked(art, 32 * 1024), StructureValidator())
            elif op < 0.85:
                i = rng.randrange(len(shared_arts))
                storage.put(chunked(shared_arts[i], 32 * 1024), StructureValidator())
            else:
                records = storage.records()
                if records:
                    victim = rng.choice(records)
                    storage.delete(victim.name, victim.version)
        except (ModelExists, ModelNotFound):
            pass


if __name__ == "__main__":
    if sys.argv[3:] == ["s3-rewrap-loop"]:
        endpoint, _, bucket = sys.argv[1].rpartition("|")
        s3_rewrap_loop(endpoint, bucket)
    if sys.argv[3:] == ["rewrap-loop"]:
        rewrap_loop(Path(sys.argv[1]))
    if len(sys.argv) > 3:
        die_at(Path(sys.argv[1]), sys.argv[3])
    main(Path(sys.argv[1]), int(sys.argv[2]))
