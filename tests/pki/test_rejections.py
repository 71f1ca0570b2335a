"""Every way a caller can be refused, each proven not to reach the handler.

Four cases are refused by the TLS handshake (gRPC Python verifies client certificates there and
offers no request-but-don't-verify mode): gRPC itself reports UNAVAILABLE, and our RotatingChannel
turns that into UNAUTHENTICATED (ClientCertificateRejected) after probing. The rest pass the
handshake and are refused by SpiffeAuthorizer with UNAUTHENTICATED or PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509

from strongroom.pki import ClientCertificateRejected, StepCa, WorkloadIdentity
from strongroom.pki.channel import RotatingChannel
from strongroom.pki.handshake import TlsPresentation, translate
from tests.pki.helpers import (
    ECHO,
    Leaf,
    Server,
    default_authorizer,
    make_ca,
    make_leaf,
    serve,
    sid,
)


@pytest.fixture(scope="module")
def server(server_identity: WorkloadIdentity) -> Iterator[Server]:
    running = serve(server_identity)
    yield running
    running.stop()


@dataclass
class _Static:
    """A fixed credential source for RotatingChannel (for certificates the CA would not issue)."""

    leaf: Leaf
    root_pem: bytes
    generation: int = 1

    @property
    def credentials(self) -> _Static:
        return self

    @property
    def key_pem(self) -> bytes:
        return self.leaf.key_pem

    @property
    def chain_pem(self) -> bytes:
        return self.leaf.chain_pem


def _plain_channel(server: Server, root_pem: bytes, leaf: Leaf | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_pem, leaf.key_pem if leaf else None, leaf.chain_pem if leaf else None
    )
    return grpc.secure_channel(
        server.target,
        credentials,
        options=[
            ("grpc.ssl_target_name_override", "keybroker"),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def _ping(channel: grpc.Channel, method: str = "Ping") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{ECHO}/{method}", None, None)(b"hi", timeout=5)
    return caught.value


def _intermediate_leaf(ca: StepCa, **kwargs: object) -> Leaf:
    cert, key = ca.layout.load_intermediate()
    return make_leaf(cert, key, extra_chain=[cert], **kwargs)  # type: ignore[arg-type]


def _assert_handshake_rejection(
    server: Server, ca: StepCa, leaf: Leaf | None, expected: str
) -> None:
    before = server.calls.total()
    with _plain_channel(server, ca.root_pem, leaf) as channel:
        raw = _ping(channel)
    # What gRPC itself reports: an opaque UNAVAILABLE ("Socket closed").
    assert raw.code() == grpc.StatusCode.UNAVAILABLE
    presentation = TlsPresentation(
        ca.root_pem, leaf.key_pem if leaf else None, leaf.chain_pem if leaf else None
    )
    clear = translate(raw, server.target, presentation, server_name="keybroker")
    assert isinstance(clear, ClientCertificateRejected)
    assert clear.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "rejected our client certificate during the TLS handshake" in str(clear.details())
    assert expected in str(clear.details())
    if leaf is not None:
        # The same case through the RotatingChannel that services use: UNAUTHENTICATED directly.
        with RotatingChannel(
            _Static(leaf, ca.root_pem), server.target, server_name="keybroker"
        ) as channel:
            error = _ping(channel)
            # And as a future (what a load's cancellable key release makes): the same error,
            # not gRPC's opaque UNAVAILABLE.
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(f"/{ECHO}/Ping", None, None).future(b"hi", timeout=5).result()
            as_future = caught.value
        for refused in (error, as_future):
            assert isinstance(refused, ClientCertificateRejected)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert expected in str(refused.details())
    assert server.calls.total() == before


def test_no_client_certificate(server: Server, ca: StepCa) -> None:
    _assert_handshake_rejection(server, ca, None, "we presented no certificate")


def test_certificate_from_another_ca(server: Server, ca: StepCa) -> None:
    foreign_root, foreign_key = make_ca("Some Other CA")
    leaf = make_leaf(foreign_root, foreign_key, uris=[sid("inference")])
    _assert_handshake_rejection(server, ca, leaf, "does not trust its issuer")


def test_expired_certificate(server: Server, ca: StepCa) -> None:
    now = datetime.now(UTC)
    leaf = _intermediate_leaf(
        ca,
        uris=[sid("inference")],
        not_before=now - timedelta(hours=2),
        not_after=now - timedelta(hours=1),
    )
    _assert_handshake_rejection(server, ca, leaf, "expired at")


def test_not_yet_valid_certificate(server: Server, ca: StepCa) -> None:
    now = datetime.now(UTC)
    leaf = _intermediate_leaf(
        ca,
        uris=[sid("inference")],
        not_before=now + timedelta(hours=1),
        not_after=now + timedelta(hours=2),
    )
    _assert_handshake_rejection(server, ca, leaf, "is not valid before")


def _assert_refused(
    server: Server,
    ca: StepCa,
    leaf: Leaf,
    code: grpc.StatusCode,
    *fragments: str,
    method: str = "Ping",
) -> None:
    before = server.calls.total()
    with _plain_channel(server, ca.root_pem, leaf) as channel:
        error = _ping(channel, method)
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in str(error.details())
    assert server.calls.total() == before


def test_certificate_without_uri_san(server: Server, ca: StepCa) -> None:
    leaf = _intermediate_leaf(ca, dns=["inference"])
    _assert_refused(
        server, ca, leaf, grpc.StatusCode.UNAUTHENTICATED, "exactly one URI SAN", "has 0"
    )


def test_certificate_with_two_uri_sans(server: Server, ca: StepCa) -> None:
    leaf = _intermediate_leaf(ca, uris=[sid("inference"), sid("operator")])
    _assert_refused(
        server, ca, leaf, grpc.StatusCode.UNAUTHENTICATED, "exactly one URI SAN", "has 2"
    )


def test_uri_san_that_is_not_a_spiffe_id(server: Server, ca: StepCa) -> None:
    leaf = _intermediate_leaf(ca, uris=["https://inference.strongroom.test/"])
    _assert_refused(server, ca, leaf, grpc.StatusCode.UNAUTHENTICATED, "not a SPIFFE ID")


def _key_usage(*, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"is_ca": True}, "CA:TRUE"),
        ({"is_ca": True, "key_usage": _key_usage(key_cert_sign=True, crl_sign=True)}, "CA:TRUE"),
        ({"key_usage": _key_usage(key_cert_sign=True, crl_sign=False)}, "keyCertSign"),
        ({"key_usage": _key_usage(key_cert_sign=False, crl_sign=True)}, "cRLSign"),
    ],
    ids=["ca-true", "ca-true-cert-sign", "cert-sign", "crl-sign"],
)
def test_a_ca_certificate_is_not_a_caller_identity(
    server: Server, ca: StepCa, options: dict[str, Any], fragment: str
) -> None:
    """The TLS handshake accepts a CA certificate as a client's leaf, and the authoriser took its
    SPIFFE ID like any other: a signing certificate our CA ever issued (by a template or a
    provisioner set up wrongly) was a caller identity too. An X.509-SVID leaf must be CA:FALSE
    without keyCertSign or cRLSign (SPIFFE X509-SVID §4.3, §4.4, §5.2)."""
    leaf = _intermediate_leaf(ca, uris=[sid("inference")], **options)
    _assert_refused(
        server, ca, leaf, grpc.StatusCode.UNAUTHENTICATED, "PEER_CERT_UNUSABLE", fragment
    )


def test_foreign_trust_domain(server: Server, ca: StepCa) -> None:
    leaf = _intermediate_leaf(ca, uris=["spiffe://evil.test/inference"])
    _assert_refused(
        server,
        ca,
        leaf,
        grpc.StatusCode.UNAUTHENTICATED,
        "spiffe://evil.test/inference",
        "trust domain",
    )


def test_wrong_identity_for_the_method(
    server: Server, ca: StepCa, client_identity: WorkloadIdentity
) -> None:
    before = server.calls.total()
    with client_identity.channel(server.target, server_name="keybroker") as channel:
        error = _ping(channel, "Admin")
        # The same identity may call the methods listed for it.
        assert channel.unary_unary(f"/{ECHO}/Ping", None, None)(b"ok", timeout=5) == b"ok"
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sid("inference") in str(error.details()) and f"/{ECHO}/Admin" in str(error.details())
    trailers = [(m.key, str(m.value)) for m in error.trailing_metadata() or ()]
    assert ("strongroom-reason", "PEER_NOT_ALLOWED") in trailers
    assert server.calls.counts.get("Admin", 0) == 0
    assert server.calls.total() == before + 1


def test_unlisted_method_is_denied(server: Server, client_identity: WorkloadIdentity) -> None:
    with client_identity.channel(server.target, server_name="keybroker") as channel:
        error = _ping(channel, "Unlisted")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not listed" in str(error.details()) and f"/{ECHO}/Unlisted" in str(error.details())
    assert server.calls.counts.get("Unlisted", 0) == 0


def test_streaming_handlers_are_guarded_too(
    server: Server, ca: StepCa, server_identity: WorkloadIdentity
) -> None:
    # The key broker's identity is not allowed to call Echo at all.
    before = server.calls.total()
    with server_identity.channel(server.target, server_name="keybroker") as channel:
        for call in (
            lambda: list(channel.unary_stream(f"/{ECHO}/Count", None, None)(b"2", timeout=5)),
            lambda: channel.stream_unary(f"/{ECHO}/Concat", None, None)(
                iter([b"a", b"b"]), timeout=5
            ),
            lambda: list(
                channel.stream_stream(f"/{ECHO}/Chat", None, None)(iter([b"a"]), timeout=5)
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert sid("keybroker") in str(caught.value.details())
    assert server.calls.total() == before


def test_certificate_that_expired_on_a_live_connection(
    ca: StepCa, server_identity: WorkloadIdentity, client_identity: WorkloadIdentity
) -> None:
    # A connection outlives its handshake: the authoriser re-checks validity at every RPC. Its clock
    # is injected to stand at the moment the client's certificate has expired.
    expired_moment = client_identity.credentials.not_after + timedelta(seconds=1)
    server = serve(server_identity, default_authorizer(clock=lambda: expired_moment))
    try:
        with client_identity.channel(server.target, server_name="keybroker") as channel:
            error = _ping(channel)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired at" in str(error.details()) and sid("inference") in str(error.details())
        assert server.calls.total() == 0
    finally:
        server.stop()


def test_public_health_service_needs_only_a_certificate_from_our_ca(
    server: Server, ca: StepCa
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    leaf = _intermediate_leaf(ca, dns=["anything"])  # no SPIFFE ID at all
    with _plain_channel(server, ca.root_pem, leaf) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_server_name_mismatch_is_not_blamed_on_our_certificate(
    server: Server, client_identity: WorkloadIdentity
) -> None:
    # The server's certificate names "keybroker", not "localhost": OUR check fails, not the server's.
    with client_identity.channel(server.target) as channel:
        error = _ping(channel)
    assert not isinstance(error, ClientCertificateRejected)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
