"""Server tracing without an exporter: no spans, but the caller's trace context still holds in the
handler; with an exporter: server spans. And the interceptor chain wraps each method once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from strongroom.runtime.config import ServerConfig, TracingConfig
from strongroom.runtime.grpc_types import RpcMethodHandler, ServerInterceptorBase
from strongroom.runtime.interceptors import CachedChain
from strongroom.runtime.server import ServiceHost, ServiceSpec
from strongroom.runtime.tracing import ServiceTracerProvider, make_tracer_provider
from strongroom.runtime.tracing import server_tracing_interceptor as tracing

SERVICE = "test.Traced"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def _same(b: bytes) -> bytes:
    return b


class Counting(ServerInterceptorBase):
    """Counts how often gRPC asks it to wrap a handler."""

    def __init__(self) -> None:
        self.wraps = 0

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> RpcMethodHandler | None:
        self.wraps += 1
        return continuation(handler_call_details)


@pytest.fixture
def served() -> Iterator[tuple[ServiceTracerProvider, list[Any], Counting, grpc.Channel]]:
    provider = make_tracer_provider("test", TracingConfig())
    assert isinstance(provider, ServiceTracerProvider)
    seen: list[Any] = []
    counting = Counting()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(trace.get_current_span())
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same)}
    )
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[ServiceSpec(SERVICE, lambda s: s.add_generic_rpc_handlers((handler,)))],
        interceptors=[tracing(provider), counting],
        config=ServerConfig(max_workers=2),
    )
    host.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{host.port}")
    yield provider, seen, counting, channel
    channel.close()
    host.stop(0)


def _call(channel: grpc.Channel, method: str = "Unary") -> bytes:
    result: bytes = channel.unary_unary(f"/{SERVICE}/{method}", _same, _same)(
        b"", metadata=(("traceparent", TRACEPARENT),), timeout=10
    )
    return result


def test_without_an_exporter_no_span_is_made_but_the_trace_continues(served) -> None:
    provider, seen, _, channel = served
    assert not provider.exporting
    assert _call(channel) == b"ok"
    [span] = seen
    assert not span.is_recording()
    assert f"{span.get_span_context().trace_id:032x}" == TRACE_ID


def test_an_exporter_added_later_gets_server_spans(served) -> None:
    provider, seen, _, channel = served
    _call(channel)  # the handler chain is built and kept before the exporter exists
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _call(channel)
    [span] = exporter.get_finished_spans()
    assert span.name == f"/{SERVICE}/Unary"
    assert seen[-1].get_span_context().span_id == span.context.span_id  # the handler's span
    assert f"{span.context.trace_id:032x}" == TRACE_ID


def test_each_method_is_wrapped_once_and_unknown_methods_never_kept(served) -> None:
    _, _, counting, channel = served
    for _ in range(3):
        _call(channel)
    assert counting.wraps == 1
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, "Missing")
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert counting.wraps == 1


def test_the_cache_is_bounded() -> None:
    counting = Counting()
    chain = CachedChain([counting], max_methods=1)
    base = grpc.unary_unary_rpc_method_handler(lambda r, c: r)

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    for method in ("/a/A", "/a/B", "/a/A", "/a/B"):
        assert chain.intercept_service(lambda _d: base, Details(method)) is not None
    assert counting.wraps == 3  # /a/A kept; /a/B wrapped on each call
