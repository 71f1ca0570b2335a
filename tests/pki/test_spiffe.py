"""SPIFFE ID parsing follows the SPIFFE-ID specification."""

from __future__ import annotations

import re

import pytest

from strongroom.pki import SpiffeId
from strongroom.spiffe import (
    IDENTITY_DNS_SUFFIX,
    MalformedSpiffeId,
    identity_dns_name,
    is_reserved_dns_name,
)


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


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("spiffe://my_td/x", True),  # '_' is valid in a trust domain (SPIFFE-ID spec)
        ("spiffe://td/../x", False),
        ("spiffe://td/./x", False),
        ("spiffe://td", False),  # a trust domain, not a workload
        ("spiffe://td/x/", False),
        ("spiffe://TD/x", False),
        ("spiffe://td/x\n", False),
    ],
)
def test_one_grammar_for_config_policy_and_certificates(text: str, ok: bool) -> None:
    """The service configuration, the release policy and the certificate check agree."""
    from strongroom.attestation.policy import ReleasePolicy
    from strongroom.errors import StrongroomError
    from strongroom.runtime.config import AuthzConfig
    from strongroom.spiffe import is_workload_id

    assert is_workload_id(text) == ok

    def accepted(build) -> bool:
        try:
            build()
        except (StrongroomError, ValueError):
            return False
        return True

    assert accepted(lambda: AuthzConfig(admin=(text,))) == ok
    policy = (
        "version: '1'\nallowed_spiffe_ids: [" + repr(text) + "]\ntee_types: [SEV_SNP]\n"
        "sev_snp: {measurements: ['" + "00" * 48 + "'], "
        "min_reported_tcb: {fmc: 0, bootloader: 0, tee: 0, snp: 0, microcode: 0}}\n"
    )
    assert accepted(lambda: ReleasePolicy.load(policy)) == ok


def test_the_derived_dns_name_is_one_valid_name_per_id() -> None:
    """Path segments differing only in case or in '_' / '-' get different names (DNS matching
    folds case), each a valid host name under the reserved suffix."""
    ids = [
        "spiffe://strongroom.test/keybroker",
        "spiffe://strongroom.test/KeyBroker",
        "spiffe://strongroom.test/key_broker",
        "spiffe://strongroom.test/key-broker",
        "spiffe://strongroom.test/keybroker/x",
        "spiffe://other.test/keybroker",
    ]
    names = [identity_dns_name(i) for i in ids]
    assert len({n.lower() for n in names}) == len(ids)
    for name in names:
        label, _, suffix = name.partition(".")
        assert suffix == IDENTITY_DNS_SUFFIX
        assert re.fullmatch(r"[a-z2-7]{52}", label)
        assert is_reserved_dns_name(name) and is_reserved_dns_name(name.upper() + ".")
    assert identity_dns_name(SpiffeId.parse(ids[0])) == names[0]  # pure: same ID, same name
    assert not is_reserved_dns_name("keybroker")
    assert not is_reserved_dns_name("xspiffe-id.strongroom.invalid")
    with pytest.raises(MalformedSpiffeId):
        identity_dns_name("spiffe://Strongroom.test/x")
