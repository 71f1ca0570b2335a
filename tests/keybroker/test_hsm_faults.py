"""Issue 12: the HSM backend under long runs and faults.

- Finding 2: SoftHSM2 frees session objects (even destroyed ones) only when the module is
  re-initialised, so the backend recycles its connection after a quota of operations.
- An HSM that connects but fails its operations (a session lost under every operation): each
  call re-initialised the module and logged a dropped and a re-established session; a second
  drop before any operation succeeds now backs the reconnects off, and the drops are counted;
  a health check (the readiness probe's) does not end that run (it ends one that only checks
  met: an idle broker's HSM losing its session now and then reconnects at once each time), a
  caller refused meanwhile is told the HSM fails its operations (not that it cannot connect),
  and the lines name the token.
- Finding 4: a key object the HSM fails to use (a damaged object file, a token hiccup) must not
  leave the broker stuck with INTERNAL: the connection is re-initialised, the caller gets
  UNAVAILABLE the first time and DATA_LOSS if the key keeps failing, the key is listed for
  readiness, and it heals without a restart once the object file is good again.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from strongroom.dev.softhsm import SoftHsmToken
from strongroom.errors import DataLoss, InvalidArgument
from strongroom.keybroker.errors import OPERATORS_LOG, HsmUnavailable
from strongroom.keybroker.hsm import Hsm, HsmSession
from strongroom.keybroker.keys import KeyManager
from strongroom.oaep import OaepHash
from strongroom.reasons import Reason
from tests.keybroker.helpers import (
    MODEL,
    WRAP_KEY,
    bound,
    make_config,
    session_objects,
    spki,
    token_call_replaced,
)

_OAEP = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)


def test_connection_is_recycled_after_its_operation_quota(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], tee_key: rsa.RSAPrivateKey
) -> None:
    hsm = open_hsm(make_config(softhsm_token, recycle_after_operations=10))
    km = KeyManager(hsm)
    km.create_key("model")
    dek, wrapped, version = km.generate_data_key("model", *MODEL)
    generation = hsm.status().generation
    for _ in range(25):  # handles cached on one session must not be used on the next
        out, _ = km.release_to_ephemeral("model", version, wrapped, spki(tee_key), [OaepHash.SHA1])
        assert bound(tee_key.decrypt(out, _OAEP)) == dek
    status = hsm.status()
    assert status.recycles >= 2
    assert status.generation >= generation + 2
    assert status.last_error is None  # a planned recycle is not a failure
    assert session_objects(hsm) == 0


def test_health_checks_do_not_count_toward_the_recycle_quota(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], tee_key: rsa.RSAPrivateKey
) -> None:
    # The broker's readiness probe checks the HSM twice a second. Counted, those checks recycled
    # an idle broker every ~17 minutes and, under load, moved each recycle a few operations later
    # than the last, which a soak sampling every N releases read as memory growth.
    hsm = open_hsm(make_config(softhsm_token, recycle_after_operations=5))
    km = KeyManager(hsm)
    km.create_key("model")
    dek, wrapped, version = km.generate_data_key("model", *MODEL)  # 2 operations of the quota's 5
    for _ in range(20):
        hsm.check_health()
    assert hsm.status().recycles == 0
    for n in range(3):
        out, _ = km.release_to_ephemeral("model", version, wrapped, spki(tee_key), [OaepHash.SHA1])
        assert bound(tee_key.decrypt(out, _OAEP)) == dek
        assert hsm.status().recycles == (1 if n == 2 else 0)
    for _ in range(20):
        hsm.check_health()
    assert hsm.status().recycles == 1


def test_a_zero_quota_never_recycles(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], tee_key: rsa.RSAPrivateKey
) -> None:
    hsm = open_hsm(make_config(softhsm_token, recycle_after_operations=0))
    km = KeyManager(hsm)
    km.create_key("model")
    dek, wrapped, version = km.generate_data_key("model", *MODEL)
    generation = hsm.status().generation
    for _ in range(25):
        out, _ = km.release_to_ephemeral("model", version, wrapped, spki(tee_key), [OaepHash.SHA1])
        assert bound(tee_key.decrypt(out, _OAEP)) == dek
    status = hsm.status()
    assert status.recycles == 0
    assert status.generation == generation


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_recycle_quota_must_be_zero_or_a_positive_integer(
    softhsm_token: SoftHsmToken, value: object
) -> None:
    with pytest.raises(InvalidArgument):
        make_config(softhsm_token, recycle_after_operations=value)


def test_reconnect_attempts_back_off(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.2))
    assert [hsm._backoff() for _ in range(1)] == [0.05]
    hsm._failed_attempts = 3
    assert hsm._backoff() == 0.2  # 0.05 * 2**2, capped at the maximum
    with pytest.raises(InvalidArgument):
        make_config(softhsm_token, reconnect_interval=1.0, reconnect_max_interval=0.5)


def _kek_file(token: SoftHsmToken, before: set[Path]) -> Path:
    new = [p for p in token.token_store().iterdir() if p not in before and p.suffix == ".object"]
    # The KEK's and its enabler's: the KEK's is the larger (a 32-byte value against 16, and
    # CKA_ALLOWED_MECHANISMS); a private object's label is encrypted, so cannot tell them apart.
    assert len(new) == 2, new
    return max(new, key=lambda p: p.stat().st_size)


def _token_blinks(token: SoftHsmToken, km: KeyManager) -> None:
    """The token goes away for one call and comes back (with whatever its files now hold)."""
    store = token.token_store()
    away = token.directory / "away"
    store.rename(away)
    try:
        with pytest.raises(HsmUnavailable):
            km.list_keys()
    finally:
        away.rename(store)


def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _until_checked(hsm: Hsm) -> None:
    """Waits until a health check of ``hsm`` passes (its back-off over, reconnected)."""

    def checked() -> bool:
        try:
            hsm.check_health()
        except HsmUnavailable:
            return False
        return True

    _until(checked)


@pytest.mark.parametrize("offset", [100, 500], ids=["label-damaged", "object-unreadable"])
def test_damaged_key_object_is_reported_and_heals_without_restart(
    softhsm_token: SoftHsmToken,
    open_hsm: Callable[..., Hsm],
    tee_key: rsa.RSAPrivateKey,
    offset: int,
) -> None:
    hsm = open_hsm(make_config(softhsm_token))
    km = KeyManager(hsm, recheck_interval=0.1)
    before = set(softhsm_token.token_store().iterdir())
    km.create_key("model")
    kek_file = _kek_file(softhsm_token, before)
    dek, wrapped, version = km.generate_data_key("model", *MODEL)
    good = kek_file.read_bytes()
    damaged = bytearray(good)
    damaged[offset : offset + 30] = bytes(30)
    kek_file.write_bytes(bytes(damaged))
    _token_blinks(softhsm_token, km)

    def release() -> bytes:
        out, _ = km.release_to_ephemeral("model", version, wrapped, spki(tee_key), [OaepHash.SHA1])
        return bound(tee_key.decrypt(out, _OAEP))

    # First failure inside a token that answers: UNAVAILABLE, and the session is re-initialised.
    with pytest.raises(HsmUnavailable) as first:
        release()
    assert first.value.reason == "HSM_OPERATION_FAILED"
    # It fails again on the fresh session: the key is unusable (DATA_LOSS), never INTERNAL.
    with pytest.raises(DataLoss) as second:
        km.generate_data_key("model", *MODEL)
    assert second.value.reason == "KEY_OBJECT_UNUSABLE"
    assert "model" in km.unusable_keys()
    assert "model" in km.recheck_unusable()
    hsm.check_health()  # the HSM itself answers; readiness is told about the key separately
    # The good object file comes back: the broker heals by itself.
    kek_file.write_bytes(good)
    _until(lambda: not km.recheck_unusable())
    assert release() == dek
    assert km.generate_data_key("model", *MODEL).version == version


def test_damaged_key_does_not_stop_other_keys(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], tee_key: rsa.RSAPrivateKey
) -> None:
    hsm = open_hsm(make_config(softhsm_token))
    km = KeyManager(hsm, recheck_interval=60)
    km.create_key("healthy")
    before = set(softhsm_token.token_store().iterdir())
    km.create_key("broken")
    kek_file = _kek_file(softhsm_token, before)
    km.generate_data_key("broken", *MODEL)
    damaged = bytearray(kek_file.read_bytes())
    damaged[500:530] = bytes(30)
    kek_file.write_bytes(bytes(damaged))
    _token_blinks(softhsm_token, km)  # the module re-reads the token: the damage shows
    for _ in range(3):
        with pytest.raises((HsmUnavailable, DataLoss)):
            km.generate_data_key("broken", *MODEL)
    assert list(km.unusable_keys()) == ["broken"]
    dek, wrapped, version = km.generate_data_key("healthy", *MODEL)
    out, _ = km.release_to_ephemeral("healthy", version, wrapped, spki(tee_key), [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, _OAEP)) == dek


def _log_out(hsm: Hsm, *, ends_failures: bool = True, then_check: bool = False) -> None:
    """The application's login goes (C_Logout on the login session, as a network HSM's failover or
    idle timeout does): every session of the token is then a public one. ``ends_failures`` False:
    the call that does it is a health check's, not an operation (an idle broker's HSM times its
    session out while the broker runs checks only); ``then_check``: that check meets the lost
    login at once (raises ``HsmUnavailable``; the session is dropped)."""

    def op(hs: HsmSession) -> None:
        assert hsm._conn is not None
        library = ctypes.CDLL(str(hsm.config.module_path))
        library.C_Logout.argtypes = [ctypes.c_ulong]
        library.C_Logout.restype = ctypes.c_ulong
        assert library.C_Logout(hsm._conn.login.handle) == 0
        if then_check:
            hs.require_token()

    hsm.call(op, name="log out", creates_objects=False, ends_failures=ends_failures)


def test_a_lost_login_is_unavailable_not_a_missing_or_damaged_key(hsm: Hsm, km: KeyManager) -> None:
    # A session without the login finds no private object: every KEK seems gone. That used to be
    # NOT_FOUND for a key this broker had not seen yet, HSM_OPERATION_FAILED (DATA_LOSS the second
    # time) for one it had, and a ready health check; it is the HSM's unavailability, healed by a
    # reconnect that logs in again.
    km.create_key("model")
    fresh = KeyManager(hsm)  # a replica that has not seen the key yet
    _log_out(hsm)
    with pytest.raises(HsmUnavailable) as unseen:
        fresh.describe_key("model")
    assert unseen.value.reason == Reason.HSM_UNAVAILABLE
    assert fresh.describe_key("model").current_version == 1  # reconnected and logged in
    _log_out(hsm)
    with pytest.raises(HsmUnavailable) as seen:
        km.describe_key("model")
    assert seen.value.reason == Reason.HSM_UNAVAILABLE
    _log_out(hsm)
    with pytest.raises(HsmUnavailable):
        hsm.check_health()
    hsm.check_health()
    assert km.describe_key("model").current_version == 1
    assert km.unusable_keys() == {}


def test_an_idle_broker_whose_hsm_loses_its_session_now_and_then_reconnects_at_once(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # An idle broker runs its readiness probe's health checks only. Since a check no longer ended
    # a run of drops, the HSM's second idle logout, met by a check an hour after the first, was
    # a drop before any operation succeeded: the reconnects backed off (up to
    # reconnect_max_interval), the probe said not ready and callers were refused ('connects but
    # fails its operations') though a reconnect works, and every later loss was counted in the
    # same run, without its 'HSM session re-established'. A run that only checks met ends at a
    # check that passes, as a run of failed connections does.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=60, reconnect_max_interval=60))
    km = KeyManager(hsm)
    km.create_key("model")
    for _ in range(3):
        _log_out(hsm, ends_failures=False)
        with pytest.raises(HsmUnavailable) as lost:
            hsm.check_health()  # the probe meets the lost login: the session is dropped
        assert lost.value.message == "the HSM session is no longer logged in"
        hsm.check_health()  # reconnected at once: ready
    assert km.describe_key("model").current_version == 1
    # Each loss is a failure of its own, logged at once with its reconnection.
    assert len(_lines(caplog, "HSM session dropped", logging.WARNING)) == 3
    assert len(_lines(caplog, "HSM session re-established", logging.WARNING)) == 3
    assert not _lines(caplog, "succeed again")


def test_a_run_of_drops_only_health_checks_met_ends_at_a_check_that_passes(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # The session is lost again on its reconnection (a failover under way): the reconnects back
    # off, and the check that passes after it ends the run in words of checks, not of operations.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.05))
    for _ in range(2):  # the second reconnects (the first drop's reconnect) and loses it again
        with pytest.raises(HsmUnavailable):
            _log_out(hsm, ends_failures=False, then_check=True)

    def checked() -> bool:
        try:
            hsm.check_health()
        except HsmUnavailable as exc:
            assert "connects but fails its operations" in exc.answer()
            return False
        return True

    _until(checked)
    assert _lines(caplog, "pass again after") == [
        "HSM health checks pass again after 2 dropped sessions"
    ]
    assert not _lines(caplog, "HSM operations succeed again")
    # Ended: the next loss reconnects at once.
    _log_out(hsm, ends_failures=False)
    with pytest.raises(HsmUnavailable):
        hsm.check_health()
    hsm.check_health()


class _LosesItsSession:
    """An operation the HSM fails as one that connects but loses the session under every
    operation: it closes its own work session (a real ``C_CloseSession``), and SoftHSM2 then
    answers its next call ``CKR_SESSION_HANDLE_INVALID``. ``failing`` False: it just succeeds."""

    def __init__(self, hsm: Hsm) -> None:
        self._library = ctypes.CDLL(str(hsm.config.module_path))
        self._library.C_CloseSession.argtypes = [ctypes.c_ulong]
        self._library.C_CloseSession.restype = ctypes.c_ulong
        self.failing = True
        self.runs = 0

    def __call__(self, hs: HsmSession) -> bytes:
        self.runs += 1
        if self.failing:
            assert self._library.C_CloseSession(hs.session.handle) == 0
        return bytes(hs.session.generate_random(64))  # bits: 8 bytes


def _lines(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage() and r.levelno >= level]


def test_an_hsm_that_fails_every_operation_is_not_reinitialised_by_every_call(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # Every call re-initialised the module (C_Finalize + C_Initialize, log in, probe) and wrote
    # a dropped and a re-established WARNING and an INFO: at the pace of whoever sent requests.
    caplog.set_level(logging.DEBUG, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=60, reconnect_max_interval=60))
    op = _LosesItsSession(hsm)
    reasons = []
    for _ in range(20):
        with pytest.raises(HsmUnavailable) as failed:
            hsm.call(op, name="flap")
        reasons.append(failed.value.reason)
    assert reasons == [Reason.HSM_UNAVAILABLE] * 20
    # The first drop reconnected at once; the drop on that fresh session backs off: the other
    # 18 calls are answered without touching the module.
    assert op.runs == 2
    assert hsm.status().generation == 2
    assert "next attempt in" in failed.value.message
    assert len(_lines(caplog, "HSM session dropped", logging.WARNING)) == 1
    assert len(_lines(caplog, "HSM session re-established", logging.WARNING)) == 1
    assert len(_lines(caplog, "HSM session open", logging.INFO)) == 2  # the start and one reconnect


def test_a_single_drop_reconnects_at_once_every_time_operations_succeed_between(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # A back-off that outlasts the test: any wait before a reconnect would fail a call here.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=60, reconnect_max_interval=60))
    op = _LosesItsSession(hsm)
    for n in range(3):
        op.failing = True
        with pytest.raises(HsmUnavailable):
            hsm.call(op, name="blip")
        op.failing = False
        assert len(hsm.call(op, name="blip")) == 8  # reconnected at once
        assert len(hsm.call(op, name="blip")) == 8
        assert hsm.status().generation == 2 + n
    # Each drop followed an operation that succeeded: each is a new failure, logged at once.
    assert len(_lines(caplog, "HSM session dropped", logging.WARNING)) == 3
    assert len(_lines(caplog, "HSM session re-established", logging.WARNING)) == 3
    assert not _lines(caplog, "HSM operations succeed again")


def test_a_flapping_hsm_that_heals_says_its_drops_and_reconnects_at_once_again(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.05))
    op = _LosesItsSession(hsm)
    for _ in range(3):  # the third, at least, waits out a back-off or drops a third session
        with pytest.raises(HsmUnavailable):
            hsm.call(op, name="flap")
    op.failing = False

    def answers() -> bool:
        try:
            hsm.call(op, name="flap")
        except HsmUnavailable as exc:
            assert "next attempt in" in exc.message
            return False
        return True

    _until(answers)
    assert _lines(caplog, "HSM operations succeed again after", logging.WARNING)
    # The drops counted after the first one's line are said now, not lost.
    assert _lines(caplog, "more times after its last line", logging.WARNING)
    # Recovered: the back-off is over, a new single drop reconnects at once.
    op.failing = True
    with pytest.raises(HsmUnavailable):
        hsm.call(op, name="flap")
    op.failing = False
    assert len(hsm.call(op, name="flap")) == 8


def _attempt_or_run(attempt_fails: Callable[[], bool], op: _LosesItsSession, runs: int) -> bool:
    """Whether a connection attempt failed or ``op`` ran once more than ``runs`` times."""
    return attempt_fails() or op.runs > runs


def test_connections_that_fail_every_operation_do_not_end_the_failed_attempts_count(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # A connection that succeeded ended the count of failed attempts: an HSM whose connections
    # failed and succeeded by turns, and whose operations failed, logged its failure every cycle.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.05))
    op = _LosesItsSession(hsm)
    store = softhsm_token.token_store()
    away = softhsm_token.directory / "away"

    def attempt_fails() -> bool:
        """A call that reached a connection attempt, and the attempt failed."""
        try:
            hsm.call(op, name="flap")
        except HsmUnavailable as exc:
            return not exc.message.startswith("the HSM is unavailable (")
        return False

    with pytest.raises(HsmUnavailable):
        hsm.call(op, name="flap")  # the session is dropped
    for _ in range(2):
        store.rename(away)
        try:
            _until(attempt_fails)
        finally:
            away.rename(store)
        runs = op.runs
        # a connection, whose operation fails
        _until(functools.partial(_attempt_or_run, attempt_fails, op, runs))
        assert op.runs > runs
    assert len(_lines(caplog, "cannot connect to the HSM", logging.ERROR)) == 1
    op.failing = False

    def succeeds() -> bool:
        try:
            hsm.call(op, name="flap")
        except HsmUnavailable:
            return False
        return True

    _until(succeeds)  # the count is said now
    assert _lines(caplog, "more times after its last line", logging.ERROR)


def _fails_and_drops(hsm: Hsm, op: _LosesItsSession, times: int) -> None:
    """``times`` calls of ``op``, each refused (its session lost, or the reconnect backed off)."""
    for _ in range(times):
        with pytest.raises(HsmUnavailable):
            hsm.call(op, name="flap")


def test_the_dropped_session_lines_name_the_token(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # HSM session dropped had its token field until its lines went through OutageLines, whose
    # lines carried no field but the reason: an operator's filter by token lost them.
    caplog.set_level(logging.WARNING, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.05))
    op = _LosesItsSession(hsm)
    _fails_and_drops(hsm, op, 3)  # the drop's line, then at least one drop counted
    op.failing = False

    def succeeds() -> bool:
        try:
            hsm.call(op, name="flap")
        except HsmUnavailable:
            return False
        return True

    _until(succeeds)  # the count is said now
    dropped = [r for r in caplog.records if "HSM session dropped" in r.getMessage()]
    assert "more times after its last line" in dropped[-1].getMessage()
    assert [getattr(r, "token", None) for r in dropped] == [softhsm_token.label] * len(dropped)


def test_a_caller_refused_while_drops_back_off_is_not_told_the_broker_cannot_connect(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    # The HSM connects but loses the session under every operation: the calls refused while the
    # reconnects wait were told 'the key broker cannot connect to its HSM', which sent whoever
    # read it (a caller, the 'key release denied' line's detail) to the wrong fault.
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=60))
    op = _LosesItsSession(hsm)
    told: list[str] = []

    def refused_without_a_run() -> bool:
        runs = op.runs
        with pytest.raises(HsmUnavailable) as failed:
            hsm.call(op, name="flap")
        if op.runs == runs:  # within a back-off (they double: one is met)
            told.append(failed.value.answer())
        return bool(told)

    _until(refused_without_a_run)
    assert op.runs >= 2  # the second drop, on the re-established session, backed off
    assert told[0].startswith(
        "HSM_UNAVAILABLE: the key broker's HSM connects but fails its operations; next attempt in "
    ), told
    assert told[0].endswith(OPERATORS_LOG)
    # A failed connection attempt since is said as one (the back-offs double: one is met).
    store = softhsm_token.token_store()
    away = softhsm_token.directory / "away"
    attempted: list[bool] = []
    told_after: list[str] = []

    def refused_after_a_failed_attempt() -> bool:
        with pytest.raises(HsmUnavailable) as failed:
            hsm.call(op, name="flap")
        if not failed.value.message.startswith("the HSM is unavailable ("):
            attempted.append(True)  # a connection attempt, which failed
        elif attempted:
            told_after.append(failed.value.answer())
        return bool(told_after)

    store.rename(away)
    try:
        _until(refused_after_a_failed_attempt)
    finally:
        away.rename(store)
    assert told_after[0].startswith(
        "HSM_UNAVAILABLE: the key broker cannot connect to its HSM; next attempt in "
    ), told_after


def test_health_checks_between_failing_operations_do_not_end_their_back_off(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # The broker's readiness probe checks the HSM twice a second, and a token that loses the
    # session under every operation still answers it: each check ended the run of drops, so the
    # next call reconnected at once and its drop was logged anew, a re-initialisation and lines
    # per check whatever the back-off.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=60, reconnect_max_interval=60))
    op = _LosesItsSession(hsm)
    for _ in range(10):
        _fails_and_drops(hsm, op, 1)
        with contextlib.suppress(HsmUnavailable):
            hsm.check_health()
    assert op.runs == 2  # the first drop's reconnect (by a check), then the back-off
    assert hsm.status().generation == 2
    assert len(_lines(caplog, "HSM session dropped", logging.WARNING)) == 1
    assert len(_lines(caplog, "HSM session re-established", logging.WARNING)) == 1


def test_a_run_of_drops_ends_at_an_operation_not_at_a_health_check(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # A recovered HSM is not refused: the check after the back-off reconnects, and the next
    # operation runs at once; 'operations succeed again' is said by that operation, once (a
    # health check said it, of operations that had not run).
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.05))
    op = _LosesItsSession(hsm)
    _fails_and_drops(hsm, op, 2)
    _until_checked(hsm)  # the back-off is over; reconnected
    assert not _lines(caplog, "HSM operations succeed again")
    op.failing = False
    assert len(hsm.call(op, name="flap")) == 8
    assert len(hsm.call(op, name="flap")) == 8
    assert _lines(caplog, "HSM operations succeed again after 2 dropped sessions") == [
        "HSM operations succeed again after 2 dropped sessions"
    ]


def test_a_run_with_an_operation_s_drop_is_not_ended_by_a_check_after_a_check_s_drop(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # A run that only checks met ends at a check that passes; one in which an operation lost its
    # session does not, whatever checks lost since: only an operation says the HSM works again.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=0.05, reconnect_max_interval=0.05))
    op = _LosesItsSession(hsm)
    _fails_and_drops(hsm, op, 1)
    with pytest.raises(HsmUnavailable):  # reconnects at once, then a check loses the session
        _log_out(hsm, ends_failures=False, then_check=True)
    _until_checked(hsm)  # the back-off is over; reconnected
    assert not _lines(caplog, "again after")
    op.failing = False
    assert len(hsm.call(op, name="flap")) == 8
    assert _lines(caplog, "again after") == [
        "HSM operations succeed again after 2 dropped sessions"
    ]


def test_concurrent_calls_during_a_run_of_drops_reach_the_module_twice(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], caplog: pytest.LogCaptureFixture
) -> None:
    # Callers on many threads at once while every operation loses its session: the one worker
    # runs their calls in turn, so the run's state (its drops, its back-off, its counts) has one
    # writer; the module is reached by the first drop's call and its reconnect only.
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    hsm = open_hsm(make_config(softhsm_token, reconnect_interval=60, reconnect_max_interval=60))
    op = _LosesItsSession(hsm)
    start = threading.Barrier(16)
    reasons: list[str] = []

    def caller() -> None:
        start.wait(timeout=60)
        for _ in range(5):
            with pytest.raises(HsmUnavailable) as failed:
                hsm.call(op, name="flap", timeout=60)
            reasons.append(failed.value.reason)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert reasons == [Reason.HSM_UNAVAILABLE] * 80
    assert op.runs == 2
    assert hsm.status().generation == 2
    assert len(_lines(caplog, "HSM session dropped", logging.WARNING)) == 1
    assert len(_lines(caplog, "HSM session re-established", logging.WARNING)) == 1


def test_a_run_of_failures_of_one_operation_logs_its_reconnections_once(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    # A failure the token answers for one operation while it still answers (a release's OAEP
    # wrap answered short, as a CKR_GENERAL_ERROR of one damaged key) reconnects at once, and
    # was not counted in the run: a token that answered every release short wrote 'HSM session
    # re-established' (WARNING) and 'HSM session open' (INFO) for every release, 19 of each in
    # 20 releases, at the pace of whoever sent them.
    km = KeyManager(hsm)
    km.create_key("model")
    dek, wrapped, version = km.generate_data_key("model", *MODEL)
    direct = hsm._direct
    assert direct is not None
    token_wrap = WRAP_KEY(direct.entry_points.wrap_key)

    def short(session: int, mechanism: int, key: int, out: int, data: int, length: Any) -> int:
        rv = int(token_wrap(session, mechanism, key, out, data, length))
        length[0] = 1
        return rv

    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    with token_call_replaced(hsm, "wrap_key", WRAP_KEY(short)):
        for _ in range(20):
            with pytest.raises(HsmUnavailable) as failed:
                km.release_to_ephemeral("model", version, wrapped, spki(tee_key), [OaepHash.SHA1])
            assert failed.value.reason == Reason.HSM_OPERATION_FAILED
    assert len(_lines(caplog, "HSM session dropped", logging.WARNING)) == 1
    assert len(_lines(caplog, "HSM session re-established", logging.WARNING)) == 1
    assert len(_lines(caplog, "HSM session open", logging.INFO)) == 1
    out, _ = km.release_to_ephemeral("model", version, wrapped, spki(tee_key), [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, _OAEP)) == dek
    assert _lines(caplog, "HSM operations succeed again") == [
        "HSM operations succeed again after 20 dropped sessions"
    ]
    assert _lines(caplog, "(19 more times after its last line)", logging.WARNING)
