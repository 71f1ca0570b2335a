"""``audit verify`` on the log of a running broker: a snapshot, never a false alarm.

Operators are told to verify ``/var/lib/strongroom/audit/audit.log`` in place, for instance from a
cron job. A commit that lands while the verifier reads (between its last line and the head, or
between a batch's lines and their head) must not read as tampering.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from strongroom.keybroker.audit import (
    AuditEvent,
    AuditLog,
    Decision,
    load_public_key,
    load_signing_key,
    new_signing_key,
    verify_audit_log,
)
from strongroom.runtime.secrets import Secret

REPO = Path(__file__).resolve().parents[2]

# A writer process committing as fast as it can until its standard input closes.
_WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
    key = load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with AuditLog.open(Path(sys.argv[1]), key) as log:
        print("ready", flush=True)
        n = 0
        while not stop.is_set():
            log.append(AuditEvent(decision=Decision.DENIED, reason="WRITER", claims={"n": n}))
            n += 1
    """
)


def test_verifying_a_log_that_is_being_written_never_reports_tampering(tmp_path: Path) -> None:
    private_pem, public_pem = new_signing_key()
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(private_pem)
    key_file.chmod(0o600)
    path = tmp_path / "audit.log"
    with AuditLog.open(path, load_signing_key(Secret(private_pem))) as log:
        log.append(AuditEvent(decision=Decision.DENIED, reason="FIRST"))
    public_key = load_public_key(public_pem)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(key_file)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdin is not None
    try:
        assert writer.stdout.readline().strip() == "ready"
        results = [verify_audit_log(path, public_key=public_key) for _ in range(150)]
    finally:
        writer.stdin.close()
        assert writer.wait(60) == 0
    problems = [(r.problem, r.message) for r in results if not r.intact]
    assert problems == [], f"{len(problems)} of {len(results)}: {problems[:3]}"
    # Each verification saw a consistent snapshot of a log that kept growing meanwhile.
    counts = [r.records for r in results]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    final = verify_audit_log(path, public_key=public_key)
    assert final.intact and final.records >= counts[-1]
