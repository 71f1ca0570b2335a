"""Whether a port is free for a new listener, as the tests that stop hosts need to know."""

from __future__ import annotations

import socket


def listenable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a new server could listen on ``host:port`` now. The probe sets SO_REUSEADDR as
    gRPC's own listeners do: a connection the stopped server closed first lingers in TIME_WAIT
    on the port for a minute, and without the option that alone refused the bind (CI failed on
    it about once in 15 stops) though nothing listened any more. A listening socket still
    refuses it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
