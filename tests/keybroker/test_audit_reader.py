"""read_audit_records: the tests' and the demo's reader of a running broker's audit log."""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path
from typing import Any

from strongroom.dev.devstack import read_audit_records


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
