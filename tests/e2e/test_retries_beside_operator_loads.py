"""A configured model's retries beside an operator's LoadModel and ModelMetadata of the same model."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.artifact.stream import BufferedStreamDecryptor
from strongroom.client.cancel import CallScope
from strongroom.dev.devstack import DevStack
from strongroom.inference.autoload import ConfiguredLoads
from strongroom.inference.loader import ModelBusy, ModelLock
from strongroom.inference.models import ModelState, ModelUnloaded
from strongroom.inference.server import InferenceServer
from tests.e2e.publishing import publish
from tests.e2e.stalling import StallOnce
from tests.e2e.test_configured_retries import (
    OTHER_MEASUREMENT,
    _failed_with,
    _released,
    _set_policy,
    _start,
)
from tests.e2e.test_resilience import wait_until


class PlaintextBuffers:
    """Counts the decrypted-model buffers alive at once in this process: from their allocation
    (:class:`BufferedStreamDecryptor`'s) until they are wiped (a load done) or dropped (failed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live = 0
        self.most = 0
        self.allocated = 0
        self._guard = threading.Lock()
        allocate = BufferedStreamDecryptor._allocate
        wipe_output = BufferedStreamDecryptor.wipe_output
        on_fail = BufferedStreamDecryptor._on_fail
        counter = self

        def counted_allocate(decryptor: Any, size: int) -> None:
            allocate(decryptor, size)
            with counter._guard:
                counter.live += 1
                counter.allocated += 1
                counter.most = max(counter.most, counter.live)
            decryptor._counted = True

        def release(decryptor: Any) -> None:
            if getattr(decryptor, "_counted", False):
                decryptor._counted = False
                with counter._guard:
                    counter.live -= 1

        def counted_wipe_output(decryptor: Any) -> None:
            wipe_output(decryptor)
            release(decryptor)

        def counted_on_fail(decryptor: Any) -> None:
            on_fail(decryptor)
            release(decryptor)

        monkeypatch.setattr(BufferedStreamDecryptor, "_allocate", counted_allocate)
        monkeypatch.setattr(BufferedStreamDecryptor, "wipe_output", counted_wipe_output)
        monkeypatch.setattr(BufferedStreamDecryptor, "_on_fail", counted_on_fail)


def test_an_operators_load_beside_a_retrys_holds_one_plaintext_buffer_at_most(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured retry is downloading the model (its plaintext buffer allocated, its key
    released) when an operator's LoadModel of the same model arrives: the two loads never hold
    a plaintext buffer each at once (2 GB each for the largest model, which the pod's memory
    limit does not plan for). Loads of one model name take its lock (ModelLoader): the
    LoadModel waits for the retry's load to end, then loads; with the lock taken per load
    instead, this test sees two buffers at once."""
    stack.create_release_key(stack.identity("admin"), "twice", policy_version="1")
    buffers = PlaintextBuffers(monkeypatch)
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "1")
    monkeypatch.setattr(storage, "open", stall)
    inference = _start(stack, "twice")
    inference.load_configured_models()
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    with ThreadPoolExecutor(1) as pool:
        try:
            assert wait_until(lambda: _failed_with(inference, "twice") == "MODEL_NOT_FOUND", 30)
            publish(stack, model_path, "twice", "twice")
            assert stall.stalled.wait(30)  # the store has sent all but the artifact's end
            assert wait_until(lambda: buffers.live == 1, 30)  # the retry holds its buffer
            answer: Future[Any] = pool.submit(
                control.LoadModel,
                control_pb.LoadModelRequest(name="twice", version="1"),
                timeout=60,
            )
            # It waits for the retry's load (or, were they not exclusive, has begun its own).
            assert wait_until(
                lambda: inference.loader.queued("twice") == ("1",) or buffers.allocated > 1, 30
            )
        finally:
            stall.go_on.set()
        answer.result(60)
    assert inference.repository.is_ready("twice", "1")
    assert buffers.allocated == 2  # the retry's load, then the LoadModel's own
    assert buffers.most == 1


def test_a_retry_under_way_still_shows_the_failure_it_retries(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a configured model's retry was loading it, ModelMetadata said only that it was
    still loading: the failure being retried (here: not yet published) could not be seen."""
    stack.create_release_key(stack.identity("admin"), "watched", policy_version="1")
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "1")
    monkeypatch.setattr(storage, "open", stall)
    inference = _start(stack, "watched")
    oip = oip_grpc.GRPCInferenceServiceStub(stack.channel(stack.identity("client"), "inference"))
    inference.load_configured_models()
    try:
        assert wait_until(lambda: _failed_with(inference, "watched") == "MODEL_NOT_FOUND", 30)
        publish(stack, model_path, "watched", "watched")
        assert stall.stalled.wait(30)  # the retry is loading it
        assert inference.repository.version_state("watched", "1") is ModelState.LOADING
        for version in ("", "1"):
            with pytest.raises(grpc.RpcError) as info:
                oip.ModelMetadata(
                    oip_pb.ModelMetadataRequest(name="watched", version=version), timeout=30
                )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "loading again after its last load failed (MODEL_NOT_FOUND)" in str(
                info.value.details()
            )
        ready = oip.ModelReady(oip_pb.ModelReadyRequest(name="watched"), timeout=30)
        assert not ready.ready
    finally:
        stall.go_on.set()
    assert wait_until(lambda: inference.repository.is_ready("watched", "1"), 30)
    oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="watched"), timeout=30)


class _FirstAttempts:
    """Tells a configured model's retries (ModelLoader.load with ``retry_of``, after the first
    such call for its version) from its first attempt and from an operator's LoadModel."""

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()

    def passes(self, *args: Any, **kwargs: Any) -> bool:
        """Whether this call to ModelLoader.load is not a retry."""
        if kwargs.get("retry_of") is None:
            return True
        if args[:2] in self._seen:
            return False
        self._seen.add(args[:2])
        return True


class HeldRetries:
    """Holds each configured retry until :attr:`go_on` is set: at the start of its attempt
    (``at="attempt"``: before it looks at the version's state), or at the start of its load
    (``at="load"``: it has found the version failed, and not yet asked again once registered;
    :attr:`busy` counts those that then found another load holding the model's lock)."""

    def __init__(
        self, inference: InferenceServer, monkeypatch: pytest.MonkeyPatch, *, at: str
    ) -> None:
        self.reached = threading.Event()
        self.go_on = threading.Event()
        self.busy = 0  # (``at="load"``) retries that found the model's lock taken
        if at == "load":
            load = inference.loader.load
            first = _FirstAttempts()

            def held_load(*args: Any, **kwargs: Any) -> Any:
                if first.passes(*args, **kwargs):
                    return load(*args, **kwargs)
                self._hold()
                try:
                    return load(*args, **kwargs)
                except ModelBusy:
                    self.busy += 1
                    raise

            monkeypatch.setattr(inference.loader, "load", held_load)
        else:
            attempt = ConfiguredLoads._attempt

            def held_attempt(loads: ConfiguredLoads, version: Any) -> bool:
                if version.tried:
                    self._hold()
                return attempt(loads, version)

            monkeypatch.setattr(ConfiguredLoads, "_attempt", held_attempt)

    def _hold(self) -> None:
        self.reached.set()
        self.go_on.wait(60)


def _denied(stack: DevStack, model_path: Path, name: str) -> InferenceServer:
    """A server configured with ``name``, published but denied by its key's policy (its loads
    fail MEASUREMENT_NOT_ALLOWED until :func:`_allow`); its configured loads not started."""
    stack.create_release_key(stack.identity("admin"), name, policy_version="1")
    publish(stack, model_path, name, name)
    _set_policy(stack, name, stack.simulated_policy("2", measurement=OTHER_MEASUREMENT))
    return _start(stack, name)


def _allow(stack: DevStack, name: str) -> None:
    _set_policy(stack, name, stack.simulated_policy("3"))


def _refused_loadmodel(answer: Future[Any]) -> None:
    """``answer`` (a LoadModel's) was the broker's denial."""
    with pytest.raises(grpc.RpcError) as refused:
        answer.result(60)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "MEASUREMENT_NOT_ALLOWED" in str(refused.value.details())


@contextlib.contextmanager
def _loadmodel_meanwhile(
    stack: DevStack, held: HeldRetries, monkeypatch: pytest.MonkeyPatch, name: str, stalled: str
) -> Iterator[Callable[[str], Future[Any]]]:
    """Yields ``begin(version)``: it starts an operator's LoadModel of ``name`` ``version``, waits
    until the store's download of version ``stalled`` is held (the LoadModel is loading), then lets
    the held retry go on, and returns the LoadModel's answer. Leaving the block lets the retry and
    the download go on (whatever failed meanwhile) and waits for the LoadModel."""
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, stalled)
    with ThreadPoolExecutor(1) as pool:

        def begin(version: str) -> Future[Any]:
            monkeypatch.setattr(storage, "open", stall)
            answer = pool.submit(
                control.LoadModel,
                control_pb.LoadModelRequest(name=name, version=version),
                timeout=60,
            )
            assert stall.stalled.wait(30)  # the LoadModel is loading it
            held.go_on.set()  # the retry comes meanwhile
            return answer

        try:
            yield begin
        finally:
            held.go_on.set()
            stall.go_on.set()


def test_a_retry_that_finds_a_loadmodel_under_way_waits_for_its_outcome(
    stack: DevStack,
    model_path: Path,
    stopped: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A configured model's retry came while an operator's LoadModel of it was loading (the
    version LOADING) and took that for "loaded by an operator": its retries ended, and when the
    LoadModel then failed (the broker's policy still denied it) the model stayed unloaded, the
    server unready, for good, policy fixed or not. The configuration still lists the version and
    the server is not ready without it: the retry now looks again later (without waiting for
    the model's lock: one thread runs every configured model's retries), goes on since the
    LoadModel failed, and loads the model once the policy is fixed."""
    inference = _denied(stack, model_path, "overruled")
    held = HeldRetries(inference, monkeypatch, at="attempt")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference.autoload")
    inference.load_configured_models()
    (loader_thread,) = inference._threads

    def postponed() -> int:
        return len([r for r in caplog.records if "is being loaded by another" in r.getMessage()])

    with _loadmodel_meanwhile(stack, held, monkeypatch, "overruled", "1") as begin:
        assert held.reached.wait(30)  # the first load failed; its retry is held
        assert _failed_with(inference, "overruled") == "MEASUREMENT_NOT_ALLOWED"
        answer = begin("1")
        assert wait_until(lambda: postponed() >= 2 or not loader_thread.is_alive(), 30)
        assert loader_thread.is_alive(), "the retries ended"
        assert inference.loader.queued("overruled") == ()  # not waiting for the lock
    _refused_loadmodel(answer)
    _allow(stack, "overruled")
    assert wait_until(lambda: inference.repository.is_ready("overruled", "1"), 30), (
        inference.repository.status("overruled")
    )


def test_a_retry_finding_a_loadmodel_begun_since_it_looked_goes_on_only_if_that_failed(
    stack: DevStack,
    model_path: Path,
    stopped: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same race a step later: the retry had found the version failed, and the LoadModel
    began before the retry registered its load. It asked once registered (LOADING: the retries
    ended, as above); it now finds the model's lock taken, looks again later (not waiting for
    the lock, as above), and goes on since the LoadModel failed. Finding the lock taken is not
    a failed attempt: neither logged nor counted as one, nor a step of its back-off."""
    inference = _denied(stack, model_path, "overruled2")
    caplog.set_level(logging.DEBUG, logger="strongroom.inference.autoload")
    held = HeldRetries(inference, monkeypatch, at="load")
    inference.load_configured_models()
    (loader_thread,) = inference._threads
    with _loadmodel_meanwhile(stack, held, monkeypatch, "overruled2", "1") as begin:
        assert held.reached.wait(30)
        assert _failed_with(inference, "overruled2") == "MEASUREMENT_NOT_ALLOWED"
        answer = begin("1")
        assert wait_until(lambda: held.busy >= 1 or not loader_thread.is_alive(), 30)
        assert loader_thread.is_alive(), "the retries ended"
        assert inference.loader.queued("overruled2") == ()  # not waiting for the lock
        assert not [r for r in caplog.records if "MODEL_LOAD_IN_PROGRESS" in r.getMessage()]
    _refused_loadmodel(answer)
    _allow(stack, "overruled2")
    assert wait_until(lambda: inference.repository.is_ready("overruled2", "1"), 30), (
        inference.repository.status("overruled2")
    )


def test_a_retry_finding_a_loadmodel_begun_since_it_looked_that_loads_the_version_ends(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its other outcome: the LoadModel the retry found under way loaded the version, so the
    retry ends without a load of its own (a second download, key release and plaintext buffer
    of a version already serving)."""
    stack.create_release_key(stack.identity("admin"), "taken", policy_version="1")
    inference = _start(stack, "taken")
    held = HeldRetries(inference, monkeypatch, at="load")
    buffers = PlaintextBuffers(monkeypatch)
    inference.load_configured_models()
    (loader_thread,) = inference._threads
    with _loadmodel_meanwhile(stack, held, monkeypatch, "taken", "1") as begin:
        assert held.reached.wait(30)
        assert _failed_with(inference, "taken") == "MODEL_NOT_FOUND"
        publish(stack, model_path, "taken", "taken")
        answer = begin("1")
        assert wait_until(lambda: held.busy >= 1, 30)
    answer.result(60)
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert inference.repository.is_ready("taken", "1")
    assert buffers.allocated == 1


def test_a_retry_behind_a_loadmodel_of_an_unlisted_version_ends_without_loading(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry of the configured version 1 had found it failed when an operator's LoadModel of
    version 2, which the configuration does not list, began. Once that LoadModel has loaded
    version 2 the retry ends without a load: loading version 1 then would make it the model's
    default again (the operator's requests moved back to it) for a second download, key release
    and plaintext buffer of the model."""
    stack.create_release_key(stack.identity("admin"), "moved2", policy_version="1")
    publish(stack, model_path, "moved2", "moved2", version="2")
    inference = _start(stack, "moved2")
    held = HeldRetries(inference, monkeypatch, at="load")
    buffers = PlaintextBuffers(monkeypatch)
    inference.load_configured_models()
    (loader_thread,) = inference._threads
    with _loadmodel_meanwhile(stack, held, monkeypatch, "moved2", "2") as begin:
        assert held.reached.wait(30)  # its retry found version 1 failed
        assert _failed_with(inference, "moved2") == "MODEL_NOT_FOUND"
        publish(stack, model_path, "moved2", "moved2")  # version 1 would load now
        answer = begin("2")
        assert wait_until(lambda: held.busy >= 1, 30)  # it found the lock taken
    answer.result(60)
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert inference.repository.status("moved2").default_version == "2"
    assert inference.repository.version_state("moved2", "1") is not ModelState.READY
    assert buffers.allocated == 1


def test_a_retry_does_not_wait_for_another_load_of_its_model(
    stack: DevStack,
    model_path: Path,
    stopped: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One thread runs every configured model's retries. A retry of a model that an operator's
    LoadModel (here of another version) was loading waited for that model's lock, for as long
    as that load took (up to the load timeout, 10 minutes): every other configured model's
    retries waited with it, a model published meanwhile unloaded and the server unready. The
    retry now looks again later, and the other models' retries go on meanwhile; each look is
    no more than that (no StatModel, no download), however long the other load takes."""
    for name in ("busy", "free"):
        stack.create_release_key(stack.identity("admin"), name, policy_version="1")
    publish(stack, model_path, "busy", "busy", version="2")
    inference = _start(stack, "busy", "free")
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    caplog.set_level(logging.DEBUG, logger="strongroom.inference.autoload")
    stat = inference.loader.stat
    stats: list[str] = []

    def counted_stat(name: str, version: str, **kwargs: Any) -> Any:
        stats.append(name)
        return stat(name, version, **kwargs)

    monkeypatch.setattr(inference.loader, "stat", counted_stat)
    inference.load_configured_models()

    def postponed() -> int:
        return len([r for r in caplog.records if "busy/1 is being loaded by" in r.getMessage()])

    with ThreadPoolExecutor(1) as pool:
        storage = stack.services["modelstore"].handle.storage
        stall = StallOnce(storage, "2")
        try:
            assert wait_until(lambda: _failed_with(inference, "busy") == "MODEL_NOT_FOUND", 30)
            assert wait_until(lambda: _failed_with(inference, "free") == "MODEL_NOT_FOUND", 30)
            monkeypatch.setattr(storage, "open", stall)
            answer: Future[Any] = pool.submit(
                control.LoadModel,
                control_pb.LoadModelRequest(name="busy", version="2"),
                timeout=60,
            )
            assert stall.stalled.wait(30)  # the LoadModel holds the model's lock
            # The retry of busy/1 has come meanwhile (waiting for the lock, or postponed).
            assert wait_until(lambda: inference.loader.queued("busy") == ("1",) or postponed(), 30)
            publish(stack, model_path, "free", "free")
            assert wait_until(lambda: inference.repository.is_ready("free", "1"), 30), (
                "the other model's retries waited for the LoadModel"
            )
            looked, asked = postponed(), stats.count("busy")
            assert wait_until(lambda: postponed() >= looked + 3, 30)
            assert stats.count("busy") <= asked + 1  # one at most, already under way
        finally:
            stall.go_on.set()
        answer.result(60)
    assert inference.repository.status("busy").default_version == "2"


@pytest.mark.parametrize("at", ["attempt", "load"])
def test_an_unload_while_a_retry_waits_out_a_loadmodel_ends_the_retries(
    stack: DevStack,
    model_path: Path,
    stopped: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    at: str,
) -> None:
    """A retry that found an operator's LoadModel of its version under way (at its first look,
    or once it had registered its load) looks again later; an UnloadModel meanwhile stops the
    LoadModel, and the retry, which no longer finds the version failed, ends: the model is not
    loaded again behind the operator's back once the broker's policy allows it."""
    name = f"dropped-{at}"
    inference = _denied(stack, model_path, name)
    held = HeldRetries(inference, monkeypatch, at=at)
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    caplog.set_level(logging.DEBUG, logger="strongroom.inference.autoload")
    inference.load_configured_models()
    (loader_thread,) = inference._threads

    def postponed() -> int:
        return len([r for r in caplog.records if "is being loaded by another" in r.getMessage()])

    with _loadmodel_meanwhile(stack, held, monkeypatch, name, "1") as begin:
        assert held.reached.wait(30)
        assert _failed_with(inference, name) == "MEASUREMENT_NOT_ALLOWED"
        answer = begin("1")
        assert wait_until(lambda: postponed() >= 1, 30)
        control.UnloadModel(control_pb.UnloadModelRequest(name=name, version="1"), timeout=30)
        with pytest.raises(grpc.RpcError) as stopped_load:
            answer.result(60)
        assert "MODEL_UNLOADED" in str(stopped_load.value.details())
        _allow(stack, name)
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert inference.repository.version_state(name, "1") is None
    assert not inference.repository.is_ready(name)


def test_a_retry_whose_model_an_operator_loaded_before_it_took_the_lock_ends(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest window: the retry of the configured version 1 has registered its load and
    found the version still failed, and before it takes the model's lock (free then) an
    operator's LoadModel of version 2, which the configuration does not list, runs whole. The
    retry asks again once it holds the lock, and ends without loading version 1 (which would
    make it the default again, for a second plaintext buffer of the model)."""
    stack.create_release_key(stack.identity("admin"), "between", policy_version="1")
    publish(stack, model_path, "between", "between", version="2")
    inference = _start(stack, "between")
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    asked = threading.Event()
    go_on = threading.Event()
    load = inference.loader.load
    first = _FirstAttempts()

    def held_after_first_question(*args: Any, **kwargs: Any) -> Any:
        if first.passes(*args, **kwargs):
            return load(*args, **kwargs)
        retry_of = kwargs["retry_of"]
        questions = 0

        def asking() -> bool:
            nonlocal questions
            questions += 1
            answer = bool(retry_of())
            if questions == 1 and answer:
                asked.set()
                go_on.wait(60)
            return answer

        return load(*args, **{**kwargs, "retry_of": asking})

    monkeypatch.setattr(inference.loader, "load", held_after_first_question)
    buffers = PlaintextBuffers(monkeypatch)
    inference.load_configured_models()
    (loader_thread,) = inference._threads
    try:
        assert wait_until(lambda: _failed_with(inference, "between") == "MODEL_NOT_FOUND", 30)
        publish(stack, model_path, "between", "between")  # version 1 would load now
        assert asked.wait(30)  # registered, found failed, the lock not yet taken
        control.LoadModel(control_pb.LoadModelRequest(name="between", version="2"), timeout=60)
    finally:
        go_on.set()
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert inference.repository.status("between").default_version == "2"
    assert inference.repository.version_state("between", "1") is not ModelState.READY
    assert buffers.allocated == 1


class Downloads:
    """Counts the model store's downloads (its storage's opens, one per GetModel) by name."""

    def __init__(self, stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
        storage = stack.services["modelstore"].handle.storage
        self.names: list[str] = []
        open_artifact = storage.open

        def counted(name: str, version: str, **kwargs: Any) -> Any:
            self.names.append(name)
            return open_artifact(name, version, **kwargs)

        monkeypatch.setattr(storage, "open", counted)


def test_a_first_attempt_beside_a_loadmodel_of_its_version_does_not_load_it_again(
    stack: DevStack,
    model_path: Path,
    stopped: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A configured model's first attempt came while an operator's LoadModel of the same version
    was downloading it: it waited for the model's lock, then loaded the version the LoadModel
    had just loaded a second time (a second download, and a second key release the broker
    granted). It now looks again later, as a retry does, and ends once it finds the version
    loaded: one download, one release."""
    stack.create_release_key(stack.identity("admin"), "firstlook", policy_version="1")
    publish(stack, model_path, "firstlook", "firstlook")
    downloads = Downloads(stack, monkeypatch)
    inference = _start(stack, "firstlook")
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    caplog.set_level(logging.DEBUG, logger="strongroom.inference.autoload")
    storage = stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "1")
    monkeypatch.setattr(storage, "open", stall)

    def postponed() -> bool:
        return any("firstlook/1 is being loaded by" in r.getMessage() for r in caplog.records)

    with ThreadPoolExecutor(1) as pool:
        try:
            answer: Future[Any] = pool.submit(
                control.LoadModel,
                control_pb.LoadModelRequest(name="firstlook", version="1"),
                timeout=60,
            )
            assert stall.stalled.wait(30)  # the LoadModel is downloading it
            inference.load_configured_models()
            # The first attempt has come: waiting for the model's lock, or postponed.
            assert wait_until(
                lambda: inference.loader.queued("firstlook") == ("1",) or postponed(), 30
            )
        finally:
            stall.go_on.set()
        answer.result(60)
    (loader_thread,) = inference._threads
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert inference.repository.is_ready("firstlook", "1")
    assert downloads.names.count("firstlook") == 1
    assert _released(stack, "firstlook") == 1


def test_an_unload_then_a_failed_loadmodel_does_not_bring_the_retries_back(
    stack: DevStack, model_path: Path, stopped: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator unloaded a configured model whose retries waited (the broker's policy
    denied it), then tried a LoadModel of it, which the policy still denied: the version was
    listed FAILED again, the retry took that for its own failure and went on, and loaded the
    model behind the operator's back once the policy allowed it. An explicit unload now ends
    the retries for good; only an explicit LoadModel loads the version again."""
    inference = _denied(stack, model_path, "unloaded")
    downloads = Downloads(stack, monkeypatch)
    held = HeldRetries(inference, monkeypatch, at="attempt")
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    inference.load_configured_models()
    (loader_thread,) = inference._threads
    try:
        assert held.reached.wait(30)  # the first load failed; its retry is held
        assert _failed_with(inference, "unloaded") == "MEASUREMENT_NOT_ALLOWED"
        control.UnloadModel(control_pb.UnloadModelRequest(name="unloaded", version="1"), timeout=30)
        with ThreadPoolExecutor(1) as pool:
            _refused_loadmodel(
                pool.submit(
                    control.LoadModel,
                    control_pb.LoadModelRequest(name="unloaded", version="1"),
                    timeout=60,
                )
            )
        assert _failed_with(inference, "unloaded") == "MEASUREMENT_NOT_ALLOWED"
        _allow(stack, "unloaded")
        loaded_before = downloads.names.count("unloaded")
    finally:
        held.go_on.set()
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert not inference.repository.is_ready("unloaded")
    assert _released(stack, "unloaded") == 0
    assert downloads.names.count("unloaded") == loaded_before
    # The operator's own LoadModel still loads it.
    control.LoadModel(control_pb.LoadModelRequest(name="unloaded", version="1"), timeout=60)
    assert inference.repository.is_ready("unloaded", "1")
    assert _released(stack, "unloaded") == 1


def test_an_unload_then_a_failed_loadmodel_during_a_back_off_ends_the_loadmodels_retry(
    stack: DevStack, model_path: Path, stopped: None
) -> None:
    """A LoadModel's retry asked only whether its version was listed at all: an UnloadModel
    during its back-off followed by another LoadModel of the version that failed listed it
    FAILED again, and the first LoadModel's retry took that for its own failure and loaded the
    version behind the operator's unload (a key release the broker granted). The unload now
    ends that retry whatever came after it."""
    stack.create_release_key(stack.identity("admin"), "relisted", policy_version="1")
    publish(stack, model_path, "relisted", "relisted")
    inference = _start(stack)
    repository = inference.repository
    control = control_grpc.ModelControlServiceStub(
        stack.channel(stack.identity("admin"), "inference")
    )
    refused: list[grpc.StatusCode] = []

    def back_off(seconds: float) -> None:
        if refused:
            return
        # The operator unloads the version while this LoadModel waits, tries another LoadModel
        # of it, which fails (the broker is still down), then the broker comes back.
        control.UnloadModel(control_pb.UnloadModelRequest(name="relisted", version="1"))
        with pytest.raises(grpc.RpcError) as info:
            control.LoadModel(control_pb.LoadModelRequest(name="relisted", version="1"), timeout=3)
        refused.append(info.value.code())
        assert repository.version_state("relisted", "1") is ModelState.FAILED
        stack.start_in_process("keybroker")

    stack.services.pop("keybroker").stop()
    try:
        with pytest.raises(ModelUnloaded):
            inference.loader.load_with_retry("relisted", "1", within=60, sleep=back_off)
    finally:
        if "keybroker" not in stack.services:
            stack.start_in_process("keybroker")
    assert refused == [grpc.StatusCode.UNAVAILABLE]
    assert not repository.is_ready("relisted")
    assert _released(stack, "relisted") == 0


def test_a_configured_retry_gives_way_to_a_loadmodel_in_its_back_off(
    stack: DevStack, model_path: Path, stopped: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A configured model's retry gave way to a LoadModel of the model only while that call was
    inside a load: during the LoadModel's back-off (the broker briefly unreachable for both) it
    took the free lock and loaded the version, and the LoadModel's next attempt then loaded it
    again (a second download and a second key release the broker granted). The retry now looks
    again later while a LoadModel of the model is retrying, and ends once that one loaded it."""
    stack.create_release_key(stack.identity("admin"), "backoff", policy_version="1")
    publish(stack, model_path, "backoff", "backoff")
    inference = _start(stack, "backoff")
    inference.retry_initial = 0.1
    caplog.set_level(logging.DEBUG, logger="strongroom.inference.autoload")
    repository = inference.repository

    def postponed() -> int:
        return sum("backoff/1 is being loaded by" in r.getMessage() for r in caplog.records)

    def back_off(seconds: float) -> None:
        if "keybroker" in stack.services:
            return
        # The broker comes back during the LoadModel's back-off: the configured retry comes
        # before the LoadModel's next attempt.
        before = postponed()
        stack.start_in_process("keybroker")
        assert wait_until(lambda: postponed() > before or repository.is_ready("backoff", "1"), 30)

    stack.services.pop("keybroker").stop()
    try:
        inference.load_configured_models()
        assert wait_until(lambda: _failed_with(inference, "backoff") is not None, 30)
        inference.loader.load_with_retry("backoff", "1", within=60, sleep=back_off)
    finally:
        if "keybroker" not in stack.services:
            stack.start_in_process("keybroker")
    (loader_thread,) = inference._threads
    assert wait_until(lambda: not loader_thread.is_alive(), 30)
    assert repository.is_ready("backoff", "1")
    assert _released(stack, "backoff") == 1


def test_a_configured_load_gives_way_to_a_load_about_to_take_the_lock() -> None:
    """A configured model's load (which does not wait for the model's lock) took the lock from
    under an operator's LoadModel that had registered and not yet taken it: the LoadModel then
    waited for that load and loaded the version again (an explicit load reloads: README
    "Faults"), a second download and key release. It now gives way (ModelBusy, looked at
    again later), and the LoadModel takes the lock."""
    lock = ModelLock()
    operator = lock.enter("1")
    configured = lock.enter("1")
    assert not lock.acquire(CallScope(), configured, wait=False)
    assert lock.acquire(CallScope(), operator)
    lock.release()
    operator.leave()
    assert lock.acquire(CallScope(), configured, wait=False)  # once nothing else waits
