"""The PKCS#11 backend: connection, login, deadlines, disappearance and recovery, concurrency."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from strongroom.dev.softhsm import SoftHsmToken
from strongroom.errors import FailedPrecondition, InvalidArgument, Unavailable
from strongroom.keybroker import _kek, p11direct
from strongroom.keybroker.errors import HsmUnavailable
from strongroom.keybroker.hsm import PIN_REFUSED, Hsm, HsmConfig, HsmSession
from strongroom.keybroker.keys import KeyManager
from strongroom.oaep import OaepHash
from strongroom.reasons import Reason
from strongroom.runtime.secrets import Secret
from tests.keybroker.helpers import (
    MODEL,
    bound,
    make_config,
    release_library_stand_in,
    session_objects,
    spki,
)


def test_open_probes_oaep_support(hsm: Hsm) -> None:
    status = hsm.status()
    assert status.connected
    assert status.generation == 1
    # SoftHSM2 2.6.1 wraps with RSA-OAEP only with SHA-1 / MGF1-SHA-1.
    assert hsm.oaep_hashes == (OaepHash.SHA1,)
    assert status.oaep_hashes == (OaepHash.SHA1,)
    hsm.check_health()


def test_allowed_hashes_limit_what_the_token_offers(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    hsm = open_hsm(make_config(softhsm_token, allowed_oaep_hashes=(OaepHash.SHA256,)))
    assert hsm.oaep_hashes == ()


def test_pin_is_redacted_from_config_repr(softhsm_token: SoftHsmToken) -> None:
    config = make_config(softhsm_token)
    assert "user-pin" not in repr(config)
    assert "***" in repr(config)


def test_wrong_pin_is_not_retried(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    config = make_config(softhsm_token, pin=Secret(b"wrong-pin-1"))
    with pytest.raises(HsmUnavailable) as info:
        open_hsm(config)
    assert info.value.reason == "HSM_LOGIN_FAILED"
    assert "wrong-pin" not in str(info.value)
    lazy = open_hsm(config, wait=False)
    for _ in range(2):  # the second attempt is refused without touching the token's PIN counter
        with pytest.raises(HsmUnavailable) as info:
            lazy.check_health()
        assert info.value.reason == "HSM_LOGIN_FAILED"


def test_a_refused_pin_is_told_in_one_wording_at_every_call(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    """The refusal's call was answered ``the key broker cannot connect to its HSM; ...``, every
    later one ``the HSM refused the PIN; fix the configuration and restart the backend``: two
    accounts of one fault, the second an instruction only the operator can follow."""
    lazy = open_hsm(make_config(softhsm_token, pin=Secret(b"wrong-pin-2")), wait=False)
    answers = []
    for _ in range(3):  # the refused login, then calls refused without trying again
        with pytest.raises(HsmUnavailable) as info:
            lazy.check_health()
        answers.append(info.value.answer())
    assert answers == [f"HSM_LOGIN_FAILED: {PIN_REFUSED}"] * 3
    assert PIN_REFUSED == (
        "the key broker cannot log in to its HSM: its PIN was refused; its operator's log has "
        "the details"
    )


def test_unknown_token_label(softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]) -> None:
    """A mistyped label: the message names the labels the module lists (it named only the one
    asked for, which reads alike whether the label or the token directory is wrong)."""
    with pytest.raises(HsmUnavailable) as info:
        open_hsm(make_config(softhsm_token, token_label="no-such-token"))
    assert "not found" in info.value.message
    assert f"the module lists {softhsm_token.label!r}" in info.value.message


def test_missing_module(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    """A wrong keybroker.pkcs11_module: "cannot initialise the PKCS#11 module (PKCS11Error)"
    named neither the setting nor the path; it names both now."""
    config = make_config(softhsm_token, module_path=tmp_path / "missing.so")
    with pytest.raises(HsmUnavailable) as info:
        Hsm.open(config)
    assert f"keybroker.pkcs11_module {tmp_path / 'missing.so'} does not exist" in str(info.value)


@pytest.mark.parametrize(("make", "state"), [(None, "does not exist"), ("dir", "is a directory")])
def test_a_wrong_softhsm2_conf_is_named(
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
    open_hsm: Callable[..., Hsm],
    make: str | None,
    state: str,
) -> None:
    """SoftHSM2's configuration path wrong: SoftHSM2 answers with no token at all (a
    directory) or a bare GeneralError (a missing file), and the broker said "token not found"
    or "cannot initialise the PKCS#11 module (GeneralError)". The setting is named now."""
    conf = tmp_path / "softhsm2.conf"
    if make == "dir":
        conf.mkdir()
    config = make_config(softhsm_token, module_env={"SOFTHSM2_CONF": str(conf)})
    with pytest.raises(HsmUnavailable) as info:
        open_hsm(config)
    assert f"keybroker.softhsm2_conf {conf} {state}" in info.value.message


def test_failed_connection_attempts_are_one_line_then_a_count_said_once_it_connects(
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
    open_hsm: Callable[..., Hsm],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failed connection attempt was an ERROR naming the module's paths: one every
    ``reconnect_max_interval`` (5 s by default) for as long as callers kept asking through the
    outage. The failure is logged once now, its repeats counted and said when the HSM connects
    again (or a minute after its line, or at the close), with its reason."""
    conf = tmp_path / "softhsm2.conf"
    config = make_config(
        softhsm_token,
        module_env={"SOFTHSM2_CONF": str(conf)},
        reconnect_interval=0.001,
        reconnect_max_interval=0.001,
    )
    hsm = open_hsm(config, wait=False)
    caplog.set_level(logging.INFO, logger="strongroom.keybroker.hsm")
    attempts: list[HsmUnavailable] = []
    while len(attempts) < 4:  # calls within the 1 ms backoff are refused without an attempt
        with pytest.raises(HsmUnavailable) as info:
            hsm.check_health()
        if "next attempt in" not in info.value.message:
            attempts.append(info.value)
    assert {a.message for a in attempts} == {attempts[0].message}
    line = f"cannot connect to the HSM: {attempts[0].message}"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [line]
    caplog.clear()
    conf.write_bytes(softhsm_token.conf_path.read_bytes())
    while True:  # the next attempt, once its backoff is over, connects
        try:
            hsm.check_health()
            break
        except HsmUnavailable as exc:
            assert "next attempt in" in exc.message, exc.message
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.getMessage(), getattr(r, "reason", None)) for r in errors] == [
        (f"{line} (3 more times after its last line)", "HSM_UNAVAILABLE")
    ]


def test_a_failed_connection_tells_a_caller_its_class_and_the_operator_the_paths(
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
    open_hsm: Callable[..., Hsm],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection that fails (here SoftHSM2's configuration is missing) names the setting and
    its path: the operator's words, which reached every remote caller of the failed RPC (the
    status message is the error's), the broker's paths with them, and were not logged at all.
    The caller is told only that the broker cannot connect to its HSM (``public``), also while
    the next attempt waits; the message, path included, is logged at ERROR, once per attempt."""
    conf = tmp_path / "softhsm2.conf"
    config = make_config(
        softhsm_token,
        module_env={"SOFTHSM2_CONF": str(conf)},
        reconnect_interval=60.0,
        reconnect_max_interval=60.0,
    )
    hsm = open_hsm(config, wait=False)
    caplog.set_level(logging.ERROR, logger="strongroom.keybroker.hsm")
    refusals = []
    for _ in range(2):  # the attempt, then a call while the next one waits (backoff)
        with pytest.raises(HsmUnavailable) as info:
            hsm.check_health()
        refusals.append(info.value)
    assert f"keybroker.softhsm2_conf {conf} does not exist" in refusals[0].message
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in logged] == [f"cannot connect to the HSM: {refusals[0].message}"]
    assert logged[0].reason == "HSM_UNAVAILABLE"  # type: ignore[attr-defined]
    for refusal in refusals:  # what the error mapping answers (abort_with)
        assert refusal.reason == "HSM_UNAVAILABLE"
        assert str(tmp_path) not in refusal.answer(), refusal.answer()
        assert refusal.answer().startswith(
            "HSM_UNAVAILABLE: the key broker cannot connect to its HSM"
        ), refusal.answer()
        assert refusal.answer().endswith("; its operator's log has the details")


def test_a_package_built_without_its_release_calls_says_so(
    tmp_path: Path, softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An install without a C compiler has no _p11release library beside p11direct.py.
    monkeypatch.setattr(p11direct, "_release_calls", lambda: p11direct.load_release_calls(tmp_path))
    with pytest.raises(HsmUnavailable) as info:
        Hsm.open(make_config(softhsm_token))
    assert "_p11release" in info.value.message
    assert "C compiler" in info.value.message


def test_a_broker_whose_release_calls_are_another_version_does_not_start(
    tmp_path: Path, softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale build of _p11release.c (same function, same arguments, another behaviour) was
    loaded and used; the broker's start (its HSM's opening: ``keybroker cannot run: ...``) now
    fails HSM_UNAVAILABLE, naming the file, the version found, the one expected and how to
    rebuild it."""
    other = p11direct.RELEASE_CALLS_VERSION + 1
    built = release_library_stand_in(
        tmp_path / "stale",
        "unsigned long sr_rewrap_read(void) { return 0; }\n"
        f"int sr_p11release_version(void) {{ return {other}; }}\n",
    )
    monkeypatch.setattr(
        p11direct, "_release_calls", lambda: p11direct.load_release_calls(built.parent)
    )
    with pytest.raises(HsmUnavailable) as info:
        Hsm.open(make_config(softhsm_token))
    assert info.value.reason == Reason.HSM_UNAVAILABLE
    assert (
        f"the key broker's release calls in {built} are version {other}; this broker expects "
        f"version {p11direct.RELEASE_CALLS_VERSION}: rebuild it (`make setup` in a source "
        "checkout; otherwise reinstall the package or rebuild the image) and start the broker "
        "again"
    ) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("module_path", Path("relative.so")),
        ("token_label", ""),
        ("operation_timeout", 0),
        ("reconnect_interval", -1),
        ("allowed_oaep_hashes", ()),
        ("allowed_oaep_hashes", ("sha1",)),
        ("pin", "plain-string-pin"),
    ],
)
def test_invalid_config(softhsm_token: SoftHsmToken, field: str, value: object) -> None:
    overrides: dict[str, Any] = {field: value}
    with pytest.raises(InvalidArgument) as info:
        make_config(softhsm_token, **overrides)
    assert info.value.reason == "CONFIG_INVALID"


def test_one_backend_per_module(
    softhsm_token: SoftHsmToken, hsm: Hsm, open_hsm: Callable[..., Hsm]
) -> None:
    with pytest.raises(FailedPrecondition) as info:
        Hsm.open(make_config(softhsm_token))
    assert info.value.reason == "HSM_ALREADY_OPEN"
    hsm.close()
    reopened = open_hsm(make_config(softhsm_token))
    reopened.check_health()


def test_closed_backend_refuses(hsm: Hsm) -> None:
    hsm.close()
    hsm.close()  # idempotent
    with pytest.raises(HsmUnavailable) as info:
        hsm.check_health()
    assert info.value.reason == "HSM_CLOSED"


def test_a_close_during_a_scan_of_the_tokens_keys_stops_the_scan_at_its_next_key(
    hsm: Hsm, km: KeyManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERM during the broker's first scan of the token's keys (start-up's ``keys`` step)
    closes the HSM, and the close waited for the whole scan, one read per object of the token
    (up to the close's 5 s: a token of many keys, a slow HSM), before the process could stop.
    The scan now stops at its next object once the close is called (``HSM_CLOSED``, the session
    not reported as dropped): the close waits for the PKCS#11 call under way, no more."""
    for n in range(3):
        km.create_key(f"k{n}")
    described: list[int] = []
    real = _kek.describe

    def describe(direct: p11direct.DirectSession, handle: int) -> Any:
        described.append(handle)
        if len(described) == 1:  # the close comes while the scan reads its first object
            scanning.set()
            closing.wait(30)
        return real(direct, handle)

    scanning, closing = threading.Event(), threading.Event()
    monkeypatch.setattr(_kek, "describe", describe)
    with ThreadPoolExecutor(1) as pool:
        scan = pool.submit(km.modifiable_versions)
        assert scanning.wait(30)
        # Called on a thread of its own: the close's first steps are done once it waits for the
        # worker, which is then let go.
        closer = threading.Thread(target=hsm.close)
        closer.start()
        while not hsm._closed:
            closer.join(0.001)
        closing.set()
        closer.join(30)
        with pytest.raises(HsmUnavailable) as info:
            scan.result()
    assert info.value.reason == "HSM_CLOSED"
    assert len(described) == 1  # was: every KEK object of the token, then the close
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_deadline_holds_while_the_hsm_hangs(hsm: Hsm) -> None:
    """A caller gets HSM_TIMEOUT while the worker is still stuck in an earlier call."""
    entered, release = threading.Event(), threading.Event()
    ran_late = threading.Event()

    def hanging(_hs: HsmSession) -> None:
        entered.set()
        release.wait(30)

    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(hsm.call, hanging, timeout=60)
        assert entered.wait(30)
        with pytest.raises(HsmUnavailable) as info:
            hsm.call(lambda _s: ran_late.set(), timeout=0.05, name="late op")
        assert info.value.reason == "HSM_TIMEOUT"
        assert isinstance(info.value, Unavailable)
        assert not stuck.done()  # the caller was answered while the HSM was still busy
        release.set()
        stuck.result(30)
    hsm.check_health()
    assert not ran_late.is_set()  # the timed-out job never ran after its caller gave up


def test_zero_timeout_is_refused(hsm: Hsm) -> None:
    with pytest.raises(HsmUnavailable) as info:
        hsm.call(lambda _s: None, timeout=0)
    assert info.value.reason == "HSM_TIMEOUT"


def _wait_until_recovered(check: Callable[[], object], attempts: int = 200) -> object:
    """Retries ``check`` until it stops raising HsmUnavailable (each failure is a fast refusal)."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return check()
        except HsmUnavailable as exc:
            last = exc
            threading.Event().wait(0.02)
    raise AssertionError(f"the HSM did not recover: {last}")


def test_token_disappears_and_returns(
    softhsm_token: SoftHsmToken, hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    km.create_key("model")
    dek, wrapped, version = km.generate_data_key("model", *MODEL)
    store = softhsm_token.token_store()
    away = softhsm_token.directory / "away"

    store.rename(away)  # the token's files vanish, as if the HSM were unplugged
    try:
        for attempt in (
            lambda: km.release_to_ephemeral(
                "model", version, wrapped, spki(tee_key), [OaepHash.SHA1]
            ),
            lambda: km.describe_key("model"),  # must not turn into NotFound
            km.list_keys,  # must not turn into an empty list
            lambda: km.generate_data_key("model", *MODEL),
            hsm.check_health,
        ):
            with pytest.raises(HsmUnavailable):
                attempt()
        assert not hsm.status().connected
        assert hsm.status().last_error
    finally:
        away.rename(store)

    _wait_until_recovered(hsm.check_health)
    released, mechanism = km.release_to_ephemeral(
        "model", version, wrapped, spki(tee_key), [OaepHash.SHA1]
    )
    assert (
        bound(
            tee_key.decrypt(
                released, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
            )
        )
        == dek
    )
    assert mechanism is OaepHash.SHA1
    status = hsm.status()
    assert status.connected and status.generation >= 2 and status.last_error is None


def test_backend_started_while_token_absent_recovers(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    store = softhsm_token.token_store()
    away = softhsm_token.directory / "away"
    store.rename(away)
    try:
        hsm = open_hsm(make_config(softhsm_token), wait=False)
        with pytest.raises(HsmUnavailable):
            hsm.check_health()
        assert not hsm.oaep_hashes
    finally:
        away.rename(store)
    _wait_until_recovered(hsm.check_health)
    assert hsm.oaep_hashes == (OaepHash.SHA1,)


def test_many_threads_release_at_once(hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey) -> None:
    km.create_key("busy")
    keys = [km.generate_data_key("busy", *MODEL) for _ in range(4)]
    target = spki(tee_key)

    def release(i: int) -> bool:
        dek, wrapped, version = keys[i % len(keys)]
        out, _ = km.release_to_ephemeral("busy", version, wrapped, target, [OaepHash.SHA1])
        plain = tee_key.decrypt(out, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
        return bound(plain) == dek

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(release, range(96)))
    assert all(results)
    assert session_objects(hsm) == 0  # every unwrapped key and imported public key was destroyed


def test_config_is_exposed_read_only(hsm: Hsm) -> None:
    assert isinstance(hsm.config, HsmConfig)
    with pytest.raises(TypeError):
        hsm.config.module_env["X"] = "y"  # type: ignore[index]


def test_a_submitted_call_keeps_the_deadline_it_was_queued_with(hsm: Hsm) -> None:
    """``submit`` returns at once; ``result`` waits only until the deadline counted from then."""
    entered, release = threading.Event(), threading.Event()

    def hanging(_hs: HsmSession) -> None:
        entered.set()
        release.wait(30)

    stuck = hsm.submit(hanging, timeout=60)
    try:
        assert entered.wait(30)
        late = hsm.submit(lambda _s: "ran", timeout=0.05, name="late op")
        release_at = threading.Timer(0.2, release.set)  # frees the worker after the deadline
        release_at.start()
        # Waited for after its deadline passed: the result is the timeout, not a late success.
        release_at.join()
        with pytest.raises(HsmUnavailable) as info:
            late.result()
        assert info.value.reason == "HSM_TIMEOUT" and "late op" in info.value.message
    finally:
        release.set()
    stuck.result()
    assert stuck.finished_at is not None


def test_begin_release_queues_nothing_until_started(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    km.create_key("later")
    _, wrapped, version = km.generate_data_key("later", *MODEL)
    pending = km.begin_release("later", version, wrapped, spki(tee_key), [OaepHash.SHA1])
    assert pending.mechanism is OaepHash.SHA1  # announced before the HSM runs it
    assert pending.finished_at is None
    hsm.close()  # nothing was queued, so nothing runs: starting now fails, and says why
    pending.start()  # never raises
    with pytest.raises(HsmUnavailable) as info:
        pending.result()
    assert info.value.reason == "HSM_CLOSED"


def test_a_started_release_is_the_one_result_returns(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    km.create_key("started")
    dek, wrapped, version = km.generate_data_key("started", *MODEL)
    pending = km.begin_release("started", version, wrapped, spki(tee_key), [OaepHash.SHA1])
    assert hsm._conn is not None
    before = hsm._conn.operations
    pending.start()
    pending.start()  # queues nothing more
    out, mechanism = pending.result()
    assert hsm._conn.operations == before + 1
    assert pending.finished_at is not None and mechanism is pending.mechanism
    plain = tee_key.decrypt(out, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert bound(plain) == dek
    assert session_objects(hsm) == 0


def test_a_release_never_uses_another_hash_than_it_announced(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    """The audit record names the announced OAEP hash before the re-wrap runs; should the token's
    hashes change in between (a reconnect probing again), the re-wrap fails instead of using
    another one, and says so."""
    km.create_key("announced")
    _, wrapped, version = km.generate_data_key("announced", *MODEL)
    accepted = [OaepHash.SHA256, OaepHash.SHA1]
    pending = km.begin_release("announced", version, wrapped, spki(tee_key), accepted)
    assert pending.mechanism is OaepHash.SHA1  # SoftHSM2 offers SHA-1 only
    hsm._oaep_hashes = (OaepHash.SHA256, OaepHash.SHA1)  # as if a reconnect probed otherwise
    with pytest.raises(Unavailable) as info:
        pending.result()
    assert not isinstance(info.value, HsmUnavailable)  # the connection is fine: nothing dropped
    assert info.value.reason == "HSM_UNAVAILABLE"
    assert "changed while the release was queued" in info.value.message
    assert hsm.status().connected


def test_a_vendor_modules_failure_does_not_blame_softhsm2s_configuration(
    tmp_path: Path, softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vendor's module (not SoftHSM2) failing, with a $SOFTHSM2_CONF left in the
    environment that it never reads: the message named that variable's file as a cause,
    sending the operator to SoftHSM2. Only keybroker.softhsm2_conf (set for the module on
    purpose) or a SoftHSM2 module's $SOFTHSM2_CONF is named."""
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "left-over.conf"))
    vendor = tmp_path / "libvendor-pkcs11.so"
    config = make_config(softhsm_token, module_path=vendor, module_env={})
    with pytest.raises(HsmUnavailable) as info:
        Hsm.open(config)
    assert f"keybroker.pkcs11_module {vendor} does not exist" in str(info.value)
    assert "SOFTHSM2_CONF" not in str(info.value)
