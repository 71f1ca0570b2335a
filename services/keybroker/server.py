"""Assembles and runs the key broker: HSM, audit log, policies, attestation trust, gRPC host."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.attestation import TrustStore
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import (
    CollateralService,
    FetchSettings,
    unreachable_sources,
)
from strongroom.attestation.release_signature import ReleaseSigner, signing_key_id
from strongroom.attestation.release_signature import load_signing_key as load_release_key
from strongroom.errors import FailedPrecondition, StrongroomError
from strongroom.keybroker.audit import AuditLog, load_signing_key
from strongroom.keybroker.challenge import ChallengeIssuer
from strongroom.keybroker.config import (
    AUDIT_KEY_ENV,
    NONCE_KEY_ENV,
    PIN_ENV,
    RELEASE_SIGNING_KEY_ENV,
    KeybrokerConfig,
)
from strongroom.keybroker.fetch_budget import VcekFetchBudget
from strongroom.keybroker.hsm import Hsm, HsmConfig
from strongroom.keybroker.keys import KeyManager
from strongroom.keybroker.lifecycle import KeyService
from strongroom.keybroker.policies import PolicyStore
from strongroom.keybroker.refusals import LIMITED_RECORD_SECONDS
from strongroom.keybroker.release import ReleaseEngine
from strongroom.keybroker.service import (
    CONTROL_PLANE,
    KEYADMIN_SERVICE,
    KEYBROKER_SERVICE,
    MESSAGE_LIMITS,
    RELEASE_KEY,
    ROLE_RULES,
    KeyAdminServicer,
    KeyBrokerServicer,
)
from strongroom.pki.identity import WorkloadIdentity
from strongroom.reasons import Reason
from strongroom.runtime import hangup, signals, starting
from strongroom.runtime.bootstrap import RoleTable, build_host, run_service
from strongroom.runtime.config import CommonConfig
from strongroom.runtime.secrets import Secret
from strongroom.runtime.server import ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider

log = logging.getLogger(__name__)

ROTATION_ONCE_SERVING = "the audit log will be rotated"
"""What a SIGHUP during start-up does, for its log line (:mod:`strongroom.runtime.hangup`)."""
ROTATION_CLOSED = "audit log rotation (SIGHUP): the audit log is closed, nothing rotated"
"""The line of a SIGHUP once the broker's close has closed its audit log (``strongroom serve``
keeps the rotation's handler until its exit): it failed, logged at ERROR, an alert for nothing."""


def trust_store(common: CommonConfig, config: KeybrokerConfig) -> TrustStore:
    """The pinned AMD/Intel roots, plus the simulated chain only where explicitly allowed."""
    trust = TrustStore.production()
    if not config.allow_simulated_tee:
        return trust
    if common.production:
        raise FailedPrecondition(
            "keybroker.allow_simulated_tee is set in production mode: refusing to trust the "
            "simulated TEE chain (set mode: development for local testing)",
            reason=Reason.SIMULATED_TEE_IN_PRODUCTION,
        )
    assert config.simulated_roots_dir is not None  # checked by the configuration
    directory = config.simulated_roots_dir
    log.warning("DEVELOPMENT MODE: trusting the simulated TEE chain in %s", directory)
    return trust.with_simulated_roots(
        amd=[(directory / "amd_trust.pem").read_bytes()],
        intel=[(directory / "intel_root.pem").read_bytes()],
    )


def collateral_service(
    config: KeybrokerConfig,
    trust: TrustStore,
    monotonic: Callable[[], float] = time.monotonic,
) -> CollateralService | None:
    """The broker's collateral: its cache directory, fetching from KDS/PCS when enabled, each
    caller's VCEK fetches budgeted (:mod:`strongroom.keybroker.fetch_budget`)."""
    if config.collateral_dir is None:
        log.error(
            "keybroker.collateral_dir is not set: every key release will be refused "
            "(COLLATERAL_MISSING)"
        )
        return None
    cache = CollateralCache(config.collateral_dir, trust, writable=not config.collateral_read_only)
    settings = (
        FetchSettings(
            pcs_url=config.pcs_url,
            kds_url=config.kds_url,
            root_ca_crl_url=config.pcs_root_ca_crl_url,
            timeout_seconds=config.collateral_timeout_seconds,
            retries=config.collateral_retries,
        )
        if config.collateral_fetch and not config.collateral_read_only
        else None
    )
    if settings is not None:
        # In the background: a source an egress policy drops costs a connect timeout, and the
        # broker serves what its cache holds meanwhile.
        threading.Thread(
            target=log_unreachable_collateral,
            args=(settings,),
            name="collateral-probe",
            daemon=True,
        ).start()
    return CollateralService(
        cache,
        settings,
        refresh_before=timedelta(seconds=config.collateral_refresh_before_seconds),
        vcek_fetch_gate=VcekFetchBudget(monotonic),
    )


def log_unreachable_collateral(settings: FetchSettings) -> None:
    """Logs a WARNING for each collateral source the broker cannot connect to (at start).

    The broker stays ready without them (what the cache holds still serves releases, and an outage
    upstream must not take every replica out of service), so without this line a broker whose
    egress blocks its sources showed nothing until a release was refused COLLATERAL_MISSING."""
    for url, error in unreachable_sources(settings):
        log.warning(
            "collateral source unreachable: %s (%s); a key release that needs a document the "
            "cache does not hold will be refused COLLATERAL_MISSING: check the broker's egress "
            "(Helm: keybroker.collateral.egress) and that the name resolves",
            url,
            error,
            extra={"url": url, "error": error, "reason": Reason.COLLATERAL_FETCH_FAILED},
        )


class _Periodic:
    """Runs ``work`` every ``interval`` seconds until stopped (a daemon thread named ``name``);
    a pass that raises is logged and the next one tries again."""

    def __init__(self, work: Callable[[], None], interval: float, name: str) -> None:
        self._work = work
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._work()
            except Exception:
                log.exception("%s pass failed", self._thread.name)

    def stop(self, *, wait: bool = False) -> None:
        """Ends the loop (a pass under way completes; ``wait``: waits for it)."""
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


@dataclass
class KeyBroker:
    """A running key broker and everything it owns; :meth:`close` releases it all."""

    host: ServiceHost
    hsm: Hsm
    audit: AuditLog
    keys: KeyManager
    engine: ReleaseEngine
    key_service: KeyService
    policies: PolicyStore | None = None
    identity: WorkloadIdentity | None = None
    refresher: _Periodic | None = None
    counter: _Periodic | None = None
    _closed: bool = field(default=False, repr=False)

    def record_counted_refusals(self, *, every: bool = False) -> None:
        """Records the counts of refusals past their callers' budgets that no refusal of theirs
        carried (callers that stopped while over): the due ones, or ``every`` one."""
        self.engine.record_counted_refusals(every=every)
        self.key_service.record_counted_refusals(every=every)

    def close(self, grace: float | None = 0) -> None:
        """Stops serving, records every refusal count still held, then closes the audit log and
        the HSM."""
        if self._closed:
            return
        self._closed = True
        if self.refresher is not None:
            self.refresher.stop()  # a fetch under way is not waited for
        if self.counter is not None:
            self.counter.stop(wait=True)  # its records go before the log closes
        self.host.stop(grace)
        self.record_counted_refusals(every=True)
        if self.policies is not None:
            self.policies.close()  # the failing policies' repeats not yet logged
        self.audit.close()
        self.hsm.close()


def build(
    common: CommonConfig,
    config: KeybrokerConfig,
    *,
    identity: WorkloadIdentity,
    tracer_provider: TracerProvider | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> KeyBroker:
    """Opens the HSM and audit log and builds the (not yet started) host. ``monotonic`` is the
    clock the callers' refusal record budgets refill by (a test's, to refill them without
    waiting)."""
    trust = trust_store(common, config)
    single = common.production  # one source per secret in production (Secret.load)
    nonce_key = Secret.load(
        file=config.nonce_key_file, env=NONCE_KEY_ENV, what="nonce key", single=single
    )
    audit_key = load_signing_key(
        Secret.load(
            file=config.audit_key_file, env=AUDIT_KEY_ENV, what="audit signing key", single=single
        )
    )
    # A file key, as the audit key, not an HSM object: it protects the binding of an answer to its
    # request, not the data key, and whoever can use the broker's HSM session (its PIN is a file
    # or variable beside this one) could have the HSM sign as well; one HSM call per release stays
    # one (the release runs on the HSM's single worker).
    release_key = load_release_key(
        Secret.load(
            file=config.release_signing_key_file,
            env=RELEASE_SIGNING_KEY_ENV,
            what="release-signing key",
            single=single,
        ).reveal()
    )
    # One key for both would make the audit key, whose public half auditors hold, also what
    # inference servers trust for a release answer: whoever obtained it for one could do both
    # (forge the log, have a data key of its choosing used), and neither could be rotated alone.
    if signing_key_id(release_key.public_key()) == signing_key_id(audit_key.public_key()):
        raise FailedPrecondition(
            "the release-signing key is the audit signing key: give keybroker."
            "release_signing_key_file (or $STRONGROOM_RELEASE_SIGNING_KEY) a key of its own",
            reason=Reason.RELEASE_SIGNING_KEY_REUSED,
        )
    release_signer = ReleaseSigner(release_key)
    pin = Secret.load(file=config.pin_file, env=PIN_ENV, what="HSM PIN", single=single)
    module_env = {"SOFTHSM2_CONF": str(config.softhsm2_conf)} if config.softhsm2_conf else {}
    hsm_config = HsmConfig(
        module_path=config.pkcs11_module,
        token_label=config.token_label,
        pin=pin,
        module_env=module_env,
        operation_timeout=config.hsm_operation_timeout_seconds,
        recycle_after_operations=config.hsm_recycle_after_operations,
    )
    # A slow HSM (its connection, the audit log's lock another process holds) is waited for
    # only until a SIGTERM asks the starting broker to stop (strongroom.runtime.starting).
    hsm = starting.interruptible("hsm", lambda: Hsm.open(hsm_config), Hsm.close)
    # Until the broker is returned, whatever stops the build (an error, a SIGTERM at one of its
    # checkpoints) closes what it opened: only AuditLog.open's failure closed the HSM, and
    # anything later left both open (the HSM's module loaded, its worker running; the audit
    # log's descriptor held).
    undo = contextlib.ExitStack()
    undo.callback(hsm.close)
    with undo:
        starting.checkpoint("hsm")
        audit = starting.interruptible(
            "audit log",
            lambda: AuditLog.open(
                config.audit_log,
                audit_key,
                max_bytes=config.audit_max_bytes,
                rotate_bytes=config.audit_rotate_bytes,
            ),
            AuditLog.close,
        )
        undo.callback(audit.close)
        starting.checkpoint("audit log")
        keys = KeyManager(hsm)
        starting.interruptible(
            "keys",
            lambda: keys.warn_modifiable_versions(timeout=config.hsm_operation_timeout_seconds),
            None,
        )
        starting.checkpoint("keys")
        policies = PolicyStore(
            config.policies_dir,
            trust_domain=identity.trust_domain,
            production=common.production,
            audit=audit,
        )
        collateral = collateral_service(config, trust, monotonic)
        engine = ReleaseEngine(
            keys=keys,
            challenges=ChallengeIssuer(nonce_key, lifetime=config.challenge_lifetime_seconds),
            policies=policies,
            trust=trust,
            audit=audit,
            collateral=collateral,
            signer=release_signer,
            collateral_grace=timedelta(seconds=config.collateral_grace_seconds),
            hsm_timeout=config.hsm_operation_timeout_seconds,
            monotonic=monotonic,
            grant_limits=config.grant_limits(),
        )
        key_service = KeyService(keys, policies, audit, clock=monotonic)
        broker_servicer = KeyBrokerServicer(engine, keys, key_service)
        admin_servicer = KeyAdminServicer(key_service)

        def hsm_ready() -> str | None:
            try:
                hsm.check_health(timeout=2.0)
            except StrongroomError as exc:
                return f"HSM unavailable: {exc.message}"
            return None

        def audit_ready() -> str | None:
            problem = audit.tamper_problem
            return None if problem is None else f"audit log tampered with: {problem}"

        def keys_ready() -> str | None:
            unusable = keys.recheck_unusable(timeout=2.0)
            if not unusable:
                return None
            return "keys the HSM cannot use: " + ", ".join(sorted(unusable))

        provider = tracer_provider or make_tracer_provider(
            "keybroker", common.tracing, identity=lambda: identity.credentials
        )
        host = build_host(
            common,
            identity=identity,
            services=[
                ServiceSpec(
                    KEYBROKER_SERVICE,
                    lambda s: pb_grpc.add_KeyBrokerServiceServicer_to_server(broker_servicer, s),
                    (hsm_ready, audit_ready, keys_ready),
                ),
                ServiceSpec(
                    KEYADMIN_SERVICE,
                    lambda s: pb_grpc.add_KeyAdminServiceServicer_to_server(admin_servicer, s),
                    (hsm_ready, audit_ready),
                ),
            ],
            roles=RoleTable(ROLE_RULES),
            tracer_provider=provider,
            message_limits=MESSAGE_LIMITS,
            # Refusals of a release the servicer never sees are audited too.
            refusal_observers={RELEASE_KEY: broker_servicer.release_refused_unread},
            control_plane=CONTROL_PLANE,
        )
        undo.callback(host.stop, 0)  # never started: its ports are released (ServiceHost.stop)
        refresher = (
            _Periodic(
                collateral.refresh_due,
                config.collateral_refresh_interval_seconds,
                "collateral-refresh",
            )
            if collateral is not None
            and config.collateral_fetch
            and not config.collateral_read_only
            else None
        )
        if refresher is not None:
            undo.callback(refresher.stop)
        starting.checkpoint("host")  # its ports bound
        broker = KeyBroker(
            host=host,
            hsm=hsm,
            audit=audit,
            keys=keys,
            engine=engine,
            key_service=key_service,
            policies=policies,
            identity=identity,
            refresher=refresher,
        )
        broker.counter = _Periodic(
            broker.record_counted_refusals, LIMITED_RECORD_SECONDS, "refusal-counts"
        )
        undo.pop_all()  # the broker closes them now
        return broker


def rotate_audit_on_sighup(audit: AuditLog) -> None:
    """Makes SIGHUP seal the audit log and continue its chain in a new one (an operator's
    rotation: before shipping the log, before draining a pod), with or without
    ``audit_rotate_bytes``. Only who may signal the broker's process can ask: no RPC to guard.

    The rotation runs in a thread of its own, started on the ``signals`` thread
    (:mod:`strongroom.runtime.signals`): a signal handler runs in the main thread between two
    bytecodes, where waiting for the audit's commit lock, or for what a thread's start takes,
    could deadlock with the code it interrupted. Signals that come while a rotation is still waiting to start are one request:
    every SIGHUP is followed by a rotation that starts after it, and a storm of them (while a
    commit or a rotation is stuck on a slow disk) makes at most two threads, not one each until
    the process can start no more. Call from the main thread (``signal.signal`` requires it),
    inside a service's run (``run_service``'s ``after_start``), which gives SIGHUP back when it
    ends: outside one it raises RuntimeError, SIGHUP's handler unchanged (installed, it stayed
    the process's for good, rotating a log long closed). SIGHUPs that came during start-up
    (recorded by the run's handler: :mod:`strongroom.runtime.hangup`) are one rotation, asked
    for here."""
    # Held from a request until its thread starts rotating: taken without blocking by the handler
    # (it must never wait), released by the thread once the rotation before it has ended.
    pending = threading.Lock()
    running = threading.Lock()

    def start_rotation() -> None:
        if audit.closed:  # the broker stopped: no thread for a rotation that cannot be
            pending.release()
            log.info(ROTATION_CLOSED)
            return
        try:
            threading.Thread(
                target=_rotate_audit,
                args=(audit, pending, running),
                name="audit-rotate",
                daemon=True,
            ).start()
        except RuntimeError as exc:  # no thread to be had: the next SIGHUP may try again
            pending.release()
            log.error("audit log rotation (SIGHUP) could not start: %s", exc)

    def on_hup(_signum: int, _frame: object) -> None:
        if not pending.acquire(blocking=False):
            return  # a rotation that has not started yet will seal what this signal asks for
        signals.later(start_rotation)

    # Start-up's handler recorded a SIGHUP that came before this one: one rotation for them all.
    hangup.take(on_hup)


def _rotate_audit(audit: AuditLog, pending: threading.Lock, running: threading.Lock) -> None:
    with running:
        pending.release()  # a signal from now on needs another rotation after this one
        _rotate_audit_now(audit)


def _rotate_audit_now(audit: AuditLog) -> None:
    try:
        sealed = audit.rotate()
    except StrongroomError as exc:
        if audit.closed:  # closed by the broker's stop after this rotation was asked for
            log.info(ROTATION_CLOSED)
            return
        log.error("audit log rotation (SIGHUP) failed (%s): %s", exc.reason, exc.message)
        return
    if sealed is None:
        log.info("audit log rotation (SIGHUP): no record since the last one, nothing sealed")
    else:
        log.info("audit log rotation (SIGHUP): sealed as %s", sealed.name)


def serve(config_path: Path | None) -> int:
    """``strongroom serve keybroker``: runs until SIGTERM, then drains and exits; SIGHUP rotates
    the audit log."""
    return run_service(
        "keybroker",
        config_path,
        KeybrokerConfig,
        lambda common, config, identity, tracer: build(
            common, config, identity=identity, tracer_provider=tracer
        ),
        after_start=lambda broker: rotate_audit_on_sighup(broker.audit),
        sighup=ROTATION_ONCE_SERVING,
    )
