"""A service run in a process that goes on (``run_service`` in a test's or a host's process) gives
its signals back when it ends, however it ends: the handlers each signal had before, not its
stop's (strongroom.runtime.signals); and a SIGTERM during its stop still reaches the service. Its
exception hooks and root logger come back the same way (strongroom.runtime.lifetime), its last
lines written through its own log first."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType, ModuleType, SimpleNamespace
from typing import Any

import pytest

from strongroom.cli import serve as serve_cli
from strongroom.errors import Unavailable
from strongroom.reasons import Reason
from strongroom.runtime import bootstrap, hangup, logs, signals, starting
from strongroom.runtime.config import LoggingConfig, TracingConfig
from strongroom.runtime.logs import QUIET_LIBRARIES
from strongroom.runtime.server import ServiceHost
from tests.runtime.stopping_service import _listening, _Running

TAKEN = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What a service takes: its stop's two, SIGHUP (the key broker's audit rotation, else ignored)."""


class _Host:
    """The handlers the test's process had before the service (its own, so that none can be
    mistaken for one the service installed), and the signals they got."""

    def __init__(self, log: io.StringIO) -> None:
        self.got: list[int] = []
        self.log = log  # the service's stderr, where its log goes

    def lines(self) -> list[dict[str, Any]]:
        """The service's log lines, as written so far."""
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.got.append(signum)


class _Identity:
    def close(self) -> None:
        pass


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Host]:
    """The process's own handlers of :data:`TAKEN` for the test (then the suite's again), and
    ``run_service`` with no configuration file or CA of its own; its log (JSON) goes to a buffer
    standing for stderr, its hooks are its own while it runs (given back, the suite's guard
    checks: tests/conftest.py)."""
    common = SimpleNamespace(
        production=False,
        logging=LoggingConfig(format="json"),
        tracing=TracingConfig(),
        identity=None,
    )
    monkeypatch.setattr(bootstrap, "load_service_config", lambda *a: (common, object()))
    monkeypatch.setattr(bootstrap, "open_identity", lambda *a: _Identity())
    own = _Host(io.StringIO())
    suite = {signum: signal.signal(signum, own.handler) for signum in TAKEN}
    try:
        yield own
    finally:
        assert signals.settle(30)  # the service's lines written before the next test
        for signum, handler in suite.items():
            signal.signal(signum, handler)


def _serve(
    host: _Host,
    build: Callable[..., Any],
    after_start: Callable[[Any], None] | None = None,
    sighup: str | None = None,
) -> None:
    # Set here, not by the fixture: pytest sets sys.stderr again as the test's call begins.
    with contextlib.redirect_stderr(host.log):
        bootstrap.run_service("test", None, object, build, after_start=after_start, sighup=sighup)


def _rotates_on_sighup(_running: Any) -> None:
    # What the key broker's after_start does (rotate_audit_on_sighup), without its audit log.
    signals.install(lambda *_: None, signal.SIGHUP)


def _stopped_by_sigterm(running: Any) -> None:
    _rotates_on_sighup(running)
    signal.raise_signal(signal.SIGTERM)  # the orchestrator's stop: drained, closed, returned


def _fails_while_serving(running: Any) -> None:
    _rotates_on_sighup(running)
    raise RuntimeError("serving failed")


def _refused_at_start(*_: Any) -> Any:
    raise Unavailable("the audit log cannot be opened", reason=Reason.AUDIT_UNAVAILABLE)


def _stopped_while_starting(*_: Any) -> Any:
    signal.raise_signal(signal.SIGTERM)
    starting.checkpoint("building")  # raises StartupStopped, as a real start's next step
    raise AssertionError("not stopped")


WAYS_OUT = pytest.mark.parametrize(
    ("build", "after_start", "raised"),
    [
        (lambda *_: _listening("0"), _stopped_by_sigterm, None),
        (_refused_at_start, None, Unavailable),
        (_stopped_while_starting, None, starting.StartupStopped),
        (lambda *_: _listening("0"), _fails_while_serving, RuntimeError),
    ],
    ids=["clean-stop", "start-up-refused", "stopped-while-starting", "error-while-serving"],
)
"""How a service's run ends: a SIGTERM's clean stop, a start refused, a start stopped, an
error while serving."""

LAST_LINES = {
    _stopped_by_sigterm: "stopped",
    _refused_at_start: "test cannot run: AUDIT_UNAVAILABLE: the audit log cannot be opened",
    _stopped_while_starting: "signal received while starting; stopping",
    _fails_while_serving: "stopped",
}


def _serve_to_its_end(
    host: _Host,
    build: Callable[..., Any],
    after_start: Callable[[Any], None] | None,
    raised: type[BaseException] | None,
) -> None:
    if raised is None:
        _serve(host, build, after_start)
    else:
        with pytest.raises(raised):
            _serve(host, build, after_start)


@WAYS_OUT
def test_a_service_that_ends_gives_the_process_its_signal_handlers_back(
    host: _Host,
    build: Callable[..., Any],
    after_start: Callable[[Any], None] | None,
    raised: type[BaseException] | None,
) -> None:
    """The handlers a service installed stayed when it ended, the process's own lost for good: a
    test process that ran one (tests/runtime/test_bootstrap_errors.py) had SIGINT handled as the
    stop of a service long gone, and a later test that interrupts itself with SIGINT
    (tests/e2e/test_publish_busy.py) waited for good. A start refused also left start-up's
    request behind, a later build's steps run as if a stop could come."""
    _serve_to_its_end(host, build, after_start, raised)
    assert {s: signal.getsignal(s) for s in TAKEN} == dict.fromkeys(TAKEN, host.handler)
    assert starting._Installed.request is None
    assert host.got == []  # the service's signal went to the service


def _root_logging() -> tuple[list[logging.Handler], int, dict[str, int]]:
    """The root logger's handlers and level, and the quiet libraries' levels."""
    root = logging.getLogger()
    return root.handlers[:], root.level, {n: logging.getLogger(n).level for n in QUIET_LIBRARIES}


@WAYS_OUT
def test_a_service_that_ends_gives_the_process_its_exception_hooks_and_logging_back(
    host: _Host,
    build: Callable[..., Any],
    after_start: Callable[[Any], None] | None,
    raised: type[BaseException] | None,
) -> None:
    """``run_service`` installed the service's exception hooks and replaced the root logger's
    handlers and level for good: a process that ran one and went on logged its own lines to the
    stopped service's handler, its own handlers gone, and a later thread's error went to the
    service's hooks, not the process's (pytest's, which fail the test whose thread raised). All
    come back once the stop is over, however it ended, the service's last line written through
    its own log by then."""
    own = logging.NullHandler()  # the process's own handler, and a level of its own
    root = logging.getLogger()
    root.addHandler(own)
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
        logging_before = _root_logging()
        _serve_to_its_end(host, build, after_start, raised)
        assert (threading.excepthook, sys.excepthook, sys.unraisablehook) == hooks
        assert _root_logging() == logging_before
        assert host.lines()[-1]["msg"] == LAST_LINES[after_start or build]
    finally:
        root.removeHandler(own)
        root.setLevel(level)


class _SignalledWhileClosing(_Running):
    """A service that gets a second SIGTERM as it closes (its audit log's last records), handed
    to the ``signals`` thread behind work that holds it until ``run_service`` waits for that
    thread (:func:`signals.settle`): its line is still to be logged when the stop is over, so
    it is the service's log's only if the give-back waits for it. Logged at once, as it came
    otherwise, the test passed whether or not anything waited."""

    def __init__(self, host: ServiceHost) -> None:
        super().__init__(host)
        self.held = threading.Event()

    def close(self, grace: float | None = 0) -> None:
        signals.later(lambda: self.held.wait(30))
        signal.raise_signal(signal.SIGTERM)
        threading.Thread(target=self._let_go_once_settling, daemon=True).start()
        super().close(grace)

    def _let_go_once_settling(self) -> None:
        main = threading.main_thread().ident or 0
        while not self.held.is_set():
            frame = sys._current_frames().get(main)
            while frame is not None and frame.f_code is not signals.settle.__code__:
                frame = frame.f_back
            if frame is not None:
                try:
                    self.while_settling()
                finally:
                    self.held.set()
            self.held.wait(0.01)

    def while_settling(self) -> None:
        """What happens while ``run_service`` waits for the ``signals`` thread (held)."""


def test_a_sigterm_during_the_stop_reaches_the_service_not_the_handler_from_before(
    host: _Host,
) -> None:
    """The handlers come back once the stop is over, never during it: a SIGTERM as the service
    closes (what the key broker's close writes to its audit log) is the service's, logged and
    ignored (its stop is under way), not the process's default action. Its line, which the
    ``signals`` thread logs as the service closes, is the service's log's by the time
    ``run_service`` has returned: written before the log was given back."""
    closing: list[_SignalledWhileClosing] = []

    def build(*_: Any) -> _SignalledWhileClosing:
        closing.append(_SignalledWhileClosing(_listening("0").host))
        return closing[0]

    try:
        _serve(host, build, _stopped_by_sigterm)
    finally:
        if closing:
            closing[0].held.set()  # never reached settle: the line goes where it goes now
            assert signals.settle(30)
    assert host.got == []
    draining = [r for r in host.lines() if r["msg"] == "signal received, draining"]
    assert [r["signal"] for r in draining] == [signal.SIGTERM, signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == host.handler


class _ThreadFailsWhileSettling(_SignalledWhileClosing):
    """A service thread (its certificate's renewal) ends on an error while ``run_service``
    waits for the ``signals`` thread, held behind the SIGTERM's work."""

    def while_settling(self) -> None:
        def fails() -> None:
            raise ConnectionResetError(104, "the CA went away")

        renewal = threading.Thread(target=fails, name="renewal")
        renewal.start()
        renewal.join()


def test_a_thread_that_fails_while_the_stop_settles_is_a_line_of_the_service_s_log(
    host: _Host,
) -> None:
    """``run_service`` gave its exception hooks back before it waited for the ``signals`` thread
    (up to SETTLE_SECONDS, more behind a stuck one): a service thread's error then went to the
    host's hooks (a bare traceback; here pytest's, which fail the test), not the service's log.
    The hooks are now given back after the wait, in the reverse order of taking them."""
    closing: list[_ThreadFailsWhileSettling] = []

    def build(*_: Any) -> _ThreadFailsWhileSettling:
        closing.append(_ThreadFailsWhileSettling(_listening("0").host))
        return closing[0]

    try:
        _serve(host, build, _stopped_by_sigterm)
    finally:
        if closing:
            closing[0].held.set()
            assert signals.settle(30)
    failed = [r for r in host.lines() if r["msg"] == "thread ended on an uncaught error"]
    assert [(r["thread_name"], r["error"]) for r in failed] == [
        ("renewal", "[Errno 104] the CA went away")
    ]


def test_a_run_that_ends_with_its_process_makes_no_later_run_in_it_keep_what_it_changed(
    host: _Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``strongroom serve`` (the command line's ``_serve``) had its process keep what a service
    changes through a process-wide flag nothing reset: once it had run in a process (a test's),
    every later ``run_service`` there kept its handlers, hooks and logging for good. The choice
    is now the run's: the first run keeps them, the next one gives them back."""
    monkeypatch.setattr(serve_cli, "forbid_core_dumps", lambda: None)
    monkeypatch.setattr(serve_cli.os, "umask", lambda mask: mask)  # the test process's own stays

    def serve(_config: object) -> int:
        _serve(host, lambda *_: _listening("0"), _stopped_by_sigterm)
        return 0

    module = ModuleType("strongroom.modelstore.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # What the kept run keeps, put back by the test (the suite's guards check it is).
    for owner, hook in ((threading, "excepthook"), (sys, "excepthook"), (sys, "unraisablehook")):
        monkeypatch.setattr(owner, hook, getattr(owner, hook))
    hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
    logging_before = _root_logging()
    with logs.restoring(), signals.restoring():
        assert serve_cli._serve(argparse.Namespace(service="modelstore", config=None)) == 0
        assert signal.getsignal(signal.SIGTERM) != host.handler  # kept: the process ends
        assert (threading.excepthook, sys.excepthook, sys.unraisablehook) != hooks
    assert _root_logging() == logging_before
    monkeypatch.setattr(threading, "excepthook", hooks[0])
    monkeypatch.setattr(sys, "excepthook", hooks[1])
    monkeypatch.setattr(sys, "unraisablehook", hooks[2])

    _serve(host, lambda *_: _listening("0"), _stopped_by_sigterm)  # in the same process

    assert {s: signal.getsignal(s) for s in TAKEN} == dict.fromkeys(TAKEN, host.handler)
    assert (threading.excepthook, sys.excepthook, sys.unraisablehook) == hooks
    assert _root_logging() == logging_before
    assert host.got == []


def test_a_host_run_outside_a_service_s_run_gives_its_signal_handlers_back(host: _Host) -> None:
    """``run_until_signal`` called by a host process itself, not through ``run_service``, left
    its stop's handlers of SIGTERM and SIGINT installed once it returned: a later Ctrl-C meant
    for the process was taken for the stop of a host long stopped. They come back as it
    returns."""
    running = _listening("0")
    try:
        running.host.run_until_signal(after_start=lambda: signal.raise_signal(signal.SIGTERM))
    finally:
        running.close()
    assert {s: signal.getsignal(s) for s in TAKEN} == dict.fromkeys(TAKEN, host.handler)
    assert host.got == []  # the SIGTERM was the host's stop


def test_a_handler_installed_outside_any_service_s_run_is_refused() -> None:
    """Nothing would give it back: :func:`signals.install` refuses it, the handler unchanged."""
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(RuntimeError, match="SIGUSR1"):
        signals.install(lambda *_: None, signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_scope_inside_another_that_recorded_the_same_puts_back_what_each_took(
    host: _Host,
) -> None:
    """A scope that ended removed the first scope equal to its record (``list.remove``), not
    itself: inside another whose record was the same (a host's own scope around a service's
    run), it ended the outer record; what the outer scope then installed went unrecorded, and its
    end raised ValueError (``x not in list``) with that signal left the service's."""
    signum, later = signal.SIGUSR1, signal.SIGUSR2
    own = {s: signal.signal(s, host.handler) for s in (signum, later)}
    try:
        with signals.restoring():
            with signals.restoring():
                signals.install(lambda *_: None, signum)
            signals.install(lambda *_: None, later)
        assert {s: signal.getsignal(s) for s in own} == dict.fromkeys(own, host.handler)
        assert signals._Restoring.scopes == []
    finally:
        for s, handler in own.items():
            signal.signal(s, handler)


def _hung_up_twice_while_building(*_: Any) -> Any:
    signal.raise_signal(signal.SIGHUP)  # a logrotate's kill -HUP as the service starts
    signal.raise_signal(signal.SIGHUP)
    return _listening("0")


def test_sighups_while_a_service_starts_are_one_call_of_its_handler_once_it_serves(
    host: _Host,
) -> None:
    """SIGHUP was the process's (its default action: the end of the process) until the key
    broker's after_start took it: one during start-up ended the broker. The run takes it from
    start-up's first handler on, logs each, and hands them to the service's handler as one
    call once it takes SIGHUP (strongroom.runtime.hangup)."""
    calls: list[int] = []

    def takes_sighup(running: Any) -> None:
        hangup.take(lambda signum, _frame: calls.append(signum))
        signal.raise_signal(signal.SIGTERM)

    _serve(host, _hung_up_twice_while_building, takes_sighup, sighup="it will be done")
    assert calls == [signal.SIGHUP]
    deferred = [r for r in host.lines() if r["msg"].startswith("SIGHUP during start-up")]
    assert [r["msg"] for r in deferred] == [
        "SIGHUP during start-up: it will be done once serving"
    ] * 2
    assert host.got == []


def test_a_sighup_to_a_service_with_no_action_for_it_is_logged_and_ignored(host: _Host) -> None:
    """A service with nothing to do on SIGHUP (the model store, inference) left it its default
    action for its whole run: one, starting or serving, ended the process. Each is logged and
    ignored now, and the run ends as it would have."""

    def hung_up_while_serving(_running: Any) -> None:
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGTERM)

    _serve(host, _hung_up_twice_while_building, hung_up_while_serving)
    assert [r["msg"] for r in host.lines() if "SIGHUP" in r["msg"]] == [hangup.IGNORED] * 3
    assert host.lines()[-1]["msg"] == "stopped"
    assert host.got == []
