"""Handing ONNX Runtime's shared CPU arena's free regions back once a request is done with them.

ORT frees an arena's regions only when a run asks it to (the run option
``memory.enable_memory_arena_shrinkage``), at that run's end, and only the regions in which no
tensor is in use: the run's outputs are still alive then. The arena places a tensor in the
smallest free chunk that fits, wherever it is, so a big request's outputs went into the region
its intermediates had just left (one 3.2 MB request through a 256-wide layer: a 195 MiB region
holding a 1.6 MB output), and that region was kept; the next request's small tensors then went
into the same region (often the arena's only one left), were alive at the next shrink, and so on:
~200 MiB stayed resident for as long as requests kept coming, whether or not another region happened
to have room for those small tensors (which depended on what earlier requests had left).

:class:`ArenaReturn` asks for a shrink when nothing of a request is left in the arena: a run of
a one-node model whose input and output are bound to buffers of its own (so it places nothing in
the arena), with the shrink option. Every region no running request uses goes back to malloc;
one past 32 MiB is always an mmapped chunk (glibc's dynamic mmap threshold stops there), unmapped
at once, whatever the process's malloc tunables.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper

from strongroom.inference.models._ort import ort

SHRINK_OPTION = "memory.enable_memory_arena_shrinkage"
"""The run option that makes ORT free the arena's unused regions at the run's end."""
SHRINK_CPU = "cpu:0"
"""Its value for the CPU arena."""


def _identity_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "arena-return",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class ArenaReturn:
    """Frees the regions of the CPU arena registered in ORT's environment when it was made
    that no tensor uses (call it once a request's tensors are gone); thread-safe."""

    def __init__(self) -> None:
        so = ort.SessionOptions()
        so.optimized_model_filepath = ""
        so.enable_profiling = False
        so.add_session_config_entry("session.load_model_format", "ONNX")
        # The environment's arena (the capped one), whose shrink this session's run asks for.
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # One thread: a pool of its own per core for a 4-byte copy would only cost threads.
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self._session = ort.InferenceSession(
            _identity_model(), so, providers=["CPUExecutionProvider"]
        )
        self._input = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32))
        self._output = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32))
        self._binding = self._session.io_binding()
        self._binding.bind_ortvalue_input("x", self._input)
        self._binding.bind_ortvalue_output("y", self._output)
        self._options = ort.RunOptions()
        self._options.add_run_config_entry(SHRINK_OPTION, SHRINK_CPU)
        self._options.log_severity_level = 4
        # ORT's Python wrapper of this run costs ~31 us of its ~33 (its checks for WebGPU graph
        # capture); the session's own call, ~2 us. The wrapper when the call is not there.
        native = getattr(self._session, "_sess", None)
        native_binding = getattr(self._binding, "_iobinding", None)
        if native is not None and native_binding is not None:
            self._run: Callable[[], object] = functools.partial(
                native.run_with_iobinding, native_binding, self._options
            )
        else:
            self._run = functools.partial(
                self._session.run_with_iobinding, self._binding, self._options
            )
        # The binding's output is one buffer: runs take turns writing it.
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self._run()
