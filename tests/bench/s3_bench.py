"""S3 backend throughput: the store's put/get over S3 beside the filesystem backend and bare boto3.

Everything runs on this machine: a real S3 server process (moto's, in-memory, on loopback; see
``tests/modelstore/s3server.py``), the store's :class:`S3Storage` and a bare boto3 client with the
same part size moving the same bytes. The ratios that matter are ``put``/``get`` over S3 against
the bare client (the store's own cost: validation, SHA-256, Content-MD5 per part, the index
object) and against the filesystem backend (what moving artifacts off the local disk costs here).
moto keeps objects in Python memory and parses every request in Python, so the absolute S3 figures
are far below a real object store's; the ratio to the bare client is the store's overhead.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from strongroom.artifact import StructureValidator
from strongroom.modelstore.storage import FilesystemStorage, S3Storage
from tests.modelstore import s3server
from tests.modelstore.artifacts import artifact_header, chunked, make_artifact

MiB = 1024 * 1024
DEFAULT_SIZE = 64 * MiB
PART_SIZE = 16 * MiB
CHUNK = 1 * MiB


def _best(fn: Callable[[], None], size: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return size / MiB / best


def run(results: dict[str, Any], *, size: int = DEFAULT_SIZE, repeats: int = 3) -> None:
    """Records MiB/s for put/get on S3, on the filesystem, and for bare boto3, with ratios."""
    art = make_artifact("bench/s3", "1", bytes(size))
    pieces = chunked(art, CHUNK)
    n = len(art)
    version = iter(range(100, 1_000_000))

    def stream(name: str) -> Iterator[bytes]:
        # A fresh version each time (versions are immutable), same size. A real head and zero
        # filler: the store checks structure only, and no encryption runs inside the timing.
        head, follow = artifact_header("bench/s3", name, size)
        yield head
        yield from chunked(bytes(follow), CHUNK)

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = stack.enter_context(s3server.moto_server(tmp))
        client = s3server.client(server.endpoint, read_timeout=300)
        bucket = s3server.new_bucket(client)
        s3 = S3Storage(client, bucket, part_size=PART_SIZE, max_artifact_size=4 * n)
        fs = FilesystemStorage(tmp / "fs", max_artifact_size=4 * n)
        stack.callback(fs.close)
        transfer = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, use_threads=False
        )

        def put(storage: S3Storage | FilesystemStorage) -> Callable[[], None]:
            def go() -> None:
                storage.put(stream(str(next(version))), StructureValidator())

            return go

        def get(storage: S3Storage | FilesystemStorage, v: str) -> Callable[[], None]:
            def go() -> None:
                with storage.open("bench/s3", v) as reader:
                    for _ in reader.chunks(512 * 1024):
                        pass

            return go

        def bare_put() -> None:
            client.upload_fileobj(io.BytesIO(art), bucket, "bare", Config=transfer)

        def bare_get() -> None:
            # What the store's reader does, without the store: one GET, read in 512 KiB pieces.
            body = client.get_object(Bucket=bucket, Key="bare")["Body"]
            while body.read(512 * 1024):
                pass

        figures: dict[str, Any] = {"size_mib": size // MiB, "part_mib": PART_SIZE // MiB}
        figures["bare_put_mib_s"] = _best(bare_put, n, repeats)
        figures["s3_put_mib_s"] = _best(put(s3), n, repeats)
        figures["fs_put_mib_s"] = _best(put(fs), n, repeats)
        s3.put(iter(pieces), StructureValidator())
        fs.put(iter(pieces), StructureValidator())
        figures["bare_get_mib_s"] = _best(bare_get, n, repeats)
        figures["s3_get_mib_s"] = _best(get(s3, "1"), n, repeats)
        figures["fs_get_mib_s"] = _best(get(fs, "1"), n, repeats)
    for key in list(figures):
        if key.endswith("_mib_s"):
            figures[key] = round(figures[key], 1)
    figures["s3_put_vs_bare"] = round(figures["s3_put_mib_s"] / figures["bare_put_mib_s"], 2)
    figures["s3_get_vs_bare"] = round(figures["s3_get_mib_s"] / figures["bare_get_mib_s"], 2)
    figures["s3_put_vs_fs"] = round(figures["s3_put_mib_s"] / figures["fs_put_mib_s"], 2)
    figures["s3_get_vs_fs"] = round(figures["s3_get_mib_s"] / figures["fs_get_mib_s"], 2)
    results.update(figures)
