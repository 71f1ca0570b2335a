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

from strongroom.inference.models import LoadedModel, ModelLoadError, RuntimeOptions
from strongroom.inference.models._graph import without_large_weights
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
