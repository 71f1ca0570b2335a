"""Metrics: OpenTelemetry instruments recorded through the global meter provider.

Instruments are created at import time from the API's proxy meter, so they cost nothing until a
service installs a provider (:func:`install_meter_provider`: OTLP export when configured); tests
install one with an in-memory reader.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from strongroom.runtime.config import TracingConfig
from strongroom.runtime.grpc_types import HandlerInterceptor, RpcMethodHandler, rewrap_handler
from strongroom.runtime.tracing import ClientIdentity, Following, otlp_exporter

_meter = metrics.get_meter("strongroom")

RPC_DURATION = _meter.create_histogram(
    "strongroom.rpc.server.duration", unit="ms", description="Server-side duration of each RPC"
)
KEY_RELEASES = _meter.create_counter(
    "strongroom.keybroker.releases", description="Key release decisions, by outcome and reason"
)
DATA_KEYS_REWRAPPED = _meter.create_counter(
    "strongroom.keybroker.rewraps",
    description="Data keys re-wrapped to a newer KEK version inside the HSM, by key and outcome",
)
KEY_SLOTS_REPLACED = _meter.create_counter(
    "strongroom.modelstore.key_slots_replaced",
    description="Stored artifacts whose key slot was replaced (re-wrap), by key and outcome",
)
BLOBS_KEPT = _meter.create_counter(
    "strongroom.modelstore.blobs_kept",
    description="Blobs a model delete kept (the record deleted, the blob left in the bucket) "
    "because its head could not show it was that model's, by cause",
)
MODEL_LOAD_DURATION = _meter.create_histogram(
    "strongroom.inference.model_load.duration",
    unit="s",
    description="Model load time (fetch, attest, release, decrypt, load), by outcome",
)
MODEL_LOAD_RETRIES = _meter.create_counter(
    "strongroom.inference.model_load.retries",
    description="Failed loads of configured models scheduled to be tried again, by model, reason "
    "and schedule (soon: transient; slowly: a cause that may go away by itself; unchanged: a "
    "failure of the artifact whose stored entry had not changed, not tried again)",
)


def install_meter_provider(
    service: str,
    config: TracingConfig,
    *,
    reader: MetricReader | None = None,
    identity: ClientIdentity | None = None,
    shutdown_on_exit: bool = True,
) -> MeterProvider | None:
    """Installs the process's meter provider (OTLP when an endpoint is configured; ``identity``
    and ``shutdown_on_exit`` as in :func:`~strongroom.runtime.tracing.make_tracer_provider`)."""
    readers: list[MetricReader] = []
    if reader is not None:
        readers.append(reader)
    elif config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter: MetricExporter = otlp_exporter(
            config, identity, OTLPMetricExporter, FollowingMetricExporter
        )
        readers.append(PeriodicExportingMetricReader(exporter))
    if not readers:
        return None
    provider = MeterProvider(
        resource=Resource.create({"service.name": f"strongroom-{service}"}),
        metric_readers=readers,
        shutdown_on_exit=shutdown_on_exit,
    )
    metrics.set_meter_provider(provider)
    return provider


class FollowingMetricExporter(MetricExporter):
    """A metric exporter that follows the workload's certificate
    (:class:`~strongroom.runtime.tracing.Following`)."""

    def __init__(self, following: Following[MetricExporter]) -> None:
        first = following.current
        super().__init__(
            preferred_temporality=first._preferred_temporality,
            preferred_aggregation=first._preferred_aggregation,
        )
        self._following = following

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Exports through the exporter for the current certificate."""
        return self._following.fresh().export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flushes the current exporter."""
        return self._following.current.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shuts the current exporter down; nothing exports afterwards."""
        current = self._following.close()
        if current is not None:
            current.shutdown(timeout_millis=timeout_millis, **kwargs)


class MetricsInterceptor(HandlerInterceptor):
    """Records every RPC's duration and status code."""

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """``handler`` recording its duration and status."""
        method = details.method

        def record(context: grpc.ServicerContext, started: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            status = code.name if code is not None else ("UNKNOWN" if failed else "OK")
            RPC_DURATION.record(
                (time.perf_counter() - started) * 1000, {"rpc.method": method, "rpc.status": status}
            )

        def unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                started, failed = time.perf_counter(), True
                try:
                    result = fn(request, context)
                    failed = False
                    return result
                finally:
                    record(context, started, failed)

            return call

        def stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started, failed = time.perf_counter(), True
                try:
                    yield from fn(request, context)
                    failed = False
                finally:
                    record(context, started, failed)

            return call

        return rewrap_handler(handler, unary, stream)
