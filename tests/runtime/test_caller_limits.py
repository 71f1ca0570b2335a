"""Per-identity limits over real mTLS (certificates from a real step-ca): every limit counts a
caller by the SPIFFE ID the authoriser verified, so that no certified identity can take the
server from the others."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.api.inference.v1 import (
    attestation_pb2,
    attestation_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)
from strongroom.attesters import SevGuestAttester
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.errors import StrongroomError
from strongroom.inference.control import CONTROL_SERVICE, ModelControlServicer
from strongroom.inference.evidence_service import InferenceAttestationServicer
from strongroom.inference.loader import ModelLoader
from strongroom.inference.models import ModelRepository
from strongroom.inference.server import CONTROL_PLANE as INFERENCE_CONTROL_PLANE
from strongroom.inference.server import EVIDENCE_SERVICE
from strongroom.pki import SpiffeAuthorizer, StepCa, WorkloadIdentity, authz
from strongroom.pki.authz import verified_caller
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.callers import (
    DISTRUST_SECONDS,
    ROLELESS,
    TRUSTED_WAIT_SECONDS,
    Distrust,
    WorkerShares,
    certificate_share,
)
from strongroom.runtime.config import ConfigError, ServerConfig
from strongroom.runtime.interceptors import PendingRequest, RefusalObserver
from strongroom.runtime.log_refusals import REFUSED_CALLS_BURST
from strongroom.runtime.server import HEALTH_SERVICE, ServiceHost, ServiceSpec
from tests.conftest import buffered_service_log, refused_calls_not_logged
from tests.inference.fake_tee import FakeSevGuest, fake_snp_report
from tests.pki.helpers import TRUST_DOMAIN, enrol, sid
from tests.runtime.held_reads import hold_after_read

SERVICE = "test.Callers"
CONTROL = f"/{SERVICE}/Admin"
"""The mesh's one control-plane method (a service names its own: model control, key admin)."""


def _raw(b: bytes) -> bytes:
    return b


@dataclass
class Slow:
    """A test-only servicer whose calls wait until released (or until their client cancels)."""

    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    # Signalled when a stuck call (one that runs on after its client cancelled) sees its RPC end.
    ended: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def _hold(self, context: grpc.ServicerContext) -> None:
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        self.entered.release()
        while not (self.release.is_set() or cancelled.is_set()):
            self.release.wait(0.05)

    def _stuck(self, context: grpc.ServicerContext) -> None:
        """Like a handler blocked on a slow backend: its RPC's end does not stop it."""
        context.add_callback(self.ended.release)  # after the runtime's own callbacks
        self.entered.release()
        self.release.wait(60)

    def spec(self) -> ServiceSpec:
        def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._hold(context)
            return b"done"

        def hold_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            yield b"held"
            self._hold(context)

        def stuck_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            yield b"held"
            self._stuck(context)
            yield b"late"

        def stuck_upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            next(requests)
            self._stuck(context)
            return b"late"

        def quick(request: bytes, context: grpc.ServicerContext) -> bytes:
            return b"ok"

        def admin(request: bytes, context: grpc.ServicerContext) -> bytes:
            return b"admin"

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            raise RuntimeError("a bug in a handler")

        def abort(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the handler")

        def unary(behaviour: Callable[[bytes, grpc.ServicerContext], bytes]) -> Any:
            return grpc.unary_unary_rpc_method_handler(behaviour, _raw, _raw)

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Hold": unary(hold),
                "Quick": unary(quick),
                "Admin": unary(admin),  # the mesh's control plane
                "Fail": unary(fail),
                "Abort": unary(abort),
                "HoldStream": grpc.unary_stream_rpc_method_handler(hold_stream, _raw, _raw),
                "StuckStream": grpc.unary_stream_rpc_method_handler(stuck_stream, _raw, _raw),
                "StuckUpload": grpc.stream_unary_rpc_method_handler(stuck_upload, _raw, _raw),
            },
        )
        return ServiceSpec(SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))

    def wait_entered(self, count: int) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=30)


@dataclass
class Mesh:
    """A host over mTLS with the production interceptor chain, and callers with certificates."""

    host: ServiceHost
    slow: Slow
    channels: list[grpc.Channel]
    identities: list[WorkloadIdentity]
    ca: StepCa

    def caller(
        self, name: str, dns: tuple[str, ...] = (), lifetime: timedelta = timedelta(minutes=10)
    ) -> grpc.Channel:
        """A channel from a fresh certificate for ``spiffe://…/name`` carrying ``dns`` names."""
        identity = enrol(self.ca, name, dns, lifetime=lifetime, auto_renew=False)
        self.identities.append(identity)
        channel = identity.channel(f"localhost:{self.host.port}", server_id=sid("server"))
        self.channels.append(channel)
        return channel

    def close(self) -> None:
        self.slow.release.set()
        for channel in self.channels:
            channel.close()
        self.host.stop(0)
        for identity in self.identities:
            identity.close()


@pytest.fixture(scope="module")
def server_identity(ca: StepCa) -> Iterator[WorkloadIdentity]:
    identity = enrol(ca, "server", ["localhost"], auto_renew=False)
    yield identity
    identity.close()


@pytest.fixture
def mesh(ca: StepCa, server_identity: WorkloadIdentity) -> Iterator[Callable[..., Mesh]]:
    """Starts a host with the given server settings and extra services (which the inference and
    publisher identities may call) and their control-plane methods or services; stopped at the
    end of the test."""
    started: list[Mesh] = []

    def start(
        *extra: ServiceSpec,
        observers: Mapping[str, RefusalObserver] | None = None,
        control_plane: tuple[str, ...] = (),
        **settings: Any,
    ) -> Mesh:
        slow = Slow()
        services = [slow.spec(), *extra]
        callers = [sid(name) for name in ("inference", "publisher", "client", "admin")]
        authorizer = SpiffeAuthorizer(
            TRUST_DOMAIN, {spec.name: callers for spec in services}, public=(HEALTH_SERVICE,)
        )
        host = ServiceHost(
            listen="127.0.0.1:0",
            credentials=server_identity.server_credentials(),
            services=services,
            interceptors=[authorizer],
            refusal_observers=observers,
            control_plane=(CONTROL, *control_plane),
            config=ServerConfig(**settings),
        )
        host.start()
        running = Mesh(host, slow, [], [], ca)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


WHOLE_CAP = 1024
"""``server.max_calls_per_certificate`` for a test of an identity's own caps, which its one
certificate then holds whole (the default; kept explicit where a test is about the caps)."""


def settled(condition: Callable[[], bool]) -> bool:
    """Waits (bounded) for ``condition``, which the server reaches on its own threads."""
    deadline = time.monotonic() + 30
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def expire(monkeypatch: pytest.MonkeyPatch, not_after: datetime) -> None:
    """From now on a certificate's validity is checked as at a second past ``not_after`` (the
    check's clock, :func:`strongroom.pki.authz.utc_now`): a certificate expires, for whatever
    checks it again, without the test waiting out its lifetime. The authoriser's own clock (bound
    when it is made) is left alone: calls it admits are admitted as before."""
    monkeypatch.setattr(authz, "utc_now", lambda: not_after + timedelta(seconds=1))


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    metadata: Any = info.value.trailing_metadata() or ()  # type: ignore[attr-defined]
    return info.value.code(), dict(metadata).get(REASON_TRAILER)  # type: ignore[attr-defined]


def test_certificates_of_one_spiffe_id_share_one_stream_bucket(mesh: Callable[..., Mesh]) -> None:
    """Two certificates with the same SPIFFE ID and different DNS SANs (both issued by the real
    step-ca): the stream limit keyed on all the SANs joined gave each its own bucket, so one
    identity could hold twice its streams; it is keyed on the verified SPIFFE ID now."""
    running = mesh(max_workers=8, max_streams_per_identity=2)
    first = running.caller("inference", ("a.example",))
    second = running.caller("inference", ("b.example",))
    other = running.caller("publisher")
    hold = [c.unary_stream(f"/{SERVICE}/HoldStream", _raw, _raw) for c in (first, second, other)]
    held = [hold[0](b"", timeout=60) for _ in range(2)]
    for call in held:
        assert next(call) == b"held"
    assert running.host.streams.open_streams(sid("inference")) == 2
    assert refusal(lambda: next(hold[1](b"", timeout=60))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS_PER_IDENTITY",
    )
    admitted = hold[2](b"", timeout=60)  # another identity keeps its own bucket
    assert next(admitted) == b"held"
    for call in [*held, admitted]:
        call.cancel()
    assert settled(lambda: running.host.streams.open_streams(sid("inference")) == 0)


def test_certificates_without_a_usable_identity_share_one_bucket(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection outlives its certificate; public methods (health) still admit it, but no
    identity can be verified. Such callers count in one shared bucket: keyed on their SANs, each
    certificate (of any SPIFFE ID, with any DNS names) had a bucket of its own."""
    running = mesh(max_workers=8, max_streams_per_identity=2)
    stubs = [
        health_pb2_grpc.HealthStub(running.caller(name)) for name in ("inference", "publisher")
    ]
    request = health_pb2.HealthCheckRequest()
    for stub in stubs:  # connected while the certificates are valid
        stub.Check(request, timeout=30)
    expire(monkeypatch, max(i.status().not_after for i in running.identities))
    watches = []
    for _ in range(2):  # one at a time: role-less callers wait for one message at once here
        watches.append(stubs[0].Watch(request, timeout=60))
        next(watches[-1])
    assert running.host.streams.open_streams(ROLELESS) == 2
    assert refusal(lambda: next(stubs[1].Watch(request, timeout=60))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS_PER_IDENTITY",
    )
    for watch in watches:
        watch.cancel()


def test_certificates_of_one_spiffe_id_share_one_attestation_rate(
    mesh: Callable[..., Mesh], server_identity: WorkloadIdentity
) -> None:
    """GetEvidence's per-caller rate was keyed on the certificate's SANs as well: a second
    certificate with another DNS name got a second burst of firmware requests."""
    evidence = InferenceAttestationServicer(
        SevGuestAttester(io=FakeSevGuest()),
        server_identity.public_key_der,
        per_caller_rate=1e-6,  # no token comes back during the test
        per_caller_burst=2,
    )
    spec = ServiceSpec(
        EVIDENCE_SERVICE,
        lambda server: attestation_pb2_grpc.add_InferenceAttestationServiceServicer_to_server(
            evidence, server
        ),
    )
    running = mesh(spec)
    stubs = [
        attestation_pb2_grpc.InferenceAttestationServiceStub(running.caller(name, dns))
        for name, dns in (("inference", ("a.example",)), ("inference", ("b.example",)))
    ]
    request = attestation_pb2.GetEvidenceRequest(nonce=bytes(16))
    for _ in range(2):
        assert stubs[0].GetEvidence(request, timeout=30).report_data
    assert refusal(lambda: stubs[1].GetEvidence(request, timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ATTESTATION_RATE_LIMITED",
    )
    other = attestation_pb2_grpc.InferenceAttestationServiceStub(running.caller("publisher"))
    assert other.GetEvidence(request, timeout=30).report_data


def test_one_identity_cannot_hold_every_worker_with_slow_unary_calls(
    mesh: Callable[..., Mesh],
) -> None:
    """Streams were capped per identity, unary calls not: one identity's slow calls (a release
    waiting on the HSM, a Stat against a slow backend) could take every worker thread and queue
    everyone else. Its calls beyond the cap are refused at once; another identity is served; a
    method's refusal observer (the key broker audits refused releases) hears of the refusal,
    and of the caller's bucket by the limits' rule (role-less callers all in one)."""
    observed: list[tuple[str, str, str]] = []

    def observer(exc: StrongroomError, context: grpc.ServicerContext, bucket: str) -> None:
        observed.append((exc.status_name, exc.reason, bucket))

    running = mesh(
        observers={f"/{SERVICE}/Quick": observer}, max_workers=8, max_unary_calls_per_identity=2
    )
    first = running.caller("inference", ("a.example",))
    second = running.caller("inference", ("b.example",))  # the same identity, another SAN
    other = running.caller("publisher")
    hold = first.unary_unary(f"/{SERVICE}/Hold", _raw, _raw)
    held = [hold.future(b"", timeout=60) for _ in range(2)]
    running.slow.wait_entered(2)
    assert running.host.unary.running(sid("inference")) == 2
    for channel in (first, second):
        quick = channel.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
        assert refusal(lambda: quick(b"", timeout=30)) == (  # noqa: B023 (called at once)
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_UNARY_CALLS_PER_IDENTITY",
        )
    # The observer is told whose bucket the refusal counts in, by the limits' rule.
    assert (
        observed
        == [("RESOURCE_EXHAUSTED", "TOO_MANY_UNARY_CALLS_PER_IDENTITY", sid("inference"))] * 2
    )
    assert other.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done", b"done"]
    assert running.host.unary.running(sid("inference")) == 0
    assert first.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    # Identities no rule names: one bucket for the observer (the broker's audit budget), as for
    # every limit, however many of them there are.
    observed.clear()
    for name in ("stranger-a", "stranger-b"):
        stranger = running.caller(name).unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
        assert refusal(lambda: stranger(b"", timeout=30))[0] == (  # noqa: B023 (called at once)
            grpc.StatusCode.PERMISSION_DENIED
        )
    assert observed == [("PERMISSION_DENIED", "PEER_NOT_ALLOWED", ROLELESS)] * 2


def test_a_unary_call_is_released_however_it_ends(mesh: Callable[..., Mesh]) -> None:
    """An exception, an abort and a cancelled call each give the caller's slot back (with one
    slot, a slot kept by any of them would refuse the call after it)."""
    running = mesh(max_workers=4, max_unary_calls_per_identity=1)
    channel = running.caller("inference")
    quick = channel.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
    ends = {"Fail": grpc.StatusCode.INTERNAL, "Abort": grpc.StatusCode.FAILED_PRECONDITION}
    for method, code in ends.items():
        ending = channel.unary_unary(f"/{SERVICE}/{method}", _raw, _raw)
        assert refusal(lambda: ending(b"", timeout=30))[0] == code  # noqa: B023 (called at once)
        assert running.host.unary.running(sid("inference")) == 0
        assert quick(b"", timeout=30) == b"ok"
    held = channel.unary_unary(f"/{SERVICE}/Hold", _raw, _raw).future(b"", timeout=60)
    running.slow.wait_entered(1)
    assert refusal(lambda: quick(b"", timeout=30))[1] == "TOO_MANY_UNARY_CALLS_PER_IDENTITY"
    held.cancel()  # the handler sees the cancellation and returns
    assert settled(lambda: running.host.unary.running(sid("inference")) == 0)
    assert quick(b"", timeout=30) == b"ok"


def flood(running: Mesh, *names: str, calls: int = 8) -> list[grpc.Future[Any]]:
    """Each of ``names`` sends ``calls`` slow data-plane calls at once; returns their futures
    once every one was either admitted (its handler holds a worker) or refused. Whatever the
    flooders hold must leave their refusals (and everyone else) a worker, or they never settle."""
    held: list[grpc.Future[Any]] = [
        running.caller(name).unary_unary(f"/{SERVICE}/Hold", _raw, _raw).future(b"", timeout=60)
        for name in names
        for _ in range(calls)
    ]
    cap = running.host.unary.running
    assert settled(
        lambda: sum(f.done() for f in held) + sum(cap(sid(n)) for n in names) == len(held)
    ), f"the flood did not settle: {sum(f.done() for f in held)} of {len(held)} answered"
    return held


@pytest.mark.parametrize(
    ("name", "method", "answer"),
    [("client", f"/{SERVICE}/Quick", b"ok"), ("admin", CONTROL, b"admin")],
    ids=["third-identity", "control-plane"],
)
def test_two_identities_flooding_cannot_stop_a_third_or_the_control_plane(
    mesh: Callable[..., Mesh], name: str, method: str, answer: bytes
) -> None:
    """Two identities each at the per-identity cap (then half the workers) held every worker
    between them: a third identity's call, and the operator's (model control, key
    administration), queued until a flooder let go. Now each identity stops just under half the
    data-plane workers and a reserve is kept for the control plane, so both are served (and
    health checks too) while the flood holds all it may."""
    running = mesh(max_workers=8)  # defaults: 1 worker reserved, 7 data-plane, 3 per identity
    held = flood(running, "inference", "publisher")
    assert [running.host.unary.running(sid(n)) for n in ("inference", "publisher")] == [3, 3]
    refused = [f for f in held if f.done()]
    assert {refusal(f.result)[1] for f in refused} == {"TOO_MANY_UNARY_CALLS_PER_IDENTITY"}
    channel = running.caller(name)
    assert channel.unary_unary(method, _raw, _raw)(b"", timeout=30) == answer
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held if f not in refused] == [b"done"] * 6


def test_data_plane_calls_beyond_their_share_are_refused_at_once(
    mesh: Callable[..., Mesh],
) -> None:
    """With every data-plane worker held (three identities' slow calls), a fourth identity's
    data-plane call, unary or a blocking stream, is refused at once with
    DATA_PLANE_WORKERS_BUSY, and a method's refusal observer hears of it (the key broker audits
    a release refused so); the reserved worker still serves a control-plane call, and every
    worker comes back once the calls end."""
    observed: list[tuple[str, str]] = []

    def observer(exc: StrongroomError, context: grpc.ServicerContext, bucket: str) -> None:
        observed.append((exc.status_name, exc.reason))

    running = mesh(observers={f"/{SERVICE}/Quick": observer}, max_workers=8)
    held = [f for f in flood(running, "inference", "publisher", "client", calls=3) if not f.done()]
    assert len(held) == running.host.shares.held_now() == 7  # 3 + 3 + 1: the data plane is full
    late = running.caller("admin")
    quick = late.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
    assert refusal(lambda: quick(b"", timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DATA_PLANE_WORKERS_BUSY",
    )
    assert observed == [("RESOURCE_EXHAUSTED", "DATA_PLANE_WORKERS_BUSY")]
    stream = late.unary_stream(f"/{SERVICE}/HoldStream", _raw, _raw)
    assert refusal(lambda: next(stream(b"", timeout=30)))[1] == "DATA_PLANE_WORKERS_BUSY"
    assert running.host.streams.open_streams(sid("admin")) == 0  # its refusal took nothing
    assert late.unary_unary(CONTROL, _raw, _raw)(b"", timeout=30) == b"admin"
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done"] * 7
    assert settled(lambda: running.host.shares.held_now() == 0)
    assert quick(b"", timeout=30) == b"ok"


def _idle_loader(repository: ModelRepository) -> ModelLoader:
    """A loader these tests never load with (an unload asks it only for the loads it queues):
    its store channel points nowhere and it has no key release."""
    channel = grpc.insecure_channel("127.0.0.1:9")  # the discard port: nothing is ever sent
    return ModelLoader(repository, store_channel=channel, key_release=cast(KeyReleaseClient, None))


def test_attesting_clients_cannot_take_the_model_control_reserve(
    mesh: Callable[..., Mesh], server_identity: WorkloadIdentity
) -> None:
    """GetEvidence was in the inference service's control plane, whose reserve (4 of the default
    32 workers) equals the evidence requests it lets run at once (4): clients attesting while
    the firmware was slow held the whole reserve, and with the data plane full an operator's
    LoadModel/UnloadModel queued behind them. GetEvidence is data plane now: its slow requests
    hold data-plane workers, and the reserve stays for model control however they pile up."""
    gate, entered = threading.Event(), threading.Semaphore(0)

    def slow_report(report_data: bytes, vmpl: int) -> bytes:
        entered.release()
        gate.wait(60)  # the host stalling the guest's firmware request
        return fake_snp_report(report_data, vmpl)

    evidence = InferenceAttestationServicer(
        SevGuestAttester(io=FakeSevGuest(snp_report=slow_report)),
        server_identity.public_key_der,
        max_per_caller=4,  # one client stands for several here, each with its share
    )
    repository = ModelRepository(expected=["m"])
    control = ModelControlServicer(_idle_loader(repository), repository)
    running = mesh(
        ServiceSpec(
            EVIDENCE_SERVICE,
            lambda server: attestation_pb2_grpc.add_InferenceAttestationServiceServicer_to_server(
                evidence, server
            ),
        ),
        ServiceSpec(
            CONTROL_SERVICE,
            lambda server: model_control_pb2_grpc.add_ModelControlServiceServicer_to_server(
                control, server
            ),
        ),
        control_plane=INFERENCE_CONTROL_PLANE,
        max_unary_calls_per_identity=14,  # two flooders can ask for every data-plane worker
    )
    assert running.host.shares.data_plane == 28  # the defaults: 4 of 32 workers reserved
    attest = attestation_pb2_grpc.InferenceAttestationServiceStub(running.caller("client"))
    request = attestation_pb2.GetEvidenceRequest(nonce=bytes(16))
    try:
        attesting = [attest.GetEvidence.future(request, timeout=60) for _ in range(4)]
        for _ in attesting:  # every evidence slot is taken by a stalled firmware request
            assert entered.acquire(timeout=30)
        held = [f for f in flood(running, "inference", "publisher", calls=14) if not f.done()]
        assert running.host.shares.held_now() == 28  # the data plane is full
        admin = running.caller("admin")
        unload = model_control_pb2_grpc.ModelControlServiceStub(admin).UnloadModel
        assert unload(model_control_pb2.UnloadModelRequest(name="m"), timeout=30) is not None
        assert len(held) == 24  # 4 attesting + 24 inference calls hold the data plane
        more = attestation_pb2_grpc.InferenceAttestationServiceStub(admin)
        assert refusal(lambda: more.GetEvidence(request, timeout=30)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DATA_PLANE_WORKERS_BUSY",
        )
    finally:
        gate.set()
        running.slow.release.set()
    assert all(f.result(timeout=30).report_data for f in attesting)
    assert [f.result(timeout=30) for f in held] == [b"done"] * 24


def test_worker_shares_default_from_the_workers_and_refuse_contradictions() -> None:
    """An eighth of the workers (1 to 16; none with one worker) is the control plane's; the
    per-identity cap is just under half the rest, so that two callers at it leave a third one."""
    defaults = ServerConfig()
    assert (defaults.control_plane_reserve, defaults.data_plane_workers) == (4, 28)
    assert defaults.unary_calls_per_identity == 13
    assert ServerConfig(max_workers=1024).control_plane_reserve == 16
    one = ServerConfig(max_workers=1)
    assert (one.control_plane_reserve, one.data_plane_workers, one.unary_calls_per_identity) == (
        0,
        1,
        1,
    )
    assert ServerConfig(max_workers=8).unary_calls_per_identity == 3
    assert ServerConfig(max_workers=8, control_plane_workers=0).data_plane_workers == 8
    custom = ServerConfig(max_workers=8, control_plane_workers=2, max_unary_calls_per_identity=5)
    assert (custom.data_plane_workers, custom.unary_calls_per_identity) == (6, 5)
    assert ServerConfig(max_workers=2, max_unary_calls_per_identity=1).data_plane_workers == 1
    for value in (0, 7, 8):  # 7: one caller would hold every data-plane worker
        with pytest.raises(ConfigError, match=r"max_unary_calls_per_identity.*data-plane"):
            ServerConfig(max_workers=8, max_unary_calls_per_identity=value)
    for reserve in (-1, 8):
        with pytest.raises(ConfigError, match="control_plane_workers"):
            ServerConfig(max_workers=8, control_plane_workers=reserve)


@pytest.mark.parametrize("method", ["StuckStream", "StuckUpload"])
def test_a_cancelled_stream_counts_until_its_handler_returns(
    mesh: Callable[..., Mesh], method: str
) -> None:
    """A blocking stream's worker was given back when its RPC ended, though a cancelled call's
    handler runs on (a download reading, an upload writing to a slow backend): a caller opening
    and cancelling such streams held ever more workers while the data plane read as free, until
    no worker was left, the control plane's reserve included. A stream now counts until its
    handler returns: beyond the data plane, calls are refused and the reserve stays free."""
    running = mesh(max_workers=8, max_blocking_streams=7)  # 7 data-plane workers, 1 reserved
    # Three callers fill the data plane: one alone holds 3 at most (its bound across kinds).
    channels = [running.caller(name) for name in ("inference", "publisher", "client")]
    gate = threading.Event()  # an upload's client sends one message and then waits

    def upload() -> Iterator[bytes]:
        yield b"part"
        gate.wait(60)

    calls: list[Any] = []
    for n in range(7):
        channel = channels[n % 3]
        if method == "StuckStream":
            stream = channel.unary_stream(f"/{SERVICE}/{method}", _raw, _raw)(b"", timeout=60)
            assert next(stream) == b"held"
            calls.append(stream)
        else:
            stub = channel.stream_unary(f"/{SERVICE}/{method}", _raw, _raw)
            calls.append(stub.future(upload(), timeout=60))
    running.slow.wait_entered(7)
    for call in calls:
        call.cancel()
    for _ in range(7):  # every RPC has ended; every handler still holds its worker
        assert running.slow.ended.acquire(timeout=30)
    assert running.host.shares.held_now() == 7
    assert running.host.streams.open_streams() == 7
    quick = channels[2].unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
    assert refusal(lambda: quick(b"", timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DATA_PLANE_WORKERS_BUSY",
    )
    admin = running.caller("admin")
    assert admin.unary_unary(CONTROL, _raw, _raw)(b"", timeout=30) == b"admin"
    running.slow.release.set()
    gate.set()
    assert settled(lambda: running.host.shares.held_now() == 0)
    assert running.host.streams.open_streams() == 0
    assert quick(b"", timeout=30) == b"ok"


def test_a_caller_that_never_sends_its_request_holds_no_worker_it_was_not_given(
    mesh: Callable[..., Mesh],
) -> None:
    """gRPC read a unary call's request on the call's worker before any interceptor ran: a peer
    that sent a call's headers and never its message held a worker for as long as it liked,
    before the authoriser and every limit, and as many such calls as workers held them all (any
    certificate of the CA: health is public), the control plane's reserve included. The message
    is read now once the authoriser and the limits admitted the call: a caller without the role
    is refused at once, and one allowed to call waits within its cap and the data-plane share
    (a public method's request, health's, is always awaited within them; a role-less caller's,
    within the role-less callers' cap too)."""
    running = mesh(max_workers=8)  # 1 worker reserved, 7 data-plane, 3 unary calls per identity
    stranger = running.caller("stranger")  # a certificate of the CA, and no role at all
    gate = threading.Event()

    def never() -> Iterator[bytes]:  # the call's headers go; its message never does
        gate.wait(60)
        yield from ()

    def stall(method: str) -> grpc.Future[Any]:
        return stranger.stream_unary(method, _raw, _raw).future(never(), timeout=60)

    denied = [stall(f"/{SERVICE}/Quick") for _ in range(8)]
    for call in denied:
        assert refusal(lambda: call.result(timeout=30))[0] == (  # noqa: B023 (called at once)
            grpc.StatusCode.PERMISSION_DENIED
        )
    checks = [stall(f"/{HEALTH_SERVICE}/Check") for _ in range(8)]
    # One waits (the role-less callers' one wait with 7 data-plane workers), as a data-plane call.
    assert settled(lambda: sum(f.done() for f in checks) == 7)
    assert {refusal(f.result)[1] for f in checks if f.done()} <= {
        "TOO_MANY_UNARY_CALLS_PER_IDENTITY",
        "ROLELESS_CALLERS_BUSY",
    }
    assert running.host.shares.held_now() == 1
    admin = running.caller("admin")
    assert admin.unary_unary(CONTROL, _raw, _raw)(b"", timeout=30) == b"admin"
    health = health_pb2_grpc.HealthStub(admin).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    client = running.caller("client")
    assert client.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    gate.set()  # the stalled calls end without a message
    for call in checks:
        if call not in [f for f in checks if f.done()]:
            assert refusal(lambda: call.result(timeout=30)) == (  # noqa: B023 (called at once)
                grpc.StatusCode.INVALID_ARGUMENT,
                "MALFORMED_REQUEST",
            )
    assert settled(lambda: running.host.shares.held_now() == 0)
    assert client.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"


def test_callers_that_never_send_a_health_request_cannot_take_the_control_plane_reserve(
    mesh: Callable[..., Mesh],
) -> None:
    """Each identity had one wait for its request outside the data plane, health included, and
    health is public: with the data plane full, identities (any certificates of the CA) that
    opened a health Check or Watch and never sent its message held a reserved worker each, and
    the operator's UnloadModel queued behind them until their connections aged out. A public
    method's request is awaited within the data plane now: under a full data plane such calls
    are refused at once, and the reserve serves the admin; once the data plane has room they
    wait within it, and give it back when they end."""
    repository = ModelRepository(expected=["m"])
    control = ModelControlServicer(_idle_loader(repository), repository)
    running = mesh(
        ServiceSpec(
            CONTROL_SERVICE,
            lambda server: model_control_pb2_grpc.add_ModelControlServiceServicer_to_server(
                control, server
            ),
        ),
        control_plane=INFERENCE_CONTROL_PLANE,
        max_workers=8,
        control_plane_workers=2,  # 6 data-plane workers, 2 unary calls per identity
    )
    held = [f for f in flood(running, "inference", "publisher", "client", calls=2) if not f.done()]
    assert len(held) == running.host.shares.held_now() == 6  # the data plane is full
    gate = threading.Event()

    def never() -> Iterator[bytes]:  # the call's headers go; its message never does
        gate.wait(60)
        yield from ()

    strangers = [running.caller(f"stranger-{n}") for n in range(3)]  # no role at all
    check, watch = f"/{HEALTH_SERVICE}/Check", f"/{HEALTH_SERVICE}/Watch"
    stalled = [c.stream_unary(check, _raw, _raw).future(never(), timeout=60) for c in strangers]
    for call in stalled:
        assert refusal(lambda: call.result(timeout=30)) == (  # noqa: B023 (called at once)
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DATA_PLANE_WORKERS_BUSY",
        )
    watching = strangers[0].stream_stream(watch, _raw, _raw)(never(), timeout=60)
    assert refusal(lambda: next(watching))[1] == "DATA_PLANE_WORKERS_BUSY"
    unload = model_control_pb2_grpc.ModelControlServiceStub(running.caller("admin")).UnloadModel
    assert unload(model_control_pb2.UnloadModelRequest(name="m"), timeout=30) is not None
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done"] * 6
    assert settled(lambda: running.host.shares.held_now() == 0)
    waiting = strangers[1].stream_unary(check, _raw, _raw).future(never(), timeout=60)
    assert settled(lambda: running.host.shares.held_now() == 1)  # it waits in the data plane
    gate.set()
    assert refusal(lambda: waiting.result(timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )
    assert settled(lambda: running.host.shares.held_now() == 0)


def never_sent(gate: threading.Event) -> Iterator[bytes]:
    """A request stream whose call's headers go and whose message never does (until ``gate``)."""
    gate.wait(60)
    yield from ()


def test_roleless_identities_stalling_health_calls_cannot_starve_the_data_plane(
    mesh: Callable[..., Mesh],
) -> None:
    """Any SPIFFE ID the CA signs for may call health, and each such identity, though the
    authoriser grants it nothing, had a bucket of its own: its unary cap (13) of health Checks
    and its streams (8) of Watches that never sent their message each held a data-plane worker,
    so three certificates held all 28 and a client's call was refused DATA_PLANE_WORKERS_BUSY.
    Role-less callers now share one bucket, and their waits for a message, all together, are
    capped (3 of 28 by default): the others are refused at once, and the client is served."""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP
    )  # the defaults: 32 workers, 28 data-plane, 13 unary calls per identity
    gate = threading.Event()
    check, watch = f"/{HEALTH_SERVICE}/Check", f"/{HEALTH_SERVICE}/Watch"
    stalled: list[Any] = []
    for n in range(3):
        stranger = running.caller(f"stranger-{n}")  # a certificate of the CA, and no role
        checks = stranger.stream_unary(check, _raw, _raw)
        stalled += [checks.future(never_sent(gate), timeout=60) for _ in range(13)]
        watches = stranger.stream_stream(watch, _raw, _raw)
        stalled += [watches(never_sent(gate), timeout=60) for _ in range(8)]
    held = running.host.shares.held_now
    assert settled(lambda: sum(call.done() for call in stalled) + held() == len(stalled))
    client = running.caller("client")
    assert client.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    assert held() == 3 == running.host.unary.roleless_waits()
    reasons = {refusal(call.result)[1] for call in stalled if call.done()}
    assert "ROLELESS_CALLERS_BUSY" in reasons  # the one bucket's caps, met at once, may add theirs
    assert reasons <= {
        "ROLELESS_CALLERS_BUSY",
        "TOO_MANY_UNARY_CALLS_PER_IDENTITY",
        "TOO_MANY_STREAMS_PER_IDENTITY",
    }
    hold = client.unary_unary(f"/{SERVICE}/Hold", _raw, _raw)
    holding = [hold.future(b"", timeout=60) for _ in range(13)]  # the client's whole cap
    running.slow.wait_entered(13)
    gate.set()  # the stalled calls end without a message
    running.slow.release.set()
    assert [f.result(timeout=30) for f in holding] == [b"done"] * 13
    assert settled(lambda: held() == 0 == running.host.unary.roleless_waits())
    stub = health_pb2_grpc.HealthStub(running.caller("stranger-0"))
    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=30)  # its message sent at once
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_an_authorised_callers_health_bursts_pass_while_roleless_callers_stall(
    mesh: Callable[..., Mesh],
) -> None:
    """The role-less callers' cap is theirs alone: while they hold every wait it allows, a burst
    of an authorised caller's health Watches (its stream cap) and Checks, each waiting for its
    message within the caller's own bounds, is answered in full."""
    running = mesh()
    gate = threading.Event()
    check = f"/{HEALTH_SERVICE}/Check"
    strangers = [running.caller(f"stranger-{n}") for n in range(2)]
    stalled = [
        c.stream_unary(check, _raw, _raw).future(never_sent(gate), timeout=60)
        for c in strangers
        for _ in range(4)
    ]
    limit = running.host.unary.roleless_waits
    assert settled(lambda: sum(f.done() for f in stalled) == len(stalled) - 3 and limit() == 3)
    stub = health_pb2_grpc.HealthStub(running.caller("client"))
    request = health_pb2.HealthCheckRequest()
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        for _ in range(3):
            watches = [stub.Watch(request, timeout=60) for _ in range(8)]
            checks = [stub.Check.future(request, timeout=30) for _ in range(13)]
            assert [next(w).status for w in watches] == [serving] * 8
            assert [f.result().status for f in checks] == [serving] * 13
            for w in watches:
                w.cancel()
            assert settled(lambda: running.host.streams.open_streams(sid("client")) == 0)
    finally:
        gate.set()
    assert settled(lambda: limit() == 0)


def test_roleless_request_waits_default_to_an_eighth_of_the_data_plane() -> None:
    """3 of the default 28 data-plane workers, at least 1; a setting that would let role-less
    callers hold every data-plane worker is refused."""
    assert ServerConfig().roleless_request_waits == 3
    assert ServerConfig(max_workers=8).roleless_request_waits == 1
    assert ServerConfig(max_workers=8, max_roleless_request_waits=6).roleless_request_waits == 6
    for value in (0, 7):
        with pytest.raises(ConfigError, match="max_roleless_request_waits"):
            ServerConfig(max_workers=8, max_roleless_request_waits=value)


def test_a_health_call_without_its_message_is_cancelled_after_the_wait_bound(
    mesh: Callable[..., Mesh],
) -> None:
    """A health call that never sent its message held its data-plane worker until its deadline
    (none, if its caller set none) or its connection's age (30 min), whoever called: the wait
    is bounded now (server.health_request_wait_seconds), and the call cancelled past it while
    its caller still sends nothing; its worker comes back, and health answers as before."""
    running = mesh(health_request_wait_seconds=0.2)
    gate = threading.Event()
    check, watch = f"/{HEALTH_SERVICE}/Check", f"/{HEALTH_SERVICE}/Watch"
    try:
        for name in ("stranger", "client"):  # role-less, and with a role
            channel = running.caller(name)
            stalled = channel.stream_unary(check, _raw, _raw).future(never_sent(gate), timeout=10)
            assert refusal(stalled.result)[0] == grpc.StatusCode.CANCELLED
            watching = channel.stream_stream(watch, _raw, _raw)(never_sent(gate), timeout=10)
            assert refusal(lambda: next(watching))[0] == grpc.StatusCode.CANCELLED  # noqa: B023
            assert not gate.is_set()
            assert settled(lambda: running.host.shares.held_now() == 0)
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()


def test_a_health_wait_whose_watchdog_cannot_start_gives_back_its_worker(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog is started by the first health call that waits for its message; when no
    thread could be had, that call's data-plane worker and role-less wait stayed taken for good
    (the failure was raised before the wait's accounting could give them back), and no
    watchdog ever ran again. The call now fails (INTERNAL) with nothing held, and the next
    wait starts the watchdog."""
    running = mesh(health_request_wait_seconds=0.2)
    real = threading.Thread

    class NoWatchdog(real):  # type: ignore[misc,valid-type]
        def start(self) -> None:
            if self.name == "request-watchdog":
                raise RuntimeError("can't start new thread")
            super().start()

    stub = health_pb2_grpc.HealthStub(running.caller("stranger"))  # role-less
    monkeypatch.setattr(threading, "Thread", NoWatchdog)
    code, _ = refusal(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=30))
    monkeypatch.setattr(threading, "Thread", real)
    assert code == grpc.StatusCode.INTERNAL
    assert settled(lambda: running.host.shares.held_now() == 0)
    assert running.host.unary.roleless_waits() == 0
    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    watchdog = running.host.unary._watchdog
    assert watchdog is not None and watchdog.is_alive()


def test_a_health_call_whose_message_came_as_the_watchdog_fired_is_not_cancelled(
    mesh: Callable[..., Mesh],
) -> None:
    """The watchdog chose the calls past the bound, then logged and cancelled each outside its
    lock: a call whose message came in between (the log line can take long on a slow pipe) was
    cancelled though it ran, a Watch serving its caller cut. It is cancelled only while it still
    waits now. (The log line is where this test lets the message in.)"""
    running = mesh(health_request_wait_seconds=0.2)
    channel = running.caller("client")
    watch = f"/{HEALTH_SERVICE}/Watch"
    stalled_gate = threading.Event()
    held = running.host.shares.held_now
    with _LateWatch("no request message", lambda: held() == 0) as late:
        try:
            call = late.start(channel)
            # Another call past the bound is cancelled: the watchdog went on past the first.
            stalled = channel.stream_stream(watch, _raw, _raw)(never_sent(stalled_gate), timeout=60)
            assert refusal(lambda: next(stalled))[0] == grpc.StatusCode.CANCELLED
        finally:
            stalled_gate.set()
    _told_of_not_serving(running, call)
    call.cancel()


class _LateWatch(logging.Handler):
    """A health ``Watch`` whose request message is sent from inside the callers' watchdog's log
    call whose text holds ``line``: after the watchdog chose the calls to cancel and before it
    cancels them. The log call returns once ``read`` holds (the message was read)."""

    def __init__(self, line: str, read: Callable[[], bool]) -> None:
        super().__init__()
        self._line, self._read = line, read
        self._let_in, self._let_go = threading.Event(), threading.Event()
        self._logger = logging.getLogger("strongroom.runtime.callers")

    def emit(self, record: logging.LogRecord) -> None:
        if self._line in record.getMessage() and not self._let_in.is_set():
            self._let_in.set()  # the message goes, and is read, while the watchdog is here
            settled(self._read)
            self._let_go.set()

    def _sent_late(self) -> Iterator[bytes]:
        self._let_in.wait(60)
        yield health_pb2.HealthCheckRequest().SerializeToString()

    def start(self, channel: grpc.Channel) -> Any:
        """The Watch, once the watchdog let its message in."""
        call = channel.stream_stream(f"/{HEALTH_SERVICE}/Watch", _raw, _raw)(
            self._sent_late(), timeout=60
        )
        assert settled(self._let_go.is_set)
        return call

    def __enter__(self) -> _LateWatch:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._let_in.set()


def _told_of_not_serving(running: Mesh, call: Any) -> None:
    """The Watch ``call`` is still watching (never cancelled): told when the server stops serving."""
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    running.host._health.set("", not_serving)
    for response in call:
        if health_pb2.HealthCheckResponse.FromString(response).status == not_serving:
            break


def open_streams(channel: grpc.Channel, count: int) -> tuple[list[Any], list[str | None]]:
    """``count`` slow blocking streams of ``channel``'s caller, opened one by one: those admitted
    (each holds a data-plane worker until released) and the reasons the others were refused."""
    hold = channel.unary_stream(f"/{SERVICE}/HoldStream", _raw, _raw)
    admitted: list[Any] = []
    refused: list[str | None] = []
    for _ in range(count):
        call = hold(b"", timeout=60)
        try:
            assert next(call) == b"held"
            admitted.append(call)
        except grpc.RpcError as exc:
            metadata: Any = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
            refused.append(dict(metadata).get(REASON_TRAILER))
    return admitted, refused


def test_one_identity_holds_no_more_data_plane_workers_than_its_bound_across_kinds(
    mesh: Callable[..., Mesh],
) -> None:
    """The per-identity caps were per kind: one identity held 13 unary calls + 8 blocking
    streams + health calls that never sent their message (each wait holds a data-plane worker
    outside the unary cap), 21+ of the 28 data-plane workers, and two such identities held them
    all. One bound (13 by default) now counts every kind together: its waits beyond it, admitted
    for a moment on trust (a message sent with the call is read at once), are cancelled when
    their message has not come, the caller is trusted no more, and its further data-plane calls
    of any kind are refused TOO_MANY_WORKERS_PER_IDENTITY while another caller is served."""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, health_request_wait_seconds=60
    )  # 28 data-plane workers, 13 per identity
    shares = running.host.shares
    channel = running.caller("inference")
    hold = channel.unary_unary(f"/{SERVICE}/Hold", _raw, _raw)
    held = [hold.future(b"", timeout=60) for _ in range(6)]
    running.slow.wait_entered(6)
    streams, refused = open_streams(channel, 5)
    assert (len(streams), refused) == (5, [])
    gate = threading.Event()
    check, watch = f"/{HEALTH_SERVICE}/Check", f"/{HEALTH_SERVICE}/Watch"
    try:
        stalled: list[Any] = [
            channel.stream_unary(check, _raw, _raw).future(never_sent(gate), timeout=60)
            for _ in range(7)  # with the 6 calls, its unary cap
        ]
        stalled += [
            channel.stream_stream(watch, _raw, _raw)(never_sent(gate), timeout=60) for _ in range(3)
        ]
        # 6 calls + 5 streams + 2 waits: the other 8 waits are cancelled, whatever their kind.
        assert settled(lambda: sum(call.done() for call in stalled) == 8), (
            f"{shares.held_now()} data-plane workers held by one identity"
        )
        # A cancelled call ends for its client before its handler gives its worker back.
        assert settled(lambda: shares.held_now() == 13 == shares.held_now(sid("inference")))
        assert {call.code() for call in stalled if call.done()} == {grpc.StatusCode.CANCELLED}
        over = (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WORKERS_PER_IDENTITY")
        quick = channel.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
        assert refusal(lambda: quick(b"", timeout=30)) == over
        assert open_streams(channel, 1) == ([], ["TOO_MANY_WORKERS_PER_IDENTITY"])
        late = channel.stream_unary(check, _raw, _raw).future(never_sent(gate), timeout=60)
        assert refusal(lambda: late.result(timeout=30)) == over  # no more trust: at once
        other = running.caller("client")
        assert other.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    finally:
        gate.set()
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done"] * 6
    assert settled(lambda: shares.held_now() == 0 == shares.held_now(sid("inference")))


def test_a_third_caller_is_served_while_two_identities_sit_at_their_bound(
    mesh: Callable[..., Mesh],
) -> None:
    """Two identities each opening their unary cap (13) of slow calls and their stream cap (8)
    of slow downloads held 21 + 7 of the 28 data-plane workers: a third caller's call and
    download were refused DATA_PLANE_WORKERS_BUSY. Each stops at its bound across kinds now
    (13), and the third is served."""
    running = mesh()
    held = flood(running, "inference", "publisher", calls=13)
    streams: list[Any] = []
    for name in ("inference", "publisher"):
        admitted, refused = open_streams(running.caller(name), 8)
        streams += admitted
        assert set(refused) <= {"TOO_MANY_WORKERS_PER_IDENTITY"}
    shares = running.host.shares
    assert [shares.held_now(sid(n)) for n in ("inference", "publisher")] == [13, 13]
    third = running.caller("client")
    assert third.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    admitted, refused = open_streams(third, 1)
    assert (len(admitted), refused) == (1, [])
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done"] * 26
    for call in [*streams, *admitted]:
        call.cancel()
    assert settled(lambda: shares.held_now() == 0)


def test_the_bound_across_kinds_defaults_to_just_under_half_the_data_plane() -> None:
    """(data-plane workers - 1) // 2, or an explicit unary cap above that (a cap raised for a
    fleet sharing one identity is not lowered); a bound that lets one caller hold every
    data-plane worker is refused."""
    assert ServerConfig().data_plane_workers_per_identity == 13
    assert ServerConfig(max_workers=8).data_plane_workers_per_identity == 3
    assert ServerConfig(max_workers=1).data_plane_workers_per_identity == 1
    raised = ServerConfig(max_unary_calls_per_identity=20)
    assert raised.data_plane_workers_per_identity == 20
    assert ServerConfig(max_data_plane_workers_per_identity=6).data_plane_workers_per_identity == 6
    for value in (0, 28):
        with pytest.raises(ConfigError, match="max_data_plane_workers_per_identity"):
            ServerConfig(max_data_plane_workers_per_identity=value)


def test_a_certificate_holds_its_whole_identitys_bound_unless_a_share_is_set() -> None:
    """A client of one certificate (a single-replica backend) keeps the whole bound configured
    for its identity: with a share by default (half, 1216294) it lost half of it, and a benchmark
    of 16 callers from one certificate was refused TOO_MANY_CALLS_PER_CERTIFICATE. A fleet sets
    server.max_calls_per_certificate, for which certificate_share is the suggested value (half,
    at least 2, never more than the bound)."""

    def share(**settings: Any) -> int:
        config = ServerConfig(**settings)
        return WorkerShares(
            config.data_plane_workers,
            per_identity=config.data_plane_workers_per_identity,
            per_certificate=config.max_calls_per_certificate,
        ).per_certificate

    assert share() == 13
    assert share(max_workers=8) == 3
    assert [certificate_share(cap) for cap in (13, 3, 1)] == [6, 2, 1]  # half, the floor, the cap
    assert share(max_calls_per_certificate=6) == 6
    assert share(max_calls_per_certificate=9) == 9
    assert share(max_calls_per_certificate=WHOLE_CAP) == 13
    with pytest.raises(ConfigError, match="max_calls_per_certificate"):
        ServerConfig(max_calls_per_certificate=0)


def test_a_refusal_at_a_certificates_share_names_the_setting_that_sets_it() -> None:
    """A certificate's blocking streams count in its share now, so a download can be refused
    TOO_MANY_CALLS_PER_CERTIFICATE: the message named only the identity's bound
    (server.max_data_plane_workers_per_identity), not what sets the share. It names both, and
    what counts in the share."""
    refused = WorkerShares(14, per_identity=6, per_certificate=2).over_share(
        f"{sid('inference')} 1f", "/strongroom.api.modelstore.v1.ModelStoreService/GetModel"
    )
    assert refused.reason == "TOO_MANY_CALLS_PER_CERTIFICATE"
    assert "already holds 2 data-plane workers (server.max_calls_per_certificate" in (
        refused.message
    )
    assert "blocking streams" in refused.message
    assert "its share of its identity's 6 (server.max_data_plane_workers_per_identity" in (
        refused.message
    )


def cancel_stalled_checks(
    running: Mesh, channel: grpc.Channel, gate: threading.Event, count: int
) -> None:
    """``count`` health Checks of ``channel``'s caller whose message never goes (until ``gate``),
    one at a time: each is cancelled by the request watchdog and its worker given back."""
    for _ in range(count):
        stalled = channel.stream_unary(f"/{HEALTH_SERVICE}/Check", _raw, _raw).future(
            never_sent(gate), timeout=10
        )
        assert refusal(stalled.result)[0] == grpc.StatusCode.CANCELLED
        assert settled(lambda: running.host.shares.held_now() == 0)


def stall_watches(channel: grpc.Channel, gate: threading.Event, count: int) -> list[Any]:
    """``count`` health Watches of ``channel``'s caller whose message never goes (until
    ``gate``): each waits for it holding a data-plane worker."""
    watch = channel.stream_stream(f"/{HEALTH_SERVICE}/Watch", _raw, _raw)
    return [watch(never_sent(gate), timeout=60) for _ in range(count)]


def test_a_trusted_wait_whose_watchdog_cannot_start_gives_back_its_worker_and_stop_ends_it(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog of waits admitted on trust beyond their caller's bound (merged beside the
    request watchdog's fixes, without them) looped for the life of the process, a stopped
    host's included, and when no thread could be had for it, the failure was raised before the
    wait's accounting could give back its worker, which stayed taken for good, while the
    never-started thread was kept, so no trusted wait was ever checked again. The call now fails
    (INTERNAL) with nothing held, the next trusted wait starts the watchdog, and stop() ends it."""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=60
    )  # 7 data-plane, 3 per identity
    shares, client = running.host.shares, sid("client")
    channel = running.caller("client")
    real = threading.Thread

    class NoWatchdog(real):  # type: ignore[misc,valid-type]
        def start(self) -> None:
            if self.name == "trusted-wait-watchdog":
                raise RuntimeError("can't start new thread")
            super().start()

    gate = threading.Event()
    try:
        counted = stall_watches(channel, gate, 3)
        assert settled(lambda: shares.held_now(client) == 3 == shares.held_now())
        monkeypatch.setattr(threading, "Thread", NoWatchdog)
        (failed,) = stall_watches(channel, gate, 1)  # beyond the bound: on trust
        assert refusal(lambda: next(failed))[0] == grpc.StatusCode.INTERNAL
        monkeypatch.setattr(threading, "Thread", real)
        assert settled(lambda: shares.held_now() == 3)
        (trusted,) = stall_watches(channel, gate, 1)
        # Past its moment of trust, the watchdog cancels it: the caller is at its bound.
        assert refusal(lambda: next(trusted))[0] == grpc.StatusCode.CANCELLED
        watchdog = running.host.unary._trust_watchdog
        assert watchdog is not None and watchdog.is_alive()
    finally:
        gate.set()
    for call in counted:
        call.cancel()
    running.close()
    watchdog.join(30)
    assert not watchdog.is_alive()


def test_a_trusted_wait_whose_message_came_as_the_watchdog_fired_is_not_cancelled(
    mesh: Callable[..., Mesh],
) -> None:
    """The watchdog of waits admitted on trust chose those still waiting, then logged and
    cancelled each outside its lock (the request watchdog's fix was not applied to it): a call
    whose message came in between was cancelled though it ran, a Watch serving its caller cut.
    It is cancelled only while it still waits now. (The log line lets the message in.)"""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=60
    )  # 7 data-plane, 3 per identity
    shares, client = running.host.shares, sid("client")
    channel = running.caller("client")
    gate = threading.Event()
    # The log call returns once the trusted wait has ended (its message read).
    with _LateWatch("while its caller holds its bound", lambda: shares.held_now() == 3) as late:
        try:
            counted = stall_watches(channel, gate, 3)
            assert settled(lambda: shares.held_now(client) == 3 == shares.held_now())
            call = late.start(channel)
        finally:
            gate.set()
    _told_of_not_serving(running, call)
    for each in [call, *counted]:
        each.cancel()


def test_a_caller_whose_stalled_trusted_waits_were_counted_is_trusted_no_more(
    mesh: Callable[..., Mesh],
) -> None:
    """A trusted wait still waiting after its moment was counted when it then fitted the bound,
    and only one that did not fit made its caller distrusted: a caller letting its older stalled
    waits go just before its trusted ones were due had them counted, then was trusted again for
    as many more, and so held twice its bound (nearly the whole data plane by default) as long as
    it kept that turn. Its further waits beyond the bound are refused at once now."""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=60
    )  # 7 data-plane, 3 per identity
    shares, client, guard = running.host.shares, sid("client"), running.host.unary
    channel = running.caller("client")
    gate = threading.Event()
    try:
        older = stall_watches(channel, gate, 3)
        assert settled(lambda: shares.held_now(client) == 3 == shares.held_now())
        # Trusted until this test says (rather than for 1 s: no race with a loaded machine).
        guard._trust_seconds = 3600
        trusted = stall_watches(channel, gate, 2)  # beyond the bound: on trust
        assert settled(lambda: shares.held_now() == 5)
        for call in older[:2]:  # let two go before the trusted ones are due
            call.cancel()
        assert settled(lambda: shares.held_now() == 3 and shares.held_now(client) == 1)
        with shares.lock:  # now due
            guard._trusted = {c: (0.0, who, cert) for c, (_, who, cert) in guard._trusted.items()}
        # Due, the trusted waits fit the bound again: counted in it, not cancelled.
        assert settled(lambda: shares.held_now(client) == 3)
        guard._trust_seconds = TRUSTED_WAIT_SECONDS
        (again,) = stall_watches(channel, gate, 1)
        assert refusal(lambda: next(again)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_WORKERS_PER_IDENTITY",
        )
        assert shares.held_now() == 3
    finally:
        gate.set()
    for call in [*older, *trusted]:
        call.cancel()
    assert settled(lambda: shares.held_now() == 0)


@pytest.mark.parametrize("ended_by", ["client", "wait bound"])
def test_a_caller_whose_trusted_wait_ended_without_its_message_is_trusted_no_more(
    mesh: Callable[..., Mesh], ended_by: str
) -> None:
    """Only the watchdog of trusted waits, finding one still waiting when due, distrusted its
    caller: a trusted wait its client cancelled before then, or that the request watchdog ended
    first (server.health_request_wait_seconds below TRUSTED_WAIT_SECONDS), left its caller
    trusted, so it could end each stalled wait beyond its bound just before it was due and open
    another, holding the rest of the data plane for good. Such an end distrusts it now."""
    wait = 0.2 if ended_by == "wait bound" else 60
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=wait
    )  # 7 data-plane, 3 per identity
    shares, client, guard = running.host.shares, sid("client"), running.host.unary
    guard._trust_seconds = 3600  # never due: only the wait's own end may distrust
    channel = running.caller("client")
    hold = channel.unary_unary(f"/{SERVICE}/Hold", _raw, _raw)
    held = [hold.future(b"", timeout=60) for _ in range(3)]  # its bound
    running.slow.wait_entered(3)
    assert shares.held_now(client) == 3 == shares.held_now()
    gate = threading.Event()
    try:
        (trusted,) = stall_watches(channel, gate, 1)  # beyond the bound: on trust
        if ended_by == "client":
            assert settled(lambda: shares.held_now() == 4)
            trusted.cancel()
        else:
            assert refusal(lambda: next(trusted))[0] == grpc.StatusCode.CANCELLED
        assert settled(lambda: shares.held_now() == 3)
        (again,) = stall_watches(channel, gate, 1)
        assert refusal(lambda: next(again)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_WORKERS_PER_IDENTITY",
        )
    finally:
        gate.set()
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done"] * 3
    assert settled(lambda: shares.held_now() == 0)


def test_a_stalled_wait_distrusts_its_certificate_not_its_fleet_and_rekeying_buys_one_more(
    mesh: Callable[..., Mesh],
) -> None:
    """Distrust after a stalled trusted wait was keyed by SPIFFE ID: every replica of a fleet
    shares one, so one replica's stall put the whole fleet's health bursts beyond the bound on
    refuse-at-once for 60 s. It is the certificate's now: another certificate of the identity
    still has its waits beyond the bound admitted on trust (and answered), the stalled one's are
    refused at once. A replica renewing onto new serials buys one more moment of trust, no
    more: the second certificate of an identity to stall distrusts the identity whole, a third
    certificate included."""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=60
    )  # 7 data-plane, 3 per identity
    shares, guard = running.host.shares, running.host.unary
    guard._trust_seconds = 3600  # never due: only a wait's own end distrusts here
    stuck, fellow = running.caller("client"), running.caller("client")  # two replicas
    hold = stuck.unary_unary(f"/{SERVICE}/Hold", _raw, _raw)
    held = [hold.future(b"", timeout=60) for _ in range(3)]  # the identity's bound
    running.slow.wait_entered(3)
    over = (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WORKERS_PER_IDENTITY")
    request = health_pb2.HealthCheckRequest()
    serving = health_pb2.HealthCheckResponse.SERVING
    gate = threading.Event()
    try:
        (stalled,) = stall_watches(stuck, gate, 1)  # beyond the bound: on trust
        assert settled(lambda: shares.held_now() == 4)
        stalled.cancel()  # ended without its message: its certificate is distrusted
        assert settled(lambda: shares.held_now() == 3)
        (again,) = stall_watches(stuck, gate, 1)
        assert refusal(lambda: next(again)) == over
        # The fleet's other replica: its burst beyond the bound is still admitted, and answered.
        watches = [health_pb2_grpc.HealthStub(fellow).Watch(request, timeout=60) for _ in range(2)]
        assert [next(w).status for w in watches] == [serving] * 2
        for w in watches:
            w.cancel()
        assert settled(lambda: shares.held_now() == 3)
        # Rekeyed, the stuck replica stalls again from the other serial: the identity is
        # distrusted whole, a fresh certificate's wait beyond the bound refused at once.
        (second,) = stall_watches(fellow, gate, 1)
        assert settled(lambda: shares.held_now() == 4)
        second.cancel()
        assert settled(lambda: shares.held_now() == 3)
        (fresh,) = stall_watches(running.caller("client"), gate, 1)
        assert refusal(lambda: next(fresh)) == over
    finally:
        gate.set()
    running.slow.release.set()
    assert [f.result(timeout=30) for f in held] == [b"done"] * 3
    assert settled(lambda: shares.held_now() == 0)


def test_a_callers_flood_of_calls_the_watchdog_cancels_writes_its_budget_of_lines(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """The watchdog's "cancelling a call: no request message" was no refusal line: a caller
    opening health calls it never sent a message on chose how many of them the service wrote
    (any certificate of the CA: health is public). It is within the caller's budget now, with
    the call's own "rpc failed" (a call's lines all or none), and the rest are counted."""
    handler, stream = buffered_service_log(monkeypatch)  # a clock that never refills
    running = mesh(health_request_wait_seconds=0.2)
    channel = running.caller("client")
    gate = threading.Event()
    calls = REFUSED_CALLS_BURST + 3
    try:
        cancel_stalled_checks(running, channel, gate, calls)
    finally:
        gate.set()
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    cancelled = [r for r in lines if r["msg"] == "cancelling a call: no request message"]
    # The call's own line (REQUEST_MESSAGE_TIMEOUT, however its read saw the cancel) goes with
    # the watchdog's.
    failed = [r for r in lines if r["msg"] == "rpc failed"]
    assert len(cancelled) == len(failed) == REFUSED_CALLS_BURST, lines
    assert refused_calls_not_logged(lines) == {
        (str(sid("client")), "REQUEST_MESSAGE_TIMEOUT"): calls - REFUSED_CALLS_BURST
    }


def test_identities_without_a_role_share_one_budget_of_refusal_lines(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """The refusal lines' budget keyed callers on their SPIFFE ID, while every limit counts the
    identities no rule names as one caller: each such identity (the CA signs for any) had its
    own calls logged, so a holder of many spent everyone's lines a second. They share one budget
    now, the limits' bucket, for the authoriser's denials and for the lines a watchdog writes
    about their stalled health calls from a thread of its own."""
    handler, stream = buffered_service_log(monkeypatch)  # a clock that never refills
    running = mesh(health_request_wait_seconds=0.2)
    strangers = [running.caller(f"stranger-{i}") for i in range(2)]
    gate = threading.Event()
    try:
        for channel in strangers:
            quick = channel.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
            for _ in range(REFUSED_CALLS_BURST):
                assert refusal(lambda: quick(b"", timeout=30))[0] == (  # noqa: B023
                    grpc.StatusCode.PERMISSION_DENIED
                )
            cancel_stalled_checks(running, channel, gate, REFUSED_CALLS_BURST)
    finally:
        gate.set()
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    # Before: each identity's own 5 of each.
    assert len([r for r in lines if r["msg"].startswith("denied RPC")]) == REFUSED_CALLS_BURST
    cancelled = [r for r in lines if r["msg"] == "cancelling a call: no request message"]
    assert len(cancelled) == REFUSED_CALLS_BURST
    assert refused_calls_not_logged(lines) == {
        (ROLELESS, "PEER_NOT_ALLOWED"): REFUSED_CALLS_BURST,
        (ROLELESS, "REQUEST_MESSAGE_TIMEOUT"): REFUSED_CALLS_BURST,
    }


def _ended_by_its_cancel(requests: Iterator[Any]) -> Iterator[Any]:
    """A call's request stream read as gRPC reads it when the empty completion of its pending
    read comes before the record of its cancel (about one run in three): the cancel seen as the
    stream's end."""
    try:
        yield from requests
    except grpc.RpcError:
        return


@pytest.mark.parametrize("watchdog", ["wait bound", "trust"])
def test_a_call_a_watchdog_cancelled_is_refused_for_the_watchdogs_reason_however_its_read_ends(
    mesh: Callable[..., Mesh],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
    watchdog: str,
) -> None:
    """A call a watchdog cancelled for want of its request message (the wait bound's
    REQUEST_MESSAGE_TIMEOUT, the trust's TOO_MANY_WORKERS_PER_IDENTITY) had its empty read taken
    as the end of its request stream in about one run of three, and its "rpc failed" line (what
    a refusal observer hears, the audit of a refused release) said MALFORMED_REQUEST. The read
    ends that way every time here; the watchdog's reason is the call's."""
    real = PendingRequest.__init__

    def init(self: PendingRequest, requests: Iterator[Any], *args: Any) -> None:
        real(self, _ended_by_its_cancel(requests), *args)

    monkeypatch.setattr(PendingRequest, "__init__", init)
    handler, stream = buffered_service_log(monkeypatch)
    if watchdog == "wait bound":
        running = mesh(health_request_wait_seconds=0.2)
        reason, stalls = "REQUEST_MESSAGE_TIMEOUT", 1
    else:  # 7 data-plane workers, 3 per identity: the fourth wait is on trust, then cancelled
        running = mesh(
            max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=60
        )
        reason, stalls = "TOO_MANY_WORKERS_PER_IDENTITY", 4
    channel = running.caller("client")
    gate = threading.Event()
    try:
        counted = stall_watches(channel, gate, stalls - 1)  # kept: a call let go is cancelled
        assert settled(lambda: running.host.shares.held_now() == len(counted))
        (cancelled,) = stall_watches(channel, gate, 1)
        assert refusal(lambda: next(cancelled))[0] == grpc.StatusCode.CANCELLED
    finally:
        gate.set()
    assert settled(lambda: running.host.shares.held_now() == 0)
    handler.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = Counter(r["reason"] for r in lines if r["msg"] == "rpc failed")
    # The others, never cancelled, end when their stream does, without a message.
    assert failed == Counter({reason: 1, "MALFORMED_REQUEST": stalls - 1}), lines


@pytest.mark.parametrize("ending", ["cancel", "deadline", "no message"])
def test_a_unary_call_whose_read_ends_empty_is_refused_for_how_its_caller_ended_it(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """gRPC completes a cancelled call's pending read empty before it records the cancel: a
    unary call (a ReleaseKey) whose caller cancelled, or whose deadline passed, before it sent
    its request was refused MALFORMED_REQUEST at once (and the broker audited it so) whenever
    the empty read came first (now and then in the e2e release test). The read ends that way
    every time here: it is refused CANCELLED or DEADLINE_EXCEEDED, as the refusal observer
    hears, and a caller that really ended its request stream without a message still gets
    MALFORMED_REQUEST."""
    real = PendingRequest.__init__

    def init(self: PendingRequest, requests: Iterator[Any], *args: Any) -> None:
        real(self, _ended_by_its_cancel(requests), *args)

    monkeypatch.setattr(PendingRequest, "__init__", init)
    heard: list[tuple[str, str]] = []
    quick = f"/{SERVICE}/Quick"
    running = mesh(
        observers={quick: lambda exc, _ctx, _bucket: heard.append((exc.status_name, exc.reason))}
    )
    gate = threading.Event()
    call = running.caller("client").stream_unary(quick, _raw, _raw)
    try:
        if ending == "no message":
            future = call.future(iter(()), timeout=30)
        else:
            future = call.future(never_sent(gate), timeout=1 if ending == "deadline" else 30)
            if ending == "cancel":
                assert settled(lambda: running.host.shares.held_now() == 1)  # its read waits
                future.cancel()
        assert settled(lambda: len(heard) == 1)
    finally:
        gate.set()
    expected = {
        "cancel": ("CANCELLED", "CANCELLED"),
        "deadline": ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
        "no message": ("INVALID_ARGUMENT", "MALFORMED_REQUEST"),
    }[ending]
    assert heard == [expected]
    if ending == "no message":
        assert refusal(lambda: future.result(timeout=30)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
        )
    assert settled(lambda: running.host.shares.held_now() == 0)


def test_a_refusal_after_admission_counts_in_the_bucket_the_call_was_admitted_in(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal observer named the caller's bucket by checking its certificate again when the
    refusal came, after the authoriser's verification had ended: a call admitted (and counted by
    the limits) as the inference identity whose request message came only after its certificate
    expired was told to the observer as role-less, so the broker recorded it in the bucket every
    caller without a role shares, naming no one. The observer now hears the bucket and the
    caller the authoriser verified for the call."""
    observed: list[tuple[str, str, str | None]] = []

    def observer(exc: StrongroomError, context: grpc.ServicerContext, bucket: str) -> None:
        try:
            caller: str | None = str(verified_caller(context).spiffe_id)
        except StrongroomError:
            caller = None
        observed.append((exc.reason, bucket, caller))

    running = mesh(observers={f"/{SERVICE}/Quick": observer}, max_workers=8)
    channel = running.caller("inference")
    expires = running.identities[-1].credentials.not_after
    gate = threading.Event()

    def late() -> Iterator[bytes]:  # the call's headers go now; its message never does
        gate.wait(60)
        yield from ()

    call = channel.stream_unary(f"/{SERVICE}/Quick", _raw, _raw).future(late(), timeout=60)
    assert settled(lambda: running.host.unary.running(sid("inference")) == 1)  # admitted
    expire(monkeypatch, expires)
    gate.set()  # the call ends without its message, after the certificate expired
    code, reason = refusal(lambda: call.result(timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Before: (reason, ROLELESS, None).
    assert observed == [(reason, sid("inference"), sid("inference"))]
    assert running.host.unary.running(sid("inference")) == 0


def test_distrust_remembers_a_bounded_number_of_certificates() -> None:
    """The distrust table is per certificate now, and a holder of its service's provisioner
    mints certificates at will: it keeps MAX_CERTIFICATES_TRACKED entries at most (here 4), the
    one distrusted longest ago forgotten first, and a certificate forgotten is only trusted
    again. Expired entries are forgotten; a caller without a certificate of its own (role-less)
    is distrusted as its identity at once."""
    distrust, now = Distrust(max_tracked=4), 1000.0
    identities = [str(sid(f"replica-{n}")) for n in range(3)]
    for n, identity in enumerate(identities):
        distrust.distrust(identity, f"{identity} {n:x}", now)
    assert len(distrust) == 4
    first, last = identities[0], identities[-1]
    assert distrust.trusts(first, f"{first} 0", now)  # forgotten: trusted again
    assert not distrust.trusts(last, f"{last} 2", now)
    assert distrust.trusts(last, f"{last} ff", now)  # another certificate of its identity
    distrust.distrust(ROLELESS, None, now)
    assert not distrust.trusts(ROLELESS, None, now)
    distrust.expire(now + DISTRUST_SECONDS)
    assert len(distrust) == 0
    assert distrust.trusts(last, f"{last} 2", now + DISTRUST_SECONDS)


def test_a_caller_at_its_bound_holds_no_more_than_its_bound_again_on_trust(
    mesh: Callable[..., Mesh],
) -> None:
    """Waits beyond a caller's bound were admitted on trust while the data plane had room, as
    many as it had: one certificate at its bound took every free data-plane worker with waits
    that never sent their message, and every other caller's data-plane call was refused
    DATA_PLANE_WORKERS_BUSY until the trust watchdog acted (up to 1.25 s; twice a minute with a
    second certificate). Its waits on trust are capped at its bound now, so that a caller at its
    bound leaves the others a worker however it bursts; one beyond is refused at once."""
    running = mesh(
        max_calls_per_certificate=WHOLE_CAP, max_workers=8, health_request_wait_seconds=60
    )  # 7 data-plane, 3 per identity
    shares, guard = running.host.shares, running.host.unary
    guard._trust_seconds = 3600  # never due: what is held on trust stays held here
    channel = running.caller("client")
    gate = threading.Event()
    try:
        counted = stall_watches(channel, gate, 3)  # its bound
        assert settled(lambda: shares.held_now() == 3)
        trusted = stall_watches(channel, gate, 3)  # on trust: its bound again
        assert settled(lambda: shares.held_now() == 6)
        (beyond,) = stall_watches(channel, gate, 1)
        # Before: admitted on trust, the whole data plane held, the other caller refused.
        assert refusal(lambda: next(beyond)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_WORKERS_PER_IDENTITY",
        )
        other = running.caller("inference").unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
        assert other(b"", timeout=30) == b"ok"
    finally:
        gate.set()
    for call in counted + trusted:
        call.cancel()
    assert settled(lambda: shares.held_now() == 0)
    assert not guard._on_trust  # every wait on trust given back


def test_a_certificate_at_its_share_holds_no_more_than_its_share_again_on_trust(
    mesh: Callable[..., Mesh],
) -> None:
    """Waits on trust were capped per identity only (at its bound): one replica of a fleet at
    its share (server.max_calls_per_certificate) had its further waits admitted on trust up to
    its identity's whole bound, so that it held its share plus the bound, and the data plane's
    other callers were refused DATA_PLANE_WORKERS_BUSY until the trust watchdog acted. A
    certificate's waits on trust are capped at its share now: one beyond is refused at once
    TOO_MANY_CALLS_PER_CERTIFICATE, while another certificate of the identity keeps its own."""
    running = mesh(
        max_workers=16, max_calls_per_certificate=2, health_request_wait_seconds=60
    )  # 14 data-plane, 6 per identity, 2 per certificate
    shares, guard = running.host.shares, running.host.unary
    guard._trust_seconds = 3600  # never due: what is held on trust stays held here
    stuck, fellow = running.caller("inference"), running.caller("inference")
    gate = threading.Event()
    try:
        counted = stall_watches(stuck, gate, 2)  # its share
        assert settled(lambda: shares.held_now() == 2)
        trusted = stall_watches(stuck, gate, 2)  # on trust: its share again
        assert settled(lambda: shares.held_now() == 4)
        watch = stuck.stream_stream(f"/{HEALTH_SERVICE}/Watch", _raw, _raw)
        beyond = watch(never_sent(gate), timeout=10)
        # Before: admitted on trust (up to the identity's bound of 6), its deadline its end.
        assert refusal(lambda: next(beyond)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_CALLS_PER_CERTIFICATE",
        )
        theirs = stall_watches(fellow, gate, 4)  # the fleet's other replica: its share, on trust
        assert settled(lambda: shares.held_now() == 8)
        assert sorted(guard._on_trust_certificate.values()) == [2, 2]  # each certificate's
    finally:
        gate.set()
    for call in counted + trusted + theirs:
        call.cancel()
    assert settled(lambda: shares.held_now() == 0)
    assert not guard._on_trust  # every wait on trust given back
    assert not guard._on_trust_certificate


def test_a_stuck_replicas_several_stalls_count_once_towards_its_fleet() -> None:
    """A stuck replica stalls every wait it has admitted on trust, several at once: each of its
    certificate's stalls counting towards its identity would distrust its whole fleet on its
    own, the very thing distrust per certificate is for. No test held it (every one passed with
    each stall counted). Its certificate counts once; the second certificate to stall distrusts
    the identity."""
    distrust, now = Distrust(), 1000.0
    fleet = str(sid("inference"))
    stuck, fellow, third = (f"{fleet} {serial:x}" for serial in (1, 2, 3))
    for moment in range(3):  # three of its trusted waits, ended one after the other
        distrust.distrust(fleet, stuck, now + moment / 10)
    assert not distrust.trusts(fleet, stuck, now + 1)
    assert distrust.trusts(fleet, fellow, now + 1)  # before: refused with the whole fleet
    distrust.distrust(fleet, fellow, now + 2)
    assert not distrust.trusts(fleet, third, now + 2)


@pytest.mark.parametrize("watchdog", ["trust", "wait bound"])
def test_a_call_whose_message_was_read_as_a_watchdog_cancelled_its_wait_is_not_processed(
    mesh: Callable[..., Mesh], monkeypatch: pytest.MonkeyPatch, watchdog: str
) -> None:
    """A call the watchdog of its wait cancelled while its handler, its message just read, went
    on was processed for a caller that never got the answer. The release path's test covers the
    request watchdog of a data-plane call (tests/abuse/test_request_wait.py); the same claim
    guards the waits outside the data plane, which no test held to it (both passed with it
    removed): an operator's control-plane call admitted on trust beyond its caller's bound (a
    key change made while its caller saw CANCELLED), and a health wait past its bound. Each
    handler is held between its read and what follows until the watchdog has cancelled its call:
    the call is refused for the watchdog's reason before the method runs (its refusal observer,
    the broker's audit, hears it), and nothing is processed."""
    observed: list[str] = []

    def observer(exc: StrongroomError, context: grpc.ServicerContext, bucket: str) -> None:
        observed.append(exc.reason)

    check = f"/{HEALTH_SERVICE}/Check"
    if watchdog == "trust":  # 7 data-plane workers, 3 per identity: its bound in streams
        method, reason = CONTROL, "TOO_MANY_WORKERS_PER_IDENTITY"
        running = mesh(
            observers={method: observer},
            max_calls_per_certificate=WHOLE_CAP,
            max_workers=8,
            health_request_wait_seconds=60,
        )
    else:
        method, reason = check, "REQUEST_MESSAGE_TIMEOUT"
        running = mesh(observers={method: observer}, health_request_wait_seconds=0.2)
    cut = hold_after_read(monkeypatch, method)
    shares, client = running.host.shares, sid("client")
    channel = running.caller("client")
    gate = threading.Event()
    streams: list[Any] = []
    try:
        if watchdog == "trust":
            streams, refused = open_streams(channel, 3)  # its bound
            assert (len(streams), refused) == (3, [])
            # Its one wait outside the data plane, so that the next is a data-plane wait.
            own = channel.stream_unary(CONTROL, _raw, _raw).future(never_sent(gate), timeout=60)
            assert settled(lambda: client in running.host.unary._waiting)
            assert settled(lambda: shares.held_now() == 3)
            request = b""
        else:
            request = health_pb2.HealthCheckRequest().SerializeToString()
        unary = channel.unary_unary(method, _raw, _raw)
        assert refusal(lambda: unary(request, timeout=30))[0] == grpc.StatusCode.CANCELLED
        assert cut.wait(30)  # its client may hear of the cancel before the handler does
        assert settled(lambda: running.host.unary.running(client) == (1 if streams else 0))
        # The handler refuses it on its own thread once the hold lets go (cut is set just
        # before): read at once, the list was still empty now and then on a loaded machine.
        settled(lambda: bool(observed))
        # Before: [] (the method ran, and answered a cancelled call).
        assert observed == [reason]
    finally:
        gate.set()
    for stream in streams:
        stream.cancel()
    if streams:
        assert refusal(own.result)[0] == grpc.StatusCode.INVALID_ARGUMENT  # ended, no message
    assert settled(lambda: shares.held_now() == 0)


EXITS = "test.StreamExits"
"""A service whose streams end each way a stream can end on the server's side."""


def _exits() -> ServiceSpec:
    def fail_first(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        raise RuntimeError("a bug before the first message")
        yield b"never"  # a generator, like every download handler

    def fail_later(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise RuntimeError("a bug after the first message")

    def abort(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by the handler")
        yield b"never"

    def flood(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        chunk = b"x" * (1 << 20)
        for _ in range(4096):  # far more than any flow-control window
            yield chunk

    def drain(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(len(r) for r in requests)).encode()

    def streaming(behaviour: Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]) -> Any:
        return grpc.unary_stream_rpc_method_handler(behaviour, _raw, _raw)

    handler = grpc.method_handlers_generic_handler(
        EXITS,
        {
            "FailFirst": streaming(fail_first),
            "FailLater": streaming(fail_later),
            "Abort": streaming(abort),
            "Flood": streaming(flood),
            "Drain": grpc.stream_unary_rpc_method_handler(drain, _raw, _raw),
        },
    )
    return ServiceSpec(EXITS, lambda server: server.add_generic_rpc_handlers((handler,)))


def _end_one_stream(running: Mesh, channel: grpc.Channel, ending: str) -> None:
    """Opens one stream of ``channel``'s caller and has it end as ``ending`` says."""
    stop = threading.Event()

    def stalled() -> Iterator[bytes]:
        yield b"first"
        stop.wait(30)

    def trickle() -> Iterator[bytes]:
        for _ in range(40):  # one byte a quarter of the 1 s window: far below the floor
            if stop.is_set():
                return
            yield b"x"
            time.sleep(0.25)

    def drained(requests: Iterator[bytes]) -> tuple[grpc.StatusCode, str | None]:
        drain = channel.stream_unary(f"/{EXITS}/Drain", _raw, _raw)
        try:
            return refusal(lambda: drain(requests, timeout=30))
        finally:
            stop.set()

    if ending in ("cancel", "deadline"):
        call = channel.unary_stream(f"/{SERVICE}/HoldStream", _raw, _raw)(
            b"", timeout=1 if ending == "deadline" else 60
        )
        assert next(call) == b"held"
        if ending == "cancel":
            call.cancel()
        else:
            assert refusal(lambda: list(call))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    elif ending in ("FailFirst", "FailLater", "Abort"):
        call = channel.unary_stream(f"/{EXITS}/{ending}", _raw, _raw)(b"", timeout=30)
        code = (
            grpc.StatusCode.FAILED_PRECONDITION if ending == "Abort" else grpc.StatusCode.INTERNAL
        )
        assert refusal(lambda: list(call))[0] == code
    elif ending == "idle upload":
        assert drained(stalled()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_IDLE_TIMEOUT")
    elif ending == "trickling upload":
        assert drained(trickle()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_TOO_SLOW")
    elif ending == "client stops reading":
        streams = running.host.streams
        before = streams.open_streams(sid("inference"))
        call = channel.unary_stream(f"/{EXITS}/Flood", _raw, _raw)(b"", timeout=60)
        assert len(next(call)) == 1 << 20  # then it reads no more: the watchdog cancels it
        assert settled(lambda: streams.open_streams(sid("inference")) == before)
        assert refusal(lambda: list(call))[0] == grpc.StatusCode.CANCELLED  # what was in flight
    elif ending == "watch cancelled":
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        next(watch)
        watch.cancel()
    else:
        raise AssertionError(ending)


STREAM_ENDINGS = [
    "cancel",
    "deadline",
    "FailFirst",
    "FailLater",
    "Abort",
    "idle upload",
    "trickling upload",
    "client stops reading",
    "watch cancelled",
]
"""Every way a stream ends on the server's side (:func:`_end_one_stream`)."""


@pytest.mark.parametrize("ending", STREAM_ENDINGS)
def test_a_certificates_stream_is_counted_once_and_given_back_once_however_it_ends(
    mesh: Callable[..., Mesh], ending: str
) -> None:
    """server.max_streams_per_certificate's table and the identity's count are given back
    exactly once on every way a stream ends (a cancel, a deadline, a handler's error before or
    after its first message, an abort, the idle timeout, the rate floor, the watchdog of a client
    that stopped reading, a Watch cancelled): with one stream of the certificate kept open
    beside it, the count returns to 1, not 0 (given back twice) nor 2 (leaked), and the share
    admits exactly one more."""
    running = mesh(
        _exits(),
        max_workers=16,
        max_streams_per_identity=4,
        max_streams_per_certificate=2,
        stream_idle_timeout_seconds=1,
    )
    streams = running.host.streams
    inference = sid("inference")
    channel = running.caller("inference")
    kept, refused = open_streams(channel, 1)
    assert refused == []
    _end_one_stream(running, channel, ending)
    assert settled(lambda: streams.open_streams(inference) == 1 == streams.open_streams())
    assert streams.certificates_open() == 1
    more, refused = open_streams(channel, 2)
    assert (len(more), refused) == (1, ["TOO_MANY_STREAMS_PER_CERTIFICATE"])
    for call in [*kept, *more]:
        call.cancel()
    assert settled(lambda: streams.open_streams(inference) == 0 == streams.open_streams())
    assert streams.certificates_open() == 0


@pytest.mark.parametrize("ending", STREAM_ENDINGS)
def test_a_certificates_stream_holds_its_data_plane_share_once_and_gives_it_back_once(
    mesh: Callable[..., Mesh], ending: str
) -> None:
    """A blocking stream's worker counts in its certificate's share of the data-plane bound
    (server.max_calls_per_certificate), not only in its identity's bound: counted there alone,
    one replica's stalled downloads plus its unary waits up to that share held its fleet's
    whole bound. It is given back exactly once however the stream ends, in both shares at once
    (a stream share of 3 is set beside the data-plane share of 2): with one stream kept open
    beside it, the certificate holds 1 worker and 1 stream, not 0 (given back twice) nor 2
    (leaked), and the data-plane share admits exactly one more stream, then refuses a stream
    (within the stream share) and a unary call alike TOO_MANY_CALLS_PER_CERTIFICATE while
    another certificate of the identity is served."""
    running = mesh(
        _exits(),
        max_workers=16,  # 14 data-plane workers, 6 per identity
        max_streams_per_identity=4,
        max_streams_per_certificate=3,
        max_calls_per_certificate=2,
        stream_idle_timeout_seconds=1,
    )
    shares, streams = running.host.shares, running.host.streams
    inference = sid("inference")
    channel = running.caller("inference")
    kept, refused = open_streams(channel, 1)
    assert refused == []
    assert (shares.held_now(inference), shares.certificates_held()) == (1, 1)
    _end_one_stream(running, channel, ending)
    assert settled(lambda: shares.held_now(inference) == 1 == shares.held_now())
    assert settled(lambda: streams.open_streams(inference) == 1 == streams.open_streams())
    assert (shares.certificates_held(), streams.certificates_open()) == (1, 1)
    more, refused = open_streams(channel, 2)
    assert (len(more), refused) == (1, ["TOO_MANY_CALLS_PER_CERTIFICATE"])
    quick = channel.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)
    assert refusal(lambda: quick(b"", timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_CALLS_PER_CERTIFICATE",
    )
    other = running.caller("inference")  # another replica of the fleet
    assert other.unary_unary(f"/{SERVICE}/Quick", _raw, _raw)(b"", timeout=30) == b"ok"
    admitted, refused = open_streams(other, 1)
    assert (len(admitted), refused) == (1, [])
    for call in [*kept, *more, *admitted]:
        call.cancel()
    assert settled(lambda: shares.held_now() == 0 == streams.open_streams())
    assert (shares.certificates_held(), streams.certificates_open()) == (0, 0)


def test_a_certificates_streams_are_given_back_when_the_server_stops(
    mesh: Callable[..., Mesh],
) -> None:
    """A server that stops with a certificate's streams open ends them: its table and its
    identity's count are empty once the handlers returned."""
    running = mesh(max_workers=16, max_streams_per_identity=4, max_streams_per_certificate=2)
    streams = running.host.streams
    admitted, refused = open_streams(running.caller("inference"), 2)
    assert (len(admitted), refused) == (2, [])
    assert streams.certificates_open() == 1
    running.host.stop(0)
    assert settled(lambda: streams.open_streams(sid("inference")) == 0 == streams.open_streams())
    assert streams.certificates_open() == 0


@pytest.mark.parametrize(
    ("limits", "refusal_reason"),
    [
        ({"max_streams_per_identity": 3}, "TOO_MANY_STREAMS_PER_IDENTITY"),
        ({"max_blocking_streams": 3}, "TOO_MANY_STREAMS"),
        ({"max_data_plane_workers_per_identity": 3}, "TOO_MANY_WORKERS_PER_IDENTITY"),
    ],
)
def test_a_stream_refused_past_its_share_or_by_another_limit_counts_nothing(
    mesh: Callable[..., Mesh], limits: dict[str, int], refusal_reason: str
) -> None:
    """A stream the share refuses, or one refused by a limit checked after the share (the
    identity's cap before it; the server's blocking streams and the identity's data-plane
    workers after it), leaves no count in the certificate's table: the certificate it came from
    still opens exactly its share once the others let go."""
    settings = {"max_streams_per_identity": 8, "max_blocking_streams": 12, **limits}
    running = mesh(max_workers=16, max_streams_per_certificate=2, **settings)
    streams = running.host.streams
    first, second = running.caller("inference"), running.caller("inference")
    held, refused = open_streams(first, 3)
    assert (len(held), refused) == (2, ["TOO_MANY_STREAMS_PER_CERTIFICATE"])
    admitted, refused = open_streams(second, 2)  # the third of the limit: one admitted
    assert (len(admitted), refused) == (1, [refusal_reason])
    assert streams.certificates_open() == 2
    assert streams.open_streams(sid("inference")) == 3
    for call in held:
        call.cancel()
    assert settled(lambda: streams.open_streams(sid("inference")) == 1)
    more, refused = open_streams(second, 2)
    assert (len(more), refused) == (1, ["TOO_MANY_STREAMS_PER_CERTIFICATE"])
    for call in [*admitted, *more]:
        call.cancel()
    assert settled(lambda: streams.open_streams(sid("inference")) == 0)
    assert streams.certificates_open() == 0


@pytest.mark.parametrize("share", [None, 3, 4])
def test_a_stream_share_at_or_above_the_identitys_cap_is_no_share(
    mesh: Callable[..., Mesh], share: int | None
) -> None:
    """server.max_streams_per_certificate not set, or at or above max_streams_per_identity, is no
    share: one certificate opens the whole cap, refused TOO_MANY_STREAMS_PER_IDENTITY past it
    (never TOO_MANY_STREAMS_PER_CERTIFICATE), and nothing is counted per certificate."""
    running = mesh(max_workers=16, max_streams_per_identity=3, max_streams_per_certificate=share)
    streams = running.host.streams
    admitted, refused = open_streams(running.caller("inference"), 4)
    assert (len(admitted), refused) == (3, ["TOO_MANY_STREAMS_PER_IDENTITY"])
    assert streams.certificates_open() == 0
    for call in admitted:
        call.cancel()
    assert settled(lambda: streams.open_streams(sid("inference")) == 0)


def test_roleless_callers_have_no_stream_share_and_watch_counts_in_a_certificates(
    mesh: Callable[..., Mesh],
) -> None:
    """Role-less callers (SPIFFE IDs no rule names: one bucket, whatever their certificates)
    have no share beneath their one cap: two such certificates open its 3 Watches between them,
    one of them 2 where the share is 1, and are refused TOO_MANY_STREAMS_PER_IDENTITY past it.
    A certificate with a role holds its share of Watches like any stream: a Watch flood from one
    replica is held to its share, and the rest of its identity's streams stay for the others."""
    running = mesh(max_workers=16, max_streams_per_identity=3, max_streams_per_certificate=1)
    streams = running.host.streams
    request = health_pb2.HealthCheckRequest()
    strangers = [health_pb2_grpc.HealthStub(running.caller(f"stranger-{n}")) for n in range(2)]
    watches = []
    for stub in (strangers[0], strangers[0], strangers[1]):  # one at a time: role-less waits
        watches.append(stub.Watch(request, timeout=60))
        next(watches[-1])
    assert streams.open_streams(ROLELESS) == 3
    assert streams.certificates_open() == 0
    assert refusal(lambda: next(strangers[1].Watch(request, timeout=60))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS_PER_IDENTITY",
    )
    replica = health_pb2_grpc.HealthStub(running.caller("inference"))
    watches.append(replica.Watch(request, timeout=60))
    next(watches[-1])
    assert refusal(lambda: next(replica.Watch(request, timeout=60))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS_PER_CERTIFICATE",
    )
    admitted, refused = open_streams(running.caller("inference"), 1)  # another replica
    assert (len(admitted), refused) == (1, [])
    for call in [*watches, *admitted]:
        call.cancel()
    assert settled(lambda: streams.open_streams(ROLELESS) == 0 == streams.certificates_open())
