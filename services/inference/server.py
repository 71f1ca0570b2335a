"""Assembles and runs the inference service inside a confidential VM."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider

from strongroom.api.inference.v1 import attestation_pb2_grpc, model_control_pb2_grpc
from strongroom.attestation.release_signature import ReleaseVerifier
from strongroom.attesters import (
    Attester,
    AttesterNotConfigured,
    SimulatedTee,
    TeeType,
    select_attester,
)
from strongroom.client.cancel import CallScope, scoped_channel
from strongroom.client.keyrelease import KeyReleaseClient, PinnedChannels
from strongroom.client.store_channel import store_channel
from strongroom.errors import FailedPrecondition, StrongroomError
from strongroom.inference.autoload import ConfiguredLoads, RetrySchedule
from strongroom.inference.config import InferenceConfig
from strongroom.inference.control import CONTROL_SERVICE, ModelControlServicer
from strongroom.inference.evidence_service import InferenceAttestationServicer
from strongroom.inference.loader import ModelLoader
from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import SERVICE_NAME as OIP_SERVICE
from strongroom.inference.oip import OipServicer
from strongroom.inference.oip import add_to_server as add_oip_to_server
from strongroom.inference.signature import SignaturePolicy
from strongroom.pki.identity import WorkloadIdentity

# Imported first: it disables ONNX Runtime's telemetry before onnxruntime is loaded anywhere.
from strongroom.reasons import Reason
from strongroom.runtime import starting
from strongroom.runtime.bootstrap import RoleTable, build_host, run_service
from strongroom.runtime.config import CommonConfig
from strongroom.runtime.server import ReadinessCheck, ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider, traced_channel
from strongroom.runtime.unsent import UnsentResponses

log = logging.getLogger(__name__)

SIMULATOR_GROUP = "strongroom.simulators"

EVIDENCE_SERVICE = "strongroom.api.inference.v1.InferenceAttestationService"
ROLE_RULES: dict[str, tuple[str, ...]] = {
    OIP_SERVICE: ("client", "admin"),
    EVIDENCE_SERVICE: ("client", "admin"),
    CONTROL_SERVICE: ("admin",),
}
CONTROL_PLANE: tuple[str, ...] = (CONTROL_SERVICE,)
"""The inference service's control plane: model control (the admin's LoadModel/UnloadModel), which
may use the workers reserved from inference calls (``server.control_plane_workers``).

GetEvidence is data plane, like the inference it precedes: its requests wait on the platform's
firmware, which the host may stall, and as many of them run at once (4) as the default reserve
holds workers (4 of 32), so clients attesting at once would fill the reserve and queue the
operator's LoadModel/UnloadModel behind them. Counted in the data plane they cannot, whatever
either number is configured to."""


def _load_simulator(directory: Path) -> Any:
    """The simulated TEE authority from the development kit, found by its plugin name.

    Production code never imports the development kit: it asks for the ``simulated`` entry point
    of the ``strongroom.simulators`` group, which only ``strongroom-dev`` provides.
    """
    found = importlib.metadata.entry_points(group=SIMULATOR_GROUP, name="simulated")
    if not found:
        raise AttesterNotConfigured(
            "attester 'simulated' needs the strongroom-dev distribution (development only)",
            reason=Reason.SIMULATOR_NOT_INSTALLED,
        )
    return next(iter(found)).load()(directory)


def make_attester(common: CommonConfig, config: InferenceConfig) -> Attester:
    """The configured attester; the simulated one only in development mode."""
    if config.attester != "simulated":
        return select_attester(
            config.attester, production=common.production, privlevel=config.attester_privlevel
        )
    if common.production:
        raise AttesterNotConfigured(
            "the simulated attester cannot be used in production mode",
            reason=Reason.SIMULATOR_IN_PRODUCTION,
        )
    assert config.simulated_tee_dir is not None and config.simulated_measurement is not None
    authority = _load_simulator(config.simulated_tee_dir)
    measurement = bytes.fromhex(config.simulated_measurement)
    claims: dict[str, Any]
    simulator: SimulatedTee
    if config.simulated_tee_type == "TDX":
        tee_type, simulator, claims = TeeType.TDX, authority.tdx(), {"mrtd": measurement}
    else:
        tee_type, simulator, claims = TeeType.SEV_SNP, authority.snp(), {"measurement": measurement}
        if config.simulated_policy is not None:
            claims["policy"] = config.simulated_policy
    log.warning("DEVELOPMENT MODE: attesting with the SIMULATED TEE (%s)", tee_type.name)
    return select_attester(
        "simulated",
        production=common.production,
        simulator=simulator,
        simulator_tee_type=tee_type,
        simulator_claims=claims,
    )


@dataclass
class InferenceServer:
    """A running inference service; :meth:`close` stops it."""

    host: ServiceHost
    repository: ModelRepository
    loader: ModelLoader
    config: InferenceConfig
    retry_initial: float = 1.0
    retry_max: float = 60.0
    # Failures that are not transient (inference.failed_load_retry_seconds and its maximum).
    slow_retry_initial: float = 30.0
    slow_retry_max: float = 300.0
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    # The configured models' loads: close() cancels it, which ends a load waiting for a model's
    # lock, downloading or obtaining its key (it would otherwise run on, up to the load timeout,
    # in a server that had stopped, and be audited as a release for nobody).
    _loads: CallScope = field(default_factory=CallScope)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def load_configured_models(self, *, wait: bool = False) -> None:
        """Loads the configured models in the background, retrying their failures
        (:mod:`strongroom.inference.autoload`): soon when a dependency is unavailable or busy,
        so start-up order does not matter; slowly (``inference.failed_load_retry_seconds``)
        when the cause may go away without anyone touching this server (a denied release, a
        model not yet published, a peer's certificate outside its dates). A model an operator
        unloads meanwhile is no longer retried (its load, if it waited for the model's lock, is
        aborted). :meth:`close` stops these loads where they are.
        """
        schedule = RetrySchedule(
            soon_initial=self.retry_initial,
            soon_max=self.retry_max,
            slow_initial=self.slow_retry_initial,
            slow_max=self.slow_retry_max,
        )
        loads = ConfiguredLoads(
            self.loader,
            self.repository,
            self.config.models,
            schedule=schedule,
            scope=self._loads,
            stopping=self._stopping,
        )

        thread = threading.Thread(target=loads.run, name="model-loader", daemon=True)
        thread.start()
        self._threads.append(thread)
        if wait:
            thread.join()

    def close(self, grace: float | None = 0) -> None:
        """Stops the configured models' loads, then serving (draining for ``grace`` seconds:
        a LoadModel still running ends with its call)."""
        self._stopping.set()
        self._loads.cancel()
        self.host.stop(grace)
        for close in self._closers:
            close()


def release_verifier(common: CommonConfig, config: InferenceConfig) -> ReleaseVerifier:
    """What verifies the key broker's release answers: its release-signing public keys, and
    unsigned answers only where a development configuration says so."""
    if config.allow_unsigned_releases and common.production:
        raise FailedPrecondition(
            "inference.allow_unsigned_releases is set in production mode: refusing to accept "
            "key-release answers the key broker has not signed (configure "
            "inference.release_signing_public_keys; use mode: development for local testing)",
            reason=Reason.UNSIGNED_RELEASES_IN_PRODUCTION,
        )
    if not config.release_signing_public_keys and not config.allow_unsigned_releases:
        raise FailedPrecondition(
            "inference.release_signing_public_keys is not set: this server would have no way to "
            "tell the key broker's release answers from those of any peer holding a broker "
            "certificate. Configure the broker's release-signing public key (the public half of "
            "keybroker.release_signing_key_file, e.g. release-signing-key.pub.pem)"
            + (
                ""
                if common.production
                else ", or, in development only, inference.allow_unsigned_releases: true"
            ),
            reason=Reason.RELEASE_SIGNING_KEY_MISSING,
        )
    if config.allow_unsigned_releases:
        log.warning(
            "DEVELOPMENT MODE: key-release answers without a signature are accepted "
            "(inference.allow_unsigned_releases)"
        )
    verifier = ReleaseVerifier.from_files(
        config.release_signing_public_keys,
        allow_unsigned=config.allow_unsigned_releases,
        warn_within=timedelta(seconds=config.release_signing_key_warning_seconds),
    )
    verifier.warn_about_expiry()
    return verifier


def build(
    common: CommonConfig,
    config: InferenceConfig,
    *,
    identity: WorkloadIdentity,
    tracer_provider: TracerProvider | None = None,
    attester: Attester | None = None,
) -> InferenceServer:
    """Builds the (not yet started) inference service and its loader."""
    verifier = release_verifier(common, config)
    provider = tracer_provider or make_tracer_provider(
        "inference", common.tracing, identity=lambda: identity.credentials
    )
    attester = attester or make_attester(common, config)
    starting.checkpoint("attester")
    store_id, broker_id = config.server_ids(identity.trust_domain)
    # The scope interceptor sits below the tracing: a traced download is a generator that only
    # the loading thread may close, and a cancelled LoadModel must end the real call beneath it.
    # Beneath both, its single-threaded downloads are taken in to their end by their own thread.
    store = traced_channel(
        scoped_channel(
            store_channel(
                identity,
                config.model_store,
                server_name=config.model_store_server_name,
                server_id=store_id,
            )
        ),
        provider,
    )
    # Each key release presents one certificate generation throughout (see PinnedChannels).
    broker_channels = PinnedChannels(
        identity,
        config.key_broker,
        server_name=config.key_broker_server_name,
        server_id=broker_id,
        wrap=lambda channel: traced_channel(channel, provider),
    )
    # Until the server is returned, whatever stops the build (its port taken, a SIGTERM at a
    # checkpoint) closes the channels and the host: they were left open.
    with contextlib.ExitStack() as undo:
        undo.callback(store.close)
        undo.callback(broker_channels.close)
        server = _build_on(
            common,
            config,
            identity,
            provider=provider,
            attester=attester,
            verifier=verifier,
            store_channel=store,
            broker_channels=broker_channels,
        )
        undo.callback(server.host.stop, 0)  # never started: its ports are released
        starting.checkpoint("host")  # its ports bound
        undo.pop_all()
        return server


def _build_on(
    common: CommonConfig,
    config: InferenceConfig,
    identity: WorkloadIdentity,
    *,
    provider: TracerProvider,
    attester: Attester,
    verifier: ReleaseVerifier,
    store_channel: grpc.Channel,
    broker_channels: PinnedChannels,
) -> InferenceServer:
    """The server on those channels: its loader and host built (ports bound), not started."""
    repository = ModelRepository(expected=[m.name for m in config.models], options=config.runtime)
    loader = ModelLoader(
        repository,
        store_channel=store_channel,
        key_release=KeyReleaseClient(broker_channels, attester, verifier=verifier),
        tracer_provider=provider,
        decrypt_threads=config.decrypt_threads,
        timeout=config.load_timeout_seconds,
        max_model_bytes=config.max_model_bytes,
        accept_unbound=config.accept_unbound_artifacts,
        key_pins=config.key_pins,
        # A configured version's pin holds for every load of it, a LoadModel naming none too.
        version_pins={(m.name, m.version): m.pin for m in config.models if m.pin is not None},
        signature=(
            SignaturePolicy.from_pem(
                config.model_signing_public_key.read_bytes(),
                required=config.require_model_signature,
            )
            if config.model_signing_public_key is not None
            else None
        ),
    )
    limits = config.limits
    oip = OipServicer(
        repository,
        limits=limits,
        clients=config.client_scopes,
        unscoped=common.authz.ids("admin"),
        response_budget=config.response_budget(),
        unsent=UnsentResponses.of(common.server),
    )
    evidence = InferenceAttestationServicer(attester, identity.public_key_der)
    control = ModelControlServicer(loader, repository, retry_seconds=config.load_retry_seconds)

    host = build_host(
        common,
        identity=identity,
        services=[
            oip_service(oip, repository),
            ServiceSpec(
                EVIDENCE_SERVICE,
                lambda s: attestation_pb2_grpc.add_InferenceAttestationServiceServicer_to_server(
                    evidence, s
                ),
            ),
            ServiceSpec(
                CONTROL_SERVICE,
                lambda s: model_control_pb2_grpc.add_ModelControlServiceServicer_to_server(
                    control, s
                ),
            ),
        ],
        roles=RoleTable(ROLE_RULES),
        tracer_provider=provider,
        message_limits=limits.message_limits,
        control_plane=CONTROL_PLANE,
    )
    return InferenceServer(
        host=host,
        repository=repository,
        loader=loader,
        config=config,
        slow_retry_initial=config.failed_load_retry_seconds,
        slow_retry_max=config.failed_load_retry_max_seconds,
        # The store's channel too: it was never closed (its connection and gRPC's polling of it
        # lasted until the process ended).
        _closers=[broker_channels.close, store_channel.close],
    )


def oip_service(oip: OipServicer, repository: ModelRepository) -> ServiceSpec:
    """The OIP service as the host serves it: ready once every configured model is, and for a
    tenant's caller of the health service on the service's port once its own are (as
    ``ServerReady`` answers it): the server's answer covers every tenant's models, and told any
    certificate whether (and, watching, when) another tenant's model had loaded."""

    def models_ready() -> str | None:
        return None if repository.server_ready() else "models not ready"

    def own_models_ready(context: grpc.ServicerContext) -> tuple[ReadinessCheck] | None:
        try:
            visible = oip.visible_to(context)
        except StrongroomError:  # no identity to scope: no tenant's models are its business
            visible = _none_visible
        if visible is None:
            return None
        scoped = visible
        return (lambda: None if repository.server_ready(scoped) else "models not ready",)

    return ServiceSpec(
        OIP_SERVICE,
        lambda s: add_oip_to_server(oip, s),
        (models_ready,),
        caller_checks=own_models_ready,
    )


def _none_visible(name: str) -> bool:
    """No model name (a caller without a usable identity)."""
    return False


def serve(config_path: Path | None) -> int:
    """``strongroom serve inference``: runs until SIGTERM, then drains and exits (core dumps are
    switched off by the command first: this process holds decrypted models in memory)."""
    return run_service(
        "inference",
        config_path,
        InferenceConfig,
        lambda common, config, identity, tracer: build(
            common, config, identity=identity, tracer_provider=tracer
        ),
        after_start=lambda server: server.load_configured_models(),
    )
