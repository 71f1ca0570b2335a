"""Service configuration: a YAML file, then ``STRONGROOM__SECTION__KEY`` environment overrides.

Configuration is parsed into frozen dataclasses and validated when loaded; unknown keys are errors so
that a typo never silently falls back to a default. In production mode the environment cannot set
the keys that decide whom a service trusts (:data:`ENV_LOCKED_IN_PRODUCTION` and each section's
own ``ENV_LOCKED_IN_PRODUCTION``): those come from the file. Secrets are not part of the configuration: it
names the file or environment variable that holds them (see :mod:`strongroom.runtime.secrets`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from strongroom.errors import InvalidArgument
from strongroom.identifiers import name_rule_problem
from strongroom.reasons import Reason
from strongroom.spiffe import is_workload_id

ENV_PREFIX = "STRONGROOM__"
T = TypeVar("T")

EnvLocks = Mapping[str, tuple[object, ...]]
"""Dotted keys that an environment override may not set in production mode, each with the values
it may still set there (the safe setting, such as ``allow_simulated_tee: false``; ``()``: none).
A service's section declares its own as ``ENV_LOCKED_IN_PRODUCTION`` (keys relative to it)."""

ENV_LOCKED_IN_PRODUCTION: EnvLocks = {
    # Whom the service trusts: who holds which role, its trust domain and name, and the CA that
    # issues (and whose root authenticates) every peer's certificate. A container's environment is
    # easier to extend than its configuration, so in production these come from the file only.
    "authz": (),
    "identity.trust_domain": (),
    "identity.spiffe_id": (),
    "identity.ca_url": (),
    "identity.ca_root_file": (),
    # Where telemetry goes and whom the exporter trusts to receive it.
    "tracing.otlp_insecure": (False,),
    "tracing.otlp_ca_file": (),
}


class ConfigError(InvalidArgument):
    """The configuration is invalid; the message names the offending key."""

    default_reason = Reason.CONFIG_INVALID


@dataclasses.dataclass(frozen=True)
class ModelNameRules:
    """An identity and the model names it may use: each a model name, or a name followed by
    ``/`` (every model under it). A subclass names the configuration key it is read from
    (``where``), which every error names."""

    where: ClassVar[str] = "model name rules"
    spiffe_id: str
    model_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not is_workload_id(self.spiffe_id):
            raise ConfigError(f"{self.where}: {self.spiffe_id!r} is not a SPIFFE ID")
        if not self.model_names:
            # An identity that may use nothing is one left out of the list; an empty list here
            # is more likely a mistake.
            raise ConfigError(f"{self.where}: {self.spiffe_id!r} lists no model_names")
        problem = name_rule_problem(self.model_names)
        if problem:
            raise ConfigError(f"{self.where}: {problem}")


@dataclasses.dataclass(frozen=True)
class IdentityConfig:
    """Where the service gets its workload certificate."""

    trust_domain: str
    spiffe_id: str
    ca_url: str
    ca_root_file: Path
    dns_names: tuple[str, ...] = ()
    token_file: Path | None = None
    state_dir: Path | None = None
    # Fraction of the certificate lifetime after which it is renewed.
    renew_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        if not is_workload_id(self.spiffe_id):
            raise ConfigError(f"identity.spiffe_id: not a SPIFFE ID: {self.spiffe_id!r}")
        if not self.spiffe_id.startswith(f"spiffe://{self.trust_domain}/"):
            raise ConfigError(
                f"identity.spiffe_id {self.spiffe_id!r} is outside trust domain {self.trust_domain!r}"
            )
        if not self.ca_url.startswith("https://"):
            raise ConfigError("identity.ca_url must be an https:// URL")
        if not 0.1 <= self.renew_fraction <= 0.95:
            raise ConfigError("identity.renew_fraction must be between 0.1 and 0.95")


def expected_server_id(
    trust_domain: str, service: str, configured: str | None, *, where: str
) -> str:
    """The SPIFFE ID a client expects ``service`` to present: ``configured`` (checked to be a
    SPIFFE ID in ``trust_domain``) or ``spiffe://<trust_domain>/<service>``."""
    if configured is None:
        return f"spiffe://{trust_domain}/{service}"
    if not is_workload_id(configured):
        raise ConfigError(f"{where}.{service}_spiffe_id: not a SPIFFE ID: {configured!r}")
    if not configured.startswith(f"spiffe://{trust_domain}/"):
        raise ConfigError(
            f"{where}.{service}_spiffe_id {configured!r} is outside trust domain {trust_domain!r}"
        )
    return configured


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Log level and format (``json`` for machines, ``text`` for people)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing and metrics, exported over OTLP/gRPC when an endpoint is set.

    The export is TLS unless ``otlp_insecure`` says otherwise: spans and metrics carry key ids,
    model names, SPIFFE IDs and refusal reasons, which an on-path observer must not read and a
    spoofed collector must not collect. The collector's certificate is checked against
    ``otlp_ca_file`` (default: the deployment's own root, ``identity.ca_root_file``, filled in by
    :class:`CommonConfig`); a collector that asks for client certificates gets
    ``otlp_client_cert_file`` and ``otlp_client_key_file`` (both or neither). ``otlp_insecure:
    true`` (plaintext) is for development, and for a collector on the loopback interface in
    production (:func:`check_tracing_for_production`).
    """

    otlp_endpoint: str | None = None
    otlp_insecure: bool = False
    otlp_ca_file: Path | None = None
    otlp_client_cert_file: Path | None = None
    otlp_client_key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.otlp_client_cert_file is None) != (self.otlp_client_key_file is None):
            raise ConfigError(
                "tracing.otlp_client_cert_file and tracing.otlp_client_key_file go together: "
                "set both (mutual TLS to the collector) or neither"
            )
        endpoint = self.otlp_endpoint
        if endpoint is None:
            return
        if not endpoint or any(c.isspace() for c in endpoint):
            raise ConfigError(f"tracing.otlp_endpoint: not an endpoint: {endpoint!r}")
        scheme, sep, rest = endpoint.partition("://")
        if sep and scheme not in ("http", "https"):
            raise ConfigError(
                f"tracing.otlp_endpoint: scheme {scheme!r} is not OTLP/gRPC's (use host:port, "
                "https://host:port, or http://host:port with tracing.otlp_insecure: true)"
            )
        if not (rest if sep else endpoint):
            raise ConfigError(f"tracing.otlp_endpoint: no host in {endpoint!r}")
        if scheme == "http" and sep and not self.otlp_insecure:
            raise ConfigError(
                "tracing.otlp_endpoint: http:// is plaintext; use https:// (or host:port) for "
                "TLS, or set tracing.otlp_insecure: true to export in plaintext"
            )
        if scheme == "https" and sep and self.otlp_insecure:
            raise ConfigError(
                "tracing.otlp_insecure: true contradicts the https:// endpoint; drop one"
            )
        if self.otlp_insecure and (
            self.otlp_ca_file is not None or self.otlp_client_cert_file is not None
        ):
            raise ConfigError(
                "tracing.otlp_insecure: true exports in plaintext, so tracing.otlp_ca_file and "
                "the client certificate would be ignored: drop them, or drop otlp_insecure"
            )

    @property
    def otlp_host(self) -> str | None:
        """The endpoint's host (no scheme, port or brackets); None without an endpoint."""
        if self.otlp_endpoint is None:
            return None
        authority = self.otlp_endpoint.partition("://")[2] or self.otlp_endpoint
        authority = authority.split("/", 1)[0]
        if authority.startswith("["):
            return authority[1:].split("]", 1)[0]
        return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def check_tracing_for_production(tracing: TracingConfig) -> None:
    """Refuses plaintext export in production, except to a collector on the loopback interface.

    Refused rather than warned about: a warning is one log line among many, and a production
    deployment exporting its telemetry in plaintext across the network is a configuration error
    (the spans name keys, models and callers). A sidecar collector on 127.0.0.1 is allowed: that
    traffic never leaves the pod's (or host's) network namespace.
    """
    if (
        tracing.otlp_endpoint is not None
        and tracing.otlp_insecure
        and tracing.otlp_host not in LOOPBACK_NAMES
    ):
        raise ConfigError(
            "tracing.otlp_insecure: plaintext export is refused in production mode (spans and "
            f"metrics name keys, models and callers), except to a loopback collector; "
            f"{tracing.otlp_endpoint!r} is not loopback: export over TLS (drop otlp_insecure; "
            "tracing.otlp_ca_file names the collector's CA)"
        )


@dataclasses.dataclass(frozen=True)
class AuthzConfig:
    """SPIFFE IDs granted each role. Services map their RPCs to these roles."""

    publisher: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    inference: tuple[str, ...] = ()
    client: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for role in ("publisher", "admin", "inference", "client"):
            for sid in getattr(self, role):
                if not is_workload_id(sid):
                    raise ConfigError(f"authz.{role}: not a SPIFFE ID: {sid!r}")

    def ids(self, *roles: str) -> frozenset[str]:
        """Every SPIFFE ID holding any of ``roles``."""
        return frozenset(sid for role in roles for sid in getattr(self, role))


MIN_STREAM_RATE = 1024
"""The lowest non-zero ``server.stream_min_bytes_per_second``: below it the floor protects nothing."""
MAX_STREAM_RATE = 1 << 30
"""The highest: above it, legitimate transfers would be cut on any link."""

MAX_GRACE_SECONDS = 3600.0
"""The longest ``server.grace_seconds``: a stop lets calls in flight finish for that long, and its
orchestrator must wait longer still before it kills the process."""

MIN_REQUEST_WAIT_SECONDS = 10.0
"""The least default wait for a data-plane call's request message: a client sends it with the
call's headers, and the broker's largest (256 KiB) takes 4 s at the stream floor."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """gRPC server limits.

    Message sizes are not set here: each service derives them from its API (see
    :class:`~strongroom.runtime.server.MessageLimits`), so that one place owns each limit.
    """

    max_workers: int = 32
    grace_seconds: float = 20.0
    # Streams (uploads, downloads, health Watch) one caller may hold open at once.
    max_streams_per_identity: int = 8
    # Of those, how many one certificate of an identity may hold open: a fleet's replicas share
    # one SPIFFE ID, and one replica's stalled downloads (each cut only after
    # stream_idle_timeout_seconds, then reopened) held the fleet's every stream, refusing every
    # other replica's model loads. None (the default) or a value at or above
    # max_streams_per_identity: no share (a client of one certificate keeps them all); for a
    # fleet, half of them (strongroom.runtime.callers.certificate_share). The excess is refused at
    # once (RESOURCE_EXHAUSTED TOO_MANY_STREAMS_PER_CERTIFICATE); the identity's cap still counts
    # its certificates together.
    max_streams_per_certificate: int | None = None
    # Worker threads only the service's control-plane methods may use (model control on
    # inference, key administration on the broker, deletes and key-slot replacement on the store,
    # health and reflection everywhere; a health call waits for its request message within the
    # data plane, since any certificate may call it): data-plane calls (unary calls
    # and blocking streams of every other method, all callers together) hold at most the other
    # max_workers - control_plane_workers, and the excess is refused at once (RESOURCE_EXHAUSTED
    # DATA_PLANE_WORKERS_BUSY), so that a flood of data-plane calls never queues an operator's
    # call. None is an eighth of max_workers (at least 1, at most 16; none with a single worker);
    # 0 reserves nothing.
    control_plane_workers: int | None = None
    # Unary calls one caller may have running at once (each holds a worker thread while its
    # handler runs: a key release waiting on collateral or the HSM, a store call against a slow
    # backend); None is just under half the data-plane workers, so that two callers at their cap
    # still leave a worker for a third, and nobody is queued behind them. The excess is refused at
    # once (RESOURCE_EXHAUSTED TOO_MANY_UNARY_CALLS_PER_IDENTITY).
    max_unary_calls_per_identity: int | None = None
    # Data-plane workers one caller may hold at once across every kind: unary calls, blocking
    # streams and waits for a request message that hold one (health Watch and Check): the caps
    # above bound each kind alone, so one caller held 13 unary calls + 8 streams (+ health
    # waits) of the 28. None is just under half the data-plane workers (the unary cap when that
    # is set higher), so that two callers at their bound leave a worker for a third. The excess
    # is refused at once (RESOURCE_EXHAUSTED TOO_MANY_WORKERS_PER_IDENTITY).
    max_data_plane_workers_per_identity: int | None = None
    # Of the bound above, how many data-plane workers one certificate of an identity may hold (its
    # unary calls, blocking streams and waits for a request message together): a fleet's
    # replicas share one SPIFFE ID, and one replica opening releases that never sent their
    # message held the fleet's whole cap, refusing every other replica's. None (the default)
    # or a value at or above the bound: no share beneath it (a client of one certificate, a
    # single-replica backend, keeps its whole bound); for a fleet, half the bound, at least 2
    # (strongroom.runtime.callers.certificate_share: 6 of 13). The excess is refused at once (RESOURCE_EXHAUSTED
    # TOO_MANY_CALLS_PER_CERTIFICATE); the bound still counts the identity's certificates together.
    max_calls_per_certificate: int | None = None
    # Waits for a request message that callers without a role (certificates the authoriser grants
    # only public methods, health: any SPIFFE ID the CA signs for, all such callers together, which
    # also share one per-identity bucket) may have at once; each holds a data-plane worker while
    # it lasts. None is an eighth of the data-plane workers (at least 1): 3 of 28. The excess is
    # refused at once (RESOURCE_EXHAUSTED ROLELESS_CALLERS_BUSY).
    max_roleless_request_waits: int | None = None
    # Blocking streams (each holds a worker thread) open at once, all callers together; None is
    # half of max_workers, so that the other half always remains for unary RPCs.
    max_blocking_streams: int | None = None
    # A health call whose request message has not arrived this long after its headers is ended:
    # on the plaintext port (no certificate needed; such a wait holds no thread there) with
    # RESOURCE_EXHAUSTED REQUEST_MESSAGE_TIMEOUT, on the mTLS port (any certificate of the CA;
    # the wait holds a data-plane worker) cancelled, since gRPC cannot set a status from
    # another thread. A probe sends its message with the call, at once.
    health_request_wait_seconds: float = 5.0
    # A data-plane call (a key release, a store or inference call, a download's request) whose
    # request message has not arrived this long after its headers is cancelled: it holds a
    # data-plane worker meanwhile, and one that never sent it held it until its deadline or its
    # connection's age (1800 s +- 10 % + 600 s grace). A client sends its message with the
    # headers; only the message's own transfer takes time. None is, for each method, the time the
    # stream floor allows that method's largest request (request_wait_for; MessageLimits.request),
    # at least 10 s: 10 s on the broker and the store, 16 s on inference but ModelInfer (a 64 MiB
    # tensor, 1040 s); none (the deadline alone) when the floor is off. Set, it is every
    # method's bound, ModelInfer's too.
    request_wait_seconds: float | None = None
    # A request stream that sends nothing for this long is ended (RESOURCE_EXHAUSTED).
    stream_idle_timeout_seconds: float = 30.0
    # A blocking stream (an upload, a download) that moves fewer bytes than this per second, over
    # any window of stream_idle_timeout_seconds spent waiting on its client, is ended
    # (RESOURCE_EXHAUSTED): a client trickling a byte, or reading a message, just inside the idle
    # timeout would otherwise hold a worker thread for ever. 64 KiB/s is above one 1 MiB download
    # message per idle timeout and far below any real link; 0 turns the floor off.
    stream_min_bytes_per_second: int = 64 * 1024
    # A connection older than this is asked to go away (HTTP/2 GOAWAY; gRPC adds +-10 % jitter) and
    # the client reconnects: some of what gRPC core keeps per connection grows with its calls and is
    # freed only when it closes, and long-lived callers get spread over replicas again. 0 keeps
    # connections for as long as they are used.
    max_connection_age_seconds: float = 1800.0
    # How long calls in flight on a connection asked to go away may still run before it is closed.
    max_connection_age_grace_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_workers <= 1024:
            raise ConfigError("server.max_workers must be between 1 and 1024")
        # Unchecked, a negative or NaN grace reached gRPC's stop at SIGTERM, and a huge one
        # outlived any orchestrator's wait (bootstrap.stop_seconds), the log's last lines lost.
        if not 0 <= self.grace_seconds <= MAX_GRACE_SECONDS:
            raise ConfigError(
                f"server.grace_seconds must be between 0 and {MAX_GRACE_SECONDS:g}, "
                f"got {self.grace_seconds}"
            )
        if self.max_streams_per_identity < 1:
            raise ConfigError("server.max_streams_per_identity must be at least 1")
        if self.max_streams_per_certificate is not None and self.max_streams_per_certificate < 1:
            raise ConfigError("server.max_streams_per_certificate must be at least 1")
        if self.max_blocking_streams is not None and not (
            1 <= self.max_blocking_streams < self.max_workers
        ):
            raise ConfigError(
                "server.max_blocking_streams must be at least 1 and below server.max_workers "
                "(streams must never hold every worker thread)"
            )
        if self.control_plane_workers is not None and not (
            0 <= self.control_plane_workers < self.max_workers
        ):
            raise ConfigError(
                f"server.control_plane_workers must be between 0 (no reserve) and "
                f"server.max_workers - 1 ({self.max_workers - 1}): data-plane calls need a worker "
                f"too, got {self.control_plane_workers}"
            )
        data_plane = self.data_plane_workers
        if self.max_unary_calls_per_identity is not None and not (
            self.max_unary_calls_per_identity == 1
            or 1 < self.max_unary_calls_per_identity < data_plane
        ):
            raise ConfigError(
                "server.max_unary_calls_per_identity must be at least 1 and below the data-plane "
                f"workers (server.max_workers {self.max_workers} - server.control_plane_workers "
                f"{self.control_plane_reserve} = {data_plane}): one caller must never hold every "
                f"data-plane worker, got {self.max_unary_calls_per_identity}"
            )
        bound = self.max_data_plane_workers_per_identity
        if bound is not None and not (bound == 1 or 1 < bound < data_plane):
            raise ConfigError(
                "server.max_data_plane_workers_per_identity must be at least 1 and below the "
                f"data-plane workers ({data_plane}): one caller must never hold every data-plane "
                f"worker, got {bound}"
            )
        if self.max_calls_per_certificate is not None and self.max_calls_per_certificate < 1:
            raise ConfigError("server.max_calls_per_certificate must be at least 1")
        if self.max_roleless_request_waits is not None and not (
            self.max_roleless_request_waits == 1 or 1 < self.max_roleless_request_waits < data_plane
        ):
            raise ConfigError(
                "server.max_roleless_request_waits must be at least 1 and below the data-plane "
                f"workers ({data_plane}): callers without a role must never hold every data-plane "
                f"worker, got {self.max_roleless_request_waits}"
            )
        if not 0.1 <= self.health_request_wait_seconds <= 60:
            raise ConfigError("server.health_request_wait_seconds must be between 0.1 and 60")
        if self.request_wait_seconds is not None and not 0.1 <= self.request_wait_seconds <= 3600:
            raise ConfigError("server.request_wait_seconds must be between 0.1 and 3600")
        if not 0.1 <= self.stream_idle_timeout_seconds <= 3600:
            raise ConfigError("server.stream_idle_timeout_seconds must be between 0.1 and 3600")
        if not (
            self.stream_min_bytes_per_second == 0
            or MIN_STREAM_RATE <= self.stream_min_bytes_per_second <= MAX_STREAM_RATE
        ):
            raise ConfigError(
                "server.stream_min_bytes_per_second must be 0 (off) or between "
                f"{MIN_STREAM_RATE} and {MAX_STREAM_RATE}"
            )
        if not (
            self.max_connection_age_seconds == 0 or 1 <= self.max_connection_age_seconds <= 604_800
        ):
            raise ConfigError(
                "server.max_connection_age_seconds must be 0 (never) or between 1 and 604800"
            )
        if not 1 <= self.max_connection_age_grace_seconds <= 86_400:
            raise ConfigError("server.max_connection_age_grace_seconds must be between 1 and 86400")

    @property
    def connection_age_options(self) -> tuple[tuple[str, int], ...]:
        """gRPC channel arguments for :attr:`max_connection_age_seconds` (none when 0)."""
        if not self.max_connection_age_seconds:
            return ()
        return (
            ("grpc.max_connection_age_ms", round(self.max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                round(self.max_connection_age_grace_seconds * 1000),
            ),
        )

    def request_wait_for(self, largest_request: int) -> float | None:
        """The effective ``request_wait_seconds`` of a method whose largest request message is
        ``largest_request`` bytes (:meth:`~strongroom.runtime.server.MessageLimits.request`):
        the time the stream floor allows it, at least :data:`MIN_REQUEST_WAIT_SECONDS`, unless
        set (then the setting, whatever the method); None (no bound) with the floor off."""
        if self.request_wait_seconds is not None:
            return self.request_wait_seconds
        if not self.stream_min_bytes_per_second:
            return None
        return max(MIN_REQUEST_WAIT_SECONDS, largest_request / self.stream_min_bytes_per_second)

    @property
    def blocking_streams(self) -> int:
        """The effective ``max_blocking_streams``."""
        if self.max_blocking_streams is not None:
            return self.max_blocking_streams
        return max(1, self.max_workers // 2)

    @property
    def control_plane_reserve(self) -> int:
        """The effective ``control_plane_workers``: an eighth of the workers by default (at
        least 1, at most 16: control-plane calls are an operator's, few at a time; none with a
        single worker, which data-plane calls need)."""
        if self.control_plane_workers is not None:
            return self.control_plane_workers
        return min(max(1, min(16, self.max_workers // 8)), self.max_workers - 1)

    @property
    def data_plane_workers(self) -> int:
        """The workers data-plane calls (unary and blocking streams) may hold, all callers
        together: ``max_workers`` less the control-plane reserve."""
        return self.max_workers - self.control_plane_reserve

    @property
    def unary_calls_per_identity(self) -> int:
        """The effective ``max_unary_calls_per_identity``: by default just under half the
        data-plane workers, so that two callers at their cap leave at least one for a third."""
        if self.max_unary_calls_per_identity is not None:
            return self.max_unary_calls_per_identity
        return max(1, (self.data_plane_workers - 1) // 2)

    @property
    def data_plane_workers_per_identity(self) -> int:
        """The effective ``max_data_plane_workers_per_identity``: by default just under half the
        data-plane workers, so that two callers at their bound leave at least one for a third; an
        explicit ``max_unary_calls_per_identity`` above that is the default instead (a unary cap
        raised for a fleet that shares one identity is not lowered by this bound)."""
        if self.max_data_plane_workers_per_identity is not None:
            return self.max_data_plane_workers_per_identity
        return max(self.unary_calls_per_identity, (self.data_plane_workers - 1) // 2, 1)

    @property
    def roleless_request_waits(self) -> int:
        """The effective ``max_roleless_request_waits``: an eighth of the data-plane workers (at
        least 1), so that role-less callers, however many certificates they hold, leave the data
        plane to the callers the services give a role."""
        if self.max_roleless_request_waits is not None:
            return self.max_roleless_request_waits
        return max(1, self.data_plane_workers // 8)

    @property
    def max_concurrent_rpcs(self) -> int:
        """gRPC's ``maximum_concurrent_rpcs``: RPCs beyond it fail at once (non-blocking streams,
        which hold no thread, count too)."""
        return self.max_workers * 8


class _NoDuplicatesLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping key given twice (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # A key written twice is a mistake the file's reader cannot see: the second one silently won
    # (a `mode: development` appended to a production file, two `admin:` lists).
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable):  # anything else: construct_mapping's own error
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (line {key_node.start_mark.line + 1}): keep one"
                )
            seen.add(key)
    return loader.construct_mapping(node)


_NoDuplicatesLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_mapping(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    locked: EnvLocks = ENV_LOCKED_IN_PRODUCTION,
) -> dict[str, Any]:
    """Reads the YAML file (if any) and applies ``STRONGROOM__A__B=value`` overrides.

    Override values are parsed as YAML scalars or flow collections, so ``true``, ``42`` and
    ``[a, b]`` have their natural types. In production mode (after the overrides) an override of a
    ``locked`` key, or of a section holding one, is refused unless its value is one the lock allows.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            loaded = yaml.load(text, Loader=_NoDuplicatesLoader)  # noqa: S506 - a SafeLoader subclass
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
        except ConfigError as exc:
            raise ConfigError(f"configuration {path}: {exc.message}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration {path} must be a mapping at the top level")
        data = loaded
    env = os.environ if environ is None else environ
    # What the file says (production when it says nothing) is the floor: an environment variable
    # may raise a deployment to production, never lower it. A container's environment is easier to
    # extend than its configuration (a Helm value passed through to it, an orchestrator's
    # defaults), and development mode trusts the simulated TEE.
    # Only an explicit `mode: development` is a development file: an empty or misspelt mode (which
    # fails on its own) must not become development because the environment supplies it.
    production = data.get("mode", "production") != "development"
    overrides: list[tuple[str, tuple[str, ...], Any]] = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = tuple(k.lower() for k in name[len(ENV_PREFIX) :].split("__"))
        if not all(keys):
            raise ConfigError(f"environment override {name}: empty key segment")
        for other, other_keys, _ in overrides:
            # Names differ in case (keys are lowercased) or one names a section holding the
            # other's key: which one wins would be decided by sort order, silently. A variable
            # added beside the operator's (STRONGROOM__mode next to STRONGROOM__MODE) won.
            shorter = min(len(keys), len(other_keys))
            if keys[:shorter] == other_keys[:shorter]:
                raise ConfigError(
                    f"environment overrides {other} and {name} both set "
                    f"{'.'.join(keys[:shorter])}: keep one"
                )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment override {name}: {key} is not a section")
            node = child
        node[keys[-1]] = value
        overrides.append((name, keys, value))
    if production and data.get("mode") == "development":
        where = f"configuration {path}" if path is not None else "no configuration file"
        raise ConfigError(
            f"environment override {ENV_PREFIX}MODE: {where} runs in production mode, which the "
            "environment cannot lower (set mode: development in the file for a development "
            "deployment)"
        )
    if data.get("mode", "production") != "development":  # anything else is, or fails, production
        for name, path_keys, value in overrides:
            _check_locked(name, path_keys, value, locked)
    return data


def _check_locked(name: str, keys: tuple[str, ...], value: Any, locked: EnvLocks) -> None:
    """Refuses a production override of a locked key, or of a section that holds one (a whole
    ``STRONGROOM__AUTHZ`` mapping replaces every role at once)."""
    for dotted, allowed in locked.items():
        lock = tuple(dotted.split("."))
        if keys[: len(lock)] != lock and lock[: len(keys)] != keys:
            continue
        # ``type(...) is`` as well: 0 == False, and a lock allowing false must not let 0 through.
        if keys == lock and any(type(value) is type(v) and value == v for v in allowed):
            continue
        only = f" (only {', '.join(map(str, allowed))} there)" if allowed and keys == lock else ""
        raise ConfigError(
            f"environment override {name}: {'.'.join(keys)} cannot be set by the environment in "
            f"production mode{only}: it decides what the service trusts, and a container's "
            "environment is easier to extend than its configuration; set it in the configuration "
            "file"
        )


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Builds dataclass ``cls`` from a mapping, checking every type and rejecting unknown keys."""
    return typing.cast(T, _convert(cls, data, where or cls.__name__))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
        kwargs = {}
        for name, fld in fields.items():
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}")
            elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name}: required")
        try:
            return tp(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string")
        return str(value)
    raise ConfigError(f"{where}: unsupported configuration type {tp!r}")


SERVICES = ("keybroker", "modelstore", "inference")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "127.0.0.1", "::1"})
"""Names a service certificate may carry only in development mode."""


@dataclasses.dataclass(frozen=True)
class CommonConfig:
    """Settings every service shares; the service's own section is loaded beside it."""

    service: Literal["keybroker", "modelstore", "inference"]
    listen: str
    identity: IdentityConfig
    mode: Literal["production", "development"] = "production"
    health_listen: str | None = None
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    authz: AuthzConfig = AuthzConfig()
    server: ServerConfig = ServerConfig()

    @property
    def production(self) -> bool:
        """True unless the operator explicitly chose development mode."""
        return self.mode == "production"

    def __post_init__(self) -> None:
        tracing = self.tracing
        if tracing.otlp_endpoint and not tracing.otlp_insecure and tracing.otlp_ca_file is None:
            # The deployment's own root: a collector inside the trust domain gets its
            # certificate from the same CA as the services.
            tracing = dataclasses.replace(tracing, otlp_ca_file=self.identity.ca_root_file)
            object.__setattr__(self, "tracing", tracing)
        if self.production:
            check_tracing_for_production(self.tracing)
            loopback = sorted(set(self.identity.dns_names) & LOOPBACK_NAMES)
            if loopback:
                raise ConfigError(
                    f"identity.dns_names: {', '.join(loopback)} only in development mode (every "
                    "service would answer to it, so a client dialling it could reach any of them)"
                )


def load_service_config(
    path: Path | None,
    service: str,
    section_cls: type[T],
    *,
    environ: Mapping[str, str] | None = None,
) -> tuple[CommonConfig, T]:
    """Loads the common settings and ``service``'s own section, both validated."""
    section_locks: EnvLocks = getattr(section_cls, "ENV_LOCKED_IN_PRODUCTION", {})
    locked = {**ENV_LOCKED_IN_PRODUCTION, **{f"{service}.{k}": v for k, v in section_locks.items()}}
    data = load_mapping(path, environ=environ, locked=locked)
    data.setdefault("service", service)
    if data["service"] != service:
        raise ConfigError(
            f"service: this configuration is for {data['service']!r}, not {service!r}"
        )
    section = data.pop(service, {}) or {}
    for other in SERVICES:
        if other != service and other in data:
            # A shared file may carry every service's section; ignore the others.
            data.pop(other)
    common = build(CommonConfig, data, "config")
    return common, build(section_cls, section, service)
