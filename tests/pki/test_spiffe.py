"""SPIFFE ID parsing follows the SPIFFE-ID specification."""

from __future__ import annotations

import pytest

from strongroom.pki import SpiffeId
from strongroom.pki.errors import MalformedSpiffeId


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://strongroom.test/keybroker", "strongroom.test", "/keybroker"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://a-b_c.1/ns/prod/sa/x.y-z_1", "a-b_c.1", "/ns/prod/sa/x.y-z_1"),
    ],
)
def test_valid_ids(text: str, trust_domain: str, path: str) -> None:
    parsed = SpiffeId.parse(text)
    assert (parsed.trust_domain, parsed.path) == (trust_domain, path)
    assert str(parsed) == text
    assert SpiffeId.of(trust_domain, *[s for s in path.split("/") if s]) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "https://strongroom.test/x",
        "SPIFFE://strongroom.test/x",
        "spiffe://",
        "spiffe:///x",
        "spiffe://Strongroom.test/x",
        "spiffe://strongroom.test:8443/x",
        "spiffe://user@strongroom.test/x",
        "spiffe://strongroom.test/",
        "spiffe://strongroom.test//x",
        "spiffe://strongroom.test/x/",
        "spiffe://strongroom.test/./x",
        "spiffe://strongroom.test/x/..",
        "spiffe://strongroom.test/x?y=1",
        "spiffe://strongroom.test/x#f",
        "spiffe://strongroom.test/x%20y",
        "spiffe://strongroom.test/" + "a" * 2048,
    ],
)
def test_malformed_ids_are_rejected(text: str) -> None:
    with pytest.raises(MalformedSpiffeId):
        SpiffeId.parse(text)


def test_membership() -> None:
    assert SpiffeId.parse("spiffe://a.test/x").member_of("a.test")
    assert not SpiffeId.parse("spiffe://a.test/x").member_of("b.test")
