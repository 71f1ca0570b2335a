"""What SIGHUP does in a service's run, from start-up's first handler on.

SIGHUP's default action ends the process. The key broker took SIGHUP (its audit log's
rotation) only once it served, and the other services never: a logrotate ``postrotate kill
-HUP`` that landed while the broker started (enrolment, the HSM, its key scan: seconds) or that
reached the model store or inference at any time ended the process on the spot, killed by the
signal, no log line, its drain skipped, its audit log closed uncleanly.

A service's run now takes SIGHUP where it takes SIGTERM and SIGINT
(:func:`strongroom.runtime.starting.installed`). The handler installed here only records it and
hands its log line to the ``signals`` thread (:mod:`strongroom.runtime.signals`). A service
with something to do on SIGHUP (``action``: the broker's rotation) takes it with :func:`take`
once it serves, which does that once if any SIGHUP came before (however many came); a service
without one keeps this handler for its whole run, and each SIGHUP is logged and ignored.
"""

from __future__ import annotations

import functools
import logging
import signal

from strongroom.runtime import signals

log = logging.getLogger(__name__)

DEFERRED = "SIGHUP during start-up: %s once serving"
"""The line of a SIGHUP that came before the service's own SIGHUP handler (``%s``: its action)."""
IGNORED = "SIGHUP ignored: this service has no action for it"
"""The line of a SIGHUP to a service with nothing to do on it."""


class _Recorder:
    """Start-up's SIGHUP handler: records that one came, for :func:`take` to act on."""

    def __init__(self, action: str | None) -> None:
        self.action = action
        self.came = False

    def on_signal(self, signum: int, _frame: object) -> None:
        # An assignment and a hand-over only (signals.later): a log line here could wait for good
        # on a lock the interrupted main thread holds.
        self.came = True
        signals.later(functools.partial(_say, self.action, signum))


def _say(action: str | None, signum: int) -> None:
    if action is None:
        log.warning(IGNORED, extra={"signal": signum})
    else:
        log.info(DEFERRED, action, extra={"signal": signum})


class _Installed:
    """The run's start-up SIGHUP handler (None: none installed, or :func:`take` replaced it)."""

    recorder: _Recorder | None = None


def install(action: str | None) -> None:
    """Has SIGHUP recorded (``action``: what the service will do with it once serving, in the
    words of its log line, ``the audit log will be rotated``) or ignored (None), each logged,
    instead of ending the process. Call from the main thread inside a service's run
    (:func:`strongroom.runtime.signals.restoring`), as :func:`signals.install` requires."""
    recorder = _Recorder(action)
    signals.install(recorder.on_signal, signal.SIGHUP)
    _Installed.recorder = recorder


def take(handler: signals.Handler) -> None:
    """Makes ``handler`` SIGHUP's from now on, then, when a SIGHUP came before it (since
    :func:`install`), calls it once, here, as that signal's: however many came, one call. The
    new handler is in place before the look, so a SIGHUP in between is either recorded (and
    passed on here) or ``handler``'s own, never lost nor the default action's. ``handler``
    must be one that may also run outside a signal (the broker's hands its rotation to the
    ``signals`` thread, requests not yet started being one). Call from the main thread, inside
    a service's run."""
    recorder = _Installed.recorder
    signals.install(handler, signal.SIGHUP)
    _Installed.recorder = None
    if recorder is not None and recorder.came:
        handler(signal.SIGHUP, None)


def forget() -> None:
    """Ends the run's record (its handler itself is given back with the run's signals)."""
    _Installed.recorder = None
