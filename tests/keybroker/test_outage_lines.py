"""The lines a refused audit commit leaves in the broker's log: bounded, each failure's first in
full, and a closed log (the broker stopping) no operator's ERROR.

:class:`~strongroom.keybroker.outage_lines.OutageLines` is driven with a clock the test moves (no
waiting, no timing threshold); the closed log is a real one. The real broker on a real full disk
is :mod:`tests.e2e.test_audit_failure_lines`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker import outage_lines
from strongroom.keybroker.audit import AuditLog
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.keybroker.outage_lines import OutageLines

from .test_audit import event, fill

_LOGGER = "strongroom.keybroker.audit"
FULL = AuditUnavailable("cannot write the audit log /srv/audit.log: No space left (ENOSPC)")
LOCKED = AuditUnavailable("the audit log /srv/audit.log is locked by another process")


def _appended_past_the_cap(log: AuditLog, stop_after: int | None = None) -> int:
    """Appends up to 200 records to ``log`` (at a small size cap), or until it refused
    ``stop_after``; returns how many it refused."""
    refused = 0
    for n in range(200):
        try:
            log.append(event(n))
        except AuditUnavailable:
            refused += 1
            if refused == stop_after:
                break
    return refused


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
    now[0] = 100.0 + outage_lines.REPEAT_SECONDS
    lines.refused(FULL)
    assert _lines(caplog) == [
        (
            "ERROR",
            f"{FULL.message} (it refused 50 commits, this one included, since it was last "
            f"logged {outage_lines.REPEAT_SECONDS:.0f}s ago)",
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


def test_a_failure_s_count_is_said_when_the_log_closes_with_its_own_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Commits a failure refused after its last line were said only by a later line (the next
    failure's, the first commit after it, a refusal a period later): a broker stopped during an
    outage (to free the disk, say) never said how many decisions it refused since. And the count
    of a failure a new one follows carried the new one's reason: an alert on ``AUDIT_LOG_FULL``
    missed the full log's count, one on the other reason counted it."""
    full = AuditUnavailable("the audit log has reached its size cap", reason="AUDIT_LOG_FULL")
    lines = OutageLines(logging.getLogger(_LOGGER), clock=lambda: 100.0)
    caplog.set_level(logging.INFO, _LOGGER)
    for _ in range(3):
        lines.refused(full)
    lines.refused(LOCKED)
    counted = [r for r in caplog.records if r.getMessage().startswith("the audit log's previous")]
    assert [getattr(r, "reason", None) for r in counted] == ["AUDIT_LOG_FULL"]
    caplog.clear()
    lines.refused(LOCKED)
    lines.closing()
    lines.closing()  # said once
    assert [(r.levelname, r.getMessage(), getattr(r, "reason", None)) for r in caplog.records] == [
        (
            "ERROR",
            "the audit log closes: its failure refused 1 more commits after its last line: "
            + LOCKED.message,
            "AUDIT_UNAVAILABLE",
        )
    ]
    caplog.clear()
    lines = OutageLines(logging.getLogger(_LOGGER), clock=lambda: 100.0)
    lines.refused(LOCKED)
    lines.closing()  # nothing refused unsaid: no line
    assert _lines(caplog) == [("ERROR", LOCKED.message)]


def test_a_real_log_closed_during_an_outage_says_what_it_refused_unlogged(
    log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A real log at its size cap (AUDIT_LOG_FULL): the first refusal is logged, the rest are
    counted, and closing the log says the count."""
    log = AuditLog.open(log_path, key, max_bytes=8 * 1024)
    caplog.set_level(logging.INFO, _LOGGER)
    refused = _appended_past_the_cap(log)
    assert refused > 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "size cap" in errors[0]
    caplog.clear()
    log.close()
    assert _lines(caplog) == [
        (
            "ERROR",
            f"the audit log closes: its failure refused {refused - 1} more commits after its "
            f"last line: {errors[0]}",
        )
    ]


class _Timers:
    """A :data:`~strongroom.keybroker.outage_lines.Schedule` the test runs by hand: each timer
    armed, its delay, and whether it was cancelled."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, Callable[[], None], _Timer]] = []

    def __call__(self, delay: float, then: Callable[[], None]) -> _Timer:
        timer = _Timer()

        def run() -> None:
            timer.ran = True
            then()

        self.armed.append((delay, run, timer))
        return timer

    def live(self) -> list[tuple[float, Callable[[], None], _Timer]]:
        """The timers armed that neither ran nor were cancelled."""
        return [armed for armed in self.armed if not (armed[2].cancelled or armed[2].ran)]


class _Timer:
    def __init__(self) -> None:
        self.cancelled = False
        self.joined = False
        self.ran = False

    def cancel(self) -> None:
        self.cancelled = True

    def join(self, timeout: float | None = None) -> None:
        self.joined = True


def test_a_pending_count_is_said_by_a_timer_armed_only_while_it_is_pending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure's count waited for its next refusal, the first commit after it or the log's
    close: a broker whose callers stopped during an outage never said how many commits it had
    refused since its first line. A timer now says it a period after that line; it is armed
    only while a count is pending (none for a failure that refused one commit, none once the
    count is said), and the close cancels and waits for it, then says what is left itself."""
    now = [100.0]
    timers = _Timers()
    lines = OutageLines(logging.getLogger(_LOGGER), clock=lambda: now[0], schedule=timers)
    caplog.set_level(logging.INFO, _LOGGER)
    lines.refused(FULL)
    assert timers.armed == []  # nothing pending: no timer
    now[0] += 10
    for _ in range(3):
        lines.refused(FULL)
    assert _lines(caplog) == [("ERROR", FULL.message)]
    [(delay, due, _)] = timers.armed  # one timer for the three, a period after the line
    assert delay == outage_lines.REPEAT_SECONDS - 10
    now[0] = 100.0 + outage_lines.REPEAT_SECONDS
    due()
    assert [(r.levelname, r.getMessage(), getattr(r, "reason", None)) for r in caplog.records] == [
        (
            "ERROR",
            f"{FULL.message} (it refused 3 more commits since it was last logged "
            f"{outage_lines.REPEAT_SECONDS:.0f}s ago)",
            "AUDIT_UNAVAILABLE",
        )
    ]
    caplog.clear()
    assert len(timers.armed) == 1  # nothing pending: not armed again
    now[0] += 1
    lines.refused(FULL)  # within the period the timed line began: counted, a timer armed
    assert _lines(caplog) == []
    assert len(timers.live()) == 1
    assert timers.live()[0][0] == outage_lines.REPEAT_SECONDS - 1
    lines.closing()
    [(_, late, timer)] = timers.armed[1:]
    assert timer.cancelled and timer.joined
    late()  # a timer that ran despite its cancel: the close said the count, nothing more
    assert _lines(caplog) == [
        (
            "ERROR",
            "the audit log closes: its failure refused 1 more commits after its last line: "
            + FULL.message,
        )
    ]
    lines.refused(FULL)  # after the close: logged, not counted where nothing would say it
    assert len(_lines(caplog)) == 1
    assert timers.live() == []


def test_a_real_log_left_alone_during_an_outage_says_its_count_within_the_period(
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real log at its size cap refuses commits, then nothing more comes: the count reaches
    the log without a later refusal, commit or close (the period shortened to 0.2 s: the wait
    below is for the line, not a bound on the timer), and the timer's thread is gone after."""
    monkeypatch.setattr(outage_lines, "REPEAT_SECONDS", 0.2)
    # Logs of earlier tests left open may still have a count's timer armed: only this log's counts.
    before = {t for t in threading.enumerate() if t.name == "outage-count"}
    log = AuditLog.open(log_path, key, max_bytes=8 * 1024)
    caplog.set_level(logging.INFO, _LOGGER)
    refused = _appended_past_the_cap(log, stop_after=5)
    counted = f"(it refused {refused - 1} more commits since it was last logged"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(counted in m for _, m in _kept(caplog)):
        time.sleep(0.05)
    errors = [m for level, m in _kept(caplog) if level == "ERROR"]
    assert len(errors) == 2 and "size cap" in errors[0], errors
    assert errors[1] == f"{errors[0]} {counted} {errors[1].split('logged ')[1]}", errors
    caplog.clear()
    log.close()
    assert _lines(caplog) == []  # said already
    assert not {t for t in threading.enumerate() if t.name == "outage-count"} - before


def _kept(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == _LOGGER]


def test_a_failure_with_other_fields_is_not_counted_under_the_first_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A repeat was known by its message alone: a later failure with the same message but other
    # fields (another token's drop) was counted into the first one's tally and said in its count
    # line with the first one's fields, so a filter by field put it under the wrong one. Its
    # fields are the caller's mapping, kept as they were when it failed.
    now = [100.0]
    lines = OutageLines(logging.getLogger(_LOGGER), clock=lambda: now[0])
    caplog.set_level(logging.INFO, _LOGGER)
    first = {"token": "a"}
    lines.failed("drop", "HSM session dropped", level=logging.WARNING, fields=first)
    lines.failed("drop", "HSM session dropped", level=logging.WARNING, fields={"token": "a"})
    first["token"] = "changed after the call"
    lines.failed("drop", "HSM session dropped", level=logging.WARNING, fields={"token": "b"})
    lines.failed("drop", "HSM session dropped", level=logging.WARNING, fields={"token": "b"})
    lines.committed()
    said = [
        (r.getMessage(), getattr(r, "token", None)) for r in caplog.records if r.name == _LOGGER
    ]
    assert said == [
        ("HSM session dropped", "a"),
        ("HSM session dropped (1 more times after its last line)", "a"),
        ("HSM session dropped", "b"),
        ("HSM session dropped (1 more times after its last line)", "b"),
    ]
