"""Renewal failures are logged, every one, and healthy() turns False before the certificate expires."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import pytest

from strongroom.pki import RenewalPolicy, StepCa
from strongroom.pki.errors import CaUnavailable
from tests.pki.helpers import enrol


def _wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_failing_renewal_is_logged_and_flips_health_before_expiry(
    own_ca: StepCa, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="strongroom.pki")
    policy = RenewalPolicy(
        fraction=0.3,
        jitter=0.0,
        backoff_initial=0.2,
        backoff_max=0.4,
        unhealthy_fraction=0.5,
        unhealthy_min_remaining=timedelta(0),
    )
    identity = enrol(own_ca, "inference", lifetime=timedelta(seconds=10), policy=policy)
    try:
        first = identity.credentials
        own_ca.stop()  # the CA goes away before the first renewal is due (at ~3 s)
        assert identity.healthy()
        assert _wait_for(lambda: not identity.healthy(), timeout=9)
        assert datetime.now(UTC) < first.not_after  # flipped BEFORE expiry
        status = identity.status()
        assert status.consecutive_failures >= 2
        assert status.last_error is not None and "CA_UNAVAILABLE" in status.last_error
        failures = [r for r in caplog.records if "certificate renewal failed" in r.getMessage()]
        assert len(failures) == status.consecutive_failures or len(failures) >= 2
        assert all(r.levelno == logging.ERROR for r in failures)
        assert "PRIVATE KEY" not in caplog.text
        # The CA comes back: the next attempt renews and the identity is healthy again.
        own_ca.start()
        assert _wait_for(lambda: identity.generation > first.generation, timeout=3)
        assert identity.healthy()
        assert identity.status().consecutive_failures == 0
    finally:
        identity.close()


def test_renew_now_raises_and_logs_when_the_ca_is_down(
    own_ca: StepCa, caplog: pytest.LogCaptureFixture
) -> None:
    identity = enrol(own_ca, "inference", auto_renew=False)
    try:
        own_ca.stop()
        with pytest.raises(CaUnavailable):
            identity.renew_now()
        assert any("certificate renewal failed" in r.getMessage() for r in caplog.records)
        # Far from expiry, one failure does not make the identity unhealthy.
        assert identity.healthy()
    finally:
        identity.close()


def test_health_is_judged_on_the_injected_clock(ca: StepCa) -> None:
    offset = [timedelta(0)]
    identity = enrol(ca, "inference", auto_renew=False, clock=lambda: datetime.now(UTC) + offset[0])
    try:
        assert identity.healthy()
        offset[0] = identity.credentials.not_after - datetime.now(UTC) + timedelta(seconds=1)
        assert not identity.healthy()  # expired
        assert identity.status().consecutive_failures == 0
    finally:
        identity.close()
