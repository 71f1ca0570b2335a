"""One replica of the inference fleet cannot hold its whole fleet's calls at the key broker.

Every replica has the one inference SPIFFE ID, so the broker's caps per identity are the fleet's.
One replica (its own certificate, as each enrolment gives) that opened ``ReleaseKey`` calls and
never sent their message held all 13 of them for as long as its connection lived, and every other
replica's release was refused ``TOO_MANY_UNARY_CALLS_PER_IDENTITY`` (65 of 65 in 20 s, measured).
A certificate now holds half of each cap; the identity's caps still bound all its certificates
together. Counts only: how many calls each side had admitted or refused, never how fast.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.runtime.callers import certificate_share
from strongroom.runtime.config import ServerConfig
from tests.abuse.conftest import SERVER, abuse_stack
from tests.abuse.releases import StalledReleases, counted, settled

CAP = ServerConfig().data_plane_workers_per_identity  # 13: the fleet's, on the broker
SHARE = certificate_share(CAP)  # 6: one certificate's, as a fleet sets it


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """The abuse stack, its stalled releases held until the test ends them (a data-plane
    call's wait for its message is bounded: tests/abuse/test_request_wait.py)."""
    server = {**SERVER, "request_wait_seconds": 600, "max_calls_per_certificate": SHARE}
    with abuse_stack(step_ca_binary, tmp_path_factory, simulated_tee_dir, server) as dev:
        yield dev


def test_one_replica_stalling_releases_leaves_its_fleet_the_rest_of_the_cap(
    stack: DevStack, genuine: Any
) -> None:
    """One inference certificate opens 3 x the cap of releases that never send their message: it
    holds its share, its others are refused TOO_MANY_CALLS_PER_CERTIFICATE (audited), and another
    replica's genuine releases all succeed meanwhile (on the old code: 0 of 5)."""
    caller = stack.spiffe_id("inference")
    broker = stack.services["keybroker"].handle.host
    audit = stack.root / "state" / "keybroker" / "audit.log"
    before = len(read_audit_records(audit))
    attacker = StalledReleases(stack, stack.identity("inference"), 3 * CAP)
    try:
        assert settled(lambda: counted(stack, [attacker]))
        genuine_outcomes = Counter(genuine() for _ in range(5))
        held = (broker.unary.running(caller), attacker.open())
        refused = attacker.refused()
    finally:
        attacker.end()
    assert genuine_outcomes == Counter({("OK", None): 5})
    assert held == (SHARE, SHARE)
    assert refused == Counter(
        {("RESOURCE_EXHAUSTED", "TOO_MANY_CALLS_PER_CERTIFICATE"): 3 * CAP - SHARE}
    )
    records = read_audit_records(audit)[before:]
    audited = [r for r in records if r["reason"] == "TOO_MANY_CALLS_PER_CERTIFICATE"]
    assert audited  # refused releases are audited (one by one, or counted within the budget)
    assert {(r["decision"], r["caller"]["spiffe_id"]) for r in audited} == {("denied", caller)}
    assert settled(lambda: broker.unary.running(caller) == 0)
    # The shares hold only what runs: nothing once the calls ended.
    assert broker.shares.certificates_held() == 0


def test_fresh_certificates_take_their_shares_and_never_more_than_the_identitys_cap(
    stack: DevStack, genuine: Any
) -> None:
    """A replica can renew onto new serials at will: three certificates, each opening 3 x the cap
    of stalled releases, hold the identity's cap (13) between them, not three shares (18); what
    the identity's cap leaves them is refused as before, and so is the genuine replica then."""
    caller = stack.spiffe_id("inference")
    broker = stack.services["keybroker"].handle.host
    attackers = []
    try:
        for _ in range(3):
            attackers.append(StalledReleases(stack, stack.identity("inference"), 3 * CAP))
            assert settled(lambda: counted(stack, attackers))
        assert broker.unary.running(caller) == CAP
        assert [a.open() for a in attackers] == [SHARE, SHARE, CAP - 2 * SHARE]
        reasons = set().union(*(a.refused() for a in attackers))
        assert reasons == {
            ("RESOURCE_EXHAUSTED", "TOO_MANY_CALLS_PER_CERTIFICATE"),
            ("RESOURCE_EXHAUSTED", "TOO_MANY_UNARY_CALLS_PER_IDENTITY"),
        }
        # Residual, and said so in the README: a replica with enough serials holds the fleet's cap.
        assert genuine() == ("RESOURCE_EXHAUSTED", "TOO_MANY_UNARY_CALLS_PER_IDENTITY")
    finally:
        for attacker in attackers:
            attacker.end()
    assert settled(lambda: broker.unary.running(caller) == 0)
    assert genuine() == ("OK", None)
