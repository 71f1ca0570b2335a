"""Whether what a service changed in its process outlives it: the process's own again once the
service has stopped, or the service's until the process exits.

:func:`~strongroom.runtime.bootstrap.run_service` changes its process: the handlers of the
signals it takes (:mod:`~strongroom.runtime.signals`), the exception hooks
(:mod:`~strongroom.runtime.uncaught`) and the root logger (its handlers, its level, the quiet
libraries' levels: :func:`~strongroom.runtime.logs.configured`). In a process that goes on after
the service (a test's, a host embedding one) each comes back as it was once the stop is over,
however it ended: kept, a stopped service's hooks logged a later thread's error through its closed
log, and its handlers took a later Ctrl-C for a stop. In a process that ends with its service
(``strongroom serve``: :func:`keep_for_the_process`) each stays until the exit: past
``run_service`` such a process only exits, and its exit still writes through them (the command
line's error line goes through the service's log, an error that ends the main thread is its
log's line, a SIGTERM then is logged and the exit is its own).
"""

from __future__ import annotations


class _Process:
    kept = False  # keep_for_the_process() was called


def keep_for_the_process() -> None:
    """Has what a service changes in its process stay until the process exits: for a process
    that ends with its service (``strongroom serve``)."""
    _Process.kept = True


def kept_for_the_process() -> bool:
    """Whether :func:`keep_for_the_process` was called: nothing a service changed is given
    back."""
    return _Process.kept
