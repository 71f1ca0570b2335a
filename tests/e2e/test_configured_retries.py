"""Configured models load once the cause of a failure goes away, without anyone calling LoadModel.

A failure that was not transient (a release the broker's policy denies, a model not yet
published, ...) used to be final for a configured model: the server stayed not ready until an
operator called LoadModel or restarted it. Such failures are now retried slowly
(strongroom.inference.autoload); these tests shorten the schedule to fractions of a second.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from strongroom.errors import FailedPrecondition, PermissionDenied, Unavailable
from strongroom.files import shared_flock
from strongroom.inference import autoload
from strongroom.inference.autoload import RetrySchedule, spread
from strongroom.inference.models import ModelState
from strongroom.inference.server import InferenceServer
from strongroom.reasons import Reason
from strongroom.runtime.config import ConfigError
from tests.e2e.publishing import publish
from tests.e2e.stalling import StallOnce
from tests.e2e.test_resilience import wait_until

OTHER_MEASUREMENT = "ab" * 48


def _set_policy(stack: DevStack, key_id: str, document: str) -> None:
    admin = kb_grpc.KeyAdminServiceStub(stack.channel(stack.identity("admin"), "keybroker"))
    admin.SetReleasePolicy(
        kb_pb.SetReleasePolicyRequest(key_id=key_id, policy_document=document), timeout=30
    )


def _start(stack: DevStack, *names: str) -> InferenceServer:
    """An inference server configured with ``names`` (version 1), retrying slow failures every
    0.2-0.6 s; its configured loads are not started yet."""
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()
    section = {
        **stack.default_section("inference"),
        "models": [{"name": name, "version": "1"} for name in names],
    }
    inference: InferenceServer = stack.start_in_process("inference", section).handle
    inference.slow_retry_initial, inference.slow_retry_max = 0.2, 0.4
    return inference


def _failed_with(inference: InferenceServer, name: str) -> str | None:
    for version in inference.repository.status(name).versions:
        if version.state is ModelState.FAILED and version.failure is not None:
            return version.failure.reason
    return None


def _attempts(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage() == "model load failed" and getattr(r, "model", None) == name
    ]


def test_a_model_published_after_the_server_started_loads_without_a_call(
    stack: DevStack, model_path: Path, stopped: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The store had no such model when the server started (NOT_FOUND): the model stayed
    unloaded, and the server not ready, until someone called LoadModel or restarted it."""
    stack.create_release_key(stack.identity("admin"), "later", policy_version="1")
    inference = _start(stack, "later")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference")
    inference.load_configured_models()
    assert wait_until(lambda: len(_attempts(caplog, "later")) >= 3, 30), (
        inference.repository.status("later")
    )
    assert _failed_with(inference, "later") == "MODEL_NOT_FOUND"
    assert not inference.repository.server_ready()
    publish(stack, model_path, "later", "later")
    assert wait_until(lambda: inference.repository.is_ready("later", "1"), 30), (
        inference.repository.status("later")
    )
    assert inference.repository.server_ready()
    (loader_thread,) = inference._threads
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    # Each failure of the same reason was logged once in full, however often it was retried.
    attempts = _attempts(caplog, "later")
    assert len([r for r in attempts if r.levelno == logging.ERROR]) == 1 < len(attempts)
    retried = [
        r
        for r in caplog.records
        if r.name == "strongroom.inference.autoload" and "retrying" in r.getMessage()
    ]
    assert len(retried) == 1 and retried[0].levelno == logging.ERROR
    assert getattr(retried[0], "retry", None) == "slowly"
    assert any("loaded after failing" in r.getMessage() for r in caplog.records)


def test_a_release_the_policy_denied_loads_once_the_policy_is_fixed(
    stack: DevStack, model_path: Path, stopped: None
) -> None:
    """A key release denied by the broker's policy (here: the VM's measurement not listed) was
    final; the operator then fixed the policy, and the pod stayed unready for good."""
    stack.create_release_key(stack.identity("admin"), "denied", policy_version="1")
    publish(stack, model_path, "denied", "denied")
    _set_policy(stack, "denied", stack.simulated_policy("2", measurement=OTHER_MEASUREMENT))
    inference = _start(stack, "denied")
    inference.load_configured_models()
    assert wait_until(lambda: _failed_with(inference, "denied") is not None, 30)
    assert _failed_with(inference, "denied") == "MEASUREMENT_NOT_ALLOWED"
    assert not inference.repository.is_ready("denied", "1")
    _set_policy(stack, "denied", stack.simulated_policy("3"))
    assert wait_until(lambda: inference.repository.is_ready("denied", "1"), 30), (
        inference.repository.status("denied")
    )


def test_an_unload_stops_the_slow_retries(
    stack: DevStack, model_path: Path, stopped: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator unloading a configured model that waits for a slow retry ends its retries:
    publishing it afterwards loads nothing."""
    stack.create_release_key(stack.identity("admin"), "dropped", policy_version="1")
    inference = _start(stack, "dropped")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference")
    inference.load_configured_models()
    # It is retried (NOT_FOUND) ...
    assert wait_until(lambda: len(_attempts(caplog, "dropped")) >= 2, 30)
    assert wait_until(lambda: _failed_with(inference, "dropped") is not None, 30)
    inference.loader.abort_queued("dropped", "1")  # as UnloadModel does
    inference.repository.unload("dropped", "1")
    # ... until the unload: the retries end, and publishing it afterwards loads nothing.
    (loader_thread,) = inference._threads
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    attempts = len(_attempts(caplog, "dropped"))
    publish(stack, model_path, "dropped", "dropped")
    assert not loader_thread.is_alive()
    assert inference.repository.version_state("dropped", "1") is None
    assert not inference.repository.is_ready("dropped")
    assert len(_attempts(caplog, "dropped")) == attempts


def _released(stack: DevStack, key_id: str) -> int:
    """How many releases of ``key_id`` the broker granted (its audit log's ALLOWED records)."""
    path = stack.root / "state" / "keybroker" / "audit.log"
    with path.open("rb") as log, shared_flock(log.fileno()):  # the broker writes under flock
        data = log.read()
    records = [json.loads(line) for line in data.decode().splitlines()]
    return sum(
        1
        for r in records
        if r["action"] == "key_release"
        and r["decision"] == "allowed"
        and r.get("key", {}).get("id") == key_id
    )


def _tries(caplog: pytest.LogCaptureFixture, name: str) -> int:
    """The attempts at ``name``'s load so far: its loads, and its retries that did not load."""
    return len(
        [
            r
            for r in caplog.records
            if getattr(r, "model", None) == name
            and r.getMessage() in ("model load failed", "stored artifact unchanged")
        ]
    )


def _damage_in_place(stack: DevStack, name: str) -> None:
    """Flips a byte of the stored artifact's last chunk: the store serves it (its size and
    index entry unchanged), and the load finds it only once it has the key and decrypts."""
    storage = stack.services["modelstore"].handle.storage
    record = storage.stat(name, "1")
    blob = next(p for p in (storage.root / "blobs").rglob(record.artifact_sha256))
    blob.chmod(0o600)
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_a_damaged_artifact_is_downloaded_again_only_once_the_store_holds_another(
    stack: DevStack, model_path: Path, stopped: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored artifact damaged where only decryption finds it costs a load its whole download
    and a key release the broker granted (ALLOWED, unbudgeted) before it fails with DATA_LOSS:
    each slow retry did both again (a 2 GB model: 2 GB and a release every 5 minutes, for each
    replica and model), though the store still held the same artifact. A retry now asks the
    store first (StatModel) and downloads only once its entry for the version changed."""
    stack.create_release_key(stack.identity("admin"), "damaged", policy_version="1")
    publish(stack, model_path, "damaged", "damaged")
    _damage_in_place(stack, "damaged")
    inference = _start(stack, "damaged")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference")
    inference.load_configured_models()

    assert wait_until(lambda: _tries(caplog, "damaged") >= 4, 30), inference.repository.status(
        "damaged"
    )
    assert _failed_with(inference, "damaged") is not None
    assert _released(stack, "damaged") == 1
    assert len(_attempts(caplog, "damaged")) == 1
    assert not inference.repository.is_ready("damaged", "1")
    # Published again (a new entry: its creation time, digest and storing time differ), it loads.
    admin_store = store_grpc.ModelStoreServiceStub(
        stack.channel(stack.identity("admin"), "modelstore")
    )
    admin_store.DeleteModel(store_pb.DeleteModelRequest(name="damaged", version="1"), timeout=30)
    publish(stack, model_path, "damaged", "damaged")
    assert wait_until(lambda: inference.repository.is_ready("damaged", "1"), 30), (
        inference.repository.status("damaged")
    )
    assert _released(stack, "damaged") == 2


def test_a_statmodel_out_of_time_is_not_taken_for_the_store_s_entry(
    stack: DevStack,
    model_path: Path,
    stopped: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The StatModel before each attempt, out of time (its real call's deadline passes: the
    store too slow for now), is a store that could not be asked, as an UNAVAILABLE one is: the
    attempt goes on. Since the fetch library made a peer's DEADLINE_EXCEEDED DeadlineExceeded,
    the loader's ``transient`` (Unavailable only) took it for the store's answer: once a damaged
    artifact's download had failed beside it, every later StatModel out of time read as the same
    entry, "stored artifact unchanged", and no retry downloaded again, whatever the store held."""
    stack.create_release_key(stack.identity("admin"), "stat-late", policy_version="1")
    publish(stack, model_path, "stat-late", "stat-late")
    _damage_in_place(stack, "stat-late")
    # Each of the real store's StatModel answers takes 0.5 s: the look before each attempt has
    # 0.1 s, the load's own (is it a manifest?) the load's time.
    storage = stack.services["modelstore"].handle.storage
    answer = storage.stat

    def slow_stat(name: str, version: str) -> Any:
        time.sleep(0.5)
        return answer(name, version)

    monkeypatch.setattr(storage, "stat", slow_stat)
    monkeypatch.setattr(autoload, "STAT_TIMEOUT_SECONDS", 0.1)
    inference = _start(stack, "stat-late")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference")
    inference.load_configured_models()

    assert wait_until(lambda: _tries(caplog, "stat-late") >= 3, 30), inference.repository.status(
        "stat-late"
    )
    # Every try downloaded (the load's own StatModel has the load's time): none was skipped.
    assert len(_attempts(caplog, "stat-late")) == _tries(caplog, "stat-late")
    assert _released(stack, "stat-late") >= 3
    assert _failed_with(inference, "stat-late") is not None


def test_an_artifact_this_server_refuses_after_its_key_is_downloaded_again_only_once_changed(
    stack: DevStack, tmp_path: Path, stopped: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An artifact that decrypts, but whose model this server refuses (not ONNX here; a graph
    too large, an operator uncapped, a signature missing or invalid likewise), is judged only
    once downloaded and its key released (ALLOWED): the same artifact is refused the same way
    by this server's configuration, and each slow retry paid for both again."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an ONNX model" * 100)
    stack.create_release_key(stack.identity("admin"), "junk", policy_version="1")
    publish(stack, junk, "junk", "junk")
    inference = _start(stack, "junk")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference")
    inference.load_configured_models()
    assert wait_until(lambda: _tries(caplog, "junk") >= 4, 30), inference.repository.status("junk")
    assert _failed_with(inference, "junk") == "MODEL_INVALID"
    assert _released(stack, "junk") == 1
    assert inference._threads[0].is_alive()  # still retried: published again, it is tried


def test_a_retry_does_not_replace_the_version_an_operator_loaded_since(
    stack: DevStack, model_path: Path, stopped: None
) -> None:
    """The configured version 1 was not published; an operator loaded version 2 instead. Once
    version 1 was published, its retry loaded it and made it the model's default: the requests
    the operator had moved to version 2 went back to version 1, hours later perhaps. Its retries
    now end once a version the configuration does not list serves the model."""
    stack.create_release_key(stack.identity("admin"), "moved", policy_version="1")
    publish(stack, model_path, "moved", "moved", version="2")
    inference = _start(stack, "moved")
    inference.load_configured_models()
    assert wait_until(lambda: _failed_with(inference, "moved") == "MODEL_NOT_FOUND", 30)
    inference.loader.load_with_retry("moved", "2")  # as LoadModel does
    assert inference.repository.status("moved").default_version == "2"
    publish(stack, model_path, "moved", "moved")
    (loader_thread,) = inference._threads
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert inference.repository.status("moved").default_version == "2"
    assert inference.repository.version_state("moved", "1") is not ModelState.READY


def test_a_load_naming_no_pin_is_held_to_the_configured_one(
    stack: DevStack, model_path: Path, stopped: None
) -> None:
    """A configured version pinned to its artifact (``inference.models[].header_sha256``) was
    held to the pin by its own loads only: an operator's LoadModel naming no pin (what reloads a
    configured model that failed) loaded whatever the store served for the version, here another
    artifact published for it after the pinned one was deleted (an older one served again
    alike). Now it is refused before any key is released, unless the operator names a pin."""
    admin, publisher = stack.identity("admin"), stack.identity("publisher")
    stack.create_release_key(admin, "pinned", policy_version="1")

    def put() -> str:
        return publish_model(
            model_path,
            name="pinned",
            version="1",
            key_id="pinned",
            broker=stack.channel(publisher, "keybroker"),
            store=stack.channel(publisher, "modelstore"),
        ).header_sha256

    pinned = put()
    store_grpc.ModelStoreServiceStub(stack.channel(admin, "modelstore")).DeleteModel(
        store_pb.DeleteModelRequest(name="pinned", version="1"), timeout=30
    )
    served = put()
    assert served != pinned  # the header binds its creation time
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()
    section = {
        **stack.default_section("inference"),
        "models": [{"name": "pinned", "version": "1", "header_sha256": pinned}],
    }
    inference: InferenceServer = stack.start_in_process("inference", section).handle
    control = control_grpc.ModelControlServiceStub(stack.channel(admin, "inference"))
    with pytest.raises(grpc.RpcError) as refused:
        control.LoadModel(control_pb.LoadModelRequest(name="pinned", version="1"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert (refused.value.details() or "").startswith("HEADER_PIN_MISMATCH: ")
    assert pinned in (refused.value.details() or "")
    assert not inference.repository.is_ready("pinned", "1")
    assert _released(stack, "pinned") == 0
    # A pin the operator names is the operator's choice.
    control.LoadModel(
        control_pb.LoadModelRequest(name="pinned", version="1", header_sha256=served), timeout=60
    )
    assert inference.repository.is_ready("pinned", "1")


def test_a_failure_whose_reason_flips_is_logged_once_an_hour_per_reason(
    stack: DevStack, model_path: Path, stopped: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure was logged in full on every change of its reason, so one whose reason flips
    (A, B, A, B: here the model deleted and published again under a denying policy; a network
    that resets the store's connection on one try and the broker's on the next does the same to
    transient ones, retried every minute) was logged on every retry, however long it went on.
    Each reason is now logged in full at most hourly, whatever came between."""
    stack.create_release_key(stack.identity("admin"), "flips", policy_version="1")
    _set_policy(stack, "flips", stack.simulated_policy("2", measurement=OTHER_MEASUREMENT))
    admin_store = store_grpc.ModelStoreServiceStub(
        stack.channel(stack.identity("admin"), "modelstore")
    )
    inference = _start(stack, "flips")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference")
    inference.load_configured_models()
    for _ in range(2):
        assert wait_until(lambda: _failed_with(inference, "flips") == "MODEL_NOT_FOUND", 30)
        publish(stack, model_path, "flips", "flips")
        assert wait_until(lambda: _failed_with(inference, "flips") == "MEASUREMENT_NOT_ALLOWED", 30)
        admin_store.DeleteModel(store_pb.DeleteModelRequest(name="flips", version="1"), timeout=30)
    assert wait_until(lambda: _failed_with(inference, "flips") == "MODEL_NOT_FOUND", 30)
    in_full = [r for r in _attempts(caplog, "flips") if r.levelno == logging.ERROR]
    assert [r.reason for r in in_full] == ["MODEL_NOT_FOUND", "MEASUREMENT_NOT_ALLOWED"]  # type: ignore[attr-defined]
    retried = [
        r
        for r in caplog.records
        if r.name == "strongroom.inference.autoload" and "retrying" in r.getMessage()
    ]
    assert [r.reason for r in retried] == ["MODEL_NOT_FOUND", "MEASUREMENT_NOT_ALLOWED"]  # type: ignore[attr-defined]


def test_configured_loads_and_their_retries_run_one_at_a_time(
    stack: DevStack, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configured models failing together do not download their artifacts at once: one
    thread runs every configured load and retry in turn (a pod sized for its largest model
    holds one plaintext buffer for them; a LoadModel call is the only other load)."""
    names = [f"many{i}" for i in range(4)]
    inference = _start(stack, *names)
    load = inference.loader.load
    running, most, calls = 0, 0, 0
    guard = threading.Lock()

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal running, most, calls
        with guard:
            running, calls = running + 1, calls + 1
            most = max(most, running)
        try:
            time.sleep(0.05)  # loads that overlapped would be seen overlapping
            return load(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with guard:
                running -= 1

    monkeypatch.setattr(inference.loader, "load", counted)
    inference.load_configured_models()
    assert wait_until(lambda: calls >= 3 * len(names), 30)
    assert most == 1


def test_a_shutdown_stops_a_retrys_download(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow retry's load under way (a download the store stalls, as a large one takes
    minutes) ends with the server, not with the download."""
    stack.create_release_key(stack.identity("admin"), "slowfix", policy_version="1")
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "1")
    monkeypatch.setattr(storage, "open", stall)
    inference = _start(stack, "slowfix")
    inference.load_configured_models()
    try:
        assert wait_until(lambda: _failed_with(inference, "slowfix") == "MODEL_NOT_FOUND", 30)
        publish(stack, model_path, "slowfix", "slowfix")
        assert stall.stalled.wait(30)  # the retry is downloading
        (loader_thread,) = inference._threads
        stack.services.pop("inference").stop()
        loader_thread.join(30)
        assert not loader_thread.is_alive(), "the retry's load ran on after the shutdown"
        assert not stall.go_on.is_set()
        assert not inference.repository.is_ready("slowfix", "1")
    finally:
        stall.go_on.set()


def test_failures_only_this_servers_configuration_changes_are_not_retried() -> None:
    """A release answer signed by a key this server does not trust cannot change until its
    configuration does, and each try is a release the broker granted and audited (ALLOWED,
    never budgeted): not retried. Turning the slow retries off leaves every failure that is not
    transient to an operator, as before."""
    schedule = RetrySchedule()
    unknown = FailedPrecondition("unknown key", reason=Reason.RELEASE_SIGNING_KEY_UNKNOWN)
    denied = FailedPrecondition("denied", reason=Reason.MEASUREMENT_NOT_ALLOWED)
    assert schedule.retried(unknown) is None
    assert schedule.retried(denied) == "slowly"
    assert (
        schedule.retried(PermissionDenied("expired", reason=Reason.PEER_CERT_EXPIRED)) == "slowly"
    )
    assert schedule.retried(Unavailable("down", reason=Reason.KEY_RELEASE_UNAVAILABLE)) == "soon"
    off = RetrySchedule(slow_initial=0)
    assert off.retried(denied) is None
    assert off.retried(Unavailable("down", reason=Reason.KEY_RELEASE_UNAVAILABLE)) == "soon"


def test_slow_retries_are_spread_but_never_sooner_than_their_delay() -> None:
    """The broker records a caller's refused releases one by one within a budget per reason
    (1 a second): a replica's retries of one model never come faster than one per delay."""
    waits = [spread(30.0) for _ in range(1000)]
    assert all(30.0 <= w <= 45.0 for w in waits)
    assert max(waits) - min(waits) > 5  # spread: a fleet started together does not retry together


def test_the_slow_retry_settings_are_checked() -> None:
    from strongroom.inference.config import InferenceConfig

    base = {"model_store": "a:1", "key_broker": "b:1"}
    config = InferenceConfig(**base)  # type: ignore[arg-type]
    assert (config.failed_load_retry_seconds, config.failed_load_retry_max_seconds) == (30, 300)
    InferenceConfig(**base, failed_load_retry_seconds=0)  # type: ignore[arg-type]
    for bad in ({"failed_load_retry_seconds": 1}, {"failed_load_retry_max_seconds": 20}):
        with pytest.raises(ConfigError, match="failed_load_retry"):
            InferenceConfig(**base, **bad)  # type: ignore[arg-type]


def test_a_model_version_is_configured_once() -> None:
    """A version listed twice was loaded, and retried, twice each round (two downloads and two
    key releases of a damaged artifact every time), and a listing without the other's pin
    loaded an artifact the pin refuses."""
    from strongroom.inference.config import InferenceConfig, ModelRef

    base = {"model_store": "a:1", "key_broker": "b:1"}
    pinned = ModelRef("m", "1", header_sha256="ab" * 32)
    with pytest.raises(ConfigError, match="m/1 is listed twice"):
        InferenceConfig(**base, models=(pinned, ModelRef("m", "1")))  # type: ignore[arg-type]
    InferenceConfig(**base, models=(pinned, ModelRef("m", "2")))  # type: ignore[arg-type]
