"""Start-up order does not matter: a model whose key broker is down loads once it is back."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train
from strongroom.errors import ResourceExhausted, StrongroomError
from strongroom.inference.loader import transient
from strongroom.inference.models import (
    ModelLoadFailed,
    ModelRepository,
    ModelState,
    ModelUnloaded,
)
from strongroom.inference.models._repository import MAX_FAILED_LOADS
from strongroom.reasons import Reason


def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _publish(stack: DevStack, tmp_path: Path, name: str) -> None:
    """Publishes ``name`` version 1 under a release key of the same name."""
    stack.create_release_key(stack.identity("admin"), name, policy_version="1")
    _publish_files(stack, name, {name: train(tmp_path / "m.onnx").path})


def test_model_loads_after_the_broker_comes_back(stack: DevStack, tmp_path: Path) -> None:
    _publish(stack, tmp_path, "late")
    stack.services.pop("keybroker").stop()

    section = {**stack.default_section("inference"), "models": [{"name": "late", "version": "1"}]}
    inference = stack.start_in_process("inference", section).handle
    inference.retry_initial = 0.2
    inference.load_configured_models()
    repository = inference.repository

    def failed_unavailable() -> bool:
        versions = repository.status("late").versions
        return any(
            v.failure is not None and v.failure.reason == "KEY_RELEASE_UNAVAILABLE"
            for v in versions
        )

    assert wait_until(failed_unavailable, 30), repository.status("late")
    assert not repository.is_ready("late")
    stack.start_in_process("keybroker")
    assert wait_until(lambda: repository.is_ready("late", "1"), 30), repository.status("late")


def test_a_configured_model_unloaded_while_it_waits_to_be_retried_stays_unloaded(
    stack: DevStack, tmp_path: Path
) -> None:
    """The start-up loader retried a model an operator had unloaded during its back-off, and so
    loaded it again once the broker was back."""
    _publish(stack, tmp_path, "dropped")
    stack.services.pop("keybroker").stop()
    earlier = stack.services.pop("inference", None)  # an earlier test's server holds the port
    if earlier is not None:
        earlier.stop()
    section = {
        **stack.default_section("inference"),
        "models": [{"name": "dropped", "version": "1"}],
    }
    inference = stack.start_in_process("inference", section).handle
    try:
        inference.retry_initial = 0.2
        inference.load_configured_models()
        repository = inference.repository

        def failed() -> bool:
            return any(v.failure is not None for v in repository.status("dropped").versions)

        assert wait_until(failed, 30), repository.status("dropped")
        repository.unload("dropped", "1")  # as UnloadModel does
        stack.start_in_process("keybroker")
        (loader_thread,) = inference._threads
        assert wait_until(lambda: not loader_thread.is_alive(), 30)
        assert not repository.is_ready("dropped", "1")
        assert repository.status("dropped").versions == ()
    finally:
        stack.services.pop("inference").stop()


def _fail_many_other_loads(repository: ModelRepository) -> None:
    """More failed loads of other names than the repository keeps (an admin's LoadModel of
    names the store does not hold, say)."""
    error = ModelLoadFailed("the store has no such model", reason="MODEL_NOT_FOUND")
    for i in range(MAX_FAILED_LOADS + 1):
        repository.fail(f"typo/{i}", "1", error)


def test_retried_loads_outlast_the_cap_on_failed_loads(stack: DevStack, tmp_path: Path) -> None:
    """The cap on failed loads dropped the oldest failure even while its load waited to be
    retried, and both retry loops read a version no longer listed as one an operator unloaded:
    a configured model was never retried again (the server stayed unready) and a LoadModel in
    its back-off failed MODEL_UNLOADED. A failure a retry waits for is now kept."""
    _publish(stack, tmp_path, "capped")
    _publish(stack, tmp_path, "capped-rpc")
    stack.services.pop("keybroker").stop()
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()
    section = {**stack.default_section("inference"), "models": [{"name": "capped", "version": "1"}]}
    inference = stack.start_in_process("inference", section).handle
    try:
        inference.retry_initial = 0.2
        inference.load_configured_models()
        repository = inference.repository
        assert wait_until(lambda: repository.version_state("capped", "1") is ModelState.FAILED, 30)

        def back_off(seconds: float) -> None:
            # Other loads fail meanwhile, past the cap; then the broker returns.
            if "keybroker" not in stack.services:
                _fail_many_other_loads(repository)
                stack.start_in_process("keybroker")

        inference.loader.load_with_retry("capped-rpc", "1", within=60, sleep=back_off)
        assert repository.is_ready("capped-rpc", "1")
        assert wait_until(lambda: repository.is_ready("capped", "1"), 30), repository.status(
            "capped"
        )
        assert len(_failed_versions(repository)) <= MAX_FAILED_LOADS  # the cap holds again
    finally:
        stack.services.pop("inference").stop()


def _failed_versions(repository: ModelRepository) -> list[tuple[str, str]]:
    return [
        (name, v.version)
        for name in repository.names()
        for v in repository.status(name).versions
        if v.state is ModelState.FAILED
    ]


def test_load_model_retrying_an_unavailable_broker_stops_when_the_version_is_unloaded(
    stack: DevStack, tmp_path: Path
) -> None:
    """LoadModel retries UNAVAILABLE for a while; an UnloadModel during its back-off used to be
    undone by the next attempt."""
    _publish(stack, tmp_path, "retried")
    stack.services.pop("keybroker").stop()
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()
    inference = stack.start_in_process("inference", stack.default_section("inference")).handle
    try:
        repository = inference.repository

        def back_off(seconds: float) -> None:
            # The operator unloads the version while LoadModel waits, then the broker returns.
            repository.unload("retried", "1")
            stack.start_in_process("keybroker")

        with pytest.raises(ModelUnloaded):
            inference.loader.load_with_retry("retried", "1", within=60, sleep=back_off)
        assert repository.version_state("retried", "1") is None
        assert "retried" not in repository.names()
    finally:
        stack.services.pop("inference").stop()


def test_an_unload_right_after_a_retrys_check_still_stops_the_retry(
    stack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoadModel's retry asked whether its version was still wanted (not unloaded) before it
    registered where an UnloadModel aborts it: an unload between the two reached neither, and
    the retry loaded the version again after the unload had returned. The question is now asked
    once registered (and the unload aborts once more after it unloads)."""
    _publish(stack, tmp_path, "raced")
    stack.services.pop("keybroker").stop()
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()
    inference = stack.start_in_process("inference", stack.default_section("inference")).handle
    try:
        repository = inference.repository
        control = control_grpc.ModelControlServiceStub(
            stack.channel(stack.identity("admin"), "inference")
        )
        armed = threading.Event()
        load = inference.loader.load

        def load_asked(*args: Any, retry_of: Any = None, **kwargs: Any) -> Any:
            if retry_of is None:
                return load(*args, **kwargs)

            def asked() -> bool:
                # The operator's unload lands right after the retry's own question is answered.
                wanted: bool = retry_of()
                if armed.is_set():
                    armed.clear()
                    request = control_pb.UnloadModelRequest(name="raced", version="1")
                    control.UnloadModel(request, timeout=30)
                return wanted

            return load(*args, retry_of=asked, **kwargs)

        def back_off(seconds: float) -> None:
            if "keybroker" not in stack.services:  # the first back-off: the broker returns
                stack.start_in_process("keybroker")
                armed.set()

        monkeypatch.setattr(inference.loader, "load", load_asked)
        with pytest.raises(StrongroomError) as info:
            inference.loader.load_with_retry("raced", "1", within=60, sleep=back_off)
        assert info.value.reason in ("MODEL_UNLOADED", "LOAD_ABORTED_BY_UNLOAD")
        assert not armed.is_set()  # the unload did happen
        assert repository.version_state("raced", "1") is None
        assert "raced" not in repository.names()
    finally:
        stack.services.pop("inference").stop()


def test_a_configured_model_whose_load_crashes_does_not_stop_the_ones_after_it(
    stack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up loader caught only the project's errors: an unexpected exception in one
    model's load (a bug; a statement signed by the trusted key in a shape nobody expected) ended
    its thread, and every configured model after it was never loaded."""
    _publish(stack, tmp_path, "after")
    if "keybroker" not in stack.services:
        stack.start_in_process("keybroker")
    earlier = stack.services.pop("inference", None)
    if earlier is not None:
        earlier.stop()
    section = {
        **stack.default_section("inference"),
        "models": [{"name": "crashes", "version": "1"}, {"name": "after", "version": "1"}],
    }
    inference = stack.start_in_process("inference", section).handle
    try:
        real_load = inference.loader.load

        def load(name: str, version: str, **kwargs: Any) -> object:
            if name == "crashes":
                raise RuntimeError("a bug in one model's load")
            return real_load(name, version, **kwargs)

        monkeypatch.setattr(inference.loader, "load", load)
        inference.load_configured_models(wait=True)
        assert inference.repository.is_ready("after", "1"), inference.repository.status("after")
    finally:
        stack.services.pop("inference").stop()


def test_a_load_refused_while_the_broker_is_busy_with_its_identity_is_retried(
    stack: DevStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every inference replica has the one inference SPIFFE ID, and the broker runs at most
    server.max_unary_calls_per_identity of its calls at once: a load refused that way
    (RESOURCE_EXHAUSTED TOO_MANY_UNARY_CALLS_PER_IDENTITY, "retry later") failed for good, as
    if the release had been denied, a configured model's as well as LoadModel's. Both are
    retried like an unavailable broker now."""
    stack.create_release_key(stack.identity("admin"), "busy", policy_version="1")
    model = train(tmp_path / "m.onnx").path
    holders, configured, requested = ("busy-a", "busy-b"), "busy-c", "busy-d"
    _publish_files(stack, "busy", {name: model for name in (*holders, configured, requested)})
    _stop(stack, "keybroker", "inference")
    # A broker admitting 2 calls per identity (of 4 workers, 3 for the data plane), whose HSM
    # waits may last.
    section = {**stack.default_section("keybroker"), "hsm_operation_timeout_seconds": 60}
    server = {"max_workers": 4, "max_unary_calls_per_identity": 2}
    broker = stack.start_in_process("keybroker", section, server=server).handle
    inference = stack.start_in_process(
        "inference",
        {**stack.default_section("inference"), "models": [{"name": configured, "version": "1"}]},
    ).handle
    inference.retry_initial = inference.retry_max = 0.2
    # Each service names its control plane, which a busy data plane (like this one) cannot queue.
    control = inference.host.shares.is_control_plane
    assert control("/strongroom.api.inference.v1.ModelControlService/LoadModel")
    # Evidence requests, as many at once as the default reserve has workers, stay out of it.
    assert not control("/strongroom.api.inference.v1.InferenceAttestationService/GetEvidence")
    assert not control("/inference.GRPCInferenceService/ModelInfer")
    store = stack.services["modelstore"].handle.host.shares.is_control_plane
    assert store("/strongroom.api.modelstore.v1.ModelStoreService/DeleteModel")
    assert store("/strongroom.api.modelstore.v1.ModelStoreService/ReplaceKeySlot")
    assert not store("/strongroom.api.modelstore.v1.ModelStoreService/GetModel")
    repository = inference.repository
    gate = threading.Event()
    loads: list[threading.Thread] = []
    try:
        # The HSM's one worker runs an operation of the test's: releases wait there.
        hold = broker.hsm.submit(lambda _session: gate.wait(60), timeout=60, name="test hold")
        assert wait_until(lambda: hold.started, 30)
        loads = [
            threading.Thread(target=inference.loader.load, args=(name, "1"), daemon=True)
            for name in holders
        ]
        for load in loads:
            load.start()
        caller = stack.spiffe_id("inference")
        assert wait_until(lambda: broker.host.unary.running(caller) == 2, 30)

        def refused_busy() -> bool:
            return any(
                v.failure is not None and v.failure.reason == "TOO_MANY_UNARY_CALLS_PER_IDENTITY"
                for v in repository.status(configured).versions
            )

        inference.load_configured_models()
        assert wait_until(refused_busy, 30), repository.status(configured)
        backed_off: list[float] = []

        def back_off(seconds: float) -> None:
            backed_off.append(seconds)
            gate.set()  # the HSM frees up: the releases in flight complete

        with caplog.at_level(logging.WARNING, logger="strongroom.inference.loader"):
            inference.loader.load_with_retry(requested, "1", within=60, sleep=back_off)
        retried = [
            getattr(r, "reason", None)
            for r in caplog.records
            if r.name == "strongroom.inference.loader" and "retrying" in r.message
        ]
        assert retried == ["TOO_MANY_UNARY_CALLS_PER_IDENTITY"] * len(backed_off) != []
        assert wait_until(lambda: repository.is_ready(configured, "1"), 30)
        for load in loads:
            load.join(60)
        assert all(repository.is_ready(name, "1") for name in (*holders, requested))
    finally:
        gate.set()
        stack.services.pop("inference").stop()
        stack.services.pop("keybroker").stop()
        stack.start_in_process("keybroker")  # as the module's other tests expect it


def test_a_load_refused_for_a_busy_data_plane_is_retried() -> None:
    """A broker or store whose data-plane workers are all busy (the rest are the control plane's)
    answers RESOURCE_EXHAUSTED DATA_PLANE_WORKERS_BUSY, "retry later": a load refused so is
    retried like one refused for its identity's calls, not failed as if the release were denied."""
    assert transient(ResourceExhausted("busy", reason=Reason.DATA_PLANE_WORKERS_BUSY))
    assert not transient(ResourceExhausted("too large", reason=Reason.ARTIFACT_TOO_LARGE))


def test_a_load_refused_for_its_certificates_share_of_streams_is_retried() -> None:
    """A store whose streams per certificate (server.max_streams_per_certificate: a fleet's
    replica's share of the identity's streams) are taken answers RESOURCE_EXHAUSTED
    TOO_MANY_STREAMS_PER_CERTIFICATE, "retry later", like its per-identity cap: retried."""
    assert transient(ResourceExhausted("share", reason=Reason.TOO_MANY_STREAMS_PER_CERTIFICATE))


def test_a_load_refused_while_the_store_streams_to_its_identity_is_retried(
    stack: DevStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store admits server.max_streams_per_identity streams per SPIFFE ID, and every
    inference replica has the one inference ID: a fleet downloading at once (or one replica's
    multi-part load) meets RESOURCE_EXHAUSTED TOO_MANY_STREAMS_PER_IDENTITY, "retry later", and
    the load failed for good as if the artifact were refused. It is retried now."""
    stack.create_release_key(stack.identity("admin"), "streams", policy_version="1")
    # Large enough that its download waits on flow control and holds its stream open.
    large = tmp_path / "large.bin"
    large.write_bytes(os.urandom(32 * 1024 * 1024))
    _publish_files(stack, "streams", {"held": large, "wanted": train(tmp_path / "m.onnx").path})
    _stop(stack, "modelstore", "inference")
    stack.start_in_process("modelstore", server={"max_streams_per_identity": 1})
    inference = stack.start_in_process("inference").handle
    held_channel = stack.channel(stack.identity("inference"), "modelstore")
    download = pb_grpc.ModelStoreServiceStub(held_channel).GetModel(
        pb.GetModelRequest(name="held", version="1"), timeout=60
    )
    try:
        next(download)  # the stream is open, and counts against the inference identity
        backed_off: list[float] = []

        def back_off(seconds: float) -> None:
            backed_off.append(seconds)
            download.cancel()  # the other download ends: the identity has a stream again

        with caplog.at_level(logging.WARNING, logger="strongroom.inference.loader"):
            inference.loader.load_with_retry("wanted", "1", within=60, sleep=back_off)
        retried = [
            getattr(r, "reason", None)
            for r in caplog.records
            if r.name == "strongroom.inference.loader" and "retrying" in r.message
        ]
        assert retried and set(retried) == {"TOO_MANY_STREAMS_PER_IDENTITY"}
        assert inference.repository.is_ready("wanted", "1")
    finally:
        download.cancel()
        held_channel.close()
        for service in ("inference", "modelstore"):
            stack.services.pop(service).stop()
        stack.start_in_process("modelstore")  # as the module's other tests expect them
        stack.start_in_process("inference")


def _publish_files(stack: DevStack, key_id: str, files: dict[str, Path]) -> None:
    """Publishes each file as version 1 of its name, under ``key_id``, as the publisher."""
    publisher = stack.identity("publisher")
    for name, path in files.items():
        publish_model(
            path,
            name=name,
            version="1",
            key_id=key_id,
            broker=stack.channel(publisher, "keybroker"),
            store=stack.channel(publisher, "modelstore"),
        )


def _stop(stack: DevStack, *services: str) -> None:
    """Stops these services of the stack, if running (a test then starts its own)."""
    for service in services:
        earlier = stack.services.pop(service, None)
        if earlier is not None:
            earlier.stop()


@contextlib.contextmanager
def _one_grant_each(
    stack: DevStack, tmp_path: Path, key: str, models: tuple[str, str], rate: float
) -> Iterator[Any]:
    """An inference server (its handle) beside a broker granting each certificate one release
    at once, then ``rate`` a second, with ``models`` published under release key ``key``; the
    module's usual broker is back afterwards."""
    stack.create_release_key(stack.identity("admin"), key, policy_version="1")
    model = train(tmp_path / "m.onnx").path
    _publish_files(stack, key, dict.fromkeys(models, model))
    _stop(stack, "keybroker", "inference")
    budget = {"release_budget_certificate_burst": 1, "release_budget_certificate_rate": rate}
    stack.start_in_process("keybroker", {**stack.default_section("keybroker"), **budget})
    try:
        yield stack.start_in_process("inference").handle
    finally:
        _stop(stack, "inference", "keybroker")
        stack.start_in_process("keybroker")  # as the module's other tests expect it


def test_a_load_refused_by_the_broker_names_the_reason_once(
    stack: DevStack, tmp_path: Path
) -> None:
    """The broker's message begins with its reason ("RELEASES_RATE_LIMITED: more than ..."), and
    the loader's error printed its own reason before it: "RELEASES_RATE_LIMITED: key release:
    RELEASES_RATE_LIMITED: more than ...". The peer's words are kept, its reason said once."""
    # One grant per certificate, the next in 1,000 s: the second load's release is refused.
    with _one_grant_each(
        stack, tmp_path, "once", ("once-first", "once-second"), 0.001
    ) as inference:
        inference.loader.load("once-first", "1")
        with pytest.raises(ResourceExhausted) as info:
            inference.loader.load("once-second", "1")
        assert str(info.value) == (
            "RELEASES_RATE_LIMITED: key release: more than 1 key releases granted at once, or "
            "more than 0.001 a second after that, to this certificate; retry later"
        )


def test_a_load_refused_past_its_certificates_release_budget_is_retried(
    stack: DevStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker grants each caller certificate a burst of releases, then one each so often
    (keybroker.release_budget_certificate_*): a replica's LoadModel past its burst was refused
    RESOURCE_EXHAUSTED RELEASES_RATE_LIMITED and failed at once, although a grant came back
    within the retry window. It is retried with the busy refusals' back-off now; a refused
    release takes no grant, so the retries cannot spend the budget they wait for."""
    # One grant per certificate at once, then one each 4 s: the first load spends it, and the
    # second's release is refused until it is back, well within the 60 s given to its retries
    # (the first load, a small model, ends well within the 4 s: its grant is not back before).
    with _one_grant_each(stack, tmp_path, "granted", ("first", "second"), 0.25) as inference:
        inference.loader.load("first", "1")
        with caplog.at_level(logging.WARNING, logger="strongroom.inference.loader"):
            inference.loader.load_with_retry("second", "1", within=60)
        retried = [
            getattr(r, "reason", None)
            for r in caplog.records
            if r.name == "strongroom.inference.loader" and "retrying" in r.message
        ]
        assert retried and set(retried) == {"RELEASES_RATE_LIMITED"}
        assert inference.repository.is_ready("second", "1")
