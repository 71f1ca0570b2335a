"""A SIGTERM while a service starts (``strongroom serve``, real processes: step-ca, SoftHSM2, the
audit log, the storage real): the start stops at its next checkpoint, through its cleanup, with
the documented status and last line (README, "Stopping"), whatever step it was in.

tests.e2e.early_stop_launcher pauses a start at a named checkpoint
(strongroom.runtime.starting) or signals it from inside a step.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.dev.devstack import DevStack
from strongroom.keybroker.audit import AuditLog, load_signing_key
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.runtime.process import SERVICE_ENV
from strongroom.runtime.secrets import Secret
from tests.conftest import REPO, stack_root

STOPPING = "signal received while starting; stopping"


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """step-ca, the broker's HSM token and secrets, every service's configuration; nothing
    running but the CA."""
    with DevStack(
        stack_root(tmp_path_factory, "early-stop", simulated_tee_dir),
        step_ca_binary=step_ca_binary,
    ) as dev:
        for service in ("keybroker", "modelstore", "inference"):
            dev.write_config(service)
        yield dev


def _start(stack: DevStack, service: str, mode: str, arg: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.e2e.early_stop_launcher",
            mode,
            arg,
            "--",
            "serve",
            service,
            "--config",
            str(stack.config_path(service)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, **SERVICE_ENV[service], "PYTHONPATH": str(REPO)},
    )


def _stop(process: subprocess.Popen[str], expect: str) -> tuple[str, str]:
    """Waits for the line ``expect`` on stdout, sends SIGTERM, and returns the rest of stdout
    and stderr once the process has ended."""
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == f"{expect}\n", line + (process.stderr.read() if process.stderr else "")
        process.send_signal(signal.SIGTERM)
        # A hang, not a speed: a start that did not stop waits here for good.
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    return out, err


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _leftovers(root: Path) -> list[Path]:
    """Temporary files and sockets a start that stopped left under ``root``."""
    return sorted(
        p for p in root.rglob("*") if p.name.endswith(".tmp") or (p.exists() and p.is_socket())
    )


@pytest.mark.parametrize(
    ("service", "point"),
    [
        ("keybroker", "identity"),
        ("keybroker", "hsm"),
        ("keybroker", "audit log"),
        ("keybroker", "keys"),
        ("keybroker", "host"),
        ("keybroker", "serving"),
        ("modelstore", "storage"),
        ("modelstore", "host"),
        ("inference", "attester"),
        ("inference", "host"),
    ],
)
def test_sigterm_at_each_point_of_a_start_stops_it_there_through_its_cleanup(
    stack: DevStack, service: str, point: str
) -> None:
    """SIGTERM while the service is at ``point`` of its start: it stops there, status 143, with
    the line the README promises (then only its cleanup's), no traceback, nothing left behind (temporary files,
    sockets; the store's root lock and the broker's audit log usable at once by the next
    start)."""
    process = _start(stack, service, "pause", point)
    _, stderr = _stop(process, f"paused {point}")
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = _lines(stderr)
    (stop,) = [n for n, line in enumerate(lines) if STOPPING in line]
    assert "signal=15" in lines[stop]
    # After it, only the cleanup's own lines: a host built but never started says it stopped.
    assert all(line.endswith("strongroom.runtime.server: stopped") for line in lines[stop + 1 :])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _leftovers(stack.root) == []
    if service == "modelstore":
        FilesystemStorage(stack.root / "state" / "modelstore" / "data").close()
    if service == "keybroker":  # its lock released, its chain intact
        key = load_signing_key(Secret((stack.secrets_dir / "audit-key.pem").read_bytes()))
        AuditLog.open(stack.root / "state" / "keybroker" / "audit.log", key).close()


def test_sigterm_while_the_broker_waits_for_the_audit_logs_lock_stops_it(stack: DevStack) -> None:
    """Another process holds the audit log's lock (an operator's tool, a replica on the same
    volume): the broker's start waits for it in ``flock``. A SIGTERM then stops it at once,
    status 143, while the lock is still held: a wait that only a raise from the signal handler
    could end would wait for good with a handler that only records the request."""
    path = stack.root / "state" / "keybroker" / "audit.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        process = _start(stack, "keybroker", "reached", "audit log")
        _, stderr = _stop(process, "reached audit log")
    finally:
        os.close(fd)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert STOPPING in _lines(stderr)[-1], stderr[-3000:]
    assert "Traceback" not in stderr


def test_sigterm_while_the_store_builds_on_its_open_storage_closes_the_storage(
    stack: DevStack,
) -> None:
    """The store's build left its storage open when anything stopped it after the storage had
    opened: a SIGTERM there (its early handler raised SystemExit wherever it landed) exited with
    the storage's root lock and index connection still held, never closed. The stop now waits
    for the build's next checkpoint, and the build closes the storage on its way out."""
    root = stack.root / "state" / "modelstore" / "data"
    process = _start(stack, "modelstore", "signal-in-servicer", str(root))
    try:
        out, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert out.splitlines()[-1] == "storage unlocked", stderr[-3000:]
    assert STOPPING in _lines(stderr)[-1], stderr[-3000:]
