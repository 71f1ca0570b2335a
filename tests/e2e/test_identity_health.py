"""A service's gRPC health follows its workload identity's health.

When the identity is unhealthy (renewal failing close to expiry — judged in ``tests/pki``; here:
past expiry, on an injected clock) the host reports NOT_SERVING, while liveness stays SERVING so an
orchestrator stops routing to it rather than killing it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.dev.devstack import DevStack
from strongroom.pki import WorkloadIdentity
from strongroom.pki.identity import RenewalPolicy
from strongroom.runtime.bootstrap import RoleTable, build_host
from strongroom.runtime.config import CommonConfig, IdentityConfig
from strongroom.runtime.server import DEFAULT_MESSAGE_LIMITS, LIVENESS, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider


def status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_health_turns_not_serving_when_the_identity_is_unhealthy(stack: DevStack) -> None:
    ca = stack.start_ca()
    offset = [timedelta(0)]
    identity = WorkloadIdentity.enrol(
        ca.client(),
        stack.token("svc", ["localhost"]),
        clock=lambda: datetime.now(UTC) + offset[0],
        policy=RenewalPolicy(),
        auto_renew=False,  # renewal never happens: as if the CA were unreachable
    )
    common = CommonConfig(
        service="modelstore",
        listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
        identity=IdentityConfig(
            trust_domain=stack.trust_domain,
            spiffe_id=stack.spiffe_id("svc"),
            ca_url=ca.url,
            ca_root_file=ca.layout.root_cert_path,
        ),
    )
    host = build_host(
        common,
        identity=identity,
        services=[ServiceSpec("test.Svc", lambda server: None)],
        roles=RoleTable({}),
        tracer_provider=make_tracer_provider("test", common.tracing),
        message_limits=DEFAULT_MESSAGE_LIMITS,
    )
    host._check_interval = 0.05
    host.start()
    try:
        assert host.health_port is not None
        assert status(host.health_port) == health_pb2.HealthCheckResponse.SERVING
        # Renewal never ran (as if the CA were unreachable) and the certificate's time is up.
        offset[0] = identity.credentials.not_after - datetime.now(UTC) + timedelta(seconds=1)
        deadline = time.monotonic() + 5
        while status(host.health_port) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.05)
        assert "certificate renewal failing" in (host.not_ready_reason or "")
        assert status(host.health_port, LIVENESS) == health_pb2.HealthCheckResponse.SERVING
    finally:
        host.stop(0)
        identity.close()
