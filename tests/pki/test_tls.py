"""What TLS the gRPC server and step-ca actually negotiate (measured, not assumed)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from strongroom.pki import CallerIdentity, SpiffeAuthorizer, StepCa, WorkloadIdentity
from strongroom.pki._files import memory_file
from strongroom.pki.errors import PeerUnauthenticated
from tests.pki.helpers import (
    ECHO,
    TRUST_DOMAIN,
    Server,
    default_authorizer,
    default_rules,
    serve,
    sid,
)

TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


@pytest.fixture(scope="module")
def server(server_identity: WorkloadIdentity) -> Iterator[Server]:
    running = serve(server_identity)
    yield running
    running.stop()


def _context(identity: WorkloadIdentity, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=identity.root_pem.decode())
    context.set_alpn_protocols(["h2"])
    for name, value in versions.items():
        setattr(context, name, value)
    credentials = identity.credentials
    with memory_file(credentials.chain_pem + credentials.key_pem) as path:
        context.load_cert_chain(path)
    return context


def _handshake(port: int, context: ssl.SSLContext, server_name: str) -> tuple[str, str, str]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        cipher = tls.cipher()
        return str(tls.version()), str(tls.selected_alpn_protocol()), cipher[0] if cipher else ""


def test_grpc_server_negotiates_tls13_with_a_modern_client(
    server: Server, client_identity: WorkloadIdentity
) -> None:
    version, alpn, cipher = _handshake(server.port, _context(client_identity), "keybroker")
    assert version == "TLSv1.3"
    assert alpn == "h2"
    assert cipher in TLS13_SUITES


def test_grpc_server_still_accepts_a_tls12_only_client(
    server: Server, client_identity: WorkloadIdentity
) -> None:
    # gRPC Python has no minimum-TLS-version knob for servers (grpc#37305): a client that offers
    # only TLS 1.2 gets TLS 1.2. This test records that fact; SpiffeAuthorizer refuses such RPCs.
    context = _context(client_identity, maximum_version=ssl.TLSVersion.TLSv1_2)
    version, alpn, cipher = _handshake(server.port, context, "keybroker")
    assert version == "TLSv1.2"
    assert alpn == "h2"
    assert "ECDHE" in cipher and ("GCM" in cipher or "CHACHA20" in cipher)


def test_grpc_connections_report_tls13_to_the_authoriser(
    server_identity: WorkloadIdentity, client_identity: WorkloadIdentity
) -> None:
    seen: list[bytes] = []

    class Capturing(SpiffeAuthorizer):
        def authorize(self, method: str, context: grpc.ServicerContext) -> CallerIdentity | None:
            versions: Any = (context.auth_context() or {}).get("ssl_tls_version")
            seen.extend(versions or [])
            return super().authorize(method, context)

    authorizer = Capturing(TRUST_DOMAIN, default_rules())
    capturing = serve(server_identity, authorizer)
    try:
        with (
            client_identity.channel(capturing.target, server_name="keybroker") as channel,
            pytest.raises(grpc.RpcError),
        ):
            channel.unary_unary(f"/{ECHO}/Admin")(b"", timeout=5)
    finally:
        capturing.stop()
    assert seen == [b"TLSv1.3"]


def test_authoriser_refuses_rpcs_over_tls12() -> None:
    # gRPC Python clients cannot be limited to TLS 1.2, so this feeds the authoriser the auth
    # context such a connection has (a plain stand-in for the servicer context: no gRPC involved).
    now = datetime.now(UTC)
    context = SimpleNamespace(
        auth_context=lambda: {"ssl_tls_version": [b"TLSv1.2"], "transport_security_type": [b"ssl"]}
    )
    with pytest.raises(PeerUnauthenticated, match=r"requires TLS 1\.3") as caught:
        default_authorizer(clock=lambda: now).authorize(f"/{ECHO}/Ping", context)  # type: ignore[arg-type]
    assert caught.value.reason == "TLS_VERSION"
    assert sid("inference")  # (the identity is never consulted: the TLS check comes first)


def test_step_ca_speaks_only_tls13(ca: StepCa, client_identity: WorkloadIdentity) -> None:
    port = urlsplit(ca.url).port
    assert port is not None
    context = ssl.create_default_context(cadata=ca.root_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
    old = ssl.create_default_context(cadata=ca.root_pem.decode())
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
    ):
        old.wrap_socket(raw, server_hostname="127.0.0.1")
