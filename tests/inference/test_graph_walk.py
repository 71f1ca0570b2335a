"""Both load-time checks of a model's graph are made on one walk of it (``models._graph``): the
operators whose kernels allocate outside the memory cap (``MODEL_OPERATOR_UNCAPPED``) and the
strings the cap does not bound (``MODEL_STRING_EXPANSION``). A model that trips both is refused
for its operators, whatever lets its strings through; the string check stops at its first
finding, the walk does not, so an operator after it is still found. Real ONNX Runtime sessions.
"""

from __future__ import annotations

import pytest

from strongroom.inference.models import LoadedModel, ModelLoadError, RuntimeOptions
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
