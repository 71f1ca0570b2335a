"""The mesh under abuse by certified clients: a legitimate client keeps calling with 0 failures
while each abusive request gets a precise status (issue 11).

Each scenario runs against a real key broker and model store over mutual TLS, with certificates
the stack's step-ca issued; everything is on loopback and bounded.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import grpc
import pytest

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.dev.devstack import DevStack
from strongroom.keybroker.policy_bounds import MAX_POLICY_BYTES
from strongroom.keybroker.service import MESSAGE_LIMITS
from strongroom.runtime.config import ServerConfig
from tests.abuse.traffic import (
    ADMIN,
    BROKER,
    IDLE_TIMEOUT,
    KEY_ID,
    MALFORMED,
    STORE,
    Identities,
    LegitClient,
    nested_yaml,
    outcome,
    oversized_unary,
    stalled_uploads,
    watch_streams,
)

PER_IDENTITY = ServerConfig().max_streams_per_identity


def test_200_watch_streams_starve_nobody(stack: DevStack, who: Identities) -> None:
    with LegitClient(stack, who.legit) as legit:
        _calls, finish = watch_streams(stack, [who.foreign, who.nobody], 200)
        time.sleep(0.5)
        legit.run(rounds=10)  # while every stream is open
        outcomes = finish()
    assert legit.failures == []
    assert len(legit.latencies) >= 30
    # Both attackers are role-less (a foreign trust domain, an ID no rule names): per service
    # they share one bucket of PER_IDENTITY streams, and while a few of their Watches wait for
    # the message (the role-less callers' cap) the others are refused; the rest at once too.
    assert sum(outcomes.values()) == 200
    assert 2 <= outcomes[("OPEN", None)] <= 2 * PER_IDENTITY
    assert set(outcomes) <= {
        ("OPEN", None),
        ("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_IDENTITY"),
        ("RESOURCE_EXHAUSTED", "ROLELESS_CALLERS_BUSY"),
    }


def test_64_stalled_uploads_are_refused_or_timed_out_and_leave_nothing(
    stack: DevStack, who: Identities
) -> None:
    tmp = stack.root / "state" / "modelstore" / "data" / "tmp"
    with LegitClient(stack, who.legit) as legit:
        futures, stop = stalled_uploads(stack, who.publisher, 64)
        try:
            deadline = time.monotonic() + IDLE_TIMEOUT + 30
            for future in futures:
                future.exception(max(0.1, deadline - time.monotonic()))
        finally:
            stop.set()
        legit.run(rounds=5)
    outcomes = Counter(outcome(f.exception()) for f in futures)
    assert outcomes == Counter(
        {
            ("RESOURCE_EXHAUSTED", "TOO_MANY_STREAMS_PER_IDENTITY"): 64 - PER_IDENTITY,
            ("RESOURCE_EXHAUSTED", "STREAM_IDLE_TIMEOUT"): PER_IDENTITY,
        }
    )
    assert legit.failures == []
    assert list(tmp.iterdir()) == []  # the partial uploads were removed


def test_32_oversized_unary_requests_are_refused_before_any_handler(
    stack: DevStack, who: Identities
) -> None:
    size = 4 * MESSAGE_LIMITS.receive  # far beyond the broker's largest message
    with LegitClient(stack, who.legit) as legit:
        futures = oversized_unary(stack, who.nobody, 32, size)
        errors = [f.exception(60) for f in futures]
        legit.run(rounds=5)
    assert legit.failures == []
    for error in errors:
        assert isinstance(error, grpc.RpcError)
        # The authoriser refuses the caller before its request is read, or gRPC refuses the
        # message while receiving it, whichever comes first: no service code read it.
        if error.code() == grpc.StatusCode.PERMISSION_DENIED:
            assert "may not call" in error.details()
        else:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in error.details()


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
@pytest.mark.parametrize(
    ("service", "method", "role"),
    [
        ("keybroker", f"/{BROKER}/GetChallenge", "legit"),
        ("keybroker", f"/{ADMIN}/SetReleasePolicy", "admin"),
        ("modelstore", f"/{STORE}/StatModel", "admin"),
        ("modelstore", f"/{STORE}/PutModel", "publisher"),
    ],
)
def test_malformed_requests_get_invalid_argument_with_a_reason_and_no_traceback(
    stack: DevStack,
    who: Identities,
    caplog: pytest.LogCaptureFixture,
    service: str,
    method: str,
    role: str,
    body: bytes,
) -> None:
    channel = stack.channel(getattr(who, role), service)
    caplog.set_level(logging.INFO)
    with LegitClient(stack, who.legit) as legit:
        if method.endswith("/PutModel"):
            # PutModelRequest's field 1 is bytes; its string field is 3.
            body = b"\x1a" + body[1:] if body.startswith(b"\x0a") else body
            call = channel.stream_unary(method, None, None)
            with pytest.raises(grpc.RpcError) as raised:
                call(iter([body]), timeout=30)
        else:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(method, None, None)(body, timeout=30)
        legit.run(rounds=2)
    assert outcome(raised.value) == ("INVALID_ARGUMENT", "MALFORMED_REQUEST")
    assert legit.failures == []
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    warnings = [r for r in caplog.records if r.getMessage() == "malformed request"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].__dict__["method"] == method
    assert warnings[0].__dict__["peer"]


def test_malformed_request_from_a_refused_identity_is_refused_first(
    stack: DevStack, who: Identities
) -> None:
    channel = stack.channel(who.nobody, "keybroker")
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(f"/{ADMIN}/SetReleasePolicy", None, None)(
            MALFORMED["garbage"], timeout=30
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (nested_yaml(50_000), "POLICY_TOO_LARGE"),  # the document: 100,000 bytes
        (nested_yaml(20_000), "POLICY_TOO_DEEP"),  # 40,000 bytes, within the size bound
        ("version: '1'\ndescription: '" + "x" * MAX_POLICY_BYTES + "'\n", "POLICY_TOO_LARGE"),
        ("a: " + "{b: " * 9 + "c" + "}" * 9, "POLICY_TOO_DEEP"),
    ],
    ids=["brackets-50000", "brackets-20000", "long", "ten-mappings"],
)
def test_nested_or_huge_policy_documents_are_refused_with_a_reason(
    stack: DevStack,
    who: Identities,
    caplog: pytest.LogCaptureFixture,
    document: str,
    reason: str,
) -> None:
    admin = kb_grpc.KeyAdminServiceStub(stack.channel(who.admin, "keybroker"))
    caplog.set_level(logging.INFO)
    with LegitClient(stack, who.legit) as legit:
        with pytest.raises(grpc.RpcError) as raised:
            admin.SetReleasePolicy(
                kb.SetReleasePolicyRequest(key_id=KEY_ID, policy_document=document), timeout=30
            )
        legit.run(rounds=2)
    assert outcome(raised.value) == ("INVALID_ARGUMENT", reason)
    assert legit.failures == []
    assert not [r for r in caplog.records if r.exc_info]
    # The key keeps its policy.
    kept = admin.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id=KEY_ID), timeout=30)
    assert kept.policy_version == "1"


def test_a_policy_for_a_foreign_trust_domain_is_refused_over_the_api(
    stack: DevStack, who: Identities
) -> None:
    admin = kb_grpc.KeyAdminServiceStub(stack.channel(who.admin, "keybroker"))
    document = stack.simulated_policy("2").replace(
        stack.spiffe_id("inference"), "spiffe://evil.example/inference"
    )
    with pytest.raises(grpc.RpcError) as raised:
        admin.SetReleasePolicy(
            kb.SetReleasePolicyRequest(key_id=KEY_ID, policy_document=document), timeout=30
        )
    assert outcome(raised.value) == ("INVALID_ARGUMENT", "POLICY_FOREIGN_TRUST_DOMAIN")
