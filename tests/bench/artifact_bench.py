"""Artifact encryption/decryption throughput against raw AES-256-GCM, and streaming memory.

Every figure is measured in the same run as its baseline and reported with the ratio:

* ``raw_*``: AES-256-GCM ``encrypt_into``/``decrypt_into`` over the same bytes, 16 KiB chunks,
  preallocated buffers, in 1 and 2 threads — the ceiling for this library;
* ``sha256_gbps``: hashlib SHA-256 over the same bytes — the other ceiling of encryption, since a
  writer must hash the plaintext (one thread, run concurrently with encryption);
* ``encrypt_stream``: the full writer (read into reused blocks, SHA-256 in a second thread,
  C2SP sealing, ``bytes`` output) to a null sink;
* ``decrypt_all``: whole-artifact decryption into one new buffer, 1 and 2 threads, against raw
  decryption into a fresh buffer (page faults included: any API returning new plaintext pays them)
  and into a reused one; ``decrypt_into`` into a reused buffer against raw into a reused buffer;
* ``stream_decrypt`` / ``buffered_stream_decrypt``: ``StreamDecryptor`` (plaintext handed out as
  each chunk authenticates) and the download path's ``BufferedStreamDecryptor``, fed 1 MiB pieces;
* ``memory``: peak RSS growth and tracemalloc peak of a separate process encrypting a file of
  ``stream_mib`` MiB (2048 for the 2 GiB figure) to a sink.

Usage: ``python -m tests.bench.run artifact`` (defaults: 256 MiB throughput, 512 MiB memory
stream), or ``python -m tests.bench.artifact_bench --size-mib 256 --stream-mib 2048``. The
environment variables ``STRONGROOM_BENCH_ARTIFACT_MIB`` and ``STRONGROOM_BENCH_ARTIFACT_STREAM_MIB``
override the defaults when run through ``make bench``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CHUNK = 16384
SEALED = CHUNK + 16
REPEATS = 5

FIELDS: dict[str, Any] = {
    "model_name": "bench/model",
    "model_version": "1",
    "content_type": "application/octet-stream",
    "key_id": "bench-kek",
    "key_version": 1,
    "wrapped_dek": bytes(40),
}


def _best(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Shortest wall time of ``repeats`` runs (the machine is shared; the minimum is the signal)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gbps(size: int, seconds: float) -> float:
    return round(size / seconds / 1e9, 3)


def _in_threads(threads: int, work: Callable[[int, int], None], count: int) -> None:
    bounds = [count * t // threads for t in range(threads + 1)]
    if threads == 1:
        work(0, count)
        return
    pool = [threading.Thread(target=work, args=(bounds[t], bounds[t + 1])) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _raw(plain: bytearray, key: bytes, threads: int) -> tuple[float, float, float]:
    """Raw AES-256-GCM over ``plain`` in 16 KiB chunks.

    Returns seconds to encrypt, to decrypt into a reused (already faulted-in) buffer, and to decrypt
    into a fresh buffer allocated like ``decrypt_all``'s (what any API returning new plaintext pays).
    """
    from strongroom.artifact._memory import output_buffer

    count = len(plain) // CHUNK
    sealed = bytearray(count * SEALED)
    src, ct = memoryview(plain), memoryview(sealed)
    nonce = bytes(12)
    out = bytearray(len(plain))
    dst = memoryview(out)

    def enc(lo: int, hi: int) -> None:
        aead = AESGCM(key)
        for i in range(lo, hi):
            aead.encrypt_into(
                nonce, src[i * CHUNK : (i + 1) * CHUNK], None, ct[i * SEALED : (i + 1) * SEALED]
            )

    def dec(lo: int, hi: int) -> None:
        aead = AESGCM(key)
        for i in range(lo, hi):
            aead.decrypt_into(
                nonce, ct[i * SEALED : (i + 1) * SEALED], None, dst[i * CHUNK : (i + 1) * CHUNK]
            )

    def dec_fresh() -> None:
        nonlocal dst
        dst = memoryview(output_buffer(len(plain)))
        _in_threads(threads, dec, count)

    t_enc = _best(lambda: _in_threads(threads, enc, count))
    t_dec = _best(lambda: _in_threads(threads, dec, count))
    assert out == plain
    t_fresh = _best(dec_fresh)
    return t_enc, t_dec, t_fresh


def _throughput(size_mib: int, results: dict[str, Any]) -> None:
    from strongroom.artifact import (
        ArtifactReader,
        BufferedStreamDecryptor,
        StreamDecryptor,
        encrypt_stream,
    )

    size = size_mib * 1024 * 1024
    plain = bytearray(os.urandom(size))
    key = os.urandom(32)
    dek = bytearray(key)

    raw = {t: _raw(plain, key, t) for t in (1, 2)}
    t_sha = _best(lambda: hashlib.sha256(plain).digest())

    artifact = bytearray()
    # BytesIO over immutable bytes shares the buffer; over a bytearray it would copy 256 MiB first.
    source = bytes(plain)

    def encrypt() -> None:
        artifact.clear()
        for part in encrypt_stream(io.BytesIO(source), dek, **FIELDS):
            artifact.extend(part)

    def encrypt_to_sink() -> None:
        for _ in encrypt_stream(io.BytesIO(source), dek, **FIELDS):
            pass

    encrypt()
    t_enc = _best(encrypt_to_sink)
    blob = bytes(artifact)
    reader = ArtifactReader(blob)
    t_dec = {t: _best(functools.partial(reader.decrypt_all, dek, threads=t)) for t in (1, 2)}
    reused = bytearray(size)
    t_into = {
        t: _best(functools.partial(reader.decrypt_into, dek, reused, threads=t)) for t in (1, 2)
    }
    t_dec_verify = _best(lambda: reader.decrypt_all(dek, threads=2, verify_digest=True), 1)
    assert reader.decrypt_all(dek) == plain

    piece = 1 << 20

    def stream() -> None:
        dec = StreamDecryptor(dek)
        view = memoryview(blob)
        for i in range(0, len(blob), piece):
            dec.feed(view[i : i + piece])
        dec.finish()

    def buffered(threads: int) -> None:
        dec = BufferedStreamDecryptor(dek, threads=threads)
        view = memoryview(blob)
        for i in range(0, len(blob), piece):
            dec.feed(view[i : i + piece])
        dec.finish()

    t_stream = _best(stream)
    t_buffered = {t: _best(functools.partial(buffered, t)) for t in (1, 2)}

    raw_enc1, raw_dec1, raw_fresh1 = raw[1]
    raw_enc2, raw_dec2, raw_fresh2 = raw[2]
    results["throughput"] = {
        "size_mib": size_mib,
        "chunk_bytes": CHUNK,
        "raw_encrypt_gbps": {"1_thread": _gbps(size, raw_enc1), "2_threads": _gbps(size, raw_enc2)},
        "raw_decrypt_gbps": {"1_thread": _gbps(size, raw_dec1), "2_threads": _gbps(size, raw_dec2)},
        "raw_decrypt_fresh_buffer_gbps": {
            "1_thread": _gbps(size, raw_fresh1),
            "2_threads": _gbps(size, raw_fresh2),
        },
        "sha256_gbps": _gbps(size, t_sha),
        "encrypt_stream_gbps": _gbps(size, t_enc),
        "encrypt_stream_vs_raw_encrypt_1_thread": round(raw_enc1 / t_enc, 3),
        "encrypt_stream_vs_sha256": round(t_sha / t_enc, 3),
        "decrypt_all_gbps": {"1_thread": _gbps(size, t_dec[1]), "2_threads": _gbps(size, t_dec[2])},
        "decrypt_all_vs_raw": {
            "1_thread": round(raw_dec1 / t_dec[1], 3),
            "2_threads": round(raw_dec2 / t_dec[2], 3),
        },
        "decrypt_all_vs_raw_fresh_buffer": {
            "1_thread": round(raw_fresh1 / t_dec[1], 3),
            "2_threads": round(raw_fresh2 / t_dec[2], 3),
        },
        "decrypt_into_reused_buffer_gbps": {
            "1_thread": _gbps(size, t_into[1]),
            "2_threads": _gbps(size, t_into[2]),
        },
        "decrypt_into_vs_raw": {
            "1_thread": round(raw_dec1 / t_into[1], 3),
            "2_threads": round(raw_dec2 / t_into[2], 3),
        },
        "decrypt_all_2_threads_verify_digest_gbps": _gbps(size, t_dec_verify),
        "stream_decrypt_gbps": _gbps(size, t_stream),
        "stream_decrypt_vs_raw_1_thread": round(raw_dec1 / t_stream, 3),
        "buffered_stream_decrypt_gbps": {
            "1_thread": _gbps(size, t_buffered[1]),
            "2_threads": _gbps(size, t_buffered[2]),
        },
        "targets": {
            "decrypt_all_vs_raw_min": 0.8,
            "decrypt_all_2_threads_min_gbps": 3.0,
        },
    }


_MEMORY_CHILD = r"""
import json, os, sys, tracemalloc
from strongroom.artifact import encrypt_stream
path, fields = sys.argv[1], json.loads(sys.argv[2])
fields["wrapped_dek"] = bytes(fields["wrapped_dek"])
dek = bytearray(os.urandom(32))
def hwm_kib():
    # VmHWM is this process's own peak RSS (ru_maxrss would include the parent's, kept across exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
baseline_kib = hwm_kib()
tracemalloc.start()
total = 0
with open(path, "rb") as f:
    for part in encrypt_stream(f, dek, **fields):
        total += len(part)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
peak_kib = hwm_kib()
print(json.dumps({"artifact_bytes": total, "tracemalloc_peak": peak,
                  "rss_baseline_kib": baseline_kib, "rss_peak_kib": peak_kib}))
"""


def _memory(stream_mib: int, results: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="artifact-bench-") as tmp:
        path = Path(tmp, "model.bin")
        block = os.urandom(16 * 1024 * 1024)
        with path.open("wb") as f:
            for _ in range(stream_mib // 16):
                f.write(block)
        fields = dict(FIELDS, wrapped_dek=list(FIELDS["wrapped_dek"]))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(path), json.dumps(fields)],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        child = json.loads(proc.stdout)
    growth_mib = (child["rss_peak_kib"] - child["rss_baseline_kib"]) / 1024
    results["memory"] = {
        "stream_mib": stream_mib,
        "artifact_bytes": child["artifact_bytes"],
        "tracemalloc_peak_mib": round(child["tracemalloc_peak"] / 2**20, 2),
        "rss_growth_mib": round(growth_mib, 1),
        "rss_peak_mib": round(child["rss_peak_kib"] / 1024, 1),
        "file_to_sink_gbps_with_tracemalloc": _gbps(stream_mib * 2**20, seconds),
        "target_rss_growth_max_mib": 100,
    }


def run(
    results: dict[str, Any], *, size_mib: int | None = None, stream_mib: int | None = None
) -> None:
    """Fills ``results`` with the throughput and memory figures (see the module docstring)."""
    size_mib = size_mib or int(os.environ.get("STRONGROOM_BENCH_ARTIFACT_MIB", "256"))
    stream_mib = stream_mib or int(os.environ.get("STRONGROOM_BENCH_ARTIFACT_STREAM_MIB", "512"))
    results["cpus"] = os.cpu_count()
    results["measured"] = datetime.now(UTC).isoformat(timespec="seconds")
    _memory(stream_mib, results)  # first, before this process holds the throughput buffers
    _throughput(size_mib, results)


def main() -> None:
    """Runs the benchmark standalone and prints its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--stream-mib", type=int, default=512)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    run(results, size_mib=args.size_mib, stream_mib=args.stream_mib)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
