"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), Triton-compatible."""

from strongroom.inference.oip._budget import (
    DEFAULT_MAX_RESPONSE_MEMORY_BYTES,
    DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS,
    MAX_RESPONSE_MEMORY_WAIT_SECONDS,
    MIN_RESPONSE_MEMORY_BYTES,
    ResponseBudget,
)
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
    "DEFAULT_MAX_RESPONSE_MEMORY_BYTES",
    "DEFAULT_MAX_TENSOR_BYTES",
    "DEFAULT_RESPONSE_MEMORY_WAIT_SECONDS",
    "MAX_RESPONSE_MEMORY_WAIT_SECONDS",
    "MIN_RESPONSE_MEMORY_BYTES",
    "SERVER_NAME",
    "SERVICE_NAME",
    "InferLimits",
    "OipServicer",
    "ResponseBudget",
    "add_to_server",
]
