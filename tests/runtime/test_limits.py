"""One owner per limit (issue 11, findings 2, 5 and 8): message sizes come from each service's
API, contradicting settings are refused, loopback names only in development."""

from __future__ import annotations

from pathlib import Path

import pytest

from strongroom.api.inference.v1 import attestation_pb2, model_control_pb2
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.artifact.format import MAX_WRAPPED_DEK_SIZE
from strongroom.identifiers import MAX_NAME_LENGTH, MAX_VERSION_LENGTH
from strongroom.inference.config import InferenceConfig, ModelKeys, ModelRef
from strongroom.inference.control import CONTROL_SERVICE as CONTROL
from strongroom.inference.oip import SERVICE_NAME as OIP
from strongroom.inference.oip import InferLimits
from strongroom.inference.server import EVIDENCE_SERVICE as EVIDENCE
from strongroom.keybroker.policy_bounds import MAX_POLICY_BYTES
from strongroom.keybroker.service import MESSAGE_LIMITS as BROKER
from strongroom.modelstore._pagetoken import MAX_TOKEN_LENGTH
from strongroom.modelstore.service import DEFAULT_DOWNLOAD_CHUNK, DEFAULT_MAX_CHUNK, message_limits
from strongroom.modelstore.service import SERVICE_NAME as STORE
from strongroom.runtime.config import ConfigError, ServerConfig, load_service_config
from strongroom.runtime.server import MessageLimits, ServiceHost

COMMON = """
service: {service}
mode: {mode}
listen: 127.0.0.1:7443
identity:
  trust_domain: strongroom.test
  spiffe_id: spiffe://strongroom.test/{service}
  ca_url: https://127.0.0.1:9000
  ca_root_file: /tmp/root.pem
  dns_names: [{names}]
"""


def load(tmp_path: Path, *, mode: str, names: str, extra: str = "") -> None:
    path = tmp_path / "config.yaml"
    text = COMMON.format(service="inference", mode=mode, names=names) + extra
    path.write_text(text + "inference: {model_store: 'a:1', key_broker: 'b:1'}\n")
    load_service_config(path, "inference", InferenceConfig, environ={})


def test_the_broker_accepts_kib_not_64_mib() -> None:
    assert BROKER.receive <= 256 * 1024
    assert BROKER.receive >= 2 * MAX_POLICY_BYTES  # a policy document fits with room to spare


def test_the_store_limits_follow_its_chunk_sizes() -> None:
    limits = message_limits()
    assert DEFAULT_MAX_CHUNK < limits.receive <= DEFAULT_MAX_CHUNK + 64 * 1024
    assert DEFAULT_DOWNLOAD_CHUNK < limits.send <= 1024 * 1024
    assert message_limits(max_chunk=1 << 20).receive < limits.receive


def test_inference_message_limits_follow_its_tensor_limits() -> None:
    """Before: InferLimits advertised 256 MiB while the host capped messages at 64 MiB."""
    config = InferenceConfig(model_store="a:1", key_broker="b:1", max_input_bytes=8 << 20)
    limits = config.limits.message_limits
    assert config.limits.max_input_bytes == 8 << 20
    assert 8 << 20 < limits.receive <= 9 << 20
    assert InferLimits().message_limits.receive < 128 << 20
    assert not hasattr(InferLimits(), "max_message_bytes")


@pytest.mark.parametrize("value", [0, 2 << 30])
def test_impossible_tensor_limits_are_refused(value: int) -> None:
    with pytest.raises(ConfigError, match="max_input_bytes"):
        InferenceConfig(model_store="a:1", key_broker="b:1", max_input_bytes=value)


def test_server_message_sizes_can_no_longer_be_set_apart_from_the_api(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        load(
            tmp_path,
            mode="development",
            names="inference",
            extra="server: {max_receive_message_bytes: 67108864}\n",
        )


def test_a_data_plane_request_wait_covers_the_largest_request_at_the_stream_floor() -> None:
    """A data-plane call's request message may take as long as the stream floor allows the
    service's largest (at least 10 s); it is unbounded only with the floor off, unless set."""
    default = ServerConfig()
    assert default.request_wait_for(BROKER.receive) == 10.0  # 256 KiB: 4 s at 64 KiB/s
    inference = InferLimits().message_limits.receive  # 65 MiB: a large input tensor
    assert default.request_wait_for(inference) == inference / (64 * 1024)
    assert ServerConfig(stream_min_bytes_per_second=0).request_wait_for(BROKER.receive) is None
    assert ServerConfig(request_wait_seconds=2).request_wait_for(inference) == 2.0


STAT_MODEL = f"/{STORE}/StatModel"
MODEL_INFER = f"/{OIP}/ModelInfer"
MODEL_METADATA = f"/{OIP}/ModelMetadata"


def _waits(limits: MessageLimits, config: ServerConfig, *methods: str) -> list[float | None]:
    """The request waits a host built with ``limits`` and ``config`` gives ``methods``."""
    host = ServiceHost(
        listen="127.0.0.1:0", credentials=None, services=[], config=config, message_limits=limits
    )
    try:
        return [host.unary.request_wait(method) for method in methods]
    finally:
        host.stop(0)


def test_a_data_plane_request_wait_is_each_methods_own() -> None:
    """The wait was one bound per service, what its largest request needed: a store StatModel
    waited for its few bytes as long as a 4 MiB upload chunk takes at the floor (65 s), an
    inference ModelMetadata as long as a 64 MiB tensor (1,040 s). Each method's largest request
    sets its own now: only ModelInfer keeps the long wait; the broker's are all 10 s."""
    default = ServerConfig()
    store = message_limits()
    assert _waits(store, default, STAT_MODEL, f"/{STORE}/GetModel", f"/{STORE}/PutModel") == [
        10.0,
        10.0,
        store.receive / (64 * 1024),  # an upload chunk's, 65 s (its stream's own floor binds)
    ]
    inference = InferLimits().message_limits
    assert _waits(inference, default, MODEL_METADATA, f"/{EVIDENCE}/GetEvidence") == [16.0, 16.0]
    assert _waits(inference, default, MODEL_INFER) == [inference.receive / (64 * 1024)]
    assert _waits(BROKER, default, "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey") == [
        10.0
    ]


def test_an_explicit_request_wait_is_every_methods_and_no_floor_is_no_bound() -> None:
    """server.request_wait_seconds, set, wins over every method's default, ModelInfer's too;
    with the floor off and none set, no method's wait is bounded (its deadline alone)."""
    inference = InferLimits().message_limits
    assert _waits(inference, ServerConfig(request_wait_seconds=2), MODEL_METADATA, MODEL_INFER) == [
        2.0,
        2.0,
    ]
    off = ServerConfig(stream_min_bytes_per_second=0)
    assert _waits(inference, off, MODEL_METADATA, MODEL_INFER) == [None, None]


def test_a_methods_request_limit_must_be_within_the_services() -> None:
    limits = MessageLimits(receive=1 << 20, send=1 << 20, requests={STAT_MODEL: 1024})
    assert (limits.request(STAT_MODEL), limits.request(MODEL_INFER)) == (1024, 1 << 20)
    with pytest.raises(ValueError, match="StatModel"):
        MessageLimits(receive=1 << 20, send=1 << 20, requests={STAT_MODEL: 2 << 20})


@pytest.mark.parametrize("value", [0.0, 0.05, 3601.0])
def test_impossible_request_waits_are_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="request_wait_seconds must be between"):
        ServerConfig(request_wait_seconds=value)


def test_message_limits_are_bounded() -> None:
    with pytest.raises(ValueError, match="receive"):
        MessageLimits(receive=3 << 30, send=1 << 20)


def test_localhost_is_refused_in_production_and_allowed_in_development(tmp_path: Path) -> None:
    load(tmp_path, mode="development", names="inference, localhost")
    load(tmp_path, mode="production", names="inference")
    with pytest.raises(ConfigError, match="localhost only in development"):
        load(tmp_path, mode="production", names="inference, localhost")


@pytest.mark.parametrize("value", [-1, 3601])
def test_impossible_load_retry_windows_are_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="load_retry_seconds"):
        InferenceConfig(model_store="a:1", key_broker="b:1", load_retry_seconds=value)


def test_decrypt_threads_default_to_the_receiving_thread_and_stay_bounded() -> None:
    assert InferenceConfig(model_store="a:1", key_broker="b:1").decrypt_threads == 0
    InferenceConfig(model_store="a:1", key_broker="b:1", decrypt_threads=64)
    for value in (-1, 65):
        with pytest.raises(ConfigError, match="decrypt_threads must be between 0 and 64"):
            InferenceConfig(model_store="a:1", key_broker="b:1", decrypt_threads=value)


def test_the_inference_memory_cap_has_a_floor_and_reaches_the_sessions() -> None:
    config = InferenceConfig(
        model_store="a:1", key_broker="b:1", max_inference_memory_bytes=1 << 30
    )
    assert config.runtime.max_inference_memory_bytes == 1 << 30
    with pytest.raises(ConfigError, match="max_inference_memory_bytes must be at least"):
        InferenceConfig(model_store="a:1", key_broker="b:1", max_inference_memory_bytes=1 << 20)


def test_the_response_memory_budget_is_validated_and_made_from_the_settings() -> None:
    config = InferenceConfig(
        model_store="a:1",
        key_broker="b:1",
        max_response_memory_bytes=256 << 20,
        response_memory_wait_seconds=2.5,
    )
    budget = config.response_budget()
    assert (budget.max_bytes, budget.wait_seconds, budget.free) == (256 << 20, 2.5, 256 << 20)
    default = InferenceConfig(model_store="a:1", key_broker="b:1").response_budget()
    assert (default.max_bytes, default.wait_seconds) == (1 << 30, 5.0)
    with pytest.raises(ConfigError, match="max_response_memory_bytes must be at least 16777216"):
        InferenceConfig(model_store="a:1", key_broker="b:1", max_response_memory_bytes=1 << 20)
    for wait in (-1.0, 61.0):
        with pytest.raises(ConfigError, match="response_memory_wait_seconds must be between 0"):
            InferenceConfig(model_store="a:1", key_broker="b:1", response_memory_wait_seconds=wait)


def test_models_let_through_the_string_check_are_name_rules_and_reach_the_sessions() -> None:
    config = InferenceConfig(
        model_store="a:1",
        key_broker="b:1",
        max_input_bytes=1 << 20,
        string_expansion_models=("tenant-a/", "solo"),
    )
    runtime = config.runtime
    assert runtime.max_input_bytes == 1 << 20  # what a request brings the string check
    assert runtime.allows_string_expansion("tenant-a/m") and runtime.allows_string_expansion("solo")
    assert not runtime.allows_string_expansion("tenant-ab/m")
    assert not runtime.allows_string_expansion("solo2")
    everyone = InferenceConfig(model_store="a:1", key_broker="b:1", allow_string_expansion=True)
    assert everyone.runtime.allows_string_expansion("any")
    with pytest.raises(ConfigError, match=r"string_expansion_models: '\.\./x' is not a model name"):
        InferenceConfig(model_store="a:1", key_broker="b:1", string_expansion_models=("../x",))


def test_model_keys_pin_names_to_keys() -> None:
    config = InferenceConfig(
        model_store="a:1",
        key_broker="b:1",
        model_keys=(ModelKeys("kek-a", ("tenant-a/", "shared/m")), ModelKeys("kek-b", ("b/",))),
    )
    assert config.key_pins.keys_for("tenant-a/x") == {"kek-a"}
    assert config.key_pins.keys_for("c/x") == frozenset()
    assert InferenceConfig(model_store="a:1", key_broker="b:1").key_pins.keys_for("c/x") is None


@pytest.mark.parametrize(
    ("key_id", "names", "message"),
    [
        ("Kek A", ("a/",), "is not a key id"),
        ("kek", (), "lists no model_names"),
        ("kek", ("a/", "*"), "'*' is not a model name"),
        ("kek", ("a//",), "'a//' is not a model name"),
    ],
)
def test_malformed_model_keys_are_refused(
    key_id: str, names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelKeys(key_id, names)


def test_a_configured_model_may_pin_its_header() -> None:
    assert ModelRef("a/m", "1").pin is None
    assert ModelRef("a/m", "1", "ab" * 32).pin == bytes.fromhex("ab" * 32)
    for bad in ("AB" * 32, "ab", "zz" * 32):
        with pytest.raises(ConfigError, match="header_sha256 of a/m/1"):
            ModelRef("a/m", "1", bad)


def test_the_largest_legitimate_small_request_fits_its_methods_limit() -> None:
    """The per-method sizes refuse a request over them MESSAGE_TOO_LARGE: the largest request the
    services accept of each such method (the longest names, versions, page token and wrapped keys
    they allow) must fit with room, or a format limit raised later is refused by size instead."""
    name, version = "n" * MAX_NAME_LENGTH, "v" * MAX_VERSION_LENGTH
    key = bytes(MAX_WRAPPED_DEK_SIZE)
    store = message_limits()
    largest_store = {
        "StatModel": store_pb.StatModelRequest(name=name, version=version),
        "GetModel": store_pb.GetModelRequest(
            name=name, version=version, offset=2**64 - 1, length=2**64 - 1
        ),
        "ListModels": store_pb.ListModelsRequest(
            name_prefix=name, page_size=2**31 - 1, page_token="t" * MAX_TOKEN_LENGTH
        ),
        "DeleteModel": store_pb.DeleteModelRequest(name=name, version=version, corrupt_entry=True),
        "ReplaceKeySlot": store_pb.ReplaceKeySlotRequest(
            name=name,
            version=version,
            expected_key_version=2**32 - 1,
            key_version=2**32 - 1,
            wrapped_data_key=key,
            expected_wrapped_data_key=key,
        ),
    }
    assert set(store.requests) == {f"/{STORE}/{method}" for method in largest_store}
    for method, request in largest_store.items():
        assert request.ByteSize() * 8 < store.request(f"/{STORE}/{method}"), method
    inference = InferLimits().message_limits
    largest_inference = {
        f"/{OIP}/ModelMetadata": oip_pb.ModelMetadataRequest(name=name, version=version),
        f"/{OIP}/ModelReady": oip_pb.ModelReadyRequest(name=name, version=version),
        f"/{EVIDENCE}/GetEvidence": attestation_pb2.GetEvidenceRequest(nonce=bytes(64)),
        f"/{CONTROL}/LoadModel": model_control_pb2.LoadModelRequest(
            name=name, version=version, header_sha256="0" * 64
        ),
        f"/{CONTROL}/UnloadModel": model_control_pb2.UnloadModelRequest(name=name, version=version),
    }
    for method, request in largest_inference.items():
        assert request.ByteSize() * 8 < inference.request(method), method
