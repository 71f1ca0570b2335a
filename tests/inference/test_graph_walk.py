"""Both load-time checks of a model's graph are made on one walk of it (``models._graph``): the
operators whose kernels allocate outside the memory cap (``MODEL_OPERATOR_UNCAPPED``) and the
strings the cap does not bound (``MODEL_STRING_EXPANSION``). A model that trips both is refused
for its operators, whatever lets its strings through; the string check stops at its first
finding, the walk does not, so an operator after it is still found. Real ONNX Runtime sessions.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from strongroom.inference.config import InferenceConfig
from strongroom.inference.models import LoadedModel, ModelLoadError, RuntimeOptions
from strongroom.inference.models._graph import without_large_weights
from strongroom.runtime.config import ConfigError
from strongroom.wire import WireError
from tests.inference import onnx_models

STRINGS_ALLOWED = RuntimeOptions(string_expansion_models=("m",))
OPERATORS_ALLOWED = RuntimeOptions(allow_uncapped_operators=True)


def _reason(model: bytes, options: RuntimeOptions) -> tuple[str, str]:
    with pytest.raises(ModelLoadError) as info:
        LoadedModel.from_bytes("m", "1", model, options=options)
    return info.value.reason, info.value.message


def test_a_model_tripping_both_checks_is_refused_for_its_operators_first() -> None:
    model = onnx_models.expander_and_sized()
    for options in (RuntimeOptions(), STRINGS_ALLOWED):
        reason, message = _reason(model, options)
        assert reason == "MODEL_OPERATOR_UNCAPPED" and "NonZero" in message, message
    reason, message = _reason(model, OPERATORS_ALLOWED)
    assert reason == "MODEL_STRING_EXPANSION" and "Expand node" in message, message
    both = RuntimeOptions(allow_uncapped_operators=True, allow_string_expansion=True)
    LoadedModel.from_bytes("m", "1", model, options=both)


@pytest.mark.parametrize("where", ["branch", "cycle", "function", "shadow"])
def test_operators_are_found_wherever_they_stand_past_the_string_checks_finding(
    where: str,
) -> None:
    """In a branch walked after the ``Expand`` the string check stopped at, in a graph it
    cannot order, in a function nothing calls (inlining drops it), or as a call of a function
    named ``NonZero`` in ONNX's own domain (inlining replaces the call by the function's body)."""
    model = onnx_models.expander_and_sized(where)
    reason, message = _reason(model, STRINGS_ALLOWED)
    assert reason == "MODEL_OPERATOR_UNCAPPED" and "NonZero" in message, message
    reason, message = _reason(model, OPERATORS_ALLOWED)
    assert reason == "MODEL_STRING_EXPANSION", message


def test_the_walk_parses_the_model_without_its_large_weights() -> None:
    """Parsing a model to walk it copied every weight (a 512 MiB model took 0.2-0.4 s more to
    load): the walk parses it without the raw bytes of initializers over KEPT_RAW_BYTES, every
    other field as it was (small integer constants, which the string check reads, included)."""
    big = numpy_helper.from_array(np.ones((300, 300), dtype=np.float32), "big")
    small = numpy_helper.from_array(np.arange(10, dtype=np.int64), "cols")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["h"]),
            helper.make_node("Gather", ["h", "cols"], ["y"], axis=1),
        ],
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [big, small],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    serialized = model.SerializeToString()
    stripped = without_large_weights(serialized)
    assert len(stripped) < len(serialized) - 300 * 300 * 4 + 1024
    expected = onnx.load_model_from_string(serialized)
    expected.graph.initializer[0].ClearField("raw_data")
    assert onnx.load_model_from_string(stripped) == expected
    assert without_large_weights(b"") == b""
    with pytest.raises(WireError):
        without_large_weights(b"\x0b")  # a group: no ONNX message has one


def test_functions_that_inline_past_the_node_budget_are_refused_before_onnx_runtime_reads_them() -> (
    None
):
    """Model-local functions each calling the one before twice: 16 levels took the walk's
    inliner ~1.4 s and ONNX Runtime 128 s to load (a loading worker held for minutes by a model
    of a few kilobytes). Their nodes are counted as inlined, without inlining them, and the
    model refused past ``max_graph_nodes``, naming the innermost function past it."""
    # F_k counts 6 + 4 * F_(k-1) nodes (F0: 1): F4 = 766, F5 = 3070; the graph F4 + 1.
    options = RuntimeOptions(max_graph_nodes=1000)
    reason, message = _reason(onnx_models.nested_functions(8, 3), options)
    assert reason == "MODEL_GRAPH_TOO_LARGE", message
    assert "local.F5 inlines to more than 1000 nodes" in message, message
    assert "inference.max_graph_nodes" in message, message
    model = LoadedModel.from_bytes("m", "1", onnx_models.nested_functions(4, 3), options=options)
    assert model.infer({"x": np.ones(1, np.float32)})["y"].tolist() == [-1.0]
    # The graph's own node counts too: F4 fits 766, the graph calling it does not.
    reason, message = _reason(
        onnx_models.nested_functions(4, 3), RuntimeOptions(max_graph_nodes=766)
    )
    assert reason == "MODEL_GRAPH_TOO_LARGE", message
    assert "the graph has more than 766 nodes" in message and "local.F4" in message, message
    # The default budget: 16 levels (2 ** 16 nodes run), refused at once (counting is linear in
    # the model's size), F_k counting 5 + 3 * F_(k-1): F9 = 68,888, F10 = 206,669.
    reason, message = _reason(onnx_models.nested_functions(16, 2), RuntimeOptions())
    assert reason == "MODEL_GRAPH_TOO_LARGE" and "local.F10 inlines" in message, message


def test_a_function_calling_itself_is_refused_as_without_end() -> None:
    reason, message = _reason(onnx_models.nested_functions(3, recursive=True), RuntimeOptions())
    assert reason == "MODEL_GRAPH_TOO_LARGE", message
    assert "calls itself (directly or through others)" in message, message


def test_the_node_budget_is_a_setting() -> None:
    assert InferenceConfig(model_store="s:1", key_broker="b:1").runtime.max_graph_nodes == 100_000
    config = InferenceConfig(model_store="s:1", key_broker="b:1", max_graph_nodes=500)
    assert config.runtime.max_graph_nodes == 500
    with pytest.raises(ConfigError, match="max_graph_nodes"):
        InferenceConfig(model_store="s:1", key_broker="b:1", max_graph_nodes=0)


@pytest.mark.parametrize("how", ["passed", "default", "through"])
def test_a_graph_passed_to_a_function_counts_once_for_each_copy_inlining_makes(how: str) -> None:
    """A function's graph attribute is copied wherever its body refers to it (``ref_attr_name``,
    here both branches of each ``If``): the count took it once, so a 44 KB model counted 1,004
    nodes (500 ``If`` nodes referring to a 500-node graph) inlined to 501,502, and ONNX Runtime
    had not loaded it after 5 minutes (1.4 GB). It is counted per copy now: passed in the call,
    left to the function's default, or passed on from another function's own attribute."""
    allowed = ("m",)  # the walk cannot read a default graph attribute's body (string check)
    options = RuntimeOptions(max_graph_nodes=1000, string_expansion_models=allowed)
    # 20 If nodes, both branches a 50-node graph: 2,000 nodes inlined.
    reason, message = _reason(onnx_models.graph_attribute_copies(20, 50, how), options)
    assert reason == "MODEL_GRAPH_TOO_LARGE", message
    assert "the graph has more than 1000 nodes" in message, message
    # 3 If nodes, 4-node graphs: 29 nodes inlined (the calls count one each, 30 or 31).
    fits = RuntimeOptions(max_graph_nodes=31, string_expansion_models=allowed)
    model = LoadedModel.from_bytes(
        "m", "1", onnx_models.graph_attribute_copies(3, 4, how), options=fits
    )
    assert model.infer({"x": np.ones(1, np.float32)})["y"].tolist() == [4.0]


@pytest.mark.parametrize(("declared", "called"), [("ai.onnx", ""), ("", "ai.onnx")])
def test_functions_are_counted_whichever_spelling_of_onnxs_domain_calls_them(
    declared: str, called: str
) -> None:
    """ONNX's inliner (the walk's) takes "ai.onnx" and "" for one domain: functions declared in
    one spelling and called in the other were counted as operators, one node a call, and then
    inlined by the walk, exponential in their depth (16 levels of functions named after ONNX
    operators: 1.5 s and 150 MB before the string check refused them, twice that a level)."""
    model = onnx_models.nested_functions(8, 3, domain=declared, call_domain=called)
    reason, message = _reason(model, RuntimeOptions(max_graph_nodes=1000))
    assert reason == "MODEL_GRAPH_TOO_LARGE", message
    assert "F5 inlines to more than 1000 nodes" in message, message
