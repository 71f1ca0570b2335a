"""Files: the one atomic write every component uses, and reading beside other processes.

A file written here is complete or absent after a crash (temporary file in the same directory,
fsync, rename, fsync of the directory), and never exists with wider permissions than asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason


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


@contextlib.contextmanager
def shared_flock(fd: int) -> Iterator[None]:
    """Holds a shared ``flock`` on ``fd`` for the block: a writer that takes it exclusively for
    each change is waited for, and waits, so the block reads between two changes. Where the file
    system has no ``flock`` (no such writer can work there), the block runs without it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        locked = False
    else:
        locked = True
    try:
        yield
    finally:
        if locked:
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
