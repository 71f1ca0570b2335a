"""``strongroom.jsonparse``: every way JSON fails to parse is a ValueError."""

from __future__ import annotations

import json

import pytest

from strongroom import jsonparse


def test_parses_what_json_parses() -> None:
    document = {"a": [1, 2.5, None, True, "x"], "b": {"c": "\u00e9"}}
    assert jsonparse.loads(json.dumps(document)) == document
    assert jsonparse.loads(json.dumps(document).encode()) == document


@pytest.mark.parametrize("data", [b"", b"{", b"[1,]", b"\xff", "NaN-ish"])
def test_malformed_json_is_a_value_error(data: bytes | str) -> None:
    with pytest.raises(ValueError):
        jsonparse.loads(data)


def test_nesting_past_the_recursion_limit_is_a_value_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):  # what json itself raises
        json.loads(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonparse.loads(deep)


@pytest.mark.parametrize(
    "data", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"1e400", b"[-1e400]", b'{"a": 1.5e999}']
)
def test_what_is_not_json_is_refused(data: bytes) -> None:
    """Python's parser accepts these, and its strict encoder (which the audit log's byte-for-byte
    check uses) then raises: a record holding one crashed `audit verify` instead of failing it."""
    json.loads(data)  # accepted by json itself
    with pytest.raises(ValueError):
        jsonparse.loads(data)
