"""Shared helpers for the PKI tests: a CA per module, enrolment, odd certificates, a tiny gRPC server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2_grpc

from strongroom.dev.devstack.stack import free_port
from strongroom.pki import (
    RenewalPolicy,
    SpiffeAuthorizer,
    StepCa,
    WorkloadIdentity,
    init_ca,
    mint_token,
)
from strongroom.runtime.interceptors import ErrorMappingInterceptor

TRUST_DOMAIN = "strongroom.test"
ECHO = "strongroom.test.Echo"


def sid(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{name}"


def new_ca(directory: Path, binary: Path, **kwargs: object) -> StepCa:
    """Initialises a CA in ``directory`` and starts step-ca for it (short lifetimes allowed)."""
    port = free_port()
    options: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "dns_names": ["127.0.0.1", "localhost"],
        "address": f"127.0.0.1:{port}",
        "min_lifetime": timedelta(seconds=5),
    }
    options.update(kwargs)
    layout = init_ca(directory, **options)
    return StepCa(layout, binary=binary).start()


def token_for(ca: StepCa, name: str, dns: Sequence[str] = ()) -> str:
    return mint_token(
        ca.layout.provisioner(), ca_url=ca.url, subject=sid(name), sans=[sid(name), *dns]
    )


def enrol(
    ca: StepCa,
    name: str,
    dns: Sequence[str] = (),
    *,
    lifetime: timedelta | None = timedelta(minutes=10),
    policy: RenewalPolicy | None = None,
    auto_renew: bool = True,
    state_dir: Path | None = None,
    clock: Callable[[], datetime] | None = None,
) -> WorkloadIdentity:
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return WorkloadIdentity.enrol(
        ca.client(),
        token_for(ca, name, dns),
        lifetime=lifetime,
        policy=policy,
        auto_renew=auto_renew,
        state_dir=state_dir,
        **extra,
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that is NOT ours (for the foreign-CA case)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@dataclass
class Leaf:
    """A leaf certificate made directly with ``cryptography`` (odd cases the CA would never issue)."""

    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def chain_pem(self) -> bytes:
        return b"".join(pem(c) for c in self.chain)


def make_leaf(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra_chain: Sequence[x509.Certificate] = (),
    is_ca: bool = False,
    key_usage: x509.KeyUsage | None = None,
) -> Leaf:
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=1))
        .not_valid_after(not_after or now + timedelta(minutes=10))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if names:
        # Without a subject, the SAN extension must be critical (RFC 5280 §4.2.1.6).
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    else:
        builder = builder.subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-uri-san")])
        )
    return Leaf(key, [builder.sign(issuer_key, hashes.SHA256()), *extra_chain])


@dataclass
class Calls:
    """Counts handler invocations per method, to prove a denied RPC never reached its handler."""

    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, method: str) -> None:
        with self.lock:
            self.counts[method] = self.counts.get(method, 0) + 1

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


def echo_handler(calls: Calls) -> grpc.GenericRpcHandler[Any, Any]:
    """``strongroom.test.Echo`` with one method of each kind (raw bytes, no serialisers)."""

    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.hit("Ping")
        return request

    def admin(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.hit("Admin")
        return request

    def unlisted(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.hit("Unlisted")
        return request

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.hit("Count")
        for i in range(int(request or b"3")):
            yield str(i).encode()

    def concat(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        calls.hit("Concat")
        return b"".join(requests)

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.hit("Chat")
        yield from requests

    return grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Ping": grpc.unary_unary_rpc_method_handler(ping),
            "Admin": grpc.unary_unary_rpc_method_handler(admin),
            "Unlisted": grpc.unary_unary_rpc_method_handler(unlisted),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Concat": grpc.stream_unary_rpc_method_handler(concat),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


def default_rules() -> dict[str, list[str]]:
    """The authorisation table of the test server."""
    return {
        f"/{ECHO}/Ping": [sid("inference")],
        f"/{ECHO}/Count": [sid("inference")],
        f"/{ECHO}/Concat": [sid("inference")],
        f"/{ECHO}/Chat": [sid("inference")],
        f"/{ECHO}/Admin": [sid("operator")],
        "/strongroom.api.keybroker.v1.KeyBrokerService/*": [sid("inference")],
    }


def default_authorizer(**kwargs: object) -> SpiffeAuthorizer:
    return SpiffeAuthorizer(
        TRUST_DOMAIN,
        default_rules(),
        public=["grpc.health.v1.Health"],
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass
class Server:
    server: grpc.Server
    port: int
    calls: Calls
    health: health.HealthServicer

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


def serve(
    identity: WorkloadIdentity,
    authorizer: SpiffeAuthorizer | None = None,
    *,
    extra: Callable[[grpc.Server], None] | None = None,
    port: int = 0,
) -> Server:
    """A real gRPC server on localhost with the identity's rotating mTLS credentials (on
    ``port``, else a free one)."""
    calls = Calls()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        # As in the service runtime: the error mapping, outermost, answers the authoriser's refusals.
        interceptors=[ErrorMappingInterceptor(), authorizer or default_authorizer()],
    )
    server.add_generic_rpc_handlers([echo_handler(calls)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if extra is not None:
        extra(server)
    port = server.add_secure_port(f"127.0.0.1:{port}", identity.server_credentials())
    server.start()
    return Server(server, port, calls, servicer)


def as_made_before_derived_names(directory: Path) -> None:
    """Turns the CA directory ``directory`` (made by ``pki init --workload ...``) into one made
    before workload certificates carried the DNS name derived from their SPIFFE ID: those names
    gone from its provisioners' templates and from the SANs it and its token directories record,
    and the operator's provisioner without a template."""
    import json

    from strongroom.spiffe import SpiffeId, identity_dns_name

    meta_path = directory / "config" / "strongroom.json"
    trust_domain = json.loads(meta_path.read_text())["trust_domain"]
    services = list(json.loads(meta_path.read_text()).get("workloads", {}))
    derived = {identity_dns_name(SpiffeId.of(trust_domain, s)) for s in services}
    config_path = directory / "config" / "ca.json"
    config = json.loads(config_path.read_text())
    operator = json.loads(meta_path.read_text())["provisioner_name"]
    for provisioner in config["authority"]["provisioners"]:
        if provisioner["name"] == operator:
            provisioner.pop("options", None)  # no template then
        elif "options" in provisioner:
            template = provisioner["options"]["x509"]["template"]
            for name in derived:
                template = template.replace(f'"{name}", ', "").replace(f' "{name}"', "")
                template = template.replace(f'["{name}"]', "[]")
                assert name not in template
            provisioner["options"]["x509"]["template"] = template
    config_path.write_text(json.dumps(config, indent=2))
    for path in [
        meta_path,
        *(directory / "provisioners" / s / "config" / "strongroom.json" for s in services),
    ]:
        meta = json.loads(path.read_text())
        for entry in [meta, *meta.get("workloads", {}).values()]:
            if "sans" in entry:
                entry["sans"] = [n for n in entry["sans"] if n not in derived]
        path.write_text(json.dumps(meta, indent=2))


def rotate_intermediate(ca: StepCa) -> x509.Certificate:
    """Gives ``ca`` a new intermediate CA (new key, same root, same database) and restarts it,
    as an operator renewing an expiring intermediate does; returns the new intermediate."""
    from strongroom.pki import bootstrap, layout
    from strongroom.pki._files import read_private, write_private, write_public

    directory = ca.layout.directory
    password = read_private(directory / layout.PASSWORD).strip()
    root = x509.load_pem_x509_certificate(ca.root_pem)
    root_key = serialization.load_pem_private_key(
        read_private(directory / layout.ROOT_KEY), password=password
    )
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    old, _ = ca.layout.load_intermediate()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = bootstrap._ca_certificate(
        old.subject,
        key,
        root.subject,
        root_key,
        path_length=0,
        validity=bootstrap.INTERMEDIATE_VALIDITY,
        now=datetime.now(UTC),
    )
    ca.stop()
    write_private(directory / layout.INTERMEDIATE_KEY, bootstrap._encrypted_pem(key, password))
    write_public(directory / layout.INTERMEDIATE_CERT, pem(cert))
    ca.start()
    return cert
