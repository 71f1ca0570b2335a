"""Strongroom's tests and benchmarks."""

import os

# ONNX Runtime's Linux wheel records telemetry unless this is set before it is first imported.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
