"""The ``signals`` thread (strongroom.runtime.signals): what a signal handler hands over runs
there, in order, whatever an earlier hand-over raised."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from strongroom.runtime import signals


@pytest.fixture
def relay() -> Iterator[None]:
    """The ``signals`` thread running (no handler installed: nothing signals this process)."""
    signals._start()
    yield
    assert signals.settle()


class _Refusing(logging.Handler):
    """A log handler that fails: the line the relay logs about a failure fails too."""

    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError("the log failed")


def _exits() -> None:
    sys.exit(3)


def _interrupts() -> None:
    raise KeyboardInterrupt


def _fails() -> None:
    raise ValueError("the work failed")


@pytest.mark.parametrize(
    ("work", "log_fails"),
    [(_exits, False), (_interrupts, False), (_fails, True)],
    ids=["system-exit", "keyboard-interrupt", "failure-whose-log-line-fails"],
)
def test_what_a_hand_over_raises_does_not_end_the_signals_thread(
    relay: None, work: Callable[[], None], log_fails: bool
) -> None:
    """The thread caught Exception only, and logged what it caught: a SystemExit (which a
    thread ends on silently), a KeyboardInterrupt, or a failure whose own log line failed ended
    it, and every later signal was handed to a thread that no longer ran: a SIGTERM was
    recorded and never acted on (the service could no longer be stopped but by SIGKILL), a
    SIGHUP's rotation never started. Now nothing a hand-over raises ends it."""
    logger = logging.getLogger(signals.__name__)
    refusing = _Refusing()
    if log_fails:
        logger.addHandler(refusing)
    ran = threading.Event()
    try:
        signals.later(work)
        assert signals.settle()
    finally:
        logger.removeHandler(refusing)
    signals.later(ran.set)
    assert signals.settle()
    assert ran.is_set()
    thread = signals._Relay.thread
    assert thread is not None and thread.is_alive()
