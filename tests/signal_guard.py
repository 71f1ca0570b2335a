"""What the suite's signal guard (tests/conftest.py) looks at: the Python handlers of the signals
the product or a test may change, and how a change is put back and named.

A handler a test leaves behind changes every later test in the process: a service run in the
pytest process (``run_service``) left SIGINT and SIGTERM handled as its stop, and a later test
that interrupts itself with SIGINT (tests/e2e/test_publish_busy.py) waited for good, the hang
found far from its cause. The guard finds it at the test (or the module's fixtures) that left it.
"""

from __future__ import annotations

import signal

from strongroom.runtime.signals import Disposition

# Not SIGALRM: pytest-timeout's (its timer) during every test, installed before the test's
# fixtures and removed after them, or as soon as the test fails (before its fixtures' teardown).
GUARDED = (
    signal.SIGCHLD,
    signal.SIGHUP,  # every service's run: the key broker's audit rotation, the others' ignored
    signal.SIGINT,  # a service's stop, a command line's KeyboardInterrupt
    signal.SIGPIPE,  # Python's own SIG_IGN, which a writer to a closed pipe relies on
    signal.SIGTERM,  # a service's stop
    signal.SIGURG,  # a publish's broken lease (F_SETSIG): its default action is to ignore it
    signal.SIGUSR1,  # the benchmarks' profiled service
    signal.SIGUSR2,
    signal.SIGXFSZ,  # the audit tests' full disk (in their own processes)
)

Handlers = dict[signal.Signals, Disposition]


def handlers(signums: tuple[signal.Signals, ...] = GUARDED) -> Handlers:
    """Each of ``signums``' handler now (``signal.getsignal``)."""
    return {signum: signal.getsignal(signum) for signum in signums}


def put_back(before: Handlers) -> list[str]:
    """Makes each signal's handler the one in ``before`` again; one line per signal that had
    changed, naming it, the handler it had and the one it should have had (empty: none had)."""
    changed = []
    for signum, handler in handlers(tuple(before)).items():
        if handler != before[signum]:
            changed.append(f"{signum.name}: {describe(handler)} (was {describe(before[signum])})")
            # None: not a handler Python installed, nothing to put back from here.
            if before[signum] is not None:
                signal.signal(signum, before[signum])
    return changed


def describe(handler: Disposition) -> str:
    """``handler`` by name: ``SIG_DFL``, ``SIG_IGN``, a function's module and qualified name (a
    bound method's, ``strongroom.runtime.starting._Request.on_signal``)."""
    if isinstance(handler, signal.Handlers):
        return handler.name
    if handler is None:
        return "None (not installed from Python)"
    if isinstance(handler, int):
        return str(handler)
    module = getattr(handler, "__module__", None) or "?"
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}.{name}"
