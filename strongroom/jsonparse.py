"""JSON from bytes this process did not just write, with every parse failure a ``ValueError``.

``json.loads`` raises ``RecursionError``, not a ``ValueError``, for nesting past the interpreter's
recursion limit, and how deep that is depends on the caller's own stack: a 768-byte page token of
``[`` parses to a clean ``JSONDecodeError`` from a shallow call and raises ``RecursionError`` 250
frames deeper. Parsers of stored or received bytes that catch ``ValueError`` alone let it escape as
an untyped error. Parse them with :func:`loads`. Re-encoding a parsed value (``json.dumps``) can
still raise ``RecursionError`` near the limit; callers that do so name it themselves.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def loads(data: str | bytes | bytearray) -> Any:
    """``json.loads(data)``; ``ValueError`` for anything that does not parse, deep nesting too."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
