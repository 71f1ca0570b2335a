"""The chart's schema admits exactly the names the services accept.

A value the schema lets through but the service refuses fails at pod start instead of at
install; one it refuses but the service accepts cannot be configured at all (start-up models
under ``tenant/`` names, ``+build`` versions). So the grammars are the services' own.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from strongroom.errors import InvalidArgument
from strongroom.identifiers import (
    KEY_ID_PATTERN,
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    MODEL_NAME_PATTERN,
    MODEL_VERSION_PATTERN,
    is_name_rule,
)
from strongroom.spiffe import SpiffeId
from tests.deploy.conftest import CHART, schema_nodes

SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DEFINITIONS: dict[str, Any] = SCHEMA["definitions"]


def admits(definition: str, value: str) -> bool:
    """Whether the schema definition admits ``value`` (the pattern, maxLength, anyOf and $ref
    keywords the chart's string definitions use)."""
    return _admits(DEFINITIONS[definition], value)


def _admits(node: dict[str, Any], value: str) -> bool:
    if "$ref" in node:
        return admits(node["$ref"].removeprefix("#/definitions/"), value)
    if "anyOf" in node:
        return any(_admits(option, value) for option in node["anyOf"])
    return len(value) <= node.get("maxLength", len(value)) and bool(
        re.search(node["pattern"], value)
    )


def test_model_name_version_and_key_id_are_the_identifiers_grammar() -> None:
    assert DEFINITIONS["modelName"]["pattern"] == f"^{MODEL_NAME_PATTERN.pattern}$"
    assert DEFINITIONS["modelName"]["maxLength"] == MAX_NAME_LENGTH
    assert DEFINITIONS["modelVersion"]["pattern"] == f"^{MODEL_VERSION_PATTERN.pattern}$"
    assert DEFINITIONS["modelVersion"]["maxLength"] == MAX_VERSION_LENGTH
    assert DEFINITIONS["keyId"]["pattern"] == f"^{KEY_ID_PATTERN.pattern}$"
    policies = SCHEMA["properties"]["keybroker"]["properties"]["policies"]
    assert policies["propertyNames"]["pattern"] == f"^{KEY_ID_PATTERN.pattern}\\.yaml$"


RULES = [
    "fraud",
    "tenant-a/",
    "tenant-a/fraud",
    "a/b/c/",
    "/",
    "tenant-a//",
    "-x",
    "x/-y",
    "x" * MAX_NAME_LENGTH + "/",
    "x" * (MAX_NAME_LENGTH + 1),
    "",
]


@pytest.mark.parametrize("rule", RULES)
def test_model_name_rules_are_the_brokers(rule: str) -> None:
    assert admits("modelNameRule", rule) is is_name_rule(rule)


SPIFFE_IDS = [
    "spiffe://strongroom.internal/inference",
    "spiffe://strongroom.internal/ns/prod/sa/inference",
    "spiffe://strong_room.internal/x",
    "spiffe://strongroom.internal/.hidden",
    "spiffe://strongroom.internal/..x",
    "spiffe://strongroom.internal/...",
    "spiffe://strongroom.internal/a/./b",
    "spiffe://strongroom.internal/a/../b",
    "spiffe://strongroom.internal/..",
    "spiffe://strongroom.internal/a/",
    "spiffe://strongroom.internal/a//b",
    "spiffe://strongroom.internal/a~b",
    "spiffe://strongroom.internal/a%2Fb",
    "spiffe://strongroom.internal/a:b",
    "spiffe://Strongroom.internal/a",
    "spiffe://strongroom.internal:443/a",
    "spiffe://strongroom.internal",
    "spiffe://strongroom.internal/a?b",
    "https://strongroom.internal/a",
    "spiffe://strongroom.internal/" + "a" * 2030,
]


def parses(text: str) -> bool:
    try:
        return bool(SpiffeId.parse(text).path)
    except InvalidArgument:
        return False


@pytest.mark.parametrize("text", SPIFFE_IDS)
def test_spiffe_ids_are_the_services_grammar(text: str) -> None:
    assert admits("spiffeId", text) is parses(text)


def test_no_grammar_is_written_twice() -> None:
    """Model names, versions, key ids and SPIFFE IDs are named by ``$ref`` to the definitions
    above, never spelt again (a second spelling is how the chart's grammars came to drift)."""
    found = [
        f"{where}: {node['pattern']}"
        for where, node in schema_nodes(SCHEMA)
        if isinstance(node.get("pattern"), str)
        and ("spiffe://" in node["pattern"] or "[A-Za-z0-9][A-Za-z0-9._" in node["pattern"])
        and not where.startswith("#/definitions/")
    ]
    assert found == []
