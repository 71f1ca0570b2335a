"""The SoftHSM2 development helper: token layout, PIN handling, isolation between tokens."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import UserType

from strongroom.dev.softhsm import SoftHsmToken, init_softhsm_token
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.keybroker.hsm import Hsm
from strongroom.keybroker.keys import KeyManager
from strongroom.runtime.secrets import Secret
from tests.keybroker.helpers import SO_PIN, USER_PIN, make_config


def test_token_layout(softhsm_token: SoftHsmToken) -> None:
    directory = softhsm_token.directory
    assert softhsm_token.conf_path == directory / "softhsm2.conf"
    assert f"directories.tokendir = {directory / 'tokens'}" in softhsm_token.conf_path.read_text()
    assert softhsm_token.module_path.parent == directory
    assert softhsm_token.module_env == {"SOFTHSM2_CONF": str(softhsm_token.conf_path)}
    assert softhsm_token.token_store().parent == softhsm_token.tokens_dir
    # The configuration and the PINs stay out of this process's environment.
    assert os.environ.get("SOFTHSM2_CONF") != str(softhsm_token.conf_path)


def _token_labels_and_so_login(
    token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[list[str], UserType]:
    """Loads a private module copy directly (not through Hsm) and logs in as SO."""
    module = str(token.replica_module(name))
    monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf_path))
    lib = pkcs11.lib(module)
    try:
        labels = [slot.get_token().label for slot in lib.get_slots(token_present=True)]
        session = lib.get_token(token_label=token.label).open(rw=True, so_pin=SO_PIN.reveal_text())
        try:
            return labels, UserType(session.user_type)  # type: ignore[attr-defined]
        finally:
            session.close()
    finally:
        pkcs11.unload(module)


def test_so_pin_works(softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch) -> None:
    labels, user_type = _token_labels_and_so_login(softhsm_token, monkeypatch, "so")
    assert user_type == UserType.SO
    assert softhsm_token.label in labels


def test_two_tokens_in_one_process_are_independent(
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
    open_hsm: Callable[..., Hsm],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = init_softhsm_token(tmp_path / "other", label="other", pin=USER_PIN, so_pin=SO_PIN)
    first = KeyManager(open_hsm(make_config(softhsm_token)))
    second = KeyManager(open_hsm(make_config(other)))
    first.create_key("only-in-first")
    second.create_key("only-in-second")
    assert [k.key_id for k in first.list_keys()] == ["only-in-first"]
    assert [k.key_id for k in second.list_keys()] == ["only-in-second"]

    labels, _ = _token_labels_and_so_login(softhsm_token, monkeypatch, "probe")
    assert softhsm_token.label in labels
    assert "other" not in labels


def test_replica_module_sees_the_same_token(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm]
) -> None:
    a = KeyManager(open_hsm(make_config(softhsm_token)))
    b = KeyManager(open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b"))))
    a.create_key("shared")
    assert [k.key_id for k in b.list_keys()] == ["shared"]


@pytest.mark.parametrize("label", ["", " lead", "trail ", "x" * 33, "tab\there", "é"])
def test_invalid_labels_are_refused(tmp_path: Path, label: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        init_softhsm_token(tmp_path / "t", label=label, pin=USER_PIN, so_pin=SO_PIN)
    assert info.value.reason == "TOKEN_LABEL_INVALID"


@pytest.mark.parametrize("pin", [b"123", b"two\nlines", b"x" * 256])
def test_invalid_pins_are_refused(tmp_path: Path, pin: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        init_softhsm_token(tmp_path / "t", label="t", pin=Secret(pin), so_pin=SO_PIN)
    assert info.value.reason == "PIN_INVALID"
    assert pin.decode(errors="replace") not in str(info.value)


def test_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "something").write_text("x")
    with pytest.raises(FailedPrecondition) as info:
        init_softhsm_token(tmp_path / "t", label="t", pin=USER_PIN, so_pin=SO_PIN)
    assert info.value.reason == "SOFTHSM_DIR_NOT_EMPTY"


def test_missing_softhsm_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        init_softhsm_token(
            tmp_path / "t",
            label="t",
            pin=USER_PIN,
            so_pin=SO_PIN,
            system_module=tmp_path / "no-such-module.so",
        )
    assert info.value.reason == "SOFTHSM_NOT_INSTALLED"


def test_module_copy_is_a_separate_library_instance(softhsm_token: SoftHsmToken) -> None:
    # Loading the private copy does not touch the system module's state in this process.
    assert softhsm_token.module_path.resolve() != Path("/usr/lib/softhsm/libsofthsm2.so").resolve()
    assert str(softhsm_token.module_path) not in pkcs11._loaded
