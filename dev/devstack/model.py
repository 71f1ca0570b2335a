"""Step 1 of the lifecycle, "train": a small classifier trained here and exported to ONNX.

A softmax regression on a synthetic three-class problem, fitted with a few hundred steps of
gradient descent in NumPy, then written as an ONNX graph (MatMul → Add → Softmax) whose weights are
plain initializers. ``padding_bytes`` adds an unused initializer to make the file as large as a
benchmark needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 8
CLASSES = 3


@dataclass(frozen=True)
class TrainedModel:
    """The exported model and what it was trained on."""

    path: Path
    weights: np.ndarray
    bias: np.ndarray
    accuracy: float
    sample: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities computed directly in NumPy (the plaintext reference)."""
        logits = x @ self.weights + self.bias
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return probabilities


def train(path: Path, *, seed: int = 7, padding_bytes: int = 0) -> TrainedModel:
    """Trains the classifier and writes ``path`` (ONNX, opset 17)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, size=600)
    x = (centres[labels] + rng.normal(0, 1, size=(600, FEATURES))).astype(np.float32)
    w = np.zeros((FEATURES, CLASSES), dtype=np.float32)
    b = np.zeros(CLASSES, dtype=np.float32)
    onehot = np.eye(CLASSES, dtype=np.float32)[labels]
    for _ in range(300):
        logits = x @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= 0.5 * (x.T @ grad)
        b -= 0.5 * grad.sum(axis=0)
    accuracy = float(((x @ w + b).argmax(axis=1) == labels).mean())

    initializers = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if padding_bytes:
        pad = rng.integers(0, 255, size=padding_bytes, dtype=np.uint8)
        initializers.append(numpy_helper.from_array(pad, "unused_padding"))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "strongroom_demo_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    # The plaintext model: readable by its owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(model.SerializeToString())
    return TrainedModel(path, w, b, accuracy, x[:4].copy())
