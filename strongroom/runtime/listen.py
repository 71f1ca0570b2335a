"""Binding a gRPC server's port, with the reason a bind failed.

grpcio (1.85) raises ``RuntimeError("Failed to bind to address ...")`` for a port it cannot bind,
naming the address but not why (that is in its debug log only), where older versions returned a
port of 0: a service whose port another process held stopped on a traceback, with nothing in its
own log. :func:`add_port` raises :class:`~strongroom.errors.Unavailable` instead, naming the
address and the system's reason, found by binding the address once more with a plain socket.
"""

from __future__ import annotations

import errno
import socket
from typing import Protocol

import grpc

from strongroom.errors import Unavailable
from strongroom.reasons import Reason


class _Ports(Protocol):
    """What :func:`add_port` binds: a ``grpc.Server`` or a ``grpc.aio.Server``."""

    def add_insecure_port(self, address: str) -> int: ...

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int: ...


def add_port(server: _Ports, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds ``server`` to ``listen`` (TLS with ``credentials``, else plaintext); the port bound.
    Raises :class:`~strongroom.errors.Unavailable`, ``LISTEN_ADDRESS_IN_USE`` when another socket
    holds the address, else ``LISTEN_FAILED`` with the system's reason when there is one."""
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:  # gRPC's "Failed to bind": the address, not why
        raise cannot_listen(listen) from exc
    if port == 0:  # what older grpcio answered instead
        raise cannot_listen(listen)
    return port


def cannot_listen(listen: str) -> Unavailable:
    """The error for ``listen``, which gRPC could not bind: why, as the system says."""
    why = bind_error(listen)
    if why is not None and why.errno == errno.EADDRINUSE:
        return Unavailable(
            f"cannot listen on {listen}: the address is in use (another process holds the port)",
            reason=Reason.LISTEN_ADDRESS_IN_USE,
        )
    detail = why.strerror if why is not None and why.strerror else "gRPC could not bind it"
    return Unavailable(f"cannot listen on {listen}: {detail}", reason=Reason.LISTEN_FAILED)


def bind_error(listen: str) -> OSError | None:
    """Why binding ``listen`` (``host:port``, ``[v6]:port``) to a TCP socket fails now, or None
    (it binds, or the address is not one a plain socket can try: a ``unix:`` path, a name that
    does not resolve). The socket is set as gRPC sets its own (``SO_REUSEADDR``, no
    ``SO_REUSEPORT``), so that what fails here is what failed there, and closed at once."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or host.startswith("unix"):
        return None
    host = host.removeprefix("[").removesuffix("]")
    try:
        found = socket.getaddrinfo(
            host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError, ValueError):  # gaierror is an OSError
        return None
    for family, kind, proto, _, address in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            return exc
    return None
