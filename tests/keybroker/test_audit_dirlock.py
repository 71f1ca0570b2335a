"""A process holding the audit directory's ``flock`` is waited for a bounded time, then refused.

Any process that can open the directory (read permission is enough for ``flock``) can take its
lock and keep it. The broker and ``audit verify`` took it blocking, so such a process hung the
broker's start, every rotation of a running broker (and with it every release queued behind that
commit) and ``audit verify`` for ever. Each test holds the lock from a real second process and
runs the operation under a generous wait of the test's own: on the old code it was still waiting
when that wait ran out. What they test is that the wait ends, and where it fails, not its
length: each shortens the product's bound (:func:`_short_dir_wait`), which its message then names.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.cli.main import run_command
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_verify as audit_verify_module
from strongroom.keybroker.audit import AuditLog, head_path
from strongroom.keybroker.audit_verify import AuditVerification, verify_audit_log
from strongroom.keybroker.errors import AuditUnavailable
from tests.test_files import _eventually, _queued

from .test_audit import event, fill
from .test_audit_cli import _run
from .test_audit_rotation import _CRASHES, RECORD, _rotated, _series

T = TypeVar("T")

# Generous: the product gives up after DIR_LOCK_WAIT_SECONDS; this only ends a test that hangs.
_TEST_WAIT_SECONDS = 60.0

# The product's bound in these tests (its default, 5 s, took each test that waited it out 5 s).
_SHORT_WAIT_SECONDS = 0.2


@pytest.fixture
def _short_dir_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory's bound shortened, for the broker and for audit verify (which imports it);
    not for the tests of the kernel's queue, whose requests must still be waiting when the
    holder lets go."""
    monkeypatch.setattr(audit_module, "DIR_LOCK_WAIT_SECONDS", _SHORT_WAIT_SECONDS)
    monkeypatch.setattr(audit_verify_module, "DIR_LOCK_WAIT_SECONDS", _SHORT_WAIT_SECONDS)


# Read-only, as a shipper with the audit volume mounted read-only opens the files: enough for
# either lock.
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, getattr(fcntl, sys.argv[2]))
print("held", flush=True)
sys.stdin.read()  # until the test closes it
"""


@contextmanager
def _held(path: Path, operation: str = "LOCK_EX") -> Iterator[None]:
    """Another process holds the ``flock`` of ``path`` (a directory or a file, opened read-only)
    for the block: exclusively, or shared with ``operation="LOCK_SH"``."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), operation],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.wait(timeout=_TEST_WAIT_SECONDS)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


def _within_test_wait(call: Callable[[], T]) -> T:
    """``call()``'s result (or what it raised), failing the test if it is still waiting after
    :data:`_TEST_WAIT_SECONDS` (the thread then ends once the holder is gone)."""
    outcome: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(_TEST_WAIT_SECONDS)
    assert not thread.is_alive(), f"still waiting for the lock after {_TEST_WAIT_SECONDS} s"
    if raised:
        raise raised[0]
    return outcome[0]


def _says_locked(message: str, directory: Path) -> None:
    """``message`` says that the directory was locked for all of the bound in force."""
    assert f"the audit directory {directory} is locked by another process" in message, message
    assert f"{_SHORT_WAIT_SECONDS:g} s" in message, message


@pytest.mark.usefixtures("_short_dir_wait")
def test_the_broker_does_not_start_while_another_process_holds_the_directory(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
    before = log_path.read_bytes(), head_path(log_path).read_bytes()
    with _held(log_path.parent), pytest.raises(AuditUnavailable) as refused:
        _within_test_wait(lambda: AuditLog.open(log_path, key))
    assert refused.value.reason == "AUDIT_UNAVAILABLE"
    _says_locked(refused.value.message, log_path.parent)
    assert (log_path.read_bytes(), head_path(log_path).read_bytes()) == before
    with AuditLog.open(log_path, key) as log:  # the holder gone, it starts
        assert log.append(event(2)).seq == 2


@pytest.mark.usefixtures("_short_dir_wait")
def test_a_rotation_refuses_its_batch_while_another_process_holds_the_directory(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The commit that must rotate first fails closed (its callers told AUDIT_UNAVAILABLE, as
    for a failed write, so the releases they were about to make are refused) instead of holding
    every release behind it; the next commit, the holder gone, rotates and goes on."""
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 3)
        with _held(log_path.parent), pytest.raises(AuditUnavailable) as refused:
            _within_test_wait(lambda: log.append(event(3)))
        _says_locked(refused.value.message, log_path.parent)
        assert log.count == 3 and log.tamper_problem is None
        assert log.append(event(3)).seq == 3  # nothing of the refused batch was written
        assert log.first_seq == 3
    series = _series(log_path, key)
    assert series.intact and (series.first_seq, series.end) == (0, 4), series.message


@pytest.mark.usefixtures("_short_dir_wait")
def test_audit_verify_gives_up_on_a_held_directory(
    log_path: Path, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log that does not verify is checked again once no rotation holds the directory: that
    wait is bounded too, and a check that could not be made is exit 1, not a verdict."""
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
    head_path(log_path).unlink()  # HEAD_MISSING: verify waits for the directory, then checks again
    capsys.readouterr()
    with _held(log_path.parent):
        code = _within_test_wait(
            lambda: run_command(lambda: _run("audit", "verify", str(log_path)))
        )
    err = capsys.readouterr().err
    assert code == 1 and "AUDIT_UNAVAILABLE" in err, (code, err)
    _says_locked(err, log_path.parent)
    assert run_command(lambda: _run("audit", "verify", str(log_path))) == 2  # the holder gone


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.usefixtures("_short_dir_wait")
@pytest.mark.parametrize("crash", list(_CRASHES))
def test_a_start_refused_by_the_lock_mid_rotation_changes_nothing_and_the_next_finishes(
    log_path: Path, key: Ed25519PrivateKey, crash: str
) -> None:
    """Each state a rotation can be left in (a crash after each of its steps): a start that
    cannot get the directory's lock gives up before any step of finishing it, so the files are
    as they were, and the next start finishes the rotation."""
    saved = _rotated(log_path, key, 3)
    _CRASHES[crash](log_path, saved)
    before = _files(log_path.parent)
    with _held(log_path.parent), pytest.raises(AuditUnavailable) as refused:
        _within_test_wait(lambda: AuditLog.open(log_path, key))
    assert "is locked by another process" in refused.value.message
    after = _files(log_path.parent)
    # The open creates an empty log where there was none (as any start does), nothing else.
    assert {n: b for n, b in after.items() if (n, b) != ("audit.log", b"")} == {
        n: b for n, b in before.items() if (n, b) != ("audit.log", b"")
    }
    with AuditLog.open(log_path, key) as log:
        assert log.append(event(3)).seq == 3
    series = _series(log_path, key)
    assert series.intact and (series.first_seq, series.end) == (0, 4), series.message


@pytest.mark.usefixtures("_short_dir_wait")
@pytest.mark.parametrize("failing", [1, 2])
def test_a_commit_refused_by_the_lock_after_a_failed_rotation_step_is_finished_by_the_next(
    log_path: Path, key: Ed25519PrivateKey, failing: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running broker's rotation fails at its log's rename (1) or its head's (2); the next
    commit, which would finish it, cannot get the directory's lock: it is refused and changes
    nothing; the one after that finishes the rotation and writes."""
    real_rename = os.rename
    calls: list[str] = []

    def rename(src: str, dst: str, **kwargs: int) -> None:
        calls.append(src)
        if len(calls) == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst, **kwargs)

    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 3)
        with monkeypatch.context() as patch:
            patch.setattr(audit_module.os, "rename", rename)
            with pytest.raises(AuditUnavailable):
                log.append(event(3))
        before = _files(log_path.parent)
        with _held(log_path.parent), pytest.raises(AuditUnavailable) as refused:
            _within_test_wait(lambda: log.append(event(3)))
        assert "is locked by another process" in refused.value.message
        assert _files(log_path.parent) == before
        assert log.append(event(3)).seq == 3 and log.first_seq == 3
    series = _series(log_path, key)
    assert series.intact and (series.first_seq, series.end) == (0, 4), series.message


def _queue_after(path: Path, waiting: int, operation: int = fcntl.LOCK_EX) -> int:
    """Once ``waiting`` requests wait for ``path``'s lock in the kernel, queues another one (a
    blocking ``flock`` of an open file of its own in a thread: another broker's rotation, say)
    and returns its descriptor; it gets the lock in turn and keeps it until the descriptor is
    closed (which also takes it out of the queue)."""
    assert _eventually(lambda: _queued(path) == waiting)
    fd = os.open(path, os.O_RDONLY)
    threading.Thread(target=fcntl.flock, args=(fd, operation), daemon=True).start()
    assert _eventually(lambda: _queued(path) == waiting + 1)
    return fd


def _in_thread(call: Callable[[], T]) -> tuple[threading.Thread, list[T | BaseException]]:
    """``call`` started in a thread of its own; the list gets its result or what it raised."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_rotation_waits_for_the_directory_in_the_kernels_queue(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The rotation's wait for the directory's lock is queued in the kernel: a blocking
    ``flock`` that queued after it (another broker's rotation) gets the lock after it, so the
    rotation is made as soon as the holder lets go. Polled with LOCK_NB it was in no queue: the
    later request took the lock first and, kept, the rotation's whole bound (it was refused).
    Shown by order, each request seen queued in /proc/locks before the next."""
    directory = log_path.parent
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
        with _held(directory):
            rotation, outcome = _in_thread(log.rotate)
            later = _queue_after(directory, 1)
        try:
            rotation.join(_TEST_WAIT_SECONDS)
            assert not rotation.is_alive()
            [sealed] = outcome
            assert isinstance(sealed, Path), sealed
            assert _queued(directory) == 0  # the later request has the lock now
        finally:
            os.close(later)
        assert log.append(event(2)).seq == 2


def test_audit_verify_waits_for_the_directory_in_the_kernels_queue(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """Likewise audit verify's wait for a rotation to end (a shared lock): a rotation that
    queued after it does not keep it waiting out its bound."""
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
    head_path(log_path).unlink()  # HEAD_MISSING: verify waits for the directory, then checks again
    directory = log_path.parent
    with _held(directory):
        check, outcome = _in_thread(lambda: verify_audit_log(log_path))
        later = _queue_after(directory, 1)
    try:
        check.join(_TEST_WAIT_SECONDS)
        assert not check.is_alive()
        [verdict] = outcome
        assert isinstance(verdict, AuditVerification), verdict
        assert not verdict.intact and verdict.problem == "HEAD_MISSING", verdict.message
    finally:
        os.close(later)
