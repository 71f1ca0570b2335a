"""A key broker scenario run in a child process: its JSON outcome, and the broker's log lines.

The audit-failure tests run their broker in a child (a file-size limit, a held lock, module
constants set for the run must not reach the test process). :func:`outcome` runs such a script
and returns the JSON object it prints last; :class:`KeptLines`, installed by the script, keeps
the key broker's log lines as ``[level, message, detail]``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any, ClassVar

from tests.conftest import REPO


class KeptLines(logging.Handler):
    """Keeps every ``strongroom.keybroker`` line as ``[level, message, detail]`` (``lines``)."""

    lines: ClassVar[list[list[Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("strongroom.keybroker"):
            self.lines.append(
                [record.levelname, record.getMessage(), getattr(record, "detail", None)]
            )

    @classmethod
    def install(cls) -> type[KeptLines]:
        """Adds a handler to the root logger, at INFO; returns the class (its ``lines``)."""
        logging.getLogger().addHandler(cls())
        logging.getLogger().setLevel(logging.INFO)
        return cls


def outcome(script: str, *args: str, timeout: float) -> dict[str, Any]:
    """Runs ``script`` (``python -c``, in the repository) with ``args``; the JSON object it
    printed on its last line. Fails the test, with the child's stderr, if it did not exit 0."""
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return found
