"""A starting broker checks its sealed audit files before it takes the log's lock.

Brokers may share one audit directory. The start checked every sealed file (about 0.8 ms each,
uncached) holding the log's ``flock`` and the directory's: a sibling's release waited for it,
and past ``LOG_LOCK_WAIT_SECONDS`` (some 12,500 files) was refused. Sealed files cannot change
any more, so the start now reads them first, unlocked, and under the locks only lists the names
again, makes sure each file read is still the very file (``_file_id``), reads whatever is new or
changed, and checks the links between files and to the log, which a sibling may be writing.
Each test here held a per-file read of the start on a threading.Event (the ``open_regular`` of
the audit module, through which both the old and the new code open sealed files).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.errors import DataLoss
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import AuditLog

from .test_audit import event, lines
from .test_audit_rotation import RECORD, _series
from .test_audit_start import _tampered, series  # noqa: F401 (series: a fixture)

# Every wait here is for the other thread to reach a point, never a measurement.
_REACHED = 60.0


@dataclass
class _Start:
    """A broker's start (AuditLog.open) in a thread of its own, held where ``hold_at`` (a name
    in the audit directory) is first opened, until ``go_on`` is set."""

    log_path: Path
    key: Ed25519PrivateKey
    hold_at: str
    held: threading.Event = field(default_factory=threading.Event)
    go_on: threading.Event = field(default_factory=threading.Event)
    log: AuditLog | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def begin(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = audit_module.open_regular

        def held_open(path: str | Path, *, dir_fd: int | None = None) -> int:
            if str(path) == self.hold_at and not self.held.is_set():
                self.held.set()
                self.go_on.wait()
            return real(path, dir_fd=dir_fd)

        monkeypatch.setattr(audit_module, "open_regular", held_open)
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.held.wait(_REACHED), "the start never read the sealed file"

    def _run(self) -> None:
        try:
            self.log = AuditLog.open(self.log_path, self.key)
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    def finish(self) -> AuditLog:
        """Lets the start go on; its log, or what it raised."""
        self.go_on.set()
        assert self.thread is not None
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.log is not None
        return self.log


@pytest.fixture
def start(log_path: Path, key: Ed25519PrivateKey) -> Iterator[_Start]:
    held = _Start(log_path, key, hold_at="audit.log.0-2.head")
    yield held
    held.go_on.set()  # a failed test does not leave the start waiting
    if held.thread is not None:
        held.thread.join()
    if held.log is not None:
        held.log.close()


def test_a_siblings_release_is_recorded_while_a_start_checks_the_sealed_files(
    series: Path,  # noqa: F811
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    start: _Start,
) -> None:
    """The sibling's append waited for the start's lock (and with a short wait was refused
    AUDIT_UNAVAILABLE); it is now committed while the start is held in its first sealed file."""
    monkeypatch.setattr(audit_module, "LOG_LOCK_WAIT_SECONDS", 1.0)  # the old code: fail soon
    with AuditLog.open(log_path, key) as sibling:
        start.begin(monkeypatch)
        assert sibling.append(event(11)).seq == 11
        started = start.finish()
        assert started.count == 12  # the start's locked part saw the sibling's record
        assert started.append(event(12)).seq == 12
    assert _series(log_path, key).intact


def test_the_start_opens_no_sealed_file_while_it_holds_the_log_lock(
    series: Path,  # noqa: F811
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every sealed file and head is read before the lock is taken (a probe on another open
    file of the log tells whether the start holds its flock at each open)."""
    real = audit_module.open_regular
    probe = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
    opened: list[tuple[str, bool]] = []

    def probing_open(path: str | Path, *, dir_fd: int | None = None) -> int:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            locked = True
        else:
            locked = False
            fcntl.flock(probe, fcntl.LOCK_UN)
        opened.append((str(path), locked))
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(audit_module, "open_regular", probing_open)
    try:
        AuditLog.open(log_path, key).close()
    finally:
        os.close(probe)
    assert {name for name, _ in opened} == {
        f"audit.log.{span}{suffix}" for span in ("0-2", "3-5", "6-8") for suffix in ("", ".head")
    }
    assert [name for name, locked in opened if locked] == []


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
def test_a_file_a_sibling_seals_while_the_start_reads_is_checked_under_the_lock(
    series: Path,  # noqa: F811
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    start: _Start,
    tampered: bool,
) -> None:
    """A sibling commits and rotates (audit.log.9-11 sealed) after the unlocked read listed the
    files: the part under the lock lists them again and reads the new one, so one cut short by
    then is still tampering. The old code held the sibling's commit instead (refused here)."""
    monkeypatch.setattr(audit_module, "LOG_LOCK_WAIT_SECONDS", 1.0)
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as sibling:
        start.begin(monkeypatch)
        assert sibling.append(event(11)).seq == 11
        assert sibling.rotate() == series / "audit.log.9-11"
    if tampered:
        sealed = series / "audit.log.9-11"
        sealed.write_bytes(b"".join(lines(sealed)[:2]))
        with pytest.raises(DataLoss) as info:
            start.finish()
        assert info.value.reason == "AUDIT_LOG_TAMPERED"
        assert "audit.log.9-11" in info.value.message
        return
    started = start.finish()
    assert (started.count, started.first_seq) == (12, 12)
    assert started.append(event(12)).seq == 12
    started.close()
    assert _series(log_path, key).intact


def _refused_once_changed(
    series: Path,  # noqa: F811
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    change: object,
) -> DataLoss:
    """What a start held at the newest file's head (its unlocked read done) raises once
    ``change`` was made to audit.log.0-2, which that read had found whole."""
    start = _Start(log_path, key, hold_at="audit.log.6-8.head")
    try:
        start.begin(monkeypatch)
        change(series / "audit.log.0-2")  # type: ignore[operator]
        with pytest.raises(DataLoss) as info:
            start.finish()
    finally:
        start.go_on.set()
        if start.log is not None:
            start.log.close()
    return info.value


def _replace_cut(path: Path) -> None:
    """The file replaced (a new inode) by a copy without its last record."""
    cut = path.with_name(".cut")
    cut.write_bytes(b"".join(lines(path)[:-1]))
    os.replace(cut, path)


def _cut_in_place(path: Path) -> None:
    """The same file (its inode) without its last record."""
    with path.open("r+b") as file:
        file.truncate(len(b"".join(lines(path)[:-1])))


def _head_swapped(path: Path) -> None:
    """Its head replaced by a newer file's (signed and sealed, for another range)."""
    os.replace(path.with_name("audit.log.3-5.head"), path.with_name("audit.log.0-2.head"))


@pytest.mark.parametrize(
    "change", [_replace_cut, _cut_in_place, _head_swapped], ids=["replaced", "cut", "head"]
)
def test_a_sealed_file_changed_after_the_unlocked_read_is_read_again_under_the_lock(
    series: Path,  # noqa: F811
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    change: object,
) -> None:
    """audit.log.0-2 changed once the unlocked read had found it whole (the start held at the
    newest file's head): the part under the lock sees it is not the file read and reads it
    again. The old code, which had checked it already, started beside it."""
    error = _refused_once_changed(series, log_path, key, monkeypatch, change)
    assert error.reason == "AUDIT_LOG_TAMPERED"
    assert "audit.log.0-2" in error.message
    monkeypatch.undo()
    caplog.clear()
    assert "audit.log.0-2" in _tampered(log_path, key, caplog)  # as a start now finds it


def _later_than(path: Path) -> None:
    """Returns once a change made now gets a change time after ``path``'s: a file system's
    clock ticks coarsely, and a change within the tick of the last one keeps its times (the
    case the module doc leaves, as a change made after the check)."""
    changed = os.lstat(path).st_ctime_ns
    probe = path.with_name(".probe")
    while True:
        probe.write_bytes(b"")
        if os.lstat(probe).st_ctime_ns > changed:
            probe.unlink()
            return


def _flip_after(path: Path, marker: bytes) -> None:
    """One hex digit after the last ``marker`` in ``path`` changed in place: the same file, the
    same size."""
    data = path.read_bytes()
    at = data.rindex(marker) + len(marker)
    _later_than(path)
    with path.open("r+b") as file:
        file.seek(at)
        file.write(b"0" if data[at : at + 1] != b"0" else b"1")


def _log_edited(path: Path) -> None:
    """The last record's hash edited in place."""
    _flip_after(path, b'"hash":"')


def _head_edited(path: Path) -> None:
    """The sealed head's ``last_hash`` edited in place."""
    _flip_after(path.with_name(path.name + ".head"), b'"last_hash":"')


def _times_put_back(change: object) -> object:
    """``change``, then the file's access and modification times set back as they were (any
    process that may write the file may): only its change time still tells."""

    def changed(path: Path) -> None:
        members = (path, path.with_name(path.name + ".head"))
        snapshot = {member: os.lstat(member) for member in members}
        change(path)  # type: ignore[operator]
        for member, before in snapshot.items():
            os.utime(member, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert os.lstat(member).st_size == before.st_size

    return changed


@pytest.mark.parametrize(
    "change",
    [_log_edited, _head_edited, _times_put_back(_log_edited), _times_put_back(_head_edited)],
    ids=["log", "head", "log-times-put-back", "head-times-put-back"],
)
def test_a_sealed_file_edited_in_place_at_its_size_after_the_unlocked_read_is_read_again(
    series: Path,  # noqa: F811
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    change: object,
) -> None:
    """audit.log.0-2's log or head edited in place once the unlocked read had found it whole,
    the same inode and size (the start held at the newest file's head): only its modification
    and change times tell it from the file read, and with the modification time set back, only
    the change time, which no call sets back. Either found changed, it is read again and is
    tampering (the file's identity without its times started beside it)."""
    error = _refused_once_changed(series, log_path, key, monkeypatch, change)
    assert error.reason == "AUDIT_LOG_TAMPERED"
