"""In-memory model runtime: ONNX Runtime sessions from plaintext bytes, and the served-model table.

:class:`LoadedModel` wraps one session with its OIP metadata; :class:`ModelRepository` holds
models by name and version, swaps versions atomically and remembers why a load failed.
"""

from strongroom.inference.models._datatypes import DATATYPES, DataType, datatype_of_array
from strongroom.inference.models._graph import DEFAULT_MAX_GRAPH_NODES
from strongroom.inference.models._loaded import (
    DEFAULT_MAX_INFERENCE_MEMORY_BYTES,
    INFERENCE_MEMORY_SETTING,
    MIN_INFERENCE_MEMORY_BYTES,
    PLATFORM,
    LoadedModel,
    ModelBuffer,
    ModelLoadError,
    RuntimeOptions,
    TensorSpec,
    session_options,
)
from strongroom.inference.models._repository import (
    REPEAT_LOG_SECONDS,
    LoadFailure,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    ModelRepository,
    ModelState,
    ModelStatus,
    ModelUnloaded,
    RetryWatch,
    VersionStatus,
)
from strongroom.inference.models._strings import STRING_SLOT_BYTES

__all__ = [
    "DATATYPES",
    "DEFAULT_MAX_GRAPH_NODES",
    "DEFAULT_MAX_INFERENCE_MEMORY_BYTES",
    "INFERENCE_MEMORY_SETTING",
    "MIN_INFERENCE_MEMORY_BYTES",
    "PLATFORM",
    "REPEAT_LOG_SECONDS",
    "STRING_SLOT_BYTES",
    "DataType",
    "LoadFailure",
    "LoadedModel",
    "ModelBuffer",
    "ModelLoadError",
    "ModelLoadFailed",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRepository",
    "ModelState",
    "ModelStatus",
    "ModelUnloaded",
    "RetryWatch",
    "RuntimeOptions",
    "TensorSpec",
    "VersionStatus",
    "datatype_of_array",
    "session_options",
]
