"""Review of the audit log as an attacker and an auditor: each test fails on the code it was
written against and names the finding it proves (see the review report).

What the other side controls is the audit directory's contents (the log, its head, other names
beside them), not the broker's signing key.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.cli.main import main as cli_main
from strongroom.errors import DataLoss
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import (
    AuditEvent,
    AuditLog,
    Decision,
    canonical_json,
    head_path,
    record_hash,
    verify_audit_log,
)
from strongroom.keybroker.errors import AuditUnavailable


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    directory = tmp_path / "audit"
    directory.mkdir()
    return directory / "decisions.jsonl"


@pytest.fixture
def audit(log_path: Path, key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    with AuditLog.open(log_path, key) as log:
        yield log


def _event(reason: str = "OK") -> AuditEvent:
    return AuditEvent(decision=Decision.ALLOWED, reason=reason, claims={"n": 1})


def _fill(log: AuditLog, count: int) -> None:
    for _ in range(count):
        log.append(_event())


# --- 3. the verifier hangs on a FIFO, and holds the broker up while it does ----------------------


def _unblock_fifo(path: Path) -> None:
    """Releases a reader blocked opening ``path`` (a FIFO): a writer comes and goes."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("which", ["head", "log"])
def test_verify_never_hangs_on_a_fifo(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey, which: str
) -> None:
    """`audit verify` opened the log and head by name and read them: a FIFO put in place of
    either (anyone who can write the directory) blocks it in open() forever; a cron job piles up."""
    _fill(audit, 1)
    target = head_path(log_path) if which == "head" else log_path
    target.unlink()
    os.mkfifo(target)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(verify_audit_log(log_path, public_key=key.public_key()))
        except Exception as exc:
            outcome.append(exc)

    verifier = threading.Thread(target=run, daemon=True)
    verifier.start()
    verifier.join(3)
    hung = verifier.is_alive()
    _unblock_fifo(target)
    verifier.join(5)
    assert not hung, "verify_audit_log blocked on a FIFO"


def test_a_verify_hung_on_a_fifo_head_does_not_stall_the_brokers_commits(
    audit: AuditLog, log_path: Path
) -> None:
    """Worse for the head: the verifier opens it while holding its shared flock on the log, which
    every commit takes exclusively; the broker's releases then hang (instead of being refused as
    the broker itself refuses a head it cannot read) for as long as the verifier does."""
    _fill(audit, 1)
    head_path(log_path).unlink()
    os.mkfifo(head_path(log_path))
    verifier = threading.Thread(target=lambda: verify_audit_log(log_path), daemon=True)
    verifier.start()
    verifier.join(1)
    answered: list[str] = []

    def append() -> None:
        try:
            audit.append(_event())
            answered.append("committed")
        except (AuditUnavailable, DataLoss) as exc:
            answered.append(type(exc).__name__)

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    writer.join(3)
    stalled = writer.is_alive()
    _unblock_fifo(head_path(log_path))
    verifier.join(5)
    writer.join(5)
    assert not stalled, "the broker's commit waited on a verifier blocked on a FIFO"


# --- 5. the CLI prints a crafted record's text raw to the auditor's terminal ---------------------


def test_verify_cli_prints_no_terminal_control_sequences_from_the_log(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    """SEQUENCE_BROKEN's message interpolates the record's `seq`, which can be any JSON string:
    escape sequences in it reach the auditor's terminal and can overwrite the NOT intact line with
    a forged 'intact' one. strongroom.cli._text.printable exists for exactly this."""
    _fill(audit, 2)
    first, second = log_path.read_bytes().splitlines(keepends=True)
    record = json.loads(second)
    record.pop("hash")
    record["seq"] = f"\x1b[1A\x1b[2K\r{log_path}: intact: 2 records, chain intact\n"
    record["hash"] = record_hash(record)
    log_path.write_bytes(first + canonical_json(record) + b"\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["audit", "verify", str(log_path)])
    assert code == 2
    printed = err.getvalue()
    assert "\x1b" not in printed and "\r" not in printed
    assert printed.count("\n") == 1, printed


# --- 6. the in-process memory of refused records is bounded --------------------------------------


def test_a_refused_record_is_never_anchored_however_many_batches_failed_since(
    audit: AuditLog, log_path: Path, key: Ed25519PrivateKey
) -> None:
    """The hashes of cut-back records are kept in a deque of 256 (four full batches). While the
    disk stays full every refused batch lands at the same position, so under load the first
    refused batch is forgotten within five failed commits; its signed lines, put back, are then
    anchored by the same process (no restart, unlike the known case) and verify calls it intact."""
    audit.append(_event())
    captured: list[bytes] = []
    real_write_head = audit._write_head

    def full_disk(_head: object) -> None:
        captured.append(log_path.read_bytes().splitlines(keepends=True)[-1])
        raise OSError(28, "No space left on device")

    audit._write_head = full_disk  # type: ignore[method-assign]
    for n in range(audit_module._REVOKED_MAX + 1):
        with pytest.raises(AuditUnavailable):
            audit.append(_event("REFUSED_FIRST" if n == 0 else "REFUSED"))
    audit._write_head = real_write_head  # type: ignore[method-assign]
    with log_path.open("ab") as f:
        f.write(captured[0])
    audit.append(_event("LATER"))
    assert b"REFUSED_FIRST" not in log_path.read_bytes()
