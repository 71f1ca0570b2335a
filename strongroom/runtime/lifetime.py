"""Whether what a service changed in its process outlives it: the process's own again once the
service has stopped, or the service's until the process exits.

:func:`~strongroom.runtime.bootstrap.run_service` changes its process: the handlers of the
signals it takes (:mod:`~strongroom.runtime.signals`), the exception hooks
(:mod:`~strongroom.runtime.uncaught`) and the root logger (its handlers, its level, the quiet
libraries' levels: :func:`~strongroom.runtime.logs.configured`). In a process that goes on after
the service (a test's, a host embedding one) each comes back as it was once the stop is over,
however it ended: kept, a stopped service's hooks logged a later thread's error through its closed
log, and its handlers took a later Ctrl-C for a stop. In a process that ends with its service
(``strongroom serve``: a run inside :func:`ends_with_the_process`) each stays until the exit:
past ``run_service`` such a process only exits, and its exit still writes through them (the
command line's error line goes through the service's log, an error that ends the main thread is
its log's line, a SIGTERM then is logged and the exit is its own).

The choice is the run's: ``run_service`` reads it once as it begins (:func:`kept_for_the_process`)
and hands it to each give-back. It was a process-wide flag that nothing reset: one in-process
``main(["serve", ...])`` (a test's) made every later run in that process keep everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_ENDS_WITH_THE_PROCESS: ContextVar[bool] = ContextVar("ends_with_the_process", default=False)


@contextlib.contextmanager
def ends_with_the_process() -> Iterator[None]:
    """Has the services run inside it keep what they change in their process until it exits: for
    a process that ends with its service (``strongroom serve``). A run begun before it or after
    it gives everything back."""
    token = _ENDS_WITH_THE_PROCESS.set(True)
    try:
        yield
    finally:
        _ENDS_WITH_THE_PROCESS.reset(token)


def kept_for_the_process() -> bool:
    """Whether a service run beginning now keeps what it changes (it is inside
    :func:`ends_with_the_process`): nothing of it is given back."""
    return _ENDS_WITH_THE_PROCESS.get()
