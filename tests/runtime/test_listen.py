"""A service's ports that cannot be bound: the error names the address and the system's reason
(grpcio's own RuntimeError names the address only)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from strongroom.errors import Unavailable
from strongroom.reasons import Reason
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.listen import bind_error
from strongroom.runtime.server import ServiceHost


@pytest.fixture
def taken() -> Iterator[str]:
    """A loopback address another socket listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


def _host(listen: str, health_listen: str | None = None) -> ServiceHost:
    return ServiceHost(
        listen=listen,
        credentials=None,
        services=[],
        health_listen=health_listen,
        config=ServerConfig(grace_seconds=0.2),
    )


def test_a_service_port_taken_is_named_in_use(taken: str) -> None:
    with pytest.raises(Unavailable) as info:
        _host(taken)
    assert info.value.reason == Reason.LISTEN_ADDRESS_IN_USE
    assert info.value.message == (
        f"cannot listen on {taken}: the address is in use (another process holds the port)"
    )


def test_a_health_port_taken_is_named_in_use(taken: str) -> None:
    """The plaintext health port (``health_listen``) is bound by an asyncio gRPC server, whose
    failure was grpcio's RuntimeError too."""
    with pytest.raises(Unavailable) as info:
        _host("127.0.0.1:0", health_listen=taken)
    assert info.value.reason == Reason.LISTEN_ADDRESS_IN_USE
    assert taken in info.value.message


def test_an_address_not_of_this_machine_says_the_systems_reason() -> None:
    """192.0.2.1 (TEST-NET-1) is no address of this machine's: not "in use", but what the system
    says of it."""
    with pytest.raises(Unavailable) as info:
        _host("192.0.2.1:0")
    assert info.value.reason == Reason.LISTEN_FAILED
    assert info.value.message == "cannot listen on 192.0.2.1:0: Cannot assign requested address"


def test_the_probe_binds_as_grpc_does(taken: str) -> None:
    """A free port binds (and is let go at once); a taken one is EADDRINUSE; what a plain socket
    cannot try is None, not a guess."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert bind_error(f"127.0.0.1:{port}") is None
    assert bind_error(f"127.0.0.1:{port}") is None  # the probe held nothing
    error = bind_error(taken)
    assert error is not None and error.strerror == "Address already in use"
    for odd in ("unix:/tmp/strongroom.sock", "no-port", "127.0.0.1:http"):
        assert bind_error(odd) is None
