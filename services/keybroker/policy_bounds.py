"""Bounds on a release-policy document, checked before the document is parsed into objects.

A policy is a small document (a few allow-lists, a few dozen lines). An unbounded one is a way to
attack the broker: ``"[" * 50000`` makes PyYAML's composer recurse until ``RecursionError`` (and
its scanner is quadratic in the nesting depth). So the document is first read as a stream of
parser events, which PyYAML produces without recursion and on demand, and refused at the first
event beyond the bounds; only then is it loaded.
"""

from __future__ import annotations

import yaml

from strongroom.attestation.errors import PolicyInvalid

MAX_POLICY_BYTES = 64 * 1024
"""Largest policy document (UTF-8 bytes) SetReleasePolicy accepts or the broker loads."""

MAX_POLICY_DEPTH = 8
"""Deepest nesting of mappings and lists; a valid policy nests three deep (document, TEE
section, list of values)."""

MAX_POLICY_NODES = 4096
"""Most YAML nodes (scalars, mappings, lists, aliases) in one document."""

POLICY_TOO_LARGE = "POLICY_TOO_LARGE"
POLICY_TOO_DEEP = "POLICY_TOO_DEEP"


def check_policy_bounds(document: str) -> None:
    """Raises :class:`PolicyInvalid` (``POLICY_TOO_LARGE`` / ``POLICY_TOO_DEEP``) when ``document``
    exceeds the bounds; syntax errors are left to the policy loader, which names them."""
    size = len(document.encode("utf-8", errors="surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise PolicyInvalid(
            f"policy document is {size} bytes; the limit is {MAX_POLICY_BYTES}",
            reason=POLICY_TOO_LARGE,
        )
    depth = nodes = 0
    try:
        for event in yaml.parse(document, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_POLICY_NODES:
                    raise PolicyInvalid(
                        f"policy document has more than {MAX_POLICY_NODES} YAML nodes",
                        reason=POLICY_TOO_LARGE,
                    )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_POLICY_DEPTH:
                    raise PolicyInvalid(
                        f"policy document nests deeper than {MAX_POLICY_DEPTH} levels",
                        reason=POLICY_TOO_DEEP,
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return  # the loader reports the syntax error with its position
