"""Model-name rules and the reader's key pins (which KEK each model may be stored under)."""

from __future__ import annotations

import pytest

from strongroom.client.keypins import KeyPins
from strongroom.errors import FailedPrecondition
from strongroom.identifiers import is_name_rule, name_rule_matches


@pytest.mark.parametrize(
    ("rule", "valid"),
    [
        ("acme/m", True),
        ("acme/", True),
        ("a", True),
        ("x" * 128 + "/", True),
        ("", False),
        ("/", False),
        ("a//", False),
        ("/a", False),
        ("*", False),
        ("acme/*", False),
        ("x" * 129, False),
        (None, False),
        (["a"], False),
    ],
)
def test_a_name_rule_is_a_name_or_a_name_and_a_slash(rule: object, valid: bool) -> None:
    assert is_name_rule(rule) is valid


@pytest.mark.parametrize(
    ("rule", "name", "matches"),
    [
        ("tenant-a/", "tenant-a/m", True),
        ("tenant-a/", "tenant-a/x/m", True),
        ("tenant-a/", "tenant-a", False),
        ("tenant-a/", "tenant-ab/m", False),
        ("tenant-a/m", "tenant-a/m", True),
        ("tenant-a/m", "tenant-a/m2", False),
        ("tenant-a/m", "tenant-a/m/x", False),
    ],
)
def test_a_rule_covers_its_name_or_what_is_under_it(rule: str, name: str, matches: bool) -> None:
    assert name_rule_matches(rule, name) is matches


def test_no_pins_accept_any_key() -> None:
    KeyPins().check("any/model", "1", "any-key")
    assert KeyPins().keys_for("any/model") is None


def test_pins_accept_only_the_keys_of_the_rules_covering_the_name() -> None:
    pins = KeyPins((("tenant-a/", "kek-a"), ("tenant-a/shared", "kek-s"), ("tenant-b/", "kek-b")))
    assert pins.keys_for("tenant-a/shared") == {"kek-a", "kek-s"}
    pins.check("tenant-a/m", "1", "kek-a")
    pins.check("tenant-a/shared", "1", "kek-s")
    for name, key, shown in [
        ("tenant-a/m", "kek-b", "kek-a"),
        ("tenant-c/m", "kek-a", "no key"),
    ]:
        with pytest.raises(FailedPrecondition) as info:
            pins.check(name, "1", key)
        assert info.value.reason == "MODEL_KEY_NOT_ALLOWED"
        assert f"{name}/1 is stored under key {key!r}" in info.value.message
        assert shown in info.value.message
