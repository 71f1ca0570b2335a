"""Small real ONNX models built in memory with the ``onnx`` helper API (never written to disk)."""

from __future__ import annotations

import json
from collections.abc import Mapping

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


def unchecked(graph: onnx.GraphProto) -> bytes:
    """``graph`` as a serialized model, as written: not sorted, nor checked by onnx's checker
    (a graph listed out of order is one ORT runs, and the checker refuses)."""
    return _bare(graph).SerializeToString()


def _bare(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = _bare(graph)
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


def tagged_classifier(hidden: int = 8) -> bytes:
    """:func:`classifier` with a string input ``tag`` [1] returned as ``tag_out``: a model with a
    string input, which ORT's ``run`` serves (its numeric outputs numpy views of ORT's tensors)."""
    model = onnx.load_from_string(classifier(hidden=hidden))
    model.graph.input.append(_text("tag", [1]))
    model.graph.output.append(_text("tag_out", [1]))
    model.graph.node.append(helper.make_node("Identity", ["tag"], ["tag_out"]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


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


def passthrough(datatype: str) -> bytes:
    """Input ``x`` of any shape, returned as it is twice: as graph output ``x`` (the input
    itself, no node between) and as ``y = Identity(x)``."""
    element = ELEMENT_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"passthrough_{datatype.lower()}",
        [helper.make_tensor_value_info("x", element, None)],
        [
            helper.make_tensor_value_info("x", element, None),
            helper.make_tensor_value_info("y", element, None),
        ],
    )
    return unchecked(graph)


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


def with_ort_config(config: Mapping[str, object]) -> bytes:
    """:func:`adder` whose metadata carries ONNX Runtime session options (``ort_config``), which
    ORT applies when its environment has ``ORT_LOAD_CONFIG_FROM_MODEL=1``."""
    model = onnx.load_from_string(adder(1.0))
    helper.set_model_props(model, {"ort_config": json.dumps(config)})
    return model.SerializeToString()


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


def sized_by_value(operator: str, where: str = "graph", domain: str = "") -> bytes:
    """``y = operator(ConstantOfShape(n))``: a request's value ``n`` sizes ``operator``'s input
    (``NonZero`` or ``Unique`` on INT64 ones). ``where``: the node in the ``graph``, in an ``If``
    branch (``subgraph``), or in a model-local ``function``. ``domain`` ``com.microsoft``: ONNX
    Runtime's own (contrib) operator of that name, ``Unique`` on FLOAT ones (the only type its
    kernel takes; three outputs)."""
    contrib = [helper.make_opsetid(domain, 1)] if domain else []
    element = TensorProto.FLOAT if domain else TensorProto.INT64
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", element, None)
    ones = helper.make_node(
        "ConstantOfShape", ["n"], ["a"], value=helper.make_tensor("v", element, [1], [1])
    )
    node = helper.make_node(
        operator, ["a"], ["y", "idx", "counts"] if domain else ["y"], domain=domain
    )
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
                "local", "Sized", ["a"], ["y"], [node], [helper.make_opsetid("", OPSET), *contrib]
            )
        )
        nodes = [ones, helper.make_node("Sized", ["a"], ["y"], domain="local")]
    graph = helper.make_graph(nodes, "sized", [n], [y])
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            helper.make_opsetid("local", 1),
            *contrib,
        ],
        functions=functions,
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def filled(datatype: str = "FP32", value: float = 1.5) -> bytes:
    """``y = ConstantOfShape(n, value)``: ``n`` (INT64, one element) elements of ``datatype``,
    a response of a size the request chooses."""
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", ELEMENT_TYPES[datatype], ["n"])
    fill = helper.make_tensor("v", ELEMENT_TYPES[datatype], [1], [value])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["y"], value=fill)], "filled", [n], [y]
    )
    return _model(graph).SerializeToString()


def parse_numbers() -> bytes:
    """``y = Cast(x, FP32)`` of a BYTES tensor: the text of each element parsed as a number."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "parse",
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    return _model(graph).SerializeToString()


def _strings_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto] | None = None,
    *,
    opset: int = OPSET,
    ml: bool = False,
) -> bytes:
    graph = helper.make_graph(nodes, "strings", inputs, outputs, initializers or [])
    opsets = [helper.make_opsetid("", opset)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 3))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _text(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.STRING, shape)


def _int64(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _labels(labels: list[str]) -> TensorProto:
    return numpy_helper.from_array(np.array([s.encode() for s in labels], dtype=object), "labels")


def string_expander(op: str = "Expand") -> bytes:
    """A request's string ``s`` [1] repeated as many times as the *value* of ``n`` says (``Expand``
    to shape ``n``, ``Tile`` by ``n``, ``Gather`` at ``n`` indices of 0, ``Where``'s broadcast
    over ``n`` conditions); outputs only ``k``, the repeats' count, so no response carries them."""
    repeat = {
        "Expand": [helper.make_node("Expand", ["s", "n"], ["y"])],
        "Tile": [helper.make_node("Tile", ["s", "n"], ["y"])],
        "Gather": [
            helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=_zero_int64()),
            helper.make_node("Gather", ["s", "zeros"], ["y"]),
        ],
        "Where": [
            helper.make_node("ConstantOfShape", ["n"], ["conditions"], value=_true()),
            helper.make_node("Where", ["conditions", "s", "s"], ["y"]),
        ],
    }[op]
    return _strings_model(
        [*repeat, helper.make_node("Size", ["y"], ["k"])],
        [_text("s", [1]), _int64("n", [1])],
        [_int64("k", [])],
    )


def _zero_int64() -> TensorProto:
    return helper.make_tensor("zero", TensorProto.INT64, [1], [0])


def _true() -> TensorProto:
    return helper.make_tensor("true", TensorProto.BOOL, [1], [True])


def string_doubler_loop() -> bytes:
    """A ``Loop`` that doubles its string ``s`` (``Concat(c, c)``) ``n`` times: ``2**n`` copies."""
    body = helper.make_graph(
        [
            helper.make_node("Concat", ["c_in", "c_in"], ["c_out"], axis=0),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "double",
        [
            _int64("i", []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            _text("c_in"),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _text("c_out")],
    )
    return _strings_model(
        [helper.make_node("Loop", ["n", "", "s"], ["r"], body=body)],
        [_text("s", ["k"]), _int64("n", [])],
        [_text("r", ["m"])],
    )


def string_growing_loop(step: str = "StringConcat", seed: str = "abcdefg") -> bytes:
    """A ``Loop`` carrying the short constant ``seed`` ``n`` times through ``step``:
    ``StringConcat(c, c)`` doubles its length each iteration (``len(seed) * 2**n`` bytes in one
    string), ``Identity`` keeps it as it is."""
    body = helper.make_graph(
        [
            helper.make_node(
                step, ["c_in", "c_in"] if step == "StringConcat" else ["c_in"], ["c_out"]
            ),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "grow",
        [
            _int64("i", []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            _text("c_in"),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _text("c_out")],
    )
    seed_tensor = numpy_helper.from_array(np.array([seed.encode()], dtype=object), "seed")
    return _strings_model(
        [helper.make_node("Loop", ["n", "", "seed"], ["r"], body=body)],
        [_int64("n", [])],
        [_text("r", [1])],
        [seed_tensor],
        opset=20,  # StringConcat
    )


def string_scatter_sum(op: str = "ScatterElements", reduction: str = "add") -> bytes:
    """A 15-byte constant ``Expand``ed ``n`` times (short strings: the arena counts them), all
    ``op``-scattered into one element with ``reduction`` (ORT's ``add`` concatenates strings:
    one ``15 * n + 1``-byte string), that string then ``Expand``ed ``m`` times; outputs only
    ``k``, the copies' count, and ``size``, the pieces ``StringSplit`` cuts ``joined`` into at
    each "b" (its length here)."""
    index_shape = ["n"] if op == "ScatterElements" else ["n_1"]
    nodes = [
        helper.make_node("Expand", ["b15", "n"], ["updates"]),
        helper.make_node("Concat", ["n", "one"], ["n_1"], axis=0),
        helper.make_node("ConstantOfShape", index_shape, ["indices"], value=_zero_int64()),
        helper.make_node(op, ["a", "indices", "updates"], ["joined"], reduction=reduction),
        helper.make_node("Expand", ["joined", "m"], ["copies"]),
        helper.make_node("Size", ["copies"], ["k"]),
        helper.make_node("StringSplit", ["joined"], ["pieces", "size"], delimiter="b"),
    ]
    constants = [
        numpy_helper.from_array(np.array([b"b" * 15], dtype=object), "b15"),
        numpy_helper.from_array(np.array([b"a"], dtype=object), "a"),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    ]
    return _strings_model(
        nodes,
        [_int64("n", [1]), _int64("m", [1])],
        [_int64("k", []), _int64("size", [1])],
        constants,
        opset=20,  # StringSplit
    )


def string_scan8_expander() -> bytes:
    """A ``Scan`` of opset 8 (its first input ``sequence_lens``, left out) carrying the request's
    string ``s`` as state ``a`` and an INT64 state ``b``, scanning the counts ``xs``: each
    iteration ``Expand``s ``a`` to the count it is given; outputs ``ks``, the shapes made."""
    body = helper.make_graph(
        [
            helper.make_node("Expand", ["a", "x"], ["y"]),
            helper.make_node("Shape", ["y"], ["k"]),
            helper.make_node("Identity", ["a"], ["a_out"]),
            helper.make_node("Identity", ["x"], ["b_out"]),
        ],
        "expand_each",
        [_text("a", [1]), _int64("b", [1]), _int64("x", [1])],
        [_text("a_out", [1]), _int64("b_out", [1]), _int64("k", [1])],
    )
    scan = helper.make_node(
        "Scan", ["", "s", "b0", "xs"], ["r", "b_last", "ks"], body=body, num_scan_inputs=1
    )
    graph = helper.make_graph(
        [scan],
        "scan8",
        [_text("s", [1, 1]), _int64("b0", [1, 1]), _int64("xs", [1, "n", 1])],
        [_int64("ks", [1, "n", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model.SerializeToString()


def string_expander_named_identity(domain: str = "") -> bytes:
    """``y = Expand(s, n)``, with a model-local function ``domain.Expand`` whose body is an
    ``Identity`` of ``s``: ONNX's inliner puts the body in the node's place, ORT runs its own
    ``Expand`` where the domain is ONNX's; outputs ``k``, the shape made."""
    function = helper.make_function(
        domain,
        "Expand",
        ["s", "n"],
        ["y"],
        [helper.make_node("Identity", ["s"], ["y"])],
        [helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["s", "n"], ["y"], domain=domain),
            helper.make_node("Shape", ["y"], ["k"]),
        ],
        "shadowed",
        [_text("s", [1]), _int64("n", [1])],
        [_int64("k", [1])],
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def string_columns(columns: list[int]) -> bytes:
    """What sklearn-onnx writes to pick a ``ColumnTransformer``'s (or ``OneHotEncoder``'s) string
    columns: ``ArrayFeatureExtractor`` (ai.onnx.ml) of the request's ``x`` [N, 3] at an INT64
    initializer of column indices."""
    indices = helper.make_tensor("column_indices", TensorProto.INT64, [len(columns)], columns)
    return _strings_model(
        [
            helper.make_node(
                "ArrayFeatureExtractor", ["x", "column_indices"], ["picked"], domain="ai.onnx.ml"
            )
        ],
        [_text("x", ["n", 3])],
        [_text("picked", ["n", len(columns)])],
        [indices],
        ml=True,
    )


def string_gather_shadowed_indices() -> bytes:
    """``Gather(s, idx)`` at the distinct constant ``idx`` [0, 1], and in a ``Loop`` body whose
    carried input is also named ``idx``: there the request's ``zeros`` (one copy of ``s[0]`` per
    element); outputs ``ks``, the body's copy counts."""
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["s", "idx"], ["picked"]),
            helper.make_node("Size", ["picked"], ["k"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Identity", ["idx"], ["idx_out"]),
        ],
        "gather_carried",
        [
            _int64("i", []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            _int64("idx", ["m"]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            _int64("idx_out", ["m"]),
            _int64("k", []),
        ],
    )
    return _strings_model(
        [
            helper.make_node("Gather", ["s", "idx"], ["first"]),
            helper.make_node("Loop", ["one", "", "zeros"], ["idx_last", "ks"], body=body),
        ],
        [_text("s", [2]), _int64("one", []), _int64("zeros", ["m"])],
        [_int64("ks", [1]), _text("first", [2])],
        [helper.make_tensor("idx", TensorProto.INT64, [2], [0, 1])],
    )


def string_matches_constant(text: str, copies: bool = False) -> bytes:
    """``same = Equal(s, c)`` of the request's ``s`` and a ``Constant`` node's string ``c``
    (what an exporter writes instead of an initializer); ``copies``: ``c`` also ``Expand``ed to
    the request's count ``n`` (output ``k``, the copies' count)."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value_strings=[text]),
        helper.make_node("Equal", ["s", "c"], ["same"]),
    ]
    inputs = [_text("s", [1])]
    outputs = [helper.make_tensor_value_info("same", TensorProto.BOOL, [1])]
    if copies:
        nodes += [
            helper.make_node("Expand", ["c", "n"], ["many"]),
            helper.make_node("Size", ["many"], ["k"]),
        ]
        inputs.append(_int64("n", [1]))
        outputs.append(_int64("k", []))
    return _strings_model(nodes, inputs, outputs, opset=20)  # Equal of strings: opset 19


def string_concat_chain(doublings: int) -> bytes:
    """``s`` concatenated with itself ``doublings`` times over (a fixed ``2**doublings`` copies)."""
    nodes = [
        helper.make_node("Concat", [f"s{i}", f"s{i}"], [f"s{i + 1}"], axis=0)
        for i in range(doublings)
    ]
    nodes.append(helper.make_node("Size", [f"s{doublings}"], ["k"]))
    return _strings_model(nodes, [_text("s0", ["n"])], [_int64("k", [])])


def string_equality() -> bytes:
    """``same = Equal(a, b)`` over two request string tensors (opset 19 compares strings), and
    ``a`` returned as is."""
    return _strings_model(
        [
            helper.make_node("Equal", ["a", "b"], ["same"]),
            helper.make_node("Identity", ["a"], ["a_copy"]),
        ],
        [_text("a", ["n"]), _text("b", ["n"])],
        [helper.make_tensor_value_info("same", TensorProto.BOOL, ["n"]), _text("a_copy", ["n"])],
        opset=19,
    )


def label_lookup(labels: list[str]) -> bytes:
    """A classifier's label output: ``Gather(labels, ArgMax(x))`` from a fixed initializer."""
    return _strings_model(
        [
            helper.make_node("ArgMax", ["x"], ["index"], axis=1, keepdims=0),
            helper.make_node("Gather", ["labels", "index"], ["label"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(labels)])],
        [_text("label", ["batch"])],
        [_labels(labels)],
    )


def byte_label_lookup(labels: list[bytes], *, text_input: bool = False) -> bytes:
    """:func:`label_lookup` with labels of any bytes: an ONNX string is bytes, and a publisher's
    need not be UTF-8 text. ``text_input`` adds a BYTES input ``note`` echoed as ``note_out``,
    so that ONNX Runtime runs the model through ``run`` (a string input)."""
    table = numpy_helper.from_array(np.array(labels, dtype=object), "labels")
    nodes = [
        helper.make_node("ArgMax", ["x"], ["index"], axis=1, keepdims=0),
        helper.make_node("Gather", ["labels", "index"], ["label"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(labels)])]
    outputs = [_text("label", ["batch"])]
    if text_input:
        nodes.append(helper.make_node("Identity", ["note"], ["note_out"]))
        inputs.append(_text("note", ["n"]))
        outputs.append(_text("note_out", ["n"]))
    return _strings_model(nodes, inputs, outputs, [table])


def non_utf8_output_name() -> bytes:
    """``Identity`` whose output is named ``caf\\xe9`` (Latin-1, not UTF-8): written by hand, as
    the onnx package writes names only from ``str``."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["cafe"])],
        "names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cafe", TensorProto.FLOAT, [1])],
    )
    data = _model(graph).SerializeToString()
    # Same length, so every field's length stays right: each occurrence of the name changes.
    assert data.count(b"cafe") == 2
    return data.replace(b"cafe", b"caf\xe9")


def string_label_classifier(labels: list[str]) -> bytes:
    """What sklearn-onnx writes for a linear classifier with string classes: ``LinearClassifier``
    (ai.onnx.ml) naming each row's class from its ``classlabels_strings``, and ``ZipMap`` giving
    each row's probabilities by class name (a sequence of maps, which OIP cannot carry)."""
    features = 2
    linear = helper.make_node(
        "LinearClassifier",
        ["x"],
        ["label", "scores"],
        domain="ai.onnx.ml",
        classlabels_strings=labels,
        coefficients=[float(i % 3) for i in range(features * len(labels))],
        intercepts=[0.0] * len(labels),
        post_transform="SOFTMAX",
    )
    zipmap = helper.make_node(
        "ZipMap", ["scores"], ["probabilities"], domain="ai.onnx.ml", classlabels_strings=labels
    )
    probabilities = helper.make_value_info(
        "probabilities",
        helper.make_sequence_type_proto(
            helper.make_map_type_proto(
                TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
            )
        ),
    )
    return _strings_model(
        [linear, zipmap],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [_text("label", ["batch"]), probabilities],
        ml=True,
    )


def string_id_to_text() -> bytes:
    """``Cast`` of INT64 ids to text: one string per number, up to 20 characters each."""
    return _strings_model(
        [helper.make_node("Cast", ["ids"], ["text"], to=TensorProto.STRING)],
        [_int64("ids", ["n"])],
        [_text("text", ["n"])],
    )


def text_label_encoder(labels: dict[str, str]) -> bytes:
    """``LabelEncoder`` (ai.onnx.ml) mapping request strings to labels from its table."""
    return _strings_model(
        [
            helper.make_node(
                "LabelEncoder",
                ["text"],
                ["label"],
                domain="ai.onnx.ml",
                keys_strings=list(labels),
                values_strings=list(labels.values()),
                default_string="other",
            )
        ],
        [_text("text", ["n"])],
        [_text("label", ["n"])],
        ml=True,
    )


def text_vectorizer(pad_value: str = "#") -> bytes:
    """What sklearn-onnx writes for a TfidfVectorizer: ``StringNormalizer`` (lower case), ORT's
    ``Tokenizer`` (com.microsoft) splitting on spaces, ``TfIdfVectorizer`` counting known words."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "StringNormalizer",
                ["text"],
                ["lower"],
                case_change_action="LOWER",
                locale="C.UTF-8",  # the image has no en_US.UTF-8, the default
            ),
            helper.make_node(
                "Tokenizer",
                ["lower"],
                ["tokens"],
                domain="com.microsoft",
                mark=0,
                mincharnum=1,
                pad_value=pad_value,
                separators=[" "],
            ),
            helper.make_node(
                "TfIdfVectorizer",
                ["tokens"],
                ["counts"],
                mode="TF",
                min_gram_length=1,
                max_gram_length=1,
                max_skip_count=0,
                ngram_counts=[0],
                ngram_indexes=[0, 1],
                pool_strings=["good", "bad"],
            ),
        ],
        "vectorizer",
        [_text("text", ["n"])],
        [helper.make_tensor_value_info("counts", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def expander_and_sized(where: str = "graph") -> bytes:
    """:func:`string_expander`'s ``Expand`` of the request's string ``s`` by ``n`` (refused by the
    string check) and a ``NonZero`` (refused by the operator check): a ``graph`` node after the
    ``Expand``, in an ``If`` ``branch`` after it, in a ``cycle`` of the graph (which cannot be
    ordered), in a model-local ``function`` nothing calls, or called as a model-local function of
    ONNX's own domain named ``NonZero`` (a ``shadow``, which inlining replaces by its body)."""
    ones = helper.make_node("ConstantOfShape", ["n"], ["ones"], value=_zero_int64())
    sized = helper.make_node("NonZero", ["ones"], ["y"])
    expand = [helper.make_node("Expand", ["s", "n"], ["e"]), helper.make_node("Size", ["e"], ["k"])]
    functions: list[onnx.FunctionProto] = []
    if where in ("graph", "shadow"):
        nodes = [*expand, ones, sized]
    elif where == "branch":
        branch = helper.make_graph([sized], "branch", [], [_int64("y")])
        flag = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [
            *expand,
            ones,
            helper.make_node("Constant", [], ["c"], value=flag),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ]
    elif where == "cycle":
        nodes = [
            *expand,
            helper.make_node("NonZero", ["back"], ["y"]),
            helper.make_node("Identity", ["y"], ["back"]),
        ]
    else:
        nodes = [*expand, ones, helper.make_node("Identity", ["ones"], ["y"])]
    opset = [helper.make_opsetid("", OPSET)]
    if where == "function":
        opset.append(helper.make_opsetid("local", 1))
        functions.append(helper.make_function("local", "Unused", ["a"], ["b"], [sized], opset[:1]))
    if where == "shadow":
        body = [helper.make_node("Identity", ["a"], ["b"])]
        functions.append(helper.make_function("", "NonZero", ["a"], ["b"], body, opset))
    graph = helper.make_graph(
        nodes, "both", [_text("s", [1]), _int64("n", [1])], [_int64("k", []), _int64("y")]
    )
    model = helper.make_model(graph, opset_imports=opset, functions=functions)
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def nested_functions(
    levels: int,
    calls: int = 2,
    *,
    recursive: bool = False,
    domain: str = "local",
    call_domain: str | None = None,
) -> bytes:
    """``y = F<levels>(x)`` over FP32 ``x``, where model-local ``local.F0`` is one ``Neg`` and
    each ``local.Fk`` calls ``F(k-1)`` ``calls`` times in a row, the first call in both branches
    of an ``If``: a few kilobytes that inline to ``calls ** levels`` ``Neg`` nodes run, and
    ``Fk`` counts ``calls + 3 + (calls + 1) * F(k-1)`` nodes inlined (``F0`` one; the graph
    one more than ``F<levels>``).
    ``recursive``: ``F0`` calls ``F<levels>`` instead. The functions are declared in ``domain``
    and called in ``call_domain`` (the same by default)."""
    opset = [helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)]
    calling = domain if call_domain is None else call_domain
    leaf = (
        helper.make_node(f"F{levels}", ["a"], ["b"], domain=calling)
        if recursive
        else helper.make_node("Neg", ["a"], ["b"])
    )
    functions = [helper.make_function(domain, "F0", ["a"], ["b"], [leaf], opset)]
    flag = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    for k in range(1, levels + 1):
        call = f"F{k - 1}"
        # The first call stands in both branches of an If: subgraphs count wherever they are.
        then = helper.make_graph(
            [helper.make_node(call, ["a"], ["t0"], domain=calling)],
            "then",
            [],
            [helper.make_tensor_value_info("t0", TensorProto.FLOAT, None)],
        )
        nodes = [
            helper.make_node("Constant", [], ["c"], value=flag),
            helper.make_node("If", ["c"], ["t0"], then_branch=then, else_branch=then),
        ]
        for i in range(1, calls):
            out = "b" if i == calls - 1 else f"t{i}"
            nodes.append(helper.make_node(call, [f"t{i - 1}"], [out], domain=calling))
        functions.append(helper.make_function(domain, f"F{k}", ["a"], ["b"], nodes, opset))
    graph = helper.make_graph(
        [helper.make_node(f"F{levels}", ["x"], ["y"], domain=calling)],
        "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=opset, functions=functions)
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def graph_attribute_copies(refs: int, graph_nodes: int, how: str = "passed") -> bytes:
    """``y = x + refs`` over FP32 ``x[1]``: model-local ``local.F`` has a graph attribute
    ``body`` (``graph_nodes`` nodes, ``Constant`` 1.0 then ``Identity`` nodes) that its body
    refers to (``ref_attr_name``) as both branches of ``refs`` ``If`` nodes, summed: inlining
    copies the graph ``2 * refs`` times. ``how``: ``passed`` by the graph's call of ``F``,
    ``default`` as ``F``'s default (the call passes none), ``through`` by the graph to
    ``local.G``, which passes it on to ``F`` (``body`` referring to its own)."""
    opset = [helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)]
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    body_nodes = [helper.make_node("Constant", [], ["k0"], value=one)]
    body_nodes += [
        helper.make_node("Identity", [f"k{i}"], [f"k{i + 1}"]) for i in range(graph_nodes - 1)
    ]
    body = helper.make_graph(
        body_nodes,
        "body",
        [],
        [helper.make_tensor_value_info(f"k{graph_nodes - 1}", TensorProto.FLOAT, [1])],
    )
    flag = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("Constant", [], ["c"], value=flag)]
    for k in range(refs):
        node = helper.make_node("If", ["c"], [f"o{k}"])
        for branch in ("then_branch", "else_branch"):
            ref = onnx.AttributeProto(name=branch, type=onnx.AttributeProto.GRAPH)
            ref.ref_attr_name = "body"
            node.attribute.append(ref)
        nodes.append(node)
    nodes.append(helper.make_node("Sum", ["a"] + [f"o{k}" for k in range(refs)], ["b"]))
    f = helper.make_function("local", "F", ["a"], ["b"], nodes, opset, attributes=["body"])
    functions = [f]
    if how == "default":
        del f.attribute[:]
        f.attribute_proto.append(helper.make_attribute("body", body))
        call = helper.make_node("F", ["x"], ["y"], domain="local")
    elif how == "through":
        passes = helper.make_node("F", ["a"], ["b"], domain="local")
        ref = onnx.AttributeProto(name="body", type=onnx.AttributeProto.GRAPH)
        ref.ref_attr_name = "body"
        passes.attribute.append(ref)
        functions.append(
            helper.make_function("local", "G", ["a"], ["b"], [passes], opset, attributes=["body"])
        )
        call = helper.make_node("G", ["x"], ["y"], domain="local", body=body)
    else:
        call = helper.make_node("F", ["x"], ["y"], domain="local", body=body)
    graph = helper.make_graph(
        [call],
        "copies",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=opset, functions=functions)
    model.ir_version = IR_VERSION
    return model.SerializeToString()
