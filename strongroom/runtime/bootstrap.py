"""What every service does at start-up: logs, tracing, workload identity, authorised mTLS host."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
from cryptography import x509
from opentelemetry.sdk.trace import TracerProvider

from strongroom.errors import FailedPrecondition, StrongroomError
from strongroom.pki.authz import SpiffeAuthorizer
from strongroom.pki.client import CaClient
from strongroom.pki.errors import CertificateInvalid, IdentityMismatch, NoIdentity
from strongroom.pki.identity import RenewalPolicy, WorkloadIdentity
from strongroom.reasons import Reason
from strongroom.runtime import lifetime, logs, signals, starting, uncaught
from strongroom.runtime.config import (
    LOOPBACK_NAMES,
    CommonConfig,
    IdentityConfig,
    ServerConfig,
    load_service_config,
)
from strongroom.runtime.interceptors import RefusalObserver
from strongroom.runtime.log_writer import FLUSH_SECONDS
from strongroom.runtime.process import exit_abandoning
from strongroom.runtime.secrets import require_private
from strongroom.runtime.server import (
    HANDLER_DRAIN_SECONDS,
    HEALTH_SERVICE,
    CallerChecks,
    MessageLimits,
    ReadinessCheck,
    ServiceHost,
    ServiceSpec,
)
from strongroom.runtime.signals import SETTLE_SECONDS
from strongroom.runtime.telemetry import TELEMETRY_SECONDS, Telemetry
from strongroom.runtime.tracing import server_tracing_interceptor
from strongroom.spiffe import identity_dns_name

log = logging.getLogger(__name__)

REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
CLOSE_SECONDS = 3.0
"""How long a service's close may take once its host gave up on calls' handlers (a close that
waits behind one of them would wait for good); part of :func:`stop_seconds`."""
_CLOSE_POLL = 0.1
STOP_MARGIN_SECONDS = 4.0
"""What an orchestrator's grace (the chart's ``terminationGracePeriodSeconds``, compose's
``stop_grace_period``) leaves past :func:`stop_seconds`: the signal's way through the
container's init, the interpreter's start and end around the stop."""


def stop_seconds(server: ServerConfig) -> float:
    """The longest a service takes from SIGTERM to its exit, every budget spent: the calls'
    grace (``server.grace_seconds``), the handlers' drain, its close once calls were abandoned,
    the log's flush, the telemetry's last export, the exit's wait for the ``signals`` thread
    (:data:`~strongroom.runtime.signals.SETTLE_SECONDS`). Its orchestrator must wait that long
    and :data:`STOP_MARGIN_SECONDS` more before it kills the process, or the log's last lines
    (what the stop was waiting for) are lost: the chart's 30 s were less than 20 + 5 + 3 + 5 s.
    The wait for the ``signals`` thread was left out, said to come out of the margin: 2 s of the
    4, which an operator who sized the orchestrator's wait by this sum did not have."""
    return (
        server.grace_seconds
        + HANDLER_DRAIN_SECONDS
        + CLOSE_SECONDS
        + FLUSH_SECONDS
        + TELEMETRY_SECONDS
        + SETTLE_SECONDS
    )


def open_identity(config: IdentityConfig, *, serves: bool = True) -> WorkloadIdentity:
    """Resumes the persisted identity or enrols with the one-time token, then keeps it renewed.

    ``serves``: the identity is a server's, which clients check by the DNS name derived from its
    SPIFFE ID (a certificate without it is named in a warning); False for a client only (the
    CLI), whose name no one checks.
    """
    try:
        root_pem = config.ca_root_file.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"identity.ca_root_file {config.ca_root_file}: {exc.strerror}",
            reason=Reason.CA_ROOT_MISSING,
        ) from None
    token: str | None = None
    if config.token_file is not None and config.token_file.exists():
        # Until it is used the token is a bearer credential for this identity: whoever reads it
        # may enrol first and hold a certificate for our SPIFFE ID. Private, like every secret.
        require_private(config.token_file, "identity.token_file (the enrolment token)")
        token = config.token_file.read_text(encoding="utf-8").strip() or None
    try:
        ca = CaClient(config.ca_url, root_pem)
    except CertificateInvalid as exc:
        # The parse's words alone ("malformed PEM certificate: ... MalformedFraming") named
        # neither the setting nor the file: an empty file, a key, a truncated copy.
        raise FailedPrecondition(
            f"identity.ca_root_file {config.ca_root_file} is not the CA's root certificate "
            f"(PEM): {exc.message}",
            reason=exc.reason,
        ) from None
    try:
        identity = WorkloadIdentity.start(
            ca,
            token=token,
            state_dir=config.state_dir,
            policy=RenewalPolicy(fraction=config.renew_fraction),
            spiffe_id=config.spiffe_id,
        )
    except IdentityMismatch as exc:
        # Only a token can be for another identity: name the file it came from.
        raise IdentityMismatch(f"identity.token_file {config.token_file}: {exc.message}") from None
    except NoIdentity as exc:
        if token is not None or config.token_file is None:
            raise
        # "no identity persisted" alone hid that the token configured to enrol with is missing.
        missing = "does not exist" if not config.token_file.exists() else "is empty"
        raise NoIdentity(
            f"{exc.message}, and identity.token_file {config.token_file} {missing}"
        ) from None
    if str(identity.spiffe_id) != config.spiffe_id:
        identity.close()
        raise FailedPrecondition(
            f"enrolled as {identity.spiffe_id}, but the configuration says {config.spiffe_id}",
            reason=Reason.IDENTITY_MISMATCH,
        )
    derived = identity_dns_name(identity.spiffe_id)
    if serves and derived not in identity.credentials.sans:
        # A certificate issued before workload certificates carried the name (renewals copy
        # it): clients expecting this identity check the name and refuse this service until it
        # enrols again. Loud, not fatal: the fix is the operator's. A client's certificate (an
        # operator's tool) is never checked by name: telling it to enrol again is only noise.
        log.warning(
            "the certificate of %s lacks the DNS name %s derived from its SPIFFE ID, which "
            "clients expecting it check: they refuse this service until it enrols again with a "
            "fresh token (README, upgrade item 19)",
            identity.spiffe_id,
            derived,
        )
    return identity


def refuse_loopback_names(identity: WorkloadIdentity) -> None:
    """Refuses (FailedPrecondition) a production certificate that carries ``localhost`` or a
    loopback address: every service's certificate would, and a client that dials it and checks
    only the name would accept any of them."""
    try:
        san = identity.credentials.leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return
    names = {*san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    loopback = sorted(names & LOOPBACK_NAMES)
    if loopback:
        raise FailedPrecondition(
            f"the certificate of {identity.spiffe_id} carries {', '.join(loopback)}, which only "
            "development certificates may: enrol again with a token without it",
            reason=Reason.LOOPBACK_NAME_IN_PRODUCTION,
        )


@dataclass(frozen=True)
class RoleTable:
    """Which roles may call which RPC: ``{"/pkg.Service/Method" or "pkg.Service": roles}``."""

    rules: Mapping[str, Sequence[str]]

    def resolve(self, common: CommonConfig) -> dict[str, frozenset[str]]:
        """Maps each rule to SPIFFE IDs; a rule whose roles have no IDs is left out (denied)."""
        out: dict[str, frozenset[str]] = {}
        for pattern, roles in self.rules.items():
            ids = common.authz.ids(*roles)
            if ids:
                out[pattern] = ids
            else:
                log.warning("no SPIFFE ID holds roles %s: %s is denied to everyone", roles, pattern)
        return out


def build_host(
    common: CommonConfig,
    *,
    identity: WorkloadIdentity,
    services: Iterable[ServiceSpec],
    roles: RoleTable,
    tracer_provider: TracerProvider,
    message_limits: MessageLimits,
    refusal_observers: Mapping[str, RefusalObserver] | None = None,
    control_plane: Iterable[str] = (),
) -> ServiceHost:
    """The service's gRPC host: mTLS with hot-swapped certificates, tracing, SPIFFE authorisation.

    ``refusal_observers`` hear of the refusals of a method raised before its behaviour runs, and
    ``control_plane`` names the methods and services that may use the workers reserved from
    data-plane calls (see :class:`~strongroom.runtime.server.ServiceHost`)."""
    specs = list(services)
    # Reflection is a stream that holds a worker thread: public, two certificates of any role
    # (even none) filled every blocking-stream slot and refused the store's model transfers. The
    # operator (admin) is who lists a service's methods.
    rules = RoleTable({**roles.rules, REFLECTION_SERVICE: ("admin",)}).resolve(common)
    public = (HEALTH_SERVICE,)  # any certificate of the CA may call it
    authorizer = SpiffeAuthorizer(identity.trust_domain, rules, public=public)

    def identity_check() -> str | None:
        return None if identity.healthy() else "certificate renewal failing"

    for spec in specs:
        spec.checks = (*spec.checks, identity_check)
        if spec.caller_checks is not None:
            spec.caller_checks = _with_check(spec.caller_checks, identity_check)
    return ServiceHost(
        listen=common.listen,
        credentials=identity.server_credentials(),
        services=specs,
        tracing=server_tracing_interceptor(tracer_provider),
        interceptors=[authorizer],
        refusal_observers=refusal_observers,
        control_plane=control_plane,
        public=public,
        health_listen=common.health_listen,
        config=common.server,
        message_limits=message_limits,
    )


def _with_check(caller_checks: CallerChecks, check: ReadinessCheck) -> CallerChecks:
    """``caller_checks``, each caller's checks followed by ``check`` (the server's own)."""

    def checks(context: grpc.ServicerContext) -> Sequence[ReadinessCheck] | None:
        own = caller_checks(context)
        return None if own is None else (*own, check)

    return checks


class Service(Protocol):
    """What a service's ``build`` returns: its host, and how to release what it holds."""

    @property
    def host(self) -> ServiceHost: ...

    def close(self, grace: float | None = 0) -> None: ...


S = TypeVar("S", bound=Service)
C = TypeVar("C")


def run_service(
    service: str,
    config_path: Path | None,
    section_cls: type[C],
    build: Callable[[CommonConfig, C, WorkloadIdentity, TracerProvider], S],
    *,
    after_start: Callable[[S], None] | None = None,
    sighup: str | None = None,
) -> int:
    """``strongroom serve SERVICE``: configure, enrol, build (with the service's tracer
    provider), serve until SIGTERM, drain, close; then write the log and end the telemetry.

    SIGHUP is the run's from its start (:mod:`strongroom.runtime.hangup`): ``sighup`` says what
    the service does with it once serving, in the words of the line logged for one that comes
    before (its ``after_start`` takes it: :func:`~strongroom.runtime.hangup.take`); None, the
    default, has every SIGHUP logged and ignored.

    Once it returns or raises, its stop over, the process has back what the service changed in
    it (its signals' handlers, its exception hooks, its root logger), unless it ends with the
    service: run inside :func:`strongroom.runtime.lifetime.ends_with_the_process`."""
    keep = lifetime.kept_for_the_process()  # this run's choice, whatever a later one's is
    common, section = load_service_config(config_path, service, section_cls)
    # Given back in the reverse order of taking: the signals' handlers first (nothing more is
    # handed to the signals thread), then what was handed over settled, then the exception
    # hooks, then the log. The hooks went back before the settle: for up to its wait an error
    # that ended a service thread (one the settle waits behind) was a bare traceback of the
    # host's hooks, not a line of the service's log. What is left: while the log's close waits
    # (up to FLUSH_SECONDS for a slow destination) a thread's error is the host's hooks' again,
    # not a line of that log (its lines logged meanwhile are still the service's).
    # An exception that ends a thread, or that cannot be raised, is a line of that log from
    # here on, not a traceback on stderr (strongroom.runtime.uncaught).
    with logs.configured(common.logging, service, keep=keep), uncaught.installed(keep=keep):
        try:
            # A SIGTERM stops the start at its next checkpoint (strongroom.runtime.starting); a
            # SIGHUP is recorded or ignored (strongroom.runtime.hangup), never the process's end.
            with starting.installed(keep=keep, sighup=sighup):
                _run(service, common, section, build, after_start)
        finally:
            # What the signals thread was handed during the stop (a SIGTERM as the service
            # closed) logs its line through the service's log and hooks, not the host's.
            signals.settle()
    return 0


def _run(
    service: str,
    common: CommonConfig,
    section: C,
    build: Callable[[CommonConfig, C, WorkloadIdentity, TracerProvider], S],
    after_start: Callable[[S], None] | None,
) -> None:
    """What :func:`run_service` does once its log, hooks and signals are the service's."""
    abandoned = 0
    telemetry: Telemetry | None = None
    # From here on, why the service stops is in its log, enrolment's failures included (a CA
    # root missing, a token refused, the identity not the configured one): they were printed by
    # the command line only, and the log said nothing of why the process had ended.
    try:
        try:
            identity = starting.interruptible(
                "identity", lambda: open_identity(common.identity), WorkloadIdentity.close
            )
            try:
                starting.checkpoint("identity")
                telemetry = Telemetry.install(
                    service, common.tracing, identity=lambda: identity.credentials
                )
                if common.production:
                    refuse_loopback_names(identity)
                starting.checkpoint("telemetry")
                running = build(common, section, identity, telemetry.tracer_provider)
                try:
                    running.host.run_until_signal(
                        after_start=(lambda: after_start(running)) if after_start else None
                    )
                finally:
                    try:
                        _close(service, running)  # it stops its host too, when nothing did
                    finally:
                        abandoned = running.host.abandoned
            finally:
                identity.close()
        except StrongroomError as exc:
            log.error("%s cannot run: %s", service, exc)
            _exit_if_abandoned(abandoned)
            raise
        except OSError:
            # The command line prints it as one line; the service's log keeps where it happened.
            log.exception("%s stopped on an operating-system error", service)
            _exit_if_abandoned(abandoned)
            raise
        except grpc.RpcError as exc:
            # A call of another service's that refused or failed: the command line printed it
            # as one line, and the log said nothing of why the process had ended.
            log.error("%s cannot run: %s: %s", service, exc.code().name, exc.details())
            _exit_if_abandoned(abandoned)
            raise
        except BaseException:
            if abandoned:  # the interpreter would print it at exit, which never comes
                log.exception("%s stopped on an unexpected error", service)
            _exit_if_abandoned(abandoned)
            raise
        if abandoned:
            exit_abandoning(abandoned)  # the pool's threads would hold the exit for good
    finally:
        # Not reached once calls were abandoned (that exit exports nothing: it has no time).
        if telemetry is not None:
            _end_telemetry(telemetry)
        # A step the stop left running is not waited for at exit (a pool's workers would be).
        starting.exit_if_steps_left_running()


def _end_telemetry(telemetry: Telemetry) -> None:
    """Writes the service's log, then ends ``telemetry`` within its budget (TELEMETRY_SECONDS).

    OpenTelemetry's own exit handlers waited ~10 s per provider for a collector that does not
    answer, and ran before ``logging.shutdown``: a stop that had used its grace met the
    kubelet's SIGKILL there, the log's queued lines never written. The log comes first now (its
    flush has its own budget, FLUSH_SECONDS); the lines logged after it, ``logging.shutdown``
    writes at exit."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    telemetry.shutdown()


def _exit_if_abandoned(abandoned: int) -> None:
    """Ends the process now, status 1, when its host abandoned calls: an error raised past the
    exit that does not wait for them (a service's close that failed) left the process waiting
    for their threads at exit, until the kubelet killed it, its last log lines lost."""
    if abandoned:
        exit_abandoning(abandoned, status=1)


def _close(service: str, running: Service) -> None:
    """Runs ``running``'s close, which stops its host when nothing did; once the host has given
    up on handlers, for :data:`CLOSE_SECONDS` at most (then exits, status 1).

    A close that runs after handlers were abandoned may wait behind one of them (the key
    broker's refusal pass appends to the audit log, whose commit a handler stuck on storage that
    does not answer holds): it waited for good, and the process with it until the kubelet killed
    it, the log's last lines lost."""
    failed: list[BaseException] = []

    def close() -> None:
        try:
            running.close()
        except BaseException as exc:  # re-raised on the calling thread
            failed.append(exc)

    closer = threading.Thread(target=close, name="closing", daemon=True)
    closer.start()
    deadline: float | None = None
    while closer.is_alive():
        if deadline is None and running.host.abandoned:
            deadline = time.monotonic() + CLOSE_SECONDS
        if deadline is not None and time.monotonic() >= deadline:
            log.error(
                "%s's close did not finish within %.0f s of abandoning calls (what it closes is "
                "held by one of them); exiting without it",
                service,
                CLOSE_SECONDS,
            )
            exit_abandoning(running.host.abandoned, status=1)
        # Polled: the host's drain (inside the close) says only as it ends whether it gave up.
        closer.join(_CLOSE_POLL)
    if failed:
        raise failed[0]
