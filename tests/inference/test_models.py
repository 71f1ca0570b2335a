"""The in-memory model runtime: ONNX Runtime sessions from bytes, and the model repository."""

from __future__ import annotations

import functools
import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from strongroom.errors import Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted
from strongroom.inference.models import (
    LoadedModel,
    ModelLoadError,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    ModelRepository,
    ModelState,
    ModelUnloaded,
    RuntimeOptions,
    VersionStatus,
    session_options,
)
from strongroom.reasons import Reason
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from tests.conftest import buffered_service_log, refused_calls_not_logged
from tests.inference import onnx_models

X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


def reference_run(model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The same model run directly in ONNX Runtime with the same session options."""
    session = ort.InferenceSession(model, session_options(RuntimeOptions()))
    return list(session.run(None, feeds))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_load_from_any_buffer_and_match_a_direct_run(kind: type) -> None:
    blob = onnx_models.classifier()
    model = LoadedModel.from_bytes("clf", "1", kind(blob))
    assert (model.name, model.version, model.platform) == ("clf", "1", "onnxruntime_onnx")
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [("x", "FP32", (-1, 4))]
    assert [(t.name, t.datatype, t.shape) for t in model.outputs] == [
        ("logits", "FP32", (-1, 3)),
        ("probabilities", "FP32", (-1, 3)),
        ("label", "INT64", (-1, 1)),
    ]
    out = model.infer({"x": X})
    expected = reference_run(blob, {"x": X})
    for name, want in zip(["logits", "probabilities", "label"], expected, strict=True):
        np.testing.assert_array_equal(out[name], want)
    assert list(model.infer({"x": X}, ["label"])) == ["label"]


def test_a_run_told_to_stop_is_cancelled_not_a_rejected_input() -> None:
    """A terminated run fails inside ORT with FAIL, which read as the caller's inputs not fitting
    the graph (INFERENCE_INPUT_REJECTED); it is the call ending instead."""
    model = LoadedModel.from_bytes("clf", "1", onnx_models.classifier())
    stopped = ort.RunOptions()
    stopped.terminate = True
    with pytest.raises(Cancelled) as info:
        model.infer({"x": X}, run_options=stopped)
    assert info.value.reason == "INFERENCE_CANCELLED"
    assert list(model.infer({"x": X}, run_options=ort.RunOptions())) == [
        "logits",
        "probabilities",
        "label",
    ]


def test_runs_their_callers_stopped_write_their_budget_of_lines(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """The line "inference stopped" (a run whose call ended: its caller cancelled, or let its deadline
    pass) was no refusal line: a caller that started runs and walked away chose how many of them
    the service wrote. It is within the caller's budget now (INFERENCE_CANCELLED), the rest
    counted in the summary."""
    handler, stream = buffered_service_log(monkeypatch)  # a clock that never refills
    model = LoadedModel.from_bytes("clf", "1", onnx_models.classifier())
    stopped = ort.RunOptions()
    stopped.terminate = True
    runs = REFUSED_CALLS_BURST + 3
    for _ in range(runs):  # no call on this thread: every run is one caller's
        with pytest.raises(Cancelled):
            model.infer({"x": X}, run_options=stopped)
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["reason"] for r in lines if r["msg"].startswith("inference stopped")] == [
        "INFERENCE_CANCELLED"
    ] * REFUSED_CALLS_BURST
    assert refused_calls_not_logged(lines) == {
        ("-", "INFERENCE_CANCELLED"): runs - REFUSED_CALLS_BURST
    }


def test_session_does_not_keep_a_second_copy_of_the_model() -> None:
    model = LoadedModel.from_bytes("clf", "1", onnx_models.classifier())
    assert getattr(model._session, "_model_bytes", None) is None


def test_every_oip_datatype_maps_from_onnx() -> None:
    for datatype in onnx_models.ELEMENT_TYPES:
        model = LoadedModel.from_bytes("id", "1", onnx_models.identity(datatype, ("n", 2, 3)))
        assert model.inputs[0].datatype == datatype
        assert model.inputs[0].shape == (-1, 2, 3)


def test_bytes_tensors_round_trip_utf8_and_reject_other_bytes() -> None:
    model = LoadedModel.from_bytes("id", "1", onnx_models.identity("BYTES"))
    values = np.array([[b"plain", "d\u00e9j\u00e0".encode(), b""]], dtype=object)
    out = model.infer({"x": values})["y"]
    assert out.tolist() == values.tolist()
    with pytest.raises(InvalidArgument) as info:
        model.infer({"x": np.array([[b"ok", b"\xff\xfe", b""]], dtype=object)})
    assert info.value.reason == "BYTES_NOT_UTF8"


def test_invalid_model_bytes_fail_with_a_reason_and_no_content() -> None:
    secret = b"\x08\x07" + b"SECRET-WEIGHTS" * 10
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes("bad", "1", secret)
    assert info.value.reason == "MODEL_INVALID"
    assert "SECRET" not in str(info.value)


def test_unsupported_io_type_is_a_load_failure() -> None:
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes("bf16", "1", onnx_models.bfloat16_identity())
    assert info.value.reason == "MODEL_UNSUPPORTED_DATATYPE"


@pytest.mark.parametrize(
    ("operator", "where", "domain"),
    [
        ("NonZero", "graph", ""),
        ("Unique", "graph", ""),
        ("Unique", "subgraph", ""),
        ("NonZero", "function", ""),
        # ONNX Runtime's contrib Unique (FLOAT) builds the same hash map outside the arena:
        # measured, 4 M values held 313 MiB under a 64 MiB cap. The check looked at standard
        # operators only, and a model spelling Unique in ORT's domain loaded and ran.
        ("Unique", "graph", "com.microsoft"),
        ("Unique", "function", "com.microsoft"),
    ],
)
def test_a_model_with_an_operator_that_allocates_outside_the_memory_cap_is_refused(
    operator: str, where: str, domain: str
) -> None:
    # Measured: under a 16 MiB cap, NonZero of 12 M ones held 104 MiB and Unique of 1.5 M
    # 196 MiB outside the arena before the output's allocation was refused; at the 2 GiB
    # default a request of one INT64 could ask for tens of GiB. Refused, wherever the node is.
    model = onnx_models.sized_by_value(operator, where, domain)
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes("sized", "1", model)
    assert info.value.reason == "MODEL_OPERATOR_UNCAPPED"
    assert (f"{domain}.{operator}" if domain else operator) in info.value.message
    assert "inference.allow_uncapped_operators" in info.value.message
    # An operator who knows no request can size it lets it load, and it runs.
    allowed = LoadedModel.from_bytes(
        "sized", "1", model, options=RuntimeOptions(allow_uncapped_operators=True)
    )
    assert allowed.infer({"n": np.array([3], np.int64)})["y"].size >= 1


def test_a_refused_run_logs_no_value_of_the_request(caplog: pytest.LogCaptureFixture) -> None:
    # ORT's message states the index the request gave ("idx=987654321": a token id, say);
    # the service logged it whole. The log keeps the operator and ORT's check, not the value.
    model = LoadedModel.from_bytes(
        "vocab", "1", onnx_models.lookup(np.arange(10, dtype=np.float32))
    )
    with caplog.at_level("WARNING"), pytest.raises(InvalidArgument):
        model.infer({"indices": np.array([1, 987654321], np.int64)})
    (record,) = [r for r in caplog.records if getattr(r, "ort_error", None)]
    logged = record.ort_error
    assert "Gather" in logged and "out of data bounds" in logged
    assert "987654321" not in logged and "987654321" not in record.getMessage()


@pytest.mark.parametrize("text", [b"not a number", b"1e999"])
def test_text_a_cast_cannot_parse_is_the_callers_input_not_a_server_failure(
    text: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # ORT reports it as RUNTIME_EXCEPTION ("stod"): it was INTERNAL INFERENCE_FAILED and an
    # ERROR line, which any client could make the server write at will.
    model = LoadedModel.from_bytes("parse", "1", onnx_models.parse_numbers())
    assert model.infer({"x": np.array([b"2.5"], dtype=object)})["y"].tolist() == [2.5]
    with caplog.at_level("WARNING"), pytest.raises(InvalidArgument) as info:
        model.infer({"x": np.array([b"1", text], dtype=object)})
    assert info.value.reason == "INFERENCE_INPUT_REJECTED"
    assert "Cast operator" in info.value.message
    assert [r.levelname for r in caplog.records] == ["WARNING"]


@pytest.mark.parametrize("text_input", [False, True], ids=["numeric-inputs", "string-input"])
def test_a_string_output_that_is_not_utf8_is_the_models_fault_not_a_crash(
    text_input: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # An ONNX string is bytes; ONNX Runtime's Python API hands string outputs over as ``str``,
    # decoding them as UTF-8. A published model whose labels are not UTF-8 (Latin-1 text, or
    # crafted) made that decode raise on every request: UnicodeDecodeError out of infer (INTERNAL
    # and a traceback logged as a bug, per request), or with a string input INFERENCE_FAILED and
    # an ERROR line every time, any client with the model in scope choosing how many.
    labels = [b"cat", b"caf\xe9"]  # Latin-1: not UTF-8
    model = LoadedModel.from_bytes(
        "labels", "1", onnx_models.byte_label_lookup(labels, text_input=text_input)
    )
    feeds = {"x": np.array([[1.0, 0.0]], np.float32)}
    if text_input:
        feeds["note"] = np.array([b"hello"], dtype=object)
    assert model.infer(feeds)["label"].tolist() == [b"cat"]
    feeds["x"] = np.array([[0.0, 1.0]], np.float32)
    with caplog.at_level("WARNING"), pytest.raises(FailedPrecondition) as info:
        model.infer(feeds)
    assert info.value.reason == "MODEL_OUTPUT_NOT_UTF8"
    assert "UTF-8" in info.value.message and "labels" in info.value.message
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].reason == "MODEL_OUTPUT_NOT_UTF8"


def test_a_model_whose_tensor_names_are_not_utf8_is_refused_as_invalid() -> None:
    # ONNX names are strings the protobuf runtime does not check in a model; ORT loads one
    # whose output is named in Latin-1, and reading the name raised UnicodeDecodeError out of
    # the load: MODEL_LOAD_ERROR and a traceback, as a bug, rather than the model's own fault.
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes("names", "1", onnx_models.non_utf8_output_name())
    assert info.value.reason == "MODEL_INVALID"
    assert "UTF-8" in info.value.message


def test_ort_rejects_inputs_as_invalid_argument() -> None:
    model = LoadedModel.from_bytes("clf", "1", onnx_models.classifier())
    with pytest.raises(InvalidArgument) as info:
        model.infer({"x": np.ones((1, 5), np.float32)})
    assert info.value.reason == "INFERENCE_INPUT_REJECTED"


def test_external_initializers_come_from_memory_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = np.arange(1000, dtype=np.float32)
    graph, data = onnx_models.lookup_external(table)
    buffer = bytearray(data)
    model = LoadedModel.from_bytes("lookup", "1", graph, external_data={"weights.bin": buffer})
    # ORT copied the weights while loading: the caller may wipe its buffer at once.
    buffer[:] = bytes(len(buffer))
    np.testing.assert_array_equal(model.infer({"indices": np.array([3, 999])})["y"], [3, 999])
    # Without the in-memory file, a weights.bin on disk next to us is NOT read.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(data)
    with pytest.raises(ModelLoadError):
        LoadedModel.from_bytes("lookup", "1", graph)


def test_session_options_never_write_files() -> None:
    so = session_options(RuntimeOptions(intra_op_threads=2, graph_optimization="basic"))
    assert so.optimized_model_filepath == ""
    assert so.enable_profiling is False
    assert so.get_session_config_entry("ep.context_enable") == "0"
    assert so.intra_op_num_threads == 2
    with pytest.raises(ValueError):
        RuntimeOptions(graph_optimization="fast")


def test_a_models_metadata_never_sets_its_session_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # With ORT_LOAD_CONFIG_FROM_MODEL=1 in the service's environment (an ORT debugging switch),
    # ONNX Runtime took session options from the model's ``ort_config`` metadata over the
    # service's: a publisher's model turned profiling on (a JSON file of its graph's nodes and
    # shapes, written to the working directory every run) and chose its own thread counts.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORT_LOAD_CONFIG_FROM_MODEL", "1")
    config = {"session_options": {"enable_profiling": 1, "intra_op_num_threads": 7}}
    with caplog.at_level("WARNING"):
        model = LoadedModel.from_bytes("configured", "1", onnx_models.with_ort_config(config))
    model.infer({"x": X})
    chosen = model._session.get_session_options()
    assert not chosen.enable_profiling and chosen.intra_op_num_threads == 0
    assert list(tmp_path.iterdir()) == []
    assert "ORT_LOAD_CONFIG_FROM_MODEL" in caplog.text


# -- repository ---------------------------------------------------------------------------------


def test_expected_model_is_not_ready_until_loaded() -> None:
    repo = ModelRepository(["clf"])
    assert not repo.server_ready()
    assert not repo.is_ready("clf")
    with pytest.raises(ModelNotReady):
        repo.get("clf")
    repo.begin_load("clf", "1")
    with pytest.raises(ModelNotReady) as info:
        repo.get("clf")
    assert "still loading" in info.value.message
    repo.load("clf", "1", onnx_models.classifier())
    assert repo.server_ready()
    assert repo.is_ready("clf") and repo.is_ready("clf", "1")
    assert repo.get("clf").version == "1"
    assert repo.versions("clf") == ("1",)


def test_failed_load_is_not_ready_and_keeps_its_reason() -> None:
    repo = ModelRepository(["clf"])
    with pytest.raises(ModelLoadError):
        repo.load("clf", "1", b"not a model")
    assert not repo.is_ready("clf") and not repo.is_ready("clf", "1")
    assert not repo.server_ready()
    with pytest.raises(ModelLoadFailed) as info:
        repo.get("clf")
    assert info.value.reason == "MODEL_LOAD_FAILED"
    assert "MODEL_INVALID" in info.value.message
    # What the load's error said (a peer's refusal, an internal address) is not the caller's.
    failure = repo.status("clf").versions[0].failure
    assert failure is not None and failure.message
    assert failure.message not in info.value.message
    status = repo.status("clf")
    assert not status.ready
    assert status.versions[0].state is ModelState.FAILED
    assert status.versions[0].failure is not None
    assert status.versions[0].failure.reason == "MODEL_INVALID"


def test_failed_new_version_leaves_the_old_one_serving() -> None:
    repo = ModelRepository(["m"])
    repo.load("m", "1", onnx_models.adder(1.0))
    with pytest.raises(ModelLoadError):
        repo.load("m", "2", b"garbage")
    assert repo.is_ready("m") and repo.get("m").version == "1"
    assert not repo.is_ready("m", "2")
    with pytest.raises(ModelLoadFailed):
        repo.get("m", "2")
    assert repo.server_ready()


def _failed(repo: ModelRepository) -> list[tuple[str, str]]:
    return [
        (name, v.version)
        for name in repo.names()
        for v in repo.status(name).versions
        if v.state is ModelState.FAILED
    ]


def test_failed_loads_are_kept_within_a_cap_oldest_dropped_first() -> None:
    """Every failed load stayed listed for ever: version after version of names that do not
    exist (LoadModel is admin-only, but a script can) grew the model table without limit."""
    from strongroom.inference.models._repository import MAX_FAILED_LOADS

    repo = ModelRepository(["configured"])
    repo.load("m", "1", onnx_models.adder(1.0))
    error = ModelLoadFailed("the store has no such model", reason="MODEL_NOT_IN_STORE")
    repo.fail("configured", "1", error)
    attempts = [(f"typo/{i}", "1") for i in range(2 * MAX_FAILED_LOADS)]
    for name, version in attempts:
        repo.fail(name, version, error)
    kept = _failed(repo)
    assert len(kept) == MAX_FAILED_LOADS
    assert sorted(kept) == sorted(attempts[-MAX_FAILED_LOADS:])  # the newest, oldest dropped
    # A model with nothing left to show is no longer listed; a configured one, and a serving
    # version, stay.
    assert "typo/0" not in repo.names() and "configured" in repo.names()
    assert repo.is_ready("m", "1") and not repo.server_ready()


def test_a_failed_version_loading_again_still_shows_why_it_failed() -> None:
    """A version loading again after a failure (a configured model's retry) read only LOADING,
    "still loading": an operator watching it could not see why it was being retried. Its last
    failure's reason now stays in its status and in what ModelMetadata/ModelInfer answer, until
    the load succeeds or fails anew; the failure's message (a peer's words) still is not shown."""
    repo = ModelRepository(["clf"])
    denied = ModelLoadFailed("refused by 10.0.0.7", reason="MEASUREMENT_NOT_ALLOWED")
    repo.fail("clf", "1", denied)
    loading = repo.begin_load("clf", "1")
    status = repo.status("clf").versions[0]
    assert status.state is ModelState.LOADING
    assert status.failure is not None and status.failure.reason == "MEASUREMENT_NOT_ALLOWED"
    for version in ("", "1"):
        with pytest.raises(ModelNotReady) as info:
            repo.get("clf", version)
        assert info.value.reason == "MODEL_NOT_READY"
        assert "loading again" in info.value.message
        assert "MEASUREMENT_NOT_ALLOWED" in info.value.message
        assert "10.0.0.7" not in info.value.message
    # Failing anew, it shows the new failure; loading, then loaded, it shows none.
    repo.fail("clf", "1", ModelLoadFailed("gone", reason="MODEL_NOT_FOUND"), loading=loading)
    repo.begin_load("clf", "1")
    with pytest.raises(ModelNotReady, match="MODEL_NOT_FOUND"):
        repo.get("clf")
    repo.load("clf", "1", onnx_models.classifier())
    assert repo.status("clf").versions == (VersionStatus("1", ModelState.READY),)
    # A version that never failed reads as before.
    repo.begin_load("other", "1")
    with pytest.raises(ModelNotReady, match="still loading"):
        repo.get("other")


def test_a_failed_load_is_replaced_by_the_next_attempt_and_removed_by_unload() -> None:
    repo = ModelRepository(max_failed=2)
    error = ModelLoadFailed("refused", reason="KEY_RELEASE_DENIED")
    repo.fail("m", "1", error)
    repo.fail("m", "1", error)  # the same version again: one entry, now the newest
    repo.fail("m", "2", error)
    assert _failed(repo) == [("m", "1"), ("m", "2")]
    repo.fail("m", "1", error)  # the retry of 1 makes 2 the oldest
    repo.fail("m", "3", error)
    assert sorted(_failed(repo)) == [("m", "1"), ("m", "3")]
    loading = repo.begin_load("m", "3")  # an attempt replaces the failure while it runs
    assert repo.version_state("m", "3") is ModelState.LOADING
    repo.fail("m", "3", error, loading=loading)
    repo.unload("m", "1")
    assert _failed(repo) == [("m", "3")]
    repo.fail("n", "1", error)
    repo.fail("o", "1", error)  # the cap counts across models: m/3 goes, and m with it
    assert _failed(repo) == [("n", "1"), ("o", "1")] and "m" not in repo.names()
    repo.unload("n")
    assert repo.names() == ("o",)


def test_an_unload_while_a_version_is_retried_is_remembered_until_the_retries_end() -> None:
    """A retried version's state alone did not tell an unload apart: a LoadModel after the
    unload that failed listed it FAILED again, as before the unload (and its retries went on).
    An unload of the version, or of its model, marks the watch of each block retrying it."""
    repo = ModelRepository(["m"])
    error = ModelLoadFailed("refused", reason="KEY_RELEASE_DENIED")
    with repo.retrying("m", "1") as m1, repo.retrying("m", "2") as m2:
        with repo.retrying("n", "1") as n1:
            repo.fail("m", "1", error)
            repo.fail("m", "2", error)
            repo.fail("n", "1", error)
            repo.unload("m", "1")
            repo.fail("m", "1", error)  # a LoadModel after the unload, failed
            assert m1.unloaded
            assert not m2.unloaded
            repo.unload("n")
            assert n1.unloaded
        with pytest.raises(ModelNotFound):
            repo.unload("m", "3")  # nothing unloaded: nothing marked
        assert not m2.unloaded
        repo.unload("m")
        assert m2.unloaded


def test_an_unload_before_a_retry_began_does_not_end_it() -> None:
    """The unload was remembered by version while any block retried it, so it reached a block
    that began after it: with a configured model's block held (while any configured model is
    retried), an unload of it followed by an operator's LoadModel of it would have ended that
    LoadModel's retries at its first back-off. Each block sees only the unloads it was there
    for."""
    repo = ModelRepository(["m"])
    error = ModelLoadFailed("refused", reason="KEY_RELEASE_UNAVAILABLE")
    with repo.retrying("m", "1") as configured:
        repo.fail("m", "1", error)
        repo.unload("m", "1")
        with repo.retrying("m", "1") as operators:
            repo.fail("m", "1", error)
            assert configured.unloaded
            assert not operators.unloaded
            repo.unload("m")
            assert operators.unloaded
        assert repo.version_state("m", "1") is None


def test_unknown_models_and_versions() -> None:
    repo = ModelRepository()
    repo.load("m", "1", onnx_models.adder(1.0))
    with pytest.raises(ModelNotFound) as info:
        repo.get("nope")
    assert info.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(ModelNotFound) as info:
        repo.get("m", "7")
    assert info.value.reason == "MODEL_VERSION_NOT_FOUND"
    assert not repo.is_ready("nope")
    with pytest.raises(InvalidArgument):
        repo.load("../etc", "1", onnx_models.adder(1.0))
    with pytest.raises(InvalidArgument):
        repo.begin_load("m", "")


def test_unloading_a_version_that_is_not_held_says_so_and_changes_nothing() -> None:
    """An unload of a version the server does not hold (a typo of the version to retire, or one
    already gone) answered as if it had unloaded it, while the version meant kept serving."""
    repo = ModelRepository()
    repo.load("m", "1.0.0", onnx_models.adder(1.0))
    with pytest.raises(ModelNotFound) as info:
        repo.unload("m", "1.0")
    assert info.value.reason == "MODEL_VERSION_NOT_FOUND"
    assert "nothing was unloaded" in info.value.message
    assert repo.get("m").version == "1.0.0"
    repo.unload("m", "1.0.0")
    with pytest.raises(ModelNotFound):
        repo.unload("m", "1.0.0")  # gone now: the second unload finds nothing either


def test_publishing_swaps_the_default_and_retires_old_versions() -> None:
    repo = ModelRepository(retain_versions=2)
    for v in ("1", "2", "3"):
        repo.load("m", v, onnx_models.adder(float(v)))
    assert repo.get("m").version == "3"
    assert repo.versions("m") == ("2", "3")
    assert repo.get("m", "2").version == "2"
    with pytest.raises(ModelNotFound):
        repo.get("m", "1")
    repo.unload("m", "3")
    assert repo.get("m").version == "2"
    repo.unload("m")
    assert repo.names() == ()


def test_in_flight_request_completes_on_the_version_it_started_with() -> None:
    repo = ModelRepository()
    repo.load("m", "1", onnx_models.adder(1.0))
    held = repo.get("m")
    repo.load("m", "2", onnx_models.adder(2.0))
    assert repo.versions("m") == ("2",)
    out = held.infer({"x": np.zeros((1, 4), np.float32)})["y"]
    np.testing.assert_array_equal(out, np.ones((1, 4), np.float32))


def test_concurrent_gets_during_swaps_never_fail() -> None:
    repo = ModelRepository(["m"])
    repo.load("m", "1", onnx_models.adder(1.0))
    blobs = {str(v): onnx_models.adder(float(v)) for v in range(2, 8)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        x = np.zeros((1, 4), np.float32)
        while not stop.is_set():
            try:
                model = repo.get("m")
                y = model.infer({"x": x})["y"]
                assert float(y[0, 0]) == float(model.version)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for version, blob in blobs.items():
        repo.load("m", version, blob)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert repo.get("m").version == "7"


def test_an_unload_during_a_load_wins() -> None:
    repo = ModelRepository(["m"])
    loading = repo.begin_load("m", "1")
    repo.unload("m", "1")
    with pytest.raises(ModelUnloaded) as info:
        repo.load("m", "1", onnx_models.adder(1.0), loading=loading)
    assert (info.value.status_name, info.value.reason) == ("FAILED_PRECONDITION", "MODEL_UNLOADED")
    assert not repo.is_ready("m", "1") and repo.status("m").versions == ()
    # A failure reported for the dropped load is not recorded either.
    repo.fail("m", "1", info.value, loading=loading)
    assert repo.status("m").versions == ()


def test_a_finished_load_publishes_only_if_it_is_still_the_current_one() -> None:
    repo = ModelRepository()
    first = repo.begin_load("m", "1")
    loaded = LoadedModel.from_bytes("m", "1", onnx_models.adder(1.0))
    repo.unload("m", "1")
    second = repo.begin_load("m", "1")  # loaded again meanwhile
    with pytest.raises(ModelUnloaded):
        repo.publish(loaded, loading=first)
    assert not repo.is_ready("m", "1")
    repo.load("m", "1", onnx_models.adder(2.0), loading=second)
    assert repo.is_ready("m", "1")


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "BOOL", "INT8", "UINT64", "INT64"])
def test_outputs_match_a_direct_run_and_never_share_the_callers_input(datatype: str) -> None:
    """Numeric-input models run through ``run_with_ort_values``, whose outputs stay ONNX
    Runtime's tensors until checked: ORT hands back a graph input returned as it is (a graph
    output named like the input) as a view of the caller's own array, which nothing kept alive
    once the caller dropped it (reading the output then crashed the process). Every output
    matches ``session.run``'s, dtype and shape included: empty, scalar, strided inputs too."""
    blob = onnx_models.passthrough(datatype)
    model = LoadedModel.from_bytes("m", "1", blob)
    dtype = onnx_models.NUMPY_TYPES[datatype]
    grid: np.ndarray = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    for x in (grid, grid[:, ::2], grid.T, np.zeros((0, 3), dtype), np.array(1, dtype)):
        out = model.infer({"x": x})
        for name, want in zip(["x", "y"], reference_run(blob, {"x": x}), strict=True):
            assert (out[name].dtype, out[name].shape) == (want.dtype, want.shape)
            np.testing.assert_array_equal(out[name], want)
            assert not np.shares_memory(out[name], x), name


def test_a_run_takes_its_outputs_by_index_not_through_ort_python_wrapper() -> None:
    """ONNX Runtime's ``run_with_ort_values`` wrapper walks the output vector to its end, and
    a pybind11 vector's end is a C++ exception turned into ``IndexError``: ~40 us a run, five
    times a small model's whole run (direct infer 9.5 -> 48 us, ModelInfer p50 433 -> 578 us, in
    process, alternating). The outputs are taken by index from the session's own call: the
    wrapper (a Python function of ORT's, seen by a profile hook, no clock) is not called."""
    model = LoadedModel.from_bytes("clf", "1", onnx_models.classifier())
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.endswith(
            "onnxruntime_inference_collection.py"
        ):
            called.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        out = model.infer({"x": X})
    finally:
        sys.setprofile(None)
    assert "run_with_ort_values" not in called, called
    expected = reference_run(onnx_models.classifier(), {"x": X})
    for name, want in zip(["logits", "probabilities", "label"], expected, strict=True):
        np.testing.assert_array_equal(out[name], want)


def _resident() -> int:
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) * 1024


def _wide_model(cap_mib: int) -> LoadedModel:
    """The classifier with a 256-wide hidden layer, in an arena of its own: a cap no other test
    uses registers a fresh one, so what earlier tests' runs left in the shared arena (regions
    with room for small tensors) does not decide the outcome."""
    options = RuntimeOptions(max_inference_memory_bytes=cap_mib << 20)
    return LoadedModel.from_bytes("wide", "1", onnx_models.classifier(hidden=256), options=options)


BIG = np.ones((200_000, 4), np.float32)  # 3.2 MB: a 195 MiB hidden layer
SMALL = X


def _kept_after_a_big_request(model: LoadedModel) -> int:
    """Bytes still resident after a small request, a big one and a small one again, beyond the
    big request's copied-out output (the caller's)."""
    model.infer({"x": SMALL})
    before = _resident()
    label = model.infer({"x": BIG}, ["label"])["label"]
    model.infer({"x": SMALL})
    return _resident() - before - label.nbytes


@pytest.mark.parametrize(("warm", "cap_mib"), [(True, 641), (False, 642)], ids=["warm", "first"])
def test_a_big_request_leaves_nothing_of_its_memory_held(warm: bool, cap_mib: int) -> None:
    """The arena placed the big run's output in the region its hidden layer had just left; that
    region was alive at the run's own shrink, the next small run's tensors went into it (the
    arena's only region), and so on: ~200 MiB stayed held for as long as requests came. Now
    nothing of a request stays in the arena once ``infer`` returns."""
    model = _wide_model(cap_mib)
    if warm:
        model.infer({"x": SMALL})
    before = _resident()
    label = model.infer({"x": BIG}, ["label"])["label"]
    assert label.shape == (200_000, 1)
    again = model.infer({"x": SMALL})
    np.testing.assert_array_equal(again["label"], model.infer({"x": SMALL})["label"])
    kept = _resident() - before - label.nbytes  # the copied-out output is the caller's
    assert kept < 16 << 20, f"{kept >> 20} MiB still resident after the big request"


def test_a_refused_output_leaves_nothing_held_though_its_traceback_is_kept() -> None:
    """The output check refuses a big request's outputs while they are ORT's tensors; the refusal
    keeps ``infer``'s frame alive in its traceback (here in ``pytest.raises``; in the service,
    until the error is mapped), and the frame held the outputs, in the 195 MiB region."""
    model = _wide_model(643)
    model.infer({"x": SMALL})
    before = _resident()

    def refuse(shapes: Any) -> None:
        raise ResourceExhausted("too large", reason=Reason.RESPONSE_TOO_LARGE)

    with pytest.raises(ResourceExhausted) as info:
        model.infer({"x": BIG}, check_shapes=refuse)
    assert info.traceback  # kept while measured
    kept = _resident() - before
    assert kept < 16 << 20, f"{kept >> 20} MiB still resident after the refused request"


def test_a_big_request_to_a_model_with_a_string_input_leaves_nothing_held() -> None:
    """ORT's ``run`` (which serves a model with a string input) returns its numeric outputs as
    numpy views of ORT's tensors in the arena, not copies: ``infer`` handed them on as they were,
    so the big run's output kept the 195 MiB region its hidden layer had left, the next small
    run's tensors went into it, and the region stayed held for as long as requests came."""
    options = RuntimeOptions(max_inference_memory_bytes=644 << 20)
    model = LoadedModel.from_bytes(
        "tagged", "1", onnx_models.tagged_classifier(hidden=256), options=options
    )
    tag = np.array([b"t"], dtype=object)
    model.infer({"x": SMALL, "tag": tag})
    before = _resident()
    label = model.infer({"x": BIG, "tag": tag}, ["label"])["label"]
    assert label.shape == (200_000, 1)
    assert label.base is None  # an array of its own, not a view of ORT's tensor
    again = model.infer({"x": SMALL, "tag": tag})
    np.testing.assert_array_equal(again["label"], model.infer({"x": SMALL, "tag": tag})["label"])
    assert again["tag_out"].tolist() == [b"t"]
    kept = _resident() - before - label.nbytes  # the copied-out output is the caller's
    assert kept < 16 << 20, f"{kept >> 20} MiB still resident after the big request"


def test_without_ort_internals_the_arena_is_still_handed_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ArenaReturn`` runs its session through ORT's private ``_sess``/``_iobinding`` (the
    wrapper costs ~30 us); a release without them takes the wrapper's call, which frees as well."""
    from strongroom.inference.models import _arena

    monkeypatch.setattr(_arena, "getattr", lambda obj, name, default=None: None, raising=False)
    model = _wide_model(645)
    give_back = model._give_back
    assert isinstance(give_back, _arena.ArenaReturn)
    run = give_back._run
    assert isinstance(run, functools.partial)
    assert run.func == give_back._session.run_with_iobinding  # the wrapper's call
    kept = _kept_after_a_big_request(model)
    assert kept < 16 << 20, f"{kept >> 20} MiB still resident after the big request"


def test_an_arena_whose_hand_back_failed_is_registered_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``use_inference_memory_cap`` recorded the new cap before it made the arena's
    ``ArenaReturn``: when that failed (the load saw ORT's error), the next load took the cap as
    registered and its session ran with the previous arena's hand-back (or none), which frees
    nothing of this arena: a big request's ~200 MiB stayed held again, silently."""
    from strongroom.inference.models import _loaded

    real = _loaded.ArenaReturn
    failures = iter([RuntimeError("ORT could not make the session")])

    def fails_once() -> Any:
        for exc in failures:
            raise exc
        return real()

    monkeypatch.setattr(_loaded, "ArenaReturn", fails_once)
    with pytest.raises(RuntimeError):
        _wide_model(646)
    model = _wide_model(646)
    kept = _kept_after_a_big_request(model)
    assert kept < 16 << 20, f"{kept >> 20} MiB still resident after the big request"
