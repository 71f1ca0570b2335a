"""What the key broker's check of its sealed audit files costs at start, and what a full one would.

``python -m tests.bench.audit_start [--files N] [--file-mib M] [--repeats R]`` (defaults: 100
files of 64 MiB) builds, in a temporary directory, ``N`` sealed audit files of ``M`` MiB and an
empty active log continuing them, then times:

* ``open_baseline``: :meth:`AuditLog.open` and close of the active log alone (its sealed files
  moved away: retention), the same run's baseline;
* ``open_warm`` / ``open_cold``: the same with the ``N`` sealed files beside it, which the open
  reads before it locks (``_precheck_sealed``) and checks under the locks
  (:meth:`AuditLog._check_sealed_series`: a stat of each file read); cold: every sealed file and head evicted from
  the page cache (``posix_fadvise(DONTNEED)``) before each open;
* ``full_chain_one_file``: :func:`verify_audit_log` (what ``audit verify`` does: every record's
  hash and chain) on one real ``M`` MiB sealed file of ~2.5 KB records, the size of a release's;
  ``full_chain_all_estimate`` is that times ``N``, what checking every record at start would add;
* ``sha256_one_file``: the file's SHA-256 read in 1 MiB pieces, the floor of any check that reads
  every byte (a digest of each file in its sealed head, say);
* ``log_lock_held_*`` / ``dir_lock_held_*``: how long those opens held the log's ``flock`` (what a
  sibling broker's commit, a key release, waits for, at most ``LOG_LOCK_WAIT_SECONDS``) and the
  directory's (what a sibling's rotation waits for), best of ``R`` as the opens are; ``*_share``
  is the cold hold over the cold open.

The ``N`` sealed files are real at both ends (a signed sealed head, valid first two and last
records) and a hole in between: the start check reads a file's head, its first two records (up
to 64 KiB each) and its last 8 KiB, never the middle, so only the real one built for ``full_chain_one_file`` needs real
records throughout (building 6.4 GB of signed records would take minutes of the shared CPU).
Times are best of ``R``; ratios are to ``open_baseline``. Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_head
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision, head_path, sealed_log_name
from strongroom.keybroker.audit_verify import verify_audit_log

MiB = 1 << 20
LOG = "audit.log"
# Claims padded so that a record is about 2.5 KB, as a granted release's is (README).
_EVENT = AuditEvent(
    decision=Decision.ALLOWED,
    reason="RELEASED",
    caller_spiffe_id="spiffe://strongroom.test/inference",
    caller_cert_serial="1f00",
    evidence_sha256="ab" * 32,
    claims={"measurement": "cd" * 48, "report": "ef" * 800},
    policy_version="7",
    key_id="model-a",
    key_version=3,
)
_MEMBERS = audit_module._event_members(_EVENT)[1]


def _record(seq: int, prev: str, key: Ed25519PrivateKey) -> tuple[bytes, str]:
    return audit_module._record_line(_MEMBERS, seq, prev, "2026-01-01T00:00:00.000000Z", key)


def _write_head(
    path: Path, key: Ed25519PrivateKey, head: audit_head.Head, size: int | None
) -> None:
    """A head file for ``path``: its anchor, then (with ``size``) ``head`` sealed."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        file = audit_head.HeadFile(
            head_path(path),
            key,
            # The key's own fingerprint: a head carries its public key (pub) since 15355c4, and
            # one naming another key is malformed, so the broker's open refused the series.
            audit_module._key_fingerprint(key.public_key()),
            lambda: "2026-01-01T00:00:00.000000Z",
            dir_fd,
        )
        file.read()
        if size is None:
            file.write(head)
        else:
            file.write(audit_head.Head(head.base, secrets.token_hex(32), head.base))
            file.write(head, sealed=True, size=size)
        file.close()
    finally:
        os.close(dir_fd)


def _sealed_file(
    directory: Path, key: Ed25519PrivateKey, base: int, prev: str, size: int, *, real: bool
) -> tuple[int, str]:
    """A sealed log from seq ``base`` chained on ``prev``, of about ``size`` bytes: real records
    throughout, or (not ``real``) its first two and last records around a hole. Returns its
    count and last hash."""
    line, digest = _record(base, prev, key)
    size = max(size, 3 * len(line))
    per_file = size // len(line)
    last = base + per_file - 1
    path = directory / sealed_log_name(LOG, base, last)
    with path.open("wb") as out:
        out.write(line)
        if real:
            for seq in range(base + 1, last + 1):
                line, digest = _record(seq, digest, key)
                out.write(line)
        else:
            line, digest = _record(base + 1, digest, key)  # the start checks it continues the first
            out.write(line)
            line, digest = _record(last, secrets.token_hex(32), key)  # the check reads no other
            out.seek(size - len(line) - 1)
            out.write(b"\n" + line)
    _write_head(path, key, audit_head.Head(last + 1, digest, base), path.stat().st_size)
    return last + 1, digest


def _evict(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _best(
    repeats: int, op: Callable[[], object], before: Callable[[], None] | None = None
) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        op()
        times.append(time.perf_counter() - started)
    return min(times)


class _Holds:
    """How long :meth:`AuditLog.open` holds the log's and the directory's ``flock``: the
    broker's own two lock context managers, timed from taken to let go."""

    def __init__(self) -> None:
        self.log = 0.0
        self.dir = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        real_log, real_dir = AuditLog._flocked, AuditLog._dir_locked

        @contextlib.contextmanager
        def timed_log(log: AuditLog, since: float) -> Iterator[None]:
            with real_log(log, since):
                started = time.perf_counter()
                try:
                    yield
                finally:
                    self.log += time.perf_counter() - started

        @contextlib.contextmanager
        def timed_dir(log: AuditLog) -> Iterator[None]:
            with real_dir(log):
                started = time.perf_counter()
                try:
                    yield
                finally:
                    self.dir += time.perf_counter() - started

        AuditLog._flocked = timed_log  # type: ignore[method-assign,assignment]
        AuditLog._dir_locked = timed_dir  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            AuditLog._flocked = real_log  # type: ignore[method-assign]
            AuditLog._dir_locked = real_dir  # type: ignore[method-assign]


def _best_holds(
    repeats: int, op: Callable[[], object], before: Callable[[], None] | None = None
) -> tuple[float, float]:
    """The shortest log-lock and directory-lock holds of ``repeats`` runs of ``op``."""
    holds = []
    for _ in range(repeats):
        if before is not None:
            before()
        held = _Holds()
        with held.timing():
            op()
        holds.append((held.log, held.dir))
    return min(log for log, _ in holds), min(dir_ for _, dir_ in holds)


def measure(files: int, file_mib: float, repeats: int) -> dict[str, Any]:
    """The figures described in the module doc."""
    key = Ed25519PrivateKey.generate()
    size = int(file_mib * MiB)
    with tempfile.TemporaryDirectory(prefix="audit-start-") as tmp:
        series, alone, real = Path(tmp, "series"), Path(tmp, "alone"), Path(tmp, "real")
        for directory in (series, alone, real):
            directory.mkdir()
        count, last_hash = 0, secrets.token_hex(32)
        for _ in range(files):
            count, last_hash = _sealed_file(series, key, count, last_hash, size, real=False)
        log = series / LOG
        log.touch()
        _write_head(log, key, audit_head.Head(count, last_hash, count), None)
        for name in (LOG, LOG + ".head"):
            shutil.copyfile(series / name, alone / name)
        _sealed_file(real, key, 0, secrets.token_hex(32), size, real=True)
        (real_log,) = (p for p in real.iterdir() if not p.name.endswith(".head"))

        def open_close(path: Path) -> Callable[[], None]:
            return lambda: AuditLog.open(path, key).close()

        baseline = _best(repeats, open_close(alone / LOG))
        warm = _best(repeats, open_close(log))
        cold = _best(repeats, open_close(log), lambda: _evict(series))
        log_baseline, _ = _best_holds(repeats, open_close(alone / LOG))
        log_warm, dir_warm = _best_holds(repeats, open_close(log))
        log_cold, dir_cold = _best_holds(repeats, open_close(log), lambda: _evict(series))

        def verify() -> None:
            assert verify_audit_log(real_log, public_key=key.public_key()).intact

        def digest() -> None:
            h = hashlib.sha256()
            with real_log.open("rb") as f:
                while piece := f.read(MiB):
                    h.update(piece)

        full = _best(max(1, repeats // 5), verify)
        sha = _best(max(1, repeats // 5), digest)
        records_per_file = len(real_log.read_bytes().splitlines())
    return {
        "files": files,
        "file_mib": file_mib,
        "records_per_file": records_per_file,
        "open_baseline_ms": round(baseline * 1e3, 2),
        "open_warm_ms": round(warm * 1e3, 2),
        "open_cold_ms": round(cold * 1e3, 2),
        "check_warm_ms_per_file": round((warm - baseline) * 1e3 / files, 3),
        "check_cold_ms_per_file": round((cold - baseline) * 1e3 / files, 3),
        "open_warm_over_baseline": round(warm / baseline, 1),
        "open_cold_over_baseline": round(cold / baseline, 1),
        "log_lock_held_baseline_ms": round(log_baseline * 1e3, 2),
        "log_lock_held_warm_ms": round(log_warm * 1e3, 2),
        "log_lock_held_cold_ms": round(log_cold * 1e3, 2),
        "log_lock_held_cold_share": round(log_cold / cold, 3),
        "dir_lock_held_warm_ms": round(dir_warm * 1e3, 2),
        "dir_lock_held_cold_ms": round(dir_cold * 1e3, 2),
        "full_chain_one_file_s": round(full, 2),
        "full_chain_all_estimate_s": round(full * files, 1),
        "full_chain_all_over_open_warm": round(full * files / warm),
        "sha256_one_file_s": round(sha, 3),
        "sha256_all_estimate_s": round(sha * files, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--file-mib", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.files, args.file_mib, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
