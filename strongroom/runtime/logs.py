"""Structured logging: one JSON object a line, or plain text for people.

Lines saying why a caller's RPC was refused (marked :data:`~strongroom.errors.REFUSAL_LINE`: the
authoriser's denial, the error mapping's ``rpc failed``, a limit's refusal, a service's own refusal,
a watchdog's cancelling of a call its caller stalled, which names that call with
:data:`~strongroom.errors.REFUSAL_CALL` since it runs on a thread of its own) are written within a
budget (:class:`RefusalLines`): any certificate of the CA, a role-less one
included, chose how many of them the service wrote, two or three per refused call. The budget is
per refused *call*, so that a call's lines are written all or none: each caller and reason has
:data:`REFUSED_CALLS_BURST` calls logged at once, then :data:`REFUSED_CALLS_PER_CALLER` a second,
each caller :data:`REASONS_PER_CALLER` reasons' worth of them over all its reasons, and all
callers together :data:`REFUSED_CALLS_PER_SECOND` a second (many identities buy no more lines).
The calls not logged are counted per caller and reason, and said in one WARNING
(``refused calls not logged``) at most every :data:`SUMMARY_SECONDS`, and when the log closes.
Only refusals are budgeted: a line about the service's own failure (an outage, a bug, stored data
that fails its check: :func:`~strongroom.errors.caused_by_caller`, marked ``False``) is written
every time, and so are its call's other lines. Only the service's log lines are budgeted: the key
broker's audit log is its own (every refused
release is recorded there, or counted by its own budget, whatever this one does).

No thread that logs waits for the log's destination (:class:`ServiceLog`): a line is written by
the thread that logs it only while nothing is queued and the destination takes it at once;
otherwise lines are queued, a bounded number and size, and written by one thread; past the bound
they are dropped and counted,
and the count written (``log lines dropped``) once the destination takes lines again. Refusal
lines take at most half of the queue, so that the service's other lines always have room.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from typing import Any

import grpc

from strongroom.errors import REFUSAL_CALL, REFUSAL_LINE
from strongroom.runtime.callers import caller_key
from strongroom.runtime.config import LoggingConfig
from strongroom.runtime.ratelimit import CallerBuckets

log = logging.getLogger(__name__)

REFUSED_CALLS_BURST = 5
"""Refused calls of one caller and reason whose lines are written at once, then
:data:`REFUSED_CALLS_PER_CALLER` a second."""
REFUSED_CALLS_PER_CALLER = 1.0
REASONS_PER_CALLER = 3
"""How many reasons' budgets one caller's refused calls of every reason have together
(:data:`REFUSED_CALLS_BURST` times as many at once, then as many a second): a caller cycling
through four reasons spent everyone's :data:`REFUSED_CALLS_PER_SECOND` at once, and through
twenty all of it for good, and every other caller's first refusals went unwritten."""
REFUSED_CALLS_PER_SECOND = 20
"""Refused calls whose lines are written a second, all callers and reasons together (a call writes
three lines at most): a holder of many certificates buys no more."""
SUMMARY_SECONDS = 10.0
"""How often, at most, the calls not logged are said (``refused calls not logged``)."""
SUMMARY_ENTRIES = 10
"""Callers and reasons a summary names one by one (the most refused first); the rest are summed."""
_MAX_COUNTED = 1024  # callers and reasons counted between two summaries; the rest as one
LOG_QUEUE_LINES = 4096
"""Lines waiting to be written (a few hundred bytes each) before further ones are dropped, and
counted: what the service's log holds while its destination is slow."""
LOG_QUEUE_BYTES = 16 << 20
"""Bytes of lines waiting to be written before further ones are dropped, and counted. Callers
choose much of what a line says (a method name of up to 16 KiB, which a denied call's lines carry
two or three times over, a request's text in an error): bounded by lines only, the queue of a
service whose destination stalled held 4,096 such lines, hundreds of MiB."""
FLUSH_SECONDS = 5.0
"""How long a flush and the handler's close wait, together, for the queued lines to be written:
one budget, which a wait that ran out leaves spent until the queue has been written
(``logging.shutdown`` flushes, then closes: each waited its own 5 s, and the close's wait for
the writer thread 5 s more, 15 s for a destination that takes nothing)."""


class _RpcLog:
    """The RPC running on this thread, for its refusal lines: who called (found on its first
    line) and whether its lines are written (decided by its first line)."""

    __slots__ = ("context", "verdict")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.verdict: bool | None = None


_RPC: ContextVar[_RpcLog | None] = ContextVar("strongroom_rpc_log", default=None)


def enter_rpc(context: grpc.ServicerContext) -> Token[_RpcLog | None]:
    """Marks the RPC of ``context`` as the one this thread's refusal lines are about (the error
    mapping does, around each call); :func:`leave_rpc` with the token when it ends."""
    return _RPC.set(_RpcLog(context))


def leave_rpc(token: Token[_RpcLog | None]) -> None:
    """Ends what :func:`enter_rpc` began."""
    _RPC.reset(token)


class RefusalLines(logging.Filter):
    """Lets through every line but refusal lines (:data:`~strongroom.errors.REFUSAL_LINE`), which
    are written within the budget the module describes, keyed on the RPC's caller (its verified
    SPIFFE ID: :func:`~strongroom.runtime.callers.caller_key`) and the line's ``reason``; the rest
    are counted and said in one WARNING per :data:`SUMMARY_SECONDS`. ``clock`` paces the budget."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        # The token buckets the key broker's audit budget and attestation limits use: one per
        # caller and reason, and one for everyone (key "").
        self._each = CallerBuckets(REFUSED_CALLS_PER_CALLER, REFUSED_CALLS_BURST, clock=clock)
        self._caller = CallerBuckets(  # and one per caller, every reason together
            REASONS_PER_CALLER * REFUSED_CALLS_PER_CALLER,
            REASONS_PER_CALLER * REFUSED_CALLS_BURST,
            clock=clock,
        )
        self._all = CallerBuckets(REFUSED_CALLS_PER_SECOND, REFUSED_CALLS_PER_SECOND, clock=clock)
        self._lock = threading.Lock()
        # The verdicts of lines logged away from their call's thread (REFUSAL_CALL: a watchdog's),
        # for that call's own later lines (all or none); gone with the call.
        self._away: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._counted: Counter[tuple[str, str]] = Counter()
        self._since = time.monotonic()
        self._timer: threading.Timer | None = None
        self._closed = False

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is written (a refusal line not written is counted)."""
        marked = getattr(record, REFUSAL_LINE, None)
        if marked is None:
            return True
        rpc = _RPC.get()
        # The call the line is about: the one running on this thread, else the one it names
        # (a watchdog's line about the call it cancels).
        call = rpc.context if rpc is not None else getattr(record, REFUSAL_CALL, None)
        if rpc is not None and rpc.verdict is None:
            rpc.verdict = self._verdict_away(call)  # a watchdog's line about it came first
        if rpc is not None and rpc.verdict is not None:
            return rpc.verdict  # the call's other lines go with its first
        if rpc is None and call is not None:
            earlier = self._verdict_away(call)
            if earlier is not None:
                return earlier
        if not marked:  # the service's own failure: this call's lines are all written
            if rpc is not None:
                rpc.verdict = True
            return True
        caller = "-"
        if call is not None:
            try:
                caller = caller_key(call)
            except Exception:  # a line is written or counted, never an error at its call site
                caller = "(unidentified)"
        reason = str(getattr(record, "reason", "") or "")
        key = f"{caller} {reason}"  # a space is in neither a SPIFFE ID nor a reason code
        # A caller past its own budget (of this reason, or of all) spends none of everyone's.
        verdict = self._take(key, caller)
        if rpc is not None:
            rpc.verdict = verdict
        elif call is not None:
            with self._lock, contextlib.suppress(TypeError):  # TypeError: no weak reference
                self._away[call] = verdict
        if not verdict:
            self._count(caller, reason)
        return verdict

    def _verdict_away(self, call: Any) -> bool | None:
        """The verdict of an earlier line about ``call`` logged away from its thread, if any."""
        if call is None:
            return None
        with self._lock:
            try:
                return self._away.get(call)
            except TypeError:  # a call that cannot be weakly referenced was never remembered
                return None

    def _take(self, key: str, caller: str) -> bool:
        if not (self._each.available(key) and self._caller.available(caller)):
            return False
        if not self._all.take(""):
            return False
        if not self._each.take(key):  # another thread took its last token
            self._all.refund("")
            return False
        if not self._caller.take(caller):
            self._each.refund(key)
            self._all.refund("")
            return False
        return True

    def _count(self, caller: str, reason: str) -> None:
        with self._lock:
            key = (caller, reason)
            if key not in self._counted and len(self._counted) >= _MAX_COUNTED:
                key = ("(others)", "")
            self._counted[key] += 1
            if self._timer is None and not self._closed:
                wait = max(0.0, self._since + SUMMARY_SECONDS - time.monotonic())
                timer = threading.Timer(wait, self.summarise)
                timer.daemon = True
                timer.name = "refusal-log-summary"
                # No thread to be had: the next refusal not logged tries again (the count stays).
                with contextlib.suppress(RuntimeError):
                    timer.start()
                    self._timer = timer

    def summarise(self) -> None:
        """Says the refused calls not logged since the last summary, if any (one WARNING)."""
        with self._lock:
            counted, self._counted = self._counted, Counter()
            now = time.monotonic()
            seconds, self._since = now - self._since, now
            if self._timer is not None:
                self._timer.cancel()  # nothing once it runs (this may be it)
                self._timer = None
        if not counted:
            return
        named = counted.most_common(SUMMARY_ENTRIES)
        log.warning(
            "refused calls not logged",
            extra={
                "calls": sum(counted.values()),
                "seconds": round(seconds, 1),
                "by_caller_and_reason": [[c, r, n] for (c, r), n in named],
                "others": sum(counted.values()) - sum(n for _, n in named),
            },
        )

    def close(self) -> None:
        """Says what is still counted; no summary is timed after this."""
        with self._lock:
            self._closed = True
        self.summarise()


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON with its ``extra`` fields and the active trace id, if any."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = _current_trace_id()
        if trace_id:
            out["trace_id"] = trace_id
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _fields(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The record's own fields (its ``extra``), but those whose name starts with ``_``."""
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            yield key, value


class TextFormatter(logging.Formatter):
    """Formats a record as one line for people: time, level, service, logger and message, with
    every non-printable character of the message shown as its escape, then each of its fields as
    ``name=<JSON>`` (the message alone said nothing of them: not how many refused calls a
    summary counted, nor why a call failed). Callers choose text lines carry (an RPC's method
    name reaches the authoriser's ``denied RPC`` with any character in it): written as it came,
    a newline forged a line of its own and an escape sequence drove the reader's terminal. A
    traceback (``exc_info``) keeps its lines, after the message."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line but a traceback: its message escaped, then its fields (see the class)."""
        record.message = _printable(record.message)
        line = super().formatMessage(record)
        fields = [f"{key}={json.dumps(value, default=str)}" for key, value in _fields(record)]
        return " ".join([line, *fields])


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _current_trace_id() -> str | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


# Libraries that log credentials at DEBUG: botocore writes each request's Authorization header
# (the S3 access key id and the request's signature), its string to sign and, with temporary
# credentials, the session token; urllib3 and s3transfer log the requests around it. They stay
# at INFO whatever the service's level, so DEBUG can be turned on in production without leaking.
QUIET_LIBRARIES = ("boto3", "botocore", "s3transfer", "urllib3")


class ServiceLog(logging.Handler):
    """The service's log handler: lines go to ``stream`` through a bounded queue that one thread
    (``log-writer``) writes, refusal lines within their budget (:attr:`refusals`).

    A line was written on the thread that logged it: with stderr to a collector that stopped
    reading (a full pipe), a refused call's line blocked its request worker for good, and every
    thread that logged after it queued on the handler's lock behind it. Now a line is formatted
    where it is logged (its trace id, its arguments as they are then) and written there only if
    nothing is queued and the destination takes it without waiting (a process that dies right
    after logging, with no exit handler run, has written it); else it is queued; past
    :data:`LOG_QUEUE_LINES` lines or :data:`LOG_QUEUE_BYTES` waiting, it is dropped and counted,
    and the count is written (``log lines dropped``, with ``lines``) before the next line that
    is. Refusal lines (:data:`~strongroom.errors.REFUSAL_LINE`) take at most half of either
    bound, so that refusals, however many callers send, never leave the service's other lines
    (an operator's change, a failure, the summary of refusals) no room. :meth:`flush` and
    :meth:`close` (``logging.shutdown`` at exit calls both) wait up to :data:`FLUSH_SECONDS`
    together for the queue to be written and the writer to end (``timer`` counts it)."""

    def __init__(
        self,
        stream: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.stream = stream
        self._timer = timer  # the flush's and close's budget (FLUSH_SECONDS)
        self.refusals = RefusalLines(clock=clock)
        self.addFilter(self.refusals)
        self.queue_lines = LOG_QUEUE_LINES
        self.queue_bytes = LOG_QUEUE_BYTES
        # Everything below is under _state (a re-entrant lock: a signal handler that logs runs on
        # the main thread, perhaps inside an emit of its own).
        self._state = threading.Condition(threading.RLock())
        self._lines: deque[tuple[str, int, bool]] = deque()  # line, its size, a refusal's
        self._pending = [0, 0]  # lines, bytes queued and not written yet
        self._refusals = [0, 0]  # of which refusal lines'
        self._dropped = 0  # lines dropped since the last count written
        self._stopping = False
        self._ended = False  # the writer has written its last line and returned
        # The end of a wait of flush or close (FLUSH_SECONDS) that ran out, kept until the queue
        # is written: the next wait, close's after logging.shutdown's flush, has what is left of
        # it (nothing), not a budget of its own.
        self._spent: float | None = None
        # Lines are written by the thread that logs them while nothing is queued and the
        # destination takes them at once: queued, a process that died right after logging (a
        # native library's crash, an abort: no exit handlers, and the dying thread held the
        # interpreter) lost its last lines, the ones that say what it was doing.
        self._fd = _file_descriptor(stream)
        self._poll = select.poll()
        if self._fd is not None:
            self._poll.register(self._fd, select.POLLOUT)
        self._direct = False  # a line being written by the thread that logged it
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """Filters and emits ``record`` as :class:`logging.Handler` does, but without the
        handler's lock around the emit: :meth:`emit` keeps its own order, and a line written
        where it is logged that waited after all (another writer of stderr filled the pipe
        between the poll and the write) then holds its own thread only, not every thread that
        logs."""
        verdict = bool(self.filter(record))
        if verdict:
            self.emit(record)
        return verdict

    def emit(self, record: logging.LogRecord) -> None:
        """Writes ``record``'s line now when nothing is queued and the destination takes it
        without waiting, else queues it, or counts it dropped when the queue (or, for a refusal
        line, its share) is full; never waits for a destination that is not ready."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        size = len(line) + 1  # with its newline; characters, bytes for a JSON line (ASCII)
        refusal = bool(getattr(record, REFUSAL_LINE, False))
        with self._state:
            if self._ended:
                self._write_after_close(line)
                return
            now = self._write_now(line)
            if now is None:
                if not self._fits(self._pending, 1, 1, size) or (
                    refusal and not self._fits(self._refusals, 2, 1, size)
                ):
                    self._dropped += 1
                    return
                self._lines.append((line, size, refusal))
                self._account(size, refusal, 1)
                self._state.notify_all()
                return
            self._direct = True  # the writer waits: lines stay in the order they were logged
        try:
            _write_all(now[0], now[1])
        except OSError:  # a closed or broken destination: nowhere to say it either
            with self._state:
                self._dropped += 1
        finally:
            with self._state:
                self._direct = False
                self._state.notify_all()

    def _write_now(self, line: str) -> tuple[int, bytes] | None:
        """The descriptor and bytes to write ``line`` with from the logging thread, or None to
        queue it: something is queued or being written (order), a count of dropped lines waits
        to be said, or the destination would make the write wait. A write of at most PIPE_BUF
        bytes to a pipe that polls writable has a free page for it, so it does not wait."""
        if self._fd is None or self._lines or self._direct or self._dropped or self._stopping:
            return None
        stream = self.stream
        if getattr(stream, "closed", False):
            return None  # its descriptor's number may be another file's by now
        data = (line + "\n").encode(
            getattr(stream, "encoding", None) or "utf-8",
            getattr(stream, "errors", None) or "backslashreplace",
        )
        if len(data) > select.PIPE_BUF:
            return None
        try:
            ready = self._poll.poll(0)
        except OSError:
            return None
        failed = select.POLLERR | select.POLLHUP | select.POLLNVAL
        if not any(events & select.POLLOUT and not events & failed for _, events in ready):
            return None  # not ready, or an error or hang-up the writer meets and counts
        return self._fd, data

    def _write_after_close(self, line: str) -> None:
        """Writes ``line``, logged once the writer has ended (an exit handler's, a daemon
        thread's after ``logging.shutdown``), where it is logged: queued, it was never written.
        A destination that would make the write wait gets nothing (nor does a closed one): the
        process is ending, and it would wait for good on a collector that stopped reading."""
        stream = self.stream
        if getattr(stream, "closed", False):
            return
        if self._fd is not None:
            try:
                ready = self._poll.poll(0)
            except OSError:
                return
            failed = select.POLLERR | select.POLLHUP | select.POLLNVAL
            if not any(events & select.POLLOUT and not events & failed for _, events in ready):
                return
        with contextlib.suppress(Exception):  # nowhere to say it either
            stream.write(line + "\n")
            stream.flush()

    def _fits(self, held: list[int], share: int, lines: int, size: int) -> bool:
        return (
            held[0] + lines <= self.queue_lines // share
            and held[1] + size <= self.queue_bytes // share
        )

    def _account(self, size: int, refusal: bool, sign: int) -> None:
        self._pending[0] += sign
        self._pending[1] += sign * size
        if refusal:
            self._refusals[0] += sign
            self._refusals[1] += sign * size

    def _write(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: not self._direct and (self._lines or self._stopping))
                if not self._lines:
                    break  # stopping, and everything queued is written
                # The line is still counted in the queue's bounds until it has been written.
                line, size, refusal = self._lines[0]
                dropped, self._dropped = self._dropped, 0
            try:
                if dropped:
                    self.stream.write(self._dropped_line(dropped) + "\n")
                self.stream.write(line + "\n")
                if len(self._lines) == 1:
                    self.stream.flush()
            except Exception:  # a closed or broken destination: nowhere to say it either
                with self._state:
                    self._dropped += 1
            finally:
                with self._state:
                    self._lines.popleft()
                    self._account(size, refusal, -1)
                    if not self._lines:
                        self._spent = None  # written: the next wait has its whole budget
                    self._state.notify_all()
        with self._state:  # closing: a count no later line carried
            dropped, self._dropped = self._dropped, 0
        if dropped:
            with contextlib.suppress(Exception):
                self.stream.write(self._dropped_line(dropped) + "\n")
                self.stream.flush()
        with self._state:
            self._ended = True
            self._state.notify_all()

    def _dropped_line(self, dropped: int) -> str:
        record = logging.LogRecord(
            __name__, logging.WARNING, __file__, 0, "log lines dropped", None, None
        )
        record.lines = dropped
        record.queue_lines = self.queue_lines
        record.queue_bytes = self.queue_bytes
        return self.format(record)

    def flush(self) -> None:
        """Waits, up to :data:`FLUSH_SECONDS` (what is left of it when an earlier wait ran out
        and the queue has not been written since), until every queued line is written."""
        with self._state:
            self._wait_until(self._written, self._budget())

    def close(self) -> None:
        """Queues the count of refused calls not logged yet, writes what is queued and ends the
        writer, waiting up to :data:`FLUSH_SECONDS` for both together (what is left of it after
        a flush that ran out: ``logging.shutdown`` flushes first)."""
        with self._state:
            deadline = self._budget()
        self.refusals.close()
        with self._state:
            self._wait_until(self._written, deadline)
            # The writer ends once the queue is written (or is left stuck, a daemon thread).
            self._stopping = True
            self._state.notify_all()
            self._wait_until(lambda: self._ended, deadline)
        super().close()

    def _written(self) -> bool:
        return self._pending[0] == 0 and not self._direct

    def _budget(self) -> float:
        """The end of the wait for the queue (call under ``_state``): the one a wait that ran
        out left while the queue has not been written since, else :data:`FLUSH_SECONDS` from
        now."""
        if self._spent is not None and not self._written():
            return self._spent
        return self._timer() + FLUSH_SECONDS

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Waits (under ``_state``) until ``done()`` or ``deadline`` (on the handler's timer)."""
        while not done():
            left = deadline - self._timer()
            if left <= 0:
                self._spent = deadline
                return False
            self._pause(left)
        return True

    def _pause(self, seconds: float) -> None:
        """Waits on ``_state`` (held) for a change, ``seconds`` at most."""
        self._state.wait(seconds)


def _file_descriptor(stream: Any) -> int | None:
    """``stream``'s file descriptor, or None (a buffer, a test's capture)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def configure_logging(
    config: LoggingConfig, service: str, *, clock: Callable[[], float] = time.monotonic
) -> ServiceLog:
    """Sends the root logger to stderr in the configured format and level (the libraries in
    :data:`QUIET_LIBRARIES` never below INFO), refusal lines within their budget (paced by
    ``clock``); returns the handler."""
    handler = ServiceLog(sys.stderr, clock=clock)
    if config.format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    quiet = max(logging.INFO, root.level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    return handler
