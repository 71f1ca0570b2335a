"""What a signal asks for, done on a thread of its own (``signals``), not in the signal handler.

A Python signal handler runs on the main thread between two bytecodes of whatever that thread was
doing, holding what it held. The host's SIGTERM handler logged and started its stop's thread
there: that (non-daemon) thread's start waits for ``threading._shutdown_locks_lock`` (Python 3.11
and 3.12), a plain lock the main thread holds as it joins a non-daemon thread that ended and at
exit, and a log line takes the lock of every handler it goes to (a standard-library
``QueueHandler``'s is a plain one). A signal landing there waited for the main thread, which
waited for the handler: the process never stopped, and the orchestrator's SIGKILL ended it
without its drain, its audit log's close or its log's last lines.

A product signal handler now only records what it must at once (a plain assignment, a lock taken
without waiting) and hands the rest to :func:`later`, which puts it on a
:class:`queue.SimpleQueue` (whose ``put`` is documented reentrant: safe in a signal handler, it
takes no lock the interrupted code could hold); the ``signals`` thread, started before any handler
is installed (:func:`install`), runs it. :func:`settle` waits for what was handed over so far: a
start-up stopped by a signal logs its line before it cleans up, and the process's exit (an exit
handler, :func:`~strongroom.runtime.process.exit_now`) writes the lines of signals that came
while it stopped. The broker's SIGHUP handler (its audit log's rotation) hands over the same way.

The ``signals`` thread never writes a log line itself: each goes through the service log's queue
(:func:`~strongroom.runtime.log_writer.never_wait_here`). Written where it was logged, a line
could wait for good in its write (another writer of stderr, gRPC's C core, filled the pipe
between the log's look at it and the write, and the collector had stopped reading): the first
SIGTERM's stop never started, nor anything handed over after it.

The handlers a service installs are its own while it runs, and no longer: :func:`restoring`
records what each signal had before the first :func:`install` in it, and puts that back when it
ends, on every way out (a clean stop, a start-up refused, an exception); :func:`install`
outside one is refused, since nothing would give its handler back.
:func:`~strongroom.runtime.bootstrap.run_service` runs a service in it, so a process that runs
one and goes on (a test's, a host embedding a service) has its own handlers back: they stayed
the stopped service's, and a later SIGINT meant for the process (a KeyboardInterrupt) was taken
for a stop that no longer had a service, and was lost. The rule for when:

- Never before the stop is over: the handlers come back once ``run_service`` has done
  everything (the host's drain, the service's close, its audit log's last records and close,
  the telemetry's end). A SIGTERM during the stop still reaches the service's handler (logged,
  ignored: the stop is under way), never the default action, which would end the process
  before the audit log is closed and the log's last lines are written.
- Never in a process that ends with its service (``strongroom serve``, its run inside
  :func:`~strongroom.runtime.lifetime.ends_with_the_process`, which keeps the service's
  exception hooks and logging too: ``keep``): past ``run_service`` such a process only exits,
  and its exit still writes lines (the command line's error line, queued through the service's
  log; what the exit's :func:`settle` and ``logging.shutdown`` write). Given back the default
  action, a SIGTERM there ended the process at once, those lines lost and its status the
  signal's, not its own; the service's handler logs it and lets the exit finish. A stop that ends the process
  itself (:func:`~strongroom.runtime.process.exit_now`) never gets that far either.

A handler that Python did not install (``signal.getsignal`` says None: set by C code) cannot be
put back from Python: that signal keeps the service's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from queue import SimpleQueue
from types import FrameType

from strongroom.runtime.log_writer import never_wait_here

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], object]
Disposition = Handler | int | None
"""What ``signal.getsignal`` answers: a handler, ``SIG_DFL``/``SIG_IGN``, or None (not Python's)."""

SETTLE_SECONDS = 0.5
"""How long :func:`settle` waits for the ``signals`` thread, once per process while it does not
get there (what it runs takes no time: a log line queued, a thread started; a bound all the
same, since the exit waits for it); part of :func:`~strongroom.runtime.bootstrap.stop_seconds`."""

_queue: SimpleQueue[Callable[[], object]] = SimpleQueue()


class _Relay:
    """The ``signals`` thread (None: not started yet)."""

    thread: threading.Thread | None = None
    lock = threading.Lock()
    # What a settle that gave up waits for (set once the thread gets there): until then every
    # later settle gives up at once (each waited its own 2 s more for a thread stuck for good).
    behind: threading.Event | None = None


def install(handler: Handler, *signums: int) -> None:
    """Makes ``handler`` handle ``signums`` (call from the main thread, as ``signal.signal``
    requires), the ``signals`` thread running first: a handler that hands its work to
    :func:`later` never starts it. Only inside a :func:`restoring` (a service's run, or
    :func:`given_back`), which gives the handlers back; outside one it raises RuntimeError,
    nothing changed: installed there (the key broker's SIGHUP rotation called outside a
    service's run), a handler stayed the process's for good."""
    if not _Restoring.scopes:
        names = ", ".join(signal.Signals(signum).name for signum in signums)
        raise RuntimeError(
            f"a handler of {names} installed outside a service's run (signals.restoring) would "
            "never be given back"
        )
    _start()
    for signum in signums:
        before = signal.signal(signum, handler)
        for saved in _Restoring.scopes:
            saved.setdefault(signum, before)


class _Restoring:
    """What each open :func:`restoring` records: the handler each signal had before the first
    :func:`install` in it (the innermost last)."""

    scopes: list[dict[int, Disposition]] = []


@contextlib.contextmanager
def restoring(*, keep: bool = False) -> Iterator[None]:
    """Puts back, when it ends (however it ends), the handlers the signals that :func:`install`
    changed in it had before; unless ``keep`` (a process that ends with its service: the
    module's docstring says why). Call from the main thread, as :func:`install`."""
    saved: dict[int, Disposition] = {}
    _Restoring.scopes.append(saved)
    try:
        yield
    finally:
        # This one, not the first equal to it (list.remove): a scope inside another, both
        # recording the same handlers, ended the outer one's record instead, whose later installs
        # then went unrecorded and whose own end raised ValueError, nothing put back.
        _Restoring.scopes[:] = [scope for scope in _Restoring.scopes if scope is not saved]
        if not keep:
            for signum, before in saved.items():
                if before is not None:  # not Python's: nothing to put back from here
                    signal.signal(signum, before)


@contextlib.contextmanager
def given_back() -> Iterator[None]:
    """Gives back, when it ends, the handlers installed in it (:func:`restoring`), unless a
    :func:`restoring` is open already: then that one does, when it ends (a service's run, whose
    handlers must stay the service's until its close is over)."""
    if _Restoring.scopes:
        yield
        return
    with restoring():
        yield


def later(work: Callable[[], object]) -> None:
    """Runs ``work`` on the ``signals`` thread, after what was handed over before it: the one
    thing a signal handler may call here (a reentrant put, no lock, no thread started)."""
    _queue.put(work)


def settle(timeout: float = SETTLE_SECONDS) -> bool:
    """Waits, ``timeout`` at most, until what was handed to :func:`later` so far has run;
    whether it has. Once a wait has given up, returns False at once until the thread has got
    past where it gave up: a stop's waits for a thread stuck for good come to one ``timeout``,
    not one each. Not from a signal handler, nor from the work itself (it returns at once)."""
    thread = _Relay.thread
    if thread is None or not thread.is_alive() or thread is threading.current_thread():
        return True
    behind = _Relay.behind
    if behind is not None and not behind.is_set():
        return False
    done = threading.Event()
    _queue.put(done.set)
    if done.wait(timeout):
        return True
    _Relay.behind = done
    return False


def _start() -> None:
    with _Relay.lock:
        # Not alive in a forked child: the thread stayed with its parent.
        if _Relay.thread is not None and _Relay.thread.is_alive():
            return
        first = _Relay.thread is None
        _Relay.thread = threading.Thread(target=_run, name="signals", daemon=True)
        _Relay.thread.start()
    if first:
        # Before logging's own exit handler (exit handlers run last registered first): the lines
        # of signals that came while the process stopped are written, not lost with the thread.
        atexit.register(settle)


def _run() -> None:
    never_wait_here()
    while True:
        work = _queue.get()
        try:
            work()
        except BaseException:
            # Nothing may end this thread: every later signal would be handed to a thread that
            # no longer runs (a SIGTERM recorded and never acted on). A SystemExit ends a thread
            # silently, and a line about a failure can fail as the failure did.
            with contextlib.suppress(BaseException):
                log.exception("handling a signal failed")
