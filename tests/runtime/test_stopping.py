"""How a service's process ends (``strongroom serve``): on SIGTERM while it starts, and when its
stop gave up on handlers that never return. Real processes (tests.runtime.stopping_service)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from tests.conftest import REPO
from tests.runtime.stopping_service import FULL_STDERR_ENV, LINES, SERVICE, fill_pipe


def _start(mode: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.stopping_service", mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def _raw(data: bytes) -> bytes:
    return data


def _log(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@contextmanager
def _hung_and_signalled(mode: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    """Runs ``mode`` (a hung handler) with ``env``, makes one call and sends SIGTERM once the
    handler runs; the process, to be waited for inside the block (the call is cancelled after
    it)."""
    process = _start(mode, **env)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Call", _raw, _raw).future(b"x", timeout=120)
            assert process.stdout.readline() == "entered\n"
            process.send_signal(signal.SIGTERM)
            yield process
            call.cancel()
    finally:
        process.kill()
        process.wait()


def _stop_hung(mode: str) -> tuple[int, list[dict[str, Any]], str]:
    """:func:`_hung_and_signalled` with ``mode``: the exit status, the log's JSON lines and its
    whole text."""
    with _hung_and_signalled(mode) as process:
        _, stderr = process.communicate(timeout=60)  # a hang, not a speed: it never ended
    return process.returncode, _log(stderr), stderr


def test_a_service_whose_handler_hangs_exits_once_drained_saying_how_many_calls_it_abandoned() -> (
    None
):
    """Past the stop's drain (HANDLER_DRAIN_SECONDS), the process said "stopping without them"
    and then never ended: at exit ``concurrent.futures`` waited for the hung handler's thread,
    until the kubelet killed it at 30 s, its last log lines (queued for a slow collector) lost.
    It writes its log now and exits at once, its last line saying how many calls it abandoned."""
    status, lines, stderr = _stop_hung("hung")
    assert status == 0, stderr
    (drained,) = [r for r in lines if "still running" in r["msg"]]
    assert drained["abandoned"] == 1
    assert (lines[-1]["msg"], lines[-1]["abandoned"]) == ("exiting with 1 calls abandoned", 1)


def test_a_service_whose_close_fails_after_abandoning_calls_still_exits_saying_why() -> None:
    """A close that raised (the key broker's audit log or HSM refusing to close) with calls
    abandoned went past the exit that does not wait for them: the process waited for the hung
    handler's thread at exit, until the kubelet killed it, its last lines lost. It logs why,
    writes its log and exits now, status 1 (the close failed)."""
    status, lines, stderr = _stop_hung("hung-close-raises")
    assert status == 1, stderr[-2000:]
    (failed,) = [r for r in lines if r["msg"].startswith("test cannot run")]
    assert failed["level"] == "ERROR" and "AUDIT_UNAVAILABLE" in failed["msg"]
    assert (lines[-1]["msg"], lines[-1]["abandoned"]) == ("exiting with 1 calls abandoned", 1)


def test_a_service_whose_close_waits_behind_an_abandoned_call_exits_once_the_close_budget_ends() -> (
    None
):
    """The key broker's close runs after the stop gave up on its handlers: its refusal pass
    appends to the audit log, whose commit a hung handler may hold (storage that does not
    answer), and so waited for good; the process with it, until the kubelet killed it, the
    log's last lines lost. Once calls are abandoned the close has CLOSE_SECONDS: past them the
    process says so, writes its log and exits, status 1."""
    status, lines, stderr = _stop_hung("hung-close-hangs")
    assert status == 1, stderr[-2000:]
    (late,) = [r for r in lines if "did not finish" in r["msg"]]
    assert late["level"] == "ERROR"
    assert (lines[-1]["msg"], lines[-1]["abandoned"]) == ("exiting with 1 calls abandoned", 1)


def test_a_service_whose_port_is_taken_says_so_in_its_last_line() -> None:
    """grpcio (1.85) raises a RuntimeError, "Failed to bind to address", for a port another
    process holds, where the host expected a port of 0 and had its own error: the service
    stopped with a traceback on stderr and nothing in its log about why. Its last line names
    the address now and says it is in use (LISTEN_ADDRESS_IN_USE), and the command fails with
    one line, status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        process = _start("listening", str(taken.getsockname()[1]))
        try:
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr[-2000:]
    last = _log(stderr)[-1]
    assert last["level"] == "ERROR"
    assert last["msg"] == (
        f"test cannot run: LISTEN_ADDRESS_IN_USE: cannot listen on {address}: the address is "
        "in use (another process holds the port)"
    )
    assert "Traceback" not in stderr, stderr[-2000:]


def test_sigterm_while_a_service_starts_loses_no_log_line() -> None:
    """SIGTERM had its default action until the host installed its handler, as it began to
    serve: a service still starting (enrolling, opening its HSM) died at once, and the lines
    its log had queued for a collector slow to read were never written. It stops as an error
    would stop it now: its log written, its last line saying why, the status a death by
    SIGTERM reports."""
    process = _start("starting")
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "started\n"  # its log's lines queued: stderr unread
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    lines = _log(stderr)
    starting = [r["msg"] for r in lines if r["msg"].startswith("starting ")]
    assert len(starting) == LINES
    assert (lines[-1]["msg"], lines[-1]["signal"]) == (
        "signal received while starting; stopping",
        signal.SIGTERM,
    )


def test_sigterm_while_a_start_up_step_waits_on_a_thread_pool_exits_without_waiting_for_it() -> (
    None
):
    """A step left running when start-up stopped (strongroom.runtime.starting.interruptible) was
    waited for at exit all the same when it ran on a thread pool: concurrent.futures joins the
    pool's workers at exit once they have run every queued task, so a model store stopped while
    its start-up sweep read its index from an object store that does not answer exited only
    once every read had timed out (minutes), not within 0.05 s as documented. The process now
    ends without waiting for such a step: status 143, its log written, the stop its last line."""
    process = _start("starting-pool")
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)  # a hang, not a speed: it never ended
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    lines = _log(stderr)
    assert lines[-1]["msg"] == "signal received while starting; stopping", stderr[-2000:]
    assert "Traceback" not in stderr


def test_a_second_signal_while_a_starting_service_stops_does_not_cut_its_cleanup_short() -> None:
    """The first SIGTERM while starting raises SystemExit so that the finally clauses run (the
    identity's close, the HSM's, the audit log's); a second signal (SIGINT, an operator's
    second Ctrl-C, or SIGTERM again) raised once more inside them, and what they closed was left
    half closed. Once stopping, a signal is logged and otherwise ignored."""
    process = _start("starting-slow-close")
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGTERM)
        assert process.stdout.readline() == "closing\n"
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate("go\n", timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    lines = _log(stderr)
    assert "identity closed" in [r["msg"] for r in lines]
    ignored = [r["signal"] for r in lines if r["msg"] == "signal received while stopping; ignored"]
    assert sorted(ignored) == sorted([signal.SIGINT, signal.SIGTERM])


TRACES = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS = "opentelemetry.proto.collector.metrics.v1.MetricsService"


@contextmanager
def _silent_collector() -> Iterator[tuple[int, list[str]]]:
    """An OTLP collector on loopback that takes every export and never answers: its port, and
    the services of the exports it received."""
    received: list[str] = []
    released = threading.Event()

    def silent(service: str) -> grpc.GenericRpcHandler[Any, Any]:
        def hold(_request: bytes, _context: grpc.ServicerContext) -> bytes:
            received.append(service)
            released.wait()
            return b""

        return grpc.method_handlers_generic_handler(
            service, {"Export": grpc.unary_unary_rpc_method_handler(hold, _raw, _raw)}
        )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((silent(TRACES), silent(METRICS)))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, received
    finally:
        released.set()
        server.stop(0)


def test_a_collector_that_never_answers_does_not_hold_the_exit_past_the_telemetry_budget() -> None:
    """OpenTelemetry's providers shut down at exit, each waiting for its last export (~10 s
    with a collector that takes it and never answers, the exporter's timeout: here an hour),
    before ``logging.shutdown`` wrote the log: a stop that had used its grace met the kubelet's
    SIGKILL there, its last lines lost. The service writes its log first now, gives both
    exports TELEMETRY_SECONDS together, and exits without them, saying so in its last line."""
    with _silent_collector() as (collector, received):
        process = _start("exporting", str(collector), OTEL_EXPORTER_OTLP_TIMEOUT="3600")
        try:
            assert process.stdout is not None
            int(process.stdout.readline())  # serving
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)  # a hang, not a speed: an hour
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-2000:]
    lines = _log(stderr)
    messages = [r["msg"] for r in lines]
    assert "stopped" in messages
    assert lines[-1]["level"] == "WARNING" and "did not finish" in lines[-1]["msg"]
    assert lines[-1]["unexported"] == ["spans", "metrics"]
    assert sorted(set(received)) == [METRICS, TRACES]


def _signalled(mode: str) -> tuple[int, list[dict[str, Any]], str]:
    """Runs ``mode`` (``signal-WHEN-HELD``: SIGTERM raised while its main thread holds a lock);
    the exit status, the log's JSON lines and its whole text."""
    process = _start(mode)
    try:
        # A hang, not a speed: the handler waited for good for the lock its own thread held.
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    return process.returncode, _log(stderr), stderr


@pytest.mark.parametrize(
    "held",
    [
        pytest.param(
            "thread-start",
            marks=pytest.mark.skipif(
                not hasattr(threading, "_shutdown_locks_lock"),
                reason="Python 3.13 starts a thread without a lock its caller may hold",
            ),
        ),
        "log-handler",
    ],
)
def test_sigterm_while_serving_stops_whatever_lock_the_main_thread_holds(held: str) -> None:
    """The host's handler logged and started its stop's (non-daemon) thread on the main thread,
    inside whatever that was doing: holding the lock such a thread's start waits for (as it
    joins a non-daemon thread that ended, and at exit: a second SIGTERM as the service exits),
    or a log handler's plain lock (a standard-library QueueHandler's queue), the handler waited
    for good and the process never stopped (an orchestrator's SIGKILL then, no drain). The
    handler only hands the signal over now; the ``signals`` thread logs it and starts the
    stop."""
    status, lines, stderr = _signalled(f"signal-serving-{held}")
    assert status == 0, stderr[-2000:]
    messages = [(r["msg"], r.get("signal")) for r in lines]
    assert messages[-2:] == [("signal received, draining", signal.SIGTERM), ("stopped", None)]
    assert "Traceback" not in stderr


def test_a_sigterm_as_the_service_s_process_exits_is_the_service_s_not_the_default_action() -> None:
    """A service gives its signals back when it ends (strongroom.runtime.signals), but not in a
    process that ends with it (``strongroom serve``): there the default action would end the
    exit at once, its last lines unwritten (the command line's error line goes through the
    log) and its status the signal's. The service's handler keeps it: logged, and the exit is
    the service's own."""
    status, lines, stderr = _signalled("signalled-as-it-exits")
    assert status == 0, stderr[-2000:]
    messages = [(r["msg"], r.get("signal")) for r in lines]
    assert messages[-3:] == [
        ("signal received, draining", signal.SIGTERM),
        ("stopped", None),
        ("signal received, draining", signal.SIGTERM),
    ]


def test_a_process_that_ends_with_its_service_keeps_its_log_and_exception_hooks_to_the_exit() -> (
    None
):
    """A service gives its exception hooks and logging back when it ends
    (strongroom.runtime.lifetime), but not in a process that ends with it (``strongroom
    serve``): what that process does past ``run_service`` (its exit's lines, the command line's
    error line, an error nothing catches) is still its service's log's, JSON lines, never a
    bare traceback on stderr."""
    status, lines, stderr = _signalled("raises-as-it-exits")
    assert status == 0, stderr[-2000:]
    assert [line for line in stderr.splitlines() if not line.startswith("{")] == []
    after = lines[[r["msg"] for r in lines].index("stopped") + 1 :]
    assert [(r["msg"], r.get("thread_name"), r.get("error")) for r in after] == [
        ("after the service", None, None),
        ("an error could not be raised", None, "a finaliser failed"),
        ("thread ended on an uncaught error", "exiting", "the exit's work failed"),
    ]


def test_sigterm_while_starting_stops_though_the_main_thread_holds_a_log_handlers_lock() -> None:
    """Start-up's handler logged its line on the main thread: a log handler's plain lock held
    there (a standard-library QueueHandler's queue) held the handler for good. It only records
    the signal now: the next checkpoint stops the start, its line logged first."""
    status, lines, stderr = _signalled("signal-starting-log-handler")
    assert status == 128 + signal.SIGTERM, stderr[-2000:]
    assert (lines[-1]["msg"], lines[-1]["signal"]) == (
        "signal received while starting; stopping",
        signal.SIGTERM,
    )
    assert "Traceback" not in stderr


def test_sigterm_stops_the_service_when_the_stops_thread_cannot_start() -> None:
    """The host's handler started its stop's thread on the main thread: at the process's thread
    limit the start failed there, into the main thread, which stopped the service through its
    close. On the ``signals`` thread the failure was logged (``handling a signal failed``) and
    the service served on, the SIGTERM spent: the orchestrator's SIGKILL ended it, no drain.
    The stop now runs on the ``signals`` thread itself when its own cannot start."""
    process = _start("no-stop-thread")
    try:
        assert process.stdout is not None
        process.stdout.readline()  # serving, its threads refused from now on
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)  # a hang, not a speed: it served on
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr[-2000:]
    messages = [(r["msg"], r.get("signal")) for r in _log(stderr)]
    assert messages[-2:] == [("signal received, draining", signal.SIGTERM), ("stopped", None)]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("filled", ["between-look-and-write", "before-the-signal"])
def test_sigterm_stops_the_service_whose_stderr_fills_and_is_never_read(filled: str) -> None:
    """The ``signals`` thread wrote the signal's line itself once stderr polled writable: when
    another writer (gRPC's C core writes to fd 2 too) filled the pipe between that look and the
    write, and its reader had stopped reading, the write waited for good, and the stop it was
    to start after the line never started (nor, once it had, did the stop's own thread end past
    its ``stopped`` line): the orchestrator's SIGKILL ended the service, no drain, no close.
    Both threads' lines go through the log's queue now: the stop runs, and the exit gives up on
    the log once its flush budget is spent. A pipe full before the signal stops it so too."""
    process = _start(
        *(["stderr-fills"] if filled == "between-look-and-write" else ["listening", "0"]),
        **{FULL_STDERR_ENV: "1"},
    )
    try:
        assert process.stdout is not None
        int(process.stdout.readline())  # serving
        if filled == "before-the-signal":
            fill_pipe(f"/proc/{process.pid}/fd/2")
        process.send_signal(signal.SIGTERM)
        # Stderr is not read until the process has ended: its reader stopped reading.
        status = process.wait(timeout=60)  # a hang, not a speed: it never stopped
    finally:
        process.kill()
        process.wait()
    assert status == 0


def test_a_service_abandoning_calls_exits_when_its_stderr_fills_after_the_look() -> None:
    """The main thread wrote ``exiting with 1 calls abandoned`` itself once stderr polled
    writable: when another writer (gRPC's C core) filled the pipe between that look and the
    write, and its reader had stopped reading, the write waited for good, and the exit after it
    never came (the orchestrator's SIGKILL ended the process). The line is refused by the pipe
    now, queued, and the exit gives up on the log once its flush budget is spent."""
    with _hung_and_signalled("hung-stderr-fills", **{FULL_STDERR_ENV: "1"}) as process:
        # Stderr is not read until the process has ended: its reader stopped reading.
        status = process.wait(timeout=60)  # a hang, not a speed: it never ended
    assert status == 0


def _told_to_go_on(
    mode: str,
    *,
    says: str | None,
    fill_stderr: bool,
    then: Callable[[subprocess.Popen[str]], None] | None = None,
) -> tuple[int, str]:
    """Runs ``mode`` until its first line on stdout (``says``, or None: its port, serving), its
    stderr then filled with ``fill_stderr`` (and not read until the process has ended: its
    reader stopped reading), tells it to go on (a line on stdin) and calls ``then`` with it;
    the exit status and the whole of stderr."""
    process = _start(mode, **({FULL_STDERR_ENV: "1"} if fill_stderr else {}))
    try:
        assert process.stdout is not None and process.stdin is not None
        first = process.stdout.readline()
        if says is None:
            int(first)  # serving
        else:
            assert first == says
        if fill_stderr:
            fill_pipe(f"/proc/{process.pid}/fd/2")
        process.stdin.write("go\n")
        process.stdin.flush()
        if then is not None:
            then(process)
        if fill_stderr:
            process.wait(timeout=60)  # a hang, not a speed: it never ended
        _, stderr = process.communicate(timeout=60)  # a hang, not a speed
    finally:
        process.kill()
        process.wait()
    return process.returncode, stderr


def _sigterm_once_raising(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    assert process.stdout.readline() == "raising\n"
    process.send_signal(signal.SIGTERM)


def _raise_on_a_thread(*, fill_stderr: bool) -> tuple[int, str]:
    """Runs ``thread-raises``, its stderr filled first with ``fill_stderr`` (and not read until
    the process has ended: its reader stopped reading), has its thread raise, then sends
    SIGTERM; the exit status and the whole of stderr."""
    return _told_to_go_on(
        "thread-raises", says=None, fill_stderr=fill_stderr, then=_sigterm_once_raising
    )


def test_an_exception_that_ends_a_thread_is_a_line_of_the_log_not_a_traceback() -> None:
    """Python's own hooks printed an exception that ended a thread (a stop's, a timer's), and
    one raised where it cannot be (a ``__del__``), as a raw traceback on stderr among the
    service's JSON lines. Each is one ERROR line of the log now, its traceback the line's
    ``exc``, and stderr holds nothing else."""
    status, stderr = _raise_on_a_thread(fill_stderr=False)
    assert status == 0, stderr[-2000:]
    assert [line for line in stderr.splitlines() if not line.startswith("{")] == []
    lines = _log(stderr)
    (ended,) = [r for r in lines if r["msg"] == "thread ended on an uncaught error"]
    assert ended["level"] == "ERROR"
    assert (ended["thread_name"], ended["error_type"], ended["error"]) == (
        "background",
        "RuntimeError",
        "the background work failed",
    )
    assert ended["exc"].startswith("Traceback (most recent call last)")
    assert ended["exc"].endswith("RuntimeError: the background work failed")
    (unraised,) = [r for r in lines if r["msg"] == "an error could not be raised"]
    assert unraised["level"] == "ERROR"
    assert unraised["where"].startswith("Exception ignored in: <function _FailsToDelete.__del__")
    assert (unraised["error_type"], unraised["error"]) == ("ValueError", "a finaliser failed")
    assert unraised["exc"].endswith("ValueError: a finaliser failed")


def test_a_thread_that_raises_while_stderr_is_full_and_never_read_does_not_hold_the_exit() -> None:
    """Python's own hooks wrote a thread's uncaught exception to ``sys.stderr``, waiting with a
    full pipe whose reader had stopped reading: the (non-daemon) thread never ended, and the
    exit, which joins such threads, waited for it until SIGKILL. The line goes through the
    log's queue now, which the exit gives up on once its flush budget is spent."""
    status, _ = _raise_on_a_thread(fill_stderr=True)
    assert status == 0


def test_an_unexpected_error_that_ends_the_main_thread_is_a_line_of_the_log() -> None:
    """An error the command line does not print as one line (not a StrongroomError, an OSError
    nor a refused call) went on to Python's own hook, a raw traceback on stderr among the JSON
    lines. It is the log's last line now, ERROR, its traceback the line's ``exc``; status 1."""
    process = _start("unexpected")
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 1, stderr[-2000:]
    assert [line for line in stderr.splitlines() if not line.startswith("{")] == []
    last = _log(stderr)[-1]
    assert (last["level"], last["msg"]) == ("ERROR", "thread ended on an uncaught error")
    assert (last["thread_name"], last["error_type"], last["error"]) == (
        "MainThread",
        "LookupError",
        "no backend named 'tape'",
    )
    assert last["exc"].endswith("LookupError: no backend named 'tape'")


def _stopped_on(kind: str, *, fill_stderr: bool) -> tuple[int, str]:
    """Runs ``stops-on-<kind>``, its stderr filled first with ``fill_stderr`` (and not read until
    the process has ended: its reader stopped reading), and has its start raise; the exit
    status and the whole of stderr."""
    return _told_to_go_on(f"stops-on-{kind}", says="building\n", fill_stderr=fill_stderr)


STOPS = {
    "strongroom": ("test cannot run: AUDIT_UNAVAILABLE: the audit log cannot be opened"),
    "os": "test stopped on an operating-system error",
    "rpc": "test cannot run: PERMISSION_DENIED: PERMISSION_DENIED: the model store refused the "
    "service",
    "unexpected": "thread ended on an uncaught error",
}


@pytest.mark.parametrize("kind", sorted(STOPS))
def test_a_service_stopped_by_an_error_while_stderr_is_full_and_never_read_exits(kind: str) -> None:
    """The error that stops a service is its log's line, queued when stderr takes nothing, and
    the exit gives up on the queue once its flush budget is spent. But the command line then
    printed its own ``strongroom: error:`` line on ``sys.stderr``, waiting on the full pipe for
    good: the process never ended (until SIGKILL). In a service's process that line is written
    only if stderr takes it without waiting (its log has said it)."""
    status, _ = _stopped_on(kind, fill_stderr=True)
    assert status == 1


@pytest.mark.parametrize("kind", sorted(STOPS))
def test_the_error_that_stops_a_service_is_its_log_s_last_line_then_the_command_line_s(
    kind: str,
) -> None:
    """With stderr read, the log's line (a refused call's too: the command line alone said it)
    and then, for an error the command line prints as one line, the command line's."""
    status, stderr = _stopped_on(kind, fill_stderr=False)
    assert status == 1, stderr[-2000:]
    text = stderr.splitlines()
    last = _log(stderr)[-1]
    assert (last["level"], last["msg"]) == ("ERROR", STOPS[kind])
    if kind == "unexpected":
        assert not [line for line in text if not line.startswith("{")]
        return
    assert text[-1].startswith("strongroom: error: "), text[-3:]
    assert json.loads(text[-2]) == last


_REFUSED_AT_ONCE = {
    # A configuration refused before the service's log is set up, and another command's error.
    "serve": (
        ["serve", "keybroker", "--config", "/nonexistent/strongroom.yaml"],
        "strongroom: error: CONFIG_INVALID: cannot read configuration "
        "/nonexistent/strongroom.yaml: No such file or directory",
    ),
    "audit-verify": (
        ["audit", "verify", "/nonexistent/audit.log"],
        "strongroom: error: AUDIT_LOG_NOT_FOUND: no audit log at /nonexistent/audit.log",
    ),
}


def _command(args: Sequence[str], stderr: int) -> subprocess.Popen[bytes]:
    """``strongroom ARGS`` (this checkout's command line) started with the descriptor ``stderr``
    its stderr, nothing on its stdin or stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "strongroom.cli.main", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def command_with_stderr(
    args: Sequence[str],
    *,
    fill_stderr: bool,
    meanwhile: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> tuple[int, list[str]]:
    """Runs ``strongroom ARGS`` with its stderr a pipe read only once the process has ended,
    full before it starts if ``fill_stderr`` (a collector that stopped reading): its exit status
    and the lines it wrote there. ``meanwhile`` is called with the running process (to signal
    it, say) before its end is waited for."""
    return written_to_a_pipe(
        lambda write_end: _command(args, write_end), full=fill_stderr, meanwhile=meanwhile
    )


def written_to_a_pipe(
    start: Callable[[int], subprocess.Popen[bytes]],
    *,
    full: bool,
    meanwhile: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> tuple[int, list[str]]:
    """Runs the process ``start`` starts writing to the pipe whose write end it is given, read
    only once the process has ended, full before it starts if ``full`` (a collector that
    stopped reading): its exit status and the lines it wrote there. ``meanwhile`` is called
    with the running process (to signal it, say) before its end is waited for."""
    read_end, write_end = os.pipe()
    try:
        if full:
            fill_pipe(f"/proc/self/fd/{write_end}")
        process = start(write_end)
        os.close(write_end)
        write_end = -1
        try:
            if meanwhile is not None:
                meanwhile(process)
            status = process.wait(timeout=60)  # a hang, not a speed: it never ended
        finally:
            process.kill()
            process.wait()
        with os.fdopen(read_end, "rb") as reader:
            read_end = -1
            written = reader.read().decode().strip("x").splitlines()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    return status, written


@pytest.mark.parametrize("fill_stderr", [True, False], ids=["stderr-full", "stderr-read"])
@pytest.mark.parametrize("command", sorted(_REFUSED_AT_ONCE))
def test_a_command_refused_before_any_log_exits_with_a_full_stderr(
    command: str, fill_stderr: bool
) -> None:
    """A configuration refused before the service's log was set up (and any command's error)
    was printed by the command line on ``sys.stderr``, waiting on a full pipe whose collector
    had stopped reading: the process never ended. It is written only if stderr takes it
    without waiting now, as the log's lines are: status 1 either way, and the line written when
    stderr is read."""
    args, line = _REFUSED_AT_ONCE[command]
    status, written = command_with_stderr(args, fill_stderr=fill_stderr)
    assert status == 1
    assert written == ([] if fill_stderr else [line])


# An error line longer than a pipe takes at once (PIPE_BUF, 4,096 bytes): a path of 4,200.
_LONG_PATH = "/nonexistent/" + "/".join(["d" * 200] * 21) + "/audit.log"
_LONG_ERROR = f"strongroom: error: {_LONG_PATH}: File name too long (ENAMETOOLONG)"


def _command_error(ends: tuple[int, int]) -> tuple[int, bytes]:
    """The exit status of ``strongroom audit verify`` of :data:`_LONG_PATH` whose stderr is the
    second of ``ends`` (a pipe's or a terminal's, in the order os.pipe and os.openpty give them),
    and what the first read of it. Both are closed."""
    reader, stderr = ends
    try:
        process = _command(["audit", "verify", _LONG_PATH], stderr)
        os.close(stderr)
        read = b""
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # EIO: a terminal's other end closed
                break
            if not chunk:
                break
            read += chunk
        return process.wait(timeout=60), read
    finally:
        os.close(reader)


def test_a_long_error_line_is_written_whole_to_a_terminal() -> None:
    """The command line's error line is written only if stderr takes it at once, and a line
    longer than PIPE_BUF was dropped wherever stderr was not a regular file: on a terminal the
    command failed without a word. A terminal is a person's, not a collector that stopped
    reading: the line is written whole, as any program's."""
    status, read = _command_error(os.openpty())
    assert status == 1
    assert read.decode().splitlines() == [_LONG_ERROR]


def test_a_long_error_line_to_a_pipe_is_cut_to_what_it_takes_at_once() -> None:
    """To a pipe (``2>&1 | tee``, a script's capture) the line longer than PIPE_BUF was dropped,
    the command's failure unexplained. It is cut to PIPE_BUF bytes now, still written at once or
    not at all: both ends kept (the error's start and the file's error at its end), its middle
    left out and said so."""
    status, read = _command_error(os.pipe())
    assert status == 1
    assert len(read) <= select.PIPE_BUF and read.endswith(b"\n"), len(read)
    (line,) = read.decode().splitlines()
    head, cut, tail = line.partition(" ... (")
    left_out, _, tail = tail.partition(" bytes left out) ...")
    assert cut and _LONG_ERROR.startswith(head) and _LONG_ERROR.endswith(tail), line
    assert len(head) + int(left_out) + len(tail) == len(_LONG_ERROR)
    assert tail.endswith("/audit.log: File name too long (ENAMETOOLONG)")


@pytest.mark.parametrize("fill_stderr", [True, False], ids=["stderr-full", "stderr-read"])
def test_a_usage_error_exits_with_a_full_stderr(fill_stderr: bool) -> None:
    """argparse printed a usage error (a service started with an argument its version does not
    know) on ``sys.stderr``, waiting on a full pipe whose collector had stopped reading: the
    process never ended. Written only if stderr takes it at once now, as the command line's
    own error line is: status 2 either way, usage and error written when stderr is read."""
    status, written = command_with_stderr(
        ["serve", "keybroker", "--bogus"], fill_stderr=fill_stderr
    )
    assert status == 2
    if fill_stderr:
        assert written == []
    else:
        assert written[0].startswith("usage: strongroom "), written
        assert written[-1] == "strongroom: error: unrecognized arguments: --bogus", written
