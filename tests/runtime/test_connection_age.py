"""Connections are recycled: gRPC core frees some of what it keeps per connection only when the
connection closes, so a long-lived caller's connection must not live for ever (issue 12)."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.runtime.config import ConfigError, ServerConfig
from strongroom.runtime.server import ServiceHost, ServiceSpec

SERVICE = "test.Age"


def _peer_service() -> ServiceSpec:
    def peer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return context.peer().encode()  # ipv4:127.0.0.1:<client port>: one per connection

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Peer": grpc.unary_unary_rpc_method_handler(peer)}
    )
    return ServiceSpec(SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))


def _peers_seen(config: ServerConfig, seconds: float) -> tuple[set[bytes], int]:
    """Calls the host once every 0.1 s on one channel for ``seconds``; returns the distinct client
    addresses the server saw and the number of calls (every one must succeed)."""
    host = ServiceHost(
        listen="127.0.0.1:0", credentials=None, services=[_peer_service()], config=config
    )
    host.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{host.port}")
    try:
        call = channel.unary_unary(f"/{SERVICE}/Peer", None, None)
        peers: set[bytes] = set()
        calls = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peers.add(call(b"", timeout=10))
            calls += 1
            time.sleep(0.1)
        return peers, calls
    finally:
        channel.close()
        host.stop(0)


def test_an_old_connection_is_replaced_and_no_call_fails() -> None:
    config = ServerConfig(max_connection_age_seconds=1, max_connection_age_grace_seconds=1)
    peers, calls = _peers_seen(config, 4.0)
    assert calls >= 10  # calls went on across the reconnect, and none failed (none raised)
    assert len(peers) >= 2, peers  # the client reconnected after the server's GOAWAY


def test_age_zero_keeps_the_connection() -> None:
    peers, _ = _peers_seen(ServerConfig(max_connection_age_seconds=0), 2.5)
    assert len(peers) == 1


def test_the_default_recycles_connections_within_an_hour() -> None:
    options = dict(ServerConfig().connection_age_options)
    assert 0 < options["grpc.max_connection_age_ms"] <= 3_600_000
    assert options["grpc.max_connection_age_grace_ms"] > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_connection_age_seconds": 0.5}, "max_connection_age_seconds"),
        ({"max_connection_age_seconds": -1}, "max_connection_age_seconds"),
        ({"max_connection_age_seconds": 10**7}, "max_connection_age_seconds"),
        ({"max_connection_age_grace_seconds": 0}, "max_connection_age_grace_seconds"),
    ],
)
def test_out_of_range_connection_ages_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**settings)  # type: ignore[arg-type]


def test_a_plaintext_health_watch_does_not_hold_its_connection_for_ever() -> None:
    """The plaintext health port (no certificate needed) had neither connection age nor
    keepalive: a Watch, of anyone or of a peer that vanished, held its connection and its watcher
    for the process's life. Its connections age as the service port's do now."""
    host = ServiceHost(
        listen="127.0.0.1:0",
        credentials=None,
        services=[_peer_service()],
        health_listen="127.0.0.1:0",
        config=ServerConfig(max_connection_age_seconds=1, max_connection_age_grace_seconds=1),
    )
    host.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.health_port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                next(watch)  # no further status: the stream ends with its connection
            assert info.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    finally:
        host.stop(0)
