"""OpenTelemetry tracing with W3C trace-context propagation across services.

Each service gets its own :class:`TracerProvider` (so several services can share a process in tests)
and passes it to the gRPC server and client interceptors explicitly.

A service whose provider exports nowhere (:class:`ServiceTracerProvider` with no span processor:
no OTLP endpoint configured) creates no server spans: building, timing and dropping one costs about
a tenth of a key release's CPU. It still continues the caller's trace context, so log lines carry
the caller's trace id and outgoing calls propagate it.

A caller's ``traceparent`` gives the server span its trace id and parent, never the decision to
record it: any certified caller (one the authoriser then refuses included) could otherwise send
the "not sampled" flag and leave no span of its calls (:data:`SERVER_SAMPLER`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import Token
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext, server_interceptor
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler

from strongroom.pki.credentials import Credentials
from strongroom.runtime.config import ConfigError, TracingConfig
from strongroom.runtime.grpc_types import (
    HandlerInterceptor,
    RpcMethodHandler,
    ServerInterceptor,
    is_non_blocking,
    rewrap_handler,
)


class ServiceTracerProvider(TracerProvider):
    """A :class:`TracerProvider` that knows whether any span processor receives its spans."""

    exporting = False

    def add_span_processor(self, span_processor: Any) -> None:
        """Adds the processor; from now on server spans are made."""
        super().add_span_processor(span_processor)
        self.exporting = True


SERVER_SAMPLER: Sampler = ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)
"""Records every span of ours, whatever the caller's sampled flag says.

The SDK's default (``ParentBased(ALWAYS_ON)``) follows a remote parent's flag, so a caller that
sends ``traceparent: 00-…-00`` turns the server's spans of its calls off. Every Strongroom
service records all its spans, so only a foreign caller ever sends that flag; a span whose local
parent is not sampled still is not (the SDK's rule, unchanged).
"""


class _Exporter(Protocol):
    def shutdown(self) -> None: ...


E = TypeVar("E", bound=_Exporter)

#: The workload's current TLS credentials (``WorkloadIdentity.credentials``, read at each export).
ClientIdentity = Callable[[], Credentials]


def make_tracer_provider(
    service: str,
    config: TracingConfig,
    *,
    exporter: SpanExporter | None = None,
    identity: ClientIdentity | None = None,
    shutdown_on_exit: bool = True,
) -> TracerProvider:
    """A provider exporting to ``exporter`` (tests) or to the configured OTLP endpoint, if any;
    ``identity`` is the client certificate of a TLS export without one configured (see
    :func:`otlp_exporter_options`); ``shutdown_on_exit`` False: no exit handler shuts it down
    (:class:`~strongroom.runtime.telemetry.Telemetry` does)."""
    provider = ServiceTracerProvider(
        resource=Resource.create({"service.name": f"strongroom-{service}"}),
        sampler=SERVER_SAMPLER,
        shutdown_on_exit=shutdown_on_exit,
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter: SpanExporter = otlp_exporter(
            config, identity, OTLPSpanExporter, FollowingSpanExporter
        )
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def otlp_exporter(
    config: TracingConfig,
    identity: ClientIdentity | None,
    make: Callable[..., E],
    follow: Callable[[Following[E]], E],
) -> E:
    """The OTLP exporter ``make`` builds for ``config`` (:func:`otlp_exporter_options`), or,
    when the export presents the workload's certificate (:func:`follows_identity`), ``follow``
    around the exporters built for each of its renewals."""

    def build(client: Credentials | None) -> E:
        return make(**otlp_exporter_options(config, client))

    if identity is not None and follows_identity(config, identity):
        return follow(Following(build, identity))
    return build(None)


def follows_identity(config: TracingConfig, identity: ClientIdentity | None) -> bool:
    """Whether the OTLP export presents the workload's own certificate: a TLS export with no
    client certificate files configured, in a service that has an identity."""
    return (
        identity is not None
        and not config.otlp_insecure
        and config.otlp_client_cert_file is None
        and config.otlp_client_key_file is None
    )


class Following(Generic[E]):
    """An OTLP exporter for the workload's current certificate, built again after a renewal.

    gRPC fixes a channel's client certificate when the credentials are made, and OpenTelemetry's
    exporters make theirs once: with step-ca's short-lived certificates, a collector that checks
    client certificates would refuse every export once the first one expired. The generation is
    compared at each export, so the exporter never holds a certificate older than the last
    renewal by more than one export.

    Once :meth:`close` has been called nothing is built any more: :meth:`fresh` hands back the
    exporter that was shut down, whose exports fail. Before, an export after the shutdown (a
    meter provider's ``force_flush`` after its ``shutdown``, or a processor's last export still
    running when its shutdown gave up waiting) that followed a renewal built a new exporter,
    exported through it, and left its gRPC channel open for good.
    """

    def __init__(self, build: Callable[[Credentials], E], identity: ClientIdentity) -> None:
        self._build = build
        self._identity = identity
        self._lock = threading.Lock()
        self._closed = False
        credentials = identity()
        self._generation = credentials.generation
        self.current: E = build(credentials)

    def fresh(self) -> E:
        """The exporter for the current certificate (the previous one, if replaced, shut down);
        after :meth:`close`, the exporter that was shut down."""
        stale: E | None = None
        with self._lock:
            current = self.current
            if not self._closed:
                # Read under the lock: two exports racing a renewal cannot put back the older
                # certificate after the newer one was built.
                credentials = self._identity()
                if credentials.generation != self._generation:
                    stale, current = current, self._build(credentials)
                    self.current, self._generation = current, credentials.generation
        if stale is not None:
            stale.shutdown()
        return current

    def close(self) -> E | None:
        """Stops following (no exporter is built afterwards) and returns the exporter for the
        caller to shut down; None when already closed (it was shut down then)."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            return self.current


class FollowingSpanExporter(SpanExporter):
    """A span exporter that follows the workload's certificate (see :class:`Following`)."""

    def __init__(self, following: Following[SpanExporter]) -> None:
        self._following = following

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Exports through the exporter for the current certificate."""
        return self._following.fresh().export(spans)

    def shutdown(self) -> None:
        """Shuts the current exporter down; nothing exports afterwards."""
        current = self._following.close()
        if current is not None:
            current.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flushes the current exporter."""
        return self._following.current.force_flush(timeout_millis)


#: gRPC channel options that turn its HTTP CONNECT proxy support off.
_NO_PROXY = (("grpc.enable_http_proxy", 0),)


def otlp_exporter_options(
    config: TracingConfig, client: Credentials | None = None
) -> dict[str, Any]:
    """The OTLP/gRPC exporter's ``endpoint``, ``insecure`` and ``credentials`` (plaintext:
    ``channel_options``, no proxy) for ``config``.

    TLS unless ``otlp_insecure``: the collector's certificate checked against ``otlp_ca_file``
    (which :class:`~strongroom.runtime.config.CommonConfig` defaults to the deployment's root),
    with the configured client certificate for mutual TLS, or else ``client`` (the workload's
    own, see :class:`Following`). The files are read now, so a missing
    or unreadable one fails the start (ConfigError naming it) rather than every export later.
    Explicit credentials also keep the exporter from picking up ``OTEL_EXPORTER_OTLP_*``
    certificate variables or the system's roots behind the configuration's back.
    """
    assert config.otlp_endpoint is not None
    endpoint = config.otlp_endpoint.partition("://")[2] or config.otlp_endpoint
    if config.otlp_insecure:
        # Never through a proxy (gRPC takes one from grpc_proxy, https_proxy or http_proxy, as
        # the broker's collateral fetches do): the proxy would read the export in clear, and
        # production allows plaintext only because a loopback collector's traffic stays on the
        # host (the proxy's own loopback is not this pod's sidecar either).
        return {"endpoint": endpoint, "insecure": True, "channel_options": _NO_PROXY}
    if config.otlp_ca_file is None:
        raise ConfigError(
            "tracing.otlp_ca_file: required for a TLS export (the collector's CA); a service "
            "configuration defaults it to identity.ca_root_file"
        )
    client_pair: dict[str, bytes] = {}
    if config.otlp_client_cert_file is not None and config.otlp_client_key_file is not None:
        chain = _read("otlp_client_cert_file", config.otlp_client_cert_file)
        key = _read("otlp_client_key_file", config.otlp_client_key_file)
        _check_pair(chain, config.otlp_client_cert_file, key, config.otlp_client_key_file)
        client_pair = {"certificate_chain": chain, "private_key": key}
    elif client is not None:
        client_pair = {"certificate_chain": client.chain_pem, "private_key": client.key_pem}
    roots = _read("otlp_ca_file", config.otlp_ca_file)
    _certificates("otlp_ca_file", config.otlp_ca_file, roots)
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, **client_pair)
    return {"endpoint": endpoint, "insecure": False, "credentials": credentials}


def _read(key: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"tracing.{key}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"tracing.{key}: {path} holds no PEM block")
    return data


def _certificates(key: str, path: Path, pem: bytes) -> list[x509.Certificate]:
    """The certificates in ``pem``; ConfigError naming the file when there is none that parses.

    gRPC reads its credentials only when the channel first connects, so a damaged file (or a key
    named in a certificate's place) would pass the start and fail every export afterwards, as
    transient connection errors, while the service answers healthy.
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError(f"tracing.{key}: {path} holds no certificate that parses")
    return certificates


def _check_pair(chain: bytes, chain_path: Path, key: bytes, key_path: Path) -> None:
    """The client certificate's first certificate is for the client key (see
    :func:`_certificates`); the key's parse error is not repeated: it may quote the key."""
    leaf = _certificates("otlp_client_cert_file", chain_path, chain)[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"tracing.otlp_client_key_file: {key_path} holds no unencrypted private key that parses"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ConfigError(
            f"tracing.otlp_client_key_file: {key_path} does not match the certificate in "
            f"tracing.otlp_client_cert_file ({chain_path})"
        )


def server_tracing_interceptor(provider: TracerProvider) -> ServerInterceptor:
    """Starts a server span per RPC, continuing the caller's trace; with a
    :class:`ServiceTracerProvider` that exports nowhere, only continues the caller's trace.

    Non-blocking streams (health ``Watch``) are not traced: OpenTelemetry's wrapper would make them
    blocking, each holding a worker thread for its whole life. It goes outside the runtime's error
    mapping (``ServiceHost(tracing=...)``): OpenTelemetry's span learns an RPC's status only from an
    abort through its own servicer context, and inside the mapping it saw the raw exception
    instead, exporting every failed RPC as ``rpc.grpc.status_code`` 0 (OK) with the exception's
    message and stack (an internal error's included, which the caller is never told).
    """
    interceptor: ServerInterceptor = server_interceptor(tracer_provider=provider)  # type: ignore[no-untyped-call]
    return _ServerTracing(interceptor, provider)


class _ServerTracing(HandlerInterceptor):
    """Applies ``inner`` (spans) to every handler except non-blocking ones, which it would make
    blocking; picks spans or bare context propagation per call, by whether the provider exports."""

    def __init__(self, inner: ServerInterceptor, provider: TracerProvider) -> None:
        self._inner = inner
        self._provider = provider

    def _exporting(self) -> bool:
        # A provider of unknown kind (tests pass plain ones with their own exporters) is traced.
        return getattr(self._provider, "exporting", True) is not False

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler | None:
        """``handler`` traced (or only continuing the caller's trace); non-blocking ones as they are."""
        if is_non_blocking(handler):
            return handler
        traced = self._inner.intercept_service(lambda _details: handler, details)
        if traced is None:
            return None
        exporting = self._exporting
        spans = _behaviour(traced)

        def unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                if exporting():
                    return spans(request, context)
                token = _attach_remote_context(context)
                try:
                    return fn(request, context)
                finally:
                    otel_context.detach(token)

            return call

        def stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if exporting():
                    yield from spans(request, context)
                    return
                # gRPC drains a response stream on the worker thread that started it, so the
                # context stays attached across yields (as OpenTelemetry's own wrapper does).
                token = _attach_remote_context(context)
                try:
                    yield from fn(request, context)
                finally:
                    otel_context.detach(token)

            return call

        return rewrap_handler(handler, unary, stream)


def _behaviour(handler: RpcMethodHandler) -> Callable[..., Any]:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behaviour is not None
    return behaviour


def _attach_remote_context(context: grpc.ServicerContext) -> Token[otel_context.Context]:
    """Makes the caller's ``traceparent`` (if any) the current trace context; returns the token."""
    metadata = context.invocation_metadata()
    carrier = {key: value for key, value in metadata} if metadata else {}
    return otel_context.attach(extract(carrier))


def traced_channel(channel: grpc.Channel, provider: TracerProvider) -> grpc.Channel:
    """Wraps a client channel so every call starts a client span and propagates its context."""
    # OpenTelemetry's interceptor implements its own extension interface, applied by its grpcext.
    channel_out: grpc.Channel = grpcext.intercept_channel(
        channel,
        client_interceptor(tracer_provider=provider),  # type: ignore[no-untyped-call]
    )
    return channel_out
