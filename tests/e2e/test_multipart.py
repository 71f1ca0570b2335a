"""Multi-part models across the real services: publish → store → attested load → ModelInfer.

An ONNX model saved with external data (one file per tensor, as ``onnx.save_model(...,
save_as_external_data=True, all_tensors_to_one_file=False)`` writes it) is published part by part,
loaded by the inference service from the store (parts fetched in parallel, decrypted in memory)
and served; its outputs equal ONNX Runtime's on the plaintext files. Then the refusals, each made
by changing what the store holds exactly as a compromised store (or its disk) could: a part
swapped with another, two parts reordered, a part dropped, a part or the manifest taken from
another version — every one DATA_LOSS, with the model left not ready. Finally the client library
returns safetensors shards equal to the plaintext files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
import threading
import time
import tracemalloc
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import safetensors.numpy
import yaml
from onnx import TensorProto, helper, numpy_helper

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.artifact.manifest import MANIFEST_CONTENT_TYPE, ManifestLayout
from strongroom.cli import models as cli_models
from strongroom.cli.main import main as cli_main
from strongroom.client.fetch import DecryptedModel, DecryptedPart, ModelFetcher
from strongroom.client.keyrelease import EPHEMERAL_KEY_BITS, KeyReleaseClient
from strongroom.client.multipart import files_parts, onnx_parts, publish_parts
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.errors import StrongroomError
from strongroom.inference.loader import ModelLoader
from strongroom.inference.models import ModelRepository
from strongroom.inference.models._ort import ort
from strongroom.pki import WorkloadIdentity
from tests.e2e.publishing import put_encrypted
from tests.e2e.stalling import StallOnce
from tests.e2e.storepeer import store_peer
from tests.keybroker.helpers import data_key_request

KEY = "multipart"
CREATED_AT = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
NAME = "acme/mlp"


def write_mlp(folder: Path, seed: int) -> Path:
    """A two-layer MLP saved with one external-data file per tensor; W1 and W2 have equal sizes."""
    rng = np.random.default_rng(seed)
    tensors = {
        "w1": rng.standard_normal((16, 64)).astype(np.float32),
        "b1": rng.standard_normal(64).astype(np.float32),
        "w2": rng.standard_normal((64, 16)).astype(np.float32),
        "b2": rng.standard_normal(16).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    return path


def plaintext_ort(path: Path, x: np.ndarray) -> np.ndarray:
    """The reference: ONNX Runtime on the plaintext files on disk."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(["y"], {"x": x})[0]
    return out


@dataclasses.dataclass
class Env:
    stack: DevStack
    admin: WorkloadIdentity
    publisher: WorkloadIdentity
    client: WorkloadIdentity
    inference: WorkloadIdentity
    models: Path

    def publish(self, version: str, seed: int = 1) -> Path:
        path = write_mlp(self.models / version, seed)
        publish_parts(
            onnx_parts(path),
            name=NAME,
            version=version,
            key_id=KEY,
            broker=self.stack.channel(self.publisher, "keybroker"),
            store=self.stack.channel(self.publisher, "modelstore"),
            layout=ManifestLayout.ONNX_EXTERNAL_DATA,
            # One timestamp for every version: their artifacts then have equal sizes, so the
            # tests below can put one version's bytes in another's place in the store.
            created_at=CREATED_AT,
        )
        return path

    def load(self, version: str) -> control_pb.LoadModelResponse:
        stub = control_grpc.ModelControlServiceStub(self.stack.channel(self.admin, "inference"))
        response: control_pb.LoadModelResponse = stub.LoadModel(
            control_pb.LoadModelRequest(name=NAME, version=version), timeout=120
        )
        return response

    def infer(self, x: np.ndarray, version: str) -> np.ndarray:
        stub = oip_grpc.GRPCInferenceServiceStub(self.stack.channel(self.client, "inference"))
        response = stub.ModelInfer(
            oip_pb.ModelInferRequest(
                model_name=NAME,
                model_version=version,
                inputs=[
                    oip_pb.ModelInferRequest.InferInputTensor(
                        name="x", datatype="FP32", shape=list(x.shape)
                    )
                ],
                raw_input_contents=[x.astype("<f4").tobytes()],
            ),
            timeout=30,
        )
        out = response.outputs[0]
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(out.shape))

    def ready(self, version: str) -> bool:
        stub = oip_grpc.GRPCInferenceServiceStub(self.stack.channel(self.client, "inference"))
        return stub.ModelReady(oip_pb.ModelReadyRequest(name=NAME, version=version)).ready

    def blob(self, version: str) -> Path:
        """The stored artifact file of ``NAME``/``version`` (what a compromised disk could edit)."""
        store = self.stack.services["modelstore"].handle.storage
        record = store.stat(NAME, version)
        path = next(p for p in (store.root / "blobs").rglob(record.artifact_sha256))
        path.chmod(0o600)
        return path

    def fetcher(self) -> ModelFetcher:
        return ModelFetcher(
            self.stack.channel(self.inference, "modelstore"), self.key_release(), parallel=3
        )

    def key_release(self) -> KeyReleaseClient:
        return self.stack.release_client(self.inference)


@pytest.fixture(scope="module")
def env(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    stack.start_in_process("inference")
    admin, publisher, client, inference = (
        stack.identity(n) for n in ("admin", "publisher", "client", "inference")
    )
    stack.create_release_key(admin, KEY, policy_version="multipart-1")
    yield Env(stack, admin, publisher, client, inference, tmp_path_factory.mktemp("models"))


def test_onnx_parts_finds_the_graph_and_every_external_file(env: Env) -> None:
    path = write_mlp(env.models / "discover", 0)
    parts = onnx_parts(path.parent)  # a directory works as well as the .onnx file
    assert [p.name for p in parts] == ["model.onnx", "w1", "b1", "w2", "b2"]
    assert parts == onnx_parts(path)


def test_publish_then_attested_load_serves_what_plaintext_ort_computes(env: Env) -> None:
    path = env.publish("1")
    store = store_grpc.ModelStoreServiceStub(env.stack.channel(env.admin, "modelstore"))
    manifest = store.StatModel(store_pb.StatModelRequest(name=NAME, version="1"), timeout=10)
    assert manifest.model.content_type == MANIFEST_CONTENT_TYPE
    listed = store.ListModels(store_pb.ListModelsRequest(name_prefix=NAME), timeout=10)
    assert {m.version for m in listed.models} >= {"1", *(f"1+part.{i}" for i in range(5))}
    # Only ciphertext is stored: no part's plaintext appears in its blob.
    for i, name in enumerate(["model.onnx", "w1", "b1", "w2", "b2"]):
        plain = (path.parent / name).read_bytes()
        assert plain[:64] not in env.blob(f"1+part.{i}").read_bytes()

    response = env.load("1")
    assert response.decision_id
    assert {"attest_and_release", "fetch_and_decrypt", "load"} <= set(response.timings)
    assert env.ready("1")
    x = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)
    np.testing.assert_allclose(env.infer(x, "1"), plaintext_ort(path, x), rtol=1e-5, atol=1e-5)


def test_the_next_ephemeral_key_is_made_once_the_parts_are_in(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a single artifact: not beside the parts' download and decryption, but beside ONNX
    Runtime's load."""
    env.publish("defer")
    key_release = env.key_release()
    loader = ModelLoader(
        ModelRepository(),
        store_channel=env.stack.channel(env.inference, "modelstore"),
        key_release=key_release,
    )
    assert key_release._next_key is not None
    key_release._next_key.result(60)
    queued: dict[str, object] = {}
    release, load = key_release.release, loader._repository.load

    def observed_release(*args: Any, **kwargs: Any) -> Any:
        released = release(*args, **kwargs)
        queued["after the release"] = key_release._next_key
        return released

    def observed_load(*args: Any, **kwargs: Any) -> Any:
        queued["when ONNX Runtime loads"] = key_release._next_key
        return load(*args, **kwargs)

    monkeypatch.setattr(key_release, "release", observed_release)
    monkeypatch.setattr(loader._repository, "load", observed_load)
    loader.load(NAME, "defer")
    assert loader._repository.is_ready(NAME, "defer")
    assert queued["after the release"] is None
    next_key = queued["when ONNX Runtime loads"]
    assert isinstance(next_key, Future)
    assert next_key.result(60).key_size == EPHEMERAL_KEY_BITS


def _refused(env: Env, version: str, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        env.load(version)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert (info.value.details() or "").startswith(f"{reason}: "), info.value.details()
    assert not env.ready(version)


def _refused_by_the_client(env: Env, version: str, swapped: dict[str, str], reason: str) -> None:
    """A load of ``version`` from a compromised store serving, for each version in ``swapped``,
    another's stored bytes is DATA_LOSS ``reason`` and leaves it not ready: the client's own
    check (the real store refuses a blob whose header names another model before its first
    byte, BLOB_OF_ANOTHER_MODEL, so it is no longer reached through it)."""
    repository = ModelRepository()
    with store_peer(_ServeSwapped(env, swapped), workers=4) as channel:  # type: ignore[abstract]
        loader = ModelLoader(repository, store_channel=channel, key_release=env.key_release())
        with pytest.raises(StrongroomError) as info:
            loader.load(NAME, version)
    assert (info.value.status_name, info.value.reason) == ("DATA_LOSS", reason)
    assert not repository.is_ready(NAME, version)


def test_a_swapped_part_is_refused(env: Env) -> None:
    env.publish("swapA", seed=2)
    env.publish("swapB", seed=3)
    # w2 of this version replaced by w2 of another version of the same model (same size).
    _refused_by_the_client(env, "swapA", {"swapA+part.3": "swapB+part.3"}, "PART_MISMATCH")
    # The same edit on the store's disk: the store refuses to serve the part at all.
    env.blob("swapA+part.3").write_bytes(env.blob("swapB+part.3").read_bytes())
    _refused(env, "swapA", "BLOB_OF_ANOTHER_MODEL")


def test_reordered_parts_are_refused(env: Env) -> None:
    env.publish("reorder", seed=4)
    first, second = env.blob("reorder+part.1"), env.blob("reorder+part.3")  # w1 and w2
    assert first.stat().st_size == second.stat().st_size
    swapped = {"reorder+part.1": "reorder+part.3", "reorder+part.3": "reorder+part.1"}
    _refused_by_the_client(env, "reorder", swapped, "PART_MISMATCH")


def test_a_dropped_part_is_refused(env: Env) -> None:
    env.publish("drop", seed=5)
    store = store_grpc.ModelStoreServiceStub(env.stack.channel(env.admin, "modelstore"))
    store.DeleteModel(store_pb.DeleteModelRequest(name=NAME, version="drop+part.2"), timeout=10)
    _refused(env, "drop", "PART_MISSING")


def test_a_model_of_another_layout_is_refused_before_its_parts_are_downloaded(env: Env) -> None:
    """The inference server serves ONNX models only; a FILES model (safetensors shards for
    another runtime) was refused once every part had been downloaded and decrypted. With a part
    gone from the store that was a PART_MISSING DATA_LOSS: the parts are now never asked for."""
    folder = env.models / "files-layout"
    folder.mkdir()
    for index in range(2):
        (folder / f"shard-{index}.bin").write_bytes(os.urandom(4096))
    publish_parts(
        files_parts([folder]),
        name=NAME,
        version="files",
        key_id=KEY,
        broker=env.stack.channel(env.publisher, "keybroker"),
        store=env.stack.channel(env.publisher, "modelstore"),
        layout=ManifestLayout.FILES,
    )
    store = store_grpc.ModelStoreServiceStub(env.stack.channel(env.admin, "modelstore"))
    store.DeleteModel(store_pb.DeleteModelRequest(name=NAME, version="files+part.1"), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        env.load("files")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    details = info.value.details() or ""
    assert details.startswith("MODEL_LAYOUT_UNSUPPORTED: "), details
    assert "laid out as FILES" in details and "ONNX_EXTERNAL_DATA" in details
    assert not env.ready("files")


def test_a_manifest_from_another_version_is_refused(env: Env) -> None:
    env.publish("mix1", seed=6)
    env.publish("mix2", seed=7)
    # The store answers mix1 with mix2's manifest (same layout, same size).
    _refused_by_the_client(env, "mix1", {"mix1": "mix2"}, "MANIFEST_MISMATCH")


def test_a_part_edited_in_place_is_refused(env: Env) -> None:
    env.publish("flip", seed=8)
    blob = env.blob("flip+part.1")
    data = bytearray(blob.read_bytes())
    data[-100] ^= 1
    blob.write_bytes(bytes(data))
    _refused(env, "flip", "DECRYPTION_FAILED")


class _ServeChanged(store_grpc.ModelStoreServiceServicer):
    """A compromised store: it serves each stored artifact of ``NAME`` (read from the real store's
    disk), with ``change`` applied to the bytes of the store version ``changed`` on the way out,
    and every download held back ``delay`` seconds before its first byte."""

    def __init__(
        self,
        env: Env,
        changed: str = "",
        change: Callable[[bytes], bytes] = bytes,
        delay: float = 0.0,
    ) -> None:
        self.env, self.changed, self.change, self.delay = env, changed, change, delay

    def StatModel(
        self, request: store_pb.StatModelRequest, context: grpc.ServicerContext
    ) -> store_pb.StatModelResponse:
        store = self.env.stack.services["modelstore"].handle.storage
        record = store.stat(request.name, request.version)
        info = store_pb.ModelInfo(
            name=request.name, version=request.version, content_type=record.content_type
        )
        return store_pb.StatModelResponse(model=info)

    def GetModel(
        self, request: store_pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[store_pb.GetModelResponse]:
        data = self.env.blob(request.version).read_bytes()
        time.sleep(self.delay)
        if request.version == self.changed:
            data = self.change(data)
        for i in range(0, len(data), 64 * 1024):
            yield store_pb.GetModelResponse(data=data[i : i + 64 * 1024])


@pytest.fixture(scope="module")
def transit(env: Env) -> str:
    """A multi-part version published once for the in-transit damage tests."""
    env.publish("transit", seed=13)
    return "transit"


# A part or the manifest streamed shorter or longer than its header implies, and the reason.
IN_TRANSIT = pytest.mark.parametrize(
    ("changed", "change", "reason"),
    [
        ("transit+part.3", lambda b: b[:-40], "TRUNCATED"),
        ("transit+part.3", lambda b: b + bytes(40), "TRAILING_DATA"),
        ("transit", lambda b: b[:-40], "TRUNCATED"),
    ],
    ids=["part-truncated", "part-extended", "manifest-truncated"],
)


@IN_TRANSIT
def test_a_part_damaged_in_transit_is_data_loss(
    env: Env, transit: str, changed: str, change: Callable[[bytes], bytes], reason: str
) -> None:
    """As for a single artifact (test_faults): a store that streams a part or the manifest shorter
    or longer than its header implies served damaged stored data (DATA_LOSS), it was not sent an
    invalid LoadModel request (INVALID_ARGUMENT)."""
    repository = ModelRepository()
    with store_peer(_ServeChanged(env, changed, change), workers=4) as channel:  # type: ignore[abstract]
        loader = ModelLoader(repository, store_channel=channel, key_release=env.key_release())
        with pytest.raises(StrongroomError) as info:
            loader.load(NAME, transit)
    assert (info.value.status_name, info.value.reason) == ("DATA_LOSS", reason)
    assert not repository.is_ready(NAME, transit)


@IN_TRANSIT
def test_the_client_library_reports_a_part_damaged_in_transit_as_data_loss(
    env: Env, transit: str, changed: str, change: Callable[[bytes], bytes], reason: str
) -> None:
    """The service mapped it, but ModelFetcher itself raised INVALID_ARGUMENT for a part (or a
    manifest) the store streamed short or long: a library caller was told its request was wrong
    when the store's data was."""
    with store_peer(_ServeChanged(env, changed, change), workers=4) as channel:  # type: ignore[abstract]
        fetcher = ModelFetcher(channel, env.key_release(), parallel=3)
        with pytest.raises(StrongroomError) as info:
            fetcher.fetch(NAME, transit)
    assert (info.value.status_name, info.value.reason) == ("DATA_LOSS", reason)


class _ServeSwapped(_ServeChanged):
    """A compromised store: for each version in ``swapped`` it serves the stored bytes of the
    version named there instead of its own."""

    def __init__(self, env: Env, swapped: dict[str, str]) -> None:
        super().__init__(env)
        self.swapped = swapped

    def GetModel(
        self, request: store_pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[store_pb.GetModelResponse]:
        data = self.env.blob(self.swapped.get(request.version, request.version)).read_bytes()
        for i in range(0, len(data), 64 * 1024):
            yield store_pb.GetModelResponse(data=data[i : i + 64 * 1024])


class _ServeManifestAsSingle(_ServeChanged):
    """A compromised store: it calls every version a single ONNX file and serves the manifest of
    ``served`` for whatever version is asked for."""

    def __init__(self, env: Env, served: str) -> None:
        super().__init__(env)
        self.served = served

    def StatModel(
        self, request: store_pb.StatModelRequest, context: grpc.ServicerContext
    ) -> store_pb.StatModelResponse:
        info = store_pb.ModelInfo(
            name=request.name, version=request.version, content_type="application/onnx"
        )
        return store_pb.StatModelResponse(model=info)

    def GetModel(
        self, request: store_pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[store_pb.GetModelResponse]:
        yield store_pb.GetModelResponse(data=self.env.blob(self.served).read_bytes())


def test_the_loader_and_the_client_library_judge_a_header_alike(env: Env, transit: str) -> None:
    """The inference loader's single-file path and ModelFetcher checked a header with two copies
    of one check, which had drifted: another version's manifest, served where a single artifact
    was claimed, was FAILED_PRECONDITION ARTIFACT_MISMATCH to the loader and DATA_LOSS
    MANIFEST_MISMATCH (the more precise) to the library. Both now run one check."""
    with store_peer(_ServeManifestAsSingle(env, transit), workers=4) as channel:  # type: ignore[abstract]
        loader = ModelLoader(
            ModelRepository(), store_channel=channel, key_release=env.key_release()
        )
        with pytest.raises(StrongroomError) as loaded:
            loader.load(NAME, "asked")
        with pytest.raises(StrongroomError) as fetched:
            ModelFetcher(channel, env.key_release()).fetch(NAME, "asked")
    judged = [(e.value.status_name, e.value.reason) for e in (loaded, fetched)]
    assert judged == [("DATA_LOSS", "MANIFEST_MISMATCH")] * 2


def test_a_store_slowing_every_part_cannot_stretch_a_load_past_its_timeout(
    env: Env, transit: str
) -> None:
    """The load's timeout bounds the whole multi-part fetch, not each part's download: a store
    holding every download back for half the timeout (manifest and 5 parts, one at a time: 6 x
    1.5 s) used to have the load take all of that and succeed, and with N parts about
    N / parallel timeouts (hours for a model of a hundred parts at the default 600 s)."""
    timeout = 3.0
    repository = ModelRepository()
    with store_peer(_ServeChanged(env, delay=1.5), workers=4) as channel:  # type: ignore[abstract]
        loader = ModelLoader(
            repository,
            store_channel=channel,
            key_release=env.key_release(),
            timeout=timeout,
            parallel_parts=1,
        )
        started = time.monotonic()
        with pytest.raises(StrongroomError) as info:
            loader.load(NAME, transit)
        elapsed = time.monotonic() - started
    assert (info.value.status_name, info.value.reason) == ("UNAVAILABLE", "FETCH_UNAVAILABLE")
    assert elapsed < 6 * 1.5  # less than the six delays: only the whole-fetch deadline ends it
    assert not repository.is_ready(NAME, transit)


def test_the_client_library_returns_safetensors_shards_equal_to_the_files(env: Env) -> None:
    folder = env.models / "shards"
    folder.mkdir()
    rng = np.random.default_rng(int.from_bytes(os.urandom(4)))
    shards: dict[str, dict[str, np.ndarray]] = {
        "model-00001-of-00002.safetensors": {"embed": rng.standard_normal((32, 8), np.float32)},
        "model-00002-of-00002.safetensors": {
            "head": rng.standard_normal((8, 4), np.float32),
            "bias": np.arange(4, dtype=np.int64),
        },
    }
    for file, tensors in shards.items():
        safetensors.numpy.save_file(tensors, str(folder / file))
    publish_parts(
        files_parts([folder]),
        name="acme/shards",
        version="1",
        key_id=KEY,
        broker=env.stack.channel(env.publisher, "keybroker"),
        store=env.stack.channel(env.publisher, "modelstore"),
        layout=ManifestLayout.FILES,
    )
    with env.fetcher().fetch("acme/shards", "1") as model:
        assert model.layout is ManifestLayout.FILES
        assert [p.name for p in model.parts] == sorted(shards)
        for part in model.parts:
            assert part.view.readonly
            assert part.view == (folder / part.name).read_bytes()
            loaded = safetensors.numpy.load(part.as_bytes())
            assert loaded.keys() == shards[part.name].keys()
            for key, value in shards[part.name].items():
                np.testing.assert_array_equal(loaded[key], value)
        held = model.parts[0]
    # Closed: the buffers are zeroed and the parts refuse further use.
    with pytest.raises(StrongroomError) as info:
        held.view  # noqa: B018
    assert info.value.reason == "MODEL_CLOSED"


def test_the_client_library_returns_a_single_artifact_as_one_part(env: Env) -> None:
    path = write_mlp(env.models / "single-src", 9)
    from strongroom.client.publish import publish_model

    publish_model(
        path,
        name="acme/single",
        version="1",
        key_id=KEY,
        broker=env.stack.channel(env.publisher, "keybroker"),
        store=env.stack.channel(env.publisher, "modelstore"),
    )
    with env.fetcher().fetch("acme/single", "1") as model:
        assert model.manifest is None
        assert [p.name for p in model.parts] == ["single"]
        assert model.parts[0].view == path.read_bytes()


def test_the_client_library_refuses_a_swapped_part_with_data_loss(env: Env) -> None:
    env.publish("libA", seed=10)
    env.publish("libB", seed=11)
    swapped = {"libA+part.1": "libB+part.1"}  # a compromised store (_refused_by_the_client)
    with (
        store_peer(_ServeSwapped(env, swapped), workers=4) as channel,  # type: ignore[abstract]
        pytest.raises(StrongroomError) as info,
    ):
        ModelFetcher(channel, env.key_release()).fetch(NAME, "libA")
    assert info.value.status_name == "DATA_LOSS"
    assert info.value.reason == "PART_MISMATCH"


# -- the command line ------------------------------------------------------------------------


def _pipe_stdout(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[bytes], threading.Thread]:
    read_fd, write_fd = os.pipe()
    writer = os.fdopen(write_fd, "wb")
    received: list[bytes] = []

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as reader:
            received.append(reader.read())

    thread = threading.Thread(target=drain)
    thread.start()
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=writer))
    return writer, received, thread


def test_cli_publishes_a_directory_and_fetches_a_part_into_a_pipe(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_mlp(env.models / "cli", 12)
    publisher = env.stack.write_client_config("publisher")
    publish = ["model", "publish", str(path.parent), "--name", NAME, "--version", "cli"]
    code = cli_main([*publish, "--key-id", KEY, "--no-progress", "--client-config", str(publisher)])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["layout"] == "ONNX_EXTERNAL_DATA"
    assert [p["name"] for p in printed["parts"]] == ["model.onnx", "w1", "b1", "w2", "b2"]

    # The CLI asks the VM's hardware for its report; here that is the simulated TEE.
    simulated = env.stack.simulated_attester()
    monkeypatch.setattr(cli_models, "select_attester", lambda kind, production: simulated)
    inference = env.stack.write_client_config("inference")
    fetch = ["model", "fetch", NAME, "cli", "--to-memory", "--client-config", str(inference)]

    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main([*fetch, "--part", "w2"])
    writer.close()
    thread.join(30)
    assert code == 0, capsys.readouterr().err
    assert received == [(path.parent / "w2").read_bytes()]

    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main(fetch)
    writer.close()
    thread.join(30)
    assert code == 0, capsys.readouterr().err
    with tarfile.open(fileobj=io.BytesIO(received[0]), mode="r|") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    assert members == {n: (path.parent / n).read_bytes() for n in members}
    assert list(members) == ["model.onnx", "w1", "b1", "w2", "b2"]


class _HashingSink:
    """Standard output that keeps nothing: a digest of what it is given."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        return len(data)


def test_cli_fetch_writes_each_part_straight_from_its_decrypted_buffer() -> None:
    """The tar stream is written from the parts' own buffers: ``io.BytesIO`` over a part's view
    copied the whole part (and tarfile's writer copied it again, block by block) into memory that
    is freed without being wiped."""
    size = 8 << 20
    data = [os.urandom(size), os.urandom(1000)]
    model = DecryptedModel(
        NAME,
        "1",
        tuple(DecryptedPart(i, f"p{i}", "application/octet-stream", d) for i, d in enumerate(data)),
        None,
        "",
    )
    written = io.BytesIO()
    cli_models._write_tar(model, written)  # type: ignore[arg-type]
    with tarfile.open(fileobj=io.BytesIO(written.getvalue()), mode="r|") as tar:
        members = [(m.name, m.mode, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    assert members == [("p0", 0o400, data[0]), ("p1", 0o400, data[1])]
    del written, members

    sink = _HashingSink()
    tracemalloc.start()
    try:
        cli_models._write_tar(model, sink)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 16


def test_cli_fetch_refuses_to_write_plaintext_into_a_file(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = (tmp_path / "leak.bin").open("wb")
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=target))
    inference = env.stack.write_client_config("inference")
    code = cli_main(["model", "fetch", NAME, "1", "--to-memory", "--client-config", str(inference)])
    target.close()
    assert code == 1
    assert "OUTPUT_NOT_A_PIPE" in capsys.readouterr().err
    assert (tmp_path / "leak.bin").read_bytes() == b""


def test_cli_fetch_refuses_to_run_without_the_brokers_release_signing_key(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client configuration from before release signing: the broker's answer could not be told
    from that of any peer holding a broker certificate."""
    document = yaml.safe_load(env.stack.write_client_config("inference").read_text())
    del document["keybroker_release_signing_public_keys"]
    older = tmp_path / "client-inference.yaml"
    older.write_text(yaml.safe_dump(document))
    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main(["model", "fetch", NAME, "1", "--to-memory", "--client-config", str(older)])
    writer.close()
    thread.join(30)
    assert code == 1
    err = capsys.readouterr().err
    assert "RELEASE_SIGNING_KEY_MISSING" in err and "keybroker_release_signing_public_keys" in err
    assert received in ([], [b""])


def test_cli_plans_single_files_onnx_folders_and_shards(tmp_path: Path) -> None:
    single = tmp_path / "single.onnx"
    onnx.save_model(
        helper.make_model(
            helper.make_graph(
                [helper.make_node("Identity", ["x"], ["y"])],
                "g",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
            )
        ),
        str(single),
    )
    assert cli_models._plan([single]) is None
    external = write_mlp(tmp_path / "ext", 0)
    planned = cli_models._plan([external])
    assert planned is not None and planned[1] is ManifestLayout.ONNX_EXTERNAL_DATA
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("b.safetensors", "a.safetensors"):
        (shards / name).write_bytes(b"x")
    planned = cli_models._plan([shards])
    assert planned is not None and planned[1] is ManifestLayout.FILES
    assert [p.name for p in planned[0]] == ["a.safetensors", "b.safetensors"]
    with pytest.raises(StrongroomError) as info:
        cli_models._plan([tmp_path / "missing"])
    assert info.value.reason == "MODEL_FILE_UNREADABLE"


def test_a_part_growing_during_publish_raises_its_reason_and_stores_nothing(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A part appended to while it is uploaded fails the publish with PLAINTEXT_SIZE_MISMATCH
    (gRPC answered UNKNOWN "Exception iterating requests!" and logged a traceback); no part and
    no manifest is stored."""
    path = write_mlp(env.models / "growing", seed=5)
    parts = onnx_parts(path)
    appended: list[Path] = []

    def append_once(done: int, total: int) -> None:
        if not appended:
            appended.append(parts[0].path)
            with parts[0].path.open("ab") as out:
                out.write(b"appended")

    with pytest.raises(StrongroomError) as info:
        publish_parts(
            parts,
            name=NAME,
            version="growing",
            key_id=KEY,
            broker=env.stack.channel(env.publisher, "keybroker"),
            store=env.stack.channel(env.publisher, "modelstore"),
            layout=ManifestLayout.ONNX_EXTERNAL_DATA,
            progress=append_once,
        )
    assert info.value.reason == "PLAINTEXT_SIZE_MISMATCH"
    assert not [r for r in caplog.records if r.name.startswith("grpc") and r.exc_info]
    stub = store_grpc.ModelStoreServiceStub(env.stack.channel(env.publisher, "modelstore"))
    listed = stub.ListModels(store_pb.ListModelsRequest(name_prefix=NAME), timeout=30).models
    assert not [m for m in listed if m.version.startswith("growing")]


def test_a_publish_failing_after_a_part_was_stored_names_what_it_left(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A publisher may not delete, so a publish failing at its second part left the first stored,
    and every retry of that version was MODEL_EXISTS; the error and the CLI's warning line did not
    say which parts were left or what to do (the names were only in the log record's extras)."""
    path = write_mlp(env.models / "half", seed=6)
    parts = onnx_parts(path)
    assert len(parts) >= 2
    first_size = parts[0].path.stat().st_size
    grown: list[bool] = []

    def grow_the_second(done: int, total: int) -> None:
        if done > first_size and not grown:  # the first part is stored, the second under way
            grown.append(True)
            with parts[1].path.open("ab") as out:
                out.write(b"appended")

    with pytest.raises(StrongroomError) as info:
        publish_parts(
            parts,
            name=NAME,
            version="half",
            key_id=KEY,
            broker=env.stack.channel(env.publisher, "keybroker"),
            store=env.stack.channel(env.publisher, "modelstore"),
            layout=ManifestLayout.ONNX_EXTERNAL_DATA,
            progress=grow_the_second,
        )
    assert info.value.reason == "PLAINTEXT_SIZE_MISMATCH"
    stub = store_grpc.ModelStoreServiceStub(env.stack.channel(env.publisher, "modelstore"))
    listed = stub.ListModels(store_pb.ListModelsRequest(name_prefix=NAME), timeout=30).models
    left = [f"{m.name} {m.version}" for m in listed if m.version.startswith("half")]
    assert left, "the publisher was allowed to delete the part it stored"
    for name in left:
        assert name in info.value.message
    assert "strongroom model rm" in info.value.message
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(left[0].split()[0] in w and "model rm" in w for w in warnings)


class _MechanismRewriter(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """A broker answering GenerateDataKey with another wrap mechanism than the KEK wrap."""

    def __init__(self, mechanism: int) -> None:
        self.mechanism = mechanism

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/GenerateDataKey"):
            outcome.result().mechanism = self.mechanism  # the message the caller will read
        return outcome


@pytest.mark.parametrize(
    "mechanism", [kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA256, kb_pb.WRAP_MECHANISM_UNSPECIFIED]
)
def test_a_data_key_wrapped_with_another_mechanism_is_not_published(
    env: Env, mechanism: int
) -> None:
    """The broker's data key, said to be wrapped with a mechanism no key slot may carry, ends the
    publish (as publish_model does) instead of being stored under a slot claiming the KEK wrap:
    such parts could never be unwrapped."""
    path = write_mlp(env.models / f"mechanism-{mechanism}", seed=6)
    version = f"mechanism-{mechanism}"
    broker = grpc.intercept_channel(
        env.stack.channel(env.publisher, "keybroker"), _MechanismRewriter(mechanism)
    )
    with pytest.raises(StrongroomError) as info:
        publish_parts(
            onnx_parts(path),
            name=NAME,
            version=version,
            key_id=KEY,
            broker=broker,
            store=env.stack.channel(env.publisher, "modelstore"),
            layout=ManifestLayout.ONNX_EXTERNAL_DATA,
        )
    assert info.value.reason == "UNSUPPORTED_WRAP_MECHANISM"
    stub = store_grpc.ModelStoreServiceStub(env.stack.channel(env.publisher, "modelstore"))
    listed = stub.ListModels(store_pb.ListModelsRequest(name_prefix=NAME), timeout=30).models
    assert not [m for m in listed if m.version.startswith(version)]


# -- a publisher's data key writes only the model it was generated for ----------------------------


def _model_as(env: Env, layout: str, folder_name: str, seed: int) -> Path:
    """A model to publish as one artifact ("single": a self-contained ONNX file) or as parts
    ("parts": an ONNX graph with its external data files)."""
    from strongroom.dev.devstack.model import train

    folder = env.models / folder_name
    if layout == "single":
        folder.mkdir()
        return train(folder / "model.onnx").path
    return write_mlp(folder, seed=seed)


def _publish_as(
    env: Env, layout: str, path: Path, name: str, version: str, broker: grpc.Channel
) -> str:
    """Publishes ``path`` as ``name``/``version``; returns its header SHA-256 (hex)."""
    from strongroom.client.publish import publish_model

    store = env.stack.channel(env.publisher, "modelstore")
    if layout == "single":
        return publish_model(
            path, name=name, version=version, key_id=KEY, broker=broker, store=store
        ).header_sha256
    return publish_parts(
        onnx_parts(path),
        name=name,
        version=version,
        key_id=KEY,
        broker=broker,
        store=store,
        layout=ManifestLayout.ONNX_EXTERNAL_DATA,
    ).header_sha256


class _KeyForAnotherModel(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """A publisher asking the broker for a data key for its own model (``own``) while writing
    another: what a publisher, or a store that learnt a publisher's key, would do to substitute
    a model it does not own."""

    def __init__(self, own: tuple[str, str]) -> None:
        self.own = own

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if not details.method.endswith("/GenerateDataKey"):
            return continuation(details, request)
        asked = (request.model_name, request.model_version)
        outcome = continuation(
            details,
            kb_pb.GenerateDataKeyRequest(
                key_id=request.key_id, model_name=self.own[0], model_version=self.own[1]
            ),
        )
        # The attacker's own code would not check the binding; the library does.
        answer = outcome.result()
        answer.bound_model_name, answer.bound_model_version = asked
        return outcome


@pytest.mark.parametrize("layout", ["single", "parts"])
def test_a_data_key_for_one_model_cannot_write_another(env: Env, layout: str) -> None:
    """Before data keys were bound to their model, the key GenerateDataKey gave a publisher for
    its own model encrypted a valid artifact for any name and version under the same KEK: the
    inference server released it and served the substitute as the victim's model."""
    path = _model_as(env, layout, f"substitute-{layout}", seed=12)
    victim = (f"acme/victim-{layout}", "1")
    for name, own in ((f"acme/own-{layout}", None), (victim[0], (f"acme/own-{layout}", "2"))):
        broker = env.stack.channel(env.publisher, "keybroker")
        if own is not None:
            broker = grpc.intercept_channel(broker, _KeyForAnotherModel(own))
        _publish_as(env, layout, path, name, "1", broker)
    control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
    # The control: the same publish, with the key generated for the model it writes, loads.
    control.LoadModel(control_pb.LoadModelRequest(name=f"acme/own-{layout}", version="1"))
    with pytest.raises(grpc.RpcError) as info:
        control.LoadModel(control_pb.LoadModelRequest(name=victim[0], version=victim[1]))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert (info.value.details() or "").startswith("DECRYPTION_FAILED: "), info.value.details()
    with pytest.raises(StrongroomError) as refused:
        env.fetcher().fetch(*victim)
    assert (refused.value.status_name, refused.value.reason) == ("DATA_LOSS", "DECRYPTION_FAILED")


def test_an_unbound_artifact_loads_only_where_accepted(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format-2 artifact (body under the slot key itself, as published before format 3) is
    refused by a default inference server and client, with the reason and what to do; accepted
    where unbound artifacts are (while re-publishing)."""
    name = "acme/legacy"
    path = _model_as(env, "single", "legacy", seed=0)
    broker = kb_grpc.KeyBrokerServiceStub(env.stack.channel(env.publisher, "keybroker"))
    key = broker.GenerateDataKey(data_key_request(KEY, (name, "1")), timeout=30)
    slot_key = env.key_release().release(KEY, key.key_version, key.wrapped_data_key).dek
    put_encrypted(env.stack, path, name, KEY, key, format_version=2, dek=slot_key)
    control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
    with pytest.raises(grpc.RpcError) as info:
        control.LoadModel(control_pb.LoadModelRequest(name=name, version="1"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    details = info.value.details() or ""
    assert details.startswith("ARTIFACT_KEY_UNBOUND: ") and "re-publish" in details
    with pytest.raises(StrongroomError) as refused:
        env.fetcher().fetch(name, "1")
    assert refused.value.reason == "ARTIFACT_KEY_UNBOUND"
    accepting = ModelFetcher(
        env.stack.channel(env.inference, "modelstore"), env.key_release(), accept_unbound=True
    )
    with accepting.fetch(name, "1") as model:
        assert model.parts[0].view == path.read_bytes()
    # The command line: refused, unless told to accept it.
    monkeypatch.setattr(
        cli_models, "select_attester", lambda kind, production: env.key_release()._attester
    )
    fetch = ["model", "fetch", name, "1", "--to-memory", "--part", "legacy", "--client-config"]
    fetch.append(str(env.stack.write_client_config("inference")))
    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main(fetch)
    writer.close()
    thread.join(30)
    assert code == 1 and "ARTIFACT_KEY_UNBOUND" in capsys.readouterr().err
    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main([*fetch, "--accept-unbound"])
    writer.close()
    thread.join(30)
    assert code == 0, capsys.readouterr().err
    assert received == [path.read_bytes()]


def _key_releases(audit: Path) -> int:
    """How many key releases the broker's audit log at ``audit`` records."""
    return sum(r["action"] == "key_release" for r in read_audit_records(audit))


@pytest.mark.parametrize("layout", ["single", "parts"])
def test_a_model_under_a_key_its_name_is_not_pinned_to_is_refused_before_any_release(
    env: Env, layout: str
) -> None:
    """A reader pinning model names to keys refuses a model the store serves under another key
    (one whose policy lets some publisher get keys for any name), and asks for no key."""
    from strongroom.client.keypins import KeyPins

    name = f"pinned/{layout}"
    path = _model_as(env, layout, f"pinned-{layout}", seed=13)
    _publish_as(env, layout, path, name, "1", env.stack.channel(env.publisher, "keybroker"))
    audit = env.stack.root / "state" / "keybroker" / "audit.log"
    before = _key_releases(audit)
    wrong = KeyPins((("pinned/", "tenant-b-kek"),))
    loaders = (
        lambda pins: ModelLoader(
            ModelRepository(),
            store_channel=env.stack.channel(env.inference, "modelstore"),
            key_release=env.key_release(),
            key_pins=pins,
        ).load(name, "1"),
        lambda pins: (
            ModelFetcher(
                env.stack.channel(env.inference, "modelstore"), env.key_release(), key_pins=pins
            )
            .fetch(name, "1")
            .close()
        ),
    )
    for load in loaders:
        with pytest.raises(StrongroomError) as info:
            load(wrong)
        assert (info.value.status_name, info.value.reason) == (
            "FAILED_PRECONDITION",
            "MODEL_KEY_NOT_ALLOWED",
        )
        assert f"under key {KEY!r}" in info.value.message
    assert _key_releases(audit) == before  # no key was asked for
    for load in loaders:
        load(KeyPins(((f"{name}", KEY), ("pinned/", "tenant-b-kek"))))


def test_a_multi_part_model_larger_than_the_limit_is_refused_before_its_parts(env: Env) -> None:
    """max_model_bytes bounded single artifacts only: a multi-part model of any total size was
    fetched into memory part by part (each part an allocation of the size it declares)."""
    path = env.publish("capped", seed=14)
    total = sum(f.stat().st_size for f in path.parent.iterdir())
    store = env.stack.channel(env.inference, "modelstore")

    def loader(limit: int) -> ModelLoader:
        return ModelLoader(
            ModelRepository(), store_channel=store, key_release=env.key_release(),
            max_model_bytes=limit,
        )  # fmt: skip

    with pytest.raises(StrongroomError) as info:
        loader(total - 1).load(NAME, "capped")
    assert (info.value.status_name, info.value.reason) == (
        "RESOURCE_EXHAUSTED",
        "ARTIFACT_TOO_LARGE",
    )
    assert f"declares {total} bytes in 5 parts" in info.value.message
    with pytest.raises(StrongroomError) as fetched:
        ModelFetcher(store, env.key_release(), max_model_bytes=total - 1).fetch(NAME, "capped")
    assert fetched.value.reason == "ARTIFACT_TOO_LARGE"
    loader(total).load(NAME, "capped")


class _UnboundAnswer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """A broker older than format 3: it ignores the model and binds nothing."""

    def __init__(self, bound: tuple[str, str]) -> None:
        self.bound = bound

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/GenerateDataKey"):
            answer = outcome.result()
            answer.bound_model_name, answer.bound_model_version = self.bound
        return outcome


@pytest.mark.parametrize("layout", ["single", "parts"])
@pytest.mark.parametrize("bound", [("", ""), (NAME, "other")])
def test_a_data_key_the_broker_did_not_bind_to_the_model_is_not_published(
    env: Env, layout: str, bound: tuple[str, str]
) -> None:
    """Against a broker that does not bind data keys (its answer names no model, or another),
    a publish wrote a format-3 artifact under the bare key, which no reader could open."""
    version = f"unbound-{layout}-{bound[1] or 'none'}"
    path = _model_as(env, layout, version, seed=15)
    broker = grpc.intercept_channel(
        env.stack.channel(env.publisher, "keybroker"), _UnboundAnswer(bound)
    )
    with pytest.raises(StrongroomError) as info:
        _publish_as(env, layout, path, NAME, version, broker)
    assert (info.value.status_name, info.value.reason) == (
        "FAILED_PRECONDITION",
        "DATA_KEY_NOT_BOUND",
    )
    stub = store_grpc.ModelStoreServiceStub(env.stack.channel(env.publisher, "modelstore"))
    listed = stub.ListModels(store_pb.ListModelsRequest(name_prefix=NAME), timeout=30).models
    assert not [m for m in listed if m.version.startswith(version)]


def test_a_pinned_load_refuses_a_republished_version_it_was_not_pinned_to(env: Env) -> None:
    """A version deleted and published again has two valid artifacts, and the store chooses
    which it serves; the header digest (it binds the creation time) tells them apart."""
    name = "replay/single"
    path = _model_as(env, "single", "replay-single", seed=16)
    broker = env.stack.channel(env.publisher, "keybroker")
    old = _publish_as(env, "single", path, name, "1", broker)
    admin_store = store_grpc.ModelStoreServiceStub(env.stack.channel(env.admin, "modelstore"))
    admin_store.DeleteModel(store_pb.DeleteModelRequest(name=name, version="1"), timeout=30)
    new = _publish_as(env, "single", path, name, "1", broker)
    assert old != new
    control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
    with pytest.raises(grpc.RpcError) as info:
        control.LoadModel(control_pb.LoadModelRequest(name=name, version="1", header_sha256=old))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert (info.value.details() or "").startswith("HEADER_PIN_MISMATCH: ")
    with pytest.raises(grpc.RpcError) as malformed:
        control.LoadModel(control_pb.LoadModelRequest(name=name, version="1", header_sha256="ab"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    control.LoadModel(control_pb.LoadModelRequest(name=name, version="1", header_sha256=new))


def test_a_pinned_multi_part_fetch_refuses_another_manifest(env: Env) -> None:
    name = "replay/parts"
    broker = env.stack.channel(env.publisher, "keybroker")
    pins = {
        v: _publish_as(
            env, "parts", _model_as(env, "parts", f"replay-{v}", seed=17), name, v, broker
        )
        for v in ("1", "2")
    }
    with pytest.raises(StrongroomError) as info:
        env.fetcher().fetch(name, "2", header_sha256=bytes.fromhex(pins["1"]))
    assert (info.value.status_name, info.value.reason) == (
        "FAILED_PRECONDITION",
        "HEADER_PIN_MISMATCH",
    )
    env.fetcher().fetch(name, "2", header_sha256=bytes.fromhex(pins["2"])).close()
    control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
    with pytest.raises(grpc.RpcError) as refused:
        control.LoadModel(
            control_pb.LoadModelRequest(name=name, version="2", header_sha256=pins["1"])
        )
    assert (refused.value.details() or "").startswith("HEADER_PIN_MISMATCH: ")


def test_cli_fetch_and_load_pin_the_header_digest_model_publish_printed(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`model fetch` and `inference load` could not pin a version (the library and LoadModel
    could): whatever artifact the store served for the name and version was decrypted and
    written out, or served. With --header-sha256 another artifact is refused before any key is
    released, as the library and LoadModel refuse it, and a malformed digest is a usage error."""
    name = "replay/cli"
    path = _model_as(env, "single", "replay-cli", seed=18)
    publisher = str(env.stack.write_client_config("publisher"))
    printed = {}
    for version in ("1", "2"):
        publish = ["model", "publish", str(path), "--name", name, "--version", version]
        code = cli_main([*publish, "--key-id", KEY, "--no-progress", "--client-config", publisher])
        assert code == 0, capsys.readouterr().err
        printed[version] = json.loads(capsys.readouterr().out)["header_sha256"]
    monkeypatch.setattr(
        cli_models, "select_attester", lambda kind, production: env.key_release()._attester
    )
    fetch = ["model", "fetch", name, "2", "--to-memory", "--client-config"]
    fetch.append(str(env.stack.write_client_config("inference")))
    audit = env.stack.root / "state" / "keybroker" / "audit.log"
    before = _key_releases(audit)

    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main([*fetch, "--header-sha256", printed["1"]])
    writer.close()
    thread.join(30)
    err = capsys.readouterr().err
    assert code == 1 and "HEADER_PIN_MISMATCH: " in err, err
    assert received == [b""]  # nothing written
    assert _key_releases(audit) == before  # no key was asked for

    for malformed in (printed["2"].upper(), printed["2"][:-1], "not-hex"):
        with pytest.raises(SystemExit) as usage:
            cli_main([*fetch, "--header-sha256", malformed])
        assert usage.value.code == 2
        assert "64 lower-case hexadecimal digits" in capsys.readouterr().err

    writer, received, thread = _pipe_stdout(monkeypatch)
    code = cli_main([*fetch, "--header-sha256", printed["2"]])
    writer.close()
    thread.join(30)
    assert code == 0, capsys.readouterr().err
    assert received == [path.read_bytes()]

    monkeypatch.undo()  # standard output as captured again, for the load's printed answer
    load = ["inference", "load", name, "2", "--client-config"]
    load.append(str(env.stack.write_client_config("admin")))
    before = _key_releases(audit)
    code = cli_main([*load, "--header-sha256", printed["1"]])
    err = capsys.readouterr().err
    assert code == 1 and "FAILED_PRECONDITION: HEADER_PIN_MISMATCH: " in err, err
    assert _key_releases(audit) == before
    with pytest.raises(SystemExit) as usage:
        cli_main([*load, "--header-sha256", "not-hex"])
    assert usage.value.code == 2 and "64 lower-case" in capsys.readouterr().err
    assert cli_main([*load, "--header-sha256", printed["2"]]) == 0, capsys.readouterr().err
    assert env.stack.services["inference"].handle.repository.is_ready(name, "2")


def test_a_cancelled_multi_part_load_stops_its_part_downloads(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a single artifact (test_faults): a LoadModel cancelled while a part downloads stops
    there, its parts' downloads (on the fetcher's threads) included, and frees the model."""
    env.publish("serving-parts", seed=19)
    env.publish("cancelled-parts", seed=20)
    storage = env.stack.services["modelstore"].handle.storage
    stall = StallOnce(storage, "cancelled-parts+part.2")
    monkeypatch.setattr(storage, "open", stall)
    inference = env.stack.services["inference"].handle
    try:
        env.load("serving-parts")
        control = control_grpc.ModelControlServiceStub(env.stack.channel(env.admin, "inference"))
        call = control.LoadModel.future(
            control_pb.LoadModelRequest(name=NAME, version="cancelled-parts"), timeout=120
        )
        assert stall.stalled.wait(60)
        call.cancel()
        env.load("serving-parts")  # the model is free while the store still stalls that part
        versions = {v.version: v for v in inference.repository.status(NAME).versions}
        failure = versions["cancelled-parts"].failure
        assert failure is not None and failure.reason == "LOAD_CANCELLED"
        assert inference.repository.status(NAME).default_version == "serving-parts"
    finally:
        stall.go_on.set()
    env.load("cancelled-parts")
    assert env.ready("cancelled-parts")
