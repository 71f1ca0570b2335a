"""A key release that sends its headers and never its message is ended, and its worker freed.

A data-plane call holds a data-plane worker while it waits for its request message; one that
never sent it held the worker until the client's deadline or the connection's age (1800 s +- 10 %
+ 600 s grace), so that a stall cost nothing and lasted 40 minutes. The wait is bounded now
(``server.request_wait_seconds``, 1 s here): the call is cancelled, and the broker's audit is told
``REQUEST_MESSAGE_TIMEOUT``. Counts only, and "ended well before the client's own deadline".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.runtime.config import ServerConfig
from tests.abuse.conftest import SERVER, abuse_stack
from tests.abuse.releases import StalledReleases, settled
from tests.abuse.traffic import BROKER
from tests.runtime.held_reads import hold_after_read

SHARE = ServerConfig().data_plane_workers_per_identity // 2  # 6: what one certificate holds
DEADLINE = 600.0  # the stalled calls' own deadline, far beyond anything here


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """The abuse stack with a 1 s wait for a data-plane call's request message."""
    server = {**SERVER, "request_wait_seconds": 1}
    with abuse_stack(step_ca_binary, tmp_path_factory, simulated_tee_dir, server) as dev:
        yield dev


def test_a_stalled_release_is_ended_and_audited_and_a_genuine_one_is_not(
    stack: DevStack, genuine: Any
) -> None:
    """A certificate's share of releases that never send their message all end (CANCELLED,
    audited REQUEST_MESSAGE_TIMEOUT) within the settle bound, 30 s, while their own deadline is
    600 s away, and give their workers back; genuine releases (message sent with the call)
    succeed, before and after (on the old code the stalled calls were still open)."""
    caller = stack.spiffe_id("inference")
    broker = stack.services["keybroker"].handle.host
    audit = stack.root / "state" / "keybroker" / "audit.log"
    before = len(read_audit_records(audit))
    attacker = StalledReleases(stack, stack.identity("inference"), SHARE, timeout=DEADLINE)
    try:
        genuine_outcomes = Counter(genuine() for _ in range(3))
        ended = settled(lambda: attacker.ended() == SHARE)
        refused = attacker.refused()
    finally:
        attacker.end()
    assert ended  # long before the client's deadline
    assert refused == Counter({("CANCELLED", None): SHARE})
    assert genuine_outcomes == Counter({("OK", None): 3})
    assert settled(lambda: broker.unary.running(caller) == 0)
    assert broker.shares.certificates_held() == 0
    records = read_audit_records(audit)[before:]
    timed_out = [r for r in records if r["reason"] == "REQUEST_MESSAGE_TIMEOUT"]
    assert timed_out  # one by one, or counted within the caller's audit budget
    assert {(r["decision"], r["caller"]["spiffe_id"]) for r in timed_out} == {("denied", caller)}
    assert Counter(genuine() for _ in range(3)) == Counter({("OK", None): 3})


def test_a_release_whose_message_was_read_as_the_watchdog_fired_is_not_granted(
    stack: DevStack, genuine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request watchdog cancelled a call whose wait it found past the bound while the call's
    handler, its message just read, went on: a ReleaseKey was granted, its key re-wrapped and
    audited allowed, and its answer never delivered (the call cancelled), so the audit said a
    key was released that its caller never got. Here the handler is held between the read and
    what follows it until the watchdog has cancelled the call: the release is refused for the
    watchdog's reason (audited denied REQUEST_MESSAGE_TIMEOUT), and nothing is granted."""
    # Held, its message read, until the watchdog ends the call (1 s, the wait bound).
    cut = hold_after_read(monkeypatch, f"/{BROKER}/ReleaseKey")
    caller = stack.spiffe_id("inference")
    broker = stack.services["keybroker"].handle.host
    audit = stack.root / "state" / "keybroker" / "audit.log"
    before = len(read_audit_records(audit))
    assert genuine() == ("CANCELLED", None)
    assert cut.wait(30)  # its client may hear of the cancel before the handler does
    assert settled(lambda: broker.unary.running(caller) == 0)  # the handler has returned

    def releases() -> list[tuple[str, str]]:
        return [
            (r["decision"], r["reason"])
            for r in read_audit_records(audit)[before:]
            if r["action"] == "key_release"
        ]

    # The refusal's record is written by the error mapping's observer once the call has ended,
    # which may be after its handler returned (a rehearsal under load read the log before it).
    assert settled(lambda: bool(releases()))
    assert releases() == [("denied", "REQUEST_MESSAGE_TIMEOUT")]
    monkeypatch.undo()
    assert genuine() == ("OK", None)
