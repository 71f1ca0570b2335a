"""OpenTelemetry tracing with W3C trace-context propagation across services.

Each service gets its own :class:`TracerProvider` (so several services can share a process in tests)
and passes it to the gRPC server and client interceptors explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext, server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from strongroom.runtime.config import TracingConfig
from strongroom.runtime.grpc_types import (
    RpcMethodHandler,
    ServerInterceptor,
    ServerInterceptorBase,
    is_non_blocking,
)


def make_tracer_provider(
    service: str, config: TracingConfig, *, exporter: SpanExporter | None = None
) -> TracerProvider:
    """A provider exporting to ``exporter`` (tests) or to the configured OTLP endpoint, if any."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"strongroom-{service}"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
            )
        )
    return provider


def server_tracing_interceptor(provider: TracerProvider) -> ServerInterceptor:
    """Starts a server span per RPC, continuing the caller's trace.

    Non-blocking streams (health ``Watch``) are not traced: OpenTelemetry's wrapper would make them
    blocking, each holding a worker thread for its whole life.
    """
    interceptor: ServerInterceptor = server_interceptor(tracer_provider=provider)  # type: ignore[no-untyped-call]
    return _SkipNonBlocking(interceptor)


class _SkipNonBlocking(ServerInterceptorBase):
    """Applies ``inner`` to every handler except non-blocking ones, which it would make blocking."""

    def __init__(self, inner: ServerInterceptor) -> None:
        self._inner = inner

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or is_non_blocking(handler):
            return handler
        return self._inner.intercept_service(lambda _details: handler, handler_call_details)


def traced_channel(channel: grpc.Channel, provider: TracerProvider) -> grpc.Channel:
    """Wraps a client channel so every call starts a client span and propagates its context."""
    # OpenTelemetry's interceptor implements its own extension interface, applied by its grpcext.
    channel_out: grpc.Channel = grpcext.intercept_channel(
        channel,
        client_interceptor(tracer_provider=provider),  # type: ignore[no-untyped-call]
    )
    return channel_out
