"""Server and client certificates rotate under continuous load without a single failed RPC."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.api.keybroker.v1 import keybroker_pb2, keybroker_pb2_grpc
from strongroom.pki import RenewalPolicy, StepCa, WorkloadIdentity
from strongroom.pki._files import memory_file
from tests.pki.helpers import ECHO, enrol, serve

_log = logging.getLogger(__name__)

LIFETIME = timedelta(seconds=20)
# Renew at ~8% of the 20 s lifetime so that three rotations take ~5 s.
POLICY = RenewalPolicy(fraction=0.08, jitter=0.02, backoff_initial=0.2, backoff_max=1.0)
ROTATIONS = 3
CLIENT_THREADS = 4


class _KeyBroker(keybroker_pb2_grpc.KeyBrokerServiceServicer):
    def GetChallenge(
        self, request: keybroker_pb2.GetChallengeRequest, context: grpc.ServicerContext
    ) -> keybroker_pb2.GetChallengeResponse:
        return keybroker_pb2.GetChallengeResponse()


def _served_serial(port: int, client: WorkloadIdentity) -> int:
    """The serial of the certificate the server presents to a NEW connection right now."""
    credentials = client.credentials
    context = ssl.create_default_context(cadata=client.root_pem.decode())
    context.set_alpn_protocols(["h2"])
    with memory_file(credentials.chain_pem + credentials.key_pem) as path:
        context.load_cert_chain(path)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="keybroker") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_under_load_fails_no_rpc(ca: StepCa) -> None:
    server_identity = enrol(ca, "keybroker", ["keybroker"], lifetime=LIFETIME, policy=POLICY)
    client_identity = enrol(ca, "inference", lifetime=LIFETIME, policy=POLICY)
    broker = _KeyBroker()  # type: ignore[abstract]  # only GetChallenge is exercised
    server = serve(
        server_identity,
        extra=lambda s: keybroker_pb2_grpc.add_KeyBrokerServiceServicer_to_server(broker, s),
    )
    channel = client_identity.channel(server.target, server_name="keybroker")
    health_stub = health_pb2_grpc.HealthStub(channel)
    broker_stub = keybroker_pb2_grpc.KeyBrokerServiceStub(channel)
    ping = channel.unary_unary(f"/{ECHO}/Ping")
    count = channel.unary_stream(f"/{ECHO}/Count")
    chat = channel.stream_stream(f"/{ECHO}/Chat")

    stop = threading.Event()
    lock = threading.Lock()
    totals = {"ok": 0, "failed": 0}
    failures: list[str] = []

    def worker(index: int) -> None:
        calls: list[Callable[[], object]] = [
            lambda: health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10),
            lambda: broker_stub.GetChallenge(keybroker_pb2.GetChallengeRequest(), timeout=10),
            lambda: ping(b"x", timeout=10),
            lambda: list(count(b"3", timeout=10)),
            lambda: list(chat(iter([b"a", b"b"]), timeout=10)),
        ]
        n = index
        while not stop.is_set():
            try:
                calls[n % len(calls)]()
                outcome = "ok"
            except grpc.RpcError as exc:
                outcome = "failed"
                failures.append(f"{exc.code()}: {exc.details()}")
            n += 1
            with lock:
                totals[outcome] += 1

    # A long-lived server stream opened before any rotation must survive all of them.
    watch = health_stub.Watch(health_pb2.HealthCheckRequest(service="model"), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    try:
        deadline = started + 45
        while time.monotonic() < deadline and (
            server_identity.generation <= ROTATIONS or client_identity.generation <= ROTATIONS
        ):
            time.sleep(0.2)
        time.sleep(0.5)  # some load on the last certificates too
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
    elapsed = time.monotonic() - started

    server.health.set("model", health_pb2.HealthCheckResponse.SERVING)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    served = _served_serial(server.port, client_identity)
    rotations = (server_identity.generation - 1, client_identity.generation - 1)
    _log.warning(
        "rotation under load: %d RPCs ok, %d failed, rotations server/client %s, channel rebuilds %d, %.1fs",
        totals["ok"],
        totals["failed"],
        rotations,
        channel.rebuilds,
        elapsed,
    )
    channel.close()
    server.stop()
    server_identity.close()
    client_identity.close()

    assert failures == [], failures[:5]
    assert totals["failed"] == 0
    assert totals["ok"] > 100
    assert min(rotations) >= ROTATIONS
    assert channel.rebuilds >= ROTATIONS
    # The server hot-swapped: new connections get its current certificate.
    assert served == server_identity.credentials.serial


def test_rotating_channel_behaves_like_a_grpc_channel(
    server_identity: WorkloadIdentity, client_identity: WorkloadIdentity
) -> None:
    server = serve(server_identity)
    states: list[grpc.ChannelConnectivity] = []
    try:
        channel = client_identity.channel(server.target, server_name="keybroker")
        channel.subscribe(states.append, try_to_connect=True)
        ping = channel.unary_unary(f"/{ECHO}/Ping", None, None)
        response, call = ping.with_call(b"a", timeout=5)
        assert response == b"a" and call.code() == grpc.StatusCode.OK
        assert ping.future(b"b", timeout=5).result() == b"b"
        concat = channel.stream_unary(f"/{ECHO}/Concat", None, None)
        assert concat.future(iter([b"c", b"d"]), timeout=5).result() == b"cd"

        # A server stream opened before a rotation keeps flowing after it.
        count = channel.unary_stream(f"/{ECHO}/Count", None, None)
        stream = iter(count(b"3", timeout=5))
        assert next(stream) == b"0"
        client_identity.renew_now()
        assert ping(b"e", timeout=5) == b"e"  # new call, new channel
        assert channel.rebuilds == 1
        assert [*stream] == [b"1", b"2"]  # the in-flight call finished on the old channel

        # Interceptors stack on it like on any channel.
        seen: list[str] = []

        class Record(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
            def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
                seen.append(details.method)
                return continuation(details, request)

        intercepted = grpc.intercept_channel(channel, Record())
        assert intercepted.unary_unary(f"/{ECHO}/Ping", None, None)(b"f", timeout=5) == b"f"
        assert seen == [f"/{ECHO}/Ping"]
        assert grpc.ChannelConnectivity.READY in states
        channel.unsubscribe(states.append)
        channel.close()
        with pytest.raises(ValueError, match="closed"):
            ping(b"g", timeout=5)
    finally:
        server.stop()


def test_short_lived_multicallables_of_different_kinds_never_mix(
    server_identity: WorkloadIdentity, client_identity: WorkloadIdentity
) -> None:
    """Multi-callables made and dropped per call (ids get reused) must each reach their own method."""
    server = serve(server_identity)
    try:
        channel = client_identity.channel(server.target, server_name="keybroker")
        for i in range(200):
            payload = str(i).encode()
            assert channel.unary_unary(f"/{ECHO}/Ping", None, None)(payload, timeout=5) == payload
            concat = channel.stream_unary(f"/{ECHO}/Concat", None, None)
            assert concat(iter([payload, b"!"]), timeout=5) == payload + b"!"
        channel.close()
    finally:
        server.stop()
