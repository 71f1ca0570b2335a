"""How much the broker's per-certificate budgets remember of a replica minting certificates.

A replica holding its service's provisioner (or any replica rekeying) gets a new certificate, and
a new budget beneath its SPIFFE ID's, as fast as the CA signs: 115 a second from one step-ca here
with one client thread, 274 with eight. The VCEK fetch budget remembered each certificate for
240 s (4 fetches, then one a minute) and unwrap_first for 64 s, so a table grew to 65,000
certificates, and each take walked it all (13 ms a take, under the GIL, for every caller's
release). Each table now holds :data:`~strongroom.runtime.callers.MAX_CERTIFICATES_TRACKED` at
most, the certificate counted longest ago forgotten first; the SPIFFE ID's budget still bounds
every certificate together, those forgotten included.
"""

from __future__ import annotations

import pytest

from strongroom.keybroker import fetch_budget, refusals, unwrap_first
from strongroom.keybroker.fetch_budget import VcekFetchBudget, fetching_for
from strongroom.keybroker.unwrap_first import UnwrapFirst

FLEET = "spiffe://strongroom.test/inference"
MINTED_PER_SECOND = 274.0  # what one step-ca signed here, eight client threads


def test_a_replica_minting_certificates_leaves_a_bounded_fetch_table_and_the_fleets_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch_budget, "MAX_CERTIFICATES_TRACKED", 64)
    now = [0.0]
    gate = VcekFetchBudget(lambda: now[0])
    granted = 0
    for serial in range(1, 2001):  # each new certificate names made-up chips till refused
        with fetching_for(FLEET, serial):
            granted += sum(gate() for _ in range(fetch_budget.VCEK_FETCH_CERTIFICATE_BURST))
        now[0] += 1.0 / MINTED_PER_SECOND
    assert gate.certificates_tracked() == 64  # 2,000 before
    # The SPIFFE ID's budget bounds them all, the forgotten certificates' too: 64, then 1 a second.
    assert granted == fetch_budget.VCEK_FETCH_BURST + int(now[0] * fetch_budget.VCEK_FETCH_RATE)
    # Forgetting only hands a certificate a new budget of its own: one still tracked keeps what it
    # spent; one forgotten has 4 again, within its SPIFFE ID's.
    now[0] += fetch_budget.VCEK_FETCH_BURST / fetch_budget.VCEK_FETCH_RATE
    with fetching_for(FLEET, 5000):
        assert [gate() for _ in range(5)] == [True] * 4 + [False]
    for serial in range(5001, 5064):  # 63 more: it is still among the 64 tracked
        with fetching_for(FLEET, serial):
            gate()
    now[0] += 1.0
    with fetching_for(FLEET, 5000):
        assert not gate()
    for serial in range(5064, 5128):
        with fetching_for(FLEET, serial):
            gate()
    now[0] += 1.0
    with fetching_for(FLEET, 5000):
        assert gate()


def test_the_fetch_table_holds_the_documented_number_of_certificates() -> None:
    now = [0.0]
    gate = VcekFetchBudget(lambda: now[0])
    cap = fetch_budget.MAX_CERTIFICATES_TRACKED
    for serial in range(1, cap + 101):
        with fetching_for(FLEET, serial):
            gate()
        now[0] += 1.0 / MINTED_PER_SECOND
    assert gate.certificates_tracked() == cap == 4096


def test_a_replica_minting_certificates_leaves_a_bounded_unwrap_first_table_and_the_fleets_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(unwrap_first, "MAX_CERTIFICATES_TRACKED", 64)
    now = [0.0]
    unwrap = UnwrapFirst(lambda: now[0])
    fleet_bound = refusals.REFUSAL_BURST * refusals.REASONS_PER_CALLER
    for serial in range(1, fleet_bound):  # one failure after ALLOWED on each new certificate
        assert not unwrap.applies(FLEET, serial)
        unwrap.failed(FLEET, serial)
    assert unwrap.certificates_tracked() == 64  # 255 before
    unwrap.failed(FLEET, fleet_bound)
    # The SPIFFE ID's bound holds for every certificate, a new one and a forgotten one alike.
    assert unwrap.applies(FLEET, fleet_bound + 1)
    assert unwrap.applies(FLEET, 1)
    # A certificate still tracked keeps its own count once the fleet's refilled.
    now[0] += fleet_bound / (refusals.REFUSAL_RATE * refusals.REASONS_PER_CALLER)
    last = fleet_bound + 2
    for _ in range(refusals.REFUSAL_BURST):
        unwrap.failed(FLEET, last)
    assert unwrap.applies(FLEET, last)
    assert not unwrap.applies(FLEET, last + 1)
