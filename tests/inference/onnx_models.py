"""Small real ONNX models built in memory with the ``onnx`` helper API (never written to disk)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

ELEMENT_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

NUMPY_TYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def classifier(in_features: int = 4, hidden: int = 8, classes: int = 3, seed: int = 0) -> bytes:
    """Gemm -> Relu -> Gemm logits, plus softmax probabilities and an INT64 argmax label."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((in_features, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    b2 = rng.standard_normal(classes).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch", 1]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    return _model(graph).SerializeToString()


def identity(datatype: str, shape: tuple[int | str, ...] = ("batch", 3)) -> bytes:
    """``y = Identity(x)`` for one OIP datatype."""
    element = ELEMENT_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", element, list(shape))],
        [helper.make_tensor_value_info("y", element, list(shape))],
    )
    return _model(graph).SerializeToString()


def two_inputs() -> bytes:
    """``sum = a + Cast(b)`` with a dynamic FP32 ``a`` [batch, 2] and a fixed INT32 ``b`` [2]."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "bf"], ["sum"]),
            helper.make_node("Identity", ["b"], ["b_copy"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("b", TensorProto.INT32, [2]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("b_copy", TensorProto.INT32, [2]),
        ],
    )
    return _model(graph).SerializeToString()


def broadcast_add(node_name: str = "") -> bytes:
    """``y = a + b`` with ``a`` [n, 2] and ``b`` [m, 2]: every shape passes the advertised checks,
    but ``n`` and ``m`` must agree (or one be 1) inside the graph."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"], name=node_name)],
        "broadcast_add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", 2])],
    )
    return _model(graph).SerializeToString()


def adder(value: float) -> bytes:
    """``y = x + value``: versions of one model that are told apart by their output."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([value], dtype=np.float32), "c")],
    )
    return _model(graph).SerializeToString()


def bfloat16_identity() -> bytes:
    """A model whose input type OIP cannot carry here (BF16)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    return _model(graph).SerializeToString()


def lookup_graph(elements: int) -> onnx.ModelProto:
    """``y = Gather(table, indices)`` with a float32 table of ``elements`` (not constant-foldable)."""
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[elements])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "indices"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def lookup(table: np.ndarray) -> bytes:
    """The lookup model with ``table`` (float32) embedded: a big model when the table is big."""
    model = lookup_graph(table.size)
    model.graph.initializer[0].raw_data = np.ascontiguousarray(table, dtype="<f4").tobytes()
    return model.SerializeToString()


def lookup_external(table: np.ndarray, location: str = "weights.bin") -> tuple[bytes, bytes]:
    """The lookup model with its table as external data: (graph bytes, external file bytes)."""
    model = lookup_graph(table.size)
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    data = np.ascontiguousarray(table, dtype="<f4").tobytes()
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = init.external_data.add()
        entry.key = key
        entry.value = value
    return model.SerializeToString(), data


def sized_by_value(operator: str, where: str = "graph") -> bytes:
    """``y = operator(ConstantOfShape(n))``: a request's value ``n`` sizes ``operator``'s input
    (``NonZero`` or ``Unique`` on INT64 ones). ``where``: the node in the ``graph``, in an ``If``
    branch (``subgraph``), or in a model-local ``function``."""
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    ones = helper.make_node(
        "ConstantOfShape", ["n"], ["a"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])
    )
    node = helper.make_node(operator, ["a"], ["y"])
    functions: list[onnx.FunctionProto] = []
    if where == "graph":
        nodes = [ones, node]
    elif where == "subgraph":
        branch = helper.make_graph([node], "branch", [], [y])
        nodes = [
            ones,
            helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", 9, [], [True])),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ]
    else:
        functions.append(
            helper.make_function(
                "local", "Sized", ["a"], ["y"], [node], [helper.make_opsetid("", OPSET)]
            )
        )
        nodes = [ones, helper.make_node("Sized", ["a"], ["y"], domain="local")]
    graph = helper.make_graph(nodes, "sized", [n], [y])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)],
        functions=functions,
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def parse_numbers() -> bytes:
    """``y = Cast(x, FP32)`` of a BYTES tensor: the text of each element parsed as a number."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "parse",
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    return _model(graph).SerializeToString()
