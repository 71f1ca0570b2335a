"""The broker checks its sealed audit files when it opens the log.

Before, a sealed file edited, truncated, replaced or deleted while the broker was stopped went
unnoticed until an operator ran ``audit verify``: the open checked the active log and, only when it
had to start a new one, the newest sealed file. Each tampering test here opened without complaint
on that code. The open reads each sealed file's head, size, first and last records, never the
records in between (see the module doc of :mod:`strongroom.keybroker.audit`, *Rotation*).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.errors import DataLoss
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_head
from strongroom.keybroker.audit import (
    MAX_RECORD_BYTES,
    AuditLog,
    canonical_json,
    head_path,
    record_hash,
)
from strongroom.keybroker.audit_verify import verify_audit_paths
from strongroom.keybroker.errors import AuditUnavailable

from .test_audit import event, fill, lines
from .test_audit_rotation import _CRASHES, RECORD, _rotated, _series


def _make_series(log_path: Path, key: Ed25519PrivateKey) -> None:
    """audit.log.0-2, .3-5, .6-8 (sealed) and audit.log (9..10)."""
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 11)


@pytest.fixture
def series(log_path: Path, key: Ed25519PrivateKey) -> Path:
    _make_series(log_path, key)
    assert _series(log_path, key).intact
    return log_path.parent


def _tampered(log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture) -> str:
    """Opens the log as a restarting broker does; returns the tamper verdict it must raise."""
    with caplog.at_level(logging.CRITICAL), pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    alarms = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(alarms) == 1 and getattr(alarms[0], "alert", None) == "AUDIT_LOG_TAMPERED"
    assert info.value.message in alarms[0].getMessage()
    return info.value.message


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / name, directory / (name + ".head")


def _rewritten(line: bytes, **changes: object) -> bytes:
    """A record line with ``changes``, re-hashed (anyone can compute a hash; ``sig`` stays)."""
    record = json.loads(line)
    record.update(changes)
    del record["hash"]
    return canonical_json({**record, "hash": record_hash(record)}) + b"\n"


# --- what still opens ---------------------------------------------------------------------------


def test_a_normal_restart_opens_and_goes_on(
    series: Path, log_path: Path, key: Ed25519PrivateKey
) -> None:
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        assert (log.count, log.first_seq) == (11, 9)
        assert log.append(event(11)).seq == 11
        assert log.tamper_problem is None
    assert _series(log_path, key).intact


@pytest.mark.parametrize("shipped", [1, 2, 3])
def test_the_oldest_files_shipped_and_deleted_is_retention(
    series: Path, log_path: Path, key: Ed25519PrivateKey, shipped: int
) -> None:
    for name in ("audit.log.0-2", "audit.log.3-5", "audit.log.6-8")[:shipped]:
        for path in _pair(series, name):
            path.unlink()
    with AuditLog.open(log_path, key) as log:
        assert log.append(event(11)).seq == 11


@pytest.mark.parametrize("crash", list(_CRASHES))
def test_a_crash_at_any_step_of_a_rotation_after_others_still_opens(
    series: Path, log_path: Path, key: Ed25519PrivateKey, crash: str
) -> None:
    """The series' newest rotation interrupted (each step the module doc lists), with older sealed
    files beside it: the open finishes the rotation, then checks the whole series."""
    saved = _rotated(log_path, key, 1)  # audit.log (9..11) sealed as audit.log.9-11
    _CRASHES[crash](log_path, saved)
    with AuditLog.open(log_path, key) as log:
        assert log.count == 12
        assert log.append(event(12)).seq == 12
    series_check = _series(log_path, key)
    assert series_check.intact and (series_check.first_seq, series_check.end) == (0, 13)


def test_a_file_sealed_before_heads_carried_its_size_still_opens_and_is_checked(
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = audit_head._slot_bytes

    def without_size(*args: object, size: int | None = None, **kwargs: object) -> bytes:
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_head, "_slot_bytes", without_size)
    _make_series(log_path, key)
    monkeypatch.undo()
    sealed = log_path.with_name("audit.log.3-5")
    assert audit_head.parse(head_path(sealed).read_bytes(), key.public_key()).size is None
    AuditLog.open(log_path, key).close()
    sealed.write_bytes(b"".join(lines(sealed)[:2]))  # its last record cut off
    assert "does not end where its head says" in _tampered(log_path, key, caplog)


# --- what is tampering ----------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, 1, 2], ids=["first", "middle", "last"])
def test_an_edited_sealed_record_is_tampering(
    series: Path, log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture, at: int
) -> None:
    sealed = series / "audit.log.3-5"
    records = lines(sealed)
    records[at] = _rewritten(records[at], decision="allowed", reason="RELEASED")
    sealed.write_bytes(b"".join(records))
    assert "audit.log.3-5" in _tampered(log_path, key, caplog)


def _hash_digit_flipped(line: bytes) -> bytes:
    """``line`` (a record and its newline) with one hex digit of its ``hash`` changed: the same
    length, the hash no longer its content's."""
    at = line.rindex(b'"hash":"') + len(b'"hash":"')
    return line[:at] + (b"0" if line[at : at + 1] != b"0" else b"1") + line[at + 1 :]


def _not_json(line: bytes) -> bytes:
    """``line`` made something else of the same length that is no record."""
    return b"x" * (len(line) - 1) + b"\n"


@pytest.mark.parametrize("edit", [_hash_digit_flipped, _not_json], ids=["hash", "not-json"])
@pytest.mark.parametrize("at", [0, 2], ids=["first", "last"])
def test_a_sealed_record_edited_in_place_at_its_ends_names_the_file_and_the_record(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    at: int,
    edit: object,
) -> None:
    """An end record of one of the sealed files edited in place at its length: the alarm said
    "the last audit record was modified" (or "is malformed"), for the first record too, and
    named no file, so an operator with thousands of them had only audit verify to find which."""
    sealed = series / "audit.log.3-5"
    records = lines(sealed)
    records[at] = edit(records[at])  # type: ignore[operator]
    sealed.write_bytes(b"".join(records))
    which = "first" if at == 0 else "last"
    assert _tampered(log_path, key, caplog).startswith(
        f"the {which} record of the sealed audit log audit.log.3-5 "
    )


@pytest.mark.parametrize("name", ["audit.log.0-2", "audit.log.3-5", "audit.log.6-8"])
def test_a_sealed_files_first_record_edited_at_its_length_and_rehashed_is_tampering(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """Anyone can compute a record's hash: the first record edited at its length (a digit of its
    time) and hashed again kept its ``seq``, its ``prev`` and the file's size, and the start,
    which read only the first and last records, started beside it, though an edit at a file's
    ends is documented as tampering at start. The record after it no longer continues it."""
    sealed = series / name
    records = lines(sealed)
    time_text = json.loads(records[0])["time"]
    digit = "1" if time_text[-2] != "1" else "2"
    records[0] = _rewritten(records[0], time=time_text[:-2] + digit + time_text[-1])
    assert len(records[0]) == len(lines(sealed)[0])
    sealed.write_bytes(b"".join(records))
    assert _tampered(log_path, key, caplog) == (
        f"the first record of the sealed audit log {name} was edited: the record after it "
        "does not continue it"
    )


def test_a_sealed_record_removed_from_the_middle_is_tampering(
    series: Path, log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """The first and last records stay as they were: only the size the head seals tells."""
    sealed = series / "audit.log.3-5"
    size = sealed.stat().st_size
    first, _, last = lines(sealed)
    sealed.write_bytes(first + last)
    message = _tampered(log_path, key, caplog)
    assert f"is {len(first + last)} bytes, not the {size} its head seals" in message


@pytest.mark.parametrize("cut", ["record", "mid-line"])
def test_a_truncated_sealed_file_is_tampering(
    series: Path, log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture, cut: str
) -> None:
    sealed = series / "audit.log.0-2"
    data = sealed.read_bytes()
    keep = len(b"".join(lines(sealed)[:2])) if cut == "record" else len(data) - 10
    sealed.write_bytes(data[:keep])
    assert "audit.log.0-2" in _tampered(log_path, key, caplog)


@pytest.mark.parametrize("name", ["audit.log.0-2", "audit.log.3-5", "audit.log.6-8"])
def test_a_sealed_file_replaced_by_another_log_signed_with_the_same_key_is_tampering(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """A staging broker's (or a reinstalled one's) log, rotated at the same records: its files
    are sealed, signed by this key and named alike, but its chain started elsewhere."""
    other = tmp_path / "other" / "audit.log"
    other.parent.mkdir()
    _make_series(other, key)
    for source, target in zip(_pair(other.parent, name), _pair(series, name), strict=True):
        shutil.copyfile(source, target)
    assert "does not continue" in _tampered(log_path, key, caplog)


@pytest.mark.parametrize("name", ["audit.log.3-5", "audit.log.6-8"])
def test_a_missing_middle_file_is_tampering(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """Deleted after an older file that is still there (the newest sealed file included: the
    active log continues it)."""
    for path in _pair(series, name):
        path.unlink()
    first, last = name.removeprefix("audit.log.").split("-")
    assert f"seq {first}..{last} are missing" in _tampered(log_path, key, caplog)


@pytest.mark.parametrize("name", ["audit.log.3-5", "audit.log.6-8"])
def test_a_sealed_file_without_its_head_after_one_with_its_head_is_tampering(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """Not the oldest: its head cannot have been shipped before an older file's (the oldest
    without its head is being shipped: test_shipping_in_either_order_is_retention...)."""
    head_path(series / name).unlink()
    assert f"{name} has no head" in _tampered(log_path, key, caplog)
    verdict = verify_audit_paths([series], public_key=key.public_key())
    assert (verdict.intact, verdict.problem) == (False, "HEAD_MISSING")


@pytest.mark.parametrize("forgery", ["edited", "other key", "not sealed"])
def test_a_forged_sealed_head_is_tampering(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    forgery: str,
) -> None:
    sealed = series / "audit.log.3-5"
    head = head_path(sealed)
    if forgery == "edited":  # one record fewer in both slots, their signatures unchanged
        raw = head.read_bytes()
        assert raw.count(b'"count":6') == 2
        head.write_bytes(raw.replace(b'"count":6', b'"count":5'))
    else:
        # The same records anchored by a head signed with another key, sealed; or by this key's
        # head, not sealed (as it was before the rotation, or one made for another log).
        head.unlink()
        _write_head(
            sealed,
            Ed25519PrivateKey.generate() if forgery == "other key" else key,
            sealed_head=forgery == "other key",
        )
    assert "audit.log.3-5" in _tampered(log_path, key, caplog)


def _write_head(sealed: Path, signer: Ed25519PrivateKey, *, sealed_head: bool) -> None:
    """A head for the log ``sealed`` anchoring its records, signed by ``signer``."""
    first, last = json.loads(lines(sealed)[0]), json.loads(lines(sealed)[-1])
    dir_fd = os.open(sealed.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        file = audit_head.HeadFile(
            head_path(sealed), signer, "0" * 32, lambda: "2026-01-01T00:00:00.000000Z", dir_fd
        )
        file.read()
        file.write(audit_head.Head(first["seq"], first["prev"], first["seq"]))
        file.write(
            audit_head.Head(last["seq"] + 1, last["hash"], first["seq"]),
            sealed=sealed_head,
            size=sealed.stat().st_size if sealed_head else None,
        )
        file.close()
    finally:
        os.close(dir_fd)


# --- review: legitimate sequences that must not be tampering ------------------------------------


@pytest.mark.parametrize("when", ["opening", "running"])
def test_following_a_rotation_that_another_process_rotates_again_meanwhile(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A process following another's rotation opens the new log at the path and then waits for
    its lock; the other process may rotate that one too meanwhile (it holds the lock). The
    follower then held a file that was no longer at the path and called it replaced: tampering
    (AUDIT_LOG_TAMPERED), found with a broker opening beside one rotating every few records.
    It now follows that rotation too."""
    other = AuditLog.open(log_path, key)
    fill(other, 2)
    follower = AuditLog.open(log_path, key) if when == "running" else None
    if follower is not None:
        assert follower.append(event(2)).seq == 2
        other.rotate()  # the follower, idle, now holds a sealed file
    real_open = os.open
    rotations: list[int] = []
    inside = threading.Lock()  # the other process's own opens are left alone

    def open_then_rotated(path: object, *args: object, **kwargs: object) -> int:
        fd = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == log_path and len(rotations) < 2 and inside.acquire(blocking=False):
            try:
                # The other process commits and rotates the file just opened before its lock
                # is taken (an open's own file, then the new log it follows the rotation to).
                rotations.append(other.append(event(9)).seq)
                other.rotate()
            finally:
                inside.release()
        return fd

    monkeypatch.setattr(os, "open", open_then_rotated)
    try:
        if follower is None:
            follower = AuditLog.open(log_path, key)
            assert follower.count == 4
        else:
            assert follower.append(event(3)).seq == 5
        assert len(rotations) == 2
    finally:
        monkeypatch.undo()
        other.close()
        if follower is not None:
            follower.close()
    assert _series(log_path, key).intact


@pytest.mark.parametrize("shipped", [1, 2])
@pytest.mark.parametrize("first", ["log", "head"])
def test_shipping_in_either_order_is_retention_for_the_broker_and_audit_verify_alike(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    first: str,
    shipped: int,
) -> None:
    """The oldest sealed files shipped with one of their two files deleted and the other not
    yet (rclone or an object-storage sync deletes in any order; a deletion cut short): the open
    called a log without its head tampering and did not start, and audit verify, which the
    upgrade notes send operators to, called a head without its log a truncated log (NOT intact,
    TAIL_TRUNCATED) where the broker saw retention. Both now take them as being shipped."""
    names = ["audit.log.0-2", "audit.log.3-5"][:shipped]
    for name in names:
        sealed, head = _pair(series, name)
        (sealed if first == "log" else head).unlink()
    with caplog.at_level(logging.WARNING), AuditLog.open(log_path, key) as log:
        assert log.append(event(11)).seq == 11
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if first == "head":  # named, so that nobody takes them for checked
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"not checked: {', '.join(names)}" in w for w in warnings), warnings
    verdict = verify_audit_paths([series], public_key=key.public_key())
    assert verdict.intact, verdict.message
    assert verdict.first_seq == 3 * shipped
    assert f"being shipped (log or head already deleted): {shipped}: {', '.join(names)}" in (
        verdict.message
    )


# (the sealed head whose opening the shipper races, what it has deleted by then, the verdict:
# the name the WARNING gives as being shipped, or the tamper message's start)
_SHIPPED_WHILE_CHECKED = {
    "first-head-before-read": ("audit.log.0-2.head", ["audit.log.0-2.head"], "audit.log.0-2"),
    "past-checked-head-first": (
        "audit.log.3-5.head",
        ["audit.log.0-2", "audit.log.0-2.head", "audit.log.3-5.head"],
        "audit.log.3-5",
    ),
    "past-checked-log-first": (
        "audit.log.3-5.head",
        ["audit.log.0-2.head", "audit.log.0-2", "audit.log.3-5"],
        "audit.log.3-5",
    ),
    "past-two-checked": (
        "audit.log.6-8.head",
        [
            "audit.log.0-2",
            "audit.log.0-2.head",
            "audit.log.3-5.head",
            "audit.log.3-5",
            "audit.log.6-8.head",
        ],
        "audit.log.6-8",
    ),
    # Not shipping: an older file is still whole, so this is a file deleted from the middle.
    "middle-head": ("audit.log.3-5.head", ["audit.log.3-5.head"], "the sealed audit log"),
    "middle-past-a-kept-one": (
        "audit.log.6-8.head",
        ["audit.log.0-2", "audit.log.0-2.head", "audit.log.6-8.head"],
        "the sealed audit log",
    ),
}


@pytest.mark.parametrize("read", ["unlocked", "locked"])
@pytest.mark.parametrize("case", list(_SHIPPED_WHILE_CHECKED))
def test_shipping_that_goes_on_while_the_start_checks_is_retention(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    read: str,
) -> None:
    """The start lists the sealed files once, then checks them oldest first, while a shipper
    (rclone, a retention job) may go on deleting the oldest pairs. A pair deleted after the
    start had checked it, then the next file's head or log (or a head between the start's look
    and its read), left a directory any later start takes as retention (the next file being
    shipped), yet the start called it tampering (AUDIT_LOG_TAMPERED, with the CRITICAL alert):
    a false alarm and no broker. It now reads it as a fresh start would; a file gone while an
    older one is still whole is still a file deleted from the middle. The start reads the files
    before it takes the locks (``unlocked``) and under them only those it did not find whole then
    or that changed since, such as a file sealed meanwhile (``locked``: the read before found
    none); the shipper may delete in either."""
    opened, deleted, verdict = _SHIPPED_WHILE_CHECKED[case]
    if read == "locked":
        monkeypatch.setattr(audit_module, "_precheck_sealed", lambda *args: {})
    real_open = os.open
    shipped: list[str] = []

    def open_while_shipping(path: object, *args: object, **kwargs: object) -> int:
        if path == opened and not shipped:
            for name in deleted:
                (series / name).unlink()
                shipped.append(name)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_while_shipping)
    if verdict.startswith("audit.log."):
        with caplog.at_level(logging.WARNING), AuditLog.open(log_path, key) as log:
            monkeypatch.undo()
            assert log.append(event(11)).seq == 11
        assert shipped == deleted
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("being shipped" in w and verdict in w for w in warnings), warnings
        monkeypatch.undo()
        assert AuditLog.open(log_path, key).count == 12  # and a start after it agrees
    else:
        message = _tampered(log_path, key, caplog)
        assert shipped == deleted
        assert message.startswith(verdict), message


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _without_file_mode_override() -> None:
    """Drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread's effective set
    (``capset`` changes that thread only), so that a directory's mode refuses it as it refuses a
    broker's user: the tests may run as root. Nothing to drop otherwise."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~((1 << 1) | (1 << 2))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _without_file_mode_override_in_thread(
    directory: Path, call: Callable[[], object]
) -> BaseException | None:
    """Runs ``call`` in a thread that has dropped its file-mode override
    (:func:`_without_file_mode_override`); returns what it raised, if anything. ``directory``'s
    mode is put back (0700) whatever happened."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        _without_file_mode_override()
        try:
            call()
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run)
    try:
        thread.start()
        thread.join()
    finally:
        directory.chmod(0o700)
    (error,) = outcome
    return error


def _start_without_file_mode_override(
    log_path: Path, key: Ed25519PrivateKey
) -> BaseException | None:
    """Opens (and closes) the log as a starting broker does, without the file-mode override
    (:func:`_without_file_mode_override_in_thread`); returns what the open raised, if anything."""
    return _without_file_mode_override_in_thread(
        log_path.parent, lambda: AuditLog.open(log_path, key).close()
    )


def _refused_start_changes_nothing(
    log_path: Path,
    key: Ed25519PrivateKey,
    message: str,
    undo: Callable[[], object],
    fail: Callable[[], object] = lambda: None,
) -> None:
    """A start of the series beside ``log_path`` (:func:`_make_series`) without the file-mode
    override (:func:`_start_without_file_mode_override`), after ``fail`` (what makes it fail,
    after the directory's files were read: a mode that stops the read too when the tests do not
    run as root), then ``undo`` of that, whatever happened: the start refused AUDIT_UNAVAILABLE
    with exactly ``message``, no file of the directory changed, and the start after it opens the
    log and appends."""
    directory = log_path.parent
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    try:
        fail()
        error = _start_without_file_mode_override(log_path, key)
    finally:
        undo()
    assert isinstance(error, AuditUnavailable), repr(error)
    assert error.reason == "AUDIT_UNAVAILABLE"
    assert error.message == message
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    with AuditLog.open(log_path, key) as log:
        assert log.append(event(11)).seq == 11


@pytest.mark.parametrize("read", ["unlocked", "locked"])
def test_a_sealed_file_the_start_cannot_look_up_refuses_it_naming_the_file_and_errno(
    series: Path,
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    read: str,
) -> None:
    """Under the locks the start looks up each sealed file again (``lstat``): whether it is still
    the one read before them (``unlocked``) or, for a file that read did not find whole, whether
    it was shipped meanwhile (``locked``). An error other than not-found there (here EACCES: the
    directory lost its search permission after it was listed) escaped as a bare PermissionError,
    a traceback and no file named. It is AUDIT_UNAVAILABLE now, naming the file and the errno,
    the start refused; nothing is changed, and the start goes on once the directory is fixed."""
    if read == "locked":
        monkeypatch.setattr(audit_module, "_precheck_sealed", lambda *args: {})
    real_check = AuditLog._check_sealed_series

    def unsearchable_then_checked(log: AuditLog, prechecked: object) -> None:
        series.chmod(0o600)  # listable, but no name in it can be looked up
        real_check(log, prechecked)  # type: ignore[arg-type]

    monkeypatch.setattr(AuditLog, "_check_sealed_series", unsearchable_then_checked)
    _refused_start_changes_nothing(
        log_path,
        key,
        f"cannot look up the audit file {series / 'audit.log.0-2'}: Permission denied (EACCES)",
        monkeypatch.undo,
    )


def test_a_start_whose_log_the_directory_no_longer_lets_it_look_up_refuses_naming_it(
    series: Path, log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start reads the sealed files before it takes the locks (_precheck_sealed), leaving out
    whatever it cannot read for the check under them to judge; its first look-up under them is
    the log's path. A directory that lost its search permission by then (EACCES) ended the start
    there with a bare PermissionError, a traceback naming no file of the operator's. It is
    AUDIT_UNAVAILABLE now, naming the log and the errno; nothing is changed."""
    real_precheck = audit_module._precheck_sealed

    def unsearchable_then_prechecked(*args: object) -> object:
        series.chmod(0o600)  # listable, but no name in it can be looked up or opened
        return real_precheck(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_module, "_precheck_sealed", unsearchable_then_prechecked)
    _refused_start_changes_nothing(
        log_path,
        key,
        f"cannot look up the audit file {log_path}: Permission denied (EACCES)",
        monkeypatch.undo,
    )


def _unsearchable_after_head_read(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """The directory loses its search permission once the rotation's completion has read the
    head at the log's path: its next step looks up the log there."""
    real_read = AuditLog._read_in_dir

    def read_then_unsearchable(log: AuditLog, name: str, limit: int) -> bytes:
        data = real_read(log, name, limit)
        if name == "audit.log.head":
            directory.chmod(0o600)
        return data

    monkeypatch.setattr(AuditLog, "_read_in_dir", read_then_unsearchable)


def _unsearchable_after_listing(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """... once the renames are done and the sealed logs listed: the next step looks up each of
    them for the one this process had open (_sealed_head_of)."""
    real_listing = audit_module._sealed_logs

    def listed_then_unsearchable(*args: object) -> list[tuple[int, int, str]]:
        found = real_listing(*args)  # type: ignore[arg-type]
        directory.chmod(0o600)
        return found

    monkeypatch.setattr(audit_module, "_sealed_logs", listed_then_unsearchable)


def _unsearchable_after_new_log(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """... once the new log is made at the log's path (the one open there that may create):
    the next step looks up its head."""
    real_open = os.open

    def open_then_unsearchable(path: object, *args: object, **kwargs: object) -> int:
        fd = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == "audit.log" and isinstance(args[0], int) and args[0] & os.O_CREAT:
            directory.chmod(0o600)
        return fd

    monkeypatch.setattr(os, "open", open_then_unsearchable)


_ROTATION_LOOKUPS = {
    "renames": (_unsearchable_after_head_read, "audit.log"),
    "sealed-head-of": (_unsearchable_after_listing, "audit.log.0-2"),
    "new-log": (_unsearchable_after_new_log, "audit.log.head"),
}


@pytest.mark.parametrize("step", list(_ROTATION_LOOKUPS))
def test_an_interrupted_rotation_the_start_cannot_look_up_refuses_naming_the_file_and_errno(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A start finishing a rotation a crash interrupted (the head at the log's path sealed, the
    renames not done) looks up the log, its sealed name and the new log's head as it goes. An
    error other than not-found there (EACCES: the directory lost its search permission) escaped
    as a bare PermissionError, a traceback naming no file. It is AUDIT_UNAVAILABLE now, naming
    the file and the errno; what was done stays done, and the next start finishes the rotation,
    the chain intact."""
    saved = _rotated(log_path, key, 3)
    _CRASHES["sealed"](log_path, saved)
    unsearchable, name = _ROTATION_LOOKUPS[step]
    unsearchable(monkeypatch, log_path.parent)
    error = _start_without_file_mode_override(log_path, key)
    monkeypatch.undo()
    assert isinstance(error, AuditUnavailable), repr(error)
    assert error.reason == "AUDIT_UNAVAILABLE"
    assert error.message == (
        f"cannot look up the audit file {log_path.parent / name}: Permission denied (EACCES)"
    )
    with AuditLog.open(log_path, key) as log:
        assert (log.first_seq, log.count) == (3, 3)
        assert log.append(event(3)).seq == 3
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


def _unwritable(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """The directory is searchable and readable, not writable, from the start on (0500: an audit
    volume the broker's user can no longer write, say after a restore as another user)."""
    directory.chmod(0o500)


def _unwritable_after_renames(done: int) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """... once the start has made ``done`` of the rotation's renames (the log, then its head)."""

    def unwritable(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        real_rename = os.rename
        renamed: list[str] = []

        def rename_then_unwritable(src: str, dst: str, **kwargs: int) -> None:
            real_rename(src, dst, **kwargs)
            renamed.append(src)
            if len(renamed) == done:
                directory.chmod(0o500)

        monkeypatch.setattr(os, "rename", rename_then_unwritable)

    return unwritable


def _unwritable_after_new_log(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """... once the new log is made at the log's path: its first head cannot be created."""
    real_open = os.open

    def open_then_unwritable(path: object, *args: object, **kwargs: object) -> int:
        fd = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == "audit.log" and isinstance(args[0], int) and args[0] & os.O_CREAT:
            directory.chmod(0o500)
        return fd

    monkeypatch.setattr(os, "open", open_then_unwritable)


def _head_unreadable_after_resync(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """The sealed head at the log's path loses its read permission once the start has read it
    (the resync): finishing the rotation reads it again (0200: writable, not readable)."""
    real_read = audit_module._read_head

    def read_then_unreadable(*args: object) -> object:
        found = real_read(*args)  # type: ignore[arg-type]
        (directory / "audit.log.head").chmod(0o200)
        return found

    monkeypatch.setattr(audit_module, "_read_head", read_then_unreadable)


def _new_log_read_only(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """The new log is made read-only (0400) once it and its head are made: the start cannot open
    it for writing, to switch to it."""
    real_switch = AuditLog._switch_to_new

    def read_only_then_switched(log: AuditLog, sealed: object) -> None:
        (directory / "audit.log").chmod(0o400)
        real_switch(log, sealed)  # type: ignore[arg-type]

    monkeypatch.setattr(AuditLog, "_switch_to_new", read_only_then_switched)


def _log_unreadable_after_open(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """The log at the log's path loses its read permission once the start opened it (0200):
    finishing the rotation reads it as the sealed log it is about to rename, a read no step
    names (the open's last resort does)."""
    real_precheck = audit_module._precheck_sealed

    def unreadable_then_prechecked(*args: object) -> object:
        (directory / "audit.log").chmod(0o200)
        return real_precheck(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_module, "_precheck_sealed", unreadable_then_prechecked)


# step: (the crash left, what makes the start fail, whether it fails before changing anything,
# the message: {d} the directory).
_ROTATION_CALLS: dict[str, tuple[str, Callable[[pytest.MonkeyPatch, Path], None], bool, str]] = {
    "open-log": (
        "log-renamed",
        _unwritable,
        True,
        "cannot open the audit log {d}/audit.log: Permission denied (EACCES)",
    ),
    "write-first-head": (
        "new-log-created",
        _unwritable,
        True,
        "cannot write the audit head {d}/audit.log.head: Permission denied (EACCES)",
    ),
    "rename-log": (
        "sealed",
        _unwritable,
        True,
        "cannot rename the audit file {d}/audit.log to {d}/audit.log.0-2: Permission denied "
        "(EACCES)",
    ),
    "rename-head": (
        "sealed",
        _unwritable_after_renames(1),
        False,
        "cannot rename the audit file {d}/audit.log.head to {d}/audit.log.0-2.head: Permission "
        "denied (EACCES)",
    ),
    "create-new-log": (
        "sealed",
        _unwritable_after_renames(2),
        False,
        "cannot create the audit log {d}/audit.log: Permission denied (EACCES)",
    ),
    "create-new-head": (
        "sealed",
        _unwritable_after_new_log,
        False,
        "cannot write the audit head {d}/audit.log.head: Permission denied (EACCES)",
    ),
    "read-sealed-head": (
        "sealed",
        _head_unreadable_after_resync,
        True,
        "cannot read the audit file {d}/audit.log.head: Permission denied (EACCES)",
    ),
    "open-new-log": (
        "sealed",
        _new_log_read_only,
        False,
        "cannot open the audit log {d}/audit.log: Permission denied (EACCES)",
    ),
    "read-sealed-log": (
        "sealed",
        _log_unreadable_after_open,
        True,
        "cannot access the audit file {d}/audit.log: Permission denied (EACCES)",
    ),
}


@pytest.mark.parametrize("step", list(_ROTATION_CALLS))
def test_an_interrupted_rotation_the_start_cannot_finish_refuses_naming_the_file_and_errno(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A crash left a rotation half-done, and the start that finishes it cannot write the
    directory (or a file): its renames, the new log and its first head, the switch to the new
    log and the reads before them ended the start with a bare PermissionError (``'audit.log' ->
    'audit.log.0-2'``), a traceback naming neither the directory nor the errno, or said
    ``cannot open the audit log: Permission denied`` naming no file. Each is AUDIT_UNAVAILABLE
    now, naming the file(s) and the errno (EACCES, real: the start's thread without its
    file-mode override). A start refused before its first change changes nothing; what one
    refused later had done stays done (a crash could leave it so); the next start, the
    permissions put back, finishes the rotation, the chain intact."""
    directory = log_path.parent
    crash, refuse, changes_nothing, message = _ROTATION_CALLS[step]
    saved = _rotated(log_path, key, 3)
    _CRASHES[crash](log_path, saved)
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    refuse(monkeypatch, directory)
    try:
        error = _start_without_file_mode_override(log_path, key)
    finally:
        monkeypatch.undo()
        for path in directory.iterdir():
            path.chmod(0o600)
    assert isinstance(error, AuditUnavailable), repr(error)
    assert error.reason == "AUDIT_UNAVAILABLE"
    assert error.message == message.format(d=directory)
    after = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert not [name for name in after if name.startswith(".")]  # no head's temporary file left
    if changes_nothing:
        assert after == before
    with AuditLog.open(log_path, key) as log:
        assert (log.first_seq, log.count) == (3, 3)
        assert log.append(event(3)).seq == 3
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


@pytest.mark.parametrize("unreadable", ["log", "head"])
def test_a_sealed_file_the_start_cannot_read_refuses_naming_the_file_and_errno(
    series: Path, log_path: Path, key: Ed25519PrivateKey, unreadable: str
) -> None:
    """A sealed log or head the start cannot read (write-only: EACCES, real, the start's thread
    without its file-mode override; the read before the locks leaves it out, the check under
    them reads it) refused the start with ``cannot read the sealed audit log NAME: Permission
    denied``, naming no directory and no errno, unlike every other audit refusal. It names the
    file's path and the errno now; nothing is changed, and the start goes on once it is fixed."""
    name = "audit.log.0-2"
    path = series / (name if unreadable == "log" else f"{name}.head")
    what = "" if unreadable == "log" else f" {name}'s head"
    _refused_start_changes_nothing(
        log_path,
        key,
        f"cannot read the sealed audit log{what} {path}: Permission denied (EACCES)",
        lambda: path.chmod(0o600),
        fail=lambda: path.chmod(0o200),
    )


def test_a_rotation_that_cannot_seal_the_log_names_the_head_and_errno(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotation's first step, the sealed head written in place, failing (ENOSPC) refused
    it with ``cannot seal the audit log for its rotation: No space left on device``, naming no
    file and no errno. It names the head's path and the errno now, after the words an alert
    matches; nothing was sealed, and the next rotation seals the log."""
    with AuditLog.open(log_path, key) as log:
        fill(log, 3)
        real_write = log._head.write

        def full_when_sealing(head: audit_head.Head, **kwargs: Any) -> None:
            if kwargs.get("sealed"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(head, **kwargs)

        monkeypatch.setattr(log._head, "write", full_when_sealing)
        with pytest.raises(AuditUnavailable) as info:
            log.rotate()
        monkeypatch.undo()
        assert info.value.reason == "AUDIT_UNAVAILABLE"
        assert info.value.message == (
            "cannot seal the audit log for its rotation: cannot write the audit head "
            f"{log_path}.head: No space left on device (ENOSPC)"
        )
        assert sorted(p.name for p in log_path.parent.iterdir()) == ["audit.log", "audit.log.head"]
        assert log.rotate() == log_path.with_name("audit.log.0-2")
        assert log.append(event(3)).seq == 3
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


def test_a_call_no_step_of_the_start_expected_to_fail_is_logged_once_with_its_traceback(
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The start's last resort turned any OSError into AUDIT_UNAVAILABLE ``from None`` and
    logged nothing: a programming error surfacing as one (a seek to a negative offset: EINVAL,
    the kernel's) lost its stack trace everywhere. It is logged once at ERROR now, with its
    traceback, and the refusal raised as before (the file and the errno, no cause: it named the
    directory "the audit file" for a call on the log's descriptor, which names no file)."""
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)

    def bad_seek(log: AuditLog) -> None:
        os.lseek(log._fd, -1, os.SEEK_SET)

    monkeypatch.setattr(AuditLog, "_count_sealed_bytes", bad_seek)
    with caplog.at_level(logging.ERROR), pytest.raises(AuditUnavailable) as info:
        AuditLog.open(log_path, key)
    # The call was on the log's descriptor (it names no file): the log, not the directory.
    message = f"cannot access the audit file {log_path}: Invalid argument (EINVAL)"
    assert info.value.message == message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    [logged] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged.name == "strongroom.keybroker.audit"
    assert logged.getMessage() == (
        f"{message} (a call no step of the audit log's start expected to fail)"
    )
    assert logged.reason == "AUDIT_UNAVAILABLE"  # type: ignore[attr-defined]
    assert logged.exc_info is not None
    trace = logging.Formatter().formatException(logged.exc_info)
    assert "in bad_seek\n    os.lseek(log._fd, -1, os.SEEK_SET)" in trace
    assert trace.endswith("OSError: [Errno 22] Invalid argument")


@pytest.mark.parametrize("by", ["commit", "rotate"])
def test_a_running_brokers_rotation_that_cannot_finish_says_the_next_commit_goes_on_with_it(
    log_path: Path, key: Ed25519PrivateKey, by: str
) -> None:
    """A running broker's rotation (a commit past ``rotate_bytes``, or an operator's
    ``rotate()``) seals the log in place, then cannot rename it: the directory is no longer
    writable by the broker's user (EACCES, real). Its refusal said ``cannot finish the audit
    log's rotation (the next commit goes on with it)``; once the steps named their own files it
    said only ``cannot rename the audit file ...``, without that prefix (an alert matching it
    stopped matching) or the word that the rotation is sealed and will be finished. It says both
    now; and the next commit, the directory writable again, does finish it."""
    directory = log_path.parent
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 3)
        directory.chmod(0o500)
        if by == "commit":
            error = _without_file_mode_override_in_thread(
                directory, lambda: log.append(event(3, reason="REFUSED"))
            )
        else:
            error = _without_file_mode_override_in_thread(directory, log.rotate)
        assert isinstance(error, AuditUnavailable), repr(error)
        assert error.reason == "AUDIT_UNAVAILABLE"
        assert error.message == (
            "cannot finish the audit log's rotation (the next commit goes on with it): cannot "
            f"rename the audit file {directory}/audit.log to {directory}/audit.log.0-2: "
            "Permission denied (EACCES)"
        )
        assert log.append(event(3)).seq == 3 and log.first_seq == 3
    found = _series(log_path, key)
    assert found.intact and (found.first_seq, found.end) == (0, 4), found.message


def test_sealed_files_whose_first_and_last_records_are_near_the_largest_still_open(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The check reads a file's first record (up to MAX_RECORD_BYTES) and its last (from the end,
    8 KiB at a time until a whole line): records near the largest allowed at both ends of every
    sealed file, and in the active log, are read whole (no change was needed)."""
    big = event(0, claims={"x": "a" * (MAX_RECORD_BYTES - 1500)})
    with AuditLog.open(log_path, key) as log:
        for _ in range(2):
            log.append(big)
            log.append(event(1))
            log.append(big)
            log.rotate()
        log.append(big)
    sizes = [len(line) for line in lines(log_path.with_name("audit.log.0-2"))]
    assert sizes[0] > MAX_RECORD_BYTES - 1024 and sizes[-1] > MAX_RECORD_BYTES - 1024
    with AuditLog.open(log_path, key) as log:
        assert log.append(event(7)).seq == 7
    assert verify_audit_paths([log_path.parent], public_key=key.public_key()).intact


def test_a_sealed_heads_size_is_under_its_signature(
    series: Path, log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A sealed file with a record added, its head's size raised to match: the signature no
    longer verifies (no change was needed)."""
    sealed = series / "audit.log.3-5"
    head = head_path(sealed)
    size = sealed.stat().st_size
    raw = head.read_bytes()
    assert raw.count(b'"size":%d' % size) == 1  # the sealing generation only
    head.write_bytes(raw.replace(b'"size":%d' % size, b'"size":%d' % (size + 1)))
    with sealed.open("ab") as file:
        file.write(b"\n")
    assert "audit.log.3-5.head is malformed or not signed" in _tampered(log_path, key, caplog)
