"""A running broker's audit refusals name the file, the call and the errno, as the start's do.

Before, a commit or a rotation that failed said ``the audit log cannot be read: Permission
denied``, ``cannot write the audit head: No space left on device``, ``cannot write the audit log:
...``, ``the audit log cannot be rotated: ...`` or ``cannot finish the audit log's rotation (the
next commit goes on with it): Permission denied``, and the cut-back's and the refusal's log lines
named no file and no errno: an operator could not tell which of the log, its head or a sealed file
failed, nor how. Each failure here is real: EACCES from a file's mode (the thread without its
file-mode override, :func:`~.test_audit_start._without_file_mode_override_in_thread`: the tests
may run as root), ENOSPC and EINVAL from ``/dev/full``, which a descriptor of the log or its head
points at once the commit has read the files back (the file-size limit's EFBIG is in
:mod:`.test_audit`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker.audit import AuditLog
from strongroom.keybroker.errors import AuditUnavailable

from .test_audit import event, fill
from .test_audit_rotation import RECORD, _series
from .test_audit_start import _without_file_mode_override_in_thread


@pytest.fixture
def dev_full() -> Iterator[int]:
    fd = os.open("/dev/full", os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def _pointed_at(target: int, fd: int) -> Callable[[], None]:
    """An ``on_written`` hook: the commit has read its files back and placed its records, and
    now writes through ``fd``, which from here on is the file ``target`` (``/dev/full``)."""

    def hook() -> None:
        os.dup2(target, fd, inheritable=False)

    return hook


def _refused_while_unreadable(log: AuditLog, by: str, unreadable: Path) -> str:
    """The message of the refusal of ``log``'s commit (or its ``rotate()``, ``by``) made by a
    thread without its file-mode override while the file ``unreadable`` is write-only (0200);
    the file is readable again (0600) afterwards, whatever happened."""
    unreadable.chmod(0o200)
    try:
        call = (lambda: log.append(event(3))) if by == "commit" else log.rotate
        error = _without_file_mode_override_in_thread(unreadable.parent, call)
    finally:
        unreadable.chmod(0o600)
    assert isinstance(error, AuditUnavailable), repr(error)
    assert error.reason == "AUDIT_UNAVAILABLE"
    return error.message


@pytest.mark.parametrize("by", ["commit", "rotate"])
def test_following_a_rotation_whose_sealed_head_cannot_be_read_names_it_and_the_errno(
    log_path: Path, key: Ed25519PrivateKey, by: str
) -> None:
    """Another process sharing the log rotated it; this one follows (its commit or its own
    rotation reads the files back first) and cannot read the sealed head of the file it wrote
    (write-only: EACCES). That said ``the audit log cannot be read: Permission denied`` (or
    ``the audit log cannot be rotated: ...``), naming no file and no errno. It names the head
    and the errno now; the commit is refused, and once the head is readable again this process
    follows the rotation, the chain intact."""
    directory = log_path.parent
    with AuditLog.open(log_path, key) as sibling, AuditLog.open(log_path, key) as log:
        fill(log, 3)
        assert sibling.rotate() == directory / "audit.log.0-2"
        head = directory / "audit.log.0-2.head"
        message = f"cannot read the audit file {head}: Permission denied (EACCES)"
        if by == "rotate":
            message = f"the audit log cannot be rotated: {message}"
        assert _refused_while_unreadable(log, by, head) == message
        assert log.append(event(3)).seq == 3
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


@pytest.mark.parametrize("by", ["commit", "rotate"])
def test_a_rotation_that_cannot_read_the_log_it_seals_names_it_and_the_errno(
    log_path: Path, key: Ed25519PrivateKey, by: str
) -> None:
    """A running broker's rotation seals the head, then checks the log it is about to rename
    (its first and last records), opening it by name: the log lost its read permission (EACCES).
    That said ``cannot finish the audit log's rotation (the next commit goes on with it):
    Permission denied``, naming no file and no errno. It names the log and the errno now, after
    the same words; the next commit, the log readable again, finishes the rotation."""
    directory = log_path.parent
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 3)
        assert _refused_while_unreadable(log, by, log_path) == (
            "cannot finish the audit log's rotation (the next commit goes on with it): cannot "
            f"read the audit file {log_path}: Permission denied (EACCES)"
        )
        assert log.append(event(3)).seq == 3
    assert sorted(os.listdir(directory)) == [
        "audit.log",
        "audit.log.0-2",
        "audit.log.0-2.head",
        "audit.log.head",
    ]
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


def test_a_rotation_that_cannot_list_the_directory_names_it_and_the_errno(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing of the directory (the new log's anchor looks for the latest sealed log) is a
    call on its descriptor, which names no file: its failure said ``...: Input/output error``,
    and a catch-all naming the file a call on a descriptor failed on would have named the log.
    It names the directory now. (EIO, which no mode makes: the one error a listing through a
    descriptor already open can meet.)"""
    real_listdir = os.listdir

    def failing_listdir(path: object) -> list[str]:
        if isinstance(path, int):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_listdir(path)  # type: ignore[arg-type]

    with AuditLog.open(log_path, key) as log:
        fill(log, 3)
        monkeypatch.setattr(os, "listdir", failing_listdir)
        with pytest.raises(AuditUnavailable) as info:
            log.rotate()
        monkeypatch.undo()
        assert info.value.message == (
            "cannot finish the audit log's rotation (the next commit goes on with it): cannot "
            f"list the audit directory {log_path.parent}: Input/output error (EIO)"
        )
        assert log.append(event(3)).seq == 3
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


# The file whose descriptor points at /dev/full: the refusal and the ERROR line it makes ({p}: the
# file's path). The head's: its write (ENOSPC) said ``cannot write the audit head: No space left on
# device``, and the refusal's own head generation, failing the same way, was logged as ``cannot
# record the refusal of audit records in the head (No space left on device)``. The log's: its
# write said ``cannot write the audit log: ...``, and the cut-back, failing too (EINVAL: no
# truncating a device), was logged as ``cannot cut failed audit records back off the log: Invalid
# argument``. None named the file or the errno. The ERROR lines keep their first words
# (_ALERTED): alerts match them.
_DEV_FULL: dict[str, tuple[Callable[[AuditLog], int | None], str, str]] = {
    "head": (
        lambda log: log._head._fd,
        "cannot write the audit head {p}: No space left on device (ENOSPC)",
        "cannot record the refusal of audit records in the head {p} (No space left on device "
        "(ENOSPC)): should their lines survive the cut-back, a restarted broker would anchor them",
    ),
    "log": (
        lambda log: log._fd,
        "cannot write the audit log {p}: No space left on device (ENOSPC)",
        "cannot cut failed audit records back off the log {p}: Invalid argument (EINVAL)",
    ),
}

# What the ERROR lines of a refused commit began with before they named their file (an operator's
# alert matches these words): naming the file and the errno must not change them.
_ALERTED = (
    "cannot cut failed audit records back off the log",
    "cannot record the refusal of audit records in the head",
    "cannot record the refusal of audit records in the head's other slot (",
)


@pytest.mark.parametrize("full", list(_DEV_FULL))
def test_a_file_that_cannot_be_written_names_it_and_the_errno(
    log_path: Path,
    key: Ed25519PrivateKey,
    dev_full: int,
    caplog: pytest.LogCaptureFixture,
    full: str,
) -> None:
    """A commit's write of the head or of the log fails (its descriptor is ``/dev/full``'s), and
    so does what the refusal then does to that file (see _DEV_FULL): the refusal and the ERROR
    line name the file and the errno now; the batch is cut back (or voided in the head), and the
    next commit, the descriptor the file's own again, goes on. The refusal itself is logged at
    ERROR too, once, last (a caller hears only its public words: no path)."""
    descriptor_of, message, line = _DEV_FULL[full]
    path = log_path if full == "log" else log_path.with_name("audit.log.head")
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
        fd = descriptor_of(log)
        assert fd is not None
        saved = os.dup(fd)
        try:
            with caplog.at_level(logging.ERROR), pytest.raises(AuditUnavailable) as info:
                log.append(event(2), on_written=_pointed_at(dev_full, fd))
        finally:
            os.dup2(saved, fd, inheritable=False)
            os.close(saved)
        assert info.value.reason == "AUDIT_UNAVAILABLE"
        assert info.value.message == message.format(p=path)
        assert info.value.public == (
            "the key broker cannot write its audit log (ENOSPC); its operator's log has the details"
        )
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert logged == [line.format(p=path), message.format(p=path)]
        assert logged[0].startswith(_ALERTED)
        assert log.append(event(2)).seq == 2
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 3), found.message


def _failing_on(call: str, path: Path) -> Callable[..., object]:
    """``os.<call>`` (``pread`` or ``fstat``) failing with EIO (which no mode makes) for a
    descriptor of the file ``path`` only: a call on a descriptor names no file, whichever file
    it was."""
    real = getattr(os, call)

    def failing(fd: int, *args: int) -> object:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, *args)

    return failing


@pytest.mark.parametrize("call", ["pread", "fstat"])
@pytest.mark.parametrize("unreadable", ["audit.log.0-2.head", "audit.log.3-4"])
def test_a_sealed_file_that_fails_a_call_on_its_descriptor_is_named(
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    unreadable: str,
    call: str,
) -> None:
    """Another process sharing the log rotated it twice; this one's commit follows (reading the
    sealed head of the file it wrote, then each later sealed log's records), and a call on that
    file's descriptor fails (EIO): a read, or the status the open checks (a regular file?)
    before anything is read. Such a call names no file, and the commit's catch-all takes it for
    one on the log's own descriptor: it named the log. It names the sealed file (the head, or
    the later log) now; once the call works again the commit follows, the chain intact."""
    directory = log_path.parent
    with AuditLog.open(log_path, key) as sibling, AuditLog.open(log_path, key) as log:
        fill(log, 3)
        assert sibling.rotate() == directory / "audit.log.0-2"
        sibling.append(event(3))
        sibling.append(event(4))
        assert sibling.rotate() == directory / "audit.log.3-4"
        monkeypatch.setattr(os, call, _failing_on(call, directory / unreadable))
        with pytest.raises(AuditUnavailable) as info:
            log.append(event(5))
        monkeypatch.undo()
        assert info.value.reason == "AUDIT_UNAVAILABLE"
        assert info.value.message == (
            f"cannot read the audit file {directory / unreadable}: Input/output error (EIO)"
        )
        assert log.append(event(5)).seq == 5
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 6), found.message


def test_the_refusal_its_heads_other_slot_cannot_take_is_logged_with_its_words_and_the_file(
    log_path: Path,
    key: Ed25519PrivateKey,
    dev_full: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new log's first commit fails (its descriptor is ``/dev/full``'s: ENOSPC, then EINVAL for
    the cut-back); the refusal's head is generation 1, written twice so that both slots name the
    refused batch, and the second write fails (ENOSPC, injected: the first went through the same
    descriptor). Its ERROR line said ``cannot record the refusal of audit records in the head's
    other slot (No space left on device)``; it names the head and the errno now, after the same
    words (alerts match them: the branch that named the file had changed them), and so does the
    cut-back's."""
    head = log_path.with_name("audit.log.head")
    with AuditLog.open(log_path, key) as log:
        real_write = log._head.write
        writes: list[int] = []

        def second_write_fails(*args: Any, **kwargs: Any) -> None:
            writes.append(1)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(*args, **kwargs)

        monkeypatch.setattr(log._head, "write", second_write_fails)
        fd = log._fd
        saved = os.dup(fd)
        try:
            with caplog.at_level(logging.ERROR), pytest.raises(AuditUnavailable):
                log.append(event(0), on_written=_pointed_at(dev_full, fd))
        finally:
            os.dup2(saved, fd, inheritable=False)
            os.close(saved)
        monkeypatch.undo()
        assert len(writes) == 2
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert logged == [
            f"cannot record the refusal of audit records in the head's other slot ({head}: No "
            "space left on device (ENOSPC)): whoever zeroes the newer slot while the broker is "
            "stopped undoes it",
            f"cannot cut failed audit records back off the log {log_path}: Invalid argument "
            "(EINVAL)",
            f"cannot write the audit log {log_path}: No space left on device (ENOSPC)",
        ]
        assert all(line.startswith(_ALERTED) for line in logged[:-1])
        assert log.append(event(0)).seq == 0
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 1), found.message


def test_a_refusal_step_that_keeps_failing_is_logged_once_then_counted(
    log_path: Path,
    key: Ed25519PrivateKey,
    dev_full: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five commits in a row fail their write (the log's descriptor is ``/dev/full``'s: ENOSPC)
    and then their cut-back (EINVAL). The cut-back's ERROR line was written for each refused
    batch, at the pace of the callers whose records it held, beside the failure's own line that
    was once and then counted; it is accounted the same way now: once, its repeats counted and
    said (with its words first: alerts match them) when the log commits again."""
    cut_back = (
        f"cannot cut failed audit records back off the log {log_path}: Invalid argument (EINVAL)"
    )
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
        fd = log._fd
        caplog.set_level(logging.INFO, "strongroom.keybroker.audit")
        for _ in range(5):
            saved = os.dup(fd)
            try:
                with pytest.raises(AuditUnavailable):
                    log.append(event(2), on_written=_pointed_at(dev_full, fd))
            finally:
                os.dup2(saved, fd, inheritable=False)
                os.close(saved)
        refused = f"cannot write the audit log {log_path}: No space left on device (ENOSPC)"
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            cut_back,
            refused,
        ]
        caplog.clear()
        assert log.append(event(2)).seq == 2
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("ERROR", f"{cut_back} (4 more times after its last line)"),
            ("INFO", "the audit log commits again (4 refused commits not logged one by one)"),
        ]
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 3), found.message
