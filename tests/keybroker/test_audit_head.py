"""The audit head in format 2: two slots overwritten in place, checked as a pair; format 1 converted.

What the other side controls here is the head file's bytes (and the log's): each test edits them
the way someone with write access to the volume could, without the signing key.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.errors import DataLoss
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_head
from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision, canonical_json, head_path
from strongroom.keybroker.audit_head import (
    FILE_BYTES,
    HEAD_DOMAIN,
    SLOT_BYTES,
    SLOT_STRIDE,
    Head,
    parse,
)
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.errors import AuditUnavailable


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "decisions.jsonl"


@pytest.fixture
def audit(log_path: Path, key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    with AuditLog.open(log_path, key) as log:
        yield log


def _event(n: int) -> AuditEvent:
    return AuditEvent(decision=Decision.ALLOWED, reason="OK", claims={"n": n})


def _slots(path: Path) -> list[dict[str, object] | None]:
    raw = head_path(path).read_bytes()
    out: list[dict[str, object] | None] = []
    for index in (0, 1):
        text = raw[index * SLOT_STRIDE : index * SLOT_STRIDE + SLOT_BYTES].rstrip(b"\0")
        out.append(json.loads(text) if text else None)
    return out


def _generations(path: Path) -> list[object]:
    return [None if s is None else s["gen"] for s in _slots(path)]


def test_a_new_log_has_generation_zero_in_slot_zero(audit: AuditLog, log_path: Path) -> None:
    assert head_path(log_path).stat().st_size == FILE_BYTES
    assert _generations(log_path) == [0, None]
    assert verify_audit_log(log_path).intact


def test_each_commit_overwrites_the_older_slot_in_place(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    inode = head_path(log_path).stat().st_ino
    for n, generations in enumerate([[0, 1], [2, 1], [2, 3]]):  # by slot
        audit.append(_event(n))
        assert _generations(log_path) == generations
        assert head_path(log_path).stat().st_ino == inode  # no new file, no rename
        assert head_path(log_path).stat().st_size == FILE_BYTES
    parsed = parse(head_path(log_path).read_bytes(), key.public_key())
    assert (parsed.generation, parsed.head.count, parsed.version) == (3, 3, 2)
    assert verify_audit_log(log_path, public_key=key.public_key()).intact


def test_the_largest_head_fits_one_slot(key: Ed25519PrivateKey) -> None:
    slot = audit_head._slot_bytes(
        Head(2**63 - 1, "f" * 64), 2**63 - 1, key, "0" * 32, "2026-12-31T23:59:59.999999Z"
    )
    assert len(slot) == SLOT_BYTES
    # With what rotation and refused batches add: a base, the seal and the sealed log's size,
    # and the most voided batches; each head carries the key (``pub``) too.
    for extra in (
        {"sealed": True, "size": 2**63 - 1},
        {"void": ("e" * audit_head.VOID_PREFIX,) * audit_head.VOID_MAX},
        {"void_all": True},
    ):
        slot = audit_head._slot_bytes(
            Head(2**63 - 1, "f" * 64, 2**63 - 2),
            2**63 - 1,
            key,
            "0" * 32,
            "2026-12-31T23:59:59.999999Z",
            **extra,  # type: ignore[arg-type]
        )
        assert len(slot) == SLOT_BYTES
        assert b'"pub":"' in slot


# --- tampering with the slots ---------------------------------------------------------------


def _swap(raw: bytes) -> bytes:
    return raw[SLOT_STRIDE:] + raw[:SLOT_STRIDE]


def _copy(source: int) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        slot = raw[source * SLOT_STRIDE : (source + 1) * SLOT_STRIDE]
        return slot + slot

    return edit


def _zero(index: int) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        parts = [raw[:SLOT_STRIDE], raw[SLOT_STRIDE:]]
        parts[index] = bytes(SLOT_STRIDE)
        return b"".join(parts)

    return edit


def _flip(raw: bytes) -> bytes:
    at = raw.index(b'"count":') + len(b'"count":')
    return raw[:at] + (b"9" if raw[at : at + 1] != b"9" else b"8") + raw[at + 1 :]


EDITS: dict[str, Callable[[bytes], bytes]] = {
    "swap": _swap,
    "copy-slot-0-over-1": _copy(0),
    "copy-slot-1-over-0": _copy(1),
    "zero-slot-0": _zero(0),
    "zero-slot-1": _zero(1),
    "count-edited": _flip,
    "cut-short": lambda raw: raw[:SLOT_STRIDE],
    "grown": lambda raw: raw + b"\0",
    "junk-after-document": lambda raw: raw[: SLOT_BYTES - 1] + b"x" + raw[SLOT_BYTES:],
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_an_edited_head_is_refused_by_verify_and_by_the_broker(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey, edit: Callable[[bytes], bytes]
) -> None:
    for n in range(3):
        audit.append(_event(n))
    audit.close()
    path = head_path(log_path)
    path.write_bytes(edit(path.read_bytes()))
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert not result.intact
    assert result.problem in ("HEAD_MALFORMED", "HEAD_SIGNATURE_INVALID")
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_no_rearrangement_of_the_slots_hides_a_truncated_tail(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    """Someone without the key cuts off the last record and rearranges what the head file holds
    (each slot kept, copied, swapped or zeroed) to match: every combination is caught."""
    for n in range(4):
        audit.append(_event(n))
    audit.close()
    raw = head_path(log_path).read_bytes()
    log = log_path.read_bytes()
    slots = [raw[:SLOT_STRIDE], raw[SLOT_STRIDE:], bytes(SLOT_STRIDE)]
    truncated = log[: log.rstrip(b"\n").rfind(b"\n") + 1]
    public = key.public_key()
    for first, second in itertools.product(slots, repeat=2):
        head_path(log_path).write_bytes(first + second)
        log_path.write_bytes(truncated)
        assert not verify_audit_log(log_path, public_key=public).intact
        with pytest.raises(DataLoss):
            AuditLog.open(log_path, key)


def test_a_slot_signed_by_another_key_is_refused(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    audit.close()
    forged = audit_head._slot_bytes(
        Head(0, "0" * 64), 0, Ed25519PrivateKey.generate(), "x" * 32, "2026-01-01T00:00:00Z"
    )
    head_path(log_path).write_bytes(forged.ljust(FILE_BYTES, b"\0"))
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert (result.intact, result.problem) == (False, "HEAD_SIGNATURE_INVALID")
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, key)


# --- a lost or failed head write --------------------------------------------------------------


def test_a_head_write_lost_in_a_crash_leaves_the_previous_generation(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The crash case: the batch's lines are durable, its slot write never reached the disk (the
    file is as before the commit). The broker anchors the batch when it next opens the log."""
    audit.append(_event(0))
    before = head_path(log_path).read_bytes()
    audit.append(_event(1))
    audit.close()
    head_path(log_path).write_bytes(before)
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert (result.problem, result.bad_record) == ("UNANCHORED_RECORDS", 2)
    with AuditLog.open(log_path, key) as reopened:
        assert reopened.count == 2
    assert verify_audit_log(log_path, public_key=key.public_key()).intact
    assert _generations(log_path) == [2, 1]


def test_a_failed_head_sync_puts_the_previous_generation_back(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit.append(_event(0))
    before = head_path(log_path).read_bytes()

    synced: list[bytes] = []
    real_sync = os.fdatasync

    def failing_sync(fd: int) -> None:
        synced.append(os.pread(fd, len(before) + 1, 0))
        if len(synced) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)

    monkeypatch.setattr(audit_head.os, "fdatasync", failing_sync)
    with pytest.raises(AuditUnavailable):
        audit.append(_event(1))
    # Neither the refused record nor a head anchoring it stays behind; the previous generation is
    # put back durably (the log's cut-back is synced: a new slot over a shorter log after a power
    # loss would read as tampering). Then one more generation, anchoring the same record, voids
    # the refused one (durably: a restarted broker must not anchor it should its line survive).
    assert synced[1] == before and len(synced) == 3
    parsed = audit_head.parse(head_path(log_path).read_bytes(), key.public_key())
    assert parsed.head.count == 1 and len(parsed.void) == 1 and not parsed.void_all
    assert verify_audit_log(log_path, public_key=key.public_key()).records == 1
    monkeypatch.undo()
    assert audit.append(_event(2)).seq == 1
    assert verify_audit_log(log_path, public_key=key.public_key()).intact


def test_a_head_file_replaced_under_the_broker_is_read_again(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The broker keeps the head open; a file renamed over it (an operator's restore, an older
    broker) must not be overwritten blindly through the stale descriptor."""
    audit.append(_event(0))
    path = head_path(log_path)
    replacement = path.with_name("replacement")
    replacement.write_bytes(EDITS["swap"](path.read_bytes()))
    os.replace(replacement, path)
    with pytest.raises(DataLoss):
        audit.append(_event(1))


def test_the_heads_temporary_file_is_never_followed_through_a_symlink(
    log_path: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """A new head was written to `.NAME.head.<pid>.tmp`, opened with O_CREAT|O_TRUNC and following
    symlinks: a symlink planted under that predictable name (a container's broker is often pid 1)
    made the broker truncate and overwrite any file it may write, then rename the symlink into
    place as the head. It runs for every new log and every format-1 conversion."""
    victim = tmp_path / "precious"
    victim.write_bytes(b"not the broker's to overwrite\n")
    planted = log_path.with_name(f".{log_path.name}.head.{os.getpid()}.tmp")
    planted.symlink_to(victim)
    with contextlib.suppress(AuditUnavailable, DataLoss):  # refusing is fine; clobbering is not
        AuditLog.open(log_path, key).close()
    assert victim.read_bytes() == b"not the broker's to overwrite\n"
    assert not head_path(log_path).is_symlink()
    leftovers = {p.name for p in log_path.parent.iterdir()} - {
        log_path.name,
        head_path(log_path).name,
        planted.name,
        victim.name,
    }
    assert not leftovers


# --- format 1 ---------------------------------------------------------------------------------


def _legacy_head(log_path: Path, key: Ed25519PrivateKey) -> bytes:
    """The format-1 head (one JSON line) for the log as it is."""
    parsed = parse(head_path(log_path).read_bytes(), None)
    body = {
        "v": 1,
        "count": parsed.head.count,
        "last_hash": parsed.head.last_hash,
        "time": "2026-01-01T00:00:00.000000Z",
        "key": "x" * 32,
    }
    signature = base64.b64encode(key.sign(HEAD_DOMAIN + canonical_json(body))).decode()
    return canonical_json({**body, "sig": signature}) + b"\n"


def test_a_format_1_head_is_verified_and_converted_on_open(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    for n in range(3):
        audit.append(_event(n))
    audit.close()
    head_path(log_path).write_bytes(_legacy_head(log_path, key))
    assert verify_audit_log(log_path, public_key=key.public_key()).intact
    with AuditLog.open(log_path, key) as reopened:
        assert head_path(log_path).stat().st_size == FILE_BYTES
        assert _generations(log_path) == [0, None]
        assert reopened.append(_event(3)).seq == 3
    assert verify_audit_log(log_path, public_key=key.public_key()).records == 4


def test_a_format_1_head_is_still_checked(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    audit.append(_event(0))
    audit.close()
    head_path(log_path).write_bytes(_legacy_head(log_path, Ed25519PrivateKey.generate()))
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert (result.intact, result.problem) == (False, "HEAD_SIGNATURE_INVALID")
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, key)


# --- the head signed while the batch's records are written back -------------------------------


def test_the_head_is_signed_before_the_records_fsync_and_written_after_it(
    audit: AuditLog, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit signs the head that will anchor its records while the disk writes them (their
    writeback started first), not after their fsync, where it was on every release's path; the
    head itself is still written, and synced, only once the records are durable."""
    audit.append(_event(0))
    steps: list[str] = []
    log_fd = audit._fd
    real_slot, real_fsync, real_pwrite = audit_head._slot_bytes, os.fsync, os.pwrite
    real_writeback = getattr(audit_module, "start_writeback", None)

    def slot_bytes(*args: object, **kwargs: object) -> bytes:
        steps.append("sign head")
        return real_slot(*args, **kwargs)  # type: ignore[arg-type]

    def writeback(fd: int, offset: int, length: int) -> bool:
        steps.append("start writeback" if fd == log_fd else "start writeback elsewhere")
        return real_writeback is not None and real_writeback(fd, offset, length)

    def fsync(fd: int) -> None:
        steps.append("fsync records" if fd == log_fd else "fsync other")
        real_fsync(fd)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        steps.append("write head")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(audit_head, "_slot_bytes", slot_bytes)
    monkeypatch.setattr(audit_module, "start_writeback", writeback, raising=False)
    monkeypatch.setattr(audit_module.os, "fsync", fsync)
    monkeypatch.setattr(audit_head.os, "pwrite", pwrite)
    size = log_path.stat().st_size
    audit.append(_event(1))
    assert steps == ["start writeback", "sign head", "fsync records", "write head"]
    monkeypatch.undo()
    assert _generations(log_path) == [2, 1]
    assert verify_audit_log(log_path).intact
    assert log_path.stat().st_size > size


def test_a_head_prepared_for_another_head_or_generation_is_not_written(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    """A slot signed ahead (:meth:`HeadFile.prepare`) is written only by a plain write of the
    very head it was signed for: a commit that failed between the two, or a write that voids
    records (a refused batch), signs its own."""
    audit.append(_event(0))
    heads = audit._head
    current = Head(audit.count, audit._last_hash, 0)
    heads.prepare(Head(current.count + 5, "ab" * 32, 0))  # never committed
    heads.write(current)  # the same anchor again, in the next generation
    parsed = parse(head_path(log_path).read_bytes(), key.public_key())
    assert (parsed.generation, parsed.head) == (2, current)
    heads.prepare(current)
    heads.write(current, void=("cd" * 16,))
    parsed = parse(head_path(log_path).read_bytes(), key.public_key())
    assert (parsed.generation, parsed.head, parsed.void) == (3, current, ("cd" * 16,))
    assert verify_audit_log(log_path, public_key=key.public_key()).intact


def test_a_directory_sync_that_fails_after_a_new_head_is_logged_with_its_errno(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new head file is in place and the directory's sync fails (EIO, which no mode makes):
    the write stands (failing it would cut back records the head anchors), and the ERROR line
    said ``...: Input/output error``, the only audit line naming a failed call without its
    errno. It names it now, after the same words (alerts match them)."""
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if fd == dir_fd:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    raw_public = key.public_key().public_bytes_raw()
    head_file = audit_head.HeadFile(
        tmp_path / "audit.log.head",
        key,
        audit_head.key_fingerprint(raw_public),
        lambda: "2026-01-01T00:00:00Z",
        dir_fd,
    )
    try:
        monkeypatch.setattr(audit_head.os, "fsync", failing_fsync)
        with caplog.at_level(logging.ERROR, logger=audit_head.__name__):
            head_file.write(Head(0, audit_head.GENESIS_HASH, 0))
        monkeypatch.undo()
        assert head_file.generation == 0
    finally:
        head_file.close()
        os.close(dir_fd)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "cannot fsync the audit directory after a head update: Input/output error (EIO)"
    ]
