"""read_audit_records: the tests' and the demo's reader of a running broker's audit log."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom import files
from strongroom.dev.devstack import read_audit_records
from strongroom.keybroker import audit
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision, head_path
from strongroom.keybroker.audit_verify import verify_audit_log, verify_audit_paths
from strongroom.keybroker.errors import AuditUnavailable

from .test_audit_start import _without_file_mode_override


def test_a_read_waits_for_the_brokers_write_in_progress(tmp_path: Path) -> None:
    """Tests polling the log while the broker wrote it read it plainly, and one read racing a
    write saw the first part of its line (1,079 of 44,718 racing reads here): a JSONDecodeError
    failing the test. The reader waits for the exclusive flock the broker holds while it
    writes, and sees the line whole."""
    path = tmp_path / "audit.log"
    line = json.dumps({"action": "key_release", "decision": "denied", "pad": "x" * 1024}) + "\n"
    path.write_text("")
    read: list[list[dict[str, Any]]] = []
    failed: list[BaseException] = []

    def reader() -> None:
        try:
            read.append(read_audit_records(path))
        except BaseException as exc:  # the test's thread reports it
            failed.append(exc)

    with path.open("a") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # what the broker holds while it writes
        writer.write(line[:100])
        writer.flush()
        thread = threading.Thread(target=reader)
        thread.start()
        thread.join(0.5)  # a read that does not wait has read the half line by now
        writer.write(line[100:])
        writer.flush()
        fcntl.flock(writer.fileno(), fcntl.LOCK_UN)
    thread.join(30)
    assert failed == [] and read == [[json.loads(line)]]


def test_a_read_waits_for_a_held_lock_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader waited for the log's flock without end: a process holding it (the broker
    stuck in a commit, anything that can open the file) hung the test or the demo polling the
    log past its own timeouts. It waits as long as the broker's own readers do
    (LOG_LOCK_WAIT_SECONDS), then refuses, naming the log and the wait."""
    monkeypatch.setattr(audit, "LOG_LOCK_WAIT_SECONDS", 0.2)
    path = tmp_path / "audit.log"
    path.write_text(json.dumps({"decision": "denied"}) + "\n")
    outcome: list[BaseException | list[dict[str, Any]]] = []

    def reader() -> None:
        try:
            outcome.append(read_audit_records(path))
        except BaseException as exc:  # the test's thread reports it
            outcome.append(exc)

    with path.open("a") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(30)  # an unbounded read is still waiting when the join gives up
        alive = thread.is_alive()
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    thread.join(30)
    assert not alive, "the read waited for the held lock for 30 s"
    (error,) = outcome
    assert isinstance(error, AuditUnavailable), error
    assert error.message.startswith(f"the audit log {path} is locked by another process"), error
    assert "held for the 0.2 s waited" in error.message
    # Once the lock is free, the log reads.
    assert read_audit_records(path) == [{"decision": "denied"}]


class _NoSharedLocks:
    """``fcntl`` for :mod:`strongroom.files` on a file system that refuses shared locks
    (ENOLCK) but grants exclusive ones: the broker's commits lock, its readers cannot. With
    ``on`` (a file type, ``stat.S_IFDIR``), only on files of that type."""

    def __init__(self, on: int | None = None) -> None:
        self._on = on

    def __getattr__(self, name: str) -> Any:
        return getattr(fcntl, name)

    def flock(self, fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_SH and (
            self._on is None or stat.S_IFMT(os.fstat(fd).st_mode) == self._on
        ):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        fcntl.flock(fd, operation)


@pytest.mark.parametrize("reader", ["read_audit_records", "verify_audit_log"])
def test_a_read_whose_lock_fails_is_refused_not_made_unlocked(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """flock failing on the log (not held: refused) let the devstack's reader and audit verify's
    snapshot read without it, racing a commit that could lock (a half line, a log reported
    cut off). Both now stop with AUDIT_UNAVAILABLE naming the log and the error."""
    with AuditLog.open(log_path, key) as log:
        log.append(AuditEvent(decision=Decision.DENIED, reason="NONCE_INVALID"))
    monkeypatch.setattr(files, "fcntl", _NoSharedLocks())
    with pytest.raises(AuditUnavailable) as info:
        if reader == "read_audit_records":
            read_audit_records(log_path)
        else:
            verify_audit_log(log_path, public_key=key.public_key())
    assert f"cannot lock the audit log {log_path}: flock failed: " in info.value.message
    assert os.strerror(errno.ENOLCK) in info.value.message


@pytest.mark.parametrize("reader", ["verify_audit_log", "verify_audit_paths"])
@pytest.mark.parametrize("refused_on", ["log", "directory"])
def test_audit_verify_whose_lock_fails_on_the_log_or_its_directory_is_refused_alike(
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    reader: str,
    refused_on: str,
) -> None:
    """audit verify takes two shared locks: the log's, to read it between two commits, and the
    directory's, to wait out a rotation before it judges again a log that did not verify. flock
    failing on the log refused the check (AUDIT_UNAVAILABLE); failing on the directory, the wait
    was skipped and the verdict given as if no rotation could be under way. One rule for both
    now: AUDIT_UNAVAILABLE naming the file and the error, no verdict given."""
    with AuditLog.open(log_path, key) as log:
        log.append(AuditEvent(decision=Decision.DENIED, reason="NONCE_INVALID"))
    head_path(log_path).unlink()  # a log that does not verify: a rotation is waited out
    on = stat.S_IFDIR if refused_on == "directory" else stat.S_IFREG
    monkeypatch.setattr(files, "fcntl", _NoSharedLocks(on))
    with pytest.raises(AuditUnavailable) as info:
        if reader == "verify_audit_log":
            verify_audit_log(log_path, public_key=key.public_key())
        else:
            verify_audit_paths(
                [log_path.parent], public_key=key.public_key(), log_name=log_path.name
            )
    what = (
        f"the audit directory {log_path.parent}"
        if on == stat.S_IFDIR
        else f"the audit log {log_path}"
    )
    assert info.value.message == f"cannot lock {what}: flock failed: {os.strerror(errno.ENOLCK)}"
    monkeypatch.undo()
    verdict = verify_audit_log(log_path, public_key=key.public_key())
    assert (verdict.intact, verdict.problem) == (False, "HEAD_MISSING")


@pytest.mark.parametrize("reader", ["verify_audit_log", "verify_audit_paths"])
def test_audit_verify_that_cannot_open_the_log_s_directory_is_refused_not_judged(
    log_path: Path, key: Ed25519PrivateKey, reader: str
) -> None:
    """A log that does not verify is judged again after any rotation of its directory is waited
    out (its shared flock). A directory that could not be opened for that wait (here EACCES: it
    can be searched, so its files are read, not read itself) skipped the wait, and the verdict
    was given as if no rotation could be under way, where a directory whose flock fails is
    refused. Refused alike now: AUDIT_UNAVAILABLE naming the directory and the errno."""
    with AuditLog.open(log_path, key) as log:
        log.append(AuditEvent(decision=Decision.DENIED, reason="NONCE_INVALID"))
    head_path(log_path).unlink()  # a log that does not verify: a rotation is waited out
    outcome: list[object] = []

    def verify() -> None:
        _without_file_mode_override()  # the tests may run as root
        try:
            if reader == "verify_audit_log":
                outcome.append(verify_audit_log(log_path, public_key=key.public_key()))
            else:
                outcome.append(verify_audit_paths([log_path], public_key=key.public_key()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    log_path.parent.chmod(0o300)  # searchable and writable, not readable: cannot be opened
    try:
        thread = threading.Thread(target=verify)
        thread.start()
        thread.join()
    finally:
        log_path.parent.chmod(0o700)
    (error,) = outcome
    assert isinstance(error, AuditUnavailable), repr(error)
    assert error.message == (
        f"cannot open the audit directory {log_path.parent}: Permission denied (EACCES)"
    )
    verdict = verify_audit_log(log_path, public_key=key.public_key())
    assert (verdict.intact, verdict.problem) == (False, "HEAD_MISSING")
