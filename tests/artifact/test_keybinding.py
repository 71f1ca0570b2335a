"""Format 3's body key: bound to one model name and version, derived from the slot key."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from strongroom.artifact.keybinding import LABEL, bind_data_key, binding_info, body_key
from strongroom.errors import FailedPrecondition, InvalidArgument

from .conftest import header_for

FORMATS = (1,)  # the module picks its formats per test


def _hkdf_expand(slot_key: bytes, name: str, version: str) -> bytes:
    """RFC 5869 HKDF-Expand as the cryptography package implements it (not the code under test)."""
    info = LABEL + len(name).to_bytes(2, "big") + name.encode()
    info += len(version).to_bytes(2, "big") + version.encode()
    return HKDFExpand(hashes.SHA256(), 32, info).derive(slot_key)


@pytest.mark.parametrize(
    ("name", "version"), [("acme/m", "1"), ("a", "b"), ("x" * 128, "v" * 64), ("a/b/c", "1.0+rc1")]
)
def test_the_body_key_is_hkdf_expand_of_the_slot_key_over_the_model(
    name: str, version: str
) -> None:
    for _ in range(8):
        slot_key = os.urandom(32)
        assert bind_data_key(bytearray(slot_key), name, version) == _hkdf_expand(
            slot_key, name, version
        )
        assert bind_data_key(slot_key, name, version) == _hkdf_expand(slot_key, name, version)


def test_the_derivation_is_pinned() -> None:
    """The worked example of ARTIFACT_FORMAT.md §10: readers written elsewhere must agree."""
    assert binding_info("acme/fraud-detector", "1.4.0") == (
        b"strongroom artifact body key v1\x00\x00\x13acme/fraud-detector\x00\x051.4.0"
    )
    key = bind_data_key(bytes(range(32)), "acme/fraud-detector", "1.4.0")
    assert key.hex() == _hkdf_expand(bytes(range(32)), "acme/fraud-detector", "1.4.0").hex()
    assert key.hex() == "8169b144221445e5a67a59e2fdb4c447c80f36efbec473d121d6e2a5bedcc686"


def test_every_name_and_version_gets_its_own_key() -> None:
    slot_key = os.urandom(32)
    models = [("ab", "c"), ("a", "bc"), ("acme/m", "1"), ("acme/m", "2"), ("acme/n", "1")]
    keys = {bytes(bind_data_key(slot_key, *m)) for m in models}
    assert len(keys) == len(models)
    assert slot_key not in keys


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_slot_key_of_another_size_is_refused(size: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        bind_data_key(bytearray(size), "acme/m", "1")
    assert info.value.reason == "DATA_KEY_INVALID"


@pytest.mark.parametrize(
    ("name", "version", "reason"),
    [
        ("", "1", "INVALID_MODEL_NAME"),
        ("/acme", "1", "INVALID_MODEL_NAME"),
        ("x" * 129, "1", "INVALID_MODEL_NAME"),
        ("acme/m", "", "INVALID_MODEL_VERSION"),
        ("acme/m", "v" * 65, "INVALID_MODEL_VERSION"),
        ("acme/m", "1\x00", "INVALID_MODEL_VERSION"),
    ],
)
def test_an_invalid_model_binds_nothing(name: str, version: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        bind_data_key(bytearray(32), name, version)
    assert info.value.reason == reason


def test_format_3_opens_under_the_derived_key_for_the_model_asked_for() -> None:
    header = header_for(10, format_version=3)
    slot_key = bytearray(os.urandom(32))
    key = body_key(header, slot_key, "acme/m", "1")
    assert key == bind_data_key(slot_key, "acme/m", "1")
    assert body_key(header, slot_key, "acme/m", "2") != key
    assert slot_key != key  # the slot key is not consumed


@pytest.mark.parametrize("version", [1, 2])
def test_an_unbound_format_is_refused_unless_accepted(version: int) -> None:
    header = header_for(10, format_version=version)
    slot_key = bytearray(os.urandom(32))
    with pytest.raises(FailedPrecondition) as info:
        body_key(header, slot_key, "acme/m", "1")
    assert info.value.reason == "ARTIFACT_KEY_UNBOUND"
    assert f"format-{version}" in info.value.message and "re-publish" in info.value.message
    copy = body_key(header, slot_key, "acme/m", "1", accept_unbound=True)
    assert copy == slot_key and copy is not slot_key
