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
