"""A TLS OTLP export with no client certificate files presents the service's own workload
certificate and follows its renewals. Before, such an export presented no certificate (a collector
that checks them refused every export), and static files were the only way to present one: fixed
when the exporter was built, they could not follow step-ca's short-lived certificates.

The collector here is a real gRPC server speaking the OTLP trace and metrics services over mTLS
(client certificates required, checked against the deployment's step-ca root); it notes the
serial of the certificate each export came with."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import SpanExportResult

from strongroom.pki import StepCa, WorkloadIdentity
from strongroom.pki.credentials import Credentials
from strongroom.runtime.config import TracingConfig
from strongroom.runtime.metrics import FollowingMetricExporter
from strongroom.runtime.tracing import (
    Following,
    FollowingSpanExporter,
    follows_identity,
    make_tracer_provider,
    otlp_exporter_options,
)
from tests.pki.helpers import enrol


class _Collector:
    """The serial of the client certificate each export came with, in order."""

    def __init__(self) -> None:
        self.serials: list[int] = []

    def note(self, context: grpc.ServicerContext) -> None:
        # A list of values per name (grpc-stubs types it as bytes).
        certificates: Any = context.auth_context()["x509_pem_cert"]
        (pem,) = certificates
        self.serials.append(x509.load_pem_x509_certificate(pem).serial_number)


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: _Collector) -> None:
        self._collector = collector

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._collector.note(context)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, collector: _Collector) -> None:
        self._collector = collector

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._collector.note(context)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def collector(ca: StepCa) -> Iterator[tuple[_Collector, int]]:
    """An mTLS OTLP collector on a loopback port, with a certificate from the module's step-ca."""
    identity = enrol(ca, "collector", ["localhost"], auto_renew=False)
    seen = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(seen), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(seen), server)
    port = server.add_secure_port("localhost:0", identity.server_credentials())
    server.start()
    try:
        yield seen, port
    finally:
        server.stop(None)
        identity.close()


@pytest.fixture
def workload(ca: StepCa) -> Iterator[WorkloadIdentity]:
    """A service's identity, renewed by the test."""
    identity = enrol(ca, "modelstore", auto_renew=False)
    yield identity
    identity.close()


def _config(ca: StepCa, tmp_path: Path, port: int) -> TracingConfig:
    root = tmp_path / "root.pem"
    root.write_bytes(ca.client().root_pem)
    return TracingConfig(otlp_endpoint=f"https://localhost:{port}", otlp_ca_file=root)


def test_span_export_presents_the_workload_certificate_and_follows_renewal(
    ca: StepCa, tmp_path: Path, collector: tuple[_Collector, int], workload: WorkloadIdentity
) -> None:
    seen, port = collector
    seen.serials.clear()
    provider = make_tracer_provider(
        "modelstore", _config(ca, tmp_path, port), identity=lambda: workload.credentials
    )
    tracer = provider.get_tracer("test")
    try:
        first = workload.credentials.serial
        with tracer.start_as_current_span("before renewal"):
            pass
        assert provider.force_flush(10_000)
        renewed = workload.renew_now().serial
        assert renewed != first
        with tracer.start_as_current_span("after renewal"):
            pass
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    assert seen.serials == [first, renewed]


def test_metric_export_follows_renewal(
    ca: StepCa, tmp_path: Path, collector: tuple[_Collector, int], workload: WorkloadIdentity
) -> None:
    seen, port = collector
    seen.serials.clear()
    config = _config(ca, tmp_path, port)

    def build(client: Credentials) -> OTLPMetricExporter:
        return OTLPMetricExporter(**otlp_exporter_options(config, client))

    exporter = FollowingMetricExporter(Following(build, lambda: workload.credentials))
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    counter = provider.get_meter("test").create_counter("strongroom.test.exports")
    try:
        first = workload.credentials.serial
        counter.add(1)
        assert provider.force_flush(10_000)
        renewed = workload.renew_now().serial
        counter.add(1)
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    # The reader's shutdown exports once more, with the renewed certificate too.
    assert seen.serials[:2] == [first, renewed]
    assert set(seen.serials[1:]) == {renewed}


def test_nothing_is_built_or_exported_after_shutdown(
    ca: StepCa, tmp_path: Path, collector: tuple[_Collector, int], workload: WorkloadIdentity
) -> None:
    """An export after the shutdown that followed a renewal (a meter provider's force_flush after
    its shutdown) built a new exporter, exported through it and left its channel open for good."""
    seen, port = collector
    config = _config(ca, tmp_path, port)
    built: list[OTLPMetricExporter] = []

    def build(client: Credentials) -> OTLPMetricExporter:
        built.append(OTLPMetricExporter(**otlp_exporter_options(config, client)))
        return built[-1]

    exporter = FollowingMetricExporter(Following(build, lambda: workload.credentials))
    provider = MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)]
    )
    counter = provider.get_meter("test").create_counter("strongroom.test.exports")
    span_exporter = FollowingSpanExporter(
        Following(
            lambda client: OTLPSpanExporter(**otlp_exporter_options(config, client)),
            lambda: workload.credentials,
        )
    )
    counter.add(1)
    provider.shutdown()
    span_exporter.shutdown()
    seen.serials.clear()
    workload.renew_now()
    counter.add(1)
    provider.force_flush(10_000)
    assert span_exporter.export([]) is SpanExportResult.FAILURE
    assert seen.serials == []
    assert len(built) == 1  # the one shut down
    exporter.shutdown()  # again: nothing to do


def test_configured_files_or_plaintext_do_not_follow_the_identity(tmp_path: Path) -> None:
    def identity() -> Credentials:
        raise AssertionError("not asked for")

    files = TracingConfig(
        otlp_endpoint="c:4317",
        otlp_ca_file=tmp_path / "ca.pem",
        otlp_client_cert_file=tmp_path / "cert.pem",
        otlp_client_key_file=tmp_path / "key.pem",
    )
    plaintext = TracingConfig(otlp_endpoint="127.0.0.1:4317", otlp_insecure=True)
    assert not follows_identity(files, identity)
    assert not follows_identity(plaintext, identity)
    assert follows_identity(TracingConfig(otlp_endpoint="c:4317"), identity)
    assert not follows_identity(TracingConfig(otlp_endpoint="c:4317"), None)
