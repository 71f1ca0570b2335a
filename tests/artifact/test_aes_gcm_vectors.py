"""Wycheproof AES-GCM vectors against the primitive the body uses (cryptography's AESGCM).

The body only ever calls ``encrypt_into``/``decrypt_into`` with a 12-byte nonce, a 16-byte tag and no
AAD; those calls are checked against every 96-bit-IV vector, for every key size. Vectors with other
IV lengths go through the one-shot API: each must give Wycheproof's result, except the IV lengths
the library refuses outright (below 8 bytes, or above 128), which must be refused with ValueError
(none of them is a length this project can produce).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import DATA

PATH = DATA / "wycheproof" / "aes_gcm_test.json"

FORMATS = (1,)
"""Independent of the container format: run once."""


def _cases() -> list[Any]:
    data = json.loads(PATH.read_text())
    return [
        pytest.param(group, test, id=str(test["tcId"]))
        for group in data["testGroups"]
        for test in group["tests"]
    ]


CASES = _cases()


def test_all_vectors_present() -> None:
    assert len(CASES) == json.loads(PATH.read_text())["numberOfTests"] == 316


@pytest.mark.parametrize(("group", "test"), CASES)
def test_aes_gcm_vector(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, iv = bytes.fromhex(test["key"]), bytes.fromhex(test["iv"])
    aad, msg = bytes.fromhex(test["aad"]), bytes.fromhex(test["msg"])
    ct, tag = bytes.fromhex(test["ct"]), bytes.fromhex(test["tag"])
    assert group["tagSize"] == 128
    aead = AESGCM(key)
    if not 8 <= len(iv) <= 128:
        with pytest.raises(ValueError):
            aead.decrypt(iv, ct + tag, aad or None)
        return
    if len(iv) == 12:
        # The exact call pattern of the body: preallocated buffers.
        out = bytearray(len(ct))
        if test["result"] == "valid":
            aead.decrypt_into(iv, ct + tag, aad or None, out)
            assert out == msg
            sealed = bytearray(len(msg) + 16)
            aead.encrypt_into(iv, msg, aad or None, sealed)
            assert sealed == ct + tag
        else:
            with pytest.raises(InvalidTag):
                aead.decrypt_into(iv, ct + tag, aad or None, out)
        return
    if test["result"] == "valid":
        assert aead.decrypt(iv, ct + tag, aad or None) == msg
        assert aead.encrypt(iv, msg, aad or None) == ct + tag
    else:
        with pytest.raises(InvalidTag):
            aead.decrypt(iv, ct + tag, aad or None)
