"""``strongroom serve keybroker`` as a process of its own (step-ca, SoftHSM2, mTLS and the audit
log real): an operator's SIGHUP seals its audit log and continues the chain, and its stop (the
orchestrator's SIGTERM, an operator's Ctrl-C) drains, closes and exits 0 with the service's
lines written and no traceback. The process keeps its handlers and logging for its whole life
(strongroom.runtime.lifetime): the handler's scope is the service's run, opened on the thread
that runs it, and nothing is given back before the exit."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.dev.devstack import DevStack
from strongroom.keybroker.audit_verify import audit_files, verify_audit_series
from tests.conftest import stack_root

RELEASE_KEY = "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey"
SEALED = "audit log rotation (SIGHUP): sealed as "


@pytest.fixture
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """step-ca, the broker's HSM token, secrets and configuration; nothing running but the CA."""
    with DevStack(
        stack_root(tmp_path_factory, "serve-signals", simulated_tee_dir),
        step_ca_binary=step_ca_binary,
    ) as dev:
        yield dev


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (/proc's SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError("no SigCgt line")


def _until(what: str, done: Callable[[], bool]) -> None:
    # A hang, not a speed: what never happens fails here instead of waiting for good.
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_rotates_its_audit_log_on_sighup_then_stops_cleanly_on_its_signal(
    stack: DevStack, stop: signal.Signals
) -> None:
    running = stack.start_process("keybroker")
    process = running.process
    assert process is not None
    log_path = stack.log_path("keybroker")
    try:
        # SIGHUP's handler comes with the service's after_start, once it serves.
        _until("SIGHUP handled", lambda: _catches(process.pid, signal.SIGHUP))
        # A refused release (a caller without the inference role) is a record to seal.
        release = stack.channel(stack.identity("publisher"), "keybroker").unary_unary(
            RELEASE_KEY,
            request_serializer=None,
            response_deserializer=pb.ReleaseKeyResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            release(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        os.kill(process.pid, signal.SIGHUP)
        _until("the audit log sealed", lambda: SEALED in log_path.read_text())
        assert process.poll() is None  # a rotation, not the end of the broker
        process.send_signal(stop)
        assert process.wait(60) == 0
    finally:
        running.stop()
    lines = log_path.read_text().splitlines()
    assert "Traceback" not in "\n".join(lines)
    draining = [n for n, line in enumerate(lines) if "signal received, draining" in line]
    assert len(draining) == 1
    assert lines[-1].endswith("strongroom.runtime.server: stopped"), lines[-5:]
    audit_dir = stack.root / "state" / "keybroker"
    public_key = load_pem_public_key((stack.secrets_dir / "audit-key.pub.pem").read_bytes())
    assert isinstance(public_key, Ed25519PublicKey)
    series = verify_audit_series(audit_files(audit_dir), public_key=public_key)
    assert series.intact, series
    sealed = next(line for line in lines if SEALED in line).split(SEALED)[1]
    assert sealed in [p.name for p, _ in series.files]
