"""No unary request is parsed before its caller is authorised and admitted, on every service.

gRPC calls a handler's ``request_deserializer`` on a unary request before any interceptor runs:
the key broker and the model store parsed every request (up to their message limit) of any holder
of a certificate of the CA, role or not, and of a caller over its cap on unary calls. The runtime
now parses it after the authoriser and the admission, inside the error mapping. Real step-ca, real
mTLS, the real services as ``serve`` builds them; parses are counted at the services' own
deserialisers (:mod:`tests.e2e.parsecount`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.dev.devstack import DevStack
from strongroom.pki import WorkloadIdentity
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.wire import append_bytes_field
from tests.conftest import stack_root
from tests.e2e.parsecount import ParseCount, counting_parses

RELEASE_KEY = "/strongroom.api.keybroker.v1.KeyBrokerService/ReleaseKey"
GENERATE_DATA_KEY = "/strongroom.api.keybroker.v1.KeyBrokerService/GenerateDataKey"
STAT_MODEL = "/strongroom.api.modelstore.v1.ModelStoreService/StatModel"
GET_MODEL = "/strongroom.api.modelstore.v1.ModelStoreService/GetModel"
MODEL_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# method -> (service, the identity whose role may call it, the message's type)
METHODS = {
    RELEASE_KEY: ("keybroker", "inference", "strongroom.api.keybroker.v1.ReleaseKeyRequest"),
    GENERATE_DATA_KEY: (
        "keybroker",
        "publisher",
        "strongroom.api.keybroker.v1.GenerateDataKeyRequest",
    ),
    STAT_MODEL: ("modelstore", "inference", "strongroom.api.modelstore.v1.StatModelRequest"),
    GET_MODEL: ("modelstore", "inference", "strongroom.api.modelstore.v1.GetModelRequest"),
    MODEL_METADATA: ("inference", "client", "inference.ModelMetadataRequest"),
    MODEL_INFER: ("inference", "client", "inference.ModelInferRequest"),
}
UNARY = [m for m in METHODS if m != GET_MODEL]

MALFORMED = b"\x0a\x02\xff\xfe"  # field 1, a proto3 string (or a message), that does not decode
LARGE = append_bytes_field(b"", 15, bytes(200 << 10))  # 200 KiB: within every service's limit


@pytest.fixture(scope="module")
def served(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[tuple[DevStack, ParseCount]]:
    """The key broker, the model store and the inference service, each admitting one unary call
    per caller at once, their request parses counted."""
    root = stack_root(tmp_path_factory, "parse", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev, counting_parses() as count:
        server = {"max_unary_calls_per_identity": 1}
        for service in ("keybroker", "modelstore", "inference"):
            dev.start_in_process(service, server=server)
        yield dev, count


@pytest.fixture(scope="module")
def callers(served: tuple[DevStack, ParseCount]) -> dict[str, WorkloadIdentity]:
    stack, _ = served
    return {
        **{name: stack.identity(name) for name in ("inference", "publisher", "client")},
        "no-role": stack.foreign_identity(stack.spiffe_id("no-role")),
    }


def _send(stack: DevStack, identity: WorkloadIdentity, method: str, body: bytes) -> Any:
    """``method`` called with ``body`` sent as it is; a stream's responses all read."""
    channel = stack.channel(identity, METHODS[method][0])
    if method == GET_MODEL:
        return list(channel.unary_stream(method, None, None)(body, timeout=30))
    return channel.unary_unary(method, None, None)(body, timeout=30)


def _refusal(call: Any) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), dict(err.trailing_metadata() or ()).get(REASON_TRAILER), err.details()


def _audit(stack: DevStack) -> list[dict[str, Any]]:
    path = stack.root / "state" / "keybroker" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_caller_without_the_role_has_no_request_parsed(
    served: tuple[DevStack, ParseCount], callers: dict[str, WorkloadIdentity], method: str
) -> None:
    """A certificate of the CA with no role had each of its unary requests parsed (garbage or
    200 KiB) before the authoriser refused it; it is refused unparsed now."""
    stack, count = served
    before = count.parsed[method]
    for body in (MALFORMED, LARGE):
        code, reason, _ = _refusal(lambda: _send(stack, callers["no-role"], method, body))  # noqa: B023
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PEER_NOT_ALLOWED")
    assert count.parsed[method] == before


@pytest.mark.parametrize("method", UNARY)
def test_a_caller_over_its_cap_has_no_request_parsed(
    served: tuple[DevStack, ParseCount], callers: dict[str, WorkloadIdentity], method: str
) -> None:
    """A caller holding its one unary call had its next requests parsed before the cap refused
    them; they are refused unparsed now (the held call's own request is parsed once, admitted)."""
    stack, count = served
    caller = callers[METHODS[method][1]]
    before = count.parsed[method]
    channel = stack.channel(caller, METHODS[method][0])
    with count.hold(method):
        held = channel.unary_unary(method, None, None).future(b"", timeout=60)
        assert count.entered.acquire(timeout=30)
        for body in (MALFORMED, LARGE):
            code, reason, _ = _refusal(lambda: _send(stack, caller, method, body))  # noqa: B023
            assert (code, reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_UNARY_CALLS_PER_IDENTITY",
            )
        assert count.parsed[method] == before + 1
    try:
        held.result(timeout=30)
    except grpc.RpcError as exc:  # an empty request: the service's own answer, whatever it is
        assert exc.code() != grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_callers_malformed_request_is_parsed_once_and_refused(
    served: tuple[DevStack, ParseCount],
    callers: dict[str, WorkloadIdentity],
    method: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller with the role still gets INVALID_ARGUMENT MALFORMED_REQUEST, whose message now
    names the message type it does not decode as (and its size), with one WARNING naming the
    method and the peer (ModelInfer's wire check answered in its own words, and logged neither);
    a refused ReleaseKey is audited as before, naming the caller and nothing of the request."""
    stack, count = served
    _, role, message_type = METHODS[method]
    before = count.parsed[method]
    audited = len(_audit(stack))
    with caplog.at_level(logging.WARNING):
        code, reason, details = _refusal(lambda: _send(stack, callers[role], method, MALFORMED))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert details == (
        f"MALFORMED_REQUEST: {method}: the request message is not a valid protobuf "
        f"encoding of {message_type} ({len(MALFORMED)} bytes)"
    )
    logged = [r for r in caplog.records if getattr(r, "method", None) == method]
    assert [(r.getMessage(), r.levelno) for r in logged] == [("malformed request", logging.WARNING)]
    assert getattr(logged[0], "peer", "").startswith("ipv4:127.0.0.1:")
    assert count.parsed[method] == before + 1
    added = _audit(stack)[audited:]
    if method != RELEASE_KEY:
        assert added == []
        return
    assert [(r["decision"], r["reason"]) for r in added] == [("denied", "MALFORMED_REQUEST")]
    assert added[0]["caller"]["spiffe_id"] == stack.spiffe_id("inference")
    assert added[0]["key"]["id"] is None
