"""The per-caller refusal record budget (services/keybroker/refusals.py) on its own."""

from __future__ import annotations

from strongroom.keybroker import refusals
from strongroom.keybroker.refusals import RefusalRecords


def test_forgetting_limited_callers_keeps_counts_not_yet_recorded() -> None:
    """Past 1,024 limited callers the table forgot every caller whose last counting record was
    over a minute old, count included: refusals counted since then never reached the log (its
    next counting record said 0). Only callers with nothing left to record are forgotten now."""
    now = [1000.0]
    records = RefusalRecords("test refusals", lambda: now[0])
    assert records.unrecorded_if_due("spiffe://t/a", "R") == 0  # its counting record
    for _ in range(5):
        assert records.unrecorded_if_due("spiffe://t/a", "R") is None  # counted
    now[0] += refusals.LIMITED_RECORD_SECONDS + 1
    for index in range(1024):  # enough other limited callers to make the table forget
        records.unrecorded_if_due(f"spiffe://t/other-{index}", "R")
    assert records.unrecorded_if_due("spiffe://t/a", "R") == 5


def test_a_caller_cycling_through_reasons_shares_one_budget_across_them() -> None:
    """With a budget per reason, a caller provoking a hundred reasons in turn would have a
    hundred budgets: 6,400 records at once, then 100 a second. Its reasons together have
    REASONS_PER_CALLER budgets; past that each reason still has its first refusal recorded (a
    counting record, 0 before it) and then its count, and another caller has its own budget."""
    now = [1000.0]
    records = RefusalRecords("test refusals", lambda: now[0], per_reason=True)
    caller, reasons = "spiffe://t/a", [f"R{index}" for index in range(100)]
    recorded, counting = 0, []
    for _ in range(10):
        for reason in reasons:
            if records.spend(caller, reason):
                recorded += 1
                continue
            unrecorded = records.unrecorded_if_due(caller, reason)
            if unrecorded is not None:
                counting.append((reason, unrecorded))
    assert recorded == refusals.REFUSAL_BURST * refusals.REASONS_PER_CALLER == 256
    assert sorted(counting) == sorted((reason, 0) for reason in reasons)
    assert records.spend("spiffe://t/b", "R0")
    now[0] += refusals.LIMITED_RECORD_SECONDS
    counts = {reason: count for _, reason, count in records.take_counts()}
    # 10 refusals of each: R0-R55 recorded 3 times and R56-R99 twice, one counting record each.
    assert counts == {reason: 6 if int(reason[1:]) < 56 else 7 for reason in reasons}
