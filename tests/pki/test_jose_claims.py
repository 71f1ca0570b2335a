"""Reading an enrolment token's claims: a malformed token is a ValueError, however it is malformed."""

from __future__ import annotations

import pytest

from strongroom.pki._jose import b64url, unverified_claims


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", b"[" * 100_000],
    ids=["garbage", "not-an-object", "nested-past-the-recursion-limit"],
)
def test_a_malformed_payload_is_a_value_error(payload: bytes) -> None:
    """The nested one raised RecursionError, which the enrolment's BAD_TOKEN check let through."""
    token = f"{b64url(b'{}')}.{b64url(payload)}.{b64url(b'sig')}"
    with pytest.raises(ValueError):
        unverified_claims(token)
