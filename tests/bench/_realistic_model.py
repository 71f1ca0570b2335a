"""A model whose weights are all used, for the cold start's realistic figure (``coldstart_bench``).

The cold start's main model is the demo classifier padded with an initializer no node reads:
ONNX Runtime drops it, so its "load" is a parse-and-discard of the bytes. A real model's load
keeps every weight and, for MatMul, prepacks it: seconds of CPU at 512 MiB. This one is a
``Gather`` embedding table feeding a chain of ``MatMul`` → ``Add`` → ``Relu`` layers over float32
weights, sized to about ``size_mb`` MiB (a quarter in the table, the rest in :data:`LAYERS`
square layers), generated deterministically from ``seed``: nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

LAYERS = 16
"""Dense layers in the chain (each ``hidden`` x ``hidden`` float32 weights and a bias)."""

EMBEDDING_SHARE = 0.25
"""The part of the model's bytes in the embedding table; the layers hold the rest."""

_FLOAT = 4  # bytes


@dataclass(frozen=True)
class RealisticModel:
    """The written model and its shape."""

    path: Path
    hidden: int
    vocabulary: int
    layers: int

    @property
    def description(self) -> str:
        """What the model is, for the results (RESULTS.md shows it beside the figures)."""
        return (
            f"Gather {self.vocabulary}x{self.hidden} table, then {self.layers} x "
            f"(MatMul {self.hidden}x{self.hidden} + Add + Relu), float32, every weight used"
        )


def shape_for(size_mb: int) -> tuple[int, int]:
    """The hidden width (a multiple of 64, at least 64) and the table's rows for ``size_mb``."""
    total = size_mb << 20
    per_layer = total * (1 - EMBEDDING_SHARE) / LAYERS
    hidden = max(64, int(math.sqrt(per_layer / _FLOAT)) // 64 * 64)
    layer_bytes = LAYERS * (hidden * hidden + hidden) * _FLOAT
    vocabulary = max(1, (total - layer_bytes) // (hidden * _FLOAT))
    return hidden, vocabulary


def generate(path: Path, *, size_mb: int, seed: int = 11) -> RealisticModel:
    """Writes the model to ``path`` (ONNX, opset 17), readable by its owner only."""
    hidden, vocabulary = shape_for(size_mb)
    rng = np.random.default_rng(seed)

    def uniform(shape: tuple[int, ...], bound: float) -> np.ndarray:
        # Uniform rather than normal draws: 2.5x faster for the same bytes, and no figure
        # depends on the values.
        values = rng.random(shape, dtype=np.float32)
        values -= np.float32(0.5)
        values *= np.float32(2 * bound)
        return values

    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["h0"])]
    for i in range(LAYERS):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i + 1}"]),
        ]
    graph = helper.make_graph(
        nodes,
        "strongroom_bench_realistic",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(f"h{LAYERS}", TensorProto.FLOAT, ["batch", hidden])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8

    def add(name: str, values: np.ndarray) -> None:
        # Straight into the model's own graph: helper.make_graph and make_model copy the
        # tensors they are given (four copies of 512 MiB, 13 s, where this is one).
        tensor = model.graph.initializer.add()
        tensor.name = name
        tensor.data_type = TensorProto.FLOAT
        tensor.dims.extend(values.shape)
        tensor.raw_data = values.tobytes()

    # He-scaled weights keep the activations finite through the Relu chain.
    bound = math.sqrt(6 / hidden)
    add("embedding", uniform((vocabulary, hidden), 1.0))
    for i in range(LAYERS):
        add(f"w{i}", uniform((hidden, hidden), bound))
        add(f"b{i}", uniform((hidden,), 0.01))
    # The plaintext model: readable by its owner only (as the demo classifier's).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(model.SerializeToString())
    return RealisticModel(path, hidden, vocabulary, LAYERS)
