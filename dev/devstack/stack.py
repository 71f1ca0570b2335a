"""The development stack: PKI, HSM token, simulated TEE, secrets, configurations, services."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from strongroom.attestation.release_signature import ReleaseVerifier
from strongroom.attesters import Attester, SimulatedAttester, TeeType
from strongroom.client.keyrelease import KeyReleaseClient
from strongroom.client.store_channel import store_channel
from strongroom.errors import FailedPrecondition, Unavailable
from strongroom.pki import StepCa, WorkloadIdentity, init_ca, mint_token
from strongroom.pki.identity import RenewalPolicy
from strongroom.runtime.config import load_service_config
from strongroom.runtime.process import SERVICE_ENV
from strongroom.runtime.secrets import Secret

log = logging.getLogger(__name__)

TRUST_DOMAIN = "strongroom.local"
HSM_LABEL = "strongroom-dev"
ROLES = ("publisher", "admin", "inference", "client")
# The launch measurement the simulated confidential VM reports, and the demo's policy approves.
DEMO_MEASUREMENT = hashlib.sha384(b"strongroom demo guest image v1").hexdigest()
# What each service's health port must report SERVING for the process to count as up. The inference
# service's overall health also waits for its models, which may (by design) never load.
_UP_SERVICE = {"inference": "strongroom.api.inference.v1.ModelControlService"}


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (32768 by default on Linux)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_CHOSEN: set[int] = set()  # every port free_port handed out in this process
_CHOSEN_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on loopback that is free right now, chosen below the kernel's ephemeral range.

    A stack's ports are chosen once and bound later (again after each restart). A port from the
    ephemeral range (what binding port 0 returns) can meanwhile become the source port of any
    outgoing connection on the machine, and the bind then fails ("Failed to bind to address":
    seen in a rehearsal of the suite). Below that range only other explicit choices compete.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12_000)
    for _ in range(100):
        port = low + secrets.randbelow(high - low)
        # Free now is not enough: a port this process chose for a service it has not bound yet
        # (a stack's health port, bound when its service starts) was handed out again, and the
        # later bind of one of the two failed ("Failed to bind to address", a rehearsal's
        # module of 17 tests). So no port is handed out twice in one process.
        with _CHOSEN_LOCK:
            if port in _CHOSEN:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _CHOSEN.add(port)
            return port
    with socket.socket() as s:  # a crowded range: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_secret(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@dataclass
class RunningService:
    """A service started by the stack, in process or as a child process."""

    name: str
    address: str
    health_address: str
    stop: Callable[[], None]
    process: subprocess.Popen[bytes] | None = None
    handle: Any = None  # the in-process service object (KeyBroker, ModelStore, ...)
    kind: str = ""  # the service type, when ``name`` is a second instance


@dataclass
class DevStack:
    """A local Strongroom under ``root``; call :meth:`close` to stop everything it started."""

    root: Path
    trust_domain: str = TRUST_DOMAIN
    cert_lifetime: timedelta = timedelta(hours=1)
    step_ca_binary: Path | None = None
    ca: StepCa | None = None
    services: dict[str, RunningService] = field(default_factory=dict)
    _identities: list[WorkloadIdentity] = field(default_factory=list)
    _ports: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ identities

    def spiffe_id(self, name: str) -> str:
        """``spiffe://<trust domain>/<name>``."""
        return f"spiffe://{self.trust_domain}/{name}"

    @property
    def pki_dir(self) -> Path:
        """The CA directory."""
        return self.root / "pki"

    def start_ca(self) -> StepCa:
        """Initialises the CA (once) and starts step-ca on a free loopback port."""
        if self.ca is not None:
            return self.ca
        if not (self.pki_dir / "config" / "ca.json").exists():
            init_ca(
                self.pki_dir,
                trust_domain=self.trust_domain,
                dns_names=["localhost", "127.0.0.1"],
                address=f"127.0.0.1:{free_port()}",
                default_lifetime=self.cert_lifetime,
                min_lifetime=timedelta(seconds=10),
            )
        self.ca = StepCa(self.pki_dir, binary=self.step_ca_binary).start()
        return self.ca

    def token(self, name: str, dns: Sequence[str] = ()) -> str:
        """A one-time enrolment token for ``spiffe://…/<name>`` plus ``dns`` names."""
        ca = self.start_ca()
        sid = self.spiffe_id(name)
        return mint_token(ca.layout.provisioner(), ca_url=ca.url, subject=sid, sans=[sid, *dns])

    def identity(self, name: str, *, lifetime: timedelta | None = None) -> WorkloadIdentity:
        """Enrols a client identity (publisher, admin, inference, client) kept renewed."""
        ca = self.start_ca()
        identity = WorkloadIdentity.enrol(
            ca.client(),
            self.token(name),
            lifetime=lifetime,
            policy=RenewalPolicy(),
        )
        self._identities.append(identity)
        return identity

    def foreign_identity(self, spiffe_id: str) -> WorkloadIdentity:
        """Enrols an identity with any SPIFFE ID (another trust domain, an unknown workload): a
        certificate our CA really issued, as a hostile but certified client would hold."""
        ca = self.start_ca()
        token = mint_token(
            ca.layout.provisioner(), ca_url=ca.url, subject=spiffe_id, sans=[spiffe_id]
        )
        identity = WorkloadIdentity.enrol(ca.client(), token, policy=RenewalPolicy())
        self._identities.append(identity)
        return identity

    def simulated_policy(self, version: str, measurement: str = DEMO_MEASUREMENT) -> str:
        """A release policy for the inference identity in a simulated SEV-SNP VM measuring
        ``measurement`` (hex), with the defaults: debug forbidden, VMPL 0."""
        return (
            f'version: "{version}"\n'
            f'allowed_spiffe_ids: ["{self.spiffe_id("inference")}"]\n'
            "tee_types: [SEV_SNP]\n"
            "sev_snp:\n"
            "  allow_simulated: true\n"
            f'  measurements: ["{measurement}"]\n'
            "  min_reported_tcb: any  # development only; production policies state a minimum\n"
        )

    def create_release_key(
        self, admin: WorkloadIdentity, key_id: str, *, policy_version: str
    ) -> Any:
        """Creates a KEK through the broker's admin API and attaches :meth:`simulated_policy`.

        Returns the created key's ``KeyInfo`` message.
        """
        from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
        from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc

        stub = pb_grpc.KeyAdminServiceStub(self.channel(admin, "keybroker"))
        key = stub.CreateKey(pb.CreateKeyRequest(key_id=key_id), timeout=30).key
        stub.SetReleasePolicy(
            pb.SetReleasePolicyRequest(
                key_id=key_id, policy_document=self.simulated_policy(policy_version)
            ),
            timeout=30,
        )
        return key

    # ------------------------------------------------------------------ HSM, TEE, secrets

    @property
    def secrets_dir(self) -> Path:
        """Secret files (0600)."""
        return self.root / "secrets"

    def init_hsm(self) -> Path:
        """Creates the SoftHSM2 token (once); returns its directory."""
        from strongroom.dev.softhsm import init_softhsm_token

        directory = self.root / "hsm"
        if (directory / "softhsm2.conf").exists():
            return directory
        pin = secrets.token_hex(16).encode()
        _write_secret(self.secrets_dir / "hsm-pin", pin)
        init_softhsm_token(
            directory,
            label=HSM_LABEL,
            pin=Secret(pin),
            so_pin=Secret(secrets.token_hex(16).encode()),
        )
        return directory

    def init_simulated_tee(self) -> Path:
        """Generates the simulated TEE chain (once); returns its directory."""
        from strongroom.dev.simulated import SimulatedAuthority

        directory = self.root / "simulated-tee"
        if not (directory / "amd_trust.pem").exists():
            SimulatedAuthority.generate().save(directory)
        return directory

    def init_collateral(self) -> Path:
        """The broker's collateral cache, filled with the simulated chain's collateral (CRLs,
        TDX TCB info and QE identity), refreshed on every start; returns its directory."""
        from strongroom.attestation.collateral_cache import CollateralCache
        from strongroom.dev.simulated import SimulatedAuthority

        directory = self.root / "collateral"
        authority = SimulatedAuthority.load(self.init_simulated_tee())
        cache = CollateralCache(directory, authority.trust_store())
        authority.fill_cache(cache, tdx=[authority.tdx()])
        return directory

    def init_secrets(self) -> None:
        """The broker's nonce key, audit signing key and release-signing key (once)."""
        from strongroom.keybroker.audit import new_signing_key

        if not (self.secrets_dir / "nonce-key").exists():
            _write_secret(self.secrets_dir / "nonce-key", os.urandom(32))
        for name in ("audit-key", "release-signing-key"):
            if not (self.secrets_dir / f"{name}.pem").exists():
                private_pem, public_pem = new_signing_key()
                _write_secret(self.secrets_dir / f"{name}.pem", private_pem)
                (self.secrets_dir / f"{name}.pub.pem").write_bytes(public_pem)

    @property
    def release_public_key(self) -> Path:
        """The broker's release-signing public key (PEM), made with the broker's secrets."""
        self.init_secrets()
        return self.secrets_dir / "release-signing-key.pub.pem"

    def release_verifier(self) -> ReleaseVerifier:
        """What verifies this stack's broker's release answers (for a KeyReleaseClient)."""
        return ReleaseVerifier.from_files([self.release_public_key])

    def simulated_attester(self, claims: Mapping[str, Any] | None = None) -> SimulatedAttester:
        """A simulated SEV-SNP VM signed by this stack's simulated TEE chain, its report saying
        ``claims`` (by default the demo guest's measurement, which the stack's policies allow)."""
        from strongroom.dev.simulated import SimulatedAuthority

        return SimulatedAttester(
            SimulatedAuthority.load(self.init_simulated_tee()).snp(),
            TeeType.SEV_SNP,
            production=False,
            claims=claims
            if claims is not None
            else {"measurement": bytes.fromhex(DEMO_MEASUREMENT)},
        )

    def release_client(
        self, identity: WorkloadIdentity | None = None, attester: Attester | None = None
    ) -> KeyReleaseClient:
        """The key release client of an inference server: ``identity`` (this stack's
        ``inference`` by default) in the VM of ``attester`` (:meth:`simulated_attester` by
        default), over mTLS to this stack's broker, its answers verified with its key."""
        identity = identity or self.identity("inference")
        return KeyReleaseClient(
            self.channel(identity, "keybroker"),
            attester or self.simulated_attester(),
            identity.public_key_der,
            verifier=self.release_verifier(),
        )

    # ------------------------------------------------------------------ configuration

    def port(self, service: str) -> int:
        """The service's mTLS port (stable for the stack's life)."""
        if service not in self._ports:
            self._ports[service] = free_port()
            self._ports[f"{service}-health"] = free_port()
        return self._ports[service]

    def address(self, service: str) -> str:
        """``127.0.0.1:<port>`` of ``service``."""
        return f"127.0.0.1:{self.port(service)}"

    def config_path(self, service: str) -> Path:
        """Where :meth:`write_config` puts the service's configuration."""
        return self.root / "config" / f"{service}.yaml"

    def write_config(
        self,
        service: str,
        section: dict[str, Any] | None = None,
        *,
        instance: str | None = None,
        server: dict[str, Any] | None = None,
        roles: Mapping[str, Sequence[str]] | None = None,
    ) -> Path:
        """Writes the service's configuration file and its one-time enrolment token.

        ``instance`` names a second copy of a service (its own ports, state and files; the same
        SPIFFE ID); ``server`` sets keys of the ``server:`` section (limits); ``roles`` gives
        more names (as :meth:`identity` takes them) a role, besides the role's own name.
        """
        instance = instance or service
        ca = self.start_ca()
        state = self.root / "state" / instance
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        token_file = _write_secret(
            self.secrets_dir / f"{instance}.token",
            self.token(service, [service, "localhost"]).encode(),
        )
        self.port(instance)
        document: dict[str, Any] = {
            "service": service,
            "mode": "development",
            "listen": self.address(instance),
            "health_listen": f"127.0.0.1:{self._ports[f'{instance}-health']}",
            "identity": {
                "trust_domain": self.trust_domain,
                "spiffe_id": self.spiffe_id(service),
                "dns_names": [service, "localhost"],
                "ca_url": ca.url,
                "ca_root_file": str(ca.layout.root_cert_path),
                "token_file": str(token_file),
                "state_dir": str(state / "identity"),
            },
            "logging": {"level": "INFO", "format": "text"},
            "authz": {
                role: [self.spiffe_id(name) for name in (role, *(roles or {}).get(role, ()))]
                for role in ROLES
            },
            service: section if section is not None else self.default_section(service),
        }
        if server:
            document["server"] = server
        path = self.config_path(instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    def write_client_config(self, role: str) -> Path:
        """A CLI client configuration (``--client-config``) for ``role`` (admin, publisher, ...)."""
        ca = self.start_ca()
        token_file = _write_secret(
            self.secrets_dir / f"client-{role}.token", self.token(role).encode()
        )
        document = {
            "identity": {
                "trust_domain": self.trust_domain,
                "spiffe_id": self.spiffe_id(role),
                "ca_url": ca.url,
                "ca_root_file": str(ca.layout.root_cert_path),
                "token_file": str(token_file),
                "state_dir": str(self.root / "state" / f"client-{role}"),
            },
            **{
                service: self.address(service)
                for service in ("keybroker", "modelstore", "inference")
            },
            # What `model fetch` verifies the broker's release answers with.
            "keybroker_release_signing_public_keys": [str(self.release_public_key)],
        }
        path = self.root / "config" / f"client-{role}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    def default_section(self, service: str) -> dict[str, Any]:
        """The development settings of ``service``'s own section."""
        if service == "keybroker":
            hsm = self.init_hsm()
            tee = self.init_simulated_tee()
            self.init_secrets()
            return {
                "pkcs11_module": str(hsm / "libsofthsm2.so"),
                "softhsm2_conf": str(hsm / "softhsm2.conf"),
                "token_label": HSM_LABEL,
                "pin_file": str(self.secrets_dir / "hsm-pin"),
                "nonce_key_file": str(self.secrets_dir / "nonce-key"),
                "audit_key_file": str(self.secrets_dir / "audit-key.pem"),
                "release_signing_key_file": str(self.secrets_dir / "release-signing-key.pem"),
                "audit_log": str(self.root / "state" / "keybroker" / "audit.log"),
                "policies_dir": str(self.root / "state" / "keybroker" / "policies"),
                "allow_simulated_tee": True,
                "simulated_roots_dir": str(tee),
                "collateral_dir": str(self.init_collateral()),
                # Loopback only: the simulated chain's collateral is filled locally.
                "collateral_fetch": False,
            }
        if service == "modelstore":
            return {"data_dir": str(self.root / "state" / "modelstore" / "data")}
        if service == "inference":
            return {
                "model_store": self.address("modelstore"),
                "key_broker": self.address("keybroker"),
                "attester": "simulated",
                "simulated_tee_dir": str(self.init_simulated_tee()),
                "simulated_measurement": DEMO_MEASUREMENT,
                "release_signing_public_keys": [str(self.release_public_key)],
                "models": [],
            }
        raise FailedPrecondition(f"no default configuration for {service}")

    # ------------------------------------------------------------------ services

    def start_in_process(
        self,
        service: str,
        section: dict[str, Any] | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
        server: dict[str, Any] | None = None,
        roles: Mapping[str, Sequence[str]] | None = None,
        build_args: Mapping[str, Any] | None = None,
    ) -> RunningService:
        """Starts ``service`` in this process from its configuration file (for tests);
        ``server`` sets keys of its ``server:`` section, ``roles`` gives more names a role
        (:meth:`write_config`), ``build_args`` go to the service's ``build`` (a test's clock)."""
        import importlib

        module = importlib.import_module(f"strongroom.{service}.server")
        config_cls = {
            "keybroker": "strongroom.keybroker.config:KeybrokerConfig",
            "modelstore": "strongroom.modelstore.config:ModelstoreConfig",
            "inference": "strongroom.inference.config:InferenceConfig",
        }[service]
        module_name, cls_name = config_cls.split(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        path = self.write_config(service, section, server=server, roles=roles)
        common, config = load_service_config(path, service, cls, environ={})
        from strongroom.runtime.bootstrap import open_identity

        identity = open_identity(common.identity)
        handle = module.build(
            common,
            config,
            identity=identity,
            tracer_provider=tracer_provider,
            **(build_args or {}),
        )
        handle.host.start()

        def stop() -> None:
            handle.close()
            identity.close()

        running = RunningService(
            service,
            self.address(service),
            f"127.0.0.1:{self._ports[f'{service}-health']}",
            stop,
            handle=handle,
        )
        self.services[service] = running
        self.wait_serving(running)
        return running

    def start_process(
        self,
        service: str,
        section: dict[str, Any] | None = None,
        *,
        instance: str | None = None,
        server: dict[str, Any] | None = None,
        launcher: Sequence[str] = (sys.executable, "-m", "strongroom.cli.main"),
        env: Mapping[str, str] | None = None,
    ) -> RunningService:
        """Starts ``strongroom serve <service>`` as a child process (for the demo);
        ``server`` sets keys of its ``server:`` section; ``launcher`` is the command that takes
        ``serve <service> --config <path>`` (a benchmark's profiling or memory-probe wrapper, for
        instance); ``env`` adds to this process's environment, on top of the environment every
        service ships with (:data:`strongroom.runtime.process.SERVICE_ENV`)."""
        instance = instance or service
        path = self.write_config(service, section, instance=instance, server=server)
        log_path = self.log_path(instance)
        env = {**SERVICE_ENV[service], **(env or {})}  # as the images run it
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                [
                    *launcher,
                    "serve",
                    service,
                    "--config",
                    str(path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
            )

        def stop() -> None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

        running = RunningService(
            instance,
            self.address(instance),
            f"127.0.0.1:{self._ports[f'{instance}-health']}",
            stop,
            process=process,
            kind=service,
        )
        self.services[instance] = running
        try:
            self.wait_serving(running, log_path=log_path)
        except BaseException:
            stop()
            raise
        return running

    def wait_serving(
        self, running: RunningService, *, timeout: float = 60.0, log_path: Path | None = None
    ) -> None:
        """Waits until the service's health port says SERVING (for the process to be up)."""
        service = _UP_SERVICE.get(running.kind or running.name, "")
        deadline = time.monotonic() + timeout
        last = "no answer"
        with grpc.insecure_channel(running.health_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if running.process is not None and running.process.poll() is not None:
                    tail = log_path.read_text()[-2000:] if log_path else ""
                    raise Unavailable(f"{running.name} exited during start-up:\n{tail}")
                try:
                    status = stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as exc:
                    last = exc.code().name
                time.sleep(0.1)
        raise Unavailable(f"{running.name} is not serving after {timeout:.0f}s ({last})")

    def channel(
        self,
        identity: WorkloadIdentity,
        service: str,
        *,
        instance: str | None = None,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> grpc.Channel:
        """An mTLS channel from ``identity`` to ``service`` (or to a named second instance) that
        checks the server presents ``service``'s SPIFFE ID."""
        return identity.channel(
            self.address(instance or service),
            server_name=service,
            server_id=self.spiffe_id(service),
            options=options,
        )

    def store_channel(
        self, identity: WorkloadIdentity, *, instance: str | None = None
    ) -> grpc.Channel:
        """A model-store channel from ``identity``, made as the inference server and the command
        line make theirs (:func:`~strongroom.client.store_channel.store_channel`)."""
        return store_channel(
            identity,
            self.address(instance or "modelstore"),
            server_name="modelstore",
            server_id=self.spiffe_id("modelstore"),
        )

    def log_path(self, instance: str) -> Path:
        """Where a child process's output goes."""
        path = self.root / "logs" / f"{instance}.log"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Service logs name identities, keys and models: for the stack's user only.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        return path

    def close(self) -> None:
        """Stops every service, identity and the CA. Idempotent."""
        for running in reversed(list(self.services.values())):
            try:
                running.stop()
            except Exception:
                log.exception("stopping %s failed", running.name)
        self.services.clear()
        for identity in self._identities:
            identity.close()
        self._identities.clear()
        if self.ca is not None:
            self.ca.stop()
            self.ca = None

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
