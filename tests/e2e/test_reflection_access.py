"""Server reflection is for the operator: it is a stream that holds a worker thread, and when it
was public any two certificates the CA issued (of any role, or of none: another trust domain)
filled every blocking-stream slot and refused the model store's transfers for as long as they
kept it open."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from strongroom.dev.devstack import DevStack
from strongroom.runtime.bootstrap import RoleTable, build_host
from strongroom.runtime.server import DEFAULT_MESSAGE_LIMITS, ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider
from tests.e2e.svc import enrolled_svc


@pytest.fixture(scope="module")
def host(stack: DevStack) -> Iterator[ServiceHost]:
    identity, common = enrolled_svc(stack)
    served = build_host(
        common,
        identity=identity,
        services=[ServiceSpec("test.Svc", lambda server: None)],
        roles=RoleTable({"test.Svc": ("client",)}),
        tracer_provider=make_tracer_provider("test", common.tracing),
        message_limits=DEFAULT_MESSAGE_LIMITS,
    )
    served.start()
    try:
        yield served
    finally:
        served.stop(0)
        identity.close()


def list_services(stack: DevStack, host: ServiceHost, who: str) -> list[str]:
    caller = stack.foreign_identity(who) if "://" in who else stack.identity(who)
    with caller.channel(f"localhost:{host.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return [s.name for s in answer.list_services_response.service]


@pytest.mark.parametrize("who", ["client", "inference", "spiffe://elsewhere.example/x"])
def test_reflection_is_refused_to_everyone_but_the_operator(
    stack: DevStack, host: ServiceHost, who: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list_services(stack, host, who)
    assert info.value.code() in (  # type: ignore[attr-defined]
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    )


def test_the_operator_still_lists_the_services(stack: DevStack, host: ServiceHost) -> None:
    assert "test.Svc" in list_services(stack, host, "admin")
