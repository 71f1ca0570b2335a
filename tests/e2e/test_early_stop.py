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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from strongroom.dev.devstack import DevStack
from strongroom.inference import server as inference_server
from strongroom.inference.config import InferenceConfig
from strongroom.keybroker import server as keybroker_server
from strongroom.keybroker.audit import AuditLog, load_signing_key
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.modelstore import server as modelstore_server
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.runtime import starting
from strongroom.runtime.bootstrap import open_identity
from strongroom.runtime.config import load_service_config
from strongroom.runtime.process import SERVICE_ENV
from strongroom.runtime.secrets import Secret
from tests.conftest import REPO, stack_root
from tests.ports import listenable

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


def _stop(
    process: subprocess.Popen[str], expect: str, signum: int = signal.SIGTERM
) -> tuple[str, str]:
    """Waits for the line ``expect`` on stdout, sends ``signum``, and returns the rest of stdout
    and stderr once the process has ended."""
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == f"{expect}\n", line + (process.stderr.read() if process.stderr else "")
        process.send_signal(signum)
        # A hang, not a speed: a start that did not stop waits here for good.
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    return out, err


def _raw(data: bytes) -> bytes:
    return data


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _stop_line_then_cleanup(stderr: str) -> str:
    """The log's stop line (the only one), once every line after it is its cleanup's own: a
    host built but never started says it stopped."""
    lines = _lines(stderr)
    (stop,) = [n for n, line in enumerate(lines) if STOPPING in line]
    assert all(line.endswith("strongroom.runtime.server: stopped") for line in lines[stop + 1 :])
    return lines[stop]


def _leftovers(root: Path) -> list[Path]:
    """Temporary files and sockets a start that stopped left under ``root``."""
    return sorted(
        p for p in root.rglob("*") if p.name.endswith(".tmp") or (p.exists() and p.is_socket())
    )


POINTS = [
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
]
"""Each service's start-up checkpoints where a test pauses it (strongroom.runtime.starting)."""


@pytest.mark.parametrize(
    ("service", "point", "signum"),
    [
        *(pytest.param(s, p, signal.SIGTERM, id=f"{s}-{p}") for s, p in POINTS),
        # SIGINT (an operator's Ctrl-C) at one point only: the status is the signal's wherever
        # it lands, and each case is a process (~1 s).
        pytest.param("keybroker", "identity", signal.SIGINT, id="keybroker-identity-SIGINT"),
    ],
)
def test_sigterm_at_each_point_of_a_start_stops_it_there_through_its_cleanup(
    stack: DevStack, service: str, point: str, signum: signal.Signals
) -> None:
    """SIGTERM (or SIGINT) while the service is at ``point`` of its start: it stops there,
    status 143 (130), with the line the README promises (then only its cleanup's), no
    traceback, nothing left behind (temporary files, sockets; the store's root lock and the
    broker's audit log usable at once by the next start)."""
    process = _start(stack, service, "pause", point)
    _, stderr = _stop(process, f"paused {point}", signum)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"signal={int(signum)}" in _stop_line_then_cleanup(stderr)
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
    _stop_line_then_cleanup(stderr)  # its host built now, and released


#: Each service's configuration section and build, for the builds in this process.
BUILDS: dict[str, tuple[type[Any], Callable[..., Any]]] = {
    "keybroker": (KeybrokerConfig, keybroker_server.build),
    "modelstore": (ModelstoreConfig, modelstore_server.build),
    "inference": (InferenceConfig, inference_server.build),
}


@contextmanager
def _stop_requested_at(point: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start-up's stop request as a SIGTERM at ``point`` leaves it, without installing the
    signal handlers in the test's process."""
    request = starting._Request()

    def reached(at: str) -> None:
        if at == point:
            request.signum = signal.SIGTERM

    monkeypatch.setattr(starting, "_reached", reached)
    monkeypatch.setattr(starting._Installed, "request", request)
    yield


@pytest.mark.parametrize("service", sorted(BUILDS))
def test_a_build_stopped_once_its_host_is_built_releases_the_hosts_ports(
    stack: DevStack, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop at the ``host`` checkpoint (the host built, its ports bound) closed what the build
    had opened before it but not the host: its service and health ports stayed bound for the
    life of the process (a library user building again in it was refused the port). Built in
    this process, so that the ports are looked at before it ends."""
    section, build = BUILDS[service]
    common, config = load_service_config(stack.config_path(service), service, section)
    assert common.health_listen is not None
    identity = open_identity(common.identity)
    try:
        with (
            _stop_requested_at("host", monkeypatch),
            pytest.raises(starting.StartupStopped) as stopped,
        ):
            build(common, config, identity=identity)
    finally:
        identity.close()
    assert stopped.value.code == 128 + signal.SIGTERM
    for address in (common.listen, common.health_listen):
        host, port = address.rsplit(":", 1)
        assert listenable(int(port), host)


def test_a_closed_inference_server_has_closed_its_channel_to_the_model_store(
    stack: DevStack,
) -> None:
    """Only the key broker's channels were closed with the inference server: its channel to the
    model store stayed open (its connection, gRPC's polling of it) until the process ended."""
    common, config = load_service_config(
        stack.config_path("inference"), "inference", InferenceConfig
    )
    identity = open_identity(common.identity)
    try:
        server = inference_server.build(common, config, identity=identity)
        server.close()
    finally:
        identity.close()
    stat = server.loader._store_channel.unary_unary(
        "/strongroom.modelstore.v1.ModelStore/Stat", _raw, _raw
    )
    with pytest.raises(ValueError, match="closed channel"):
        stat(b"", timeout=30)
