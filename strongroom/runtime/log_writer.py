"""The service's log handler.

No thread that logs waits for the log's destination (:class:`ServiceLog`): a line is written by
the thread that logs it only while nothing is queued and the destination takes it at once;
otherwise lines are queued, a bounded number and size, and written by one thread; past the bound
they are dropped and counted, and the count written (``log lines dropped``) once the destination
takes lines again. Refusal lines (:mod:`~strongroom.runtime.log_refusals`) take at most half of
the queue, so that the service's other lines always have room.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from strongroom.errors import REFUSAL_LINE
from strongroom.runtime.log_refusals import LOGGER, RefusalLines

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


class _ThisThread(threading.local):
    """Whether the calling thread's lines always go through the queue (:func:`never_wait_here`)."""

    queued_only = False


_THIS_THREAD = _ThisThread()


def never_wait_here() -> None:
    """Has every line the calling thread logs from now on go through :class:`ServiceLog`'s
    queue, written by its ``log-writer`` thread (bounded: past it, dropped and counted), never
    written where it is logged: for a thread whose work must not wait for the log's destination
    (the ``signals`` thread, a stop's thread).

    A line written where it is logged is written only when the destination polls writable, but
    another writer of the same pipe (gRPC's C core writes to fd 2) can fill it between that poll
    and the write, which then waits until the pipe's reader reads: on the ``signals`` thread, a
    collector that stopped reading held the first SIGTERM's line, and so its stop, for good.
    A pipe the process may open again is written through a non-blocking description of its own
    (a line it refuses is queued), so this matters where it may not (a socket, a pipe of another
    user)."""
    _THIS_THREAD.queued_only = True


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
        # What those lines are written with: a pipe's own description of its own that does not
        # wait, so that a pipe another writer filled after the look refuses the line (queued
        # then) rather than holding the thread that logged until the reader reads.
        # Closed by close(), when no line is being written with it (its number may be another
        # file's at once); open, it keeps the pipe open for its reader.
        self._nowait = _non_blocking_twin(self._fd)
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
        self._send(line, refusal=bool(getattr(record, REFUSAL_LINE, False)), queue=True)

    def say(self, line: str) -> None:
        """Writes ``line``, which is no record of the log (the command line's last words,
        ``strongroom: error: ...``, on the log's destination), after every line logged before it:
        once the queue is written (:meth:`flush`, within what is left of
        :data:`FLUSH_SECONDS`, a budget the exit's flush then shares), if the destination takes
        it without waiting, else not at all (never queued, nor counted dropped): what it says,
        the log has said. Printed on ``sys.stderr``, it waited for a full pipe whose collector
        had stopped reading, and the process never ended."""
        self.flush()
        # A buffer (a test's capture) never makes its writer wait: queued, it follows the log.
        self._send(line, refusal=False, queue=self._fd is None)

    def _send(self, line: str, *, refusal: bool, queue: bool) -> None:
        """Writes ``line`` where it is logged when the destination takes it at once (see
        :meth:`emit`), else, with ``queue``, queues it; without, drops it."""
        size = len(line) + 1  # with its newline; characters, bytes for a JSON line (ASCII)
        with self._state:
            ended = self._ended
            now = None if ended else self._write_now(line)
            if not ended and now is None:
                if queue:
                    self._queue(line, size, refusal)
                return
            if not ended:
                self._direct = True  # the writer waits: lines stay in the order they were logged
        if now is None:  # the writer has ended
            # Without the handler's lock: a write that waited after all (another writer of the
            # destination filled it since the poll) holds this thread only.
            self._write_after_close(line)
            return
        try:
            _write_all(now[0], now[1])
        except BlockingIOError:
            # Another writer filled the pipe since the look (nothing written: a write of at
            # most PIPE_BUF bytes to a pipe is whole or refused): first in the queue, which the
            # writer has not taken from while this write was under way.
            if queue:
                with self._state:
                    self._queue(line, size, refusal, first=True)
        except OSError:  # a closed or broken destination: nowhere to say it either
            if queue:
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
        bytes to a pipe that polls writable has a free page for it, so it does not wait, unless
        another writer of the pipe fills it first: written through the pipe's non-blocking
        description of its own when it has one (refused, it is queued), and queued at once for a
        thread that must never wait for the destination (:func:`never_wait_here`)."""
        if (
            self._fd is None
            or _THIS_THREAD.queued_only
            or self._lines
            or self._direct
            or self._dropped
            or self._stopping
        ):
            return None
        stream = self.stream
        if getattr(stream, "closed", False):
            return None  # its descriptor's number may be another file's by now
        data = _encoded(stream, line + "\n")
        if len(data) > select.PIPE_BUF:
            return None
        try:
            ready = self._poll.poll(0)
        except OSError:
            return None
        failed = select.POLLERR | select.POLLHUP | select.POLLNVAL
        if not any(events & select.POLLOUT and not events & failed for _, events in ready):
            return None  # not ready, or an error or hang-up the writer meets and counts
        return (self._fd if self._nowait is None else self._nowait), data

    def _write_after_close(self, line: str) -> None:
        """Writes ``line``, logged once the writer has ended (an exit handler's, a daemon
        thread's after ``logging.shutdown``), where it is logged (queued, it was never written),
        if the destination takes it at once (:func:`write_at_once`): the process is ending, and
        it would wait for good on a collector that stopped reading."""
        write_at_once(self.stream, line)

    def _queue(self, line: str, size: int, refusal: bool, *, first: bool = False) -> None:
        """Queues ``line`` for the writer (call under ``_state``), at the front with ``first``,
        or counts it dropped when the queue (or, for a refusal line, its share) is full."""
        if not self._fits(self._pending, 1, 1, size) or (
            refusal and not self._fits(self._refusals, 2, 1, size)
        ):
            self._dropped += 1
            return
        if first:
            self._lines.appendleft((line, size, refusal))
        else:
            self._lines.append((line, size, refusal))
        self._account(size, refusal, 1)
        self._state.notify_all()

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
                text = f"{self._dropped_line(dropped)}\n{line}\n" if dropped else line + "\n"
                self._put(text, last=len(self._lines) == 1)
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
                self._put(self._dropped_line(dropped) + "\n", last=True)
        with self._state:
            self._ended = True
            self._state.notify_all()

    def _put(self, text: str, *, last: bool) -> None:
        """Writes ``text`` for the writer thread, to the destination's descriptor when it has one
        (``last``: nothing more is queued, a buffer is flushed).

        Through the stream, the thread waited for a destination that took nothing inside the
        stream's buffer (sys.stderr's, unless PYTHONUNBUFFERED) holding its lock: at exit the
        interpreter's own flush of stderr waited for that lock, and the process never ended
        (Python 3.11; later ones abort instead, "could not acquire lock ... at interpreter
        shutdown"). On the descriptor it waits in the system call, holding no lock."""
        stream = self.stream
        if self._fd is None:  # a buffer: it does not wait
            stream.write(text)
            if last:
                stream.flush()
            return
        if getattr(stream, "closed", False):  # its descriptor's number may be another file's
            raise ValueError("the log's destination is closed")
        _write_waiting(self._fd, _encoded(stream, text))

    def _dropped_line(self, dropped: int) -> str:
        record = logging.LogRecord(
            LOGGER, logging.WARNING, __file__, 0, "log lines dropped", None, None
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
            left = max(0.0, deadline - self._timer())
        # A timed summary on its way to the log is waited for (within the budget): it had taken
        # the counts, so the close found nothing to say, and the summary came after the end.
        self.refusals.close(left)
        with self._state:
            self._wait_until(self._written, deadline)
            # The writer ends once the queue is written (or is left stuck, a daemon thread).
            self._stopping = True
            self._state.notify_all()
            self._wait_until(lambda: self._ended, deadline)
            if self._nowait is not None and not self._direct:
                os.close(self._nowait)
                self._nowait = None
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


def write_at_once(stream: Any, line: str, *, cut_to_fit: bool = False) -> None:
    """Writes ``line`` and a newline to ``stream`` if it takes them without waiting, else
    nothing: for what a process says as it ends (a line logged after the log's close, the
    command line's ``strongroom: error:`` line), which waited for good on a full pipe whose
    collector had stopped reading, and the process never ended.

    A buffer (no descriptor: a test's capture) is written. A regular file never makes a write
    wait: written whatever its length. A terminal is a person's, not a collector that stopped
    reading: written whole, waiting as any program's output does (a line longer than PIPE_BUF
    was dropped, and with it the only word of why the command failed). Anything else must poll
    writable, which on a pipe means PIPE_BUF bytes fit: a longer line is dropped (its write
    waited for the rest), or with ``cut_to_fit`` (a line that is no log record, which no parser
    reads) cut to PIPE_BUF bytes, its middle left out; and a pipe is written through
    a non-blocking description of its own (:func:`_non_blocking_twin`), so that another writer
    filling it after the look (gRPC's C core writes to fd 2 too) refuses the line rather than
    holding the write. A closed or broken destination gets nothing either."""
    if getattr(stream, "closed", False):
        return  # its descriptor's number may be another file's by now
    fd = _file_descriptor(stream)
    if fd is None:
        with contextlib.suppress(Exception):  # nowhere to say it either
            stream.write(line + "\n")
            stream.flush()
        return
    data = _encoded(stream, line + "\n")
    with contextlib.suppress(OSError):  # BlockingIOError: filled after the look; EPIPE, EBADF
        if os.isatty(fd):
            _write_waiting(fd, data)
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            if len(data) > select.PIPE_BUF:
                if not cut_to_fit:
                    return
                data = _cut(stream, line, select.PIPE_BUF)
            if not _polls_writable(fd):
                return
            twin = _non_blocking_twin(fd)
            if twin is not None:
                try:
                    _write_all(twin, data)  # at most PIPE_BUF bytes to a pipe: whole or refused
                finally:
                    os.close(twin)
                return
        _write_all(fd, data)


def _cut(stream: Any, line: str, limit: int) -> bytes:
    """``line`` and its newline in ``stream``'s encoding, at most ``limit`` bytes: its middle
    left out, and said so, when longer (no character split). Both ends are kept: an error's
    reason comes first (``REASON: ...``) and a file's error last (``PATH: No such file``)."""
    data = _encoded(stream, line)
    room = limit - len(" ... (999999999999 bytes left out) ...\n")
    encoding = _encoding(stream)
    head = _encoded(stream, data[: room // 2].decode(encoding, "ignore"))
    tail = _encoded(stream, data[len(data) - (room - room // 2) :].decode(encoding, "ignore"))
    left_out = len(data) - len(head) - len(tail)
    return (
        head
        + _encoded(stream, f" ... ({left_out} bytes left out) ...")
        + tail
        + _encoded(stream, "\n")
    )


def _polls_writable(fd: int) -> bool:
    """Whether ``fd`` takes a write now (not an error or a hang-up, which the write meets)."""
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    failed = select.POLLERR | select.POLLHUP | select.POLLNVAL
    return any(events & select.POLLOUT and not events & failed for _, events in poll.poll(0))


def _file_descriptor(stream: Any) -> int | None:
    """``stream``'s file descriptor, or None (a buffer, a test's capture)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def _non_blocking_twin(fd: int | None) -> int | None:
    """A description of its own, non-blocking, of the pipe ``fd`` writes to, or None: not a
    pipe (a regular file never makes a write wait, and a description of its own would write at
    an offset of its own), or one this process may not open again (no ``/proc``, a pipe owned by
    another user; runc hands a container's stdio to its user). ``fd``'s own description is
    shared (gRPC's C core writes to it, and the pipe's other processes): made non-blocking, their
    writes to a full pipe would fail."""
    if fd is None:
        return None
    try:
        pipe = os.fstat(fd)
        if not stat.S_ISFIFO(pipe.st_mode):
            return None
        twin = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: a pipe whose reader has gone; EACCES, ENOENT
        return None
    opened = os.fstat(twin)
    if (opened.st_dev, opened.st_ino) != (pipe.st_dev, pipe.st_ino):  # fd 2 changed meanwhile
        os.close(twin)
        return None
    return twin


def _encoded(stream: Any, text: str) -> bytes:
    """``text`` in ``stream``'s encoding (with its error handler), as the stream would write it."""
    return text.encode(_encoding(stream), getattr(stream, "errors", None) or "backslashreplace")


def _encoding(stream: Any) -> str:
    return getattr(stream, "encoding", None) or "utf-8"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_waiting(fd: int, data: bytes) -> None:
    """Writes all of ``data`` to ``fd``, waiting as long as it takes: a write that took part of
    it goes on with the rest, and a non-blocking descriptor (one another process sharing the
    pipe set so) that is full is waited on until it takes more, rather than the line lost.
    Raises OSError when the destination fails (EPIPE: its reader has gone; the interpreter
    ignores SIGPIPE, so that is an error, not the process's death)."""
    view = memoryview(data)
    poll: select.poll | None = None
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            if poll is None:
                poll = select.poll()
                poll.register(fd, select.POLLOUT)
            poll.poll()  # POLLERR, POLLHUP: the next write raises what is wrong
