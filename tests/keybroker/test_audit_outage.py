"""The lines a refused audit commit leaves in the broker's log: bounded, each failure's first in
full, and a closed log (the broker stopping) no operator's ERROR.

:class:`~strongroom.keybroker.audit_outage.OutageLines` is driven with a clock the test moves (no
waiting, no timing threshold); the closed log is a real one. The real broker on a real full disk
is :mod:`tests.e2e.test_audit_failure_lines`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker import audit_outage
from strongroom.keybroker.audit import AuditLog
from strongroom.keybroker.audit_outage import OutageLines
from strongroom.keybroker.errors import AuditUnavailable

from .test_audit import event, fill

_LOGGER = "strongroom.keybroker.audit"
FULL = AuditUnavailable("cannot write the audit log /srv/audit.log: No space left (ENOSPC)")
LOCKED = AuditUnavailable("the audit log /srv/audit.log is locked by another process")


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    found = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == _LOGGER]
    caplog.clear()
    return found


def test_a_failure_is_logged_first_then_once_a_period_with_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    lines = OutageLines(logging.getLogger(_LOGGER), clock=lambda: now[0])
    caplog.set_level(logging.INFO, _LOGGER)
    for _ in range(50):
        lines.refused(FULL)
        now[0] += 0.5
    assert _lines(caplog) == [("ERROR", FULL.message)]
    now[0] = 100.0 + audit_outage.REPEAT_SECONDS
    lines.refused(FULL)
    assert _lines(caplog) == [
        (
            "ERROR",
            f"{FULL.message} (it refused 50 commits, this one included, since it was last "
            f"logged {audit_outage.REPEAT_SECONDS:.0f}s ago)",
        )
    ]
    lines.refused(FULL)
    lines.refused(FULL)
    assert _lines(caplog) == []
    # Another failure is logged at once, after the count of the one before it.
    lines.refused(LOCKED)
    assert _lines(caplog) == [
        (
            "ERROR",
            "the audit log's previous failure refused 2 more commits after its last line: "
            + FULL.message,
        ),
        ("ERROR", LOCKED.message),
    ]
    lines.refused(LOCKED)
    lines.committed()
    assert _lines(caplog) == [
        ("INFO", "the audit log commits again (1 refused commits not logged one by one)")
    ]
    lines.committed()
    # Over: the same failure again is a new one, logged at once.
    lines.refused(LOCKED)
    assert _lines(caplog) == [("ERROR", LOCKED.message)]


def test_records_after_the_log_closed_are_refused_with_one_warning_no_error(
    log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker stopping closes its log after its handlers drained; a handler left behind (or
    anything else still appending) was refused with an ERROR ``the audit log is closed`` per
    batch, an operator's alert for a shutdown. Still refused (AUDIT_UNAVAILABLE, the caller told
    the broker is stopping), logged once at WARNING."""
    log = AuditLog.open(log_path, key)
    fill(log, 2)
    log.close()
    caplog.set_level(logging.INFO, _LOGGER)
    errors: list[BaseException] = []

    def append() -> None:
        for n in range(5):
            try:
                log.append(event(n))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=append) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 20
    assert all(isinstance(exc, AuditUnavailable) for exc in errors), errors
    assert {exc.reason for exc in errors if isinstance(exc, AuditUnavailable)} == {
        "AUDIT_UNAVAILABLE"
    }
    assert {exc.public for exc in errors if isinstance(exc, AuditUnavailable)} == {
        "the key broker is stopping: its audit log takes no more records"
    }
    assert _lines(caplog) == [
        (
            "WARNING",
            "the audit log is closed: records still arriving are refused (not logged again)",
        )
    ]
