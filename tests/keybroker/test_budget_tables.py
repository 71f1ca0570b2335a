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


def test_a_replica_rekeying_every_four_fetches_still_holds_its_fleets_fetches_back() -> None:
    """What the per-certificate budget does not stop, measured: a replica that rekeys (any
    replica may, for a new serial) spends its fleet's 64 with 16 certificates, then each refill
    with a new certificate every 4 s (a quarter a second, far below the 115-274 a second one
    step-ca signed here), and a genuine replica on a new chip is refused as when one certificate
    did it all (before, one certificate sufficed, at its own pace). The fleet's answer is the
    SPIFFE ID's budget, shared by design; the fetches stay at KDS's pace of 1 a second."""
    now = [0.0]
    gate = VcekFetchBudget(lambda: now[0])
    burst = fetch_budget.VCEK_FETCH_CERTIFICATE_BURST
    serials = iter(range(1, 1000))
    minted = 0

    def attacker_spends() -> int:
        nonlocal minted
        spent = 0
        while True:
            with fetching_for(FLEET, next(serials)):
                minted += 1
                took = sum(gate() for _ in range(burst))
            spent += took
            if took < burst:
                return spent

    assert attacker_spends() == fetch_budget.VCEK_FETCH_BURST
    assert minted == fetch_budget.VCEK_FETCH_BURST // burst + 1
    genuine = 0xBEEF
    refused = 0
    for _ in range(60):  # a minute: the attacker takes each refill before the genuine replica
        now[0] += burst / fetch_budget.VCEK_FETCH_RATE
        attacker_spends()
        with fetching_for(FLEET, genuine):
            refused += not gate()
    assert refused == 60
    assert minted <= 17 + 2 * 60  # a certificate or two every 4 s
