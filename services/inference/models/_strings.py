"""Which models could make ONNX Runtime hold string characters without bound: judged at load.

The capped arena (:func:`~strongroom.inference.models._loaded.use_inference_memory_cap`) counts
every tensor a run allocates, a string (``BYTES``) tensor's 32-byte ``std::string`` slots
included, but not the characters of a string longer than 15 bytes: libstdc++ keeps up to 15 inside
the slot and allocates the rest with ``operator new``, which ORT offers no option to cap (1.32:
no session or run setting touches it). So a model that repeats a long string (``Expand``,
``Tile``, ``Gather`` by indices, ``Where``'s broadcast, ``Pad``, ``Resize``, a ``Loop``'s or
``Scan``'s outputs, ...) as many times as a runtime value says made one small request hold any
number of copies of a 1 MiB string: measured, a 1 MiB string expanded 300 times held ~600 MiB
under a 64 MiB cap, and the VM's out-of-memory killer takes the service down for everyone.

The check walks the graph (subgraphs of ``If``, ``Loop``, ``Scan`` and any other operator too,
``SequenceMap``'s say, model-local functions inlined) and follows every string-typed value
(tensors, and sequences, maps and optionals of strings) with two bounds:

* its longest element: a request's strings have none (up to ``max_input_bytes``), a constant's
  (initializer, ``Constant``, an ML operator's labels) is its longest, a ``Cast`` from numbers is
  the longest number ORT writes, ``StringConcat`` adds its inputs';
* its characters, in bytes: a request's strings ``max_input_bytes``, a constant's its own.

A value whose elements are all at most 15 bytes costs only what the arena counts, whatever its
length. A longer one may only pass through an operator that places each element of its string
inputs at most once (``Identity``, ``Reshape``, ``Slice``, ``Concat``, ``Scatter*`` without a
reduction, the sequence operators, ``Gather``/``ArrayFeatureExtractor`` at constant distinct
indices, ...; :data:`_PRESERVING`), its characters then the sum of its inputs'. Any other
operator yielding it, or a ``Loop``/``Scan`` body returning it (repeated by the iteration count;
a value the body carries is walked as the node's or anything short, what a previous iteration
may have returned), makes the model refused; so does a graph whose long string values together
could hold more characters than ``max_inference_memory_bytes`` (one run's: the inputs, each
intermediate and output counted as if all were held at once). Another domain's operator whose
output is a string (declared so, or untyped with string inputs) is assumed to make strings of
any length. Fail closed: what the walk cannot bound or read, it refuses (the operator may still
let it through).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
from collections.abc import Mapping

import onnx
from onnx import (
    AttributeProto,
    GraphProto,
    NodeProto,
    TensorProto,
    TypeProto,
    inliner,
    numpy_helper,
)

SHORT_STRING_BYTES = 15
"""The longest string ``std::string`` (libstdc++) keeps inside its 32-byte slot, which the arena
counts; a longer one's characters are a separate allocation outside it."""

# The longest text ORT's Cast writes for a number of each type ("%.8g" for floating point, so
# "-1.1754944e-38"; integers in full: "-9223372036854775808"); "false"/"true" for booleans.
_CAST_TEXT_BYTES: Mapping[int, int] = {
    TensorProto.BOOL: 5,
    TensorProto.UINT8: 3,
    TensorProto.INT8: 4,
    TensorProto.UINT16: 5,
    TensorProto.INT16: 6,
    TensorProto.UINT32: 10,
    TensorProto.INT32: 11,
    TensorProto.UINT64: 20,
    TensorProto.INT64: 20,
    TensorProto.FLOAT16: 15,
    TensorProto.BFLOAT16: 15,
    TensorProto.FLOAT: 15,
    TensorProto.DOUBLE: 15,
}

# Operators whose string outputs hold each element of each string input (each input edge: an
# input given twice counts twice) at most once, and nothing else that is long: their output's
# characters are at most their inputs' together. A default-domain name only.
_PRESERVING = frozenset(
    {
        "Identity",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Slice",
        "Split",
        "Compress",
        "Unique",
        "Concat",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "ReverseSequence",
        "Optional",
        "OptionalGetElement",
        "SequenceConstruct",
        "SequenceAt",
        "SequenceInsert",
        "SequenceErase",
        "ConcatFromSequence",
        "SplitToSequence",
        "StringSplit",
        "Cast",
        "CastLike",
        "StringNormalizer",
    }
)

# StringNormalizer maps each character to its other case, which UTF-8 may write one byte longer
# (U+0250, 2 bytes, is U+2C6F, 3 bytes, in upper case).
_GROWTH = {"StringNormalizer": 1.5}

# Outputs that are never strings whatever their inputs (subgraphs' intermediates carry no types
# after ONNX's inference, so an untyped output of a node with string inputs counts as a string).
_NOT_STRING_OUTPUTS: Mapping[str, frozenset[int]] = {
    "Equal": frozenset({0}),
    "RegexFullMatch": frozenset({0}),
    "Shape": frozenset({0}),
    "Size": frozenset({0}),
    "SequenceLength": frozenset({0}),
    "OptionalHasElement": frozenset({0}),
    "Unique": frozenset({1, 2, 3}),
    "StringSplit": frozenset({1}),
}

_ML_DOMAIN = "ai.onnx.ml"

# ML operators that map each input element to a value of a table in their attributes: their string
# outputs are the table's strings (a request's long text mapped to short labels stays short).
# The attributes holding what they write (the keys they match inputs against are not written).
_TABLE_LOOKUPS: Mapping[str, frozenset[str]] = {
    f"{_ML_DOMAIN}.LabelEncoder": frozenset(
        {"values_strings", "default_string", "values_tensor", "default_tensor"}
    ),
    f"{_ML_DOMAIN}.CategoryMapper": frozenset({"cats_strings", "default_string"}),
}


class StringExpansion(Exception):
    """Why a model could make a run hold string characters without bound (the message)."""


@dataclasses.dataclass(frozen=True)
class _Text:
    """A string-typed value's bounds: its longest element (None: any length) and characters."""

    longest: int | None
    chars: float

    @property
    def short(self) -> bool:
        return self.longest is not None and self.longest <= SHORT_STRING_BYTES


class _Walk:
    def __init__(self, max_input_bytes: int, max_chars: int) -> None:
        self.max_input_bytes = max_input_bytes
        self.max_chars = max_chars
        self.held = 0.0  # the long string values' characters, all scopes together
        # Small integer constants (initializers no request can replace, Constant nodes), by
        # name (unique across scopes: ORT refuses a graph that is not SSA): column indices.
        self.indices: dict[str, list[int]] = {}

    def hold(self, text: _Text) -> _Text:
        if not text.short:
            self.held += text.chars
        return text


def check_string_expansion(model: bytes, *, max_input_bytes: int, max_chars: int) -> None:
    """Raises :class:`StringExpansion` saying why ``model`` (serialized ONNX) could make a run
    hold string characters past ``max_chars``, or repeat a long string by a runtime value;
    ``ValueError`` if it is not an ONNX model at all."""
    try:
        proto = onnx.load_model_from_string(model)
    except Exception:  # protobuf's DecodeError, or whatever else a parse of bad bytes raises
        raise ValueError("not a serialized ONNX model") from None
    # Only a string initializer's bytes matter here: drop the weights' before inference copies
    # the model (a big model must not be held twice while the walk runs).
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.STRING and not _small_indices(init):
            for name in _WEIGHT_FIELDS:
                init.ClearField(name)
    for function in proto.functions:
        if _runs_as_an_operator(function.domain, function.name):
            raise StringExpansion(
                f"its model-local function {function.domain or 'ai.onnx'}.{function.name} has the "
                "name of an operator ONNX Runtime runs itself, not the body the check would read"
            )
    try:
        if proto.functions:
            proto = inliner.inline_local_functions(proto)
    except Exception as exc:  # a model ORT may still read: the operator may let it through
        raise StringExpansion(
            f"its model-local functions could not be inlined to be checked ({type(exc).__name__})"
        ) from None
    # Strict off: an operator ONNX does not know leaves its outputs untyped, and the walk then
    # assumes the worst of them; a graph its inference cannot read at all leaves every
    # intermediate untyped (the inputs keep their declared types).
    with contextlib.suppress(Exception):
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    walk = _Walk(max_input_bytes, max_chars)
    try:
        _graph(walk, proto.graph, {}, {}, where="the graph")
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
        # A node without the subgraph or attribute its operator needs: ORT refuses it too, but
        # what the walk cannot read it does not pass.
        raise StringExpansion(f"its graph could not be checked ({type(exc).__name__})") from None
    if walk.held > max_chars:
        # Copies of copies overflow a float to infinity (1024 doublings), which no int holds.
        held = "more than 2**1024" if math.isinf(walk.held) else str(math.ceil(walk.held))
        raise StringExpansion(
            f"its string values could hold {held} bytes of characters in one run "
            f"(the request's strings up to {max_input_bytes} bytes, and every string value the "
            f"graph derives from them), more than the {max_chars} bytes runs may hold"
        )


# Domains whose operators ONNX Runtime implements itself (ONNX's, and its own contrib ones, which
# ONNX cannot list): a node there runs ORT's kernel even where a local function has its name.
_RUNTIME_DOMAIN_PREFIXES = ("com.microsoft", "com.ms.", "org.pytorch.")


def _runs_as_an_operator(domain: str, name: str) -> bool:
    """Whether ORT runs its own operator for a node calling model-local function ``name``: ONNX's
    inliner puts the function's body in its place, so the check would judge a body ORT ignores
    (an ``Identity`` named ``Expand`` that ORT runs as ``Expand``)."""
    if domain.startswith(_RUNTIME_DOMAIN_PREFIXES):
        return True
    try:
        return bool(onnx.defs.has(name, "" if domain == "ai.onnx" else domain))
    except Exception:  # a domain ONNX does not know: nothing of its is built in
        return False


_WEIGHT_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def _is_string_type(tp: TypeProto) -> bool:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return bool(tp.tensor_type.elem_type == TensorProto.STRING)
    if kind == "sparse_tensor_type":
        return bool(tp.sparse_tensor_type.elem_type == TensorProto.STRING)
    if kind == "sequence_type":
        return _is_string_type(tp.sequence_type.elem_type)
    if kind == "optional_type":
        return _is_string_type(tp.optional_type.elem_type)
    if kind == "map_type":
        return bool(tp.map_type.key_type == TensorProto.STRING) or _is_string_type(
            tp.map_type.value_type
        )
    return False


def _tensor_text(tensor: TensorProto) -> _Text | None:
    if tensor.data_type != TensorProto.STRING:
        return None
    data = list(tensor.string_data)
    return _Text(max((len(s) for s in data), default=0), float(sum(len(s) for s in data)))


def _attribute_strings(node: NodeProto, names: frozenset[str] | None = None) -> list[bytes]:
    """Every string a node's attributes (those ``names``, or all) hold: labels, a Constant's
    value, ...; subgraphs not."""
    found: list[bytes] = []
    for attr in node.attribute:
        if names is not None and attr.name not in names:
            continue
        if attr.type == AttributeProto.STRING:
            found.append(attr.s)
        elif attr.type == AttributeProto.STRINGS:
            found.extend(attr.strings)
        elif attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.STRING:
            found.extend(attr.t.string_data)
        elif attr.type == AttributeProto.TENSORS:
            for t in attr.tensors:
                if t.data_type == TensorProto.STRING:
                    found.extend(t.string_data)
    return found


def _graph(
    walk: _Walk,
    graph: GraphProto,
    types: Mapping[str, TypeProto],
    outer: Mapping[str, _Text],
    *,
    where: str,
    inputs: Mapping[str, _Text] | None = None,
) -> dict[str, _Text]:
    """Walks ``graph``; returns the bounds of its string-typed values (outer scope's included).
    ``inputs`` gives a subgraph's inputs' bounds; the main graph's (None) are the request's."""
    scope: dict[str, _Text] = dict(outer)
    local_types = dict(types)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.WhichOneof("value") is not None:
            local_types[value.name] = value.type
    replaceable = {value.name for value in graph.input}
    # A body's input may have the name of an outer constant (ORT lets it): inside, that name is
    # the runtime value, a Loop's carried indices say, until the body is walked.
    shadowed = {name: walk.indices.pop(name) for name in replaceable if name in walk.indices}
    for init in graph.initializer:
        text = _tensor_text(init)
        if text is not None:
            scope[init.name] = walk.hold(text)
        elif init.name not in replaceable and _small_indices(init):
            walk.indices[init.name] = [int(i) for i in numpy_helper.to_array(init).flat]
    request = False
    for value in graph.input:
        if value.name in scope:
            continue  # an initializer given as an input too (IR < 4): its default is known
        if inputs is not None:
            if value.name in inputs:
                scope[value.name] = inputs[value.name]
        elif value.name in local_types and _is_string_type(local_types[value.name]):
            # Any one input may carry all of the request's bytes; all together no more.
            scope[value.name] = _Text(None, float(walk.max_input_bytes))
            request = True
    if request:
        walk.held += walk.max_input_bytes
    for node in _in_order(graph):
        _node(walk, node, local_types, scope, where=where)
    walk.indices.update(shadowed)
    return scope


def _in_order(graph: GraphProto) -> list[NodeProto]:
    """``graph``'s nodes, each after the nodes whose outputs it (or a subgraph of it) reads.
    ORT sorts a graph itself and runs one listed out of order; a walk in the listed order would
    reach a node before it knew its inputs were strings."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting_on = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for j in {producer[n] for n in _reads(node) if n in producer} - {i}:
            waiting_on[i] += 1
            readers[j].append(i)
    ready = [i for i, count in enumerate(waiting_on) if count == 0]
    heapq.heapify(ready)
    order: list[NodeProto] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for k in readers[i]:
            waiting_on[k] -= 1
            if waiting_on[k] == 0:
                heapq.heappush(ready, k)
    if len(order) != len(nodes):
        raise StringExpansion("its graph has a cycle, so the check cannot order it")
    return order


def _reads(node: NodeProto) -> set[str]:
    """The names ``node`` reads, its subgraphs' (which may read the enclosing graph's) included."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in (attr.g,) if attr.type == AttributeProto.GRAPH else attr.graphs:
            for inner in sub.node:
                names |= _reads(inner)
    return names


def _node(
    walk: _Walk,
    node: NodeProto,
    types: Mapping[str, TypeProto],
    scope: dict[str, _Text],
    *,
    where: str,
) -> None:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    label = f"{op} node {node.name!r}" if node.name else f"{op} node"
    if op == "Constant" and node.output:
        for attr in node.attribute:
            if attr.name == "value" and _small_indices(attr.t):
                walk.indices[node.output[0]] = [int(i) for i in numpy_helper.to_array(attr.t).flat]
            elif attr.name == "value_ints" and len(attr.ints) <= _MAX_INDICES:
                walk.indices[node.output[0]] = [int(i) for i in attr.ints]
    if op in ("If", "Loop", "Scan"):
        _control_flow(walk, node, types, scope, op=op, label=label, where=where)
        return
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
        _bodies(walk, node, types, scope, label=label, where=where)
        return
    ins = [scope.get(name) if name else None for name in node.input]
    strings = [t for t in ins if t is not None]
    made = _attribute_strings(node)
    casting = op in ("Cast", "CastLike")
    # A Cast from numbers makes one string per number, however many the input holds.
    from_numbers = casting and (not ins or ins[0] is None)
    never = _NOT_STRING_OUTPUTS.get(op, frozenset())
    for index, name in enumerate(node.output):
        if not name or index in never:
            continue
        if name in types:
            if not _is_string_type(types[name]):
                continue
        elif not strings and not made and not _casts_to_string(node):
            continue  # untyped, with nothing that could make it a string
        text = _cast_text(node, types) if from_numbers else _output_text(node, op, strings, made)
        preserves = _preserves(node, op) or _selects_once(walk, node, op)
        if not text.short and (not preserves or from_numbers):
            limit = "any length" if text.longest is None else f"up to {text.longest} bytes"
            raise StringExpansion(
                f"{label} in {where} makes string elements of {limit} (more than the "
                f"{SHORT_STRING_BYTES} bytes the memory cap counts) as many times as the shapes "
                "or values it is given say"
            )
        scope[name] = walk.hold(text)


def _preserves(node: NodeProto, op: str) -> bool:
    """Whether ``node`` places each element of its string inputs at most once (:data:`_PRESERVING`)
    and writes nothing long of its own. ORT's ``Tokenizer`` (what sklearn-onnx writes for a text
    vectorizer) splits each string into tokens, pads each row to the longest with ``pad_value``:
    preserving while that is short (the padding's count is the arena's to bound)."""
    if op == "Constant":
        # Its value, once (what an initializer is): a long one is counted, not refused.
        return True
    if op == "com.microsoft.Tokenizer":
        padding = _attribute_strings(node, frozenset({"pad_value"}))
        return all(len(p) <= SHORT_STRING_BYTES for p in padding)
    return op in _PRESERVING and not _reduces(node, op)


def _reduces(node: NodeProto, op: str) -> bool:
    """Whether a ``ScatterElements``/``ScatterND`` combines the updates aimed at one element:
    ORT's ``add`` on strings concatenates them, so short strings, as many as a runtime value
    says, become one long string (15 bytes times n) that the op places once but no bound holds."""
    return op in ("ScatterElements", "ScatterND") and any(
        a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute
    )


_MAX_INDICES = 4096
"""The most elements an integer constant may have to be read as indices (the rest are weights,
dropped unread)."""


def _small_indices(tensor: TensorProto) -> bool:
    return (
        tensor.data_type in (TensorProto.INT64, TensorProto.INT32)
        and tensor.data_location != TensorProto.EXTERNAL
        and math.prod(tensor.dims) <= _MAX_INDICES
    )


def _selects_once(walk: _Walk, node: NodeProto, op: str) -> bool:
    """Whether ``node`` picks elements of its string input at constant, distinct indices, each
    element so placed at most once: what sklearn-onnx writes to pick a ``ColumnTransformer``'s or
    ``OneHotEncoder``'s columns (``ArrayFeatureExtractor`` by an INT64 initializer). Gather's
    negative indices count from the end, so one of them and a non-negative one may be the same."""
    if op not in (f"{_ML_DOMAIN}.ArrayFeatureExtractor", "Gather") or len(node.input) < 2:
        return False
    chosen = walk.indices.get(node.input[1])
    if chosen is None or len(set(chosen)) != len(chosen):
        return False
    return all(i >= 0 for i in chosen) or all(i < 0 for i in chosen)


def _casts_to_string(node: NodeProto) -> bool:
    return node.op_type == "Cast" and any(
        a.name == "to" and a.i == TensorProto.STRING for a in node.attribute
    )


def _cast_text(node: NodeProto, types: Mapping[str, TypeProto]) -> _Text:
    """Numbers written as text: each at most as long as the source type's longest."""
    source = types.get(node.input[0]) if node.input else None
    elem = source.tensor_type.elem_type if source is not None else 0
    longest = _CAST_TEXT_BYTES.get(elem)
    return _Text(
        longest, 0.0 if longest is not None and longest <= SHORT_STRING_BYTES else math.inf
    )


def _output_text(node: NodeProto, op: str, strings: list[_Text], made: list[bytes]) -> _Text:
    """The bounds of an output made from ``strings`` (inputs) and ``made`` (attributes)."""
    if op in _TABLE_LOOKUPS:
        # Each output element is one of the table's values (or its default), never an input's.
        written = _attribute_strings(node, _TABLE_LOOKUPS[op])
        return _Text(max((len(s) for s in written), default=0), float(sum(map(len, written))))
    known_domain = node.domain in ("", "ai.onnx", _ML_DOMAIN)
    longest: int | None
    if not known_domain or any(t.longest is None for t in strings) or _reduces(node, op):
        longest = None  # another domain's operator may write strings of any length
    elif op == "StringConcat":
        longest = sum(t.longest or 0 for t in strings)
    else:
        longest = max([*(t.longest or 0 for t in strings), *(len(s) for s in made)], default=0)
        if op in _GROWTH:
            longest = math.ceil(longest * _GROWTH[op])
    chars = sum(t.chars for t in strings) * _GROWTH.get(op, 1.0) + sum(len(s) for s in made)
    return _Text(longest, chars)


def _control_flow(
    walk: _Walk,
    node: NodeProto,
    types: Mapping[str, TypeProto],
    scope: dict[str, _Text],
    *,
    op: str,
    label: str,
    where: str,
) -> None:
    graphs = {a.name: a.g for a in node.attribute if a.type == AttributeProto.GRAPH}
    inner_where = f"the body of {label} in {where}"
    if op == "If":
        results: list[list[_Text | None]] = []
        for key in ("then_branch", "else_branch"):
            branch = graphs[key]
            inner = _graph(walk, branch, types, scope, where=inner_where, inputs={})
            results.append([inner.get(o.name) for o in branch.output])
        for index, name in enumerate(node.output):
            texts = [t for r in results if index < len(r) and (t := r[index]) is not None]
            if name and texts:
                longest = (
                    None
                    if any(t.longest is None for t in texts)
                    else max(t.longest or 0 for t in texts)
                )
                scope[name] = walk.hold(_Text(longest, max(t.chars for t in texts)))
        return
    body = graphs["body"]
    # Loop's body takes (iteration, condition, carried...), Scan's (state..., scan slices...): the
    # node's inputs after Loop's first two line up with the body's inputs after its first two.
    skip = 2 if op == "Loop" else 0
    # Scan-8 (opset 8) takes an optional sequence_lens first, which its body has no input for:
    # lined up from the first, each of the node's inputs was taken for the body input before
    # its own, so a string state reached the body untracked and the body could Expand it.
    extra = 0 if op == "Loop" else len(node.input) - len(body.input)
    if extra not in (0, 1):
        raise StringExpansion(f"{label} in {where} has inputs its body does not line up with")
    given = [scope.get(n) if n else None for n in node.input[skip + extra :]]
    # The values a body carries from one iteration to the next (all of Loop's, Scan's state):
    # the first iteration gets the node's, each later one what the last returned, which must be
    # short (checked below). Walked once with the node's alone, a body that lengthens a short
    # string (StringConcat(c, c): 7 bytes, 14, 28, ... 7 MiB after 20 iterations) passed.
    carried = len(given) if op == "Loop" else len(given) - _int_attribute(node, "num_scan_inputs")
    body_inputs = {
        value.name: _carried(text) if position < carried else text
        for position, (value, text) in enumerate(zip(body.input[skip:], given, strict=False))
        if text is not None
    }
    inner = _graph(walk, body, types, scope, where=inner_where, inputs=body_inputs)
    for value in body.output:
        text = inner.get(value.name)
        if text is not None and not text.short:
            raise StringExpansion(
                f"{label} in {where} returns string elements of "
                f"{'any length' if text.longest is None else f'up to {text.longest} bytes'} from "
                "its body, which it repeats as many times as it iterates"
            )
    for name, value in zip(node.output, body.output[1 if op == "Loop" else 0 :], strict=False):
        text = inner.get(value.name)
        if name and text is not None:
            scope[name] = text  # short (checked above): the arena counts it


def _int_attribute(node: NodeProto, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name and attr.type == AttributeProto.INT:
            return int(attr.i)
    raise KeyError(name)  # ORT refuses the node too: the check says it cannot read it


def _carried(text: _Text) -> _Text:
    """A carried value's bounds over every iteration: the node's, or anything short a previous
    iteration returned."""
    longest = None if text.longest is None else max(text.longest, SHORT_STRING_BYTES)
    return _Text(longest, text.chars)


def _bodies(
    walk: _Walk,
    node: NodeProto,
    types: Mapping[str, TypeProto],
    scope: dict[str, _Text],
    *,
    label: str,
    where: str,
) -> None:
    """Another operator with subgraphs (``SequenceMap``, another domain's): each body is assumed
    to run any number of times on any of the node's strings, so it must return none that is long
    (and is walked like any graph)."""
    strings = [t for n in node.input if n and (t := scope.get(n)) is not None]
    worst = (
        None
        if not strings
        else _Text(
            None
            if any(t.longest is None for t in strings)
            else max(t.longest or 0 for t in strings),
            sum(t.chars for t in strings),
        )
    )
    inner_where = f"the body of {label} in {where}"
    outputs: list[_Text | None] = []
    for attr in node.attribute:
        for body in (attr.g,) if attr.type == AttributeProto.GRAPH else attr.graphs:
            given = {} if worst is None else {value.name: worst for value in body.input}
            inner = _graph(walk, body, types, scope, where=inner_where, inputs=given)
            for value in body.output:
                text = inner.get(value.name)
                if text is not None and not text.short:
                    raise StringExpansion(
                        f"{label} in {where} returns string elements of "
                        f"{'any length' if text.longest is None else f'up to {text.longest} bytes'}"
                        " from a body it may run any number of times"
                    )
                outputs.append(text)
    for name in node.output:
        if not name:
            continue
        if name in types:
            if not _is_string_type(types[name]):
                continue
        elif not strings and all(t is None for t in outputs):
            continue  # untyped, with nothing that could make it a string
        if node.domain not in ("", "ai.onnx"):
            raise StringExpansion(
                f"{label} in {where} makes string elements of any length (more than the "
                f"{SHORT_STRING_BYTES} bytes the memory cap counts) from its body"
            )
        # SequenceMap's outputs are its body's, each short (checked above).
        scope[name] = _Text(SHORT_STRING_BYTES, 0.0)
