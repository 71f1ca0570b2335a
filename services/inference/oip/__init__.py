"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), Triton-compatible."""

from strongroom.inference.oip._codec import DEFAULT_MAX_TENSOR_BYTES, InferLimits
from strongroom.inference.oip._servicer import (
    ATTESTATION_EXTENSION,
    SERVER_NAME,
    SERVICE_NAME,
    OipServicer,
    add_to_server,
)

__all__ = [
    "ATTESTATION_EXTENSION",
    "DEFAULT_MAX_TENSOR_BYTES",
    "SERVER_NAME",
    "SERVICE_NAME",
    "InferLimits",
    "OipServicer",
    "add_to_server",
]
