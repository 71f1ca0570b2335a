"""The one place the inference service imports ONNX Runtime: with its telemetry switched off first.

ONNX Runtime's Linux wheels (1.32 here) carry Microsoft 1DS telemetry. At import it creates
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}`` and records events in
that SQLite file — graph and model file names, error messages naming initializers, operator
domains, run statistics — for upload. A confidential inference server must not write model
metadata to disk or send it anywhere. ORT reads ``ORT_DISABLE_TELEMETRY`` once, at import, so it is
set before the first import; telemetry events are disabled as well, which still stops the model
events if some other module imported onnxruntime first (the device-id files then already exist).
Deployments should also set ``ORT_DISABLE_TELEMETRY=1`` in the environment.
"""

from __future__ import annotations

import logging
import os
import sys

# Harmless when the environment already disabled telemetry before that earlier import.
_IMPORTED_EARLIER = "onnxruntime" in sys.modules and os.environ.get("ORT_DISABLE_TELEMETRY") != "1"
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import onnxruntime as ort  # noqa: E402
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state  # noqa: E402

ort.disable_telemetry_events()

if _IMPORTED_EARLIER:
    logging.getLogger(__name__).warning(
        "onnxruntime was imported before strongroom.inference.models; its telemetry may have "
        "initialised (set ORT_DISABLE_TELEMETRY=1 in the environment)"
    )

CONFIG_FROM_MODEL = "ORT_LOAD_CONFIG_FROM_MODEL"
"""The environment variable that makes ONNX Runtime, when it is ``1``, take a session's options
from the model's own ``ort_config`` metadata over the options it is given (no session option
turns that off)."""


def ignore_config_from_model() -> None:
    """Removes :data:`CONFIG_FROM_MODEL` from the environment, which ORT reads at each session's
    load: set (an ORT debugging switch), a publisher's model chose its own session options,
    over the service's: profiling on (a file of its graph's nodes and shapes written to the
    working directory, on disk outside the VM's memory), its thread counts, its optimisation.

    Called at import and again before each session is made (``os.environ`` is read as a dict;
    only a variable set since is removed then)."""
    if CONFIG_FROM_MODEL in os.environ:
        del os.environ[CONFIG_FROM_MODEL]
        logging.getLogger(__name__).warning(
            "%s is set in the environment: removed, so that no model's metadata sets its "
            "ONNX Runtime session options",
            CONFIG_FROM_MODEL,
        )


ignore_config_from_model()

__all__ = ["CONFIG_FROM_MODEL", "ignore_config_from_model", "ort", "ort_state"]
