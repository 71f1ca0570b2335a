"""A client checks an inference server before sending it data: `strongroom inference evidence
--verify` and :func:`strongroom.client.server_evidence.verify_inference_server`, against a real
inference server (simulated TEE) over mTLS."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import strongroom.attestation.trust
from strongroom.api.inference.v1 import attestation_pb2 as pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as att_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.attestation import TrustStore, VerificationFailed
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.errors import PolicyInvalid, PolicyViolation
from strongroom.attestation.policy import ReleasePolicy
from strongroom.cli.main import main
from strongroom.client.server_evidence import (
    ServerConnection,
    server_tls_public_key,
    verify_inference_server,
)
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.errors import FailedPrecondition, InvalidArgument, Unavailable
from strongroom.pki.handshake import ClientCertificateRejected, ServerIdentityMismatch
from strongroom.pki.identity import RenewalPolicy, WorkloadIdentity
from strongroom.reasons import Reason
from tests.certs import self_signed_pem


@pytest.fixture(scope="module")
def served(stack: DevStack) -> Iterator[DevStack]:
    stack.start_in_process("inference")
    yield stack


@pytest.fixture(scope="module")
def client(served: DevStack) -> WorkloadIdentity:
    return served.identity("client")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evidence(
    capsys: pytest.CaptureFixture[str], stack: DevStack, *argv: str
) -> tuple[int, str, str]:
    """``strongroom inference evidence`` as the client identity, with ``argv``."""
    config = str(stack.write_client_config("client"))
    return run(capsys, "inference", "evidence", "--client-config", config, *argv)


def refused(capsys: pytest.CaptureFixture[str], stack: DevStack, *argv: str) -> str:
    """The one error line of an ``inference evidence`` that must fail (exit 1, nothing printed,
    no traceback)."""
    code, out, err = evidence(capsys, stack, *argv)
    assert (code, out) == (1, "") and "Traceback" not in err
    return err


def _policy_file(stack: DevStack, tmp_path: Path, measurement: str = DEMO_MEASUREMENT) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(stack.simulated_policy("server-check-1", measurement))
    return path


def _connect(
    stack: DevStack,
    client: WorkloadIdentity,
    address: str | None = None,
    *,
    kind: type[ServerConnection] = ServerConnection,
    timeout: float = 10.0,
) -> Any:
    """A connection from ``client`` to the inference server (at ``address``, else its own)."""
    return kind.of_identity(
        client,
        address or stack.address("inference"),
        server_name="inference",
        server_id=stack.spiffe_id("inference"),
        timeout=timeout,
    )


def test_the_cli_verifies_the_server_against_its_models_release_policy(
    served: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = evidence(
        capsys, served,
        "--verify", str(served.init_collateral()),
        "--simulated-tee-dir", str(served.init_simulated_tee()),
        "--policy", str(_policy_file(served, tmp_path)),
    )  # fmt: skip
    assert code == 0
    verified = json.loads(out)
    assert verified["claims"]["measurement"] == DEMO_MEASUREMENT
    assert verified["policy"]["policy_version"] == "server-check-1"
    assert verified["trust"].startswith("development")
    assert len(bytes.fromhex(verified["nonce"])) == 32


def test_the_cli_says_what_it_did_not_check_without_a_policy(served: DevStack) -> None:
    """Without --policy any genuine confidential VM passes, a debug one or one running anyone's
    software; the command printed a verified result with "policy": null and said nothing. (A
    process of its own: the warning is the library's log line, which the command's logging
    writes to standard error.)"""
    config = str(served.write_client_config("client"))
    done = subprocess.run(
        [
            sys.executable, "-m", "strongroom.cli.main", "inference", "evidence",
            "--client-config", config,
            "--verify", str(served.init_collateral()),
            "--simulated-tee-dir", str(served.init_simulated_tee()),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout)["policy"] is None
    assert "without a release policy" in done.stderr and "NOT checked" in done.stderr


def test_the_cli_refuses_a_server_outside_the_policy(
    served: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(
        capsys, served,
        "--verify", str(served.init_collateral()),
        "--simulated-tee-dir", str(served.init_simulated_tee()),
        "--policy", str(_policy_file(served, tmp_path, "ab" * 48)),
    )  # fmt: skip
    assert "MEASUREMENT_NOT_ALLOWED" in err


def test_the_cli_refuses_the_simulated_chain_unless_told_to_trust_it(
    served: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(
        capsys, served,
        "--verify", str(served.init_collateral()),
    )  # fmt: skip
    assert "ROOT_NOT_TRUSTED" in err


def test_a_production_check_refuses_a_policy_that_allows_a_debug_vm(
    served: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A production broker refuses such a policy; a production client used to accept it."""
    policy = tmp_path / "debug.yaml"
    policy.write_text(
        served.simulated_policy("debug-1")
        .replace("allow_simulated: true", "allow_debug: true")
        .replace(
            "min_reported_tcb: any",
            "min_reported_tcb: {bootloader: 0, tee: 0, snp: 0, microcode: 0}",
        )
    )
    err = refused(
        capsys, served,
        "--verify", str(served.init_collateral()), "--policy", str(policy),
    )  # fmt: skip
    assert "POLICY_DEBUG_IN_PRODUCTION" in err


def test_the_cli_refuses_a_real_root_offered_as_the_simulated_chain(
    served: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--simulated-tee-dir naming a directory of real roots ended in a ValueError traceback."""
    trust_dir = Path(strongroom.attestation.trust.__file__).parent
    (tmp_path / "amd_trust.pem").write_bytes((trust_dir / "ark_milan.pem").read_bytes())
    (tmp_path / "intel_root.pem").write_bytes((trust_dir / "intel_sgx_root_ca.pem").read_bytes())
    err = refused(
        capsys, served,
        "--verify", str(served.init_collateral()), "--simulated-tee-dir", str(tmp_path),
    )  # fmt: skip
    assert "BAD_CERTIFICATE" in err and "not marked as a simulated-TEE" in err


def test_the_cli_refuses_a_deeply_nested_policy_file_in_one_line(
    served: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --policy document nested thousands deep made PyYAML recurse into a RecursionError
    traceback (the key broker bounds a document before loading it; the command did not)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("[" * 20_000 + "]" * 20_000)
    err = refused(
        capsys, served,
        "--verify", str(served.init_collateral()), "--policy", str(policy),
    )  # fmt: skip
    assert "POLICY_TOO_DEEP" in err


def test_the_cli_names_a_collateral_directory_that_does_not_exist(
    served: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It read as an empty cache: "no CRL of ARK-Milan in the verifier's collateral"."""
    missing = tmp_path / "colateral"
    err = refused(
        capsys, served,
        "--verify", str(missing),
        "--simulated-tee-dir", str(served.init_simulated_tee()),
    )  # fmt: skip
    assert str(missing) in err


def test_unverified_evidence_says_so(served: DevStack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = evidence(capsys, served)
    assert code == 0 and json.loads(out)["verified"] is False
    assert "NOT verified" in err
    config = str(served.write_client_config("client"))
    with pytest.raises(SystemExit) as exited:
        main(["inference", "evidence", "--client-config", config, "--policy", "p.yaml"])
    assert exited.value.code == 2


class _Router:
    """What a machine in front of a genuine server can do: send the first connection to it and
    every later one to ``others``."""

    def __init__(self, first: str, others: str) -> None:
        self._targets = [first, others]
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                downstream, _ = self._listener.accept()
                host, port = self._targets[min(len(self._sockets), 1)].rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                self._sockets += [downstream, upstream]
                for a, b in ((downstream, upstream), (upstream, downstream)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


class _RelayingServer(att_grpc.InferenceAttestationServiceServicer):
    """Not the attested server: any machine holding a certificate for the inference SPIFFE ID,
    passing GetEvidence on to the genuine server (which binds the client's nonce and its own
    key), to then receive what the client sends next."""

    def __init__(self, genuine: grpc.Channel) -> None:
        self._genuine = att_grpc.InferenceAttestationServiceStub(genuine)
        self.calls = 0

    def GetEvidence(self, request: Any, context: Any) -> Any:
        self.calls += 1
        return self._genuine.GetEvidence(request, timeout=30)


def test_the_evidence_comes_over_the_connection_whose_key_it_binds(
    served: DevStack,
    client: WorkloadIdentity,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The key was read over a handshake of its own: routing that one to the genuine server and
    the gRPC channel to a relay (a certificate for the same SPIFFE ID, e.g. from a leaked
    enrolment token) passed the check, and the data went to the relay."""
    ca = served.start_ca()
    impostor = WorkloadIdentity.enrol(
        ca.client(), served.token("inference", dns=["inference"]), policy=RenewalPolicy()
    )
    relay = _RelayingServer(served.channel(client, "inference"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    att_grpc.add_InferenceAttestationServiceServicer_to_server(relay, server)
    port = server.add_secure_port("127.0.0.1:0", impostor.server_credentials())
    server.start()
    router = _Router(served.address("inference"), f"127.0.0.1:{port}")
    config = yaml.safe_load(served.write_client_config("client").read_text())
    config["inference"] = router.address
    routed = tmp_path / "routed.yaml"
    routed.write_text(yaml.safe_dump(config))
    try:
        code, out, err = run(
            capsys, "inference", "evidence", "--client-config", str(routed),
            "--verify", str(served.init_collateral()),
            "--simulated-tee-dir", str(served.init_simulated_tee()),
            "--policy", str(_policy_file(served, tmp_path)),
        )  # fmt: skip
    finally:
        router.close()
        server.stop(grace=None).wait()
        impostor.close()
    assert relay.calls == 0, "the evidence went over another connection than the checked one"
    assert code == 0, err
    assert json.loads(out)["policy"]["policy_version"] == "server-check-1"


# ------------------------------------------------------------------ the library, attacked


class _Rewrite(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """What a relaying or lying server controls: every field of its GetEvidence answer."""

    def __init__(self, change: Callable[[pb.GetEvidenceResponse], None]) -> None:
        self._change = change

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        self._change(outcome.result())  # the message the caller will read
        return outcome


class _Tampered(ServerConnection):
    """A connection whose GetEvidence answers pass through :attr:`change` (what a relaying or
    lying server controls)."""

    change: Callable[[pb.GetEvidenceResponse], None] | None = None

    @property
    def channel(self) -> grpc.Channel:
        """The connection's channel, its answers rewritten by :attr:`change`."""
        channel = super().channel
        return (
            channel
            if self.change is None
            else grpc.intercept_channel(channel, _Rewrite(self.change))
        )


def _verify(
    stack: DevStack,
    client: WorkloadIdentity,
    *,
    tls_key_of: str = "inference",
    change: Callable[[pb.GetEvidenceResponse], None] | None = None,
    policy: ReleasePolicy | None = None,
) -> Any:
    authority = SimulatedAuthority.load(stack.init_simulated_tee())
    trust = authority.trust_store()
    with _connect(stack, client, kind=_Tampered) as connection:
        connection.change = change
        if tls_key_of != "inference":
            # What a relay in front of the inference server would show us: another server's
            # certificate on the connection, the inference server's evidence over it.
            connection.tls_public_key_der = _key_of(stack, client, tls_key_of)
        return verify_inference_server(
            connection,
            trust=trust,
            collateral=CollateralCache(stack.init_collateral(), trust, writable=False),
            policy=policy,
        )


def _key_of(stack: DevStack, client: WorkloadIdentity, service: str) -> bytes:
    credentials = client.credentials
    return server_tls_public_key(
        stack.address(service),
        server_name=service,
        server_id=stack.spiffe_id(service),
        root_pem=client.root_pem,
        chain_pem=credentials.chain_pem,
        key_pem=credentials.key_pem,
    )


def test_genuine_evidence_passes(
    served: DevStack, client: WorkloadIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a policy it passes, and the library says what it did not check (only the command
    line did, so a backend calling the library heard nothing)."""
    with caplog.at_level(logging.WARNING, logger="strongroom.client.server_evidence"):
        verified = _verify(served, client)
    assert verified.claims.report_data != bytes(64) and verified.decision is None
    assert any("NOT checked" in r.getMessage() for r in caplog.records)


def test_the_key_is_read_from_any_target_form_the_channel_accepts(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """A client configuration's ``dns:///host:port`` (or ``ipv4:``) reached the server over gRPC
    but not in the key's handshake (SERVER_UNREACHABLE: "Name or service not known")."""
    credentials = client.credentials

    def key(address: str) -> bytes:
        return server_tls_public_key(
            address,
            server_name="inference",
            server_id=served.spiffe_id("inference"),
            root_pem=client.root_pem,
            chain_pem=credentials.chain_pem,
            key_pem=credentials.key_pem,
        )

    address = served.address("inference")
    assert key(f"dns:///{address}") == key(f"ipv4:{address}") == key(address)


def test_a_target_naming_a_dns_server_is_refused_saying_so(client: WorkloadIdentity) -> None:
    """gRPC's ``dns://AUTHORITY/host:port`` (resolve host by asking AUTHORITY) was read as the
    host ``//AUTHORITY/host``: "Name or service not known", SERVER_UNREACHABLE."""
    with pytest.raises(InvalidArgument) as refused:
        _connect_to(client, "dns://127.0.0.53/localhost:8443")
    assert refused.value.reason == Reason.SERVER_ADDRESS_INVALID
    assert "DNS server 127.0.0.53" in refused.value.message
    assert "dns:///host:port" in refused.value.message


def test_the_key_must_be_that_of_the_identity_checked(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """The handshake that reads the key checked only the host name, which workloads share (every
    dev service is ``localhost``): the key of another workload passed, and the policy was then
    judged for the identity the client expected, not for that workload's."""
    credentials = client.credentials
    with pytest.raises(ServerIdentityMismatch) as refused:
        server_tls_public_key(
            served.address("keybroker"),
            server_name="localhost",
            server_id=served.spiffe_id("inference"),
            root_pem=client.root_pem,
            chain_pem=credentials.chain_pem,
            key_pem=credentials.key_pem,
        )
    assert refused.value.reason == Reason.SERVER_IDENTITY_MISMATCH
    assert served.spiffe_id("keybroker") in str(refused.value)
    with pytest.raises(ServerIdentityMismatch) as misnamed:  # no DNS name "inference" on it
        ServerConnection(
            served.address("keybroker"),
            server_name="inference",
            server_id=served.spiffe_id("inference"),
            root_pem=client.root_pem,
            chain_pem=credentials.chain_pem,
            key_pem=credentials.key_pem,
        )
    assert "'inference'" in str(misnamed.value)


def test_a_server_that_never_answers_the_handshake_is_unavailable(
    client: WorkloadIdentity,
) -> None:
    credentials = client.credentials
    with (
        socket.create_server(("127.0.0.1", 0)) as silent,  # connects, never speaks TLS
        pytest.raises(Unavailable) as refused,
    ):
        ServerConnection(
            f"127.0.0.1:{silent.getsockname()[1]}",
            server_name="inference",
            server_id="spiffe://strongroom.test/inference",
            root_pem=client.root_pem,
            chain_pem=credentials.chain_pem,
            key_pem=credentials.key_pem,
            timeout=0.5,
        )
    assert refused.value.reason == Reason.SERVER_UNREACHABLE
    assert "within 0.5 s" in refused.value.message


def test_evidence_bound_to_another_servers_key_is_refused(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """The key we saw is the key broker's (a relay in front of the inference server)."""
    with pytest.raises(FailedPrecondition) as refused:
        _verify(served, client, tls_key_of="keybroker")
    assert refused.value.reason == Reason.SERVER_TLS_KEY_CHANGED


def test_a_relay_that_also_lies_about_the_key_hash_is_refused_by_the_binding(
    served: DevStack, client: WorkloadIdentity
) -> None:
    import hashlib

    broker_key = _key_of(served, client, "keybroker")

    def claim_the_seen_key(response: pb.GetEvidenceResponse) -> None:
        response.tls_public_key_sha256 = hashlib.sha256(broker_key).digest()

    with pytest.raises(VerificationFailed) as refused:
        _verify(served, client, tls_key_of="keybroker", change=claim_the_seen_key)
    assert refused.value.reason == Reason.REPORT_DATA_MISMATCH


def test_a_tampered_report_is_refused(served: DevStack, client: WorkloadIdentity) -> None:
    def flip(response: pb.GetEvidenceResponse) -> None:
        report = bytearray(response.evidence.report)
        report[0x90] ^= 1  # the measurement
        response.evidence.report = bytes(report)

    with pytest.raises(VerificationFailed):
        _verify(served, client, change=flip)


def test_a_policy_loaded_in_development_mode_is_refused_under_production_trust(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """Loaded with production=False, a policy may state no TCB minimum (``any``): a backend with
    production trust held servers to less than a production broker releases keys under."""
    development = ReleasePolicy.load(
        served.simulated_policy("dev-1").replace("  allow_simulated: true\n", ""), production=False
    )
    authority = SimulatedAuthority.load(served.init_simulated_tee())
    with _connect(served, client) as connection, pytest.raises(PolicyInvalid) as refused:
        verify_inference_server(
            connection,
            trust=TrustStore.production(),
            collateral=CollateralCache(
                served.init_collateral(), authority.trust_store(), writable=False
            ),
            policy=development,
        )
    assert refused.value.reason == Reason.POLICY_DEVELOPMENT_MODE


def test_a_policy_for_another_identity_is_refused(
    served: DevStack, client: WorkloadIdentity
) -> None:
    text = served.simulated_policy("other-1").replace(
        served.spiffe_id("inference"), served.spiffe_id("publisher")
    )
    with pytest.raises(PolicyViolation):
        _verify(served, client, policy=ReleasePolicy.load(text, production=False))


# ------------------------------------------------------------------ the connection itself


def _connect_to(client: WorkloadIdentity, address: str) -> ServerConnection:
    """A connection from ``client`` to whatever listens at ``address``."""
    return ServerConnection.of_identity(
        client, address, server_name="inference", server_id="spiffe://strongroom.test/inference"
    )


def _live(connection: ServerConnection) -> bool:
    stub = oip_grpc.GRPCInferenceServiceStub(connection.channel)
    return bool(stub.ServerLive(oip_pb.ServerLiveRequest(), timeout=10).live)


def _held(port: int) -> tuple[int, int]:
    """What this process's ServerConnections hold: their fds (abstract Unix sockets of theirs,
    TCP connections to ``port``, in-memory files of a client key) and their loop threads.
    Counted by what they are, not in all: the in-process servers open and close their own."""
    inodes = set()
    for line in Path("/proc/self/net/unix").read_text().splitlines()[1:]:
        fields = line.split()  # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) > 7 and fields[7].startswith("@strongroom-connection-"):
            inodes.add(fields[6])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()  # sl local_address rem_address ... inode (the tenth)
            if int(fields[2].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("/memfd:tls-client") or link[len("socket:[") : -1] in inodes:
                fds += 1
    loops = [t for t in threading.enumerate() if t.name == "strongroom-server-connection"]
    return fds, len(loops)


def test_connections_close_cleanly_and_leave_nothing_behind(
    served: DevStack,
    client: WorkloadIdentity,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every close() logged "ERROR asyncio: Exception in callback ..." with a CancelledError
    traceback (the cancelled connection task), which `strongroom inference evidence --verify`
    printed on stderr after a successful check."""
    with _connect(served, client, f"localhost:{served.port('inference')}") as first:
        assert _live(first)  # the name resolved by asyncio: its executor's threads too
    port = served.port("inference")
    before = _held(port)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            with _connect(served, client) as connection:
                assert _live(connection)
                assert _held(port)[0] >= before[0] + 3  # its listener, its two connections
    # Other clients of the server in this process may close theirs meanwhile, never open more.
    fds, loops = _held(port)
    assert fds <= before[0] and loops <= before[1]
    assert [r.getMessage() for r in caplog.records] == []
    code, _, err = evidence(
        capsys, served,
        "--verify", str(served.init_collateral()),
        "--simulated-tee-dir", str(served.init_simulated_tee()),
    )  # fmt: skip
    assert code == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def impostor(served: DevStack) -> Iterator[WorkloadIdentity]:
    """A certificate for the inference server's SPIFFE ID and name, held by another program."""
    identity = WorkloadIdentity.enrol(
        served.start_ca().client(),
        served.token("inference", dns=["inference"]),
        policy=RenewalPolicy(),
    )
    yield identity
    identity.close()


@contextlib.contextmanager
def _tls_server(
    identity: WorkloadIdentity,
    tmp_path: Path,
    *,
    newest: ssl.TLSVersion,
    alpn: list[str],
    on_connection: Callable[[ssl.SSLSocket], None] | None = None,
) -> Iterator[str]:
    """A TLS server (not gRPC) with ``identity``'s certificate, TLS up to ``newest``, offering
    ``alpn``: it completes handshakes and holds the connections open, handing each to
    ``on_connection`` on a thread of its own."""
    credentials = identity.credentials
    (tmp_path / "server.pem").write_bytes(credentials.chain_pem + credentials.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = newest
    context.load_cert_chain(tmp_path / "server.pem")
    if alpn:
        context.set_alpn_protocols(alpn)
    held: list[socket.socket] = []

    def serve(listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = listener.accept()
                with contextlib.suppress(OSError):
                    held.append(context.wrap_socket(raw, server_side=True))
                    if on_connection is not None:
                        threading.Thread(
                            target=on_connection, args=(held[-1],), daemon=True
                        ).start()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        try:
            yield f"127.0.0.1:{listener.getsockname()[1]}"
        finally:
            listener.shutdown(socket.SHUT_RDWR)
            for held_socket in held:
                held_socket.close()


def test_the_connection_requires_tls_13_and_http2_as_the_mesh_does(
    served: DevStack, client: WorkloadIdentity, impostor: WorkloadIdentity, tmp_path: Path
) -> None:
    """A server offering only TLS 1.2 (which allows renegotiation: another certificate on the
    same connection after its key was read) or not agreeing to HTTP/2 by ALPN was accepted:
    every mesh server requires TLS 1.3 and gRPC's own channels require ALPN h2."""
    with (
        _tls_server(impostor, tmp_path, newest=ssl.TLSVersion.TLSv1_2, alpn=["h2"]) as old,
        pytest.raises(Unavailable) as refused,
    ):
        _connect(served, client, old)
    assert refused.value.reason == Reason.TLS_VERSION
    assert "TLS 1.3" in refused.value.message
    with (
        _tls_server(impostor, tmp_path, newest=ssl.TLSVersion.TLSv1_3, alpn=[]) as plain,
        pytest.raises(Unavailable) as refused,
    ):
        _connect(served, client, plain)
    assert refused.value.reason == Reason.SERVER_UNREACHABLE
    assert "ALPN" in refused.value.message and "h2" in refused.value.message
    with (
        _tls_server(impostor, tmp_path, newest=ssl.TLSVersion.TLSv1_3, alpn=["h2"]) as both,
        pytest.raises(Unavailable) as refused,
    ):
        _connect(served, client, both, timeout=0.5)
    # Past both checks: it is then refused only for never answering HTTP/2.
    assert refused.value.reason == Reason.SERVER_UNREACHABLE
    assert "did not answer HTTP/2" in refused.value.message


def test_an_interrupted_connection_leaves_nothing_behind(
    served: DevStack, client: WorkloadIdentity, impostor: WorkloadIdentity, tmp_path: Path
) -> None:
    """A KeyboardInterrupt while the constructor waited for the server's HTTP/2 answer left the
    loop thread, the TLS connection and the Unix sockets open until the process exited."""
    assert threading.current_thread() is threading.main_thread()  # where SIGINT is delivered
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def interrupt_once_it_waits(tls: ssl.SSLSocket) -> None:
        # gRPC's preface reaching the server: the constructor now waits for HTTP/2 (past every
        # check of the connection; else it ended, and the test fails on its error).
        with contextlib.suppress(OSError):
            if tls.recv(24).startswith(b"PRI * HTTP/2.0"):
                signal.pthread_kill(main_thread, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _tls_server(
            impostor, tmp_path, newest=ssl.TLSVersion.TLSv1_3, alpn=["h2"],
            on_connection=interrupt_once_it_waits,
        ) as silent:  # fmt: skip
            port = int(silent.rpartition(":")[2])
            before = _held(port)
            with pytest.raises(KeyboardInterrupt):
                _connect(served, client, silent)  # waits 10 s: the interrupt comes first
            assert _held(port) == before
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_evidence_cannot_be_checked_against_a_key_read_over_another_connection(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """verify_inference_server took any channel and any key: pairing a key read over a handshake
    of its own (server_tls_public_key) with a channel of one's own, as this module's own tests
    did, passed the relay that the CLI's single connection defeats, without a word."""
    authority = SimulatedAuthority.load(served.init_simulated_tee())
    trust = authority.trust_store()
    with pytest.raises(TypeError) as refused:
        verify_inference_server(
            # There is no place for a key read elsewhere any more; a channel alone is refused.
            served.channel(client, "inference"),  # type: ignore[arg-type]
            trust=trust,
            collateral=CollateralCache(served.init_collateral(), trust, writable=False),
        )
    assert "ServerConnection" in str(refused.value)
    with _connect(served, client) as connection:
        verified = verify_inference_server(
            connection,
            trust=trust,
            collateral=CollateralCache(served.init_collateral(), trust, writable=False),
            policy=ReleasePolicy.load(served.simulated_policy("same-1"), production=False),
        )
        assert verified.decision is not None  # held to the policy for connection.server_id
        assert connection.server_id == served.spiffe_id("inference")


_FIRST_TO_CONNECT = """
import socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(10)
    try:
        s.connect(bytes.fromhex(sys.argv[1]))
        s.sendall(bytes.fromhex(sys.argv[2]))
        print(len(s.recv(65536)))
    except OSError:
        print(0)
"""


def test_another_process_of_the_same_user_cannot_take_the_connection(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """The Unix socket accepted whichever process connected first, and gRPC connects only at the
    first call: another process of the same user (which cannot read this one's memory, nor so
    the client key, under Yama ptrace_scope >= 1) that found the socket in /tmp got the
    connection, authenticated as this client, to the checked server, and the client's calls
    failed UNAVAILABLE."""
    with _connect(served, client) as connection:
        # Where gRPC connects (the socket's name is random: another process finds it by
        # listing /proc/net/unix, or a directory).
        kind, _, name = connection._channel._channel.target().decode().partition(":")
        path = name if kind == "unix" else "\0" + name
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
        other = subprocess.run(
            [sys.executable, "-c", _FIRST_TO_CONNECT, path.encode().hex(), preface.hex()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert other.stdout.strip() == "0", "another process spoke to the server"
        assert _live(connection)


def test_a_client_certificate_the_server_rejects_is_named_at_the_connection(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """The server closing the connection right after the handshake (our certificate is not from
    its CA) showed only at the first call, as "UNAVAILABLE: failed to connect to all addresses;
    ... unix:/tmp/strongroom-connection-.../grpc.sock: Socket closed": neither the server nor the
    cause. Every other client of the mesh says CLIENT_CERTIFICATE_REJECTED."""
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ClientCertificateRejected) as refused:
        ServerConnection(
            served.address("inference"),
            server_name="inference",
            server_id=served.spiffe_id("inference"),
            root_pem=client.root_pem,
            chain_pem=self_signed_pem(key, "intruder"),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    assert refused.value.reason == Reason.CLIENT_CERTIFICATE_REJECTED
    assert served.address("inference") in str(refused.value)
    assert "strongroom-connection" not in str(refused.value)


def test_a_reconnect_cannot_reach_a_socket_another_process_put_in_its_place(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """When the connection ended (the server's GOAWAY at max_connection_age, a network cut),
    gRPC reconnected to the Unix socket's path at the next call, and another process of the
    same user (who owns the private directory as much as we do) could have replaced that file
    with a socket of its own: the calls, data included, then went to it over no checked
    connection at all."""
    router = _Router(served.address("inference"), served.address("inference"))
    taken: list[socket.socket] = []
    try:
        with _connect(served, client, router.address) as connection:
            assert _live(connection)
            target = connection._channel._channel.target().decode()
            kind, _, name = target.partition(":")
            attacker = socket.socket(socket.AF_UNIX)
            taken.append(attacker)
            with contextlib.suppress(OSError):  # the place is not free: nothing to replace
                if kind == "unix":
                    Path(name).unlink()
                    attacker.bind(name)
                else:
                    attacker.bind("\0" + name)
                attacker.listen()
            attacker.setblocking(False)
            router.close()  # the connection ends
            stub = oip_grpc.GRPCInferenceServiceStub(connection.channel)
            codes = set()
            for _ in range(20):  # gRPC connects anew at a call once it has seen the end
                with pytest.raises(grpc.RpcError) as failed:
                    stub.ServerLive(oip_pb.ServerLiveRequest(), timeout=2)
                codes.add(failed.value.code())  # type: ignore[attr-defined]
            with pytest.raises(OSError):  # nothing connected to it (nor could it listen)
                taken.append(attacker.accept()[0])
            assert codes == {grpc.StatusCode.UNAVAILABLE}
    finally:
        router.close()
        for sock in taken:
            sock.close()


def test_every_call_after_the_connection_ended_says_so(
    served: DevStack, client: WorkloadIdentity
) -> None:
    """After the connection ended (GOAWAY, a cut) every call failed "UNAVAILABLE: failed to
    connect to all addresses; last error: ... unix:/tmp/strongroom-connection-.../grpc.sock:
    ...": a socket the caller never heard of, and no word that this connection is over for good
    and a new one must be opened (and checked again). Blocking unary calls then said so, but
    streaming calls and futures still failed gRPC's way."""
    router = _Router(served.address("inference"), served.address("inference"))
    try:
        with _connect(served, client, router.address) as connection:
            assert _live(connection)
            router.close()
            with pytest.raises(grpc.RpcError) as ended:
                for _ in range(50):  # until the pumps have seen the end
                    with contextlib.suppress(grpc.RpcError):
                        _live(connection)
                    _live(connection)
            calls = _every_kind_of_call(connection.channel)
            stub = oip_grpc.GRPCInferenceServiceStub(connection.channel)
        with pytest.raises(ValueError, match="the connection is closed"):
            stub.ServerLive(oip_pb.ServerLiveRequest(), timeout=10)  # closed by us, not ended
    finally:
        router.close()
    for kind, error in [("blocking unary", ended.value), *calls]:
        assert isinstance(error, Unavailable), kind
        assert error.code() == grpc.StatusCode.UNAVAILABLE, kind  # type: ignore[attr-defined]
        assert error.reason == Reason.SERVER_CONNECTION_ENDED, kind
        assert served.spiffe_id("inference") in error.message, kind
        assert router.address in error.message and "new ServerConnection" in error.message
        assert "strongroom-connection" not in error.message, kind


def _every_kind_of_call(channel: grpc.Channel) -> list[tuple[str, BaseException | None]]:
    """The error each kind of call on ``channel`` fails with (None: it did not fail)."""
    method = "/strongroom.test.Any/Method"  # never sent: the connection has ended
    unary, requests = b"", lambda: iter([b""])
    future = channel.unary_unary(method, None, None).future(unary, timeout=10)
    stream_future = channel.stream_unary(method, None, None).future(requests(), timeout=10)
    assert future.code() == stream_future.code() == grpc.StatusCode.UNAVAILABLE
    assert "strongroom-connection" not in (future.details() or "")
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("with_call", lambda: channel.unary_unary(method, None, None).with_call(unary, timeout=10)),
        ("future", future.result),
        ("unary-stream", lambda: list(channel.unary_stream(method, None, None)(unary, timeout=10))),
        ("stream-unary", lambda: channel.stream_unary(method, None, None)(requests(), timeout=10)),
        ("stream-unary future", stream_future.result),
        (
            "stream-stream",
            lambda: list(channel.stream_stream(method, None, None)(requests(), timeout=10)),
        ),
    ]
    failures: list[tuple[str, BaseException | None]] = [("future.exception", future.exception())]
    for kind, attempt in attempts:
        try:
            attempt()
        except grpc.RpcError as error:
            failures.append((kind, error))
        else:
            failures.append((kind, None))
    return failures


def test_a_server_that_does_not_speak_tls_is_not_said_to_lack_tls_13(
    client: WorkloadIdentity,
) -> None:
    """Its answer (here plain HTTP) fails OpenSSL with WRONG_VERSION_NUMBER, which the check for
    TLS 1.3 took for a server speaking an older TLS."""
    with socket.create_server(("127.0.0.1", 0)) as plain:

        def answer() -> None:
            with contextlib.suppress(OSError):
                peer, _ = plain.accept()
                with peer:
                    peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    peer.recv(65536)

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(Unavailable) as refused:
            _connect_to(client, f"127.0.0.1:{plain.getsockname()[1]}")
    assert refused.value.reason == Reason.SERVER_UNREACHABLE
    assert "TLS 1.3" not in refused.value.message
