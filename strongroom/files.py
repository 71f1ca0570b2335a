"""Files: the one atomic write every component uses, reading beside other processes, and
starting a file's writeback early.

A file written here is complete or absent after a crash (temporary file in the same directory,
fsync, rename, fsync of the directory), and never exists with wider permissions than asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # Linux only, and not in the os module: without it the final fsync writes everything, as
    # before. ctypes.CDLL(None) is the C library the interpreter itself runs on.
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
WRITEBACK_AVAILABLE = _SYNC_FILE_RANGE is not None
"""Whether :func:`start_writeback` can start a writeback here (Linux's ``sync_file_range``)."""


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Asks the kernel to start writing ``fd``'s dirty pages in [offset, offset+length) to disk,
    without waiting for them: a hint, the durability is still the caller's fsync. False where it
    is not available (not Linux, or a filesystem without it); OSError for an I/O error.
    """
    if _SYNC_FILE_RANGE is None or length <= 0:
        return False
    if _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code))


def errno_name(exc: OSError) -> str:
    """The symbolic name of ``exc``'s errno (``EACCES``), as every message and log line naming a
    failed system call shows it; ``EUNKNOWN`` when it has none or one this system does not name
    (each caller had its own copy of this, some falling back to ``?``)."""
    return errno.errorcode.get(exc.errno or 0, "EUNKNOWN")


def os_error_cause(exc: OSError) -> str:
    """A failed system call's cause as the messages naming its file say it: ``strerror
    (ERRNO)`` (the audit log's refusals, ``audit verify``'s, the command line's error line)."""
    return f"{exc.strerror or exc} ({errno_name(exc)})"


def fsync_dir(path: Path) -> None:
    """Makes the directory entries in ``path`` (a rename, a create, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotDurable(OSError):
    """:func:`atomic_write` replaced the file, but the directory's sync failed: every reader sees
    the new content now, which may not survive a crash of the host. An ``OSError`` like any
    other failure of the write, for callers that need not tell the two apart."""


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o600,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Replaces ``path`` with ``data`` atomically and durably, the file created with ``mode``.

    ``before_replace`` runs once the new file is durable, just before it replaces ``path``:
    whatever it raises leaves ``path`` as it was (a last check of a lock, made as late as it can
    be so that nothing slow comes between it and the rename). A failure after the rename (the
    directory's sync) is :class:`NotDurable`: ``path`` holds ``data`` then."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        # The rename was made: a caller that must know whether its change took effect (an
        # audited one) cannot find out by reading the file back from a disk that failed so.
        raise NotDurable(exc.errno, exc.strerror) from exc


def read_file(path: Path) -> bytes:
    """The bytes of a file an operator named; InvalidArgument(FILE_UNREADABLE) naming it if it
    cannot be read (missing, a directory, permissions, I/O)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read {path}: {exc.strerror or type(exc).__name__}",
            reason=Reason.FILE_UNREADABLE,
        ) from None


def lock_held(what: str, waited: float, holders: str) -> str:
    """Why a lock could not be had: another process held the ``flock`` of ``what`` (a sentence's
    subject naming its file) for all the ``waited`` seconds; ``holders`` says how long its own
    users hold it, so that a reader sees the wait was not the problem."""
    return (
        f"{what} is locked by another process: its flock was held for the {waited:g} s waited "
        f"({holders}); find the holder with fuser -v or lsof on that path and stop it"
    )


class LockHeld(Exception):
    """Another process held a lock for all of the time :func:`shared_flock` was allowed to wait."""


class LockFailed(Exception):
    """``flock`` itself failed on the file (a file system without it, the kernel out of locks,
    a descriptor it cannot lock): :func:`shared_flock` did not run its block."""


@contextlib.contextmanager
def shared_flock(fd: int, *, seconds: float | None = None) -> Iterator[None]:
    """Holds a shared ``flock`` on ``fd`` for the block: a writer that takes it exclusively for
    each change is waited for, and waits, so the block reads between two changes. When ``flock``
    itself fails, :class:`LockFailed` is raised and the block does not run: it ran without the
    lock, reading what a writer might be changing (a writer whose own lock worked, as on a file
    system where only some locks fail, ENOLCK), and nobody was told.

    With ``seconds``, other holders are waited for at most that long (:class:`BoundedFlock`),
    then :class:`LockHeld` is raised: any process that can open the file can hold it for ever."""
    try:
        if seconds is None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        elif not BoundedFlock(fd, fcntl.LOCK_SH).acquire(seconds):
            raise LockHeld(f"held by another process for the {seconds:g} s waited")
    except OSError as exc:
        raise LockFailed(f"flock failed: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)


def flock_within(fd: int, operation: int, seconds: float) -> bool:
    """Takes ``flock(fd, operation)`` (``LOCK_EX`` or ``LOCK_SH``), waiting at most ``seconds``
    for other holders to let go; False when they held it all that time. Polled with ``LOCK_NB``:
    a blocking ``flock`` waits for ever, and any process that can open the file (read permission
    is enough) can hold its lock for ever. Other errors (no ``flock`` on that file system) are
    raised."""
    deadline = time.monotonic() + seconds
    pause = 0.001  # doubling to 50 ms: a short hold costs little, a long one few wake-ups
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
        else:
            return True


#: The most waiter threads :class:`BoundedFlock` keeps in one process, each with a descriptor
#: of its own until the file's holder lets go. One per object, but a caller that opens the file
#: afresh for each try (``audit verify``'s snapshot, a broker following another's rotation) makes
#: a new object each time: without a cap, a holder that never lets go had them pile up, one per
#: refused try, to the process's descriptor limit. Past it the wait is polled (still bounded,
#: :func:`flock_within`): fair again once the holder lets go and the waiters end.
MAX_FLOCK_WAITERS = 16


class _WaiterSlots:
    """The waiters alive in this process, counted against :data:`MAX_FLOCK_WAITERS`."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._taken = 0

    def take(self) -> bool:
        """One more waiter may start (counted); False when the cap is reached."""
        with self._mutex:
            if self._taken >= MAX_FLOCK_WAITERS:
                return False
            self._taken += 1
            return True

    def give_back(self) -> None:
        """A waiter ended (or never started)."""
        with self._mutex:
            self._taken -= 1


_waiter_slots = _WaiterSlots()


class BoundedFlock:
    """``flock(fd, operation)`` waited for at most a given time, in the kernel's own queue.

    A blocking ``flock`` waits for ever, and any process that can open the file (read permission
    is enough) can hold its lock for ever. Polling with ``LOCK_NB`` (:func:`flock_within`) is
    bounded but unfair: a poller asleep between two tries loses the lock to every process that
    waits in ``flock`` itself and re-takes it as soon as it is let go, which is what several
    processes committing to one file do. So the blocking ``flock`` is made by a thread of its
    own (on a duplicate of ``fd``: the same open file, so the same lock), and the caller waits
    for that thread at most the time it allows. A waiter still waiting then goes on waiting,
    and whichever of these things comes first follows: the next :meth:`acquire` takes the lock
    from it when it gets it (no second thread, no second place in the queue); or, if nobody is
    waiting for it when it gets the lock, it lets go at once (no lock is kept by nobody). So
    there is at most one such thread per object, which ends when the holder lets go, and at most
    :data:`MAX_FLOCK_WAITERS` in the process (past that, or with no thread or descriptor to
    spare, the wait is polled).

    Uncontended, :meth:`acquire` is one ``LOCK_NB`` call: the thread is started only when the
    lock is held by someone else. One caller at a time (a caller holding the lock releases it
    with ``flock(fd, LOCK_UN)``, as usual); ``fd`` may be closed while a waiter waits.
    """

    def __init__(self, fd: int, operation: int) -> None:
        """Locks ``fd`` with ``operation`` (``LOCK_EX`` or ``LOCK_SH``)."""
        self._fd = fd
        self._operation = operation
        self._waiter: _FlockWaiter | None = None

    def acquire(self, seconds: float) -> bool:
        """Takes the lock, waiting at most ``seconds`` for other holders; False when they held it
        all that time (a waiter goes on waiting, see the class). Other errors (no ``flock`` on
        that file system) are raised."""
        deadline = time.monotonic() + seconds
        while True:
            waiter = self._waiter
            if waiter is None:
                try:
                    fcntl.flock(self._fd, self._operation | fcntl.LOCK_NB)
                except BlockingIOError:
                    waiter = _FlockWaiter.started(self._fd, self._operation)
                    if waiter is None:  # too many wait already (see MAX_FLOCK_WAITERS)
                        left = max(deadline - time.monotonic(), 0.0)
                        return flock_within(self._fd, self._operation, left)
                    self._waiter = waiter
                else:
                    return True
            outcome = waiter.take(deadline - time.monotonic())
            if outcome is None:
                return False
            self._waiter = None
            if outcome:
                return True
            # It got the lock while nobody waited for it, and let go: queue again.
            if time.monotonic() >= deadline:
                return False


class _FlockWaiter:
    """One blocking ``flock`` in a thread of its own, for :class:`BoundedFlock`."""

    @classmethod
    def started(cls, fd: int, operation: int) -> _FlockWaiter | None:
        """A waiter for ``flock(fd, operation)``, its thread started; None when
        :data:`MAX_FLOCK_WAITERS` already wait in this process or no thread can be started."""
        if not _waiter_slots.take():
            return None
        try:
            return cls(fd, operation)
        except (RuntimeError, OSError):  # no thread or descriptor to spare: poll, not fail
            _waiter_slots.give_back()
            return None
        except BaseException:
            _waiter_slots.give_back()
            raise

    def __init__(self, fd: int, operation: int) -> None:
        """Internal: use :meth:`started`, which counts it."""
        # Its own descriptor of the same open file: the owner may close ``fd`` meanwhile (and
        # the number be reused for another file) while this one still waits and then lets go.
        self._fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        self._operation = operation
        self._mutex = threading.Lock()
        self._done = threading.Event()
        self._wanted = True  # a caller of take() is waiting to be handed the lock
        self._handed = False
        self._error: OSError | None = None
        try:
            threading.Thread(target=self._run, name="flock-waiter", daemon=True).start()
        except BaseException:
            os.close(self._fd)
            raise

    def _run(self) -> None:
        try:
            try:
                fcntl.flock(self._fd, self._operation)
            except OSError as exc:
                error: OSError | None = exc
            else:
                error = None
            with self._mutex:
                self._error = error
                self._handed = error is None and self._wanted
                if error is None and not self._wanted:
                    with contextlib.suppress(OSError):
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                self._done.set()
            os.close(self._fd)  # the lock, if handed, stays with the open file
        finally:
            _waiter_slots.give_back()

    def take(self, seconds: float) -> bool | None:
        """Waits at most ``seconds``: True when the lock was handed over, False when it was got
        while nobody waited and let go again, None when it is still being waited for. Raises
        what the ``flock`` raised."""
        with self._mutex:
            if not self._done.is_set():
                self._wanted = True
        try:
            self._done.wait(max(seconds, 0.0))
        finally:
            # Also when a signal's handler raised in this thread: nobody waits any more, so a
            # lock got later is let go, not kept for a caller who has left.
            with self._mutex:
                waiting = not self._done.is_set()
                if waiting:
                    self._wanted = False
        if waiting:
            return None
        if self._error is not None:
            raise self._error
        return self._handed
