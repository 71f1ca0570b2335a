"""Checking what an inference server is before sending it data.

:func:`verify_inference_server` asks the server for evidence bound to a fresh nonce of ours
(``InferenceAttestationService.GetEvidence``) and accepts it only if

1. the evidence verifies against the roots in ``trust``, judged with collateral (CRLs, TCB info,
   QE identity) from the caller's own source, never from the server;
2. its REPORT_DATA is exactly ``binding.client_report_data_for(nonce, key)`` where ``key`` is the
   public key of the certificate the server presented to *us* (:func:`server_tls_public_key`), so
   evidence fetched by someone else, or relayed from another machine, does not pass;
3. when a release policy is given, the claims satisfy it for the server's SPIFFE ID — the same
   document the key broker releases the model's key under, so a client can hold the server to
   exactly the measurement, TCB and platform rules the model's owner set. As on a production
   broker, a policy allowing debug VMs or the simulated TEE is refused unless ``trust`` includes
   the simulated roots (development).

gRPC Python shows a client nothing of the server's certificate, so the key comes from a TLS
handshake of its own to the same address under the same client identity (the same server
presents the same certificate). A renewal of the server's certificate between that handshake and
the evidence makes the two disagree: that is refused (``SERVER_TLS_KEY_CHANGED``), and asking again
succeeds.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from strongroom.api.inference.v1 import attestation_pb2 as pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as pb_grpc
from strongroom.attestation import (
    CollateralSource,
    Evidence,
    TrustStore,
    VerifiedClaims,
    verify_evidence,
)
from strongroom.attestation.binding import check_report_data, client_report_data_for
from strongroom.attestation.policy import PolicyDecision, ReleasePolicy
from strongroom.errors import FailedPrecondition, Unavailable
from strongroom.pki.handshake import (
    ServerIdentityMismatch,
    TlsPresentation,
    client_context,
    host_port,
    require_server_id,
    workload_spiffe_ids,
)
from strongroom.reasons import Reason

NONCE_BYTES = 32


@dataclass(frozen=True)
class VerifiedServer:
    """What :func:`verify_inference_server` established about the server."""

    claims: VerifiedClaims
    #: The policy's decision (its version and the measurement it matched), or None without one.
    decision: PolicyDecision | None
    nonce: bytes
    #: SHA-256 of the DER SubjectPublicKeyInfo of the server's TLS certificate.
    tls_public_key_sha256: bytes


def server_tls_public_key(
    address: str,
    *,
    server_name: str,
    server_id: str,
    root_pem: bytes,
    chain_pem: bytes,
    key_pem: bytes,
    timeout: float = 10.0,
) -> bytes:
    """The DER SubjectPublicKeyInfo of the certificate the server at ``address`` presents to a
    client holding ``chain_pem``/``key_pem`` (a TLS handshake of its own, verified against
    ``root_pem`` for ``server_name``), which must be a workload certificate carrying exactly the
    SPIFFE ID ``server_id`` (else :class:`~strongroom.pki.handshake.ServerIdentityMismatch`,
    UNAUTHENTICATED). The client key goes to OpenSSL through an in-memory file: never on disk."""
    # The same target forms the gRPC channel to it accepts (``dns:///host:port``, ``ipv4:``,
    # ``ipv6:``, ``[v6]:port``): the key must come from the server that channel reaches.
    target = host_port(address)
    if target is None:
        raise Unavailable(
            f"cannot read the certificate {address} presents: not a host:port target",
            reason=Reason.SERVER_UNREACHABLE,
        )
    host, port = target
    context = client_context(TlsPresentation(root_pem, key_pem, chain_pem))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        # Reached, but not a server of our CA under that name: not an outage.
        raise ServerIdentityMismatch(
            f"the server at {address} presented a certificate we do not accept for "
            f"{server_name!r} ({exc.verify_message})"
        ) from None
    except (OSError, ValueError) as exc:
        raise Unavailable(
            f"cannot reach {address} to read the certificate it presents: {exc}",
            reason=Reason.SERVER_UNREACHABLE,
        ) from None
    if der is None:  # pragma: no cover - a verified handshake always has a peer certificate
        raise Unavailable(f"{address} presented no certificate", reason=Reason.SERVER_UNREACHABLE)
    certificate = x509.load_der_x509_certificate(der)
    # The policy is judged for ``server_id`` and the evidence is bound to this key: the two must
    # be one workload's. Host names are shared (every dev service is ``localhost``), and the
    # channel's own SPIFFE check is another handshake, which may reach another server.
    require_server_id(address, workload_spiffe_ids(address, certificate), server_id)
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_inference_server(
    channel: grpc.Channel,
    *,
    tls_public_key_der: bytes,
    trust: TrustStore,
    collateral: CollateralSource,
    policy: ReleasePolicy | None = None,
    server_spiffe_id: str | None = None,
    now: datetime | None = None,
    timeout: float = 30.0,
) -> VerifiedServer:
    """Fetches the server's evidence over ``channel`` for a fresh nonce and verifies it (see the
    module doc); ``tls_public_key_der`` is what :func:`server_tls_public_key` read. With a
    ``policy``, ``server_spiffe_id`` is the identity the policy's ``callers`` must list (the one
    the channel checks the server presents); with a ``trust`` store that does not include the
    simulated roots (production), a policy that allows debug VMs or the simulated TEE, or was
    loaded with ``production=False``, is refused (``PolicyInvalid``, as a production key broker
    refuses it) before the server is asked.

    Raises the verifier's errors (``MalformedEvidence``, ``VerificationFailed``,
    ``CollateralUnavailable``; ``VerificationFailed(REPORT_DATA_MISMATCH)`` for evidence bound to
    another nonce or key, ``FailedPrecondition(SERVER_TLS_KEY_CHANGED)`` when the server's
    certificate changed since the handshake, ``PolicyViolation`` for claims the policy refuses,
    and ``grpc.RpcError`` from the call itself.
    """
    if policy is not None and not server_spiffe_id:
        raise ValueError("a policy is checked against the server's SPIFFE ID: pass it")
    if policy is not None:
        # What a production broker refuses to release a key under (a debuggable VM, whose memory
        # the host reads; the simulated TEE; a policy loaded in development mode, which may state
        # no TCB minimum) must not pass a production client's check either: "production" is a
        # trust store without the simulated roots. Before any call.
        policy.check_deployment(trust_domain=None, production=not trust.includes_simulated)
    nonce = secrets.token_bytes(NONCE_BYTES)
    response = pb_grpc.InferenceAttestationServiceStub(channel).GetEvidence(
        pb.GetEvidenceRequest(nonce=nonce), timeout=timeout
    )
    observed = hashlib.sha256(tls_public_key_der).digest()
    if not secrets.compare_digest(response.tls_public_key_sha256, observed):
        # Only a clearer message: the REPORT_DATA check below would refuse it too.
        raise FailedPrecondition(
            "the server's evidence is bound to a TLS key other than the one it presented to us "
            "(its certificate was renewed between the two connections, or the evidence is "
            "relayed): ask again",
            reason=Reason.SERVER_TLS_KEY_CHANGED,
        )
    claims = verify_evidence(
        Evidence.from_proto(response.evidence),
        trust=trust,
        now=now or datetime.now(UTC),
        collateral=collateral,
    )
    check_report_data(claims.report_data, client_report_data_for(nonce, tls_public_key_der))
    decision = None
    if policy is not None:
        assert server_spiffe_id is not None
        decision = policy.evaluate(claims, server_spiffe_id)
    return VerifiedServer(claims, decision, nonce, observed)
