"""JSON from bytes this process did not just write, with every parse failure a ``ValueError``.

``json.loads`` raises ``RecursionError``, not a ``ValueError``, for nesting past the interpreter's
recursion limit, and how deep that is depends on the caller's own stack: a 768-byte page token of
``[`` parses to a clean ``JSONDecodeError`` from a shallow call and raises ``RecursionError`` 250
frames deeper. Parsers of stored or received bytes that catch ``ValueError`` alone let it escape as
an untyped error. Parse them with :func:`loads`. Re-encoding a parsed value (``json.dumps``) can
still raise ``RecursionError`` near the limit; callers that do so name it themselves.

``NaN``, ``Infinity`` and numbers too large for a float (``1e400``) are refused: they are not JSON
(RFC 8259), and Python accepts them only to produce values its strict encoders then refuse, so a
parsed document could not be re-encoded or compared byte for byte.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["loads"]


def loads(data: str | bytes | bytearray) -> Any:
    """``json.loads(data)``; ``ValueError`` for anything that does not parse, deep nesting too."""
    try:
        return json.loads(data, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value
