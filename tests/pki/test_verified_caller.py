"""The authoriser reads a connection's auth context once per RPC and hands the identity it
verified to the handler (``verified_caller``); outside an authorised RPC, the identity is read
from the context as before. A stand-in servicer context counts the reads (no gRPC involved)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from strongroom.pki.authz import CallerIdentity, caller_identity, verified_caller
from strongroom.pki.errors import PeerUnauthenticated
from tests.pki.helpers import ECHO, default_authorizer, make_ca, make_leaf, pem, sid


def _context(cert_pem: bytes | None) -> Any:
    reads: list[int] = []
    properties = {"ssl_tls_version": [b"TLSv1.3"], "transport_security_type": [b"ssl"]}
    if cert_pem is not None:
        properties["x509_pem_cert"] = [cert_pem]

    def auth_context() -> dict[str, list[bytes]]:
        reads.append(1)
        return properties

    return SimpleNamespace(auth_context=auth_context, reads=reads)


@pytest.fixture(scope="module")
def inference_pem() -> bytes:
    ca, ca_key = make_ca("test root")
    return pem(make_leaf(ca, ca_key, uris=[sid("inference")]).chain[0])


def test_the_handler_gets_the_verified_caller_from_one_read(inference_pem: bytes) -> None:
    seen: list[CallerIdentity] = []

    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(verified_caller(context))
        return request

    handler = default_authorizer().intercept_service(
        lambda _details: grpc.unary_unary_rpc_method_handler(ping),
        SimpleNamespace(method=f"/{ECHO}/Ping"),  # type: ignore[arg-type]
    )
    assert handler is not None and handler.unary_unary is not None
    context = _context(inference_pem)
    assert handler.unary_unary(b"x", context) == b"x"
    [caller] = seen
    assert str(caller.spiffe_id) == sid("inference")
    assert caller == caller_identity(_context(inference_pem))
    assert len(context.reads) == 1
    # The identity does not outlive its RPC: outside one it is read from the context again.
    with pytest.raises(PeerUnauthenticated) as info:
        verified_caller(_context(None))
    assert info.value.reason == "NO_PEER_CERT"
