"""The per-caller refusal record budget (services/keybroker/refusals.py) on its own."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker import refusals
from strongroom.keybroker.audit import AuditLog, load_signing_key, new_signing_key
from strongroom.keybroker.refusals import RefusalRecords, record_counts
from strongroom.runtime import log_refusals
from strongroom.runtime.secrets import Secret


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


def _signing_key() -> Ed25519PrivateKey:
    private_pem, _ = new_signing_key()
    return load_signing_key(Secret(private_pem))


def _counted(callers: int, reason: str = "") -> tuple[RefusalRecords, dict[str, int]]:
    """Counts not yet recorded of ``callers`` callers (of ``reason``, per reason when given),
    each one more than the last's; and the counts by caller."""
    records = RefusalRecords("test refusals", lambda: 0.0, per_reason=bool(reason))
    counts = {f"spiffe://strongroom.test/c{index}": index + 1 for index in range(callers)}
    for caller, count in counts.items():
        records.count_unrecorded(caller, reason, count)
    return records, counts


def _refusing(tmp_path: Path, key: Ed25519PrivateKey) -> AuditLog:
    """A real audit log that refuses every record from now on (closed: AUDIT_UNAVAILABLE)."""
    log = AuditLog.open(tmp_path / "failing.jsonl", key)
    log.close()
    return log


def test_counts_an_audit_outage_refuses_are_kept_and_said_in_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass recording counted refusals through an audit outage tried every caller's record
    and wrote one ERROR per caller and reason: callers chose how many ERRORs each pass wrote. The
    first refused record ends the pass's tries; every count is kept, and one ERROR says how many
    were kept. The next pass, the log back, records each count in full."""
    key = _signing_key()
    records, callers = _counted(40)
    log = _refusing(tmp_path, key)
    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker.refusals"):
        record_counts(log, records, "key_release", every=True)
    errors = [r for r in caplog.records if r.getMessage().startswith("cannot record counted")]
    assert len(errors) == 1, len(errors)  # before: one per caller
    assert (errors[0].__dict__["counts"], errors[0].__dict__["unrecorded"]) == (
        len(callers),
        sum(callers.values()),
    )
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, key) as back:
        record_counts(back, records, "key_release", every=True)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["caller"]["spiffe_id"]: r["claims"]["refusals_unrecorded"] for r in written} == (
        callers
    )


def test_counts_the_last_pass_cannot_record_are_named_in_its_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's last pass (``every``, at shutdown) through an audit outage said one ERROR,
    ``kept for a later pass``, with only how many records and refusals: no pass comes after it,
    and the counts die with the process. Before the one ERROR a line per caller and reason named
    each (caller, reason, count), the only trace of whose refusals went unrecorded. Its ERROR
    now says they are not recorded and names the largest counts by caller and reason, as the
    summary of refused calls not logged does, the rest in ``others``."""
    records, callers = _counted(40, "HSM_UNAVAILABLE")
    log = _refusing(tmp_path, _signing_key())
    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker.refusals"):
        record_counts(log, records, "key_release", every=True)
    [error] = [r for r in caplog.records if r.getMessage().startswith("cannot record counted")]
    assert "later pass" not in error.getMessage()  # there is none
    fields = error.__dict__
    assert (fields["counts"], fields["unrecorded"]) == (len(callers), sum(callers.values()))
    largest = sorted(callers.items(), key=lambda item: -item[1])[: log_refusals.SUMMARY_ENTRIES]
    assert fields["by_caller_and_reason"] == [
        [caller, "HSM_UNAVAILABLE", count] for caller, count in largest
    ]
    assert fields["others"] == sum(callers.values()) - sum(count for _, count in largest)


def test_counts_a_pass_cut_short_by_an_unexpected_exception_go_back_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counts are taken before their records are written: an exception other than the audit
    log's refusal (a bug; what a signal handler raised during the close) lost the record being
    written and every one not yet tried. They go back now, and the next pass records them."""
    key = _signing_key()
    records, callers = _counted(5)
    real = refusals._record_count
    calls = [0]

    def failing_third(*args: object) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C during the broker's close raises here
        real(*args)  # type: ignore[arg-type]

    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, key) as log:
        monkeypatch.setattr(refusals, "_record_count", failing_third)
        with pytest.raises(KeyboardInterrupt):
            record_counts(log, records, "key_release", every=True)
        monkeypatch.setattr(refusals, "_record_count", real)
        record_counts(log, records, "key_release", every=True)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["caller"]["spiffe_id"]: r["claims"]["refusals_unrecorded"] for r in written} == (
        callers
    )
