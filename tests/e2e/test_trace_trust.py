"""What a certified caller's trace context may decide about the server's spans, over real mTLS.

A caller may continue its trace into ours (its ``traceparent`` gives the server span's trace id
and parent), but it must not decide whether the server records its RPC at all, and the span must
tell what became of the RPC: its final gRPC status, not the OK it starts with (and not the
exception the error mapping turned into that status: a bug's message stays in the log).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode as SpanStatus

from strongroom import errors
from strongroom.dev.devstack import DevStack
from strongroom.reasons import Reason
from strongroom.runtime.bootstrap import RoleTable, build_host
from strongroom.runtime.logs import JsonFormatter
from strongroom.runtime.server import DEFAULT_MESSAGE_LIMITS, ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider
from tests.e2e.svc import enrolled_svc

SERVICE = "test.Traced"
METHOD = f"/{SERVICE}/Unary"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
UNSAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-00"
SAMPLED = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _same(b: bytes) -> bytes:
    return b


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"invalid":
        raise errors.InvalidArgument("model name is empty", reason=Reason.INVALID_MODEL_NAME)
    if request == b"bug":
        raise KeyError("secret-internal-detail")
    return b"ok"


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    raise KeyError("secret-internal-detail")


def _register(server: grpc.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary, _same, _same),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream, _same, _same),
        },
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture(scope="module")
def served(stack: DevStack) -> Iterator[tuple[ServiceHost, InMemorySpanExporter]]:
    identity, common = enrolled_svc(stack)
    exporter = InMemorySpanExporter()
    host = build_host(
        common,
        identity=identity,
        services=[ServiceSpec(SERVICE, _register)],
        roles=RoleTable({SERVICE: ("client",)}),
        tracer_provider=make_tracer_provider("test", common.tracing, exporter=exporter),
        message_limits=DEFAULT_MESSAGE_LIMITS,
    )
    host.start()
    try:
        yield host, exporter
    finally:
        host.stop(0)
        identity.close()


@pytest.fixture
def spans(served: tuple[ServiceHost, InMemorySpanExporter]) -> InMemorySpanExporter:
    served[1].clear()
    return served[1]


def _call(
    stack: DevStack, host: ServiceHost, who: str, payload: bytes, traceparent: str
) -> grpc.StatusCode:
    with stack.identity(who).channel(f"localhost:{host.port}") as channel:
        try:
            channel.unary_unary(METHOD, _same, _same)(
                payload, metadata=(("traceparent", traceparent),), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def _server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == METHOD]
    assert len(found) == 1, f"expected one server span, got {found}"
    return found[0]


@pytest.mark.parametrize(("who", "code"), [("client", "OK"), ("inference", "PERMISSION_DENIED")])
def test_an_unsampled_traceparent_does_not_switch_off_the_servers_spans(
    stack: DevStack,
    served: tuple[ServiceHost, InMemorySpanExporter],
    spans: InMemorySpanExporter,
    who: str,
    code: str,
) -> None:
    assert _call(stack, served[0], who, b"x", UNSAMPLED) == grpc.StatusCode[code]
    span = _server_span(spans)
    assert span.context is not None and span.context.trace_flags.sampled
    assert f"{span.context.trace_id:032x}" == TRACE_ID  # the caller's trace still continues


@pytest.mark.parametrize(
    ("who", "payload", "code"),
    [
        ("inference", b"x", grpc.StatusCode.PERMISSION_DENIED),  # refused by the authoriser
        ("client", b"invalid", grpc.StatusCode.INVALID_ARGUMENT),
        ("client", b"bug", grpc.StatusCode.INTERNAL),
    ],
)
def test_a_failed_rpcs_span_carries_its_final_status(
    stack: DevStack,
    served: tuple[ServiceHost, InMemorySpanExporter],
    spans: InMemorySpanExporter,
    who: str,
    payload: bytes,
    code: grpc.StatusCode,
) -> None:
    assert _call(stack, served[0], who, payload, SAMPLED) == code
    span = _server_span(spans)
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    if code is grpc.StatusCode.INTERNAL:
        assert span.status.status_code is SpanStatus.ERROR
    # What the caller is told, and no more: a bug's message and stack stay in the log (by ref).
    recorded = repr([dict(e.attributes or {}) for e in span.events]) + repr(span.status)
    assert "secret-internal-detail" not in recorded and "KeyError" not in recorded
    assert "model name is empty" not in recorded and "PeerNotAllowed" not in recorded


def test_a_response_stream_that_fails_after_a_message_records_its_status(
    stack: DevStack, served: tuple[ServiceHost, InMemorySpanExporter], spans: InMemorySpanExporter
) -> None:
    with stack.identity("client").channel(f"localhost:{served[0].port}") as channel:
        responses = channel.unary_stream(f"/{SERVICE}/Stream", _same, _same)(
            b"", metadata=(("traceparent", SAMPLED),), timeout=10
        )
        assert next(responses) == b"first"
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
    assert info.value.code() is grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"/{SERVICE}/Stream"]
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    recorded = repr([dict(e.attributes or {}) for e in span.events]) + repr(span.status)
    assert "secret-internal-detail" not in recorded and "KeyError" not in recorded


class _Lines(logging.Handler):
    """Formats each record as the service would, when it is logged (the trace is current then)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_the_error_mappings_log_lines_carry_the_trace_id(
    stack: DevStack, served: tuple[ServiceHost, InMemorySpanExporter], spans: InMemorySpanExporter
) -> None:
    lines = _Lines()
    logger = logging.getLogger("strongroom.runtime.interceptors")
    logger.addHandler(lines)
    try:
        assert _call(stack, served[0], "client", b"bug", SAMPLED) == grpc.StatusCode.INTERNAL
    finally:
        logger.removeHandler(lines)
    (line,) = [entry for entry in lines.lines if str(entry["msg"]).startswith("unexpected error")]
    assert line.get("trace_id") == TRACE_ID
