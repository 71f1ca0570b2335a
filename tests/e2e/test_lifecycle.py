"""The whole lifecycle across all three services: real step-ca, SoftHSM2, mTLS and ONNX Runtime.

Train → publish (encrypted at birth) → store → attested load in the "confidential VM" → serve over
OIP v2; then the refusals: a tampered artifact, a measurement outside the policy, a debug VM, and
clients without a valid certificate.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.client.keyrelease import EPHEMERAL_KEY_BITS
from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import TrainedModel, train
from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
from strongroom.errors import StrongroomError
from strongroom.inference.loader import ModelLoader
from strongroom.inference.models import LoadedModel, ModelRepository
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.config import TracingConfig
from strongroom.runtime.metrics import install_meter_provider

KEY = "classifier"


@dataclasses.dataclass
class Lifecycle:
    stack: DevStack
    model: TrainedModel
    admin: WorkloadIdentity
    publisher: WorkloadIdentity
    client: WorkloadIdentity
    spans: InMemorySpanExporter
    born_ns: int
    """Wall clock (ns) just before the model was trained: no file changed before holds its bytes."""

    def control(self) -> control_grpc.ModelControlServiceStub:
        return control_grpc.ModelControlServiceStub(self.stack.channel(self.admin, "inference"))

    def oip(self, identity: WorkloadIdentity | None = None) -> oip_grpc.GRPCInferenceServiceStub:
        return oip_grpc.GRPCInferenceServiceStub(
            self.stack.channel(identity or self.client, "inference")
        )

    def publish(self, version: str, path: Path | None = None) -> None:
        publish_model(
            path or self.model.path,
            name="classifier",
            version=version,
            key_id=KEY,
            broker=self.stack.channel(self.publisher, "keybroker"),
            store=self.stack.channel(self.publisher, "modelstore"),
        )


METRICS = InMemoryMetricReader()


@pytest.fixture(scope="module")
def life(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lifecycle]:
    install_meter_provider("e2e", TracingConfig(), reader=METRICS)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    # Restart the broker and store with the shared tracer so that one trace can span all three.
    for name in ("keybroker", "modelstore"):
        stack.services.pop(name).stop()
        stack.start_in_process(name, tracer_provider=provider)
    stack.start_in_process("inference", tracer_provider=provider)
    admin, publisher, client = (stack.identity(n) for n in ("admin", "publisher", "client"))
    stack.create_release_key(admin, KEY, policy_version="lifecycle-1")
    # A seed of its own, so that this run's weights (the on-disk canary below) are unique.
    born_ns = time.time_ns()
    model = train(
        tmp_path_factory.mktemp("model") / "model.onnx", seed=int.from_bytes(os.urandom(4))
    )
    life = Lifecycle(stack, model, admin, publisher, client, spans, born_ns)
    life.publish("1")
    yield life


def infer(life: Lifecycle, x: np.ndarray, version: str = "") -> np.ndarray:
    request = oip_pb.ModelInferRequest(
        model_name="classifier",
        model_version=version,
        inputs=[
            oip_pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[x.astype("<f4").tobytes()],
    )
    response = life.oip().ModelInfer(request, timeout=30)
    out = response.outputs[0]
    assert out.name == "probabilities" and out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(out.shape))


def test_attested_load_then_inference_matches_the_plaintext_model(life: Lifecycle) -> None:
    life.spans.clear()
    response = life.control().LoadModel(
        control_pb.LoadModelRequest(name="classifier", version="1"), timeout=120
    )
    assert response.decision_id
    assert set(response.timings) == {"attest_and_release", "key_wait", "fetch_and_decrypt", "load"}
    ready = life.oip().ModelReady(
        oip_pb.ModelReadyRequest(name="classifier", version="1"), timeout=10
    )
    assert ready.ready
    assert life.oip().ServerReady(oip_pb.ServerReadyRequest(), timeout=10).ready
    np.testing.assert_allclose(
        infer(life, life.model.sample), life.model.predict(life.model.sample), rtol=1e-5, atol=1e-6
    )
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    np.testing.assert_allclose(infer(life, x), life.model.predict(x), rtol=1e-5, atol=1e-6)


def test_one_trace_spans_inference_store_and_broker(life: Lifecycle) -> None:
    life.spans.clear()
    life.control().LoadModel(
        control_pb.LoadModelRequest(name="classifier", version="1"), timeout=120
    )
    spans = life.spans.get_finished_spans()
    load = next(s for s in spans if s.name == "strongroom.inference.load_model")
    trace_id = load.context.trace_id
    in_trace = {s.name for s in spans if s.context.trace_id == trace_id}
    for method in (
        "/strongroom.api.modelstore.v1.ModelStoreService/GetModel",
        "/strongroom.api.keybroker.v1.KeyBrokerService/GetChallenge",
        "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey",
    ):
        assert method in in_trace, f"{method} not in the load's trace: {sorted(in_trace)}"
    servers = [s for s in spans if s.context.trace_id == trace_id and s.kind.name == "SERVER"]
    assert {s.name for s in servers} >= {
        "/strongroom.api.modelstore.v1.ModelStoreService/GetModel",
        "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey",
    }


def test_plaintext_never_reaches_the_disk(life: Lifecycle) -> None:
    # A distinctive run of the model's weights, as serialized in the plaintext ONNX file.
    canary = life.model.weights.astype("<f4").tobytes()[:32]
    assert canary in life.model.path.read_bytes()
    life.control().LoadModel(
        control_pb.LoadModelRequest(name="classifier", version="1"), timeout=120
    )
    hits = []
    # The canary did not exist before the fixture trained the model, so only files whose inode
    # changed since can hold it: the kernel sets st_ctime on every write, rename, link and utime,
    # and nothing can set it back. Reading only those (instead of all of TMPDIR, where this
    # session's and earlier sessions' temporary directories are, gigabytes on CI) took the test
    # from 40 s to 6 s here. The second of slack covers the kernel's coarse file clock.
    changed_since = life.born_ns - 1_000_000_000
    for root in (life.stack.root, Path(os.environ.get("TMPDIR", "/tmp"))):
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f)
                try:
                    st = p.stat()
                except OSError:
                    continue
                if (
                    p == life.model.path
                    or not stat.S_ISREG(st.st_mode)
                    or st.st_size > 64 * 1024 * 1024
                    or st.st_ctime_ns < changed_since
                ):
                    continue
                try:
                    if canary in p.read_bytes():
                        hits.append(p)
                except OSError:
                    continue
    assert hits == [], f"plaintext model bytes found on disk: {hits}"


def test_tampered_artifact_is_refused_and_model_stays_unready(life: Lifecycle) -> None:
    # Loaded here, not left to an earlier test: the good version must be serving before, too.
    life.control().LoadModel(
        control_pb.LoadModelRequest(name="classifier", version="1"), timeout=120
    )
    life.publish("tampered")
    store = life.stack.services["modelstore"].handle.storage
    record = store.stat("classifier", "tampered")
    blob = next(p for p in (store.root / "blobs").rglob(record.artifact_sha256))
    blob.chmod(0o600)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit in the middle of the body
    blob.write_bytes(bytes(data))
    with pytest.raises(grpc.RpcError) as info:
        life.control().LoadModel(
            control_pb.LoadModelRequest(name="classifier", version="tampered"), timeout=120
        )
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()  # type: ignore[attr-defined]
    ready = life.oip().ModelReady(
        oip_pb.ModelReadyRequest(name="classifier", version="tampered"), timeout=10
    )
    assert not ready.ready
    # The good version keeps serving.
    assert (
        life.oip()
        .ModelReady(oip_pb.ModelReadyRequest(name="classifier", version="1"), timeout=10)
        .ready
    )


def other_vm_loader(life: Lifecycle, **claims: object) -> ModelLoader:
    """The same loader code in another (simulated) VM with different launch claims."""
    identity = life.stack.identity("inference")
    return ModelLoader(
        ModelRepository(),
        store_channel=life.stack.channel(identity, "modelstore"),
        key_release=life.stack.release_client(identity, life.stack.simulated_attester(claims)),
    )


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"measurement": bytes.fromhex("ab" * 48)}, "MEASUREMENT_NOT_ALLOWED"),
        (
            {"measurement": bytes.fromhex(DEMO_MEASUREMENT), "policy": 0x30000 | 1 << 19},
            "DEBUG_FORBIDDEN",
        ),
    ],
    ids=["measurement not in policy", "debug VM"],
)
def test_vm_outside_the_policy_gets_no_key(
    life: Lifecycle, claims: dict[str, object], reason: str
) -> None:
    loader = other_vm_loader(life, **claims)
    with pytest.raises(StrongroomError) as info:
        loader.load("classifier", "1")
    assert info.value.reason == reason
    status = loader._repository.status("classifier")
    assert not status.ready
    assert status.versions[-1].failure is not None and status.versions[-1].failure.reason == reason


def test_client_with_another_ca_certificate_is_rejected(life: Lifecycle, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(life.stack.spiffe_id("client"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    creds = grpc.ssl_channel_credentials(
        life.stack.ca.root_pem,  # type: ignore[union-attr]
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )
    channel = grpc.secure_channel(
        life.stack.address("inference"),
        creds,
        options=[("grpc.ssl_target_name_override", "inference")],
    )
    with pytest.raises(grpc.RpcError) as info:
        oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            oip_pb.ServerLiveRequest(), timeout=10
        )
    # Rejected in the TLS handshake, before any handler (see pki/README.md).
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    channel.close()


def test_client_without_certificate_is_rejected(life: Lifecycle) -> None:
    channel = grpc.secure_channel(
        life.stack.address("inference"),
        grpc.ssl_channel_credentials(life.stack.ca.root_pem),  # type: ignore[union-attr]
        options=[("grpc.ssl_target_name_override", "inference")],
    )
    with pytest.raises(grpc.RpcError) as info:
        oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            oip_pb.ServerLiveRequest(), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    channel.close()


def test_valid_certificate_wrong_identity_is_denied(life: Lifecycle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        life.oip(life.publisher).ServerLive(oip_pb.ServerLiveRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        control_grpc.ModelControlServiceStub(
            life.stack.channel(life.client, "inference")
        ).LoadModel(control_pb.LoadModelRequest(name="classifier", version="1"), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def _points(name: str) -> list[tuple[dict[str, Any], Any]]:
    data = METRICS.get_metrics_data()
    out = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    out += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return out


def test_metrics_for_loads_releases_and_inference(life: Lifecycle) -> None:
    life.control().LoadModel(
        control_pb.LoadModelRequest(name="classifier", version="1"), timeout=120
    )
    infer(life, life.model.sample)
    loads = _points("strongroom.inference.model_load.duration")
    assert any(a.get("outcome") == "loaded" and p.count >= 1 for a, p in loads)  # type: ignore[attr-defined]
    releases = _points("strongroom.keybroker.releases")
    assert any(
        a == {"outcome": "allowed", "reason": "RELEASED"} and p.value >= 1 for a, p in releases
    )  # type: ignore[attr-defined]
    rpcs = _points("strongroom.rpc.server.duration")
    assert any(
        a.get("rpc.method") == "/inference.GRPCInferenceService/ModelInfer"
        and a.get("rpc.status") == "OK"
        for a, _ in rpcs
    )


TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

url, root, key, chain, x_path = sys.argv[1:6]
client = triton.InferenceServerClient(
    url, ssl=True, root_certificates=root, private_key=key, certificate_chain=chain
)
x = np.load(x_path)
inp = triton.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("classifier", [inp], outputs=[triton.InferRequestedOutput("probabilities")])
meta = client.get_model_metadata("classifier")
print(json.dumps({
    "live": client.is_server_live(),
    "model_ready": client.is_model_ready("classifier", "1"),
    "extensions": list(client.get_server_metadata().extensions),
    "inputs": [i.name for i in meta.inputs],
    "out": result.as_numpy("probabilities").tolist(),
}))
"""


def test_unmodified_tritonclient_over_mtls(life: Lifecycle, tmp_path: Path) -> None:
    """tritonclient[grpc], unchanged, talks OIP v2 to the real server over mutual TLS."""
    import subprocess
    import sys

    life.control().LoadModel(
        control_pb.LoadModelRequest(name="classifier", version="1"), timeout=120
    )
    creds = life.client.credentials
    files = {"root": life.stack.ca.root_pem, "key": creds.key_pem, "chain": creds.chain_pem}  # type: ignore[union-attr]
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.pem"
        path.touch(mode=0o600)
        path.write_bytes(data)
        paths[name] = str(path)
    np.save(tmp_path / "x.npy", life.model.sample)
    port = life.stack.address("inference").rsplit(":", 1)[1]
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            TRITON_SCRIPT,
            f"localhost:{port}",
            paths["root"],
            paths["key"],
            paths["chain"],
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = __import__("json").loads(run.stdout.strip().splitlines()[-1])
    assert out["live"] and out["model_ready"]
    assert "strongroom_attestation" in out["extensions"]
    assert out["inputs"] == ["input"]
    np.testing.assert_allclose(
        np.array(out["out"]), life.model.predict(life.model.sample), rtol=1e-5, atol=1e-6
    )


def test_store_reports_what_the_artifact_claims(life: Lifecycle) -> None:
    import hashlib

    from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
    from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc

    store = store_grpc.ModelStoreServiceStub(life.stack.channel(life.publisher, "modelstore"))
    info = store.StatModel(
        store_pb.StatModelRequest(name="classifier", version="1"), timeout=10
    ).model
    plaintext = life.model.path.read_bytes()
    assert info.plaintext_sha256 == hashlib.sha256(plaintext).hexdigest()
    assert info.plaintext_size == len(plaintext)
    assert (info.key_id, info.content_type) == (KEY, "application/vnd.onnx")


def test_signed_model_loads_only_with_a_valid_signature(life: Lifecycle, tmp_path: Path) -> None:
    """Signed at publish with OpenSSF model-signing; verified in memory against the decrypted bytes."""
    from cryptography.hazmat.primitives import serialization as ser

    from strongroom.inference.signature import SignaturePolicy

    def keypair(name: str) -> tuple[Path, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        path = tmp_path / f"{name}.pem"
        path.write_bytes(
            key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        )
        path.chmod(0o600)  # a signing key others may read is refused
        return path, key.public_key().public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
        )

    signer, signer_public = keypair("signer")
    _, stranger_public = keypair("stranger")
    publish_model(
        life.model.path,
        name="classifier",
        version="signed",
        key_id=KEY,
        broker=life.stack.channel(life.publisher, "keybroker"),
        store=life.stack.channel(life.publisher, "modelstore"),
        signing_key=signer,
    )

    def loader(policy: SignaturePolicy) -> ModelLoader:
        identity = life.stack.identity("inference")
        return ModelLoader(
            ModelRepository(),
            store_channel=life.stack.channel(identity, "modelstore"),
            key_release=life.stack.release_client(identity),
            signature=policy,
        )

    good = loader(SignaturePolicy.from_pem(signer_public))
    good.load("classifier", "signed")
    assert good._repository.is_ready("classifier", "signed")

    stranger = loader(SignaturePolicy.from_pem(stranger_public))
    with pytest.raises(StrongroomError) as info:
        stranger.load("classifier", "signed")
    assert info.value.reason == "MODEL_SIGNATURE_INVALID"
    assert not stranger._repository.is_ready("classifier")

    with pytest.raises(StrongroomError) as info:
        good.load("classifier", "1")  # published unsigned
    assert info.value.reason == "MODEL_SIGNATURE_MISSING"


def test_a_model_unloaded_while_it_loads_is_not_served_afterwards(
    life: Lifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unload that arrives while the model is downloading or loading wins: the load's result
    is dropped and the caller told so. Before, the finished load published the model again, so
    an operator who unloaded a version (a bad one, say) saw it come back a moment later."""
    loader = other_vm_loader(life, measurement=bytes.fromhex(DEMO_MEASUREMENT))
    repository = loader._repository
    in_load, go_on = threading.Event(), threading.Event()
    original = LoadedModel.from_bytes.__func__  # type: ignore[attr-defined]

    def held(cls: type[LoadedModel], *args: Any, **kwargs: Any) -> LoadedModel:
        in_load.set()
        assert go_on.wait(30)
        return original(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(LoadedModel, "from_bytes", classmethod(held))
    outcome: list[object] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_call_or_error(lambda: loader.load("classifier", "1")))
    )
    thread.start()
    assert in_load.wait(60)
    repository.unload("classifier", "1")
    go_on.set()
    thread.join(60)
    (result,) = outcome
    assert isinstance(result, StrongroomError), result
    assert (result.status_name, result.reason) == ("FAILED_PRECONDITION", "MODEL_UNLOADED")
    assert not repository.is_ready("classifier", "1")
    assert "classifier" not in repository.names()
    # Loading it again afterwards works as usual.
    monkeypatch.undo()
    loader.load("classifier", "1")
    assert repository.is_ready("classifier", "1")


def _call_or_error(fn: Any) -> object:
    try:
        return fn()
    except Exception as exc:
        return exc


def test_the_next_ephemeral_key_is_made_once_the_download_is_in(
    life: Lifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release happens a few milliseconds into the download; the next key's 0.1-0.3 s of
    CPU used to start right then, beside the download and decryption (both cores busy). It
    starts once the model is downloaded, beside ONNX Runtime's load (one core busy)."""
    loader = other_vm_loader(life, measurement=bytes.fromhex(DEMO_MEASUREMENT))
    key_release = loader._release
    assert key_release._next_key is not None
    key_release._next_key.result(60)
    queued: dict[str, object] = {}
    release, from_bytes = key_release.release, LoadedModel.from_bytes.__func__  # type: ignore[attr-defined]

    def observed_release(*args: Any, **kwargs: Any) -> Any:
        released = release(*args, **kwargs)
        queued["after the release"] = key_release._next_key
        return released

    def observed_load(cls: type[LoadedModel], *args: Any, **kwargs: Any) -> LoadedModel:
        queued["when ONNX Runtime loads"] = key_release._next_key
        return from_bytes(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(key_release, "release", observed_release)
    monkeypatch.setattr(LoadedModel, "from_bytes", classmethod(observed_load))
    loader.load("classifier", "1")
    assert queued["after the release"] is None
    next_key = queued["when ONNX Runtime loads"]
    assert isinstance(next_key, Future)
    assert next_key.result(60).key_size == EPHEMERAL_KEY_BITS


def test_rewraps_of_keys_that_do_not_exist_are_not_metric_labels(life: Lifecycle) -> None:
    """A publisher's ReWrap under made-up key ids labelled the counter with each: enough of them
    push the real keys' series into the SDK's overflow bucket."""
    broker = kb_grpc.KeyBrokerServiceStub(life.stack.channel(life.publisher, "keybroker"))
    for i in range(3):
        request = kb_pb.ReWrapRequest(
            key_id=f"made-up-{i}", key_version=1, wrapped_data_key=b"\x01" * 40
        )
        with pytest.raises(grpc.RpcError):
            broker.ReWrap(request, timeout=30)
    labels = {a.get("key_id") for a, _ in _points("strongroom.keybroker.rewraps")}
    assert not any(str(label).startswith("made-up") for label in labels), labels
    assert "" in labels  # counted, without the made-up key
