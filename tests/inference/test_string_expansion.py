"""Models whose string characters the inference memory cap does not bound are refused at load.

The capped arena counts a string tensor's 32-byte slots, not the characters of a string longer
than 15 bytes: a model that repeats a request's string by a runtime value (a 1 MiB string
``Expand``ed 300 times held ~300 MiB outside a 64 MiB cap) let one client make the VM's
out-of-memory killer take the service down. Real ONNX Runtime sessions, real models built here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import NodeProto, TensorProto, ValueInfoProto, helper

from strongroom.errors import FailedPrecondition
from strongroom.inference.models import (
    LoadedModel,
    ModelLoadError,
    ModelLoadFailed,
    ModelRepository,
    RuntimeOptions,
)
from tests.inference import onnx_models

EXPANDING = ("Expand", "Tile", "Gather", "Where")


def _refused(model: bytes, name: str = "m", options: RuntimeOptions | None = None) -> str:
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes(name, "1", model, options=options)
    assert isinstance(info.value, FailedPrecondition)
    assert info.value.reason == "MODEL_STRING_EXPANSION"
    return info.value.message


def _refused_graph(
    nodes: list[NodeProto], name: str, inputs: list[ValueInfoProto], output: ValueInfoProto
) -> str:
    """The refusal of a model of ``nodes`` (as listed) given the request's string ``s`` and
    count ``n``, and ``inputs`` before them."""
    request = [
        helper.make_tensor_value_info("s", TensorProto.STRING, [1]),
        helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
    ]
    graph = helper.make_graph(nodes, name, [*inputs, *request], [output])
    return _refused(onnx_models.unchecked(graph))


@pytest.mark.parametrize("op", EXPANDING)
def test_a_model_repeating_a_request_string_by_a_value_is_refused_at_load(op: str) -> None:
    message = _refused(onnx_models.string_expander(op))
    assert f"{op} node" in message, message
    assert "inference.max_inference_memory_bytes" in message
    assert "inference.string_expansion_models" in message  # how to let a trusted one through


def test_a_loop_repeating_a_string_by_its_iterations_is_refused() -> None:
    message = _refused(onnx_models.string_doubler_loop())
    assert "Loop node" in message and "iterates" in message, message


def test_the_check_reaches_into_branches_and_outer_scope_strings() -> None:
    """An ``If`` branch that ``Expand``s the graph's string input (captured from outside)."""
    expand = helper.make_graph(
        [helper.make_node("Expand", ["s", "n"], ["y"])],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.STRING, None)],
    )
    keep = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["z"])],
        "else",
        [],
        [helper.make_tensor_value_info("z", TensorProto.STRING, None)],
    )
    message = _refused_graph(
        [
            helper.make_node("If", ["c"], ["r"], then_branch=expand, else_branch=keep),
            helper.make_node("Size", ["r"], ["k"]),
        ],
        "branch",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        helper.make_tensor_value_info("k", TensorProto.INT64, []),
    )
    assert "Expand node in the body of If node" in message, message


def test_a_loop_lengthening_a_short_string_it_carries_is_refused() -> None:
    """The body was walked once with the carried value's first bounds: ``StringConcat(c, c)`` of
    a 7-byte constant looked like 14 bytes (short), yet each iteration doubles it (7 MiB after
    20, one string outside the cap, for a request of one number)."""
    growing = onnx_models.string_growing_loop("StringConcat")
    trusted = RuntimeOptions(allow_string_expansion=True)
    grown = LoadedModel.from_bytes("m", "1", growing, options=trusted)
    assert len(grown.infer({"n": np.array(5, dtype=np.int64)})["r"][0]) == 7 * 2**5
    message = _refused(growing)
    assert "StringConcat node in the body of Loop node" in message, message
    # Carrying a short string unchanged is fine.
    kept = LoadedModel.from_bytes("m", "1", onnx_models.string_growing_loop("Identity"))
    assert kept.infer({"n": np.array(3, dtype=np.int64)})["r"].tolist() == [b"abcdefg"]


@pytest.mark.parametrize("op", ["ScatterElements", "ScatterND"])
def test_a_scatter_adding_short_strings_into_one_long_one_is_refused(op: str) -> None:
    """``Scatter*`` was taken to place each string once, but ORT's ``reduction="add"``
    concatenates the updates aimed at one element: ``n`` short strings (counted by the arena)
    became one ``15 * n``-byte string, which the check still took for short and let ``Expand``
    repeat ``m`` times (``15 * n * m`` bytes outside the cap from two numbers)."""
    model = onnx_models.string_scatter_sum(op)
    trusted = RuntimeOptions(allow_string_expansion=True)
    loaded = LoadedModel.from_bytes("m", "1", model, options=trusted)
    feeds = {"n": np.array([5], dtype=np.int64), "m": np.array([3], dtype=np.int64)}
    out = loaded.infer(feeds)
    assert int(out["k"]) == 3 and out["size"].tolist() == [15 * 5 + 1]  # "a" + 75 "b"s
    message = _refused(model)
    assert f"{op} node" in message and "any length" in message, message
    # Without a reduction it places each update once: the 15-byte string stays short.
    placed = LoadedModel.from_bytes("m", "1", onnx_models.string_scatter_sum(op, "none"))
    assert placed.infer(feeds)["size"].tolist() == [16]  # "b" * 15, cut at each "b"


def test_an_opset_8_scan_body_repeating_its_string_state_is_refused() -> None:
    """Scan-8's first input is ``sequence_lens``, which its body has no input for: the walk lined
    the node's inputs up with the body's from the first, so the request's string went to the
    body's INT64 state and its string state was untracked; ``Expand`` repeated it unchecked."""
    model = onnx_models.string_scan8_expander()
    trusted = RuntimeOptions(allow_string_expansion=True)
    loaded = LoadedModel.from_bytes("m", "1", model, options=trusted)
    feeds = {
        "s": np.array([[b"x" * 64]], dtype=object),
        "b0": np.array([[0]], dtype=np.int64),
        "xs": np.array([[[5], [7]]], dtype=np.int64),
    }
    assert loaded.infer(feeds)["ks"].tolist() == [[[5], [7]]]  # 5, then 7 copies
    message = _refused(model)
    assert "Expand node in the body of Scan node" in message, message


def test_a_local_function_named_like_an_operator_ort_runs_is_refused() -> None:
    """A model-local function ``Expand`` (ONNX's domain) whose body is an ``Identity``: the
    check inlined and judged the body, ORT ran its own ``Expand`` and repeated the string."""
    model = onnx_models.string_expander_named_identity()
    trusted = RuntimeOptions(allow_string_expansion=True)
    loaded = LoadedModel.from_bytes("m", "1", model, options=trusted)
    feeds = {"s": np.array([b"x" * 64], dtype=object), "n": np.array([4], dtype=np.int64)}
    assert loaded.infer(feeds)["k"].tolist() == [4]  # ORT's Expand ran: 4 copies
    message = _refused(model)
    assert "model-local function ai.onnx.Expand" in message, message
    # The same function in the model's own domain is what ORT runs, and is judged as such.
    LoadedModel.from_bytes("m", "1", onnx_models.string_expander_named_identity("local"))


def test_columns_picked_at_constant_distinct_indices_load() -> None:
    """sklearn-onnx picks a ``ColumnTransformer``'s or ``OneHotEncoder``'s string columns with
    ``ArrayFeatureExtractor`` at an INT64 initializer: the check took it to repeat the request's
    strings by its indices and refused every such pipeline fed one string tensor."""
    picked = LoadedModel.from_bytes("m", "1", onnx_models.string_columns([0, 2]))
    x = np.array([[b"a" * 20, b"b", b"c" * 30]], dtype=object)
    assert picked.infer({"x": x})["picked"].tolist() == [[b"a" * 20, b"c" * 30]]
    # An index given twice repeats a column's strings: still refused.
    message = _refused(onnx_models.string_columns([0, 0]))
    assert "ArrayFeatureExtractor node" in message, message
    # A Loop body's input named like the constant is the runtime value inside the body.
    message = _refused(onnx_models.string_gather_shadowed_indices())
    assert "Gather node in the body of Loop node" in message, message


def test_a_long_string_in_a_constant_node_loads_like_an_initializer() -> None:
    """A ``Constant`` node holding a string longer than 15 bytes was refused as if it repeated
    it (the same string as an initializer loaded): it holds it once; repeating it still counts."""
    greeting = "a greeting longer than fifteen bytes"
    model = LoadedModel.from_bytes("m", "1", onnx_models.string_matches_constant(greeting))
    s = np.array([greeting.encode()], dtype=object)
    assert model.infer({"s": s})["same"].tolist() == [True]
    message = _refused(onnx_models.string_matches_constant(greeting, copies=True))
    assert "Expand node" in message, message


def test_copies_a_graph_makes_of_a_request_string_count_against_the_cap() -> None:
    """One ``Concat(s, s)`` is two copies; six in a row are 127 of up to 64 MiB each."""
    LoadedModel.from_bytes("m", "1", onnx_models.string_concat_chain(1))
    message = _refused(onnx_models.string_concat_chain(6))
    assert "more than the 2147483648 bytes runs may hold" in message, message
    # 1100 doublings count past a float's range: refused for the same reason, not a crash
    # of the check (OverflowError, reported as ORT rejecting the model, MODEL_INVALID).
    message = _refused(onnx_models.string_concat_chain(1100))
    assert "more than 2**1024 bytes of characters" in message, message


def test_strings_used_harmlessly_still_load_and_run() -> None:
    same = LoadedModel.from_bytes("eq", "1", onnx_models.string_equality())
    out = same.infer(
        {
            "a": np.array([b"x" * 100, b"y"], dtype=object),
            "b": np.array([b"x" * 100, b"z"], dtype=object),
        }
    )
    assert out["same"].tolist() == [True, False]
    assert out["a_copy"].tolist() == [b"x" * 100, b"y"]
    identity = LoadedModel.from_bytes("id", "1", onnx_models.identity("BYTES"))
    assert identity.infer({"x": np.array([[b"a", b"b", b"c"]], dtype=object)})["y"].shape == (1, 3)
    # A classifier naming its class from a fixed table, however many rows it is given.
    labels = ["cat", "dog", "Iris-versicolor"]  # 15 bytes: held inside the counted slot
    lookup = LoadedModel.from_bytes("lk", "1", onnx_models.label_lookup(labels))
    x = np.eye(3, dtype=np.float32)[[2, 0]]
    assert lookup.infer({"x": x})["label"].tolist() == [b"Iris-versicolor", b"cat"]
    # sklearn-onnx's shape: LinearClassifier's string labels and ZipMap's maps.
    iris = ["setosa", "versicolor", "virginica"]
    clf = LoadedModel.from_bytes("clf", "1", onnx_models.string_label_classifier(iris))
    predicted = clf.infer({"x": np.array([[1.0, 2.0], [0.0, 0.0]], dtype=np.float32)})["label"]
    assert set(predicted.tolist()) <= {s.encode() for s in iris}
    # Numeric models are not touched.
    LoadedModel.from_bytes("num", "1", onnx_models.classifier())


def test_labels_longer_than_the_counted_slot_are_refused_where_rows_repeat_them() -> None:
    message = _refused(onnx_models.label_lookup(["cat", "a-sixteen-bytes!"]))
    assert "Gather node" in message and "up to 16 bytes" in message, message
    message = _refused(onnx_models.string_id_to_text())
    assert "Cast node" in message and "up to 20 bytes" in message, message


def test_an_operator_lets_a_trusted_model_through_by_name_or_for_all() -> None:
    expander = onnx_models.string_expander("Expand")
    named = RuntimeOptions(string_expansion_models=("tenant-a/",))
    model = LoadedModel.from_bytes("tenant-a/expander", "1", expander, options=named)
    feeds = {"s": np.array([b"x" * 64], dtype=object), "n": np.array([3], dtype=np.int64)}
    assert int(model.infer(feeds)["k"]) == 3
    _refused(expander, name="tenant-b/expander", options=named)
    everyone = RuntimeOptions(allow_string_expansion=True)
    LoadedModel.from_bytes("other", "1", expander, options=everyone)


def test_the_repository_records_the_refusal_and_its_reason() -> None:
    repo = ModelRepository(["m"])
    with pytest.raises(ModelLoadError):
        repo.load("m", "1", onnx_models.string_expander("Tile"))
    with pytest.raises(ModelLoadFailed) as info:
        repo.get("m")
    assert "MODEL_STRING_EXPANSION" in info.value.message
    failure = repo.status("m").versions[0].failure
    assert failure is not None and failure.reason == "MODEL_STRING_EXPANSION"
    allowed = ModelRepository(["m"], options=RuntimeOptions(string_expansion_models=("m",)))
    allowed.load("m", "1", onnx_models.string_expander("Tile"))
    assert allowed.is_ready("m")


def test_nodes_listed_out_of_order_are_judged_in_the_order_they_run() -> None:
    """ORT sorts a graph itself: an ``Expand`` listed before the ``Identity`` that gives it the
    request's string ran (it repeated the string), and a walk in the listed order met it before
    it knew its input was a string, so the model loaded."""
    message = _refused_graph(
        [
            helper.make_node("Expand", ["y", "n"], ["z"]),
            helper.make_node("Identity", ["s"], ["y"]),
            helper.make_node("Size", ["z"], ["k"]),
        ],
        "unsorted",
        [],
        helper.make_tensor_value_info("k", TensorProto.INT64, []),
    )
    assert "Expand node" in message, message


def test_the_bodies_of_other_operators_with_subgraphs_are_checked() -> None:
    """``SequenceMap`` runs its body on each element of a sequence: a body that ``Expand``s the
    request's string was not walked (only If, Loop and Scan bodies were)."""
    body = helper.make_graph(
        [
            helper.make_node("Expand", ["element", "count"], ["many"]),
            helper.make_node("Size", ["many"], ["size"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("element", TensorProto.STRING, [1]),
            helper.make_tensor_value_info("count", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("size", TensorProto.INT64, [])],
    )
    sizes = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.INT64, []))
    message = _refused_graph(
        [
            helper.make_node("SequenceConstruct", ["s"], ["seq"]),
            helper.make_node("SequenceMap", ["seq", "n"], ["sizes"], body=body),
        ],
        "mapped",
        [],
        helper.make_value_info("sizes", sizes),
    )
    assert "Expand node in the body of SequenceMap node" in message, message


def test_request_text_mapped_to_short_labels_loads_and_long_labels_do_not() -> None:
    """``LabelEncoder`` writes a value of its table for each element, never the element: a
    request's long text mapped to short labels was refused as if the text were repeated."""
    short = {"a long request string": "yes", "b": "no"}
    model = LoadedModel.from_bytes("enc", "1", onnx_models.text_label_encoder(short))
    out = model.infer({"text": np.array([b"a long request string", b"zz"], dtype=object)})
    assert out["label"].tolist() == [b"yes", b"other"]
    message = _refused(onnx_models.text_label_encoder({"b": "a label of 17 byte"}))
    assert "LabelEncoder node" in message and "up to 18 bytes" in message, message


def test_a_model_in_ort_format_is_refused_not_let_past_the_check(tmp_path: Path) -> None:
    """ONNX Runtime also loads its own flatbuffer format, which the check (reading ONNX) cannot
    walk: the expanding model saved in it loaded past the check. Only ONNX models load now."""
    saved = tmp_path / "expander.ort"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(saved)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(onnx_models.string_expander(), so, providers=["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes("m", "1", saved.read_bytes())
    assert info.value.reason == "MODEL_INVALID"


def test_a_text_vectorizer_loads_unless_it_pads_with_long_strings() -> None:
    """sklearn-onnx's text vectorizers tokenize with ORT's ``Tokenizer`` (com.microsoft), whose
    outputs, as any other domain's, counted as strings of any length it might repeat: every such
    model was refused. Tokens are pieces of the request's strings, each placed once; only the
    padding is the operator's own, so a long ``pad_value`` is still refused."""
    model = LoadedModel.from_bytes("tfidf", "1", onnx_models.text_vectorizer())
    out = model.infer({"text": np.array([b"Good good bad", b"meh"], dtype=object)})
    assert out["counts"].tolist() == [[2.0, 1.0], [0.0, 0.0]]
    message = _refused(onnx_models.text_vectorizer(pad_value="a padding of 17 b"))
    assert "com.microsoft.Tokenizer node" in message, message
