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

The check follows the one walk of the graph (``models._graph``: subgraphs of ``If``, ``Loop``,
``Scan`` and any other operator too, ``SequenceMap``'s say, model-local functions inlined, nodes
in the order ONNX Runtime runs them) as its :class:`Analysis`, and bounds every string-typed value
(tensors, and sequences, maps and optionals of strings) with two bounds:

* its longest element: a request's strings have none (up to ``max_input_bytes``), a constant's
  (initializer, ``Constant``, an ML operator's labels) is its longest, a ``Cast`` from numbers is
  the longest number ORT writes, ``StringConcat`` adds its inputs';
* its characters, in bytes: a request's strings ``max_input_bytes``, a constant's its own.

A value whose elements are all at most 15 bytes costs only what the arena counts, whatever its
length. A longer one may only pass through an operator that places each element of its string
inputs at most once (``Identity``, ``Reshape``, ``Slice``, ``Concat``, ``Scatter*`` without a
reduction, the sequence operators, ``Gather``/``ArrayFeatureExtractor`` at constant distinct
indices, a ``Constant``'s value, ...; :data:`_PRESERVING`), its characters then the sum of its
inputs'. Any other operator yielding it, or a ``Loop``/``Scan`` body returning it (repeated by the
iteration count; a value the body carries is walked as the node's or anything short, what a
previous iteration may have returned), makes the model refused; so does a graph whose long string
values together could hold more characters than ``max_inference_memory_bytes`` (one run's: the
inputs, each intermediate and output counted as if all were held at once), and a model-local
function named like an operator ONNX Runtime runs itself (it runs its operator, not the body the
check would read). Another domain's operator whose output is a string (declared so, or untyped
with string inputs) is assumed to make strings of any length. Fail closed: what the walk cannot
bound or read, it refuses (the operator may still let it through).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import onnx
from onnx import (
    AttributeProto,
    FunctionProto,
    GraphProto,
    NodeProto,
    TensorProto,
    TypeProto,
    numpy_helper,
)

from strongroom.inference.models._graph import (
    SMALL_INTEGERS,
    STANDARD_DOMAINS,
    Finding,
    InliningFailed,
    Subgraph,
    Unordered,
    small_integers,
)

STRING_SLOT_BYTES = 32
"""What a ``BYTES`` element takes in ONNX Runtime's arena: its ``std::string`` (libstdc++)."""
SHORT_STRING_BYTES = 15
"""The longest string ``std::string`` (libstdc++) keeps inside its slot
(:data:`STRING_SLOT_BYTES`), which the arena counts; a longer one's characters are a separate
allocation outside it."""

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


class StringExpansion(Finding):
    """Why a model could make a run hold string characters without bound (the message)."""


@dataclasses.dataclass(frozen=True)
class _Text:
    """A string-typed value's bounds: its longest element (None: any length) and characters."""

    longest: int | None
    chars: float

    @property
    def short(self) -> bool:
        return self.longest is not None and self.longest <= SHORT_STRING_BYTES

    @property
    def limit(self) -> str:
        """Its longest element, in words."""
        return "any length" if self.longest is None else f"up to {self.longest} bytes"


def _longest(texts: Sequence[_Text]) -> int | None:
    """The longest element of any of ``texts`` (None: any length)."""
    if any(t.longest is None for t in texts):
        return None
    return max(t.longest or 0 for t in texts)


@dataclasses.dataclass
class _Scope:
    """A graph's string values' bounds (its outer scopes' included), value types, where, and its
    small integer constants (initializers no request can replace, ``Constant`` nodes) by name:
    what may be column indices."""

    texts: dict[str, _Text]
    types: dict[str, TypeProto]
    where: str
    indices: dict[str, list[int]] = dataclasses.field(default_factory=dict)


class StringBounds:
    """The string check, following the graph walk (``models._graph.Analysis``); :attr:`problem`
    says why the model could make a run hold string characters past ``max_chars`` or repeat a
    long string by a runtime value (None: it cannot)."""

    def __init__(self, *, max_input_bytes: int, max_chars: int) -> None:
        self.max_input_bytes = max_input_bytes
        self.max_chars = max_chars
        self.held = 0.0  # the long string values' characters, all scopes together
        self._problem: str | None = None
        self._stopped = False

    @property
    def problem(self) -> str | None:
        """The first reason the model is refused (after the walk), or None."""
        if self._problem is None and not self._stopped and self.held > self.max_chars:
            # Copies of copies overflow a float to infinity (1024 doublings), which no int holds.
            held = "more than 2**1024" if math.isinf(self.held) else str(math.ceil(self.held))
            return (
                f"its string values could hold {held} bytes of characters in one "
                f"run (the request's strings up to {self.max_input_bytes} bytes, and every string "
                f"value the graph derives from them), more than the {self.max_chars} bytes runs "
                "may hold"
            )
        return self._problem

    def hold(self, text: _Text) -> _Text:
        if not text.short:
            self.held += text.chars
        return text

    def failed(self, exc: Exception) -> None:
        """Fail closed: what the walk cannot bound or read, it refuses."""
        self._stopped = True
        if isinstance(exc, StringExpansion):
            self._problem = str(exc)
        elif isinstance(exc, InliningFailed):
            self._problem = f"its model-local functions could not be inlined to be checked ({exc})"
        elif isinstance(exc, Unordered):
            self._problem = "its graph has a cycle, so the check cannot order it"
        else:
            # A node without the subgraph or attribute its operator needs: ORT refuses it too,
            # but what the walk cannot read it does not pass.
            self._problem = f"its graph could not be checked ({type(exc).__name__})"

    def declared(self, functions: Sequence[FunctionProto]) -> None:
        """Refuses a model-local function ORT would not run: ONNX's inliner puts its body where
        it is called, but ORT runs its own operator for a node named like one it implements, so
        the check would judge a body ORT ignores (an ``Identity`` named ``Expand``)."""
        for function in functions:
            if _runs_as_an_operator(function.domain, function.name):
                raise StringExpansion(
                    f"its model-local function {function.domain or 'ai.onnx'}.{function.name} has "
                    "the name of an operator ONNX Runtime runs itself, not the body the check "
                    "would read"
                )

    def main(self, graph: GraphProto) -> _Scope:
        """The main graph's scope: its string inputs are the request's."""
        return self.scope(graph, _Scope({}, {}, "the graph"), None)

    def scope(
        self, graph: GraphProto, outer: _Scope, inputs: Mapping[str, _Text] | None, where: str = ""
    ) -> _Scope:
        """The bounds ``graph`` starts with (its outer scope's included). ``inputs`` gives a
        subgraph's inputs' bounds; the main graph's (None) are the request's."""
        replaceable = {value.name for value in graph.input}
        # A body's input may have the name of an outer constant (ORT lets it): inside, that name
        # is the runtime value (a Loop's carried indices, say), not the constant.
        indices = {k: v for k, v in outer.indices.items() if k not in replaceable}
        scope = _Scope(dict(outer.texts), dict(outer.types), where or outer.where, indices)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.WhichOneof("value") is not None:
                scope.types[value.name] = value.type
        for init in graph.initializer:
            text = _tensor_text(init)
            if text is not None:
                scope.texts[init.name] = self.hold(text)
            elif init.name not in replaceable and small_integers(init):
                scope.indices[init.name] = [int(i) for i in numpy_helper.to_array(init).flat]
        request = False
        for value in graph.input:
            if value.name in scope.texts:
                continue  # an initializer given as an input too (IR < 4): its default is known
            if inputs is not None:
                if value.name in inputs:
                    scope.texts[value.name] = inputs[value.name]
            elif value.name in scope.types and _is_string_type(scope.types[value.name]):
                # Any one input may carry all of the request's bytes; all together no more.
                scope.texts[value.name] = _Text(None, float(self.max_input_bytes))
                request = True
        if request:
            self.held += self.max_input_bytes
        return scope

    def node(self, scope: _Scope, node: NodeProto, subgraphs: Sequence[Subgraph]) -> _Bodies | None:
        """Bounds ``node``'s string outputs; the plan for its subgraphs, if it has any."""
        op = node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}.{node.op_type}"
        label = f"{op} node {node.name!r}" if node.name else f"{op} node"
        if op == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and small_integers(attr.t):
                    values = [int(i) for i in numpy_helper.to_array(attr.t).flat]
                    scope.indices[node.output[0]] = values
                elif attr.name == "value_ints" and len(attr.ints) <= SMALL_INTEGERS:
                    scope.indices[node.output[0]] = [int(i) for i in attr.ints]
        if op == "If":
            return _Branches(self, scope, node, subgraphs, label)
        if op in ("Loop", "Scan"):
            return _Iterated(self, scope, node, subgraphs, label)
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            return _AnyBodies(self, scope, node, subgraphs, label)
        self._plain(scope, node, op, label)
        return None

    def _plain(self, scope: _Scope, node: NodeProto, op: str, label: str) -> None:
        ins = [scope.texts.get(name) if name else None for name in node.input]
        strings = [t for t in ins if t is not None]
        made = _attribute_strings(node)
        casting = op in ("Cast", "CastLike")
        # A Cast from numbers makes one string per number, however many the input holds.
        from_numbers = casting and (not ins or ins[0] is None)
        never = _NOT_STRING_OUTPUTS.get(op, frozenset())
        could = bool(strings or made or _casts_to_string(node))
        for index, name in enumerate(node.output):
            if index in never or not _may_be_string(name, scope, could):
                continue
            text = (
                _cast_text(node, scope.types)
                if from_numbers
                else _output_text(node, op, strings, made)
            )
            preserves = _preserves(node, op) or _selects_once(scope, node, op)
            if not text.short and (not preserves or from_numbers):
                raise StringExpansion(
                    f"{label} in {scope.where} makes string elements of {text.limit} (more than "
                    f"the {SHORT_STRING_BYTES} bytes the memory cap counts) as many times as the "
                    "shapes or values it is given say"
                )
            scope.texts[name] = self.hold(text)


def _may_be_string(name: str, scope: _Scope, could: bool) -> bool:
    """Whether output ``name`` may hold strings: its type says so, or, untyped, the node has
    something that ``could`` make it one."""
    if not name:
        return False
    if name in scope.types:
        return _is_string_type(scope.types[name])
    return could


class _Bodies:
    """A node's subgraphs, followed one after another (``models._graph.Bodies``)."""

    def __init__(
        self,
        check: StringBounds,
        scope: _Scope,
        node: NodeProto,
        subgraphs: Sequence[Subgraph],
        label: str,
    ) -> None:
        self.check = check
        self.scope = scope
        self.node = node
        self.subgraphs = subgraphs
        self.label = label
        self.where = f"the body of {label} in {scope.where}"
        self.current: Subgraph | None = None
        self.followed = 0
        self.setup()

    def setup(self) -> None:
        """What the node's kind knows before its first body."""

    def body(self, index: int) -> Subgraph | None:
        """The ``index``-th subgraph to follow (None: no more)."""
        raise NotImplementedError

    def next(self) -> tuple[Subgraph, _Scope] | None:
        self.current = self.body(self.followed)
        if self.current is None:
            return None
        self.followed += 1
        return self.current, self.start(self.current.graph)

    def start(self, body: GraphProto) -> _Scope:
        return self.check.scope(body, self.scope, {}, self.where)

    def leave(self, inner: _Scope) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def named(self, name: str) -> Subgraph:
        """The GRAPH attribute ``name`` (the last so named, as protobuf's map would); KeyError."""
        for body in reversed(self.subgraphs):
            if body.attribute == name and body.typed and body.single:
                return body
        raise KeyError(name)

    def short_outputs(self, inner: _Scope, repeated: str) -> list[_Text | None]:
        """The current body's outputs' bounds; a long one is refused: the node repeats it."""
        assert self.current is not None
        texts = [inner.texts.get(value.name) for value in self.current.graph.output]
        for text in texts:
            if text is not None and not text.short:
                raise StringExpansion(
                    f"{self.label} in {self.scope.where} returns string elements of {text.limit} "
                    f"from {repeated}"
                )
        return texts


class _Branches(_Bodies):
    """``If``: either branch may run; an output is bounded by the larger of its two."""

    def setup(self) -> None:
        self.results: list[list[_Text | None]] = []

    def body(self, index: int) -> Subgraph | None:
        return self.named(("then_branch", "else_branch")[index]) if index < 2 else None

    def leave(self, inner: _Scope) -> None:
        assert self.current is not None
        self.results.append([inner.texts.get(o.name) for o in self.current.graph.output])

    def finish(self) -> None:
        for index, name in enumerate(self.node.output):
            texts = [t for r in self.results if index < len(r) and (t := r[index]) is not None]
            if name and texts:
                merged = _Text(_longest(texts), max(t.chars for t in texts))
                self.scope.texts[name] = self.check.hold(merged)


class _Iterated(_Bodies):
    """``Loop``, ``Scan``: the body's outputs are repeated by the iteration count."""

    def setup(self) -> None:
        self.loop = self.node.op_type == "Loop"
        self.outputs: list[_Text | None] = []

    def body(self, index: int) -> Subgraph | None:
        return self.named("body") if index == 0 else None

    def start(self, body: GraphProto) -> _Scope:
        # Loop's body takes (iteration, condition, carried...), Scan's (state..., scan slices...):
        # the node's inputs after Loop's first two line up with the body's after its first two.
        skip = 2 if self.loop else 0
        # Scan-8 (opset 8) takes an optional sequence_lens first, which its body has no input
        # for: lined up from the first, each of the node's inputs was taken for the body input
        # before its own, so a string state reached the body untracked and the body could Expand it.
        extra = 0 if self.loop else len(self.node.input) - len(body.input)
        if extra not in (0, 1):
            raise StringExpansion(
                f"{self.label} in {self.scope.where} has inputs its body does not line up with"
            )
        inputs = self.node.input[skip + extra :]
        given = [self.scope.texts.get(n) if n else None for n in inputs]
        # The values a body carries from one iteration to the next (all of Loop's, Scan's state):
        # the first iteration gets the node's, each later one what the last returned, which must
        # be short (checked on leaving). Walked once with the node's alone, a body that lengthens
        # a short string (StringConcat(c, c): 7 bytes, 14, 28, ... 7 MiB after 20) passed.
        carried = (
            len(given) if self.loop else len(given) - _int_attribute(self.node, "num_scan_inputs")
        )
        body_inputs = {
            value.name: _carried(text) if position < carried else text
            for position, (value, text) in enumerate(zip(body.input[skip:], given, strict=False))
            if text is not None
        }
        return self.check.scope(body, self.scope, body_inputs, self.where)

    def leave(self, inner: _Scope) -> None:
        self.outputs = self.short_outputs(
            inner, "its body, which it repeats as many times as it iterates"
        )

    def finish(self) -> None:
        for name, text in zip(
            self.node.output, self.outputs[1 if self.loop else 0 :], strict=False
        ):
            if name and text is not None:
                self.scope.texts[name] = text  # short (checked above): the arena counts it


class _AnyBodies(_Bodies):
    """Another operator with subgraphs (``SequenceMap``, another domain's): each body is assumed
    to run any number of times on any of the node's strings, so it must return none that is long
    (and is walked like any graph)."""

    def setup(self) -> None:
        self.typed = [s for s in self.subgraphs if s.typed]
        self.strings = [
            t for n in self.node.input if n and (t := self.scope.texts.get(n)) is not None
        ]
        strings = self.strings
        self.worst = _Text(_longest(strings), sum(t.chars for t in strings)) if strings else None
        self.outputs: list[_Text | None] = []

    def body(self, index: int) -> Subgraph | None:
        return self.typed[index] if index < len(self.typed) else None

    def start(self, body: GraphProto) -> _Scope:
        given = {} if self.worst is None else {value.name: self.worst for value in body.input}
        return self.check.scope(body, self.scope, given, self.where)

    def leave(self, inner: _Scope) -> None:
        self.outputs.extend(self.short_outputs(inner, "a body it may run any number of times"))

    def finish(self) -> None:
        could = bool(self.strings) or any(t is not None for t in self.outputs)
        for name in self.node.output:
            if not _may_be_string(name, self.scope, could):
                continue
            if self.node.domain not in STANDARD_DOMAINS:
                raise StringExpansion(
                    f"{self.label} in {self.scope.where} makes string elements of any length "
                    f"(more than the {SHORT_STRING_BYTES} bytes the memory cap counts) from its "
                    "body"
                )
            # SequenceMap's outputs are its body's, each short (checked above).
            self.scope.texts[name] = _Text(SHORT_STRING_BYTES, 0.0)


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


def _selects_once(scope: _Scope, node: NodeProto, op: str) -> bool:
    """Whether ``node`` picks elements of its string input at constant, distinct indices, each
    element so placed at most once: what sklearn-onnx writes to pick a ``ColumnTransformer``'s or
    ``OneHotEncoder``'s columns (``ArrayFeatureExtractor`` by an INT64 initializer). Gather's
    negative indices count from the end, so one of them and a non-negative one may be the same."""
    if op not in (f"{_ML_DOMAIN}.ArrayFeatureExtractor", "Gather") or len(node.input) < 2:
        return False
    chosen = scope.indices.get(node.input[1])
    if chosen is None or len(set(chosen)) != len(chosen):
        return False
    return all(i >= 0 for i in chosen) or all(i < 0 for i in chosen)


# Domains whose operators ONNX Runtime implements itself (ONNX's, and its own contrib ones, which
# ONNX cannot list): a node there runs ORT's kernel even where a local function has its name.
_RUNTIME_DOMAIN_PREFIXES = ("com.microsoft", "com.ms.", "org.pytorch.")


def _runs_as_an_operator(domain: str, name: str) -> bool:
    """Whether ORT runs its own operator for a node calling model-local function ``name``."""
    if domain.startswith(_RUNTIME_DOMAIN_PREFIXES):
        return True
    try:
        return bool(onnx.defs.has(name, "" if domain == "ai.onnx" else domain))
    except Exception:  # a domain ONNX does not know: nothing of its is built in
        return False


def _int_attribute(node: NodeProto, name: str) -> int:
    """The INT attribute ``name`` of ``node``; KeyError (ORT refuses the node too: the check
    says it cannot read it)."""
    for attr in node.attribute:
        if attr.name == name and attr.type == AttributeProto.INT:
            return int(attr.i)
    raise KeyError(name)


def _carried(text: _Text) -> _Text:
    """A carried value's bounds over every iteration: the node's, or anything short a previous
    iteration returned."""
    longest = None if text.longest is None else max(text.longest, SHORT_STRING_BYTES)
    return _Text(longest, text.chars)


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
