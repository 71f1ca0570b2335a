"""``strongroom serve keybroker`` as a process of its own (step-ca, SoftHSM2, mTLS and the audit
log real): an operator's SIGHUP seals its audit log and continues the chain, and its stop (the
orchestrator's SIGTERM, an operator's Ctrl-C) drains, closes and exits 0 with the service's
lines written and no traceback. The process keeps its handlers and logging for its whole life
(strongroom.runtime.lifetime): the handler's scope is the service's run, opened on the thread
that runs it, and nothing is given back before the exit. A SIGHUP while a service starts
(held at a start-up checkpoint by tests.e2e.early_stop_launcher) is the broker's one rotation
once it serves, and logged and ignored by the model store (strongroom.runtime.hangup)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.dev.devstack import DevStack, RunningService
from strongroom.keybroker.audit_verify import audit_files, verify_audit_series
from tests.conftest import REPO, stack_root

RELEASE_KEY = "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey"
SEALED = "audit log rotation (SIGHUP): sealed as "
ROTATION = "audit log rotation (SIGHUP)"
DEFERRED = "SIGHUP during start-up: the audit log will be rotated once serving"
IGNORED = "SIGHUP ignored: this service has no action for it"


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
        # Sent as soon as it serves: a SIGHUP before the rotation's handler (after_start) is
        # start-up's, the rotation done once that handler is in place.
        _refuse_a_release(stack)
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
    _sealed_and_intact(stack, lines)


def _refuse_a_release(stack: DevStack) -> None:
    """A refused release (a caller without the inference role): a record for a rotation to
    seal."""
    release = stack.channel(stack.identity("publisher"), "keybroker").unary_unary(
        RELEASE_KEY,
        request_serializer=None,
        response_deserializer=pb.ReleaseKeyResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as refused:
        release(b"", timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _sealed_and_intact(stack: DevStack, lines: list[str]) -> None:
    """The broker's audit series verifies, and holds the file the log's one seal named."""
    audit_dir = stack.root / "state" / "keybroker"
    public_key = load_pem_public_key((stack.secrets_dir / "audit-key.pub.pem").read_bytes())
    assert isinstance(public_key, Ed25519PublicKey)
    series = verify_audit_series(audit_files(audit_dir), public_key=public_key)
    assert series.intact, series
    (sealed,) = [line.split(SEALED)[1] for line in lines if SEALED in line]
    assert sealed in [p.name for p, _ in series.files]


class _Held:
    """``strongroom serve SERVICE`` (``stack.start_process``, on a thread of its own: it returns
    once the service is SERVING) with its start-up held at checkpoint ``point`` until
    :meth:`release` (tests.e2e.early_stop_launcher's ``hold``)."""

    def __init__(self, stack: DevStack, service: str, point: str, release: Path) -> None:
        self.point = point
        self.release_file = release
        self.log_path = stack.log_path(service)
        self.offset = self.log_path.stat().st_size  # an earlier run's lines are not this one's
        self.started: list[RunningService] = []
        self.failed: list[BaseException] = []
        launcher = (
            sys.executable,
            "-m",
            "tests.e2e.early_stop_launcher",
            "hold",
            f"{point}:{release}",
            "--",
        )

        def start() -> None:
            try:
                self.started.append(
                    stack.start_process(service, launcher=launcher, env={"PYTHONPATH": str(REPO)})
                )
            except BaseException as exc:  # the test's thread raises it
                self.failed.append(exc)

        self.thread = threading.Thread(target=start, name=f"starting-{service}", daemon=True)
        self.thread.start()

    def lines(self) -> list[str]:
        """This run's lines so far."""
        return self.log_path.read_bytes()[self.offset :].decode().splitlines()

    def until(self, text: str, count: int = 1) -> None:
        """Waits until ``count`` of this run's lines hold ``text``; fails at once if the start
        ended meanwhile (the process died: a SIGHUP's default action)."""

        def seen() -> bool:
            if self.failed:
                raise AssertionError(f"waiting for {text!r}: {self.failed[0]}")
            return sum(text in line for line in self.lines()) >= count

        _until(text, seen)

    def held(self) -> int:
        """The process's id, once its start-up is held."""
        prefix = f"held {self.point} "
        self.until(prefix)
        (line,) = [line for line in self.lines() if line.startswith(prefix)]
        return int(line.removeprefix(prefix))

    def release(self) -> RunningService:
        """Lets start-up go on; the service once SERVING."""
        self.release_file.touch()
        self.thread.join(120)  # a hang, not a speed: start_process gives up after 60 s
        if self.failed:
            raise self.failed[0]
        (running,) = self.started
        return running


def test_sighups_while_the_broker_starts_are_one_rotation_once_it_serves(
    stack: DevStack, tmp_path: Path
) -> None:
    """SIGHUP had its default action until the broker served (its rotation's handler came with
    after_start): a logrotate ``kill -HUP`` during a restart (enrolment, the HSM, the key scan)
    killed the broker, no line logged, its drain skipped and its audit log closed uncleanly.
    Taken now from start-up's first handler on: each logged, and one rotation once it serves
    however many came."""
    first = stack.start_process("keybroker")
    assert first.process is not None
    _refuse_a_release(stack)  # what the next run's rotation seals
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0
    held = _Held(stack, "keybroker", "identity", tmp_path / "release")
    try:
        pid = held.held()  # before its enrolment
        for count in (1, 2):  # one after the other: signals pending at once are one
            os.kill(pid, signal.SIGHUP)
            held.until(DEFERRED, count)
        process = held.release().process
        assert process is not None
        held.until(SEALED)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        held.release_file.touch()
        held.thread.join(120)
    lines = held.lines()
    assert "Traceback" not in "\n".join(lines)
    assert sum(ROTATION in line for line in lines) == 1, [
        line for line in lines if ROTATION in line
    ]
    assert lines[-1].endswith("strongroom.runtime.server: stopped"), lines[-5:]
    _sealed_and_intact(stack, lines)


def test_a_sighup_to_the_model_store_starting_or_serving_is_logged_and_ignored(
    stack: DevStack, tmp_path: Path
) -> None:
    """The model store never took SIGHUP: one sent while it started (its storage's opening, a
    sweep of an object store's index) or served ended it, killed by the signal. It is logged
    and ignored now, from start-up's first handler on, and its stop is as clean as ever."""
    held = _Held(stack, "modelstore", "storage", tmp_path / "release")
    try:
        pid = held.held()  # its storage open
        os.kill(pid, signal.SIGHUP)
        held.until(IGNORED)
        process = held.release().process
        assert process is not None
        os.kill(pid, signal.SIGHUP)  # serving
        held.until(IGNORED, 2)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        held.release_file.touch()
        held.thread.join(120)
    lines = held.lines()
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].endswith("strongroom.runtime.server: stopped"), lines[-5:]
