"""Drives a server with the unmodified ``tritonclient[grpc]`` and prints what it saw as JSON.

Run in a subprocess: tritonclient ships its own generated ``grpc_service.proto`` (package
``inference``), which clashes with ours in one process's protobuf descriptor pool. Usage:
``python tritonclient_probe.py HOST:PORT`` with the server of ``test_tritonclient.py`` behind it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

CLASSIFIER_INPUT = np.random.default_rng(11).standard_normal((3, 4)).astype(np.float32)
IDENTITY_INPUTS: dict[str, np.ndarray] = {
    "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
    "FP64": np.array([[1e300, -0.0, 3.5]], dtype=np.float64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "UINT64": np.array([[0, 1, 2**64 - 1]], dtype=np.uint64),
    "BOOL": np.array([[True, False, True]]),
    "BYTES": np.array([[b"alpha", "\u00e9t\u00e9".encode(), b""]], dtype=np.object_),
}


def _jsonable(array: np.ndarray) -> dict[str, Any]:
    if array.dtype == np.object_:
        values: Any = [v.hex() for v in array.reshape(-1)]
    elif array.dtype == np.uint64:
        values = [str(v) for v in array.reshape(-1)]
    else:
        values = array.reshape(-1).tolist()
    return {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}


def main(url: str) -> dict[str, Any]:
    client = triton.InferenceServerClient(url=url)
    out: dict[str, Any] = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("classifier"),
        "model_ready_v1": client.is_model_ready("classifier", "1"),
        "unknown_model_ready": client.is_model_ready("no_such_model"),
    }
    meta = client.get_server_metadata(as_json=True)
    out["server_metadata"] = meta
    out["model_metadata"] = client.get_model_metadata("classifier", as_json=True)

    inputs = [triton.InferInput("x", list(CLASSIFIER_INPUT.shape), "FP32")]
    inputs[0].set_data_from_numpy(CLASSIFIER_INPUT)
    outputs = [triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("label")]
    result = client.infer("classifier", inputs, outputs=outputs, request_id="probe-1")
    response = result.get_response()
    out["classifier"] = {
        "id": response.id,
        "model_version": response.model_version,
        "outputs": [o.name for o in response.outputs],
        "logits": _jsonable(result.as_numpy("logits")),
        "label": _jsonable(result.as_numpy("label")),
    }
    everything = client.infer("classifier", inputs)
    out["classifier_all_outputs"] = [o.name for o in everything.get_response().outputs]

    identities = {}
    for datatype, array in IDENTITY_INPUTS.items():
        infer_input = triton.InferInput("x", list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        got = client.infer(f"identity_{datatype.lower()}", [infer_input]).as_numpy("y")
        identities[datatype] = {"sent": _jsonable(array), "got": _jsonable(got)}
    out["identities"] = identities

    try:
        client.infer("no_such_model", inputs)
        out["unknown_model_error"] = None
    except InferenceServerException as exc:
        out["unknown_model_error"] = {"status": exc.status(), "message": exc.message()}
    try:
        bad = triton.InferInput("x", [3, 5], "FP32")
        bad.set_data_from_numpy(np.ones((3, 5), np.float32))
        client.infer("classifier", [bad])
        out["bad_shape_error"] = None
    except InferenceServerException as exc:
        out["bad_shape_error"] = {"status": exc.status(), "message": exc.message()}
    out["classifier_input"] = _jsonable(CLASSIFIER_INPUT)
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
