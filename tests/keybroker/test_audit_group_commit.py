"""Audit group commit: concurrent appends share one write, one fsync and one signed head per batch.

Batches are formed deterministically: the first commit is held (inside its write) until the other
callers are queued behind it, so the next commit takes all of them. Faults are injected into the
batch's write, its fsync and its head, and crashes are simulated by putting back the head that was
on disk before a batch.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.cli import audit as audit_cli
from strongroom.errors import DataLoss, InvalidArgument
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import (
    MAX_BATCH_RECORDS,
    AuditEvent,
    AuditLog,
    AuditRecord,
    Decision,
    canonical_json,
    head_path,
    record_hash,
)
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.errors import AuditUnavailable

from .test_audit import _append_forged, event, fill, lines


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "decisions.jsonl"


@pytest.fixture
def audit(log_path: Path, signing_key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    log_path.parent.mkdir()
    log = AuditLog.open(log_path, signing_key)
    yield log
    log.close()


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Waits for a state another thread brings about (bounded; not a timing assertion)."""
    for _ in range(30_000):
        if condition():
            return
        time.sleep(0.001)
    raise AssertionError(f"gave up waiting for {what}")


class _Gate:
    """Holds the first commit of ``log`` inside its write until ``waiting`` callers are queued."""

    def __init__(self, log: AuditLog, monkeypatch: pytest.MonkeyPatch, waiting: int) -> None:
        self.entered = threading.Event()
        self.batches: list[bytes] = []  # the data of each commit's write, in order
        original = log._write_records

        def held(data: bytes, hashes: list[str], *head: Any) -> None:
            self.batches.append(data)
            if len(self.batches) == 1:
                self.entered.set()
                _wait_until(lambda: log.queued >= waiting, f"{waiting} queued callers")
            original(data, hashes, *head)

        monkeypatch.setattr(log, "_write_records", held)


def _batched(
    log: AuditLog,
    monkeypatch: pytest.MonkeyPatch,
    followers: list[AuditEvent],
    first: AuditEvent | None = None,
    append: Callable[[AuditEvent], Any] | None = None,
) -> tuple[_Gate, Future[AuditRecord], list[Future[Any]]]:
    """One caller commits ``first`` alone while ``followers`` queue (each calling ``append``,
    default ``log.append``); they form the next batch."""
    gate = _Gate(log, monkeypatch, len(followers))
    pool = ThreadPoolExecutor(len(followers) + 1)
    leader = pool.submit(log.append, first or event(0, reason="LEADER"))
    assert gate.entered.wait(30)
    rest = [pool.submit(append or log.append, e) for e in followers]
    pool.shutdown(wait=True)
    return gate, leader, rest


def _outcome(future: Future[AuditRecord]) -> AuditRecord | BaseException:
    exc = future.exception()
    return exc if exc is not None else future.result()


def _cli_verify(log_path: Path, key: Ed25519PrivateKey, tmp_path: Path) -> int:
    public = tmp_path / "audit.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    parser = argparse.ArgumentParser(prog="strongroom")
    audit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify", str(log_path), "--public-key", str(public)])
    return int(args.func(args))


def test_a_lone_caller_commits_at_once_in_a_batch_of_one(audit: AuditLog) -> None:
    fill(audit, 3)
    assert audit.batch_sizes == {1: 3}
    assert audit.queued == 0


def test_queued_callers_share_one_write_and_one_head(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    heads: list[Any] = []
    original_head = audit._write_head

    def write_head(head: Any) -> None:
        heads.append(head)
        original_head(head)

    monkeypatch.setattr(audit, "_write_head", write_head)
    gate, leader, rest = _batched(audit, monkeypatch, [event(n) for n in range(1, 8)])
    records = [leader.result()] + [f.result() for f in rest]
    assert audit.batch_sizes == {1: 1, 7: 1}
    # One write per batch, one head per batch, and the second head covers all seven.
    assert [data.count(b"\n") for data in gate.batches] == [1, 7]
    assert [(h.count, h.last_hash) for h in heads] == [
        (1, records[0].hash),
        (8, max(records, key=lambda r: r.seq).hash),
    ]
    # Records keep their seq order in the file; each caller got its own record's coordinates.
    assert sorted(r.seq for r in records) == list(range(8))
    on_disk = [json.loads(line) for line in lines(log_path)]
    assert [r["seq"] for r in on_disk] == list(range(8))
    by_seq = {r["seq"]: r for r in on_disk}
    for record in records:
        assert by_seq[record.seq]["hash"] == record.hash
        assert by_seq[record.seq]["decision_id"] == record.decision_id
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 8
    assert _cli_verify(log_path, signing_key, tmp_path) == 0


def test_many_threads_append_and_the_chain_verifies(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    with ThreadPoolExecutor(16) as pool:
        records = list(pool.map(lambda n: audit.append(event(n)), range(320)))
    assert sorted(r.seq for r in records) == list(range(320))
    sizes = audit.batch_sizes
    assert sum(size * n for size, n in sizes.items()) == 320
    assert max(sizes) <= MAX_BATCH_RECORDS
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 320
    assert _cli_verify(log_path, signing_key, tmp_path) == 0


def test_a_batch_is_bounded(audit: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    followers = [event(n) for n in range(MAX_BATCH_RECORDS + 5)]
    _, leader, rest = _batched(audit, monkeypatch, followers)
    assert all(f.exception() is None for f in [leader, *rest])
    assert audit.batch_sizes == {1: 1, MAX_BATCH_RECORDS: 1, 5: 1}


def test_an_oversized_record_fails_alone(
    audit: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    followers = [event(1), event(2, claims={"big": "x" * 70_000}), event(3)]
    _, leader, rest = _batched(audit, monkeypatch, followers)
    outcomes = [_outcome(f) for f in rest]
    assert isinstance(outcomes[1], InvalidArgument)
    assert outcomes[1].reason == "AUDIT_RECORD_INVALID"
    good = [leader.result(), outcomes[0], outcomes[2]]
    # The followers queue in whatever order their threads get there; the seqs have no gap.
    assert sorted(r.seq for r in good if isinstance(r, AuditRecord)) == [0, 1, 2]
    assert audit.batch_sizes == {1: 1, 3: 1}
    assert verify_audit_log(log_path).records == 3


_DOOMED = b'"reason":"DOOMED"'


def _fail_write(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's write stops half-way with ENOSPC (a partial write to cut back)."""
    real_write = os.write
    state = {"doomed": False}

    def write(fd: int, data: Any) -> int:
        if fd == log._fd and _DOOMED in bytes(data):
            state["doomed"] = True
            return real_write(fd, bytes(data)[: len(data) // 2])
        if fd == log._fd and state["doomed"]:
            state["doomed"] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", write)


def _fail_writeback(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's lines are written but starting their writeback fails (EIO), before the head
    that would anchor them is signed ahead of their fsync."""
    real_writeback = audit_module.start_writeback

    def start_writeback(fd: int, offset: int, length: int) -> bool:
        if fd == log._fd and _DOOMED in os.pread(fd, length, offset):
            raise OSError(errno.EIO, "Input/output error")
        return real_writeback(fd, offset, length)

    monkeypatch.setattr(audit_module, "start_writeback", start_writeback)


def _fail_fsync(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's lines are written but their fsync fails (EIO)."""
    original = log._write_records
    real_fsync = os.fsync
    state = {"doomed": False}

    def write_records(data: bytes, hashes: list[str], *head: Any) -> None:
        state["doomed"] = _DOOMED in data
        original(data, hashes, *head)

    def fsync(fd: int) -> None:
        if fd == log._fd and state["doomed"]:
            state["doomed"] = False  # the cut-back's own fsync succeeds
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(log, "_write_records", write_records)
    monkeypatch.setattr(audit_module.os, "fsync", fsync)


def _fail_head(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's lines are durable but its head cannot be written (ENOSPC)."""
    original_records, original_head = log._write_records, log._write_head
    state = {"doomed": False}

    def write_records(data: bytes, hashes: list[str], *head: Any) -> None:
        state["doomed"] = _DOOMED in data
        original_records(data, hashes, *head)

    def write_head(head: Any) -> None:
        if state["doomed"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        original_head(head)

    monkeypatch.setattr(log, "_write_records", write_records)
    monkeypatch.setattr(log, "_write_head", write_head)


@pytest.mark.parametrize(
    "inject",
    [_fail_write, _fail_writeback, _fail_fsync, _fail_head],
    ids=["write", "writeback", "fsync", "head"],
)
def test_a_failed_batch_fails_every_caller_and_leaves_no_trace(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    inject: Callable[[AuditLog, pytest.MonkeyPatch], None],
) -> None:
    fill(audit, 2)
    inject(audit, monkeypatch)
    followers = [event(n, reason="DOOMED", decision=Decision.ALLOWED) for n in range(6)]
    _, leader, rest = _batched(audit, monkeypatch, followers)
    assert leader.result().seq == 2  # the batch before the failed one is unaffected
    assert audit.batch_sizes == {1: 3, 6: 1}
    outcomes = [_outcome(f) for f in rest]
    assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, AuditUnavailable)} == {"AUDIT_UNAVAILABLE"}
    assert b"DOOMED" not in log_path.read_bytes()
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 3
    monkeypatch.undo()
    assert audit.append(event(9)).seq == 3  # the log carries on where the last good batch ended
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 4


def test_a_failed_batch_that_reappears_is_cut_off_not_anchored(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill(audit, 2)
    _fail_head(audit, monkeypatch)
    captured: list[bytes] = []
    original = audit._write_records

    def capture(data: bytes, hashes: list[str], *head: Any) -> None:
        captured.append(data)
        original(data, hashes, *head)

    monkeypatch.setattr(audit, "_write_records", capture)
    followers = [event(n, reason="DOOMED") for n in range(3)]
    _, leader, rest = _batched(audit, monkeypatch, followers)
    assert leader.exception() is None
    assert all(isinstance(f.exception(), AuditUnavailable) for f in rest)
    monkeypatch.undo()
    doomed = next(data for data in captured if b"DOOMED" in data)
    with log_path.open("ab") as f:  # all three signed lines come back (a failed truncate, a replay)
        f.write(doomed)
    assert audit.append(event(7)).seq == 3
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 4
    assert b"DOOMED" not in log_path.read_bytes()


def _crash_after_batch(log: AuditLog, log_path: Path, records: int) -> bytes:
    """The state a crash leaves between a batch's fsync'd write and its head: the lines are on disk,
    the head is the one from before. Returns the lines."""
    old_head = head_path(log_path).read_bytes()
    before = log_path.stat().st_size
    fill(log, records)
    log.close()
    head_path(log_path).write_bytes(old_head)
    return log_path.read_bytes()[before:]


@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn-line"])
def test_a_crash_leaving_several_unanchored_records_is_repaired(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey, torn: bool
) -> None:
    fill(audit, 2)
    _crash_after_batch(audit, log_path, 4)
    if torn:
        with log_path.open("ab") as f:
            f.write(b'{"v":2,"seq":6,"ti')
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    if not torn:
        assert (result.problem, result.bad_record) == ("UNANCHORED_RECORDS", 3)
    with AuditLog.open(log_path, signing_key) as reopened:
        assert reopened.count == 6
        assert reopened.append(event(6)).seq == 6
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 7


def test_another_process_anchors_a_crashed_batch(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """A live log notices that the tail moved (another process) and repairs before appending."""
    fill(audit, 1)
    other = AuditLog.open(log_path, signing_key)
    _crash_after_batch(other, log_path, 3)  # the other process wrote a batch and died
    assert audit.append(event(9)).seq == 4
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 5


def _rechain(content: list[dict[str, Any]], start: int) -> None:
    for index in range(start, len(content)):
        record = content[index]
        record["prev"] = content[index - 1]["hash"]
        record.pop("hash")
        record["hash"] = record_hash(record)


def _forge_middle(log_path: Path, unanchored: int, at: int) -> None:
    """An attacker edits the ``at``-th unanchored record and re-chains everything after it."""
    content = [json.loads(line) for line in lines(log_path)]
    index = len(content) - unanchored + at
    content[index]["reason"] = "RELEASED"
    content[index]["decision"] = "allowed"
    _rechain(content, index)
    log_path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in content))


@pytest.mark.parametrize(
    ("forge", "bad_record"),
    [
        pytest.param(_append_forged, 6, id="appended-after-the-batch"),
        pytest.param(lambda p: _forge_middle(p, 3, 1), 4, id="edited-in-the-batch"),
        pytest.param(lambda p: _forge_middle(p, 3, 0), 3, id="first-of-the-batch"),
    ],
)
def test_a_foreign_record_among_unanchored_ones_is_tampering(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    forge: Callable[[Path], None],
    bad_record: int,
) -> None:
    fill(audit, 2)
    _crash_after_batch(audit, log_path, 3)
    forge(log_path)
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.problem, result.bad_record) == ("RECORD_FORGED", bad_record)
    head_before = head_path(log_path).read_bytes()
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert head_path(log_path).read_bytes() == head_before  # nothing was anchored


def test_a_live_log_latches_on_a_foreign_record_among_unanchored_ones(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 1)
    other = AuditLog.open(log_path, signing_key)
    _crash_after_batch(other, log_path, 2)
    _append_forged(log_path)
    with pytest.raises(DataLoss):
        audit.append(event(5))
    assert audit.tamper_problem is not None and "forged" in audit.tamper_problem
    with pytest.raises(DataLoss):
        audit.append(event(6))


def test_more_unanchored_records_than_one_batch_is_tampering(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    """All signed by the broker, but no crash leaves more than one batch: an older head was put
    back (or records were added by a copy of the key holder's files)."""
    fill(audit, 1)
    _crash_after_batch(audit, log_path, MAX_BATCH_RECORDS + 1)
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.problem, result.bad_record) == ("HEAD_MISMATCH", 2)
    assert verify_audit_log(log_path).problem == "UNANCHORED_RECORDS"  # without the key: unknown
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, signing_key)
    assert "more records follow the head" in info.value.message


def test_exactly_one_batch_of_unanchored_records_is_repaired(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 1)
    _crash_after_batch(audit, log_path, MAX_BATCH_RECORDS)
    with AuditLog.open(log_path, signing_key) as reopened:
        assert reopened.count == MAX_BATCH_RECORDS + 1
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).intact


def test_an_unanchored_batch_that_does_not_follow_the_head_is_tampering(
    audit: AuditLog, log_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    fill(audit, 3)
    _crash_after_batch(audit, log_path, 2)
    # Record 3, the last one the head anchors, is edited and everything after it re-chained: the
    # unanchored run no longer follows the head's last_hash.
    content = [json.loads(line) for line in lines(log_path)]
    content[2]["reason"] = "EDITED"
    _rechain(content, 2)
    log_path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in content))
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert (result.problem, result.bad_record) == ("HEAD_MISMATCH", 3)
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, signing_key)


def test_every_caller_of_a_batch_hears_of_tampering(
    audit: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(audit, 2)
    gate = _Gate(audit, monkeypatch, 4)
    gated = audit._write_records
    calls: list[bytes] = []

    def write(data: bytes, hashes: list[str], *head: Any) -> None:
        calls.append(data)
        gated(data, hashes, *head)
        if len(calls) == 1:
            _append_forged(log_path)  # someone appends while the first batch commits

    monkeypatch.setattr(audit, "_write_records", write)
    pool = ThreadPoolExecutor(5)
    leader = pool.submit(audit.append, event(0))
    assert gate.entered.wait(30)
    rest = [pool.submit(audit.append, event(n)) for n in range(1, 5)]
    pool.shutdown(wait=True)
    assert leader.exception() is None  # its head was written before anyone read the forged line
    outcomes = [_outcome(f) for f in rest]
    assert all(isinstance(o, DataLoss) and o.reason == "AUDIT_LOG_TAMPERED" for o in outcomes)
    assert audit.batch_sizes == {1: 3, 4: 1}
    assert len(calls) == 1  # the tampered batch wrote nothing


def test_max_batch_one_commits_each_record_alone(
    log_path: Path, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_path.parent.mkdir()
    with AuditLog.open(log_path, signing_key, max_batch=1) as log:
        _, leader, rest = _batched(log, monkeypatch, [event(n) for n in range(1, 4)])
        assert all(f.exception() is None for f in [leader, *rest])
        assert log.batch_sizes == {1: 4}
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).records == 4


def _voluntary_switches() -> int:
    """How often the calling thread has slept so far (its kernel's count of voluntary context
    switches: each wait on a lock, the interpreter lock or I/O)."""
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/thread-self/status")


def test_a_queued_caller_is_woken_for_its_own_batch_not_for_each_commit_ahead(
    log_path: Path, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one record per batch, 16 callers queue behind a held commit and commit one by one.
    Each is woken when it is first in line (to commit) or its batch ended, never by a commit of
    others' records: how often a caller sleeps does not grow with its place in the queue. When
    every commit woke every waiter, the last in line slept again after each of the 15 commits
    ahead of it."""
    log_path.parent.mkdir()
    waiting = 16

    def append(log: AuditLog, e: AuditEvent) -> tuple[int, int]:
        before = _voluntary_switches()
        record = log.append(e)
        return record.seq, _voluntary_switches() - before

    with AuditLog.open(log_path, signing_key, max_batch=1) as log:
        followers = [event(n) for n in range(1, waiting + 1)]
        _, leader, rest = _batched(
            log, monkeypatch, followers, append=functools.partial(append, log)
        )
        assert leader.result().seq == 0
        assert log.batch_sizes == {1: waiting + 1}
    slept = [switches for _, switches in sorted(f.result() for f in rest)]
    # Each caller also sleeps for its own commit's syncs, its locks and the interpreter lock: a
    # few times, whatever its place. Woken by each commit ahead, the last four in line slept at
    # least 12 times more than the first four (measured: medians 45 against 13; now ~7 each).
    assert statistics.median(slept[-4:]) < statistics.median(slept[:4]) + waiting, slept
    assert verify_audit_log(log_path, public_key=signing_key.public_key()).records == waiting + 1


@pytest.mark.parametrize("bad", [0, MAX_BATCH_RECORDS + 1, True])
def test_max_batch_is_bounded_by_what_crash_repair_anchors(
    log_path: Path, signing_key: Ed25519PrivateKey, bad: int
) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        AuditLog.open(log_path, signing_key, max_batch=bad)


def test_on_written_runs_once_per_record_before_the_batch_is_written(
    audit: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace: list[str] = []
    gate = _Gate(audit, monkeypatch, 3)
    original = audit._write_records

    def write_records(data: bytes, hashes: list[str], *head: Any) -> None:
        trace.append(f"write {len(data.splitlines())}")
        original(data, hashes, *head)

    monkeypatch.setattr(audit, "_write_records", write_records)

    def hook(name: str) -> Callable[[], None]:
        def called() -> None:
            # The record is not on disk yet when its caller's work starts.
            assert name.encode() not in log_path.read_bytes()
            trace.append(name)

        return called

    with ThreadPoolExecutor(4) as pool:
        leader = pool.submit(audit.append, event(0, reason="LEADING"), on_written=hook("LEADING"))
        assert gate.entered.wait(30)
        names = ["FOLLOW_A", "FOLLOW_B", "FOLLOW_C"]
        rest = [pool.submit(audit.append, event(1, reason=n), on_written=hook(n)) for n in names]
    assert all(f.exception() is None for f in [leader, *rest])
    assert trace[:2] == ["LEADING", "write 1"]
    assert sorted(trace[2:5]) == names and trace[5:] == ["write 3"]


def test_a_raising_on_written_hook_fails_nobody(
    audit: AuditLog,
    log_path: Path,
    signing_key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> None:
        raise RuntimeError("bug in a caller's hook")

    record = audit.append(event(0), on_written=broken)
    assert record.seq == 0
    assert "on_written hook raised" in caplog.text
    result = verify_audit_log(log_path, public_key=signing_key.public_key())
    assert result.intact and result.records == 1


def test_on_written_is_not_called_when_nothing_is_written(audit: AuditLog) -> None:
    called: list[bool] = []
    with pytest.raises(InvalidArgument):
        audit.append(event(0, claims={"big": "x" * 70_000}), on_written=lambda: called.append(True))
    audit.close()
    with pytest.raises(AuditUnavailable):
        audit.append(event(1), on_written=lambda: called.append(True))
    assert called == []
