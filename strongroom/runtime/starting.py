"""How a service that is still starting stops on SIGTERM (or SIGINT): at defined points between
its start-up's steps, through their normal cleanup.

The early handler raised ``SystemExit`` from the signal handler, which Python runs on the main
thread between any two bytecodes: between opening the HSM and registering its close, between a
lock's acquire and the ``try`` that releases it, inside a failed start's own cleanup. What it
left open or held depended on where it landed. The handler installed here only records the
request (its log line is written on the ``signals`` thread: :mod:`strongroom.runtime.signals`);
start-up checks it at :func:`checkpoint` (after each step that can take
long) and raises :class:`StartupStopped` there, where every step is either done and registered
for cleanup or not begun. A step that can block for long on something outside the process (the
CA, the HSM, the audit log's lock, the storage) runs through :func:`interruptible`, which stops
waiting for it once the stop is asked for (within :data:`POLL_SECONDS`) and closes what it
returns if it ends after that.

Once the service host takes over the signals
(:meth:`~strongroom.runtime.server.ServiceHost.run_until_signal`), it checks a request that came
before (:func:`hand_over`): none is lost between the two handlers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from strongroom.runtime import hangup, signals
from strongroom.runtime.process import exit_now

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_SECONDS = 0.05
"""How often a wait for an :func:`interruptible` step looks for a stop request."""


class StartupStopped(SystemExit):
    """Raised at a start-up checkpoint once a signal asked the starting service to stop; its
    code is the status a death by the signal reports (128 + its number: 143 for SIGTERM)."""


class _Request:
    """The signal that asked a starting service to stop (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        # Only an assignment and a hand-over (signals.later): nothing here may take a lock the
        # interrupted code could hold (a log line's), nor raise into it. Recorded here, not on
        # the signals thread: the next checkpoint must see it.
        first = self.signum is None
        if first:
            self.signum = signum
        signals.later(functools.partial(_say, signum, first=first))


def _say(signum: int, *, first: bool) -> None:
    if first:
        log.warning("signal received while starting; stopping", extra={"signal": signum})
    else:
        log.warning("signal received while stopping; ignored", extra={"signal": signum})


class _Installed:
    """The request start-up is handling now (None: no early handler installed, or handed over),
    and the :func:`interruptible` steps it stopped waiting for that have not ended yet."""

    request: _Request | None = None
    left_running: set[str] = set()
    lock = threading.Lock()


def install() -> None:
    """Has SIGTERM and SIGINT ask the starting service to stop (call from the main thread,
    ``signal.signal`` requires it). Until then they had their default action: the process died
    at once, the lines its log had queued never written."""
    request = _Request()
    signals.install(request.on_signal, signal.SIGTERM, signal.SIGINT)
    _Installed.request = request


@contextlib.contextmanager
def installed(*, keep: bool = False, sighup: str | None = None) -> Iterator[None]:
    """:func:`install` for a service's whole run (its start, serving, stop), and SIGHUP taken
    at the same point (:func:`strongroom.runtime.hangup.install`: ``sighup`` is what the
    service does with it once serving, None for nothing; until then it had its default action,
    which ended the process). When it ends, however, start-up's handling is over (a start
    refused before :func:`hand_over` left its request in place: a later build in the process
    ran its steps as if a stop could come) and the signals the run took (SIGTERM, SIGINT,
    SIGHUP) have their handlers from before (:func:`strongroom.runtime.signals.restoring`,
    whose docstring has the rule), unless ``keep``."""
    with signals.restoring(keep=keep):
        try:
            install()
            hangup.install(sighup)
            yield
        finally:
            _Installed.request = None
            hangup.forget()


def requested() -> int | None:
    """The signal that asked the starting service to stop, or None."""
    request = _Installed.request
    return None if request is None else request.signum


def exit_if_steps_left_running() -> None:
    """Ends the process now (:func:`~strongroom.runtime.process.exit_now`, status 128 + the
    signal) when start-up stopped while an :func:`interruptible` step was still running; else
    returns. Call once start-up's cleanup is done.

    Such a step's thread is a daemon, but what it runs need not be: the object store's start-up
    sweep reads its index on a ``concurrent.futures`` pool, whose workers Python joins at exit
    once they have run every task queued, so a store stopped while an object store did not
    answer exited only once every read had timed out (minutes), not when it was asked to."""
    signum = requested()
    with _Installed.lock:
        running = bool(_Installed.left_running)
    if signum is not None and running:
        exit_now(128 + signum)


def _reached(point: str) -> None:
    """Called at each checkpoint before it looks: a test's launcher replaces it to pause start-up
    at a named point."""


def checkpoint(point: str) -> None:
    """Raises :class:`StartupStopped` when a signal asked the starting service to stop; a no-op
    when nothing installed the early handler (a service built by a test or a benchmark)."""
    _reached(point)
    signum = requested()
    if signum is not None:
        signals.settle()  # its line first, then the cleanup's
        raise StartupStopped(128 + signum)


def hand_over(handler: signals.Handler) -> None:
    """Ends start-up's handling of SIGTERM and SIGINT: ``handler`` (the host's, which drains)
    takes them from now on, unless a stop was asked for first, which raises
    :class:`StartupStopped` (a further signal is then logged and ignored, as while stopping),
    also for a signal that came while the handlers changed. Without :func:`install`, it only
    installs ``handler``."""
    request = _Installed.request
    if request is not None:
        checkpoint("serving")
    signals.install(handler, signal.SIGTERM, signal.SIGINT)
    if request is not None and request.signum is not None:
        # It came between the look above and the new handlers: start-up's still.
        signals.install(request.on_signal, signal.SIGTERM, signal.SIGINT)
        checkpoint("serving")
    _Installed.request = None


def interruptible(point: str, step: Callable[[], T], close: Callable[[T], object] | None) -> T:
    """``step()``'s result; run on a thread of its own while the early handler is installed, so
    that a stop request ends the wait for it (:class:`StartupStopped`) however long it blocks
    (an unreachable CA, a slow HSM, the audit log's lock another process holds). A step that
    ends after that has its result closed by ``close`` on its own thread; what it raises is
    re-raised here. A result it returns before the stop was seen is returned (the caller's next
    :func:`checkpoint` stops, once the caller has registered its cleanup). Without the handler (a test's build), ``step()`` runs here."""
    if _Installed.request is None:
        return step()
    checkpoint(point)
    done = threading.Event()
    lock = threading.Lock()  # orders the step's end against the waiter giving up on it
    outcome: list[T] = []
    failure: list[BaseException] = []
    ended: list[bool] = []  # the step's thread is done with it (under ``lock``)
    abandoned = False

    def run() -> None:
        nonlocal abandoned
        try:
            result = step()
        except BaseException as exc:  # re-raised on the waiting thread
            failure.append(exc)
        else:
            with lock:
                late = abandoned
                if not late:
                    outcome.append(result)
            if late and close is not None:
                try:
                    close(result)
                except Exception:
                    log.exception("closing what %s opened after start-up stopped failed", point)
        finally:
            with lock, _Installed.lock:
                ended.append(True)
                _Installed.left_running.discard(point)
            done.set()

    threading.Thread(target=run, name=f"starting-{point}", daemon=True).start()
    while not done.wait(POLL_SECONDS):
        if requested() is not None:
            with lock:
                if not outcome:
                    abandoned = True
                if abandoned and not ended:
                    with _Installed.lock:
                        _Installed.left_running.add(point)
            if abandoned:
                checkpoint(point)
            break
    done.wait()  # at once: it ended, or it had its result before the stop was seen
    if failure:
        raise failure[0]
    # Returned even when a stop came meanwhile: the caller registers its cleanup, and its next
    # checkpoint stops.
    return outcome[0]
