"""The key broker's log lines for its own failures that repeat: one per failure, then counted.

Its audit log's refused commits, the HSM's failed connections and dropped sessions, and the
stored policies that do not load, each at the pace of whoever's calls meet them, are written
once per failure (again when the failure changes) and their repeats counted, so that no caller
sets the rate of the broker's ERROR lines. The audit log's account came first:

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

A count does not wait for a later event: a timer, armed only while a count is pending (no thread
otherwise), says it :data:`REPEAT_SECONDS` after the failure's last line (a broker whose callers
stopped during an outage said it only at the next refusal, the next commit or its stop, maybe
never). What a refused commit then fails to undo (its records cut back off the log, its refusal
named in the head: :meth:`failed`) is accounted the same way, each kind on its own: it was an
ERROR per refused batch, at the pace of the callers whose records the batch held. So are the HSM's
failed connection attempts (:class:`~strongroom.keybroker.hsm.Hsm`), an ERROR per attempt before:
every ``reconnect_max_interval`` while callers kept asking, the module's paths in each; its dropped
sessions (at WARNING, :meth:`failed`'s ``level``), a WARNING per call of an HSM that connects but
fails its operations before; and the
stored release policies that do not read or load (:mod:`~strongroom.keybroker.policy_lines`), an
ERROR per release naming the key before, each ended on its own (:meth:`OutageLines.ended`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from strongroom.keybroker.errors import AuditLogClosed, AuditUnavailable

REPEAT_SECONDS = 60.0
"""A failure that keeps refusing commits is logged again at most this often (with its count)."""

_COMMIT = ""  # the tally of the refused commits themselves; the others are named by their kind


class Timer(Protocol):
    """What :class:`OutageLines` needs of a timer (:class:`threading.Timer` has it)."""

    def cancel(self) -> None:
        """Stops the timer if it has not run yet."""

    def join(self, timeout: float | None = None) -> None:
        """Waits for the timer's thread to end."""


Schedule = Callable[[float, Callable[[], None]], Timer | None]
"""Calls a function after a delay, in seconds (its timer), or None when it cannot."""


def threading_timer(delay: float, then: Callable[[], None]) -> Timer | None:
    """A daemon :class:`threading.Timer` calling ``then`` after ``delay`` seconds, started; None
    when no thread is to be had (the count then waits for the next event, as it did before)."""
    timer = threading.Timer(delay, then)
    timer.daemon = True
    timer.name = "outage-count"
    try:
        timer.start()
    except RuntimeError:
        return None
    return timer


@dataclass
class _Tally:
    """One failure under way: its message, its reason (None for a line that had none), when
    its last line was written and how many times it failed since."""

    message: str
    reason: str | None
    logged_at: float
    unlogged: int = 0
    level: int = logging.ERROR
    fields: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def repeated_by(self, message: str, fields: Mapping[str, object]) -> bool:
        """Whether a failure of ``message`` with ``fields`` is this one again (its count line
        says it with this one's fields)."""
        return self.message == message and self.fields == fields


class OutageLines:
    """Logs one owner's repeating failures to ``log``, bounded (see the module): an audit log's
    refused commits and what they could not undo, the HSM's failed connections and dropped
    sessions, the failing release policies; ``clock`` tells the time, ``schedule`` arms the timer
    that says a pending count."""

    def __init__(
        self,
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
        *,
        schedule: Schedule = threading_timer,
    ) -> None:
        self._log = log
        self._clock = clock
        self._schedule = schedule
        self._lock = threading.Lock()
        # The failures under way: the refused commits' (_COMMIT), and what each refusal could not
        # undo, by kind.
        self._tallies: dict[str, _Tally] = {}
        self._closed_logged = False
        self._closing = False
        self._timer: Timer | None = None
        self._armed = 0  # timers armed so far: the last one's number
        # Held while a timed count is said: the close waits for it, so no line follows its own.
        self._saying = threading.Lock()

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
        shown = self._tally(_COMMIT, error.message, error.reason)
        if shown is None:
            return
        previous, unlogged, since = shown
        if previous is None or previous.message != error.message:
            if previous is not None and previous.unlogged:
                # What the failure before this one did since its last line is not lost.
                self._count_line("the audit log's previous failure", previous)
            self._log.error("%s", error.message, extra={"reason": error.reason})
        else:
            self._log.error(
                "%s (it refused %d commits, this one included, since it was last logged %.0fs ago)",
                error.message,
                unlogged + 1,
                since,
                extra={"reason": error.reason},
            )

    def failed(
        self,
        kind: str,
        message: str,
        *,
        reason: str | None = None,
        level: int = logging.ERROR,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        """Logs at ``level`` (ERROR unless told) ``message`` (with ``reason``, if any, and the
        log record's ``fields``, e.g. the HSM's ``token``), what a refused commit could not undo
        (``kind``: a stable name of the step, e.g. ``cut back``) or another failure of the
        broker's own (the HSM's failed connection attempts: ``connect``; its dropped sessions:
        ``drop``, at WARNING), unless the same repeats one logged less than
        :data:`REPEAT_SECONDS` ago (then it is counted, and said as the refused commits are, at
        the same level, with the same fields; :meth:`committed` ends it). The same: its message
        and its fields (other fields, another token's, are another failure)."""
        shown = self._tally(kind, message, reason, level, fields or {})
        if shown is None:
            return
        previous, unlogged, since = shown
        same = previous is not None and previous.repeated_by(message, fields or {})
        if previous is not None and not same and previous.unlogged:
            self._times_line(previous)
        extra = _extra(reason, fields or {})
        if not same:
            self._log.log(level, "%s", message, extra=extra)
        else:
            self._log.log(
                level,
                "%s (%d times, this one included, since it was last logged %.0fs ago)",
                message,
                unlogged + 1,
                since,
                extra=extra,
            )

    def committed(self) -> None:
        """A commit succeeded (the HSM connected): a failure under way is over (the next one is
        logged at once)."""
        if not self._tallies:  # the common case, read without the lock: a commit at a time
            return
        with self._lock:
            tallies, self._tallies = self._tallies, {}
            self._disarm()
        commits = tallies.pop(_COMMIT, None)
        for tally in tallies.values():
            if tally.unlogged:
                self._times_line(tally)
        if commits is not None:
            self._log.info(
                "the audit log commits again (%d refused commits not logged one by one)",
                commits.unlogged,
                extra={"failure": commits.message},
            )

    def ended(self, kind: str) -> None:
        """The failure of ``kind`` alone is over (a key's release policy loads again): its
        repeats not yet said are said, and its next failure is logged at once; the others go
        on (:meth:`committed` ends them all)."""
        if kind not in self._tallies:  # the common case, read without the lock: nothing under way
            return
        with self._lock:
            tally = self._tallies.pop(kind, None)
            if not any(t.unlogged for t in self._tallies.values()):
                self._disarm()
        if tally is not None and tally.unlogged:
            self._times_line(tally)

    def closing(self) -> None:
        """The log closes: the commits the failure under way refused since its last line are
        said now (nothing would say them later: a broker stopped during an outage, to free the
        disk, said only its first line), and so is what their refusals could not undo; a timed
        count being said is waited for, and no timer runs after this."""
        with self._lock:  # a commit refused as the log closes may be logging (it is unlocked)
            self._closing = True
            timer = self._disarm()
        if timer is not None:  # never this thread: only the log's close closes
            timer.join()  # cancelled: ends at once, or once the count it is saying is said
        with self._saying:
            self._say(every=True)

    # --- internals ----------------------------------------------------------------------------

    def _tally(
        self,
        kind: str,
        message: str,
        reason: str | None,
        level: int = logging.ERROR,
        fields: Mapping[str, object] | None = None,
    ) -> tuple[_Tally | None, int, float] | None:
        """Counts one failure of ``kind``; None when it is only counted (a repeat within the
        period, the log not closing), else the tally it replaces (None: none), the count it
        had and the seconds since its last line, for the caller's line."""
        now = self._clock()
        with self._lock:
            previous = self._tallies.get(kind)
            since = 0.0 if previous is None else now - previous.logged_at
            if (
                previous is not None
                and previous.repeated_by(message, fields or {})
                and since < REPEAT_SECONDS
                and not self._closing  # nothing would say a count taken now
            ):
                previous.unlogged += 1
                self._arm(previous.logged_at + REPEAT_SECONDS - now)
                return None
            # A copy: the caller's mapping may change after the call, and the count line is said
            # later (the timer's thread) with the fields the failure had.
            self._tallies[kind] = _Tally(
                message, reason, now, level=level, fields=dict(fields or {})
            )
            unlogged = 0 if previous is None else previous.unlogged
            if not any(t.unlogged for t in self._tallies.values()):
                self._disarm()
        return previous, unlogged, since

    def _arm(self, delay: float) -> None:
        """Arms the timer (the lock held) unless it is armed: a count is pending."""
        if self._timer is None and not self._closing:
            self._armed += 1
            armed = self._armed
            self._timer = self._schedule(max(delay, 0.0), lambda: self._due(armed))

    def _disarm(self) -> Timer | None:
        """Cancels the timer (the lock held); returns it."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return timer

    def _due(self, armed: int) -> None:
        """The timer (the ``armed``-th): says the counts whose period is over, and arms it again
        for the rest."""
        with self._saying:
            with self._lock:
                if self._closing:
                    return  # the close says them
                if armed == self._armed:  # not one armed since (this one cancelled meanwhile)
                    self._timer = None
            self._say(every=False)

    def _say(self, *, every: bool) -> None:
        """Says the pending counts (those whose period is over, or ``every`` one), each taken
        and its period begun anew; arms the timer for those left."""
        now = self._clock()
        taken: list[tuple[str, _Tally]] = []  # each as it was: its count, its last line's time
        with self._lock:
            left: float | None = None
            for kind, tally in self._tallies.items():
                if not tally.unlogged:
                    continue
                wait = tally.logged_at + REPEAT_SECONDS - now
                if every or wait <= 0:
                    taken.append((kind, dataclasses.replace(tally)))
                    tally.unlogged, tally.logged_at = 0, now
                else:
                    left = wait if left is None else min(left, wait)
            if left is not None:
                self._arm(left)
        for kind, tally in taken:
            if kind != _COMMIT:
                self._times_line(tally)
            elif every:
                self._count_line("the audit log closes: its failure", tally)
            else:
                self._log.error(
                    "%s (it refused %d more commits since it was last logged %.0fs ago)",
                    tally.message,
                    tally.unlogged,
                    now - tally.logged_at,
                    extra={"reason": tally.reason},
                )

    def _count_line(self, whose: str, tally: _Tally) -> None:
        self._log.error(
            "%s refused %d more commits after its last line: %s",
            whose,
            tally.unlogged,
            tally.message,
            extra={"reason": tally.reason},
        )

    def _times_line(self, tally: _Tally) -> None:
        """A failure of a kind (:meth:`failed`), said again with how often since its line."""
        extra = _extra(tally.reason, tally.fields)
        self._log.log(
            tally.level,
            "%s (%d more times after its last line)",
            tally.message,
            tally.unlogged,
            extra=extra,
        )


def _extra(reason: str | None, fields: Mapping[str, object]) -> dict[str, object]:
    """A failure's log record fields: its own (the HSM's ``token``), and ``reason`` if any."""
    extra = dict(fields)
    if reason is not None:
        extra["reason"] = reason
    return extra
