"""Reading a running key broker's audit log from outside it: the demo and the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from strongroom.files import shared_flock


def read_audit_records(path: Path) -> list[dict[str, Any]]:
    """The records of the audit log at ``path``, read between two of the broker's writes.

    The broker writes each batch under an exclusive ``flock`` of the log; this reads under a
    shared one, which waits for it. A plain read racing a write saw the first part of a line
    (1,079 of 44,718 reads racing a writer of 1 KB lines), a JSONDecodeError in whatever polled
    the log, more often on a loaded machine."""
    with path.open("rb") as log, shared_flock(log.fileno()):
        data = log.read()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
