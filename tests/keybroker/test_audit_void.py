"""A refused batch stays refused across a restart: its head names it (``void``).

Records of a batch refused after its write (a failed fsync or head) were cut back, and only the
process remembered their hashes so that its crash repair would not anchor them. After a restart,
those signed lines, had they survived the cut-back or been put back, were anchored as the
broker's own: the log then showed decisions that never took effect. Each test here closes the
log and opens it again as a restarted broker does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.errors import DataLoss
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_head
from strongroom.keybroker.audit import AuditLog, head_path
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.errors import AuditUnavailable

from .test_audit import _reasons, _refuse, event, fill, lines
from .test_audit_group_commit import _fail_fsync, _fail_head


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


def _void(log_path: Path, key: Ed25519PrivateKey) -> audit_head.ParsedHead:
    return audit_head.parse(head_path(log_path).read_bytes(), key.public_key())


@pytest.mark.parametrize("inject", [_fail_fsync, _fail_head], ids=["fsync", "head"])
def test_a_refused_batch_put_back_after_a_restart_is_cut_off_not_anchored(
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    inject: Callable[[AuditLog, pytest.MonkeyPatch], None],
) -> None:
    log = AuditLog.open(log_path, key)
    fill(log, 2)
    written: list[bytes] = []
    inject(log, monkeypatch)
    real_write = audit_module.os.write

    def capture(fd: int, data: bytes) -> int:
        written.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(audit_module.os, "write", capture)
    with pytest.raises(AuditUnavailable):
        log.append(event(2, reason="DOOMED"))
    monkeypatch.undo()
    log.close()  # the broker restarts: its memory of the refusal is gone
    with log_path.open("ab") as f:  # the signed line comes back (a lost truncate, a replay)
        f.write(next(data for data in written if b"DOOMED" in data))
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert (result.problem, result.bad_record) == ("VOIDED_RECORDS", 3)
    with AuditLog.open(log_path, key) as reopened:
        assert reopened.count == 2
        assert reopened.append(event(3, reason="AFTER")).seq == 2
    assert _reasons(log_path) == ["OK", "MEASUREMENT_MISMATCH", "AFTER"]
    assert verify_audit_log(log_path, public_key=key.public_key()).intact
    assert _void(log_path, key).void == ()  # the commit that took the position dropped it


def test_refused_lines_the_cut_back_left_behind_are_cut_off_at_the_next_start(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The truncate fails too (the disk is failing): the refused lines stay on disk, signed and
    chained on the head, exactly what a crash before the head update leaves."""
    log = AuditLog.open(log_path, key)
    fill(log, 2)

    def failing_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(audit_module.os, "ftruncate", failing_truncate)
    _refuse(log, log_path, 1, "REFUSED")
    monkeypatch.undo()
    log.close()
    assert len(lines(log_path)) == 3
    with AuditLog.open(log_path, key) as reopened:
        assert reopened.count == 2
    assert b"REFUSED" not in log_path.read_bytes()
    assert verify_audit_log(log_path, public_key=key.public_key()).intact


def test_more_refused_batches_than_the_head_names_refuse_the_position(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    with AuditLog.open(log_path, key) as log:
        fill(log, 1)
        refused = _refuse(log, log_path, audit_head.VOID_MAX + 1, "REFUSED")
    parsed = _void(log_path, key)
    assert parsed.void_all and parsed.head.count == 1
    with log_path.open("ab") as f:
        f.write(refused[0])
    with AuditLog.open(log_path, key) as reopened:
        assert reopened.count == 1
    assert _reasons(log_path) == ["OK"]


def test_a_crash_after_a_refusal_at_the_same_position_is_still_anchored(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The head names the refused batch, not the position: a later batch written there, whose
    head a crash lost, is the broker's own and is anchored as before."""
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
        _refuse(log, log_path, 1, "REFUSED")
        voiding = head_path(log_path).read_bytes()
        log.append(event(2, reason="LATER"))
    head_path(log_path).write_bytes(voiding)  # the later batch's head never reached the disk
    with AuditLog.open(log_path, key) as reopened:
        assert reopened.count == 3
    assert _reasons(log_path) == ["OK", "MEASUREMENT_MISMATCH", "LATER"]
    assert verify_audit_log(log_path, public_key=key.public_key()).intact


def test_zeroing_the_newer_slot_of_a_new_logs_head_does_not_drop_the_refusal(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """A new log's first batch refused: its head was generation 0 in slot 0, and the refusal went
    to slot 1 alone. Slot 1 zeroed while the broker was stopped left generation 0 standing on its
    own (as a new head file reads), without the names, and the refused line put back was anchored
    as the broker's own at the next start; no older copy of the file was needed. Both slots name
    the refusal now, so a zeroed slot is a malformed head: tampering."""
    with AuditLog.open(log_path, key) as log:
        (refused,) = _refuse(log, log_path, 1, "REFUSED")
    assert _void(log_path, key).void
    raw = head_path(log_path).read_bytes()
    stride = audit_head.SLOT_STRIDE
    head_path(log_path).write_bytes(raw[:stride] + bytes(len(raw) - stride))
    with log_path.open("ab") as f:
        f.write(refused)
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert lines(log_path) == [refused]  # not anchored, not cut: left for the operator
