"""read_audit_records: the tests' and the demo's reader of a running broker's audit log."""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from strongroom.dev.devstack import read_audit_records
from strongroom.keybroker import audit
from strongroom.keybroker.errors import AuditUnavailable


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
