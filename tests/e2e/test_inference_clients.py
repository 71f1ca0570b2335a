"""``inference.clients``: which models each client identity may use over OIP, over real mTLS.

Without it every identity with the client role ran every model the server held, read its
metadata (inputs, outputs, versions) and probed which names were loaded: one tenant's client
could query another tenant's model, however the store and the broker kept their publishers apart.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as pb_grpc
from strongroom.client.remote import peer_reason
from strongroom.dev.devstack import DevStack
from strongroom.inference.config import ClientScope, InferenceConfig
from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import SERVICE_NAME, InferLimits, OipServicer
from strongroom.inference.oip import _servicer as oip_servicer
from strongroom.inference.oip._wire import parse_infer_request
from strongroom.inference.server import ROLE_RULES, oip_service
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.bootstrap import RoleTable, build_host
from strongroom.runtime.config import AuthzConfig, ConfigError
from strongroom.runtime.server import LIVENESS, ServiceHost
from strongroom.runtime.tracing import make_tracer_provider
from tests.conftest import stack_root
from tests.e2e.svc import enrolled_svc
from tests.inference import onnx_models

MODELS = ("team-a/m", "team-b/m", "shared/m")
LATE = "team-b/late"
"""A configured model of team b's that never loads: the server is not ready for team b."""


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """Only the CA: the OIP service under test is hosted here, over its models in memory."""
    root = stack_root(tmp_path_factory, "clients", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        yield dev


@pytest.fixture(scope="module")
def host(stack: DevStack) -> Iterator[ServiceHost]:
    """The OIP service as ``serve inference`` hosts it (mTLS, SPIFFE roles, error mapping), with
    three client identities: one listed for ``team-a/`` and ``shared/m``, one for ``team-b/``, one
    not listed; and the admin. ``team-b/late`` is configured but never loads."""
    identity, common = enrolled_svc(stack)
    clients = ("client", "client-b", "client-c")
    common = dataclasses.replace(
        common,
        health_listen="127.0.0.1:0",
        authz=AuthzConfig(
            client=tuple(stack.spiffe_id(c) for c in clients),
            admin=(stack.spiffe_id("admin"),),
        ),
    )
    config = InferenceConfig(
        model_store="localhost:1",
        key_broker="localhost:1",
        clients=(
            ClientScope(stack.spiffe_id("client"), ("team-a/", "shared/m")),
            ClientScope(stack.spiffe_id("client-b"), ("team-b/",)),
        ),
    )
    repository = ModelRepository([LATE])
    for name in MODELS:
        repository.load(name, "1", onnx_models.identity("FP32"))
    oip = OipServicer(
        repository,
        limits=InferLimits(),
        clients=config.client_scopes,
        unscoped=common.authz.ids("admin"),
    )
    served = build_host(
        common,
        identity=identity,
        services=[oip_service(oip, repository)],
        roles=RoleTable(ROLE_RULES),
        tracer_provider=make_tracer_provider("test", common.tracing),
        message_limits=InferLimits().message_limits,
    )
    served.start()
    try:
        yield served
    finally:
        served.stop(0)
        identity.close()


@pytest.fixture(scope="module")
def callers(stack: DevStack) -> dict[str, WorkloadIdentity]:
    return {
        "client": stack.identity("client"),
        "client-b": stack.foreign_identity(stack.spiffe_id("client-b")),
        "client-c": stack.foreign_identity(stack.spiffe_id("client-c")),
        "admin": stack.identity("admin"),
    }


X = np.arange(6, dtype=np.float32).reshape(2, 3)


def _infer(name: str) -> Callable[[pb_grpc.GRPCInferenceServiceStub], object]:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(X.tobytes())
    return lambda oip: oip.ModelInfer(request, timeout=10)


CALLS: dict[str, Callable[[str], Callable[[pb_grpc.GRPCInferenceServiceStub], object]]] = {
    "infer": _infer,
    "metadata": lambda name: (
        lambda oip: oip.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
    ),
    "ready": lambda name: lambda oip: oip.ModelReady(pb.ModelReadyRequest(name=name), timeout=10),
}


def call(host: ServiceHost, caller: WorkloadIdentity, what: str, name: str) -> object:
    with caller.channel(f"localhost:{host.port}") as channel:
        return CALLS[what](name)(pb_grpc.GRPCInferenceServiceStub(channel))


@pytest.mark.parametrize("what", list(CALLS))
@pytest.mark.parametrize(
    ("who", "name"),
    [
        ("client", "team-a/m"),
        ("client", "shared/m"),
        ("client-b", "team-b/m"),
        ("admin", "team-b/m"),  # admins are not scoped
    ],
)
def test_a_listed_client_uses_the_models_its_rules_cover(
    host: ServiceHost, callers: dict[str, WorkloadIdentity], what: str, who: str, name: str
) -> None:
    answer = call(host, callers[who], what, name)
    if what == "infer":
        out = np.frombuffer(answer.raw_output_contents[0], np.float32)  # type: ignore[attr-defined]
        assert out.tolist() == X.reshape(-1).tolist()
    elif what == "metadata":
        assert answer.name == name  # type: ignore[attr-defined]
    else:
        assert answer.ready is True  # type: ignore[attr-defined]


@pytest.mark.parametrize("what", list(CALLS))
@pytest.mark.parametrize(
    ("who", "name"),
    [
        ("client", "team-b/m"),  # another tenant's model
        ("client", "team-b/absent"),  # ... the same answer whether or not it exists
        ("client", "team-a"),  # team-a/ covers what is under it, not the name itself
        ("client-b", "shared/m"),
        ("client-c", "team-a/m"),  # a client the list does not name uses nothing
    ],
)
def test_a_model_outside_the_callers_rules_is_refused_whether_or_not_it_exists(
    host: ServiceHost,
    callers: dict[str, WorkloadIdentity],
    caplog: pytest.LogCaptureFixture,
    what: str,
    who: str,
    name: str,
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as info:
        call(host, callers[who], what, name)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert peer_reason(info.value) == "MODEL_NAME_NOT_ALLOWED"
    details = info.value.details() or ""  # type: ignore[attr-defined]
    assert "FP32" not in details and "version" not in details
    refusals = [r.getMessage() for r in caplog.records if "refused model" in r.getMessage()]
    assert refusals and name in refusals[-1] and str(callers[who].spiffe_id) in refusals[-1]


def test_a_caller_without_the_role_has_no_request_counted_or_parsed(
    host: ServiceHost,
    stack: DevStack,
    callers: dict[str, WorkloadIdentity],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ModelInfer's wire count and parse ran as gRPC's deserialiser, which gRPC calls before any
    interceptor's behaviour: any certificate of the CA, with no role here, had the server count
    and parse its requests (up to a second of CPU and several times their size each), outside
    the per-caller cap on unary calls. They run in the handler now, after both."""
    parsed: list[int] = []

    def counted(data: bytes, limits: InferLimits) -> pb.ModelInferRequest:
        parsed.append(len(data))
        return parse_infer_request(data, limits)

    monkeypatch.setattr(oip_servicer, "parse_infer_request", counted)
    stranger = stack.foreign_identity(stack.spiffe_id("no-role"))
    with pytest.raises(grpc.RpcError) as info:
        call(host, stranger, "infer", "team-a/m")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert parsed == []
    call(host, callers["client"], "infer", "team-a/m")
    assert len(parsed) == 1


@pytest.mark.parametrize(
    ("who", "ready"),
    [
        ("client", True),  # team b's model not loaded is not team a's to learn
        ("client-b", False),  # ... but team b's own
        ("client-c", True),  # a client with no model waits for none
        ("admin", False),  # admins see the whole server
    ],
)
def test_server_readiness_is_the_callers_models_and_metadata_everyones(
    host: ServiceHost, callers: dict[str, WorkloadIdentity], who: str, ready: bool
) -> None:
    """ServerReady answered over every tenant's configured models: any client learned whether
    another tenant's model had loaded (and, a configured model failing, that it exists)."""
    with callers[who].channel(f"localhost:{host.port}") as channel:
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        assert oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is ready
        assert oip.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name


@pytest.mark.parametrize(
    ("who", "ready"),
    [
        ("client", True),
        ("client-b", False),
        ("client-c", True),
        ("no-role", True),
        ("admin", False),
    ],
)
def test_the_health_service_answers_a_tenants_caller_for_its_own_models(
    host: ServiceHost, stack: DevStack, callers: dict[str, WorkloadIdentity], who: str, ready: bool
) -> None:
    """The health service on the service's port, which any certificate of the CA may call,
    answered (and told watchers as it changed) whether every tenant's configured models had
    loaded: what ServerReady no longer tells a tenant's client about another's. A caller is now
    told its own models' readiness there too, Check and Watch, for the OIP service and the
    server's overall name; the plaintext port (the kubelet's probes) answers for the server."""
    caller = callers.get(who) or stack.foreign_identity(stack.spiffe_id(who))
    want = (
        health_pb2.HealthCheckResponse.SERVING
        if ready
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    with caller.channel(f"localhost:{host.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in (SERVICE_NAME, ""):
            request = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(request, timeout=10).status == want, service
            watch = health.Watch(request, timeout=10)
            assert next(watch).status == want, service
            watch.cancel()
        liveness = health_pb2.HealthCheckRequest(service=LIVENESS)
        assert health.Check(liveness, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert host.health_port is not None
    with grpc.insecure_channel(f"127.0.0.1:{host.health_port}") as plain:
        probe = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert probe.status == health_pb2.HealthCheckResponse.NOT_SERVING  # team b's late model


@pytest.mark.parametrize(
    ("clients", "problem"),
    [
        ([("spiffe://x.example/c", ())], "lists no model_names"),
        ([("not-an-id", ("m",))], "is not a SPIFFE ID"),
        ([("spiffe://x.example/c", ("bad name!",))], "is not a model name"),
        ([("spiffe://x.example/c", ("m",)), ("spiffe://x.example/c", ("n",))], "listed twice"),
    ],
)
def test_the_list_is_checked_when_the_configuration_loads(
    clients: list[tuple[str, tuple[str, ...]]], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        InferenceConfig(
            model_store="localhost:1",
            key_broker="localhost:1",
            clients=tuple(ClientScope(s, n) for s, n in clients),
        )
