"""The ``signals`` thread (strongroom.runtime.signals): what a signal handler hands over runs
there, in order, whatever an earlier hand-over raised."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from strongroom.runtime import signals
from strongroom.runtime.bootstrap import CLOSE_SECONDS, stop_seconds
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.log_writer import FLUSH_SECONDS
from strongroom.runtime.server import HANDLER_DRAIN_SECONDS
from strongroom.runtime.telemetry import TELEMETRY_SECONDS


@pytest.fixture
def relay() -> Iterator[None]:
    """The ``signals`` thread running (no handler installed: nothing signals this process)."""
    signals._start()
    yield
    assert signals.settle(30)


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
        assert signals.settle(30)
    finally:
        logger.removeHandler(refusing)
    signals.later(ran.set)
    assert signals.settle(30)
    assert ran.is_set()
    thread = signals._Relay.thread
    assert thread is not None and thread.is_alive()


def test_a_stuck_signals_thread_is_waited_for_once_not_at_every_settle(relay: None) -> None:
    """Each settle waited its own SETTLE_SECONDS for a ``signals`` thread stuck for good (a
    start-up's checkpoint, then the exit's handler, then ``exit_now``): a stop's budget had to
    hold one such wait per settle. Once one has given up, the next return at once, until the
    thread gets past where it was stuck; then they wait again."""
    stuck = threading.Event()
    signals.later(stuck.wait)
    try:
        assert not signals.settle(0.01)
        answers: list[bool] = []
        waiter = threading.Thread(target=lambda: answers.append(signals.settle(3600)))
        waiter.start()
        waiter.join(30)  # a hang, not a speed: it waited its hour
        assert not waiter.is_alive() and answers == [False]
    finally:
        stuck.set()
    behind = signals._Relay.behind
    assert behind is not None and behind.wait(30)  # past where it was stuck
    assert signals.settle(30)


def test_the_longest_stop_counts_the_exits_wait_for_the_signals_thread() -> None:
    """``stop_seconds`` left out the exit's wait for the ``signals`` thread, said to come out of
    the orchestrator's margin: an operator who sized ``terminationGracePeriodSeconds`` by the
    sum had 2 s less than the stop could take. It is part of the sum now (the deploy tests
    check the chart's and compose's waits against it)."""
    server = ServerConfig()
    assert stop_seconds(server) == (
        server.grace_seconds
        + HANDLER_DRAIN_SECONDS
        + CLOSE_SECONDS
        + FLUSH_SECONDS
        + TELEMETRY_SECONDS
        + signals.SETTLE_SECONDS
    )
