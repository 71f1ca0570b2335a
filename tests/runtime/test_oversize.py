"""A request message over its service's limit, refused for what it is, over real gRPC.

gRPC enforced the limit itself: it failed the call toward the client with RESOURCE_EXHAUSTED, and
the handler saw its request stream end as if the client had cancelled (a bare ``grpc.RpcError``,
the call no longer active), so the log (and the key broker's audit) said CANCELLED. gRPC's limit
is now a cap above the service's (:attr:`MessageLimits.receive_cap`) and the runtime refuses a
message over the service's own limit RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE, unparsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.server import (
    RECEIVE_CAP_MARGIN,
    MessageLimits,
    ServiceHost,
    ServiceSpec,
)

SERVICE = "test.Sizes"
LIMIT = 64 * 1024


def _identity(data: bytes) -> bytes:
    return data


class _Parsed:
    """Counts the parses of the service's own deserialiser: none for a message refused unparsed."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, data: bytes) -> bytes:
        self.sizes.append(len(data))
        return data


@pytest.fixture
def sized() -> Iterator[tuple[grpc.Channel, _Parsed, list[tuple[str, str]]]]:
    """A host whose receive limit is :data:`LIMIT`, with a unary method and an upload."""
    parsed = _Parsed()
    observed: list[tuple[str, str]] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"%d" % len(request)

    def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"%d" % sum(len(r) for r in requests)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, parsed, _identity),
            "Upload": grpc.stream_unary_rpc_method_handler(upload, parsed, _identity),
        },
    )
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[ServiceSpec(SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))],
        refusal_observers={
            f"/{SERVICE}/Unary": lambda exc, _ctx, _bucket: observed.append(
                (exc.status_name, exc.reason)
            )
        },
        message_limits=MessageLimits(receive=LIMIT, send=LIMIT),
    )
    host.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{host.port}", options=[("grpc.max_send_message_length", -1)]
    )
    try:
        yield channel, parsed, observed
    finally:
        channel.close()
        host.stop(0)


def _refusal(call: Any) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), dict(err.trailing_metadata() or ()).get(REASON_TRAILER), err.details()


def test_the_cap_is_a_margin_above_the_limit() -> None:
    limits = MessageLimits(receive=256 * 1024, send=1024)
    assert limits.receive_cap == 256 * 1024 + RECEIVE_CAP_MARGIN == 320 * 1024
    assert MessageLimits(receive=2**31 - 1, send=1024).receive_cap == 2**31 - 1


def test_a_unary_message_over_the_limit_is_refused_as_too_large_unparsed_and_observed(
    sized: tuple[grpc.Channel, _Parsed, list[tuple[str, str]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One byte over: RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE naming the size and the limit, one
    WARNING (method, peer, size), never parsed, and the method's refusal observer (the broker's
    audit of ReleaseKey) hears the reason. gRPC's own refusal carried no reason, and the
    observer heard CANCELLED."""
    channel, parsed, observed = sized
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    with caplog.at_level(logging.WARNING):
        code, reason, details = _refusal(lambda: unary(bytes(LIMIT + 1), timeout=30))
    method = f"/{SERVICE}/Unary"
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    assert details == (
        f"MESSAGE_TOO_LARGE: {method}: a request message of {LIMIT + 1} bytes is larger than "
        f"the limit of {LIMIT} bytes"
    )
    assert parsed.sizes == []
    assert observed == [("RESOURCE_EXHAUSTED", "MESSAGE_TOO_LARGE")]
    (line,) = [r for r in caplog.records if r.getMessage() == "request message too large"]
    assert (getattr(line, "method", None), getattr(line, "bytes", None)) == (method, LIMIT + 1)


def test_a_message_exactly_at_the_limit_is_served(
    sized: tuple[grpc.Channel, _Parsed, list[tuple[str, str]]],
) -> None:
    channel, parsed, observed = sized
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    upload = channel.stream_unary(f"/{SERVICE}/Upload", _identity, _identity)
    assert unary(bytes(LIMIT), timeout=30) == b"%d" % LIMIT
    assert upload(iter([bytes(LIMIT), bytes(LIMIT)]), timeout=30) == b"%d" % (2 * LIMIT)
    assert parsed.sizes == [LIMIT] * 3
    assert observed == []


def test_a_stream_message_over_the_limit_is_refused_as_too_large(
    sized: tuple[grpc.Channel, _Parsed, list[tuple[str, str]]],
) -> None:
    """An upload whose second message is one byte over: refused MESSAGE_TOO_LARGE (the handler
    saw the stream end as a cancel, and the log said CANCELLED), the first message parsed."""
    channel, parsed, _ = sized
    upload = channel.stream_unary(f"/{SERVICE}/Upload", _identity, _identity)
    code, reason, _ = _refusal(lambda: upload(iter([b"x" * 100, bytes(LIMIT + 1)]), timeout=30))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    assert parsed.sizes == [100]


def test_a_message_over_the_cap_is_still_refused_by_grpc_before_it_is_parsed(
    sized: tuple[grpc.Channel, _Parsed, list[tuple[str, str]]],
) -> None:
    """Past the cap gRPC refuses the message from its length prefix (before buffering it): the
    caller learns RESOURCE_EXHAUSTED from gRPC, and the service sees a call that ended."""
    channel, parsed, observed = sized
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    code, reason, details = _refusal(
        lambda: unary(bytes(LIMIT + RECEIVE_CAP_MARGIN + 1), timeout=30)
    )
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, None)
    assert "larger than max" in details
    assert parsed.sizes == []
    assert [status for status, _ in observed] in ([], ["CANCELLED"])
