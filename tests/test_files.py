"""strongroom.files: atomic_write (complete or absent, never wider than asked, no debris),
BoundedFlock (a bounded wait for a flock that leaks neither the lock nor threads) and the message
for a lock another process held (lock_held)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from strongroom.attestation.collateral_cache import _lock_held
from strongroom.files import BoundedFlock, LockFailed, atomic_write, errno_name, shared_flock
from strongroom.keybroker.audit import directory_locked, log_locked


def test_creates_with_the_mode_asked_for(tmp_path) -> None:
    target = tmp_path / "sub" / "secret"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(tmp_path / "public", b"x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_replaces_and_fsyncs_file_and_directory(tmp_path, monkeypatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert synced == ["file", "dir"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def _nb(fd: int) -> bool:
    """Whether ``fd`` can take the exclusive lock at once (taken, then let go)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def new_waiters(before: set[threading.Thread]) -> set[threading.Thread]:
    """The BoundedFlock waiter threads alive now that were not in ``before`` (a snapshot of
    :func:`threading.enumerate`). The tests count these, not the process's threads: a thread an
    earlier test left behind (a stopped server's pool worker, a response watchdog) ends when it
    ends, and one ending within a test made an exact count off by one, failing it or passing it
    with a waiter still alive."""
    return {t for t in threading.enumerate() if t.name == "flock-waiter" and t not in before}


def _eventually(check, seconds: float = 60.0) -> bool:
    """Whether ``check()`` became true within a generous ``seconds`` (a thread's end)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_bounded_flock_hands_a_later_acquire_the_lock_its_waiter_got(tmp_path) -> None:
    """Two descriptors of one file (two open files: their flocks conflict, as two processes'
    do). A wait that ran out leaves its waiter queued; the next acquire takes the lock from it
    when the holder lets go (no second thread), and the waiter's thread ends."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    mine, holder = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        before = set(threading.enumerate())
        fcntl.flock(holder, fcntl.LOCK_SH)
        lock = BoundedFlock(mine, fcntl.LOCK_EX)
        assert lock.acquire(0.05) is False
        assert len(new_waiters(before)) == 1  # the waiter, still queued
        got: list[bool] = []
        later = threading.Thread(target=lambda: got.append(lock.acquire(60.0)))
        later.start()
        assert len(new_waiters(before)) == 1  # no second waiter
        fcntl.flock(holder, fcntl.LOCK_UN)
        later.join(60.0)
        assert got == [True]
        assert not _nb(holder)  # held through ``mine``
        assert _eventually(lambda: not new_waiters(before))
        fcntl.flock(mine, fcntl.LOCK_UN)
        assert _nb(holder)
        assert lock.acquire(0.0) is True  # uncontended: at once, no thread
        assert not new_waiters(before)
    finally:
        os.close(mine)
        os.close(holder)


def test_a_bounded_flocks_waiter_lets_go_when_nobody_waits_any_more(tmp_path) -> None:
    """The owner gave up and even closed its descriptor: the waiter, on its own descriptor of
    the same open file, gets the lock when the holder lets go and releases it at once."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    holder = os.open(path, os.O_RDONLY)
    try:
        before = set(threading.enumerate())
        fcntl.flock(holder, fcntl.LOCK_EX)
        mine = os.open(path, os.O_RDONLY)
        try:
            assert BoundedFlock(mine, fcntl.LOCK_SH).acquire(0.05) is False
        finally:
            os.close(mine)
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert _eventually(lambda: not new_waiters(before))
        assert _nb(holder)
    finally:
        os.close(holder)


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted


def test_a_bounded_flocks_waiter_lets_go_when_its_caller_was_interrupted(tmp_path) -> None:
    """A signal's handler raised in the waiting caller (SIGINT, say): the caller has left, so
    the lock its waiter gets later is let go at once, not kept for nobody."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    mine, holder = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        before = set(threading.enumerate())
        fcntl.flock(holder, fcntl.LOCK_EX)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_Interrupted):
            BoundedFlock(mine, fcntl.LOCK_EX).acquire(60.0)
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert _eventually(lambda: not new_waiters(before))
        assert _nb(holder)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(mine)
        os.close(holder)


def _queued(path) -> int:
    """How many ``flock`` requests wait for ``path``'s lock in the kernel (``/proc/locks``)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as locks:
        return sum(
            1 for line in locks if " -> FLOCK " in line and line.split()[6].endswith(f":{inode}")
        )


def test_a_bounded_flock_waits_in_the_kernels_queue(tmp_path) -> None:
    """A blocking ``flock`` made after the bounded wait began does not take the lock before it:
    the waiter holds its place in the kernel's queue, as a blocking ``flock`` would. A ``LOCK_NB``
    poll is in no queue: the other request got the lock when the holder let go and, kept, the
    poll's whole bound (what another broker's back-to-back commits do). Shown by order, not by
    time: each step waits for the kernel's queue to hold the request before the next."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    mine, holder, later = (os.open(path, os.O_RDONLY) for _ in range(3))
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        got: list[bool] = []
        first = threading.Thread(
            target=lambda: got.append(BoundedFlock(mine, fcntl.LOCK_EX).acquire(60.0))
        )
        first.start()
        assert _eventually(lambda: _queued(path) == 1)
        second = threading.Thread(target=lambda: fcntl.flock(later, fcntl.LOCK_EX))
        second.start()
        assert _eventually(lambda: _queued(path) == 2)
        fcntl.flock(holder, fcntl.LOCK_UN)
        first.join(60.0)
        assert got == [True]
        assert second.is_alive() and _queued(path) == 1  # still queued behind it
        fcntl.flock(mine, fcntl.LOCK_UN)
        second.join(60.0)
        assert not second.is_alive()
    finally:
        for fd in (mine, holder, later):
            os.close(fd)  # ``later``'s close lets go of its lock


def test_each_lock_held_message_is_the_one_sentence(tmp_path: Path) -> None:
    """The audit directory's, the audit log's and the collateral cache's "locked by another
    process" messages were spelt three times and had drifted apart (the directory's said
    "find the holder (fuser, lsof) and stop it", the others "with fuser -v or lsof on that
    file"): one helper builds them, and each keeps its file, its wait and its own holders."""
    tail = "find the holder with fuser -v or lsof on that path and stop it"
    assert directory_locked(tmp_path) == (
        f"the audit directory {tmp_path} is locked by another process: its flock was held for "
        "the 5 s waited (a rotation holds it for milliseconds, a start some 30 microseconds per "
        f"sealed file); {tail}"
    )
    log = tmp_path / "audit.log"
    assert log_locked(log, 10.0) == (
        f"the audit log {log} is locked by another process: its flock was held for the 10 s "
        f"waited (a commit holds it for milliseconds); {tail}"
    )
    lock = tmp_path / ".lock"
    assert _lock_held(lock, 0.5) == (
        f"the collateral cache's lock file {lock} is locked by another process: its flock was "
        f"held for the 0.5 s waited (a write holds it for well under that); {tail}"
    )


@pytest.mark.parametrize("seconds", [None, 1.0], ids=["blocking", "bounded"])
def test_a_shared_flock_that_flock_itself_refuses_fails_closed(
    tmp_path: Path, seconds: float | None
) -> None:
    """``flock`` failing on the descriptor (EBADF for one opened O_PATH, as ENOLCK or EINVAL
    where a file system lacks it) ran the block without the lock, and nobody was told: a
    reader then read what a writer whose own lock worked was changing. It is LockFailed now,
    the block not run."""
    path = tmp_path / "file"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    ran: list[bool] = []
    try:
        with (
            pytest.raises(LockFailed, match="flock failed: Bad file descriptor"),
            shared_flock(fd, seconds=seconds),
        ):
            ran.append(True)
    finally:
        os.close(fd)
    assert ran == []


@pytest.mark.parametrize(
    ("error", "name"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "EACCES"),
        (OSError(errno.EIO, "Input/output error"), "EIO"),
        (OSError(4095, "Unknown error 4095"), "EUNKNOWN"),  # no name on this system
        (OSError("no errno at all"), "EUNKNOWN"),
    ],
)
def test_errno_name_is_the_symbolic_name_or_eunknown(error: OSError, name: str) -> None:
    assert errno_name(error) == name
