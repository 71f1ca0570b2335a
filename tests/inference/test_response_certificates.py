"""The response memory budget's share per certificate, over real mTLS (certificates from a real
step-ca) and the production interceptor chain: a fleet's replicas share one SPIFFE ID, and one
replica that never takes its responses no longer holds its identity's whole share; a call past its
share waits for its own responses without holding anyone back."""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from strongroom.inference.models import ModelRepository, RuntimeOptions
from strongroom.inference.oip import SERVICE_NAME, OipServicer, ResponseBudget, add_to_server
from strongroom.inference.oip._budget import response_memory
from strongroom.pki import SpiffeAuthorizer, StepCa, WorkloadIdentity
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.server import HEALTH_SERVICE, ServiceHost, ServiceSpec
from tests.inference import onnx_models
from tests.inference.test_oip import expect_error
from tests.inference.test_response_budget import _until
from tests.inference.unread import UnreadClient
from tests.pki.helpers import TRUST_DOMAIN, enrol, sid

MIB = 1 << 20
ONE_RESPONSE = response_memory(MIB, raw=True)  # a raw response of 1 MiB, by the budget's count


def _request(size: int = MIB) -> bytes:
    """A request for an output of ``size`` bytes (FP32), 1 MiB by default."""
    request = pb.ModelInferRequest(model_name="filled")
    request.inputs.add(name="n", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([size // 4], "<i8").tobytes())
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


@dataclasses.dataclass
class _Fleet:
    """A served budget and two certificates of one SPIFFE ID (a fleet's two replicas), each with
    a gRPC stub; ``unread`` never takes its responses, over ``stuck``'s certificate."""

    budget: ResponseBudget
    stuck: GRPCInferenceServiceStub
    sibling: GRPCInferenceServiceStub
    unread: UnreadClient
    other: GRPCInferenceServiceStub
    """A caller of another SPIFFE ID (``other``), taking answers of up to 64 MiB."""


@contextlib.contextmanager
def _fleet(
    ca: StepCa,
    server_identity: WorkloadIdentity,
    where: Path,
    budget: ResponseBudget,
    config: ServerConfig | None = None,
) -> Iterator[_Fleet]:
    """The OIP service over real mTLS and the production interceptor chain (``config``: its
    server's), serving ``budget``, its runs in an arena capped at ``budget.arena_bytes``; every
    reservation given back by the end."""
    repository = ModelRepository(
        ["filled"], options=RuntimeOptions(max_inference_memory_bytes=budget.arena_bytes)
    )
    repository.load("filled", "1", onnx_models.filled("FP32"))
    oip = OipServicer(repository, response_budget=budget)
    authorizer = SpiffeAuthorizer(
        TRUST_DOMAIN, {SERVICE_NAME: [sid("client"), sid("other")]}, public=(HEALTH_SERVICE,)
    )
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=server_identity.server_credentials(),
        services=[ServiceSpec(SERVICE_NAME, lambda server: add_to_server(oip, server))],
        interceptors=[authorizer],
        config=config or ServerConfig(),
        message_limits=oip.limits.message_limits,
    )
    host.start()
    stuck = enrol(ca, "client", auto_renew=False)
    sibling = enrol(ca, "client", auto_renew=False)
    other = enrol(ca, "other", auto_renew=False)
    channels = [
        identity.channel(
            f"localhost:{host.port}",
            server_id=sid("server"),
            options=[("grpc.max_receive_message_length", 65 * MIB)],
        )
        for identity in (stuck, sibling, other)
    ]
    unread = UnreadClient(
        f"127.0.0.1:{host.port}", f"/{SERVICE_NAME}/ModelInfer", tls=_tls(stuck, where)
    )
    try:
        stubs = [GRPCInferenceServiceStub(channel) for channel in channels]
        yield _Fleet(budget, stuck=stubs[0], sibling=stubs[1], unread=unread, other=stubs[2])
    finally:
        unread.close()
        for channel in channels:
            channel.close()
        host.stop(0)
        for identity in (stuck, sibling, other):
            identity.close()
    _until(lambda: budget.free == budget.max_bytes)


def _infer(
    stub: GRPCInferenceServiceStub, timeout: float = 60, size: int = MIB
) -> grpc.Future[pb.ModelInferResponse]:
    return stub.ModelInfer.future(pb.ModelInferRequest.FromString(_request(size)), timeout=timeout)


def test_a_replica_that_never_reads_leaves_its_siblings_room(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path
) -> None:
    """Two certificates of one SPIFFE ID: the one that never reads holds its share (half its
    identity's) and its further calls are refused (at once: no wait configured here), and the
    other is served. Counted per identity alone, the stuck one held the identity's whole share
    and the other was refused ``TOO_MUCH_RESPONSE_MEMORY_PER_IDENTITY``."""
    budget = ResponseBudget(4 * ONE_RESPONSE, wait_seconds=0)
    with _fleet(ca, server_identity, tmp_path, budget) as fleet:
        for _ in range(3):
            fleet.unread.call(_request())
        # One response held, the two past its certificate's share refused.
        _until(lambda: fleet.unread.ended() == 2)
        assert budget.held_by(sid("client")) == ONE_RESPONSE
        assert len(_infer(fleet.sibling, 30).result().raw_output_contents[0]) == MIB


def test_two_calls_of_one_certificate_past_its_share_are_both_served_once_its_own_drain(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path
) -> None:
    """A certificate's responses being sent fill its share, and it asks two more at once: they
    were both refused ``TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE`` at once, an outage for an
    honest burst (OIP clients seldom retry). They wait for its own, and are served once those
    are gone."""
    budget = ResponseBudget(8 * ONE_RESPONSE, wait_seconds=60)
    assert budget.per_certificate == 2 * ONE_RESPONSE
    with _fleet(ca, server_identity, tmp_path, budget) as fleet:
        for _ in range(2):
            fleet.unread.call(_request())
        _until(lambda: budget.held_by(sid("client")) == 2 * ONE_RESPONSE)
        burst = [_infer(fleet.stuck) for _ in range(2)]
        _until(lambda: budget.waiting == 2 or all(call.done() for call in burst))
        assert budget.waiting == 2, [call.exception() for call in burst]
        fleet.unread.close()  # its calls end, and their reservations come back
        for call in burst:
            assert len(call.result().raw_output_contents[0]) == MIB


def test_a_never_reading_replicas_call_past_its_share_waits_then_is_refused_for_it(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path
) -> None:
    """Its own first response never taken, its next call waits the configured time for it,
    then is refused for its certificate's share, naming it (not ``RESPONSE_MEMORY_BUSY``: the
    budget has room), and holds nothing."""
    budget = ResponseBudget(4 * ONE_RESPONSE, wait_seconds=3)
    with _fleet(ca, server_identity, tmp_path, budget) as fleet:
        fleet.unread.call(_request())
        _until(lambda: budget.held_by(sid("client")) == ONE_RESPONSE)
        call = _infer(fleet.stuck)
        _until(lambda: budget.waiting == 1 or call.done())
        assert budget.waiting == 1, call.exception()  # it waits
        error = expect_error(
            call.result,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE",
        )
        details = error.details() or ""
        assert f"may hold {budget.per_certificate} bytes together" in details, details
        assert (budget.held_by(sid("client")), budget.waiting) == (ONE_RESPONSE, 0)


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_a_call_waiting_past_its_share_holds_nobody_back_and_ends_with_its_call(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path, how: str
) -> None:
    """A call of the stuck replica waits for its own responses, first in line: its sibling's
    call after it is served meanwhile, and the wait ends when its call does (cancelled, or
    its deadline passed), not after the configured minute, taking nothing."""
    budget = ResponseBudget(4 * ONE_RESPONSE, wait_seconds=60)
    with _fleet(ca, server_identity, tmp_path, budget) as fleet:
        fleet.unread.call(_request())
        _until(lambda: budget.held_by(sid("client")) == ONE_RESPONSE)
        call = _infer(fleet.stuck, timeout=60 if how == "cancelled" else 2)
        _until(lambda: budget.waiting == 1 or call.done())
        assert budget.waiting == 1, call.exception()
        if how == "cancelled":
            assert len(_infer(fleet.sibling).result().raw_output_contents[0]) == MIB
            assert budget.waiting == 1  # the minute is not over: it was not served past
            call.cancel()
            assert call.cancelled()
        else:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _until(lambda: budget.waiting == 0)
        assert budget.held_by(sid("client")) == ONE_RESPONSE


def test_the_calls_a_never_reading_replica_parks_are_bounded_by_its_workers(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path
) -> None:
    """Each call waiting for its own responses holds a data-plane worker (and its run's outputs
    in the arena): a client that never reads parks no more of them than its identity's worker
    bound, the excess refused at once (``TOO_MANY_WORKERS_PER_IDENTITY``)."""
    budget = ResponseBudget(4 * ONE_RESPONSE, wait_seconds=60)
    config = ServerConfig(max_workers=8, max_data_plane_workers_per_identity=2)
    with _fleet(ca, server_identity, tmp_path, budget, config) as fleet:
        fleet.unread.call(_request())
        _until(lambda: budget.held_by(sid("client")) == ONE_RESPONSE)
        parked = [_infer(fleet.stuck) for _ in range(2)]
        _until(lambda: budget.waiting == 2 or any(call.done() for call in parked))
        assert budget.waiting == 2, [call.exception() for call in parked if call.done()]
        expect_error(
            lambda: _infer(fleet.stuck).result(),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_WORKERS_PER_IDENTITY",
        )
        for call in parked:
            call.cancel()
        _until(lambda: budget.waiting == 0)


def test_a_never_reading_replica_parks_calls_within_its_part_of_the_arena_and_others_still_run(
    ca: StepCa, server_identity: WorkloadIdentity, tmp_path: Path
) -> None:
    """Each call waiting for its certificate's own responses keeps its run's outputs in ONNX
    Runtime's arena (64 MiB here: 8 MiB for an identity's waiting calls, 4 MiB a certificate's).
    A replica that never reads fills its share with four 4 MiB answers, then sends nine more
    (within its certificate's worker bound, 13 here, while the four may still hold theirs): one
    waits, the others are refused at once for its share, saying its calls already wait; and
    another identity's 32 MiB run still has room. Parked by its workers alone, the nine held
    36 MiB of the arena and the other run was refused ``INFERENCE_MEMORY_EXHAUSTED``."""
    budget = ResponseBudget(1 << 30, wait_seconds=60, per_caller=192 * MIB, arena_bytes=64 * MIB)
    assert (budget.parked_per_caller, budget.parked_per_certificate) == (8 * MIB, 4 * MIB)
    config = ServerConfig(max_data_plane_workers_per_identity=13, max_calls_per_certificate=13)
    answer = response_memory(4 * MIB, raw=True)  # 20 MiB: four fill the certificate's 96
    with _fleet(ca, server_identity, tmp_path, budget, config) as fleet:
        for _ in range(4):
            fleet.unread.call(_request(4 * MIB))
        _until(lambda: budget.held_by(sid("client")) == 4 * answer)
        parked = [_infer(fleet.stuck, size=4 * MIB) for _ in range(9)]
        _until(lambda: budget.waiting + sum(call.done() for call in parked) == len(parked))
        assert (budget.waiting, budget.parked_by(sid("client"))) == (1, 4 * MIB), [
            call.exception() for call in parked if call.done()
        ]
        refused = [call for call in parked if call.done()]
        assert len(refused) == 8
        for call in refused:
            error = expect_error(
                call.result,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MUCH_RESPONSE_MEMORY_PER_CERTIFICATE",
            )
            details = error.details() or ""
            assert "too many of this certificate's calls already wait" in details, details
            assert f"may hold {4 * MIB} bytes (half of its identity's" in details, details
        theirs = _infer(fleet.other, size=32 * MIB).result()
        assert len(theirs.raw_output_contents[0]) == 32 * MIB
        assert budget.waiting == 1  # the replica's call still waits meanwhile
        for call in parked:
            call.cancel()
        _until(lambda: budget.waiting == 0)
        assert budget.parked_by(sid("client")) == 0
