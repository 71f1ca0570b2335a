"""Review of the audit log as an attacker and an auditor: each test fails on the code it was
written against and names the finding it proves (see the review report).

What the other side controls is the audit directory's contents (the log, its head, other names
beside them), not the broker's signing key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker import audit as audit_module
from strongroom.keybroker.audit import (
    AuditEvent,
    AuditLog,
    Decision,
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
