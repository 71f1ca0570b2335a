"""The release's typed values: ``ReleaseTarget`` and ``WrappedDataKey`` are checked once, with the
same reasons and messages as the checks they replace, and the HSM layer takes them as they are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from strongroom.errors import InvalidArgument
from strongroom.keybroker import ephemeral as ephemeral_module
from strongroom.keybroker.ephemeral import ReleaseTarget, parse_ephemeral_public_key
from strongroom.keybroker.keys import WRAPPED_DEK_BYTES, KeyManager, WrappedDataKey
from strongroom.oaep import OaepHash, check_accepted
from tests.keybroker.helpers import MODEL, spki

RSA_3072 = rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _ec_spki() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _error(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as info:
        call()
    return info.value.reason, info.value.message


def test_parse_keeps_the_key_and_the_callers_order_without_duplicates() -> None:
    der = spki(RSA_3072)
    target = ReleaseTarget.parse(der, [OaepHash.SHA256, OaepHash.SHA1, OaepHash.SHA256])
    assert target.public_key == parse_ephemeral_public_key(der)
    assert target.mechanisms == (OaepHash.SHA256, OaepHash.SHA1)
    assert ReleaseTarget.parse(target.public_key, [OaepHash.SHA1]).public_key is target.public_key


@pytest.mark.parametrize(
    "der",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x30" * 2000, id="oversized"),
        pytest.param(b"not der", id="garbage"),
        pytest.param(spki(RSA_3072) + b"\x00", id="trailing-byte"),
        pytest.param(_ec_spki(), id="ec"),
        pytest.param(spki(rsa.generate_private_key(65537, 2048)), id="rsa-2048"),
        pytest.param("text", id="not-bytes"),
    ],
)
def test_key_errors_are_those_of_the_key_parser(der: Any) -> None:
    expected = _error(lambda: parse_ephemeral_public_key(der))
    assert _error(lambda: ReleaseTarget.parse(der, [OaepHash.SHA1])) == expected
    assert expected[0] in ("EPHEMERAL_KEY_INVALID", "EPHEMERAL_KEY_UNSUPPORTED")


@pytest.mark.parametrize(
    "accepted", [pytest.param([], id="none"), pytest.param([1], id="not-a-hash")]
)
def test_mechanism_errors_are_those_of_check_accepted(accepted: list[Any]) -> None:
    expected = _error(lambda: check_accepted(accepted))
    assert _error(lambda: ReleaseTarget.parse(spki(RSA_3072), accepted)) == expected
    assert expected[0] == "OAEP_MECHANISM_INVALID"


def test_a_bad_key_is_reported_before_bad_mechanisms() -> None:
    reason, _ = _error(lambda: ReleaseTarget.parse(b"", []))
    assert reason == "EPHEMERAL_KEY_INVALID"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"x", f"a wrapped data key is {WRAPPED_DEK_BYTES} bytes, got 1"),
        (b"x" * 41, f"a wrapped data key is {WRAPPED_DEK_BYTES} bytes, got 41"),
        ("x" * 40, "a wrapped data key is bytes"),
        (None, "a wrapped data key is bytes"),
    ],
)
def test_wrapped_data_key_refuses_anything_but_its_one_length(raw: Any, message: str) -> None:
    assert _error(lambda: WrappedDataKey(raw)) == ("WRAPPED_KEY_INVALID", message)


def test_wrapped_data_key_is_its_bytes() -> None:
    blob = bytes(range(40))
    for raw in (blob, bytearray(blob), memoryview(blob)):
        wrapped = WrappedDataKey(raw)
        assert wrapped == blob and isinstance(wrapped, bytes)
    assert WrappedDataKey(wrapped) is wrapped
    assert blob.hex() not in repr(wrapped)


def test_the_hsm_layer_takes_typed_values_without_parsing_again(
    km: KeyManager, tee_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    km.create_key("typed")
    data_key = km.generate_data_key("typed", *MODEL)
    target = ReleaseTarget.parse(spki(tee_key), [OaepHash.SHA256, OaepHash.SHA1])
    wrapped = WrappedDataKey(data_key.wrapped)

    def no_second_parse(_der: object) -> Any:
        raise AssertionError("the ephemeral key was parsed again")

    monkeypatch.setattr(ephemeral_module, "parse_ephemeral_public_key", no_second_parse)
    out, mechanism = km.release_to_ephemeral("typed", data_key.version, wrapped, target)
    assert mechanism is OaepHash.SHA1  # SoftHSM2 wraps with OAEP/SHA-1 only
    assert len(out) == len(target.public_key.modulus)
    with pytest.raises(TypeError):
        km.release_to_ephemeral("typed", data_key.version, wrapped, target, [OaepHash.SHA1])
