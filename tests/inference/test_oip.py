"""The OIP v2 servicer over a real in-process gRPC server: every RPC, both content styles, errors."""

from __future__ import annotations

import json
import struct
import threading
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.errors import InvalidArgument, ResourceExhausted
from strongroom.inference.models import (
    LoadedModel,
    ModelRepository,
    RuntimeOptions,
    session_options,
)
from strongroom.inference.oip import ATTESTATION_EXTENSION, InferLimits
from strongroom.inference.oip._codec import BYTES_ELEMENT_COST, decode_inputs
from strongroom.inference.oip._wire import check_infer_request
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from strongroom.wire import append_bytes_field
from tests.conftest import buffered_service_log, refused_calls_not_logged
from tests.inference import onnx_models
from tests.inference.conftest import Running, Starter, start, stop

DATATYPES = list(onnx_models.ELEMENT_TYPES)
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Deterministic values covering each type's edges."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        words = [b"", b"a", "\u00e9t\u00e9".encode(), b"longer text \x01", b"z" * 40, b"0"]
        return np.array([words[i % len(words)] for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        flags: np.ndarray = np.arange(count) % 2 == 0
        return flags.reshape(shape)
    dtype = np.dtype(onnx_models.NUMPY_TYPES[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)  # type: ignore[type-var]
        values = [
            info.min,
            info.max,
            0,
            1,
            info.max // 3,
            info.min // 5 if dtype.kind == "i" else 7,
        ]
        return np.array([values[i % len(values)] for i in range(count)], dtype=dtype).reshape(shape)
    values_f = [0.0, -1.5, 3.25, 1e-3, -0.0, 65504.0 if datatype == "FP16" else 1e30]
    return np.array([values_f[i % len(values_f)] for i in range(count)], dtype=dtype).reshape(shape)


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    """Triton's raw layout, built independently of the server's codec."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def from_raw(blob: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(blob):
            (n,) = struct.unpack_from("<I", blob, pos)
            items.append(blob[pos + 4 : pos + 4 + n])
            pos += 4 + n
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(onnx_models.NUMPY_TYPES[datatype]).newbyteorder("<")
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def raw_request(
    model: str, inputs: dict[str, tuple[str, np.ndarray]], **kwargs: object
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kwargs)  # type: ignore[arg-type]
    for name, (datatype, array) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw_bytes(array, datatype))
    return request


def typed_request(model: str, inputs: dict[str, tuple[str, np.ndarray]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, (datatype, array) in inputs.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return request


def reference(model: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model, session_options(RuntimeOptions()))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def expect_error(call: object, code: grpc.StatusCode, reason: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    error = info.value
    assert error.code() == code, error.details()
    reasons: list[object] = [
        m.value for m in error.trailing_metadata() or () if m.key == REASON_TRAILER
    ]
    assert reasons == [reason], error.details()
    return error


def make_repository() -> ModelRepository:
    repo = ModelRepository(["classifier", "two_inputs"])
    repo.load("classifier", "1", onnx_models.classifier())
    repo.load("two_inputs", "1", onnx_models.two_inputs())
    for datatype in DATATYPES:
        repo.load(f"identity_{datatype.lower()}", "1", onnx_models.identity(datatype))
    return repo


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[ModelRepository, Running]]:
    """One server for the tests that do not change the repository."""
    repo = make_repository()
    running = start(repo)
    yield repo, running
    stop(running)


@pytest.fixture
def running(shared: tuple[ModelRepository, Running]) -> Running:
    return shared[1]


@pytest.fixture
def repository() -> ModelRepository:
    """A repository of its own, for tests that change it."""
    return make_repository()


@pytest.fixture
def own(start_server: Starter, repository: ModelRepository) -> Running:
    return start_server(repository)


# -- health and metadata ---------------------------------------------------------------------


def test_server_live_ready_and_metadata(running: Running) -> None:
    assert running.oip.ServerLive(pb.ServerLiveRequest()).live is True
    assert running.oip.ServerReady(pb.ServerReadyRequest()).ready is True
    meta = running.oip.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "strongroom-inference"
    assert meta.version == "9.9.9-test"
    assert ATTESTATION_EXTENSION in meta.extensions


def test_server_is_not_ready_until_every_configured_model_is(start_server: Starter) -> None:
    repo = ModelRepository(["a", "b"])
    repo.load("a", "1", onnx_models.adder(1.0))
    running = start_server(repo)
    assert running.oip.ServerReady(pb.ServerReadyRequest()).ready is False
    assert running.oip.ServerLive(pb.ServerLiveRequest()).live is True
    repo.load("b", "1", onnx_models.adder(2.0))
    assert running.oip.ServerReady(pb.ServerReadyRequest()).ready is True


def test_model_ready(own: Running, repository: ModelRepository) -> None:
    running = own

    def ready(name: str, version: str = "") -> bool:
        return running.oip.ModelReady(pb.ModelReadyRequest(name=name, version=version)).ready

    assert ready("classifier") and ready("classifier", "1")
    assert not ready("classifier", "2")
    assert not ready("no_such_model")
    with pytest.raises(Exception):  # noqa: B017 - a failed load is recorded, then raised
        repository.load("broken", "1", b"junk")
    assert not ready("broken")
    expect_error(
        lambda: running.oip.ModelReady(pb.ModelReadyRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MODEL_NAME_MISSING",
    )


def test_model_metadata(running: Running) -> None:
    meta = running.oip.ModelMetadata(pb.ModelMetadataRequest(name="classifier"))
    assert meta.name == "classifier"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 3]),
        ("probabilities", "FP32", [-1, 3]),
        ("label", "INT64", [-1, 1]),
    ]
    two = running.oip.ModelMetadata(pb.ModelMetadataRequest(name="two_inputs", version="1"))
    assert [(t.name, list(t.shape)) for t in two.inputs] == [("a", [-1, 2]), ("b", [2])]


def test_model_metadata_errors(own: Running, repository: ModelRepository) -> None:
    running = own
    expect_error(
        lambda: running.oip.ModelMetadata(pb.ModelMetadataRequest(name="nope")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    expect_error(
        lambda: running.oip.ModelMetadata(pb.ModelMetadataRequest(name="classifier", version="5")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_VERSION_NOT_FOUND",
    )
    repository.expect("pending")
    expect_error(
        lambda: running.oip.ModelMetadata(pb.ModelMetadataRequest(name="pending")),
        grpc.StatusCode.UNAVAILABLE,
        "MODEL_NOT_READY",
    )
    with pytest.raises(Exception):  # noqa: B017
        repository.load("pending", "1", b"junk")
    error = expect_error(
        lambda: running.oip.ModelMetadata(pb.ModelMetadataRequest(name="pending")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_LOAD_FAILED",
    )
    assert "MODEL_INVALID" in (error.details() or "")


# -- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_infer_raw_every_datatype(running: Running, datatype: str) -> None:
    array = sample(datatype)
    response = running.oip.ModelInfer(
        raw_request(f"identity_{datatype.lower()}", {"x": (datatype, array)}, id="req-7")
    )
    assert response.id == "req-7"
    assert response.model_version == "1"
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", datatype, [2, 3])
    assert len(response.raw_output_contents) == 1
    assert not out.HasField("contents")
    got = from_raw(response.raw_output_contents[0], datatype, out.shape)
    assert got.tolist() == array.tolist()


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "FP16"])
def test_infer_typed_every_datatype(running: Running, datatype: str) -> None:
    array = sample(datatype)
    response = running.oip.ModelInfer(
        typed_request(f"identity_{datatype.lower()}", {"x": (datatype, array)})
    )
    (out,) = response.outputs
    assert len(response.raw_output_contents) == 0
    values = list(getattr(out.contents, TYPED_FIELD[datatype]))
    got: np.ndarray = np.array(values, dtype=onnx_models.NUMPY_TYPES[datatype]).reshape(out.shape)
    assert got.tolist() == array.tolist()


def test_fp16_cannot_be_typed(running: Running) -> None:
    request = pb.ModelInferRequest(model_name="identity_fp16")
    tensor = request.inputs.add(name="x", datatype="FP16", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    expect_error(
        lambda: running.oip.ModelInfer(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "DATATYPE_NEEDS_RAW",
    )


def test_classifier_outputs_equal_a_direct_onnxruntime_run(running: Running) -> None:
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    expected = reference(onnx_models.classifier(), {"x": x})
    response = running.oip.ModelInfer(raw_request("classifier", {"x": ("FP32", x)}))
    assert [o.name for o in response.outputs] == ["logits", "probabilities", "label"]
    for out, blob in zip(response.outputs, response.raw_output_contents, strict=True):
        np.testing.assert_array_equal(from_raw(blob, out.datatype, out.shape), expected[out.name])
    typed = running.oip.ModelInfer(typed_request("classifier", {"x": ("FP32", x)}))
    logits = np.array(typed.outputs[0].contents.fp32_contents, np.float32).reshape(5, 3)
    np.testing.assert_array_equal(logits, expected["logits"])
    labels = np.array(typed.outputs[2].contents.int64_contents).reshape(5, 1)
    np.testing.assert_array_equal(labels, expected["label"])


def test_requested_outputs_subset_in_request_order(running: Running) -> None:
    x = np.ones((2, 4), np.float32)
    request = raw_request("classifier", {"x": ("FP32", x)})
    request.outputs.add(name="label")
    request.outputs.add(name="logits")
    response = running.oip.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["label", "logits"]
    assert len(response.raw_output_contents) == 2
    assert response.outputs[0].datatype == "INT64"


def test_two_inputs_fixed_and_dynamic_dims(running: Running) -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    b = np.array([10, -20], np.int32)
    response = running.oip.ModelInfer(
        raw_request("two_inputs", {"b": ("INT32", b), "a": ("FP32", a)})
    )
    outs = {
        o.name: from_raw(blob, o.datatype, o.shape)
        for o, blob in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    np.testing.assert_array_equal(outs["sum"], a + b.astype(np.float32))
    np.testing.assert_array_equal(outs["b_copy"], b)


def test_explicit_version(own: Running, repository: ModelRepository) -> None:
    running = own
    repository.load("classifier", "2", onnx_models.classifier(seed=9))
    x = np.ones((1, 4), np.float32)
    response = running.oip.ModelInfer(raw_request("classifier", {"x": ("FP32", x)}))
    assert response.model_version == "2"
    expect_error(
        lambda: running.oip.ModelInfer(
            raw_request("classifier", {"x": ("FP32", x)}, model_version="1")
        ),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_VERSION_NOT_FOUND",
    )


# -- inference errors ---------------------------------------------------------------------------

X = np.ones((2, 4), np.float32)


def _mixed() -> pb.ModelInferRequest:
    request = raw_request("classifier", {"x": ("FP32", X)})
    request.inputs[0].contents.fp32_contents.extend([1.0] * 8)
    return request


def _with(request: pb.ModelInferRequest, **changes: object) -> pb.ModelInferRequest:
    tensor = request.inputs[0]
    for key, value in changes.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(tensor, key, value)
    return request


def _raw(blob: bytes, name: str, datatype: str, shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(blob)
    return request


def _typed(name: str, datatype: str, field: str, values: list[object]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, len(values)])
    getattr(tensor.contents, field).extend(values)
    return request


ERROR_CASES: list[tuple[str, object, grpc.StatusCode, str]] = [
    (
        "unknown model",
        lambda: raw_request("nope", {"x": ("FP32", X)}),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    ),
    (
        "no model name",
        pb.ModelInferRequest,
        grpc.StatusCode.INVALID_ARGUMENT,
        "MODEL_NAME_MISSING",
    ),
    ("contents mixed with raw", _mixed, grpc.StatusCode.INVALID_ARGUMENT, "CONTENTS_MIXED"),
    (
        "raw count mismatch",
        lambda: raw_request("classifier", {"x": ("FP32", X)}, raw_input_contents=[b"", b""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RAW_INPUT_COUNT_MISMATCH",
    ),
    (
        "raw size mismatch",
        lambda: _raw(bytes(31), "classifier", "FP32", [2, 4]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RAW_SIZE_MISMATCH",
    ),
    (
        "rank mismatch",
        lambda: _with(raw_request("classifier", {"x": ("FP32", X)}), shape=[8]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_MISMATCH",
    ),
    (
        "fixed dim mismatch",
        lambda: _raw(bytes(40), "classifier", "FP32", [2, 5]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_MISMATCH",
    ),
    (
        "negative dim",
        lambda: _raw(b"", "classifier", "FP32", [-1, 4]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_INVALID",
    ),
    (
        "datatype mismatch",
        lambda: _with(raw_request("classifier", {"x": ("FP32", X)}), datatype="FP64"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "DATATYPE_MISMATCH",
    ),
    (
        "unknown datatype",
        lambda: _with(raw_request("classifier", {"x": ("FP32", X)}), datatype="FLOAT"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "DATATYPE_UNKNOWN",
    ),
    (
        "unknown input",
        lambda: _with(raw_request("classifier", {"x": ("FP32", X)}), name="y"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INPUT_UNKNOWN",
    ),
    (
        "missing input",
        lambda: raw_request("two_inputs", {"a": ("FP32", np.ones((1, 2), np.float32))}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INPUT_MISSING",
    ),
    (
        "duplicate input",
        lambda: (
            raw_request("classifier", {"x": ("FP32", X)}, raw_input_contents=[])
            if False
            else _duplicate()
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INPUT_DUPLICATE",
    ),
    (
        "unknown output",
        lambda: _output(raw_request("classifier", {"x": ("FP32", X)}), "nope"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "OUTPUT_UNKNOWN",
    ),
    (
        "bool byte not 0/1",
        lambda: _raw(bytes([0, 1, 2]), "identity_bool", "BOOL", [1, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BOOL_INVALID",
    ),
    (
        "BYTES element overruns",
        lambda: _raw(struct.pack("<I", 10) + b"abc", "identity_bytes", "BYTES", [1, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RAW_SIZE_MISMATCH",
    ),
    (
        "BYTES trailing bytes",
        lambda: _raw(
            b"".join(struct.pack("<I", 1) + b"a" for _ in range(3)) + b"!",
            "identity_bytes",
            "BYTES",
            [1, 3],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RAW_SIZE_MISMATCH",
    ),
    (
        "BYTES too few elements",
        lambda: _raw(struct.pack("<I", 1) + b"a", "identity_bytes", "BYTES", [1, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RAW_SIZE_MISMATCH",
    ),
    (
        "typed wrong field",
        lambda: _typed("identity_int64", "INT64", "int_contents", [1, 2, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CONTENTS_WRONG_FIELD",
    ),
    (
        "typed count mismatch",
        lambda: _with(
            _typed("identity_fp32", "FP32", "fp32_contents", [1.0, 2.0, 3.0]), shape=[2, 3]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CONTENTS_SIZE_MISMATCH",
    ),
    (
        "INT8 out of range",
        lambda: _typed("identity_int8", "INT8", "int_contents", [1, 200, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALUE_OUT_OF_RANGE",
    ),
    (
        "UINT16 out of range",
        lambda: _typed("identity_uint16", "UINT16", "uint_contents", [1, 70000, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALUE_OUT_OF_RANGE",
    ),
    (
        "non-UTF-8 bytes for a string tensor",
        lambda: _typed("identity_bytes", "BYTES", "bytes_contents", [b"a", b"\xff", b"c"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BYTES_NOT_UTF8",
    ),
    (
        "shared memory",
        lambda: _param(raw_request("classifier", {"x": ("FP32", X)}), "shared_memory_region"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHARED_MEMORY_UNSUPPORTED",
    ),
    (
        "sequence",
        lambda: _request_param(raw_request("classifier", {"x": ("FP32", X)}), "sequence_id"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SEQUENCE_UNSUPPORTED",
    ),
]


def _duplicate() -> pb.ModelInferRequest:
    request = raw_request("classifier", {"x": ("FP32", X)})
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(raw_bytes(X, "FP32"))
    return request


def _output(request: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest:
    request.outputs.add(name=name)
    return request


def _param(request: pb.ModelInferRequest, key: str) -> pb.ModelInferRequest:
    request.inputs[0].parameters[key].string_param = "region0"
    return request


def _request_param(request: pb.ModelInferRequest, key: str) -> pb.ModelInferRequest:
    request.parameters[key].int64_param = 42
    return request


@pytest.mark.parametrize(
    ("case", "build", "code", "reason"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_infer_errors(
    running: Running, case: str, build: object, code: grpc.StatusCode, reason: str
) -> None:
    request = build()  # type: ignore[operator]
    expect_error(lambda: running.oip.ModelInfer(request), code, reason)


def test_infer_on_a_model_that_is_loading_or_failed(
    own: Running, repository: ModelRepository
) -> None:
    running = own
    repository.expect("later")
    repository.begin_load("later", "1")
    request = raw_request("later", {"x": ("FP32", X)})
    expect_error(
        lambda: running.oip.ModelInfer(request), grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY"
    )
    with pytest.raises(Exception):  # noqa: B017
        repository.load("later", "1", b"junk")
    expect_error(
        lambda: running.oip.ModelInfer(request),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_LOAD_FAILED",
    )


def test_a_string_output_that_is_not_utf8_is_answered_with_its_reason(
    own: Running, repository: ModelRepository
) -> None:
    # It was INTERNAL "internal error", a traceback logged on every request.
    repository.load("labels", "1", onnx_models.byte_label_lookup([b"cat", b"caf\xe9"]))
    fine = raw_request("labels", {"x": ("FP32", np.array([[1.0, 0.0]], np.float32))})
    assert own.oip.ModelInfer(fine).raw_output_contents[0] == struct.pack("<I", 3) + b"cat"
    latin = raw_request("labels", {"x": ("FP32", np.array([[0.0, 1.0]], np.float32))})
    expect_error(
        lambda: own.oip.ModelInfer(latin),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_OUTPUT_NOT_UTF8",
    )


def test_size_limits(start_server: Starter, shared: tuple[ModelRepository, Running]) -> None:
    repository = shared[0]
    limited = start_server(
        repository, limits=InferLimits(max_tensor_elements=100, max_input_bytes=64, max_inputs=1)
    )
    big = np.ones((26, 4), np.float32)
    expect_error(
        lambda: limited.oip.ModelInfer(raw_request("classifier", {"x": ("FP32", big)})),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TENSOR_TOO_LARGE",
    )
    medium = np.ones((20, 4), np.float32)
    expect_error(
        lambda: limited.oip.ModelInfer(raw_request("classifier", {"x": ("FP32", medium)})),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "REQUEST_TOO_LARGE",
    )
    expect_error(
        lambda: limited.oip.ModelInfer(_duplicate()),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_INPUTS",
    )
    ok = limited.oip.ModelInfer(
        raw_request("classifier", {"x": ("FP32", np.ones((2, 4), np.float32))})
    )
    assert len(ok.outputs) == 3


def test_bytes_elements_are_charged_before_they_are_decoded(
    shared: tuple[ModelRepository, Running],
) -> None:
    """A BYTES shape is paid for before one Python object is made for each element: 27 bytes on
    the wire used to make the server allocate and fill an array for 44 million of them (a
    gigabyte, seconds of CPU) before finding the data short; and many empty elements inside the
    byte limit decoded to ten times it."""
    repository, running = shared
    model = repository.get("identity_bytes")
    huge = pb.ModelInferRequest(model_name="identity_bytes", raw_input_contents=[b""])
    huge.inputs.add(name="x", datatype="BYTES", shape=[((1 << 27) // 3), 3])
    # Within the element charge (the ceiling's limit) but not within its own data.
    short = pb.ModelInferRequest(model_name="identity_bytes", raw_input_contents=[bytes(8)])
    short.inputs.add(name="x", datatype="BYTES", shape=[1 << 20, 3])
    cases = [
        (huge, InferLimits(), ResourceExhausted, "REQUEST_TOO_LARGE"),
        (short, InferLimits(max_input_bytes=1 << 30), InvalidArgument, "RAW_SIZE_MISMATCH"),
    ]
    for request, limits, error, reason in cases:
        tracemalloc.start()
        try:
            with pytest.raises(error) as info:
                decode_inputs(request, model, limits)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.reason == reason
        assert peak < 1 << 20, (
            f"{peak} bytes allocated to refuse a {request.ByteSize()}-byte request"
        )
    many = np.full((200_000, 3), b"", dtype=object)  # 2.4 MB on the wire, under 64 MiB
    expect_error(
        lambda: running.oip.ModelInfer(raw_request("identity_bytes", {"x": ("BYTES", many)})),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "REQUEST_TOO_LARGE",
    )
    fits = np.full((100_000, 3), b"ok", dtype=object)
    response = running.oip.ModelInfer(raw_request("identity_bytes", {"x": ("BYTES", fits)}))
    assert (from_raw(response.raw_output_contents[0], "BYTES", [100_000, 3]) == fits).all()


def _refusal_peak(request: pb.ModelInferRequest, model: LoadedModel, limits: InferLimits) -> Any:
    """The error ``decode_inputs`` refuses ``request`` with, and the bytes it allocated to."""
    tracemalloc.start()
    try:
        with pytest.raises((InvalidArgument, ResourceExhausted)) as info:
            decode_inputs(request, model, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return info.value, peak


def test_a_rank_beyond_the_limit_is_refused_before_its_dimensions_are_read(
    shared: tuple[ModelRepository, Running],
) -> None:
    """A packed shape of zeros is one byte a dimension: a request inside the size limit carried
    60 million of them, and the server made a tuple of them all (seconds of CPU under the GIL,
    half a gigabyte) before refusing the rank."""
    model = shared[0].get("identity_fp32")
    request = pb.ModelInferRequest(model_name="identity_fp32", raw_input_contents=[b""])
    request.inputs.add(name="x", datatype="FP32").shape.extend(np.zeros(1 << 20, np.int64))
    error, peak = _refusal_peak(request, model, InferLimits())
    assert (error.reason, peak < 64 << 10) == ("SHAPE_INVALID", True), peak
    assert f"rank {1 << 20}" in error.message


def test_typed_integers_are_charged_their_decoded_size_before_they_are_decoded(
    shared: tuple[ModelRepository, Running],
) -> None:
    """Typed integers are varints: an INT64 zero is one byte on the wire and eight in its array,
    so a request of zeros inside the byte limit was decoded (eight times the limit for a 64 MiB
    request) before its size was found too large."""
    model = shared[0].get("identity_int64")
    request = pb.ModelInferRequest(model_name="identity_int64")
    tensor = request.inputs.add(name="x", datatype="INT64", shape=[1 << 19, 3])
    tensor.contents.int64_contents.extend(np.zeros(3 << 19, np.int64))
    assert request.ByteSize() < 2 << 20
    error, peak = _refusal_peak(request, model, InferLimits(max_input_bytes=4 << 20))
    assert (error.reason, peak < 64 << 10) == ("REQUEST_TOO_LARGE", True), peak
    # At the limit it is decoded and served as before.
    small = pb.ModelInferRequest(model_name="identity_int64")
    small.inputs.add(name="x", datatype="INT64", shape=[2, 3]).contents.int64_contents.extend(
        [0, -1, 2, 3, 4, 5]
    )
    arrays, _ = decode_inputs(small, model, InferLimits(max_input_bytes=48))
    assert arrays["x"].tolist() == [[0, -1, 2], [3, 4, 5]]
    with pytest.raises(ResourceExhausted):
        decode_inputs(small, model, InferLimits(max_input_bytes=47))


def test_typed_narrow_integers_are_charged_their_fields_width(
    shared: tuple[ModelRepository, Running],
) -> None:
    """Typed INT8 (INT16, UINT8, UINT16) travel in 32-bit fields, which the protobuf runtime parses
    to four bytes a value and the decode reads at that width before narrowing: charged one byte a
    value, 62 MiB of INT8 zeros passed every count and parsed to 0.5 GB. Raw, they count their own
    width."""
    model = shared[0].get("identity_int8")
    typed = pb.ModelInferRequest(model_name="identity_int8")
    typed.inputs.add(name="x", datatype="INT8", shape=[2, 3]).contents.int_contents.extend(
        [0, -1, 2, 3, 4, -128]
    )
    arrays, _ = decode_inputs(typed, model, InferLimits(max_input_bytes=24))
    assert arrays["x"].tolist() == [[0, -1, 2], [3, 4, -128]]
    with pytest.raises(ResourceExhausted) as info:
        decode_inputs(typed, model, InferLimits(max_input_bytes=23))
    assert info.value.reason == "REQUEST_TOO_LARGE"
    raw = raw_request("identity_int8", {"x": ("INT8", np.zeros((2, 3), np.int8))})
    assert decode_inputs(raw, model, InferLimits(max_input_bytes=6))[0]["x"].shape == (2, 3)
    # On the wire, before the parse, at the same rate.
    limits = InferLimits(max_input_bytes=1 << 20)
    for field in (_typed_field("int_contents"), _typed_field("uint_contents")):
        zeros = append_bytes_field(b"", field, bytes((1 << 18) + 1))
        with pytest.raises(ResourceExhausted) as info:
            check_infer_request(_with_contents("m", "INT8", [(1 << 18) + 1], zeros), limits)
        assert info.value.reason == "REQUEST_TOO_LARGE"


def _peak_rss() -> int:
    """The process's peak resident set since the last :func:`_reset_peak_rss` (bytes)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


def _reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set (Linux 4.0+)
    return _peak_rss()


def _infer_bytes(running: Running, data: bytes) -> object:
    """A ModelInfer call that sends ``data`` as the serialised request, whatever it holds."""
    call = running.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    return lambda: call(data)


_INPUTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["inputs"].number


def test_inputs_beyond_the_limit_are_refused_before_the_request_is_parsed(
    running: Running,
) -> None:
    """An empty ``inputs`` entry is two bytes on the wire and a message object once parsed: 16 MiB
    of them made the server build ~0.7 GB before it counted 65 inputs and refused them."""
    data = b"\n\x0aclassifier" + append_bytes_field(b"", _INPUTS, b"") * (8 << 20)
    assert len(data) > 16 << 20
    before = _reset_peak_rss()
    expect_error(_infer_bytes(running, data), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_INPUTS")
    grown = _peak_rss() - before
    assert grown < 8 * len(data), f"{grown >> 20} MiB to refuse a {len(data) >> 20} MiB request"


def _with_contents(model: str, datatype: str, shape: list[int], contents: bytes) -> bytes:
    """A serialised request of one input whose contents are ``contents`` as they are."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)
    head = pb.ModelInferRequest(model_name=model).SerializeToString()
    return append_bytes_field(
        head, _INPUTS, append_bytes_field(tensor.SerializeToString(), 5, contents)
    )


def _typed_field(name: str) -> int:
    return pb.InferTensorContents.DESCRIPTOR.fields_by_name[name].number


@pytest.mark.parametrize(
    ("model", "datatype", "contents"),
    [
        # INT64 zeros: one byte each on the wire, eight parsed and decoded.
        ("identity_int64", "INT64", append_bytes_field(b"", 3, bytes(24 << 20))),
        # Empty BYTES elements: two bytes each on the wire, a 16-byte slot each parsed.
        ("identity_bytes", "BYTES", b"\x42\x00" * (12 << 20)),
        # INT8 zeros: one byte each on the wire, four parsed (int32) and decoded before narrowing.
        ("identity_int8", "INT8", append_bytes_field(b"", 2, bytes(24 << 20))),
    ],
    ids=["int64 zeros", "empty BYTES", "int8 zeros"],
)
def test_typed_contents_beyond_the_limit_are_refused_before_the_request_is_parsed(
    running: Running, model: str, datatype: str, contents: bytes
) -> None:
    """Typed contents parse to up to eight times their wire size: 24 MiB of them made the server
    build ~0.3-0.4 GB before the servicer found them past the 64 MiB limit."""
    data = _with_contents(model, datatype, [8 << 20, 3], contents)
    before = _reset_peak_rss()
    expect_error(
        _infer_bytes(running, data), grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE"
    )
    grown = _peak_rss() - before
    assert grown < 8 * len(data), f"{grown >> 20} MiB to refuse a {len(data) >> 20} MiB request"


def test_contents_count_no_more_than_the_servicer_would_charge() -> None:
    """The wire count is a lower bound of the servicer's: a request it refuses is one the servicer
    would refuse too; values written one field each are walked only so far."""
    limits = InferLimits(max_input_bytes=1 << 20)  # contents over 128 KiB are counted
    boolean = _typed_field("bool_contents")  # one byte a value decoded
    int8 = _typed_field("int_contents")  # INT8 too: charged its 32-bit field's width
    fp32 = _typed_field("fp32_contents")
    cases = [(boolean, 1 << 20, b"\x01"), (int8, 1 << 18, b"\x01"), (fp32, 1 << 18, bytes(4))]
    for field, values, value in cases:
        fits = append_bytes_field(b"", field, value * values)
        check_infer_request(_with_contents("m", "T", [values], fits), limits)
        over = fits + append_bytes_field(b"", field, value)
        with pytest.raises(ResourceExhausted) as info:
            check_infer_request(_with_contents("m", "T", [values + 1], over), limits)
        assert info.value.reason == "REQUEST_TOO_LARGE"
    text = b"".join(append_bytes_field(b"", 8, b"ten bytes!") for _ in range(12_000))
    with pytest.raises(ResourceExhausted) as info:  # 12,000 x (128 + 10) bytes
        check_infer_request(_with_contents("m", "BYTES", [12_000], text), limits)
    assert info.value.reason == "REQUEST_TOO_LARGE"
    unpacked = bytes([_typed_field("bool_contents") << 3, 1]) * 70_000
    with pytest.raises(ResourceExhausted) as info:
        check_infer_request(_with_contents("m", "BOOL", [70_000], unpacked), limits)
    assert info.value.reason == "TOO_MANY_FIELDS"


def test_contents_are_counted_together_once_they_could_parse_past_the_limit() -> None:
    """Once a request's contents could parse past the limit, those before the one that crossed it
    are counted too: counting only that one and those after left an eighth of the limit on the
    wire beside a full limit counted (16 MiB of INT64 zeros in two tensors parsed to ~250 MiB)."""
    limits = InferLimits(max_input_bytes=1 << 20)  # contents over 128 KiB are counted
    int64 = _typed_field("int64_contents")
    values = 1 << 17  # eight bytes each decoded: the whole limit
    head = b"\n\x01m"
    # The limit's worth of values, in two tensors: the first alone under the threshold.
    first, second = (
        append_bytes_field(b"", int64, bytes(n)) for n in (1 << 16, values - (1 << 16))
    )
    fits = head
    for contents in (first, second):
        fits = append_bytes_field(fits, _INPUTS, append_bytes_field(b"", 5, contents))
    check_infer_request(fits, limits)
    for over in (append_bytes_field(b"", int64, bytes(values)), first + second + b"\x18\x00"):
        data = append_bytes_field(head, _INPUTS, append_bytes_field(b"", 5, first))
        data = append_bytes_field(data, _INPUTS, append_bytes_field(b"", 5, over))
        with pytest.raises(ResourceExhausted) as info:
            check_infer_request(data, limits)
        assert info.value.reason == "REQUEST_TOO_LARGE"


def test_contents_are_walked_only_so_far_in_all_of_a_request() -> None:
    """The fields of counted contents are walked a bounded number of times per request, not per
    occurrence: a tensor may repeat ``contents`` (protobuf merges them) and a request holds 64
    tensors, so 60 MiB of fields that count nothing (empty packed arrays, unknown fields) in
    occurrences each under the bound took the check a minute of CPU."""
    limits = InferLimits(max_input_bytes=1 << 20)  # contents over 128 KiB are counted
    most = limits.max_input_bytes // BYTES_ELEMENT_COST + 64
    nothing = append_bytes_field(b"", _typed_field("int64_contents"), b"")  # packed, no value
    unknown = bytes([15 << 3, 0])  # a varint field InferTensorContents does not have
    padding = append_bytes_field(b"", 15, bytes(limits.max_input_bytes // 8))  # counted at once
    fields = padding + (nothing + unknown) * (most // 2 - 1)  # just under the bound

    def tensor(occurrences: int) -> bytes:
        head = pb.ModelInferRequest.InferInputTensor(name="x", datatype="INT64", shape=[0])
        return head.SerializeToString() + append_bytes_field(b"", 5, fields) * occurrences

    def request(*tensors: bytes) -> bytes:
        data = b"\n\x01m"
        for one in tensors:
            data = append_bytes_field(data, _INPUTS, one)
        return data

    check_infer_request(request(tensor(1)), limits)
    for data in (request(tensor(2)), request(tensor(1), tensor(1))):
        with pytest.raises(ResourceExhausted) as info:
            check_infer_request(data, limits)
        assert info.value.reason == "TOO_MANY_FIELDS"


def _classifier_request(parameters: int = 0, where: str = "request") -> pb.ModelInferRequest:
    request = raw_request("classifier", {"x": ("FP32", X)})
    request.outputs.add(name="label")
    holder = {"request": request, "input": request.inputs[0], "output": request.outputs[0]}[where]
    for i in range(parameters):
        holder.parameters[f"p{i}"].int64_param = i
    return request


def _unpacked_shape(dimensions: int) -> bytes:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32")
    shape = _INPUT_SHAPE << 3  # a varint field: one dimension an occurrence
    data = tensor.SerializeToString() + bytes([shape, 1]) * dimensions
    return append_bytes_field(b"\n\x0aclassifier", _INPUTS, data)


def _empty_packed_shapes(occurrences: int) -> bytes:
    """An input whose shape is ``occurrences`` empty packed arrays: no dimension, two bytes each
    (60 MiB of them were 30 million fields for the wire check to walk, the parse to skip)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32")
    data = tensor.SerializeToString() + append_bytes_field(b"", _INPUT_SHAPE, b"") * occurrences
    return append_bytes_field(b"\n\x0aclassifier", _INPUTS, data)


_INPUT_SHAPE = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name["shape"].number
_SERIALISED = pb.ModelInferRequest.SerializeToString
WIRE_LIMIT_CASES: list[tuple[str, object, grpc.StatusCode, str]] = [
    *(
        (
            f"{where} parameters",
            lambda where=where: _SERIALISED(_classifier_request(65, where)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_PARAMETERS",
        )
        for where in ("request", "input", "output")
    ),
    (
        "fields repeated",
        lambda: _SERIALISED(_classifier_request()) + b"\n\x0aclassifier" * 64,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_FIELDS",
    ),
    (
        "outputs",
        lambda: b"\n\x0aclassifier" + b"\x32\x00" * 65,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_OUTPUTS",
    ),
    (
        "raw contents",
        lambda: b"\n\x0aclassifier" + b"\x3a\x00" * 65,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_INPUTS",
    ),
    (
        "unpacked dimensions",
        lambda: _unpacked_shape(17),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_INVALID",
    ),
    (
        "empty packed dimensions",
        lambda: _empty_packed_shapes(17),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_INVALID",
    ),
    (
        "packed dimensions",
        lambda: _SERIALISED(_with(_classifier_request(), shape=[1] * 17)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_INVALID",
    ),
    (
        "not a message",
        lambda: b"\n\x0aclassifier\x2a\x05ab",
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    ),
]


@pytest.mark.parametrize(
    ("case", "build", "code", "reason"), WIRE_LIMIT_CASES, ids=[c[0] for c in WIRE_LIMIT_CASES]
)
def test_repeated_fields_are_counted_on_the_wire(
    running: Running, case: str, build: object, code: grpc.StatusCode, reason: str
) -> None:
    """Each field a request repeats by design is limited before the request is parsed: the
    parameters of one map (any number used to be parsed, and accepted), the fields besides them."""
    expect_error(_infer_bytes(running, build()), code, reason)  # type: ignore[operator]


def test_requests_at_the_wire_limits_are_served(running: Running) -> None:
    for where in ("request", "input", "output"):
        response = running.oip.ModelInfer(_classifier_request(64, where))
        assert [o.name for o in response.outputs] == ["label"]
    # A shape written unpacked (one field a dimension) is as good as a packed one.
    dimensions = b"".join(bytes([_INPUT_SHAPE << 3, d]) for d in X.shape)
    data = append_bytes_field(
        b"\n\x0aclassifier",
        _INPUTS,
        pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32").SerializeToString()
        + dimensions,
    )
    raw = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
    response = _infer_bytes(running, append_bytes_field(data, raw, raw_bytes(X, "FP32")))()
    assert len(response.outputs) == 3  # type: ignore[attr-defined]


def test_inputs_that_clash_inside_the_graph_are_the_callers_error(start_server: Starter) -> None:
    """Two variable dimensions that must agree inside the graph pass every check of the
    advertised shapes; ONNX Runtime's failure is then the caller's (INVALID_ARGUMENT), not the
    server's INTERNAL, and it names the operator but not the model's node."""
    repo = ModelRepository(["clash"])
    repo.load("clash", "1", onnx_models.broadcast_add(node_name="layers.7/secret_block/Add"))
    running = start_server(repo)
    request = raw_request(
        "clash",
        {"a": ("FP32", np.zeros((2, 2), np.float32)), "b": ("FP32", np.zeros((3, 2), np.float32))},
    )
    error = expect_error(
        lambda: running.oip.ModelInfer(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INFERENCE_INPUT_REJECTED",
    )
    assert "Add operator" in (error.details() or "")
    assert "secret_block" not in (error.details() or "")
    fine = raw_request(
        "clash",
        {"a": ("FP32", np.ones((3, 2), np.float32)), "b": ("FP32", np.ones((3, 2), np.float32))},
    )
    assert (
        from_raw(running.oip.ModelInfer(fine).raw_output_contents[0], "FP32", [3, 2]) == 2
    ).all()


def test_inputs_the_graph_refuses_are_logged_within_the_callers_refusal_budget(
    start_server: Starter, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """Each run ONNX Runtime refused wrote its WARNING (with ORT's words, up to 2,000
    characters) outside the refusal lines' budget: the call's "rpc failed" was budgeted, its
    "inference refused its inputs" not, so a client sending inputs a graph refuses chose how
    many lines the service wrote. It is a refusal line now, within its caller's budget."""
    handler, stream = buffered_service_log(monkeypatch, "inference")
    repo = ModelRepository(["clash"])
    repo.load("clash", "1", onnx_models.broadcast_add())
    running = start_server(repo)
    request = raw_request(
        "clash",
        {"a": ("FP32", np.zeros((2, 2), np.float32)), "b": ("FP32", np.zeros((3, 2), np.float32))},
    )
    sent = 2 * REFUSED_CALLS_BURST
    for _ in range(sent):
        expect_error(
            lambda: running.oip.ModelInfer(request),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INFERENCE_INPUT_REJECTED",
        )
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    refused = [r for r in lines if r["msg"].startswith("inference refused its inputs")]
    assert len(refused) == REFUSED_CALLS_BURST
    assert [r["msg"] for r in lines].count("rpc failed") == REFUSED_CALLS_BURST  # the same calls
    assert refused_calls_not_logged(lines).total() == sent - REFUSED_CALLS_BURST


@pytest.mark.parametrize(
    ("text", "charged"),
    [
        ("a" * 300, 300),
        ("\u00e9" * 150, 300),  # Latin-1: a 150-byte str, charged its 300 UTF-8 bytes
        ("\u65e5" * 100, 300),  # CJK: a 200-byte str, charged its 300 UTF-8 bytes
        ("a" * 296 + "\U0001f600", 4 * 297),  # one astral character: 4 bytes for every character
    ],
    ids=["ascii", "latin-1", "cjk", "astral"],
)
def test_bytes_elements_are_charged_the_text_they_decode_to(
    shared: tuple[ModelRepository, Running], text: str, charged: int
) -> None:
    """A BYTES element reaches ONNX Runtime as a Python str, which stores every character at
    the width of the widest: it counts the larger of its UTF-8 length and that str's size."""
    model = shared[0].get("identity_bytes")
    data = text.encode()
    assert len(data) == 300
    element = struct.pack("<I", len(data)) + data
    request = pb.ModelInferRequest(model_name="identity_bytes", raw_input_contents=[element * 3])
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 3])
    cost = 3 * (BYTES_ELEMENT_COST + 4 + charged)
    decode_inputs(request, model, InferLimits(max_input_bytes=cost))
    with pytest.raises(ResourceExhausted) as info:
        decode_inputs(request, model, InferLimits(max_input_bytes=cost - 1))
    assert info.value.reason == "REQUEST_TOO_LARGE"


def test_empty_batch(running: Running) -> None:
    empty = np.zeros((0, 4), np.float32)
    response = running.oip.ModelInfer(raw_request("classifier", {"x": ("FP32", empty)}))
    assert [list(o.shape) for o in response.outputs] == [[0, 3], [0, 3], [0, 1]]
    assert list(response.raw_output_contents) == [b"", b"", b""]


# -- atomic swap under load ---------------------------------------------------------------------


def test_swap_under_load_has_zero_failures(start_server: Starter) -> None:
    repo = ModelRepository(["swap"])
    repo.load("swap", "1", onnx_models.adder(1.0))
    running = start_server(repo, workers=8)
    blobs = [(str(v), onnx_models.adder(float(v))) for v in range(2, 12)]
    failures: list[str] = []
    served: list[str] = []
    progress = threading.Condition()
    stop = threading.Event()
    x = np.zeros((3, 4), np.float32)
    request = raw_request("swap", {"x": ("FP32", x)})

    def client() -> None:
        while not stop.is_set():
            try:
                response = running.oip.ModelInfer(request, timeout=10)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")
                continue
            y = from_raw(response.raw_output_contents[0], "FP32", [3, 4])
            if not np.all(y == float(response.model_version)):
                failures.append(f"version {response.model_version} answered {y[0, 0]}")
            with progress:
                served.append(response.model_version)
                progress.notify_all()

    def wait_for(requests: int) -> None:
        with progress:
            target = len(served) + requests
            assert progress.wait_for(lambda: len(served) >= target, timeout=30)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for version, blob in blobs:
        wait_for(20)  # requests are in flight on the current version ...
        repo.load("swap", version, blob)  # ... while the next one is swapped in
    wait_for(20)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert set(served) == {str(v) for v in range(1, 12)}
    assert served[-1] == "11"


def test_an_empty_tensor_with_a_dimension_too_large_for_memory_is_refused(
    own: Running, repository: ModelRepository
) -> None:
    """With two dynamic dimensions a shape like [0, 2**63 - 1] has no elements, so it passed the
    size checks, and numpy's reshape refused it with a ValueError that reached the caller as
    INTERNAL."""
    repository.load("two_dynamic", "1", onnx_models.identity("FP32", ("batch", "seq")))
    for shape in ([0, 2**63 - 1], [2**63 - 1, 0]):
        expect_error(
            lambda shape=shape: own.oip.ModelInfer(_raw(b"", "two_dynamic", "FP32", shape)),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            "SHAPE_INVALID",
        )
