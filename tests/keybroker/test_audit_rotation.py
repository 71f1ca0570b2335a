"""Audit log rotation: sealed files, a chain that continues across them, crash recovery at every
step of a rotation, and `audit verify` on a series of files.

Before rotation the log only grew: with a size cap the broker refused every decision once it was
full (AUDIT_LOG_FULL) until an operator archived it and started a new log by hand, whose chain
had nothing to do with the old one. Crashes are simulated as the other audit tests do: by putting
the files in the state a crash at that step leaves, then opening them with a new AuditLog.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom.cli import audit as audit_cli
from strongroom.errors import DataLoss, InvalidArgument, NotFound
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_verify
from strongroom.keybroker import server as server_module
from strongroom.keybroker.audit import AuditLog, head_path
from strongroom.keybroker.audit_verify import audit_files, verify_audit_log, verify_audit_series
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.keybroker.server import rotate_audit_on_sighup
from strongroom.runtime import signals

from .test_audit import REPO, _signing_key_file, event, fill, lines
from .test_audit_cli import _run
from .test_audit_group_commit import _wait_until

RECORD = 900  # a test record line is 842..861 bytes: N * RECORD holds N of them, not N + 1


def _series(log_path: Path, key: Ed25519PrivateKey) -> audit_verify.SeriesVerification:
    return verify_audit_series(audit_files(log_path.parent), public_key=key.public_key())


def _names(log_path: Path) -> list[str]:
    return sorted(os.listdir(log_path.parent))


def test_a_log_past_rotate_bytes_is_sealed_and_its_chain_goes_on(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        records = [log.append(event(n)) for n in range(8)]
        assert [r.seq for r in records] == list(range(8))  # seq numbers run on across files
        assert log.count == 8 and log.first_seq == 6
    assert _names(log_path) == [
        "audit.log",
        "audit.log.0-2",
        "audit.log.0-2.head",
        "audit.log.3-5",
        "audit.log.3-5.head",
        "audit.log.head",
    ]
    sealed = verify_audit_log(log_path.with_name("audit.log.3-5"), public_key=key.public_key())
    assert sealed.intact and sealed.sealed and (sealed.first_seq, sealed.records) == (3, 3)
    active = verify_audit_log(log_path, public_key=key.public_key())
    assert active.intact and not active.sealed and (active.first_seq, active.records) == (6, 2)
    assert active.anchor == sealed.last_hash  # the new log's chain starts at the sealed end
    series = _series(log_path, key)
    assert series.intact and (series.first_seq, series.end) == (0, 8), series.message
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:  # a restart goes on
        assert log.append(event(8)).seq == 8
    assert _series(log_path, key).intact


def test_rotate_on_demand_and_an_empty_log_is_not_sealed(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    with AuditLog.open(log_path, key) as log:
        assert log.rotate() is None  # nothing to seal
        fill(log, 2)
        assert log.rotate() == log_path.with_name("audit.log.0-1")
        assert log.rotate() is None
        assert log.append(event(2)).seq == 2
    assert _series(log_path, key).intact


def test_with_rotation_the_size_cap_counts_the_sealed_files(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """Rotation must not let the volume fill past the cap (a Kubernetes emptyDir evicts the pod
    there): sealed files count until they are shipped and deleted, which makes room again."""
    with AuditLog.open(log_path, key, rotate_bytes=2 * RECORD, max_bytes=32 * 1024) as log:
        with pytest.raises(AuditUnavailable) as info:
            for n in range(100):
                log.append(event(n))
        assert info.value.reason == "AUDIT_LOG_FULL"
        total = sum(p.stat().st_size for p in log_path.parent.iterdir())
        assert total <= 32 * 1024 + 8192  # all but the active log's head count against the cap
        for path in audit_files(log_path.parent):  # shipped: the operator deletes the sealed
            if path == log_path:
                continue
            path.unlink()
            head_path(path).unlink()
        assert log.append(event(0)).seq == log.count - 1
    series = _series(log_path, key)
    assert series.intact and series.first_seq > 0 and "starts at seq" in series.message


def test_sighup_rotates_the_brokers_audit_log(log_path: Path, key: Ed25519PrivateKey) -> None:
    """An operator's rotation (before shipping the log, before draining a pod): `kill -HUP` to
    the broker, whatever audit_rotate_bytes says."""
    previous = signal.getsignal(signal.SIGHUP)
    try:
        with signals.restoring(), AuditLog.open(log_path, key) as log:
            fill(log, 2)
            rotate_audit_on_sighup(log)
            os.kill(os.getpid(), signal.SIGHUP)
            _wait_until(lambda: log.first_seq == 2, "the rotation SIGHUP asked for")
            assert log.append(event(2)).seq == 2
    finally:
        signal.signal(signal.SIGHUP, previous)
    series = _series(log_path, key)
    assert series.intact and [p.name for p, _ in series.files] == ["audit.log.0-1", "audit.log"]


def test_a_sighup_once_the_audit_log_is_closed_is_one_line_and_nothing_rotated(
    log_path: Path, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """``strongroom serve`` keeps the rotation's handler until its exit (and a stop's close
    runs with it installed): a SIGHUP once the broker had closed its audit log started a
    rotation thread that failed, logged at ERROR (``audit log rotation (SIGHUP) failed``), an
    alert for nothing. It is one INFO line now, no thread, nothing on disk changed; so is a
    rotation asked for before the close that starts after it."""
    previous = signal.getsignal(signal.SIGHUP)
    try:
        with signals.restoring(), caplog.at_level(logging.INFO, logger=server_module.__name__):
            log = AuditLog.open(log_path, key)
            fill(log, 2)
            rotate_audit_on_sighup(log)
            log.close()
            before = _names(log_path)
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.settle(30)
            assert not [t for t in threading.enumerate() if t.name == "audit-rotate"]
            # A rotation whose thread meets the close (the stop's, as a SIGHUP came).
            server_module._rotate_audit_now(log)
    finally:
        signal.signal(signal.SIGHUP, previous)
    rotation = [r for r in caplog.records if "SIGHUP" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in rotation] == [
        (logging.INFO, server_module.ROTATION_CLOSED)
    ] * 2
    assert _names(log_path) == before
    assert _series(log_path, key).intact


def test_sighup_rotation_outside_a_service_s_run_is_refused_leaving_sighup_as_it_was(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """Called outside a service's run (which gives SIGHUP back when it ends), the rotation's
    handler stayed the process's for good: a later SIGHUP rotated a log long closed. It is
    refused now, SIGHUP's handler unchanged."""
    before = signal.getsignal(signal.SIGHUP)
    with AuditLog.open(log_path, key) as log, pytest.raises(RuntimeError, match="SIGHUP"):
        rotate_audit_on_sighup(log)
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_sighup_storm_makes_at_most_two_rotation_threads(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """Each SIGHUP started a thread of its own, which waited for the audit's lock: a storm of
    them while a commit was stuck on a slow disk piled up threads until the process could start
    no more (and the handler's error then surfaced in the main thread). Signals while a rotation
    has not started yet are now one request; the one under way and one after it remain."""
    previous = signal.getsignal(signal.SIGHUP)

    def rotating() -> int:
        return sum(t.name == "audit-rotate" for t in threading.enumerate())

    def hup() -> bool:
        os.kill(os.getpid(), signal.SIGHUP)
        return False

    try:
        with signals.restoring(), AuditLog.open(log_path, key) as log:
            fill(log, 2)
            rotate_audit_on_sighup(log)
            with log._lock:  # a commit stuck on the disk
                # Signals until a second rotation waits behind the first (the signals that came
                # before the first had started are one request), then a storm.
                _wait_until(lambda: hup() or rotating() >= 2, "the rotation threads")
                for _ in range(20):
                    os.kill(os.getpid(), signal.SIGHUP)
                assert signals.settle(30)  # each thread they asked for has been started
                assert rotating() == 2
            _wait_until(lambda: rotating() == 0, "the rotations")
            assert log.first_seq == 2  # sealed once; the second found nothing new to seal
            assert log.append(event(2)).seq == 2
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert _series(log_path, key).intact


def test_a_process_sharing_the_log_follows_rotations_whose_sealed_file_was_shipped(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """A process sharing the log that was idle across another's rotation finds the file it
    writes under its sealed name; once retention had shipped and deleted that file (and its
    head) it found it nowhere and latched tampering (AUDIT_LOG_TAMPERED: every decision refused
    until a restart). It now follows the chain from the file's end, which the next file must
    continue; an active log deleted under it is still tampering."""
    first = AuditLog.open(log_path, key)
    second = AuditLog.open(log_path, key)
    try:
        fill(first, 3)
        assert second.append(event(3)).seq == 3  # then idle
        first.rotate()
        fill(first, 2)
        first.rotate()
        assert first.append(event(6)).seq == 6
        for name in ("audit.log.0-3", "audit.log.0-3.head"):  # shipped
            (log_path.parent / name).unlink()
        assert second.append(event(7)).seq == 7
        assert first.append(event(8)).seq == 8
        series = _series(log_path, key)
        assert series.intact and (series.first_seq, series.end) == (4, 9), series.message
        # The active log and its head deleted under both: nothing continues it.
        log_path.unlink()
        head_path(log_path).unlink()
        with pytest.raises(DataLoss) as info:
            second.append(event(9))
        assert info.value.reason == "AUDIT_LOG_TAMPERED"
    finally:
        first.close()
        second.close()


def test_sealed_files_of_an_operators_rotation_count_against_the_cap_too(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """SIGHUP rotates without audit_rotate_bytes: its sealed files fill the volume all the same."""
    with AuditLog.open(log_path, key, max_bytes=24 * 1024) as log:
        with pytest.raises(AuditUnavailable) as info:
            for n in range(100):
                log.append(event(n))
                if n % 3 == 2:
                    log.rotate()  # refused too once its new head would pass the cap
        assert info.value.reason == "AUDIT_LOG_FULL"
        with pytest.raises(AuditUnavailable) as info:
            for n in range(100):
                log.append(event(n))
        assert "sealed files included" in info.value.message
    total = sum(p.stat().st_size for p in log_path.parent.iterdir())
    assert total <= 24 * 1024 + 8192  # all but the active log's head count against the cap


# --- a crash at every step of a rotation ------------------------------------------------------


def _rotated(log_path: Path, key: Ed25519PrivateKey, records: int) -> dict[str, bytes]:
    """Writes ``records`` and rotates (the new log stays empty); returns what the crash states
    of _CRASHES need besides the files: the head as it was before the seal."""
    with AuditLog.open(log_path, key) as log:
        fill(log, records)
        before_seal = head_path(log_path).read_bytes()
        log.rotate()
    return {"pre-seal head": before_seal}


def _latest_sealed(log_path: Path) -> Path:
    """The sealed log the last rotation made (audit.log.0-2 unless older ones are beside it)."""
    found = [
        re.fullmatch(re.escape(log_path.name) + r"\.([0-9]+)-[0-9]+", n) for n in _names(log_path)
    ]
    return log_path.with_name(max((m for m in found if m), key=lambda m: int(m[1]))[0])


def _crash_after_seal(log_path: Path, saved: dict[str, bytes]) -> None:
    sealed = _latest_sealed(log_path)
    os.replace(sealed, log_path)
    os.replace(head_path(sealed), head_path(log_path))


def _crash_before_seal_reached_the_disk(log_path: Path, saved: dict[str, bytes]) -> None:
    _crash_after_seal(log_path, saved)
    head_path(log_path).write_bytes(saved["pre-seal head"])


def _crash_after_log_renamed(log_path: Path, saved: dict[str, bytes]) -> None:
    log_path.unlink()
    os.replace(head_path(_latest_sealed(log_path)), head_path(log_path))


def _crash_after_head_renamed(log_path: Path, saved: dict[str, bytes]) -> None:
    log_path.unlink()
    head_path(log_path).unlink()


def _crash_after_new_log_created(log_path: Path, saved: dict[str, bytes]) -> None:
    head_path(log_path).unlink()


def _crash_after_new_head(log_path: Path, saved: dict[str, bytes]) -> None:
    pass


_CRASHES: dict[str, Callable[[Path, dict[str, bytes]], None]] = {
    "seal-lost": _crash_before_seal_reached_the_disk,
    "sealed": _crash_after_seal,
    "log-renamed": _crash_after_log_renamed,
    "head-renamed": _crash_after_head_renamed,
    "new-log-created": _crash_after_new_log_created,
    "new-head-written": _crash_after_new_head,
}


@pytest.mark.parametrize("crash", list(_CRASHES))
def test_a_crash_at_any_step_of_a_rotation_is_recovered_at_the_next_open(
    log_path: Path, key: Ed25519PrivateKey, crash: str
) -> None:
    saved = _rotated(log_path, key, 3)
    _CRASHES[crash](log_path, saved)
    with AuditLog.open(log_path, key) as log:
        assert log.count == 3
        assert log.first_seq == (0 if crash == "seal-lost" else 3)
        assert log.append(event(3)).seq == 3
        log.rotate()
        assert log.append(event(4)).seq == 4
    series = _series(log_path, key)
    assert series.intact and (series.first_seq, series.end) == (0, 5), series.message
    expected = ["audit.log.0-2"] if crash != "seal-lost" else ["audit.log.0-3"]
    assert [p.name for p, _ in series.files][: len(expected)] == expected


# The process dies (os._exit: no close, no cleanup) at a step of a rotation it started itself.
_DIES_MID_ROTATION = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from strongroom.keybroker import audit, audit_head
    from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
    path, key = Path(sys.argv[1]), load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    step = sys.argv[3]
    log = AuditLog.open(path, key, rotate_bytes=3000)  # three 875-byte records, not four
    for n in range(3):
        log.append(AuditEvent(decision=Decision.DENIED, reason="BEFORE", claims={"pad": "x" * 300}))
    renames = []
    real_rename = os.rename
    def rename(*args, **kwargs):
        renames.append(args)
        if step == f"rename-{len(renames)}":
            os._exit(70)
        real_rename(*args, **kwargs)
    def create(self, head):
        os._exit(70)
    audit.os.rename = rename
    if step == "new-head":
        audit_head.HeadFile._create = create
    log.append(AuditEvent(decision=Decision.DENIED, reason="ROTATES", claims={"pad": "x" * 300}))
    os._exit(0)
    """
)


@pytest.mark.parametrize("step", ["rename-1", "rename-2", "new-head"])
def test_a_process_killed_during_its_rotation_is_recovered_at_the_next_open(
    tmp_path: Path, step: str
) -> None:
    """The same, with a real process dying before renaming the log (after the seal), before
    renaming the head, and before writing the new log's head."""
    key_file, key, _ = _signing_key_file(tmp_path)
    path = tmp_path / "audit" / "audit.log"
    path.parent.mkdir()
    died = subprocess.run(
        [sys.executable, "-c", _DIES_MID_ROTATION, str(path), str(key_file), step],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,  # it is meant to die
    )
    assert died.returncode == 70, died.stderr.decode()
    with AuditLog.open(path, key) as log:
        assert (log.count, log.first_seq) == (3, 3)
        assert log.append(event(3, reason="AFTER")).seq == 3
    series = _series(path, key)
    assert series.intact and (series.first_seq, series.end) == (0, 4), series.message
    assert b"ROTATES" not in b"".join(b"".join(lines(p)) for p, _ in series.files)


@pytest.mark.parametrize("checked", ["directory", "log"])
def test_audit_verify_judges_a_rotation_cut_between_its_renames_as_the_broker_finishes_it(
    log_path: Path, key: Ed25519PrivateKey, checked: str
) -> None:
    """The first rotation cut after renaming the log (audit.log.0-2, the only sealed file, beside
    the sealed head still at audit.log.head): audit verify called it TAIL_TRUNCATED at audit.log,
    tampering, and (the directory) took audit.log.0-2, headless and oldest, for a file being
    shipped. It is the broker's records, sealed; verify says a rotation was interrupted and
    leaves the files as they are, for the broker's start to finish."""
    saved = _rotated(log_path, key, 3)
    _crash_after_log_renamed(log_path, saved)
    before = {name: log_path.with_name(name).read_bytes() for name in _names(log_path)}
    target = log_path.parent if checked == "directory" else log_path
    result = audit_verify.verify_audit_paths([target], public_key=key.public_key())
    assert result.intact and (result.first_seq, result.end) == (0, 3), result.message
    assert "a rotation was interrupted between its renames" in result.message
    assert "being shipped" not in result.message
    single = verify_audit_log(log_path, public_key=key.public_key())
    assert single.intact and single.sealed and single.rotation_cut == "audit.log.0-2"
    assert {name: log_path.with_name(name).read_bytes() for name in _names(log_path)} == before
    with AuditLog.open(log_path, key) as log:  # the broker finishes it and agrees
        assert (log.count, log.first_seq) == (3, 3)
    assert _series(log_path, key).intact


def test_audit_verify_judges_a_rotation_cut_by_the_head_it_found_there(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify recognised the cut by the sealed head at audit.log.head, then read that path again
    to check the renamed file: a broker's start finishing the rotation in between (the head
    renamed after the log, a new log's head at the path) made it check audit.log.0-2 with the
    new log's head, SEQUENCE_BROKEN, a false tamper alarm (exit 2) with no second look. It
    checks the file with the head that made it a cut: the records it holds do not change."""
    saved = _rotated(log_path, key, 3)
    _crash_after_log_renamed(log_path, saved)
    real_cut = audit_verify._rotation_cut
    looks: list[tuple[Path, bytes] | None] = []

    def broker_starts_meanwhile(
        path: Path, public_key: Ed25519PublicKey | None
    ) -> tuple[Path, bytes] | None:
        found = real_cut(path, public_key)
        looks.append(found)
        if len(looks) == 2:  # the look after the wait, just before the check
            AuditLog.open(log_path, key).close()
        return found

    monkeypatch.setattr(audit_verify, "_rotation_cut", broker_starts_meanwhile)
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert len(looks) == 2 and result.rotation_cut == "audit.log.0-2", looks
    assert result.intact and result.sealed, result.message
    assert (result.first_seq, result.records) == (0, 3)


def test_a_rotation_cut_between_its_renames_with_a_foreign_head_stays_tampering(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The same files, but the sealed head at audit.log.head signed by another key: not the
    broker's rotation, so verify reports it as before (the broker does not start either)."""
    saved = _rotated(log_path, key, 3)
    _crash_after_log_renamed(log_path, saved)
    other = Ed25519PrivateKey.generate()
    result = audit_verify.verify_audit_paths([log_path.parent], public_key=other.public_key())
    assert not result.intact and "rotation was interrupted" not in result.message
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, other)


def test_a_crash_before_the_first_head_of_the_new_log_is_repaired(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The new log's first batch durable, its head not: the crash repair anchors it as usual."""
    _rotated(log_path, key, 3)
    anchor_head = head_path(log_path).read_bytes()
    with AuditLog.open(log_path, key) as log:
        fill(log, 2)
    head_path(log_path).write_bytes(anchor_head)
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert (result.problem, result.bad_record) == ("UNANCHORED_RECORDS", 1)
    with AuditLog.open(log_path, key) as log:
        assert log.count == 5
    assert _series(log_path, key).intact


def test_a_failed_step_refuses_the_batch_and_the_next_commit_finishes_the_rotation(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog.open(log_path, key, rotate_bytes=3 * RECORD)
    fill(log, 3)
    real_rename = os.rename
    calls: list[str] = []

    def rename(src: str, dst: str, **kwargs: int) -> None:
        calls.append(src)
        if len(calls) == 2:  # the head's rename, after the log's
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(audit_module.os, "rename", rename)
    with pytest.raises(AuditUnavailable):
        log.append(event(3, reason="REFUSED"))
    monkeypatch.undo()
    assert log.append(event(4)).seq == 3
    log.close()
    series = _series(log_path, key)
    assert series.intact and series.end == 4
    assert b"REFUSED" not in b"".join(b"".join(lines(p)) for p, _ in series.files)


def test_another_process_sharing_the_log_follows_its_rotation(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    with AuditLog.open(log_path, key) as first, AuditLog.open(log_path, key) as second:
        fill(first, 2)
        assert second.append(event(2)).seq == 2
        first.rotate()
        assert second.append(event(3)).seq == 3  # not taken for a log taken away
        assert first.append(event(4)).seq == 4
        second.rotate()
        assert first.append(event(5)).seq == 5
        first.rotate()  # twice while the other one is idle: it follows through both
        assert first.append(event(6)).seq == 6
        first.rotate()
        assert second.append(event(7)).seq == 7
        assert first.tamper_problem is None and second.tamper_problem is None
    series = _series(log_path, key)
    assert series.intact and series.end == 8 and len(series.files) == 5


def test_verify_during_a_rotation_waits_for_it_instead_of_reporting_tampering(
    log_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cron job's `audit verify` that reads the path half-way through a rotation (here: the
    log renamed, its sealed head not yet) must not raise a tamper alarm: it checks again once
    the broker, holding the directory's lock meanwhile, has finished."""
    saved = _rotated(log_path, key, 3)
    _crash_after_log_renamed(log_path, saved)
    first = audit_verify._verify_audit_log(log_path, key.public_key())
    assert not first.intact  # what one look at the half-done rotation shows
    real_wait = audit_verify._waited_for_rotation

    def broker_finishes_meanwhile(path: Path) -> bool:
        AuditLog.open(log_path, key).close()
        return real_wait(path)

    monkeypatch.setattr(audit_verify, "_waited_for_rotation", broker_finishes_meanwhile)
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert result.intact and result.first_seq == 3


# --- what a rotation must not accept --------------------------------------------------------


def test_a_sealed_log_missing_under_a_sealed_head_is_tampering(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    saved = _rotated(log_path, key, 3)
    _crash_after_log_renamed(log_path, saved)
    log_path.with_name("audit.log.0-2").unlink()
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_records_added_to_a_sealed_log_are_never_anchored(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """A sealed head is final: the crash repair does not anchor records after it, even signed by
    the broker and chained on the sealed end (here: the new log's first record, put back)."""
    saved = _rotated(log_path, key, 3)
    with AuditLog.open(log_path, key) as log:
        log.append(event(3, reason="NEXT"))
    (next_line,) = lines(log_path)
    log_path.unlink()
    head_path(log_path).unlink()
    _crash_after_seal(log_path, saved)
    with log_path.open("ab") as f:
        f.write(next_line)
    result = verify_audit_log(log_path, public_key=key.public_key())
    assert (result.problem, result.bad_record) == ("HEAD_MISMATCH", 4)
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"


def test_a_new_log_does_not_continue_a_truncated_sealed_log(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    saved = _rotated(log_path, key, 3)
    _crash_after_head_renamed(log_path, saved)
    sealed = log_path.with_name("audit.log.0-2")
    sealed.write_bytes(b"".join(lines(sealed)[:2]))
    with pytest.raises(DataLoss) as info:
        AuditLog.open(log_path, key)
    assert info.value.reason == "AUDIT_LOG_TAMPERED"
    assert not log_path.with_name("audit.log.head").exists()  # no new chain was started


def test_a_sealed_log_without_its_head_is_tampering(log_path: Path, key: Ed25519PrivateKey) -> None:
    saved = _rotated(log_path, key, 3)
    _crash_after_head_renamed(log_path, saved)
    head_path(log_path.with_name("audit.log.0-2")).unlink()
    with pytest.raises(DataLoss):
        AuditLog.open(log_path, key)


# --- audit verify on a series -----------------------------------------------------------------


@pytest.fixture
def series_dir(log_path: Path, key: Ed25519PrivateKey) -> Path:
    """Four files: audit.log.0-2, .3-5, .6-8 (sealed) and audit.log (9..10)."""
    with AuditLog.open(log_path, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 11)
    assert len(audit_files(log_path.parent)) == 4
    return log_path.parent


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / name, directory / (name + ".head")


def test_deleting_the_oldest_files_is_retention_not_tampering(
    series_dir: Path, key: Ed25519PrivateKey
) -> None:
    for path in _pair(series_dir, "audit.log.0-2") + _pair(series_dir, "audit.log.3-5"):
        path.unlink()
    result = verify_audit_series(audit_files(series_dir), public_key=key.public_key())
    assert result.intact and result.first_seq == 6 and "starts at seq 6" in result.message


def test_a_file_missing_in_the_middle_is_a_gap(series_dir: Path, key: Ed25519PrivateKey) -> None:
    for path in _pair(series_dir, "audit.log.3-5"):
        path.unlink()
    result = verify_audit_series(audit_files(series_dir), public_key=key.public_key())
    assert (result.intact, result.problem) == (False, "SERIES_GAP")
    assert result.bad_file == series_dir / "audit.log.6-8" and "seq 3..5" in result.message


def test_a_file_of_another_chain_put_in_its_place_breaks_the_link(
    series_dir: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Another log signed with the same key, of the same range, substituted for a sealed file."""
    other = tmp_path / "other" / "audit.log"
    other.parent.mkdir()
    with AuditLog.open(other, key, rotate_bytes=3 * RECORD) as log:
        fill(log, 7)
    for name in ("audit.log.3-5", "audit.log.3-5.head"):
        shutil.copyfile(other.parent / name, series_dir / name)
    result = verify_audit_series(audit_files(series_dir), public_key=key.public_key())
    assert (result.problem, result.bad_file) == ("SERIES_LINK_BROKEN", series_dir / "audit.log.3-5")


def test_files_swapped_by_name_are_reported(series_dir: Path, key: Ed25519PrivateKey) -> None:
    a, b = series_dir / "audit.log.0-2", series_dir / "audit.log.3-5"
    for suffix in ("", ".head"):
        swap = series_dir / "swap"
        os.replace(f"{a}{suffix}", swap)
        os.replace(f"{b}{suffix}", f"{a}{suffix}")
        os.replace(swap, f"{b}{suffix}")
    result = verify_audit_series(audit_files(series_dir), public_key=key.public_key())
    assert result.problem == "SERIES_NAME_MISMATCH"


def test_an_unsealed_file_followed_by_another_is_reported(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    """A sealed file whose head was put back as it was before the seal: records could then be
    added to it and anchored, beside the file that continues it."""
    saved = _rotated(log_path, key, 3)
    with AuditLog.open(log_path, key) as log:
        log.append(event(3))
    head_path(log_path.with_name("audit.log.0-2")).write_bytes(saved["pre-seal head"])
    result = _series(log_path, key)
    assert (result.problem, result.bad_file) == (
        "SERIES_NOT_SEALED",
        log_path.with_name("audit.log.0-2"),
    )


def test_a_tampered_file_in_a_series_is_named(series_dir: Path, key: Ed25519PrivateKey) -> None:
    sealed = series_dir / "audit.log.3-5"
    sealed.write_bytes(b"".join(lines(sealed)[:2]))
    result = verify_audit_series(audit_files(series_dir), public_key=key.public_key())
    assert (result.problem, result.bad_file, result.bad_record) == ("TAIL_TRUNCATED", sealed, 3)


def test_of_several_tampered_files_the_earliest_in_the_chain_is_named(
    series_dir: Path, key: Ed25519PrivateKey
) -> None:
    """By name, audit.log sorts before audit.log.6-8 (and .10-12 before .3-5)."""
    for name in ("audit.log.6-8", "audit.log"):
        path = series_dir / name
        path.write_bytes(b"".join(lines(path)[:1]))
    result = verify_audit_series(audit_files(series_dir), public_key=key.public_key())
    assert (result.problem, result.bad_file) == ("TAIL_TRUNCATED", series_dir / "audit.log.6-8")


def test_the_cli_verifies_a_directory_or_several_paths(
    series_dir: Path, key: Ed25519PrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    public = tmp_path / "audit.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert _run("audit", "verify", str(series_dir), "--public-key", str(public)) == 0
    out = capsys.readouterr().out
    assert "4 files" in out and "seq 0..10" in out and "signatures valid" in out
    # One file alone verifies as before; several paths are a series.
    assert _run("audit", "verify", str(series_dir / "audit.log.3-5")) == 0
    assert "seq 3..5" in capsys.readouterr().out
    paths = [str(series_dir / n) for n in ("audit.log.0-2", "audit.log.6-8", "audit.log")]
    assert _run("audit", "verify", *paths) == 2
    err = capsys.readouterr().err
    assert "SERIES_GAP" in err and "audit.log.6-8" in err


def test_the_cli_checks_an_archive_and_the_live_directory_as_one_series(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``audit verify archive/ live/``: the log's name is the one beside its head (live), and
    the archive's sealed files are of it."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("audit.log.0-2", "audit.log.3-5", "audit.log.6-8"):
        for path in _pair(series_dir, name):
            shutil.move(path, archive / path.name)
    assert _run("audit", "verify", str(archive), str(series_dir)) == 0
    assert "4 files, records seq 0..10" in capsys.readouterr().out
    # The archive alone: its sealed names are of one log, audit.log.
    assert _run("audit", "verify", str(archive)) == 0
    assert "3 files, records seq 0..8" in capsys.readouterr().out
    # The newest archived file missing at the boundary (or left headless in live/ by a shipper
    # that never copied it): a gap between the two directories, whichever comes first.
    for path in _pair(archive, "audit.log.6-8"):
        shutil.move(path, series_dir / path.name)
    (series_dir / "audit.log.6-8.head").unlink()
    assert _run("audit", "verify", str(series_dir), str(archive)) == 2
    assert "SERIES_GAP: records seq 6..8 are missing" in capsys.readouterr().err


def test_a_pair_planted_under_another_name_does_not_choose_the_log_checked(
    series_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An archive (no log beside its head) missing a file from the middle: a copy of a genuine
    sealed pair planted as x and x.head made x the log checked (a log beside its head came before
    the sealed names' log), every file of audit.log left out, and the gap verified intact, exit
    0. Files of several logs now leave the choice to --log-name, which finds the gap."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("audit.log.0-2", "audit.log.6-8"):  # audit.log.3-5 deleted
        for path in _pair(series_dir, name):
            shutil.move(path, archive / path.name)
    for path in _pair(archive, "audit.log.0-2"):
        shutil.copy(path, archive / path.name.replace("audit.log.0-2", "x"))
    with pytest.raises(InvalidArgument, match=r"several audit logs \(audit.log, x\): name the "):
        _run("audit", "verify", str(archive))
    assert _run("audit", "verify", str(archive), "--log-name", "audit.log") == 2
    assert "SERIES_GAP" in capsys.readouterr().err


def test_the_cli_checks_the_log_it_is_told_and_asks_when_there_are_several(
    series_dir: Path, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory holding two logs beside their heads: which is the broker's is not for audit
    verify to guess (it checked them as one series); --log-name says, the other is left out."""
    with AuditLog.open(series_dir / "other.log", key) as log:
        fill(log, 2)
    with pytest.raises(InvalidArgument, match=r"several audit logs \(audit.log, other.log\): "):
        _run("audit", "verify", str(series_dir))
    assert _run("audit", "verify", str(series_dir), "--log-name", "audit.log") == 0
    out = capsys.readouterr().out
    assert "4 files, records seq 0..10" in out
    assert "left out, not of audit.log: 2: other.log, other.log.head" in out
    assert _run("audit", "verify", str(series_dir), "--log-name", "other.log") == 0
    out = capsys.readouterr().out
    assert "1 files, records seq 0..1" in out and "not of other.log: 8: audit.log .. " in out
    with pytest.raises(NotFound, match=r"no audit logs of nothing\.log in"):
        _run("audit", "verify", str(series_dir), "--log-name", "nothing.log")
    for bad in ("", ".audit.log", "../audit.log"):
        with pytest.raises(InvalidArgument, match="give the log's file name"):
            _run("audit", "verify", str(series_dir), "--log-name", bad)


def test_the_cli_checks_a_directory_again_when_a_rotation_came_between_listing_and_check(
    log_path: Path,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`kill -HUP` then `audit verify DIR` races the broker's rotation (it runs in a thread of
    its own): listed before it, the active log was under a sealed name the listing lacked when
    checked, reported SERIES_GAP (a file deleted from the middle: tampering) for an intact log."""
    listing = audit_verify.audit_files
    log = AuditLog.open(log_path, key)
    try:
        fill(log, 3)
        log.rotate()
        fill(log, 2)

        def listed_then_rotated(directory: Path | str, log_name: str | None = None) -> list[Path]:
            found = listing(directory, log_name)
            if log.count == 5:
                log.rotate()  # right after the listing, as a broker's SIGHUP thread may
                log.append(event(5))
            return found

        monkeypatch.setattr(audit_verify, "audit_files", listed_then_rotated)
        monkeypatch.setattr(audit_cli, "audit_files", listed_then_rotated, raising=False)
        assert _run("audit", "verify", str(log_path.parent)) == 0, capsys.readouterr().err
        assert "seq 0..5" in capsys.readouterr().out
    finally:
        log.close()
