"""``tritonclient[grpc]``, unmodified, against the OIP servicer (run in a subprocess, see the probe)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from strongroom.inference.models import ModelRepository, RuntimeOptions, session_options
from tests.inference import onnx_models
from tests.inference.conftest import Starter

PROBE = Path(__file__).with_name("tritonclient_probe.py")


def test_tritonclient_works_unchanged(start_server: Starter) -> None:
    # Only look for it: importing tritonclient.grpc here would clash with our descriptors.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] (a dev dependency) is not installed")
    repo = ModelRepository(["classifier"])
    repo.load("classifier", "1", onnx_models.classifier())
    for datatype in ("FP16", "FP64", "INT8", "UINT64", "BOOL", "BYTES"):
        repo.load(f"identity_{datatype.lower()}", "1", onnx_models.identity(datatype))
    running = start_server(repo)
    completed = subprocess.run(
        [sys.executable, str(PROBE), running.address],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    seen = json.loads(completed.stdout)

    assert seen["server_live"] is True
    assert seen["server_ready"] is True
    assert seen["model_ready"] is True
    assert seen["model_ready_v1"] is True
    assert seen["unknown_model_ready"] is False
    assert seen["server_metadata"]["name"] == "strongroom-inference"
    assert "strongroom_attestation" in seen["server_metadata"]["extensions"]
    meta = seen["model_metadata"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]

    classifier = seen["classifier"]
    assert classifier["id"] == "probe-1"
    assert classifier["model_version"] == "1"
    assert classifier["outputs"] == ["logits", "label"]
    assert seen["classifier_all_outputs"] == ["logits", "probabilities", "label"]
    x = np.array(seen["classifier_input"]["values"], np.float32).reshape(3, 4)
    session = ort.InferenceSession(onnx_models.classifier(), session_options(RuntimeOptions()))
    logits, _, label = session.run(None, {"x": x})
    got_logits = np.array(classifier["logits"]["values"], np.float32).reshape(3, 3)
    np.testing.assert_array_equal(got_logits, logits)
    assert classifier["label"]["dtype"] == "int64"
    assert classifier["label"]["values"] == label.reshape(-1).tolist()

    assert set(seen["identities"]) == {"FP16", "FP64", "INT8", "UINT64", "BOOL", "BYTES"}
    for datatype, pair in seen["identities"].items():
        assert pair["got"] == pair["sent"], datatype

    assert seen["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
    assert "MODEL_NOT_FOUND" in seen["unknown_model_error"]["message"]
    assert seen["bad_shape_error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "SHAPE_MISMATCH" in seen["bad_shape_error"]["message"]
