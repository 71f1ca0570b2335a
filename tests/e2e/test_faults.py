"""Issue 12: key release and model loading under faults (real step-ca, mTLS, SoftHSM2).

- Finding 3: the caller's certificate renews in the middle of a release.
- Finding 5: the broker's nonce key rotates while a challenge is outstanding.
- Finding 6: stored-data corruption reaches LoadModel callers as DATA_LOSS with the store's reason.
- Finding 7: an on-demand LoadModel rides out a key broker that is briefly unavailable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.attesters import EvidenceBundle, SimulatedAttester, TeeType
from strongroom.client.cancel import CallScope
from strongroom.client.keyrelease import KeyReleaseClient, PinnedChannels
from strongroom.client.publish import publish_model
from strongroom.client.remote import peer_reason
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.dev.devstack.model import train
from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import Cancelled, DataLoss, NotFound
from strongroom.inference.control import ModelControlServicer
from strongroom.inference.loader import ModelLoader
from strongroom.inference.models import ModelRepository, ModelState
from strongroom.modelstore import _filesystem
from strongroom.pki import WorkloadIdentity
from tests.e2e.stalling import StallOnce
from tests.e2e.storepeer import store_peer
from tests.keybroker.helpers import bound, data_key_request

KEY = "faults"


class HookedAttester:
    """The simulated TEE, with something happening while the hardware signs (once)."""

    def __init__(self, inner: SimulatedAttester, hook: Callable[[], object] | None = None) -> None:
        self._inner = inner
        self._hook = hook
        self.calls = 0

    @property
    def tee_type(self) -> TeeType:
        return self._inner.tee_type

    def attest(self, report_data: bytes) -> EvidenceBundle:
        self.calls += 1
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return self._inner.attest(report_data)


@dataclasses.dataclass
class Env:
    stack: DevStack
    admin: WorkloadIdentity
    publisher: WorkloadIdentity
    authority: SimulatedAuthority
    data_key: bytes
    wrapped: bytes
    version: int

    def attester(self, hook: Callable[[], object] | None = None) -> HookedAttester:
        inner = SimulatedAttester(
            self.authority.snp(),
            TeeType.SEV_SNP,
            production=False,
            claims={"measurement": bytes.fromhex(DEMO_MEASUREMENT)},
        )
        return HookedAttester(inner, hook)

    def audit(self) -> list[dict[str, Any]]:
        path = self.stack.root / "state" / "keybroker" / "audit.log"
        return read_audit_records(path)


@pytest.fixture(scope="module")
def env(stack: DevStack) -> Iterator[Env]:
    admin, publisher = stack.identity("admin"), stack.identity("publisher")
    stack.create_release_key(admin, KEY, policy_version="faults-1")
    broker = pb_grpc.KeyBrokerServiceStub(stack.channel(publisher, "keybroker"))
    generated = broker.GenerateDataKey(data_key_request(KEY), timeout=30)
    yield Env(
        stack,
        admin,
        publisher,
        SimulatedAuthority.load(stack.root / "simulated-tee"),
        generated.data_key,
        generated.wrapped_data_key,
        generated.key_version,
    )


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _decisions_since(env: Env, count: int) -> list[tuple[str, str]]:
    return [
        (r["decision"], r["reason"]) for r in env.audit()[count:] if r["action"] == "key_release"
    ]


# --- finding 3: renewal during a release --------------------------------------------------


def test_renewal_during_a_release_with_pinned_channels(env: Env) -> None:
    """Bind and send with one credential snapshot: a renewal mid-exchange changes nothing."""
    inference = env.stack.identity("inference")
    channels = PinnedChannels(inference, env.stack.address("keybroker"), server_name="keybroker")
    before = inference.generation
    attester = env.attester(hook=inference.renew_now)
    client = KeyReleaseClient(channels, attester, verifier=env.stack.release_verifier())
    start = len(env.audit())
    try:
        released = client.release(KEY, env.version, env.wrapped)
        assert inference.generation == before + 1
        assert bound(released.dek) == env.data_key
        assert attester.calls == 1  # no retry was needed
        assert _decisions_since(env, start) == [("allowed", "RELEASED")]
        # The next release uses the renewed certificate; the old channel was closed once idle.
        client.release(KEY, env.version, env.wrapped)
        assert channels.open_channels == 1
    finally:
        channels.close()


def test_renewal_during_a_release_on_a_plain_channel_is_retried_once(env: Env) -> None:
    """A caller that reads its TLS key separately loses the race once; one retry cures it."""
    inference = env.stack.identity("inference")
    attester = env.attester(hook=inference.renew_now)
    client = KeyReleaseClient(
        env.stack.channel(inference, "keybroker"),
        attester,
        inference.public_key_der,
        verifier=env.stack.release_verifier(),
    )
    start = len(env.audit())
    released = client.release(KEY, env.version, env.wrapped)
    assert bound(released.dek) == env.data_key
    assert attester.calls == 2
    assert _decisions_since(env, start) == [
        ("denied", "REPORT_DATA_MISMATCH"),
        ("allowed", "RELEASED"),
    ]


def test_other_refusals_are_not_retried(env: Env) -> None:
    inference = env.stack.identity("inference")
    attester = env.attester()
    client = KeyReleaseClient(
        env.stack.channel(inference, "keybroker"),
        attester,
        inference.public_key_der,
        verifier=env.stack.release_verifier(),
    )
    with pytest.raises(grpc.RpcError) as info:
        client.release(KEY, env.version + 99, env.wrapped)
    assert peer_reason(info.value) == "KEY_VERSION_NOT_FOUND"
    assert attester.calls == 1


# --- finding 5: nonce-key rotation ---------------------------------------------------------


def _rotate_nonce_key(stack: DevStack) -> None:
    """What the runbook says: a new nonce key, every broker restarted together."""
    stack.services.pop("keybroker").stop()
    (stack.secrets_dir / "nonce-key").write_bytes(os.urandom(32))
    stack.start_in_process("keybroker")


def test_challenge_issued_under_the_previous_nonce_key_is_retried(env: Env) -> None:
    inference = env.stack.identity("inference")
    attester = env.attester(hook=lambda: _rotate_nonce_key(env.stack))
    channels = PinnedChannels(inference, env.stack.address("keybroker"), server_name="keybroker")
    start = len(env.audit())
    try:
        released = KeyReleaseClient(
            channels, attester, verifier=env.stack.release_verifier()
        ).release(KEY, env.version, env.wrapped)
    finally:
        channels.close()
    assert bound(released.dek) == env.data_key
    assert _decisions_since(env, start) == [("denied", "NONCE_INVALID"), ("allowed", "RELEASED")]


# --- finding 6: stored-data corruption keeps its status ------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("model") / "model.onnx").path


def _stall_download(env: Env, monkeypatch: pytest.MonkeyPatch, version: str) -> StallOnce:
    """The store's next read of ``version``'s blob stalls (until ``go_on``, or 60 s)."""
    storage = env.stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, version)
    monkeypatch.setattr(storage, "open", stall)
    return stall


def _publish(env: Env, path: Path, version: str) -> None:
    publish_model(
        path,
        name="faulty",
        version=version,
        key_id=KEY,
        broker=env.stack.channel(env.publisher, "keybroker"),
        store=env.stack.channel(env.publisher, "modelstore"),
        # One time for every version: a header's encoded length depends on its nanoseconds, and
        # the tests that put one version's bytes in another's place need equal lengths.
        created_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    )


def _blob(env: Env, version: str) -> Path:
    storage = env.stack.services["modelstore"].handle.storage
    record = storage.stat("faulty", version)
    return next(p for p in (storage.root / "blobs").rglob(record.artifact_sha256))


def _loader(
    env: Env, store: grpc.Channel | None = None, repository: ModelRepository | None = None
) -> ModelLoader:
    inference = env.stack.identity("inference")
    channels = PinnedChannels(inference, env.stack.address("keybroker"), server_name="keybroker")
    return ModelLoader(
        repository or ModelRepository(),
        store_channel=store or env.stack.channel(inference, "modelstore"),
        key_release=KeyReleaseClient(
            channels, env.attester(), verifier=env.stack.release_verifier()
        ),
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "BLOB_SIZE_MISMATCH"),
        (lambda p: p.unlink(), "BLOB_MISSING"),
    ],
    ids=["truncated", "missing"],
)
def test_store_data_loss_reaches_the_caller_as_data_loss(
    env: Env, model_path: Path, damage: Callable[[Path], None], reason: str
) -> None:
    _publish(env, model_path, reason.lower())
    blob = _blob(env, reason.lower())
    blob.chmod(0o600)
    damage(blob)
    with pytest.raises(DataLoss) as info:
        _loader(env).load("faulty", reason.lower())
    assert info.value.reason == reason


class _ServeBytes(store_grpc.ModelStoreServiceServicer):
    """A store peer that serves exactly the bytes it is given (here: a damaged artifact)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def StatModel(
        self, request: store_pb.StatModelRequest, context: grpc.ServicerContext
    ) -> store_pb.StatModelResponse:
        info = store_pb.ModelInfo(name=request.name, version=request.version)
        info.content_type = "application/onnx"
        return store_pb.StatModelResponse(model=info)

    def GetModel(
        self, request: store_pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[store_pb.GetModelResponse]:
        for i in range(0, len(self.data), 64 * 1024):
            yield store_pb.GetModelResponse(data=self.data[i : i + 64 * 1024])


@pytest.mark.parametrize(
    ("version", "change"),
    [("cut", lambda b: b[:-40]), ("grown", lambda b: b + b"\0" * 40)],
    ids=["truncated", "extended"],
)
def test_artifact_damaged_in_transit_is_data_loss(
    env: Env, model_path: Path, version: str, change: Callable[[bytes], bytes]
) -> None:
    _publish(env, model_path, version)
    genuine = _blob(env, version).read_bytes()
    with store_peer(_ServeBytes(change(genuine))) as channel, pytest.raises(DataLoss):  # type: ignore[abstract]
        _loader(env, channel).load("faulty", version)


class _StallingStore(_ServeBytes):
    """A store peer that sends all but the last bytes of an artifact (its header among them: the
    load asks for the key) and then nothing until the test lets it go on; it notes when its
    caller ends."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.go_on = threading.Event()
        self.call_ended = threading.Event()

    def GetModel(
        self, request: store_pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[store_pb.GetModelResponse]:
        context.add_callback(self.call_ended.set)
        yield store_pb.GetModelResponse(data=self.data[:-64])
        self.go_on.wait(60)
        yield store_pb.GetModelResponse(data=self.data[-64:])


@contextlib.contextmanager
def _control_service(
    loader: ModelLoader, repository: ModelRepository
) -> Iterator[control_grpc.ModelControlServiceStub]:
    """ModelControlService over ``loader`` on a local port, and a stub to it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    control_grpc.add_ModelControlServiceServicer_to_server(
        ModelControlServicer(loader, repository), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield control_grpc.ModelControlServiceStub(channel)
    finally:
        server.stop(None).wait(30)


def _load_past_its_deadline(
    control: control_grpc.ModelControlServiceStub, version: str, timeout: float
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        control.LoadModel(
            control_pb.LoadModelRequest(name="faulty", version=version), timeout=timeout
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


def test_a_load_model_call_that_ends_stops_its_download(env: Env, model_path: Path) -> None:
    """LoadModel's deadline bounded only its retries: past it, the load went on for nobody (up to
    the 600 s load timeout, a server thread held), and loaded the model once the store answered."""
    _publish(env, model_path, "stalled")
    store = _StallingStore(_blob(env, "stalled").read_bytes())  # type: ignore[abstract]
    repository = ModelRepository()
    with store_peer(store, workers=4) as store_channel:
        try:
            loader = _loader(env, store_channel, repository)
            with _control_service(loader, repository) as control:
                _load_past_its_deadline(control, "stalled", timeout=3)
                assert store.call_ended.wait(30)  # the download ended with the call
        finally:
            store.go_on.set()
    assert loader._lock("faulty").acquire(CallScope(time.monotonic() + 30))  # the load is done
    # The abandoned load failed; it did not go on to serve the model.
    assert repository.version_state("faulty", "stalled") is ModelState.FAILED


def test_a_cancelled_load_model_stops_its_load_and_frees_the_model(
    env: Env, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoadModel its client cancelled ran on to its end: gRPC reports the cancellation on a
    thread of its own, from where the download (a generator inside the traced channel) could not
    be reached, so the load held the model's lock for as long as the store took, and a later
    LoadModel of the model waited behind it. The load now stops, records why, frees the model and
    leaves the version that was serving in place."""
    _publish(env, model_path, "serving")
    _publish(env, model_path, "cancelled")
    stall = _stall_download(env, monkeypatch, "cancelled")
    inference = env.stack.start_in_process("inference").handle
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        control.LoadModel(control_pb.LoadModelRequest(name="faulty", version="serving"), timeout=60)
        call = control.LoadModel.future(
            control_pb.LoadModelRequest(name="faulty", version="cancelled"), timeout=120
        )
        assert stall.stalled.wait(60)  # mid-download: the store holds back the last bytes
        call.cancel()
        # The model is free: another load of it runs now, while the store still stalls the
        # cancelled one's download (before, this waited behind it until its deadline).
        control.LoadModel(control_pb.LoadModelRequest(name="faulty", version="serving"), timeout=30)
        status = inference.repository.status("faulty")
        cancelled = next(v for v in status.versions if v.version == "cancelled")
        assert cancelled.state is ModelState.FAILED
        assert cancelled.failure is not None and cancelled.failure.reason == "LOAD_CANCELLED"
        assert status.default_version == "serving" and inference.repository.is_ready("faulty")
        assert not inference.loader._lock("faulty").locked
        # And the cancelled version loads on request, once asked again.
        control.LoadModel(
            control_pb.LoadModelRequest(name="faulty", version="cancelled"), timeout=60
        )
        assert inference.repository.is_ready("faulty", "cancelled")
    finally:
        stall.go_on.set()
        env.stack.services.pop("inference").stop()


def test_a_load_model_its_client_ends_just_before_its_deadline_is_the_deadlines(
    env: Env, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client ends its call at its own deadline as it would cancel it, and the server hears of
    it before its own copy of the deadline, which is later by the request's transit. The load's
    scope took a cancellation within 0.5 s of its deadline as the deadline's, the key broker one
    within 1 s: a LoadModel ended 0.75 s before its deadline was recorded LOAD_CANCELLED, where
    the broker would have said DEADLINE_EXCEEDED. Every service now judges by one rule
    (strongroom.runtime.gave_up)."""
    _publish(env, model_path, "ended-late")
    stall = _stall_download(env, monkeypatch, "ended-late")
    inference = env.stack.start_in_process("inference").handle
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        # Long enough for the load to reach the download on a loaded machine (about a second
        # here), short enough not to wait out 30 s: all that is waited for is the deadline.
        deadline = time.monotonic() + 8
        call = control.LoadModel.future(
            control_pb.LoadModelRequest(name="faulty", version="ended-late"), timeout=8
        )
        assert stall.stalled.wait(8)  # mid-download: the store holds back the last bytes
        left = deadline - 0.75 - time.monotonic()
        assert left > 0, "the load reached the store too late to be ended before its deadline"
        time.sleep(left)
        call.cancel()
        assert inference.loader._lock("faulty").acquire(CallScope(time.monotonic() + 60))
        inference.loader._lock("faulty").release()
        status = next(
            v for v in inference.repository.status("faulty").versions if v.version == "ended-late"
        )
        assert status.failure is not None and status.failure.reason == "LOAD_DEADLINE_EXCEEDED"
    finally:
        stall.go_on.set()
        env.stack.services.pop("inference").stop()


def _queued(inference: Any, version: str) -> bool:
    return inference.loader.queued("faulty") == (version,)


def test_an_unload_aborts_the_loads_queued_behind_the_models_running_load(
    env: Env, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoadModel waiting for the model's lock (another load of the model running) was not
    reached by an UnloadModel: the unload returned, and once the running load ended the queued
    one loaded the model again. (And an unload of only the queued version was NOT_FOUND.) The
    unload now aborts the loads not yet begun: ABORTED LOAD_ABORTED_BY_UNLOAD, nothing loaded."""
    for version in ("running", "queued", "queued-2"):
        _publish(env, model_path, version)
    inference = env.stack.start_in_process("inference").handle
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))

        def load(version: str) -> Any:
            request = control_pb.LoadModelRequest(name="faulty", version=version)
            return control.LoadModel.future(request, timeout=120)

        # The whole model unloaded: the running load fails MODEL_UNLOADED, the queued one aborts.
        stall = _stall_download(env, monkeypatch, "running")
        running = load("running")
        assert stall.stalled.wait(60)
        queued = load("queued")
        assert wait_until(lambda: _queued(inference, "queued"), 60)
        control.UnloadModel(control_pb.UnloadModelRequest(name="faulty"), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            queued.result(timeout=60)
        assert info.value.code() == grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
        assert peer_reason(info.value) == "LOAD_ABORTED_BY_UNLOAD"
        stall.go_on.set()
        with pytest.raises(grpc.RpcError) as info:
            running.result(timeout=60)
        assert peer_reason(info.value) == "MODEL_UNLOADED"
        assert "faulty" not in inference.repository.names()

        # Only the queued version unloaded (it is nowhere in the repository yet): the unload
        # succeeds and aborts it; the running load goes on and serves.
        stall = _stall_download(env, monkeypatch, "running")
        running = load("running")
        assert stall.stalled.wait(60)
        queued = load("queued-2")
        assert wait_until(lambda: _queued(inference, "queued-2"), 60)
        control.UnloadModel(
            control_pb.UnloadModelRequest(name="faulty", version="queued-2"), timeout=30
        )
        with pytest.raises(grpc.RpcError) as info:
            queued.result(timeout=60)
        assert peer_reason(info.value) == "LOAD_ABORTED_BY_UNLOAD"
        stall.go_on.set()
        running.result(timeout=60)
        assert inference.repository.is_ready("faulty", "running")
        assert inference.repository.version_state("faulty", "queued-2") is None
        assert inference.loader.lock_names() == ()
    finally:
        stall.go_on.set()
        env.stack.services.pop("inference").stop()


def test_an_unload_stops_the_versions_load_under_way(
    env: Env, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An UnloadModel of a version whose load had begun only took it out of the repository: the
    load went on (download, key release, decryption, ONNX Runtime) after the unload had
    returned, to fail MODEL_UNLOADED at its end, a key obtained and audited for nobody. The
    unload now cancels the load where it is (here a download the store stalls)."""
    _publish(env, model_path, "under-way")
    stall = _stall_download(env, monkeypatch, "under-way")
    inference = env.stack.start_in_process("inference").handle
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        running = control.LoadModel.future(
            control_pb.LoadModelRequest(name="faulty", version="under-way"), timeout=120
        )
        assert stall.stalled.wait(60)
        control.UnloadModel(
            control_pb.UnloadModelRequest(name="faulty", version="under-way"), timeout=30
        )
        # Before the store lets the download go on (it would after 60 s): the load has stopped.
        with pytest.raises(grpc.RpcError) as info:
            running.result(timeout=45)
        assert peer_reason(info.value) == "MODEL_UNLOADED"
        assert not stall.go_on.is_set()
        assert inference.repository.version_state("faulty", "under-way") is None
        assert inference.loader.lock_names() == ()
    finally:
        stall.go_on.set()
        env.stack.services.pop("inference").stop()


def test_a_shutdown_stops_the_configured_models_loads(
    env: Env, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the server set a flag the start-up loader read only between loads: a configured
    model's load under way (here a download the store stalls) ran on in the stopped server, up
    to the load timeout, and could still obtain its key and load. Close now cancels it."""
    _publish(env, model_path, "configured")
    stall = _stall_download(env, monkeypatch, "configured")
    section = {
        **env.stack.default_section("inference"),
        "models": [{"name": "faulty", "version": "configured"}],
    }
    inference = env.stack.start_in_process("inference", section).handle
    try:
        inference.load_configured_models()
        assert stall.stalled.wait(60)
        (loader_thread,) = inference._threads
        env.stack.services.pop("inference").stop()
        # Before the store lets the download go on (it would after 60 s): the load has stopped.
        loader_thread.join(45)
        assert not loader_thread.is_alive(), "the configured load ran on after the shutdown"
        assert not stall.go_on.is_set()
        assert not inference.repository.is_ready("faulty", "configured")
    finally:
        stall.go_on.set()
        if "inference" in env.stack.services:
            env.stack.services.pop("inference").stop()


def test_a_key_release_ends_with_its_load_models_deadline(env: Env, model_path: Path) -> None:
    """The key release's calls took 15 s each whatever the LoadModel's deadline: a report signed
    after the caller had gone still went to the broker, which released (and audited) the key, and
    the load went on to serve the model for nobody. A release past the deadline is not asked for."""
    _publish(env, model_path, "late-key")
    caller_gone = threading.Event()
    inference = env.stack.identity("inference")
    channels = PinnedChannels(inference, env.stack.address("keybroker"), server_name="keybroker")
    repository = ModelRepository()
    loader = ModelLoader(
        repository,
        store_channel=env.stack.channel(inference, "modelstore"),
        key_release=KeyReleaseClient(
            channels,
            env.attester(hook=lambda: caller_gone.wait(60)),
            verifier=env.stack.release_verifier(),
        ),
    )
    decisions = len(env.audit())
    try:
        with _control_service(loader, repository) as control:
            _load_past_its_deadline(control, "late-key", timeout=2)
            caller_gone.set()  # the hardware signs only now, after the caller has gone
            # The load ends (it lets go of the model) while its server still runs.
            assert loader._lock("faulty").acquire(CallScope(time.monotonic() + 60))
    finally:
        caller_gone.set()
    status = next(v for v in repository.status("faulty").versions if v.version == "late-key")
    assert status.failure is not None and status.failure.reason == "LOAD_DEADLINE_EXCEEDED"
    assert _decisions_since(env, decisions) == []  # no key was released for nobody


def test_load_model_rpc_keeps_the_stores_status_and_reason(env: Env, model_path: Path) -> None:
    _publish(env, model_path, "rpc")
    blob = _blob(env, "rpc")
    blob.chmod(0o600)
    blob.write_bytes(blob.read_bytes()[:-100])
    env.stack.start_in_process("inference")
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        with pytest.raises(grpc.RpcError) as info:
            control.LoadModel(control_pb.LoadModelRequest(name="faulty", version="rpc"), timeout=60)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
        assert peer_reason(info.value) == "BLOB_SIZE_MISMATCH"
    finally:
        env.stack.services.pop("inference").stop()


# --- finding 7: on-demand loads retry brief unavailability ---------------------------------


def test_load_model_rides_out_a_broker_restart(env: Env, model_path: Path) -> None:
    _publish(env, model_path, "restart")
    env.stack.start_in_process("inference")
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        env.stack.services.pop("keybroker").stop()
        restarted = threading.Timer(1.5, lambda: env.stack.start_in_process("keybroker"))
        restarted.start()
        started = time.monotonic()
        response = control.LoadModel(
            control_pb.LoadModelRequest(name="faulty", version="restart"), timeout=60
        )
        restarted.join()
        assert response.decision_id
        assert time.monotonic() - started >= 1.0  # it did wait for the broker
    finally:
        env.stack.services.pop("inference").stop()
        if "keybroker" not in env.stack.services:
            env.stack.start_in_process("keybroker")


def test_load_model_retry_window_is_configurable(env: Env, model_path: Path) -> None:
    # With inference.load_retry_seconds 0 the same restart is not ridden out: the first
    # UNAVAILABLE is the answer (the operator chose to see outages at once).
    _publish(env, model_path, "no-retry")
    section = {**env.stack.default_section("inference"), "load_retry_seconds": 0}
    env.stack.start_in_process("inference", section)
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        env.stack.services.pop("keybroker").stop()
        with pytest.raises(grpc.RpcError) as info:
            control.LoadModel(
                control_pb.LoadModelRequest(name="faulty", version="no-retry"), timeout=60
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        env.stack.services.pop("inference").stop()
        if "keybroker" not in env.stack.services:
            env.stack.start_in_process("keybroker")


def test_a_model_over_the_size_cap_is_refused_before_its_key_is_released(
    env: Env, tmp_path: Path
) -> None:
    """The loader took the plaintext size the (store-chosen, not yet authenticated) header claimed,
    up to the format's 1 TiB, asked the broker for the key and reserved a buffer that size. With
    inference.max_model_bytes (64 GiB by default) a larger artifact is refused on its header:
    RESOURCE_EXHAUSTED ARTIFACT_TOO_LARGE, and the broker is never asked."""
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(4096))  # refused on its header: never decrypted, never loaded
    _publish(env, big, "oversize")
    size = env.stack.services["modelstore"].handle.storage.stat("faulty", "oversize").artifact_size
    cap = 1024
    assert size > cap
    section = {**env.stack.default_section("inference"), "max_model_bytes": cap}
    audit = env.stack.services["keybroker"].handle.audit
    env.stack.start_in_process("inference", section)
    try:
        decisions = audit.count
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        with pytest.raises(grpc.RpcError) as info:
            control.LoadModel(
                control_pb.LoadModelRequest(name="faulty", version="oversize"), timeout=60
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert peer_reason(info.value) == "ARTIFACT_TOO_LARGE"
        assert audit.count == decisions  # no release was asked for, so none was decided
    finally:
        env.stack.services.pop("inference").stop()


def test_a_download_refused_on_its_header_ends_where_it_was_refused(
    env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load refused on the artifact's header (here the store serving another version's bytes)
    abandoned the download generator, suspended inside the traced gRPC stream: the call ran on
    until the garbage collector finalised it, in whatever thread and context that was, where
    OpenTelemetry failed to detach the span's context ("Failed to detach context") and CPython's
    recursion accounting was left off (a later compile() in the process failed with "AST
    constructor recursion depth mismatch"). The source is now closed where the refusal happens."""
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(4096))
    _publish(env, big, "va")
    _publish(env, big, "vb")
    served, asked = _blob(env, "va"), _blob(env, "vb")
    asked.chmod(0o600)
    asked.write_bytes(served.read_bytes())  # same length: only the header's version differs
    # The store itself now refuses that blob before its first byte (BLOB_OF_ANOTHER_MODEL): a
    # store without that check (an older one, or a compromised one) serves it, and the
    # client's own refusal is what this test is about.
    monkeypatch.setattr(_filesystem, "head_checked", lambda record, chunks: chunks)
    env.stack.start_in_process("inference")
    try:
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        with pytest.raises(grpc.RpcError) as info:
            control.LoadModel(control_pb.LoadModelRequest(name="faulty", version="vb"), timeout=60)
        assert peer_reason(info.value) == "ARTIFACT_MISMATCH"
    finally:
        env.stack.services.pop("inference").stop()
    gc.collect()  # finalises anything the refusal left behind
    assert not [r for r in caplog.records if "Failed to detach context" in r.getMessage()]
    compile("x = (1, 2)", "<probe>", "exec")  # the interpreter's recursion accounting is intact


def test_the_load_lock_table_keeps_only_the_locks_in_use(env: Env) -> None:
    """A load lock was made for every model name ever asked for and never forgotten: LoadModel
    of name after name the store does not hold (or that a typo made) grew the table without
    limit, as the failed-load table did. Now a lock lives while a load holds or waits for it."""
    loader = _loader(env)
    for i in range(3):
        with pytest.raises(NotFound):
            loader.load(f"typo/{i}", "1")
    assert loader.lock_names() == ()
    # One held (a load running), one waited for: both kept until their loads end.
    held = loader._lock("busy")
    assert held.acquire()
    waiter = CallScope()
    threading.Timer(0, waiter.cancel).start()
    with pytest.raises(Cancelled):
        loader.load("busy", "1", scope=waiter)
    assert loader.lock_names() == ("busy",)
    held.release()
    loader._done_with("busy", held)
    assert loader.lock_names() == ()


class _FailingStore(_ServeBytes):
    """A store peer that sends an artifact's first bytes (its header among them: the load asks
    for the key) and then fails the download."""

    def GetModel(
        self, request: store_pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[store_pb.GetModelResponse]:
        yield store_pb.GetModelResponse(data=self.data[: 16 * 1024])
        context.abort(grpc.StatusCode.DATA_LOSS, "the disk under the blob failed")


def test_a_download_that_fails_stops_its_key_release(env: Env, model_path: Path) -> None:
    """The key release ran on to its end after the download it was for had failed: the broker
    released (and audited) a key for a load that had already failed. A failed download now
    cancels its release; here the release is still attesting when the download fails."""
    _publish(env, model_path, "failed-download")
    store = _FailingStore(_blob(env, "failed-download").read_bytes())  # type: ignore[abstract]
    load_failed = threading.Event()
    inference = env.stack.identity("inference")
    channels = PinnedChannels(inference, env.stack.address("keybroker"), server_name="keybroker")
    repository = ModelRepository()
    decisions = len(env.audit())
    with store_peer(store) as store_channel:
        try:
            loader = ModelLoader(
                repository,
                store_channel=store_channel,
                key_release=KeyReleaseClient(
                    channels,
                    env.attester(hook=lambda: load_failed.wait(60)),
                    verifier=env.stack.release_verifier(),
                ),
            )
            with pytest.raises(DataLoss):
                loader.load("faulty", "failed-download")
            load_failed.set()  # the hardware signs only now, after the load has failed
            for thread in threading.enumerate():
                if thread.name == "artifact-key-release":
                    thread.join(60)
        finally:
            load_failed.set()
    assert _decisions_since(env, decisions) == []  # no key was released for a failed load
    status = repository.status("faulty").versions[-1]
    assert status.failure is not None and status.failure.reason != "LOAD_CANCELLED"
