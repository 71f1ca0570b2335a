"""The cold start's realistic model (``tests/bench/_realistic_model.py``): every weight is read by
a node (the point of it: ONNX Runtime keeps them all), its size is the one asked for, it is the
same bytes each time, and the product's repository loads and runs it."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import onnx

from strongroom.inference.models import ModelRepository
from tests.bench import _realistic_model

SIZE_MB = 4


def test_every_initializer_is_read_by_a_node(tmp_path: Path) -> None:
    model = _realistic_model.generate(tmp_path / "m.onnx", size_mb=SIZE_MB)
    proto = onnx.load(str(model.path))
    onnx.checker.check_model(proto)
    read = {name for node in proto.graph.node for name in node.input}
    initializers = {tensor.name for tensor in proto.graph.initializer}
    assert initializers <= read
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("MatMul") == model.layers == _realistic_model.LAYERS
    assert ops.count("Gather") == 1
    # The weights are nearly all of it: a dense layer's worth of bytes at most is left over.
    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    target = SIZE_MB << 20
    assert target - model.hidden * 4 <= weights <= target
    assert model.path.stat().st_size - weights < 4096
    assert stat.S_IMODE(model.path.stat().st_mode) == 0o600  # a plaintext model


def test_the_model_is_the_same_bytes_each_time(tmp_path: Path) -> None:
    first = _realistic_model.generate(tmp_path / "a.onnx", size_mb=SIZE_MB)
    second = _realistic_model.generate(tmp_path / "b.onnx", size_mb=SIZE_MB)
    assert first.path.read_bytes() == second.path.read_bytes()
    other = _realistic_model.generate(tmp_path / "c.onnx", size_mb=SIZE_MB, seed=12)
    assert other.path.read_bytes() != first.path.read_bytes()


def test_the_product_repository_loads_and_runs_it(tmp_path: Path) -> None:
    model = _realistic_model.generate(tmp_path / "m.onnx", size_mb=SIZE_MB)
    loaded = ModelRepository().load("m", "1", model.path.read_bytes())
    out = loaded.infer({"ids": np.array([0, model.vocabulary - 1], dtype=np.int64)})
    (hidden,) = out.values()
    assert hidden.shape == (2, model.hidden)
    # Finite and not all zero: the activations survive the Relu chain.
    assert np.isfinite(hidden).all()
    assert (hidden > 0).any()
    assert not np.array_equal(hidden[0], hidden[1])
