"""What a certified caller's trace context may decide about the server's spans, over real mTLS.

A caller may continue its trace into ours (its ``traceparent`` gives the server span's trace id
and parent), but it must not decide whether the server records its RPC at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from strongroom import errors
from strongroom.dev.devstack import DevStack
from strongroom.pki import WorkloadIdentity
from strongroom.pki.identity import RenewalPolicy
from strongroom.reasons import Reason
from strongroom.runtime.bootstrap import RoleTable, build_host
from strongroom.runtime.config import AuthzConfig, CommonConfig, IdentityConfig
from strongroom.runtime.server import DEFAULT_MESSAGE_LIMITS, ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider

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


def _register(server: grpc.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(_unary, _same, _same)}
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture(scope="module")
def served(stack: DevStack) -> Iterator[tuple[ServiceHost, InMemorySpanExporter]]:
    ca = stack.start_ca()
    identity = WorkloadIdentity.enrol(
        ca.client(), stack.token("svc", ["localhost"]), policy=RenewalPolicy()
    )
    common = CommonConfig(
        service="modelstore",
        listen="127.0.0.1:0",
        identity=IdentityConfig(
            trust_domain=stack.trust_domain,
            spiffe_id=stack.spiffe_id("svc"),
            ca_url=ca.url,
            ca_root_file=ca.layout.root_cert_path,
        ),
        authz=AuthzConfig(admin=(stack.spiffe_id("admin"),), client=(stack.spiffe_id("client"),)),
    )
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
