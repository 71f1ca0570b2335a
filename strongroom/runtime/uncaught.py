"""What a service's process does with an exception nothing caught: one that ended a thread (the
main thread's included), or one the interpreter could not raise (a ``__del__``'s, a callback's):
one ERROR line in the service's log (:mod:`~strongroom.runtime.logs`), its traceback the line's
``exc`` as everywhere else, never a traceback printed to stderr.

Python's own hooks print the traceback to ``sys.stderr``, beside the service's structured lines
and through stderr's buffer under its lock: with a full pipe whose collector had stopped reading,
the thread waited there for good, and a non-daemon one held the process at exit (the interpreter
joins them) until SIGKILL. :func:`install` is the service process's alone
(:func:`~strongroom.runtime.bootstrap.run_service`, through :func:`installed`): imported, this
module changes nothing, and a process that runs a service and goes on (a test's: pytest's own
hooks fail a test whose thread raised) has its own hooks back once the service has stopped
(:mod:`~strongroom.runtime.lifetime`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from types import TracebackType

from strongroom.runtime.log_writer import never_wait_here

log = logging.getLogger(__name__)


def install() -> None:
    """Makes :func:`thread_ended` the process's ``threading.excepthook``,
    :func:`main_thread_ended` its ``sys.excepthook`` and :func:`unraisable` its
    ``sys.unraisablehook``."""
    threading.excepthook = thread_ended
    sys.excepthook = main_thread_ended
    sys.unraisablehook = unraisable


@contextlib.contextmanager
def installed(*, keep: bool = False) -> Iterator[None]:
    """:func:`install` for a service's run; when it ends (however it ends) the three hooks are
    the ones from before again, unless ``keep`` (a process that ends with its service:
    :mod:`~strongroom.runtime.lifetime`). Kept in a process that went on, a stopped
    service's hooks logged a later thread's error through the service's closed log, and a test
    process's pytest hooks, which fail the test whose thread raised, were gone for good."""
    before = threading.excepthook, sys.excepthook, sys.unraisablehook
    install()
    try:
        yield
    finally:
        if not keep:
            threading.excepthook, sys.excepthook, sys.unraisablehook = before


def thread_ended(args: threading.ExceptHookArgs) -> None:
    """Logs, at ERROR, the exception that ended a thread: ``thread ended on an uncaught
    error``, with ``thread_name``, ``error_type`` and ``error`` (its message), its traceback
    the line's ``exc``. A ``SystemExit`` ends its thread silently, as Python's own hook does."""
    if issubclass(args.exc_type, SystemExit):
        return
    # The thread is ending: its line goes through the log's queue, so that the end of a
    # non-daemon thread (which the exit joins) never waits for the log's destination.
    never_wait_here()
    name = args.thread.name if args.thread is not None else threading.current_thread().name
    _log(
        "thread ended on an uncaught error",
        args.exc_type,
        args.exc_value,
        args.exc_traceback,
        thread_name=name,
    )


def main_thread_ended(
    error_type: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """Logs, as :func:`thread_ended` does, the exception that ended the main thread (one the
    command line does not print as one line: not a StrongroomError, an OSError nor a refused
    call), and so the process."""
    never_wait_here()
    _log(
        "thread ended on an uncaught error",
        error_type,
        error,
        traceback,
        thread_name=threading.current_thread().name,
    )


def unraisable(args: sys.UnraisableHookArgs) -> None:
    """Logs, at ERROR, an exception the interpreter could not raise (in a ``__del__``, a weak
    reference's callback, a generator's close at collection): ``an error could not be raised``,
    with ``where`` (Python's own words, ``Exception ignored in: <the object>``), ``error_type``
    and ``error``, its traceback the line's ``exc``."""
    where = args.err_msg or "Exception ignored in"
    if args.object is not None:
        try:
            where = f"{where}: {args.object!r}"
        except Exception:  # an object half torn down: its type says enough
            where = f"{where}: a {type(args.object).__qualname__}"
    _log(
        "an error could not be raised",
        args.exc_type,
        args.exc_value,
        args.exc_traceback,
        where=where,
    )


def _log(
    message: str,
    error_type: type[BaseException],
    error: BaseException | None,
    traceback: TracebackType | None,
    **fields: str,
) -> None:
    # A hook that raised would have Python print both tracebacks to stderr, and a line about a
    # failure can fail as the failure did: nowhere else to say it.
    with contextlib.suppress(BaseException):
        log.error(
            message,
            exc_info=None if error is None else (error_type, error, traceback),
            extra={**fields, "error_type": _type_name(error_type), "error": _text(error)},
        )


def _text(error: BaseException | None) -> str:
    """``error``'s message, or what is known of it when its ``__str__`` fails too."""
    if error is None:
        return ""
    try:
        return str(error)
    except Exception:
        return f"(its message could not be read: {type(error).__qualname__})"


def _type_name(cls: type[BaseException]) -> str:
    """``cls``'s dotted name, without the ``builtins.`` of Python's own."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
