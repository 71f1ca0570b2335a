"""OAEP hash negotiation (pure logic; the token probe is covered in test_hsm and test_release)."""

from __future__ import annotations

import pytest

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.oaep import PROBE_ORDER, OaepHash, check_accepted, negotiate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sha1", OaepHash.SHA1),
        ("SHA-256", OaepHash.SHA256),
        ("sha_384", OaepHash.SHA384),
        (" SHA512 ", OaepHash.SHA512),
    ],
)
def test_parse(text: str, expected: OaepHash) -> None:
    assert OaepHash.parse(text) is expected


@pytest.mark.parametrize("text", ["", "md5", "sha3-256", "sha-1-mgf1"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        OaepHash.parse(text)
    assert info.value.reason == "OAEP_MECHANISM_INVALID"


def test_caller_order_wins() -> None:
    both = [OaepHash.SHA1, OaepHash.SHA256]
    assert negotiate([OaepHash.SHA256, OaepHash.SHA1], both) is OaepHash.SHA256
    assert negotiate([OaepHash.SHA1, OaepHash.SHA256], both) is OaepHash.SHA1


def test_never_a_hash_the_caller_did_not_list() -> None:
    with pytest.raises(FailedPrecondition) as info:
        negotiate([OaepHash.SHA256, OaepHash.SHA384], [OaepHash.SHA1])
    assert info.value.reason == "OAEP_MECHANISM_UNSUPPORTED"
    assert "sha256, sha384" in info.value.message


def test_nothing_supported() -> None:
    with pytest.raises(FailedPrecondition) as info:
        negotiate([OaepHash.SHA1], [])
    assert "HSM supports [none]" in info.value.message


def test_check_accepted_deduplicates_keeping_order() -> None:
    assert check_accepted([OaepHash.SHA256, OaepHash.SHA1, OaepHash.SHA256]) == (
        OaepHash.SHA256,
        OaepHash.SHA1,
    )


def test_labels_and_sizes() -> None:
    assert OaepHash.SHA256.mechanism_label == "RSA-OAEP/SHA-256/MGF1-SHA-256"
    assert [h.digest_size for h in PROBE_ORDER] == [32, 48, 64, 20]


def test_mechanism_numbers_are_the_key_broker_apis() -> None:
    assert OaepHash.SHA1.mechanism == kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA1
    assert OaepHash.SHA256.mechanism == kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA256
    for number in kb_pb.WrapMechanism.values():
        name = kb_pb.WrapMechanism.Name(number)
        if name.startswith("WRAP_MECHANISM_RSA_OAEP_"):
            assert OaepHash.from_mechanism(number).mechanism == number
        else:
            with pytest.raises(InvalidArgument) as info:
                OaepHash.from_mechanism(number)
            assert info.value.reason == "OAEP_MECHANISM_INVALID"
    with pytest.raises(InvalidArgument):
        OaepHash.SHA384.mechanism  # noqa: B018  # no API number for SHA-384
