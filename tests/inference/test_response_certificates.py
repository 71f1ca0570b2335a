"""The response memory budget's share per certificate, over real mTLS (certificates from a real
step-ca) and the production interceptor chain: a fleet's replicas share one SPIFFE ID, and one
replica that never takes its responses no longer holds its identity's whole share."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import SERVICE_NAME, OipServicer, ResponseBudget, add_to_server
from strongroom.inference.oip._budget import response_memory
from strongroom.pki import SpiffeAuthorizer, StepCa, WorkloadIdentity
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.server import HEALTH_SERVICE, ServiceHost, ServiceSpec
from tests.inference import onnx_models
from tests.inference.test_response_budget import _until
from tests.inference.unread import UnreadClient
from tests.pki.helpers import TRUST_DOMAIN, enrol, sid

MIB = 1 << 20
ONE_RESPONSE = response_memory(MIB, raw=True)  # a raw response of 1 MiB, by the budget's count


def _request() -> bytes:
    request = pb.ModelInferRequest(model_name="filled")
    request.inputs.add(name="n", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([MIB // 4], "<i8").tobytes())  # 1 MiB of FP32
    return request.SerializeToString()


@pytest.fixture(scope="module")
def server_identity(ca: StepCa) -> Iterator[WorkloadIdentity]:
    identity = enrol(ca, "server", ["localhost"], auto_renew=False)
    yield identity
    identity.close()


def _tls(identity: WorkloadIdentity, where: Path) -> ssl.SSLContext:
    """A client context presenting ``identity``'s certificate (its key in a test's directory:
    the ssl module loads a key from a file only)."""
    key, chain = where / "client.key", where / "client.pem"
    key.write_bytes(identity.credentials.key_pem)
    chain.write_bytes(identity.credentials.chain_pem)
    context = ssl.create_default_context(cadata=identity.root_pem.decode())
    context.check_hostname = False  # the server's SPIFFE ID is not what this test is about
    context.load_cert_chain(chain, key)
    return context


def test_a_replica_that_never_reads_leaves_its_siblings_room(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path
) -> None:
    """Two certificates of one SPIFFE ID: the one that never reads holds its share (half its
    identity's) and its further calls are refused at once, and the other is served. Counted per
    identity alone, the stuck one held the identity's whole share and the other was refused
    ``TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY``."""
    repository = ModelRepository(["filled"])
    repository.load("filled", "1", onnx_models.filled("FP32"))
    budget = ResponseBudget(4 * ONE_RESPONSE, wait_seconds=0)
    oip = OipServicer(repository, response_budget=budget)
    authorizer = SpiffeAuthorizer(
        TRUST_DOMAIN, {SERVICE_NAME: [sid("client")]}, public=(HEALTH_SERVICE,)
    )
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=server_identity.server_credentials(),
        services=[ServiceSpec(SERVICE_NAME, lambda server: add_to_server(oip, server))],
        interceptors=[authorizer],
        config=ServerConfig(),
    )
    host.start()
    stuck = enrol(ca, "client", auto_renew=False)
    sibling = enrol(ca, "client", auto_renew=False)
    channel = sibling.channel(f"localhost:{host.port}", server_id=sid("server"))
    unread = UnreadClient(
        f"127.0.0.1:{host.port}", f"/{SERVICE_NAME}/ModelInfer", tls=_tls(stuck, tmp_path)
    )
    try:
        for _ in range(3):
            unread.call(_request())
        # One response held, the two past its certificate's share refused at once.
        _until(lambda: unread.ended() == 2)
        assert budget.held_by(sid("client")) == ONE_RESPONSE
        response = GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest.FromString(_request()), timeout=30
        )
        assert len(response.raw_output_contents[0]) == MIB
    finally:
        unread.close()
        channel.close()
        host.stop(0)
        stuck.close()
        sibling.close()
    _until(lambda: budget.free == budget.max_bytes)
