"""A service run as ``strongroom serve`` runs one (:func:`~strongroom.runtime.bootstrap.run_service`:
its logging, its signals, its stop and exit), but with no CA, configuration file or metrics, for
tests of how the process ends. Run as a program: ``python -m tests.runtime.stopping_service MODE``.

``hung``: serves ``/test.Hung/Call``, whose handler never returns, prints the port on stdout,
and prints ``entered`` once a call's handler runs; ``hung-close-raises`` and
``hung-close-hangs`` too, the service's close then raising (a StrongroomError), or waiting for
good once its host has stopped (behind the hung handler, as the key broker's refusal pass waits
behind an audit commit that never ends). ``starting``: logs ``LINES`` lines while it
starts (more than a pipe holds), prints ``started``, and takes for ever to finish starting;
``starting-slow-close`` too, its identity's close then printing ``closing`` and waiting for a
line on stdin before it logs ``identity closed``; ``starting-pool`` too, its step reading objects
as the S3 store's start-up sweep reads its index (a thread pool's workers), none of which ever
answers. ``exporting PORT``: exports spans and metrics
(plaintext OTLP) to the collector on loopback port ``PORT``, records a span and a metric, and
prints its own port once serving. ``listening PORT``: serves on loopback port ``PORT``
(a test holds it: its start fails). ``signal-WHEN-HELD``: raises SIGTERM on its main thread while
that holds the lock ``HELD`` names (``thread-start``: the one a non-daemon thread's start waits
for; ``log-handler``: the queue's of a standard-library ``QueueHandler`` added to the root
logger), as it starts (``WHEN`` ``starting``; a checkpoint follows) or once serving
(``serving``). ``no-stop-thread``: serves, prints its port, and from then on cannot start a
thread named ``shutdown`` (a process at its thread limit as the stop's thread is started).
``hung-stderr-fills``: ``hung``, and from serving on stderr fills as ``stderr-fills`` says.
``stderr-fills``: serves, prints its port, and from then on the first time a thread that logs
finds stderr writable, another writer fills stderr's pipe before that thread writes (as gRPC's C
core, which writes to fd 2 too, can): the test's pipe, which it does not read.
``thread-raises``: serves, prints its port, and starts a (non-daemon) thread named ``background``
that waits for a line on stdin, prints ``raising``, drops an object whose ``__del__`` raises
(an exception Python cannot raise: its unraisable hook's) and ends raising
``RuntimeError("the background work failed")``. ``unexpected``: its start raises an error the
command line does not print as one line (a ``LookupError``), which ends the main thread.
``stops-on-<kind>``: its start prints ``building``, waits for a line on stdin and raises ``kind``
(``strongroom``: a StrongroomError; ``os``: an OSError; ``rpc``: a refused call; ``unexpected``:
a ``LookupError``), which stops the service. ``signalled-as-it-exits``: serves, raises SIGTERM on
itself once serving (its stop), and again once ``run_service`` has returned, as the process
exits. ``raises-as-it-exits``: serves, raises SIGTERM on itself once serving (its stop), and once
``run_service`` has returned logs ``after the service``, drops an object whose ``__del__``
raises and has a thread named ``exiting`` end raising ``RuntimeError("the exit's work failed")``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider

from strongroom.cli.main import main as cli_main
from strongroom.errors import Unavailable
from strongroom.modelstore._s3 import _each
from strongroom.reasons import Reason
from strongroom.runtime import bootstrap, log_writer, starting
from strongroom.runtime import server as server_module
from strongroom.runtime.config import LoggingConfig, ServerConfig, TracingConfig
from strongroom.runtime.log_writer import ServiceLog
from strongroom.runtime.metrics import RPC_DURATION
from strongroom.runtime.server import ServiceHost, ServiceSpec
from strongroom.runtime.telemetry import Telemetry

SERVICE = "test.Hung"
LINES = 2000
SHORT_BUDGET_SECONDS = 0.5
"""The handlers' drain, the close's budget once calls are abandoned and the last exports' budget,
instead of 5 s, 3 s and 2.5 s: the tests judge what the process does once a budget ends, not how
long the budget is (the hung modes waited out 8 s of budgets each, for nothing)."""
FULL_STDERR_ENV = "STOPPING_SERVICE_STDERR_FILLS"
"""Set (to anything) by a test whose run fills this process's stderr and never reads it: the
log's flush budget is then :data:`SHORT_BUDGET_SECONDS` instead of 5 s (``FLUSH_SECONDS``), which
such an exit always spends in full. Only then: a run whose stderr is read keeps the whole budget,
so a slow reader on a loaded machine still gets every line."""
_SHUTDOWN = Telemetry.shutdown


def _short_shutdown(self: Telemetry, seconds: float = SHORT_BUDGET_SECONDS) -> bool:
    """:meth:`Telemetry.shutdown` itself, with :data:`SHORT_BUDGET_SECONDS` as its default budget
    (a default argument, which setting TELEMETRY_SECONDS would not change)."""
    return _SHUTDOWN(self, seconds)


class _Identity:
    def __init__(self, slow: bool = False) -> None:
        self._slow = slow

    def close(self) -> None:
        if self._slow:  # what it closes takes a while: it goes on once the test says so
            print("closing", flush=True)
            sys.stdin.readline()
            bootstrap.log.info("identity closed")


class _Running:
    def __init__(self, host: ServiceHost, close: str = "") -> None:
        self.host = host
        self._close = close

    def close(self, grace: float | None = 0) -> None:
        self.host.stop(grace)
        if self._close == "raises":
            raise Unavailable("the audit log cannot be closed", reason=Reason.AUDIT_UNAVAILABLE)
        if self._close == "hangs":
            threading.Event().wait()


def _hung_host(close: str = "") -> _Running:
    never = threading.Event()

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        print("entered", flush=True)
        never.wait()  # a handler stuck for good (an audit commit on storage that stalled)
        return request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[ServiceSpec(SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))],
        config=ServerConfig(grace_seconds=0.2),
    )
    return _Running(host, close)


def _starting() -> _Running:
    log = bootstrap.log
    for n in range(LINES):
        log.info("starting %d %s", n, "x" * 200)
    print("started", flush=True)
    # Enrolment, an HSM, a storage: starting takes long, and is waited for as they are.
    starting.interruptible("forever", lambda: time.sleep(3600), None)
    raise AssertionError("never started")


def _starting_pool() -> _Running:
    print("started", flush=True)
    never = threading.Event()
    keys = [("model", str(n)) for n in range(20)]
    # The S3 store's sweep reads its index records on a pool (non-daemon workers, joined at exit).
    starting.interruptible("storage", lambda: _each(keys, lambda _key: never.wait()), None)
    raise AssertionError("never started")


def _exporting(tracer_provider: TracerProvider) -> _Running:
    """A host with nothing to serve, once a span and a metric are waiting for their export."""
    with tracer_provider.get_tracer(__name__).start_as_current_span("starting"):
        RPC_DURATION.record(1.0, {"rpc.method": "/test.Exporting/Start", "rpc.status": "OK"})
    host = ServiceHost(
        listen="127.0.0.1:0", credentials=None, services=[], config=ServerConfig(grace_seconds=0.2)
    )
    return _Running(host)


def _listening(port: str) -> _Running:
    host = ServiceHost(
        listen=f"127.0.0.1:{port}",
        credentials=None,
        services=[],
        config=ServerConfig(grace_seconds=0.2),
    )
    return _Running(host)


def _held(name: str) -> threading.Lock:
    """The lock ``signal-WHEN-HELD`` holds as the signal comes."""
    if name == "thread-start":
        # Python 3.11 and 3.12: a non-daemon thread registers its end here before its start
        # returns; the main thread holds it as it joins such a thread that ended, and at exit.
        # (The one every start takes, _active_limbo_lock, is re-entrant.)
        return threading._shutdown_locks_lock  # type: ignore[attr-defined,no-any-return]
    if name == "log-handler":
        # A handler whose emit takes a plain lock: one held mid-line by the interrupted thread.
        lines: queue.Queue[logging.LogRecord] = queue.Queue()
        logging.getLogger().addHandler(logging.handlers.QueueHandler(lines))
        return lines.mutex
    raise AssertionError(f"no lock {name!r}")


def _signal_holding(held: threading.Lock) -> None:
    with held:
        signal.raise_signal(signal.SIGTERM)  # its Python handler runs here, the lock held


def _refuse_threads(name: str) -> None:
    """Makes starting a thread named ``name`` fail as it does when the process (its cgroup's
    pids.max, RLIMIT_NPROC) has no thread left to give."""
    start = threading.Thread.start

    def refusing(thread: threading.Thread) -> None:
        if thread.name == name:
            raise RuntimeError("can't start new thread")
        start(thread)

    threading.Thread.start = refusing  # type: ignore[method-assign,assignment]


class FillingPoll:
    """A service log's poller of its destination, which fills the pipe at ``path`` (the
    destination's, ``/proc/self/fd/N``) the first time it finds it writable, once it has
    answered: between the look and the write of the thread that logs, as another writer of the
    pipe can."""

    def __init__(self, poller: Any, path: str) -> None:
        self._poller = poller
        self._path = path
        self._filled = False

    def register(self, fd: int, events: int) -> None:
        self._poller.register(fd, events)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        ready: list[tuple[int, int]] = self._poller.poll(timeout)
        if not self._filled and any(events & select.POLLOUT for _, events in ready):
            self._filled = True
            fill_pipe(self._path)
        return ready


def fill_pipe(path: str) -> None:
    """Fills the pipe a process's descriptor writes to (``/proc/PID/fd/N``), through a
    description of its own that does not wait (made non-blocking, the descriptor's own would
    stop waiting too)."""
    other = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            os.write(other, b"x" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.close(other)


def _fill_stderr_after_the_next_look() -> None:
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, ServiceLog)]
    stderr = f"/proc/self/fd/{sys.stderr.fileno()}"
    handler._poll = FillingPoll(handler._poll, stderr)  # type: ignore[assignment]


def _signalled_while_starting(held: str) -> _Running:
    _signal_holding(_held(held))
    starting.checkpoint("signalled")
    raise AssertionError("not stopped")


class _FailsToDelete:
    def __del__(self) -> None:
        raise ValueError("a finaliser failed")


def _raise_on_a_thread() -> None:
    def background() -> None:
        sys.stdin.readline()
        print("raising", flush=True)
        _FailsToDelete()  # dropped at once: its __del__'s error cannot be raised
        raise RuntimeError("the background work failed")

    threading.Thread(target=background, name="background").start()


def _raise_as_it_exits() -> None:
    """What a process that ran its service may still do before it exits: log, and meet errors
    nothing catches (a ``__del__``'s, a thread's)."""
    bootstrap.log.info("after the service")
    _FailsToDelete()  # dropped at once: its __del__'s error cannot be raised

    def exiting() -> None:
        raise RuntimeError("the exit's work failed")

    thread = threading.Thread(target=exiting, name="exiting")
    thread.start()
    thread.join()


class _Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self) -> str:
        return "PERMISSION_DENIED: the model store refused the service"


def _stops_on(kind: str) -> _Running:
    print("building", flush=True)
    sys.stdin.readline()
    if kind == "strongroom":
        raise Unavailable("the audit log cannot be opened", reason=Reason.AUDIT_UNAVAILABLE)
    if kind == "os":
        raise FileNotFoundError(2, "No such file or directory", "/data/models")
    if kind == "rpc":
        raise _Refused()
    raise LookupError("no backend named 'tape'")


def main(mode: str, collector: str = "") -> int:
    tracing = (
        TracingConfig(otlp_endpoint=f"127.0.0.1:{collector}", otlp_insecure=True)
        if mode == "exporting"
        else TracingConfig()
    )
    common = SimpleNamespace(
        production=False, logging=LoggingConfig(format="json"), tracing=tracing, identity=None
    )
    bootstrap.load_service_config = lambda *_: (common, None)  # type: ignore[assignment]
    server_module.HANDLER_DRAIN_SECONDS = SHORT_BUDGET_SECONDS
    bootstrap.CLOSE_SECONDS = SHORT_BUDGET_SECONDS
    Telemetry.shutdown = _short_shutdown  # type: ignore[method-assign]
    if os.environ.get(FULL_STDERR_ENV):
        log_writer.FLUSH_SECONDS = SHORT_BUDGET_SECONDS
    slow = mode == "starting-slow-close"
    bootstrap.open_identity = lambda *_, **__: _Identity(slow)  # type: ignore[assignment]

    def build(_common: Any, _section: Any, _identity: Any, tracer: TracerProvider) -> _Running:
        if mode == "hung-stderr-fills":
            return _hung_host()
        if mode.startswith("hung"):
            return _hung_host(mode.removeprefix("hung").removeprefix("-close-"))
        if mode == "exporting":
            return _exporting(tracer)
        if mode == "unexpected":
            raise LookupError("no backend named 'tape'")
        if mode.startswith("stops-on-"):
            return _stops_on(mode.removeprefix("stops-on-"))
        if mode == "listening":
            return _listening(collector)
        if mode == "starting-pool":
            return _starting_pool()
        if mode.startswith("signal-starting-"):
            return _signalled_while_starting(mode.removeprefix("signal-starting-"))
        if mode.startswith("signal-serving-") or mode in (
            "no-stop-thread",
            "raises-as-it-exits",
            "signalled-as-it-exits",
            "stderr-fills",
            "thread-raises",
        ):
            return _listening("0")
        return _starting()

    def started(running: _Running) -> None:
        print(running.host.port, flush=True)
        if mode.startswith("signal-serving-"):
            _signal_holding(_held(mode.removeprefix("signal-serving-")))
        if mode in ("signalled-as-it-exits", "raises-as-it-exits"):
            signal.raise_signal(signal.SIGTERM)
        if mode == "no-stop-thread":
            _refuse_threads("shutdown")
        if mode.endswith("stderr-fills"):
            _fill_stderr_after_the_next_look()
        if mode == "thread-raises":
            _raise_on_a_thread()

    def serve(_config: Path | None) -> int:
        code = bootstrap.run_service("test", None, object, build, after_start=started)  # type: ignore[arg-type]
        if mode == "signalled-as-it-exits":
            signal.raise_signal(signal.SIGTERM)
        if mode == "raises-as-it-exits":
            _raise_as_it_exits()
        return code

    return _as_strongroom_serve(serve)


def _as_strongroom_serve(serve: Callable[[Path | None], int]) -> int:
    """``strongroom serve modelstore`` (the command line's own: what it does before and after the
    service's ``serve``, its signal handlers kept until the exit), the service's ``serve`` being
    ``serve``. A copy of what it does (ends_with_the_process entered here) let ``strongroom serve``
    lose it with no test failing."""
    service = ModuleType("strongroom.modelstore.server")
    service.serve = serve  # type: ignore[attr-defined]
    sys.modules[service.__name__] = service  # what the command line imports for the service
    return cli_main(["serve", "modelstore"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
