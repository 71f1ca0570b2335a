"""The one walk of a model's graph at load: every node of the graph, of its subgraphs and of its
model-local functions is enumerated here, once, for both load-time checks that read the graph.

* The operators: every operator the walk meets is collected, a standard one by its type and
  any other with its domain (:func:`operator_name`; what
  :data:`~strongroom.inference.models._loaded.UNCAPPED_OPERATORS` is looked up in).
* The strings: an :class:`Analysis` (``models._strings``) follows the walk node by node, told of
  each graph as it begins and of each node in the order ONNX Runtime runs it.

The model is parsed once with onnx; the weights' bytes are dropped at once (only a string
initializer's matter, and a small integer one's, which may be indices: :func:`small_integers`), before inlining and type inference copy the model, so a big model is
not held twice while the walk runs. The analysis is shown the model-local functions as declared
(:meth:`Analysis.declared`: ONNX Runtime runs its own operator for a call named like one it
implements, whatever the function's body says), then they are inlined (the analysis follows
their nodes where they are called); after the graph, the functions' bodies as declared are
enumerated too (one nothing calls included, and all of them when inlining failed): their
operators count wherever they stand. A function declared in ONNX's own domain stands for the
operator it is named after (inlining replaces the calls to it), so its name counts too.

The analysis stops at its first finding (or at what it cannot read); the walk goes on to the
last node, so the operators are always all of them.

Before any of it, the graph's nodes are counted as they would be inlined (:func:`inlined_nodes`,
nothing inlined): past the budget the model is refused (:class:`GraphTooLarge`), as functions
calling functions several times each inline to a number of nodes exponential in their depth.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import math
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, NodeProto, TensorProto, inliner

from strongroom.wire import WireError, encode_varint, read_varint

STANDARD_DOMAINS = ("", "ai.onnx")
"""The domains of ONNX's standard operators (one name, two spellings)."""


def operator_name(domain: str, op_type: str) -> str:
    """How :func:`walk_model` names an operator: a standard one by its type (``Unique``), any
    other with its domain (``com.microsoft.Unique``: ONNX Runtime's own, whose kernels can
    allocate outside the inference memory cap as much as the standard ones)."""
    return op_type if domain in STANDARD_DOMAINS else f"{domain}.{op_type}"


S = TypeVar("S")
R = TypeVar("R")

# What an analysis raises on a graph it cannot read (a node without the attribute or subgraph its
# operator needs, a malformed type, ...): it stops, the walk goes on.
_UNREADABLE = (KeyError, IndexError, AttributeError, TypeError, ValueError)

# The fields of a tensor that hold numbers (the weights), dropped before the model is copied.
_WEIGHT_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


SMALL_INTEGERS = 4096
"""The most elements an integer initializer may have to be kept (read as indices); the rest are
weights, dropped unread."""


def small_integers(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is an integer constant small enough to be kept and read (indices)."""
    return (
        tensor.data_type in (TensorProto.INT64, TensorProto.INT32)
        and tensor.data_location != TensorProto.EXTERNAL
        and math.prod(tensor.dims) <= SMALL_INTEGERS
    )


class Subgraph(NamedTuple):
    """A graph a node holds: in attribute ``attribute`` (of ``attribute_type``), from its ``g``
    field (``single``) or its ``graphs``; ``key`` tells it from the node's others."""

    key: tuple[int, int]
    attribute: str
    attribute_type: int
    single: bool
    graph: GraphProto

    @property
    def typed(self) -> bool:
        """Whether the attribute's type says it holds this graph (``g`` of a GRAPH, ``graphs``
        of any other): the subgraphs ONNX Runtime reads and the analysis follows."""
        return self.single == (self.attribute_type == AttributeProto.GRAPH)


class Finding(Exception):
    """An analysis's own reason to stop (the message): it refuses the model."""


class Unordered(Exception):
    """A graph whose nodes cannot be put in an order to run (a cycle)."""


class InliningFailed(Exception):
    """The model-local functions could not be inlined (the exception's type name is the text)."""


class GraphTooLarge(Exception):
    """The model's graph has more than the node budget once its model-local functions are
    inlined (the message says which function, if one alone is past it)."""

    def __init__(self, message: str, function: str | None) -> None:
        super().__init__(message)
        self.function = function


DEFAULT_MAX_GRAPH_NODES = 100_000
"""The default node budget of a model's graph as inlined (:func:`inlined_nodes`). Real models are
far below it: the test models and sklearn-onnx pipelines have tens to hundreds of nodes, a large
transformer's export some 10^3 to 10^4 (a few hundred per layer). ONNX Runtime's load time grows
faster than the count here: a plain 64,000-node graph took 3.5 s to load, a model of 15 small
functions each calling the one before twice (98,000 nodes inlined, a few hundred bytes) took
tens of seconds, and 16 such levels 128 s."""


_FunctionKey = tuple[str, str, str]  # domain (ONNX's two spellings as one), name, overload


class _Inlined(NamedTuple):
    """What a function's body inlines to: its nodes; for each of its graph attributes, how many
    copies of the graph a call passes for it are inlined (``ref_attr_name``: into an ``If``'s
    branch, a further call's attribute); and the nodes of each one's default graph."""

    nodes: int
    copies: dict[str, int]
    defaults: dict[str, int]


def _function_key(domain: str, name: str, overload: str) -> _FunctionKey:
    # ONNX's inliner takes "ai.onnx" and "" for one domain: it inlines a call spelled one way of
    # a function declared the other, which a count keyed by the spelling took for an operator.
    return ("" if domain in STANDARD_DOMAINS else domain, name, overload)


def _graphs_of(attr: AttributeProto) -> list[GraphProto]:
    """The graphs an attribute holds (``g`` and ``graphs``), whatever its declared type."""
    graphs = [attr.g] if attr.HasField("g") else []
    graphs.extend(attr.graphs)
    return graphs


def inlined_nodes(proto: onnx.ModelProto, budget: int) -> int:
    """How many nodes ``proto``'s graph has once its model-local functions are inlined, its
    subgraphs' included, counted without inlining anything: a call counts one node and its
    function's body (the body counted once per function, then multiplied). A graph passed to a
    function as an attribute (or its default) counts once for each copy inlining makes of it,
    one wherever the body refers to it (``ref_attr_name``). A function calling itself, directly
    or not, has no end. :class:`GraphTooLarge` past ``budget``: a function whose body alone is
    past it is named (the innermost such), else the graph; a model of a few kilobytes whose
    functions each call the one before twice, or whose one function refers to the graph it is
    passed a thousand times, would otherwise inline to millions of nodes, in the walk's inliner
    and in ONNX Runtime's (minutes of a loading worker)."""
    cap = budget + 1  # every figure saturates here: past the budget is all that matters
    functions: dict[_FunctionKey, list[FunctionProto]] = {}
    for declared in proto.functions:
        # Declared twice, or in both spellings of ONNX's domain (ONNX Runtime and the walk's
        # inliner refuse the first, not both spellings of the second): both count.
        key = _function_key(declared.domain, declared.name, declared.overload)
        functions.setdefault(key, []).append(declared)
    sizes: dict[_FunctionKey, _Inlined] = {}
    no_call = _Inlined(0, {}, {})

    def called(node: NodeProto) -> _FunctionKey | None:
        key = _function_key(node.domain, node.op_type, node.overload)
        return key if key in functions else None

    def callees(nodes: Sequence[NodeProto]) -> list[_FunctionKey]:
        """The functions called in ``nodes`` and in the graphs they hold or pass."""
        found: list[_FunctionKey] = []
        pending = [list(nodes)]
        while pending:
            for node in pending.pop():
                key = called(node)
                if key is not None:
                    found.append(key)
                pending.extend(list(g.node) for a in node.attribute for g in _graphs_of(a))
        return found

    def count(nodes: Sequence[NodeProto]) -> tuple[int, dict[str, int]]:
        """``nodes`` as inlined (every function they call is in ``sizes``), and how many copies
        of each graph attribute of the function they stand in (``ref_attr_name``) they hold."""
        total = 0
        copies: dict[str, int] = {}
        for node in nodes:
            key = called(node)
            callee = sizes[key] if key is not None else no_call
            total += 1 + callee.nodes
            for attr in node.attribute:
                # A graph passed in a call is copied wherever the function refers to it, and
                # counted once where it does not: ONNX Runtime reads it at the call.
                times = max(1, callee.copies.get(attr.name, 0))
                if attr.ref_attr_name:
                    copies[attr.ref_attr_name] = min(cap, copies.get(attr.ref_attr_name, 0) + times)
                for graph in _graphs_of(attr):
                    inner, inner_copies = count(graph.node)
                    total += times * inner
                    for name, n in inner_copies.items():
                        copies[name] = min(cap, copies.get(name, 0) + times * n)
            given = {attr.name for attr in node.attribute}
            for name, nodes_of_default in callee.defaults.items():
                if name not in given:  # the call leaves it to its default graph
                    total += callee.copies.get(name, 0) * nodes_of_default
            total = min(cap, total)
        return total, copies

    def size(root: _FunctionKey) -> None:
        visiting: set[_FunctionKey] = set()
        stack: list[tuple[_FunctionKey, bool]] = [(root, False)]
        while stack:
            key, done = stack.pop()
            if key in sizes:
                continue
            if not done:
                if key in visiting:
                    raise GraphTooLarge(
                        f"model-local function {_named(key)} calls itself (directly or through "
                        "others): inlining it has no end",
                        key[1],
                    )
                visiting.add(key)
                stack.append((key, True))
                calls: list[_FunctionKey] = []
                for declared in functions[key]:
                    calls += callees(declared.node)
                    for attr in declared.attribute_proto:
                        for graph in _graphs_of(attr):
                            calls += callees(graph.node)
                stack.extend((c, False) for c in dict.fromkeys(calls) if c not in sizes)
                continue
            visiting.discard(key)
            nodes = 0
            copies: dict[str, int] = {}
            defaults: dict[str, int] = {}
            for declared in functions[key]:
                body, body_copies = count(declared.node)
                nodes += body
                for name, n in body_copies.items():
                    copies[name] = min(cap, copies.get(name, 0) + n)
                for attr in declared.attribute_proto:
                    graphs = _graphs_of(attr)
                    if graphs:
                        default = sum(count(g.node)[0] for g in graphs)
                        defaults[attr.name] = min(cap, max(defaults.get(attr.name, 0), default))
            if nodes > budget:
                raise GraphTooLarge(
                    f"model-local function {_named(key)} inlines to more than {budget} nodes",
                    key[1],
                )
            sizes[key] = _Inlined(nodes, copies, defaults)

    total = 0
    for node in proto.graph.node:
        keys = callees([node])
        for key in keys:  # depth first: the function past the budget is the innermost
            size(key)
        total += count([node])[0]
        if total > budget:
            among = f" (its calls of {_named(keys[0])} among them)" if keys else ""
            raise GraphTooLarge(
                f"the graph has more than {budget} nodes once its model-local functions are "
                f"inlined{among}",
                None,
            )
    return total


def _named(key: _FunctionKey) -> str:
    domain, name, overload = key
    text = f"{domain}.{name}" if domain else name
    return f"{text} (overload {overload})"[:160] if overload else text[:160]


class Bodies(Protocol[S]):
    """An analysis's plan for a node with subgraphs: which to follow, in what order, with what."""

    def next(self) -> tuple[Subgraph, S] | None:
        """The next subgraph to follow and its scope's start, or None when done."""

    def leave(self, scope: S) -> None:
        """The subgraph just followed ended with ``scope``."""

    def finish(self) -> None:
        """Every subgraph followed: the node's own outputs."""


class Analysis(Protocol[S]):
    """What follows the walk; a :class:`Finding` or what it cannot read (``KeyError``,
    ``IndexError``, ``AttributeError``, ``TypeError``, ``ValueError``) stops it (:meth:`failed`),
    not the walk; anything else it raises ends the walk too."""

    def declared(self, functions: Sequence[FunctionProto]) -> None:
        """The model-local functions as declared, before they are inlined."""

    def main(self, graph: GraphProto) -> S:
        """The scope the main graph starts with."""

    def node(self, scope: S, node: NodeProto, subgraphs: Sequence[Subgraph]) -> Bodies[S] | None:
        """``node``, its inputs known in ``scope``; a plan for its subgraphs, if it follows any."""

    def failed(self, exc: Exception) -> None:
        """The analysis could go no further (``exc``: its own finding, or what it or the walk
        could not read: :class:`Unordered`, :class:`InliningFailed`, ``_UNREADABLE``)."""


_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
KEPT_RAW_BYTES = 64 * 1024
"""Raw initializer bytes :func:`without_large_weights` keeps: every tensor
:func:`small_integers` reads (at most 4,096 64-bit integers) fits."""


def without_large_weights(model: bytes) -> bytes:
    """``model`` without the ``raw_data`` of its main graph's initializers larger than
    :data:`KEPT_RAW_BYTES`, every other byte as it was: parsing a model copies its weights (a
    512 MiB model took ~0.2-0.4 s more to check at load), and the walk never reads them.
    :class:`~strongroom.wire.WireError` if the bytes do not scan as protobuf fields."""
    buf = memoryview(model)
    out = bytearray()
    for start, end, number, payload in _scan(buf):
        if number == _MODEL_GRAPH and payload is not None:
            graph = bytearray()
            for g_start, g_end, g_number, g_payload in _scan(payload):
                if g_number == _GRAPH_INITIALIZER and g_payload is not None:
                    graph += _length_delimited(g_number, _without_raw_data(g_payload))
                else:
                    graph += payload[g_start:g_end]
            out += _length_delimited(number, graph)
        else:
            out += buf[start:end]
    return bytes(out)


def _without_raw_data(tensor: memoryview) -> bytearray | memoryview:
    """A serialized TensorProto without a ``raw_data`` over :data:`KEPT_RAW_BYTES`."""
    kept = bytearray()
    dropped = False
    for start, end, number, payload in _scan(tensor):
        if number == _TENSOR_RAW_DATA and payload is not None and len(payload) > KEPT_RAW_BYTES:
            dropped = True
        else:
            kept += tensor[start:end]
    return kept if dropped else tensor


def _length_delimited(number: int, payload: bytes | bytearray | memoryview) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + bytes(payload)


def _scan(message: memoryview) -> list[tuple[int, int, int, memoryview | None]]:
    """Each field of ``message``: its start and end offsets, its number, and the contents of a
    length-delimited one. Groups (which no ONNX message has) are a WireError."""
    out: list[tuple[int, int, int, memoryview | None]] = []
    pos, end = 0, len(message)
    while pos < end:
        start = pos
        key, pos = read_varint(message, pos)
        number, wire_type = key >> 3, key & 7
        payload = None
        if wire_type == 0:
            _, pos = read_varint(message, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            size, pos = read_varint(message, pos)
            payload = message[pos : pos + size]
            pos += size
        else:
            raise WireError(f"wire type {wire_type}")
        if number == 0 or pos > end:
            raise WireError("malformed field")
        out.append((start, pos, number, payload))
    return out


def walk_model(
    model: bytes, analysis: Analysis[S], *, max_nodes: int = DEFAULT_MAX_GRAPH_NODES
) -> frozenset[str]:
    """Walks every node of ``model`` (serialized ONNX) with ``analysis``; returns the operators
    of its nodes and declared functions (:func:`operator_name`). ``ValueError`` if ``model`` is not an ONNX model;
    :class:`GraphTooLarge` if it has more than ``max_nodes`` once inlined (counted before
    anything is inlined: :func:`inlined_nodes`)."""
    try:
        stripped = without_large_weights(model)
    except WireError:  # not protobuf as far as the scan can tell: protobuf's parser judges it
        stripped = model
    try:
        proto = onnx.load_model_from_string(stripped)
    except Exception:  # protobuf's DecodeError, or whatever else a parse of bad bytes raises
        raise ValueError("not a serialized ONNX model") from None
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.STRING and not small_integers(init):
            for name in _WEIGHT_FIELDS:
                init.ClearField(name)
    inlined_nodes(proto, max_nodes)
    functions = list(proto.functions)  # inlining drops them, called or not
    walk = _Walk(analysis)
    # A function is called by nodes of its domain and name, which ONNX Runtime runs with its own
    # operator of that name if it has one (and inlining replaces with the body): its name counts
    # as an operator (declared is enough).
    walk.operators.update(operator_name(f.domain, f.name) for f in functions)
    walk.run(lambda: analysis.declared(functions))
    try:
        if proto.functions:
            proto = inliner.inline_local_functions(proto)
    except Exception as exc:  # a model ORT may still read: the analysis stops, the walk goes on
        walk.stop(InliningFailed(type(exc).__name__))
    else:
        # Strict off: an operator ONNX does not know leaves its outputs untyped (the analysis
        # assumes the worst of them); a graph inference cannot read leaves every intermediate so.
        with contextlib.suppress(Exception):
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    walk.graph(proto.graph, walk.run(lambda: analysis.main(proto.graph)))
    walk.stop_following()
    for function in functions:
        for node in function.node:
            walk.node(node, None)
    return frozenset(walk.operators)


class _Walk(Generic[S]):
    def __init__(self, analysis: Analysis[S]) -> None:
        self.analysis: Analysis[S] | None = analysis
        self.operators: set[str] = set()

    def stop(self, exc: Exception) -> None:
        if self.analysis is not None:
            self.analysis.failed(exc)
        self.analysis = None

    def stop_following(self) -> None:
        """The analysis has followed the whole graph: what comes after (functions) is counted."""
        self.analysis = None

    def run(self, call: Callable[[], R]) -> R | None:
        """``call`` into the analysis, unless it stopped; what it raises stops it."""
        if self.analysis is None:
            return None
        try:
            return call()
        except (Finding, *_UNREADABLE) as exc:
            self.stop(exc)
            return None

    def graph(self, graph: GraphProto, scope: S | None) -> S | None:
        """Every node of ``graph`` (in ONNX Runtime's order while the analysis follows it)."""
        nodes = list(graph.node)  # what the analysis does not follow is only counted: any order
        if scope is not None:
            try:
                nodes = in_order(graph)
            except Unordered as exc:
                self.stop(exc)
        for node in nodes:
            self.node(node, scope if self.analysis is not None else None)
        return scope

    def node(self, node: NodeProto, scope: S | None) -> None:
        """``node`` and every graph inside it."""
        self.operators.add(operator_name(node.domain, node.op_type))
        held = subgraphs(node)
        followed: set[tuple[int, int]] = set()
        analysis = self.analysis
        if scope is not None and analysis is not None:
            bodies = self.run(lambda: analysis.node(scope, node, held))
            while bodies is not None and (step := self.run(bodies.next)) is not None:
                body, inner = step
                followed.add(body.key)
                ended = self.graph(body.graph, inner)
                if ended is not None:
                    self.run(functools.partial(bodies.leave, ended))
            if bodies is not None:
                self.run(bodies.finish)
        for body in held:
            if body.key not in followed:
                self.graph(body.graph, None)


def subgraphs(node: NodeProto) -> list[Subgraph]:
    """Every graph ``node``'s attributes hold, whatever their declared type."""
    found: list[Subgraph] = []
    for i, attr in enumerate(node.attribute):
        if attr.HasField("g") or attr.type == AttributeProto.GRAPH:
            found.append(Subgraph((i, -1), attr.name, attr.type, True, attr.g))
        found.extend(
            Subgraph((i, j), attr.name, attr.type, False, g) for j, g in enumerate(attr.graphs)
        )
    return found


def in_order(graph: GraphProto) -> list[NodeProto]:
    """``graph``'s nodes, each after the nodes whose outputs it (or a subgraph of it) reads.
    ORT sorts a graph itself and runs one listed out of order; a walk in the listed order would
    reach a node before it knew what its inputs were. :class:`Unordered` if there is a cycle."""
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
        raise Unordered("a cycle")
    return order


def _reads(node: NodeProto) -> set[str]:
    """The names ``node`` reads, its subgraphs' (which may read the enclosing graph's) included."""
    names = {n for n in node.input if n}
    for body in subgraphs(node):
        if body.typed:
            for inner in body.graph.node:
                names |= _reads(inner)
    return names
