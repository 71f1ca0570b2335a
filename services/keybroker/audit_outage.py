"""The broker's log lines for its audit log's refused commits: one per failure, not one per batch.

A refused commit is the operator's only account of an audit outage, and its message names the
file and the errno. Logged once per refused batch, a full disk made one ERROR line per request:
every caller with a certificate, sending bad evidence, had a refusal record attempted and so a
line written at its pace. Now a failure is logged at ERROR when it is new (the first one, and at
once whenever the message changes: another file, another errno), then, while it repeats, at most
once per :data:`REPEAT_SECONDS` with the number of commits it refused since its last line; the
first commit that succeeds after it says (INFO) how many went unlogged. A commit refused because
the log was closed (the broker stopping) is not the operator's to fix: logged at WARNING, once.
Commits a failure refused after its last line are said when the log closes (:meth:`closing`), not
lost with a broker stopped during the outage; a count is logged with its own failure's ``reason``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from strongroom.keybroker.errors import AuditLogClosed, AuditUnavailable

REPEAT_SECONDS = 60.0
"""A failure that keeps refusing commits is logged again at most this often (with its count)."""


class OutageLines:
    """Logs the refusals of one audit log's commits to ``log``, bounded (see the module)."""

    def __init__(self, log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: str | None = None  # the message of the failure under way
        self._reason = ""  # and its reason, for the line that counts what it refused unlogged
        self._logged_at = 0.0
        self._unlogged = 0  # commits it refused since its last line
        self._closed_logged = False

    def refused(self, error: AuditUnavailable) -> None:
        """Logs ``error``, which refused a batch, unless it repeats one logged less than
        :data:`REPEAT_SECONDS` ago (then it is counted)."""
        if isinstance(error, AuditLogClosed):
            with self._lock:
                first, self._closed_logged = not self._closed_logged, True
            if first:
                self._log.warning(
                    "%s: records still arriving are refused (not logged again)",
                    error.message,
                    extra={"reason": error.reason},
                )
            return
        now = self._clock()
        with self._lock:
            previous, unlogged, since = self._failure, self._unlogged, now - self._logged_at
            previous_reason = self._reason
            if error.message == previous and since < REPEAT_SECONDS:
                self._unlogged += 1
                return
            self._failure, self._logged_at, self._unlogged = error.message, now, 0
            self._reason = error.reason
        extra = {"reason": error.reason}
        if error.message != previous:
            if previous is not None and unlogged:
                # What the failure before this one did since its last line is not lost.
                self._count_line(
                    "the audit log's previous failure", unlogged, previous, previous_reason
                )
            self._log.error("%s", error.message, extra=extra)
        else:
            self._log.error(
                "%s (it refused %d commits, this one included, since it was last logged %.0fs ago)",
                error.message,
                unlogged + 1,
                since,
                extra=extra,
            )

    def committed(self) -> None:
        """A commit succeeded: a failure under way is over (the next one is logged at once)."""
        if self._failure is None:  # the common case, read without the lock: a commit at a time
            return
        with self._lock:
            failure, unlogged, self._failure, self._unlogged = (
                self._failure,
                self._unlogged,
                None,
                0,
            )
        if failure is not None:
            self._log.info(
                "the audit log commits again (%d refused commits not logged one by one)",
                unlogged,
                extra={"failure": failure},
            )

    def closing(self) -> None:
        """The log closes: the commits the failure under way refused since its last line are
        said now (nothing would say them later: a broker stopped during an outage, to free the
        disk, said only its first line)."""
        with self._lock:  # a commit refused as the log closes may be logging (it is unlocked)
            failure, reason, unlogged, self._unlogged = (
                self._failure,
                self._reason,
                self._unlogged,
                0,
            )
        if failure is not None and unlogged:
            self._count_line("the audit log closes: its failure", unlogged, failure, reason)

    def _count_line(self, whose: str, unlogged: int, failure: str, reason: str) -> None:
        self._log.error(
            "%s refused %d more commits after its last line: %s",
            whose,
            unlogged,
            failure,
            extra={"reason": reason},
        )
