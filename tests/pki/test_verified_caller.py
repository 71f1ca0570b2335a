"""The authoriser reads a connection's auth context once per RPC and hands the identity it
verified to the handler (``verified_caller``); outside an authorised RPC, the identity is read
from the context as before. A stand-in servicer context counts the reads (no gRPC involved)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from strongroom.pki import authz
from strongroom.pki._x509 import load_chain
from strongroom.pki.authz import CallerIdentity, caller_identity, verified_caller
from strongroom.pki.errors import CertificateInvalid, PeerUnauthenticated
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


_CA = make_ca("test root")


def _leaf_pem(name: str, not_after: datetime | None = None) -> bytes:
    return pem(make_leaf(*_CA, uris=[sid(name)], not_after=not_after).chain[0])


@pytest.fixture(scope="module")
def inference_pem() -> bytes:
    return _leaf_pem("inference")


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


def test_the_parsed_certificate_cache_keeps_only_certificates_that_can_still_authenticate() -> None:
    # Every renewal brings each peer a new certificate; a cache bounded by count alone grew with
    # the renewal history (a soak read it as ~1.2 KiB per renewal, for ten minutes).
    start = datetime.now(UTC)
    renewals = [_leaf_pem("inference", start + timedelta(minutes=1 + i)) for i in range(40)]
    for cert_pem in renewals:
        caller_identity(_context(cert_pem), now=start)
    assert len(authz._PEERS) >= 40  # each parsed once, kept while it can authenticate

    # An hour later all of them have expired: the next new certificate's parse drops them (and
    # any other expired entry this process holds).
    later = start + timedelta(hours=1)
    caller_identity(_context(_leaf_pem("inference", later + timedelta(hours=1))), now=later)
    held = authz._PEERS._entries
    assert not any(cert_pem in held for cert_pem in renewals)
    assert all(peer.not_after >= later for peer in held.values())


def test_the_parsed_certificate_cache_stays_bounded_with_many_live_peers() -> None:
    cache = authz._PeerCache(maxsize=8)
    now = datetime.now(UTC)
    pems = [_leaf_pem(f"peer-{i}") for i in range(20)]
    for cert_pem in pems:
        assert cache.get(cert_pem, now).spiffe_id is not None
    assert len(cache) == 8
    assert cache.get(pems[-1], now) is cache.get(pems[-1], now)  # a hit, not a re-parse
    # A malformed certificate is answered (unusable) and counts as expired: it cannot hold a slot.
    assert cache.get(b"not a certificate", now).problem == "malformed peer certificate"
    cache.get(pems[0], now)
    assert b"not a certificate" not in cache._entries


def _with_version(cert_pem: bytes, version: bytes) -> bytes:
    """``cert_pem`` with its X.509 version field set to ``version`` (v3 is 0x02)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2, the first in the DER
    assert v3 in der[:16]
    edited = der.replace(v3, v3[:-1] + version, 1)
    body = base64.encodebytes(edited).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("version", [b"\x03", b"\x7f"])
def test_a_peer_certificate_with_an_unknown_version_is_unusable_not_an_error(
    inference_pem: bytes, version: bytes
) -> None:
    """cryptography raises InvalidVersion, which is not a ValueError, for a version field other
    than v1..v3: it escaped the parse as an untyped error instead of an unauthenticated caller."""
    with pytest.raises(PeerUnauthenticated) as info:
        caller_identity(_context(_with_version(inference_pem, version)))
    assert info.value.reason == "PEER_CERT_UNUSABLE"


@pytest.mark.parametrize("version", [b"\x03", b"\x7f"])
def test_a_chain_with_an_unknown_certificate_version_is_malformed(
    inference_pem: bytes, version: bytes
) -> None:
    """The same for PEM chains the PKI client loads (its state, step-ca's answers)."""
    with pytest.raises(CertificateInvalid) as info:
        load_chain(_with_version(inference_pem, version))
    assert info.value.reason == "MALFORMED"
