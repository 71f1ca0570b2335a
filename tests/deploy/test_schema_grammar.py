"""The chart's schema admits exactly the names and bounds the services accept.

A value the schema lets through but the service refuses fails at pod start instead of at
install; one it refuses but the service accepts cannot be configured at all (start-up models
under ``tenant/`` names, ``+build`` versions). So the grammars are the services' own, and the
numeric bounds the schema repeats are checked against the service's own validation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
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
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.runtime.config import ConfigError
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


BROKER = KeybrokerConfig(
    pkcs11_module=Path("/usr/lib/softhsm/libsofthsm2.so"),
    token_label="strongroom",
    audit_log=Path("/var/lib/strongroom/audit.log"),
    policies_dir=Path("/var/lib/strongroom/policies"),
)
BROKER_SCHEMA: dict[str, Any] = SCHEMA["properties"]["keybroker"]["properties"]
#: (values path, its schema node, the broker's setting), for each bound the schema repeats
BOUNDS = [
    *(
        (
            f"keybroker.releaseBudget.{scope}.{part}",
            DEFINITIONS[f"releaseBudget{part.title()}"],
            f"release_budget_{scope}_{part}",
        )
        for scope in ("certificate", "identity")
        for part in ("burst", "rate")
    ),
    (
        "keybroker.hsm.recycleAfterOperations",
        BROKER_SCHEMA["hsm"]["properties"]["recycleAfterOperations"],
        "hsm_recycle_after_operations",
    ),
]


def broker_accepts(setting: str, value: float) -> bool:
    """Whether the broker's configuration accepts ``setting`` = ``value``."""
    try:
        changes: dict[str, Any] = {setting: value}
        dataclasses.replace(BROKER, **changes)
    except ConfigError:
        return False
    return True


def edges(node: dict[str, Any]) -> list[tuple[float, bool]]:
    """The values at and just past a numeric schema node's bounds (the next integer, or float),
    each with whether the schema admits it."""
    integer = node["type"] == "integer"

    def above(x: float) -> float:
        return x + 1 if integer else math.nextafter(x, math.inf)

    def below(x: float) -> float:
        return x - 1 if integer else math.nextafter(x, -math.inf)

    found = [(node["maximum"], True), (above(node["maximum"]), False)]
    if "minimum" in node:
        found += [(node["minimum"], True), (below(node["minimum"]), False)]
    if "exclusiveMinimum" in node:
        low = node["exclusiveMinimum"]
        found += [(low, False), (above(low), True)]
    return found


@pytest.mark.parametrize(("where", "node", "setting"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_numeric_bounds_are_the_brokers(where: str, node: dict[str, Any], setting: str) -> None:
    """The schema's bounds on the broker's limits admit exactly what the broker accepts: they
    are written twice (the schema cannot import Python), and agreed only by hand."""
    disagree = [
        f"{where}={value!r}: schema {'admits' if admitted else 'refuses'}, broker "
        f"{'accepts' if broker_accepts(setting, value) else 'refuses'}"
        for value, admitted in edges(node)
        if broker_accepts(setting, value) is not admitted
    ]
    assert disagree == []
