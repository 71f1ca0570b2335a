"""Assembles and runs the model store: its storage backend behind an authorised mTLS host."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from strongroom.modelstore.config import ModelstoreConfig
from strongroom.modelstore.service import (
    CONTROL_PLANE,
    METHOD_ROLES,
    ROLE_READER,
    SERVICE_NAME,
    ModelStoreServicer,
    add_to_server,
    message_limits,
)
from strongroom.modelstore.storage import FilesystemStorage, S3Storage, open_storage
from strongroom.pki.identity import WorkloadIdentity
from strongroom.runtime import starting
from strongroom.runtime.bootstrap import RoleTable, build_host, run_service
from strongroom.runtime.config import CommonConfig
from strongroom.runtime.server import ServiceHost, ServiceSpec
from strongroom.runtime.tracing import make_tracer_provider

log = logging.getLogger(__name__)

# The store's roles in terms of the deployment's roles: inference servers, publishers and admins
# read; publishers write; admins delete.
_ROLES = {ROLE_READER: ("inference", "publisher", "admin")}
ROLE_RULES = {method: _ROLES.get(role, (role,)) for method, role in METHOD_ROLES.items()}


@dataclass
class ModelStore:
    """A running model store; :meth:`close` stops it and releases the storage lock."""

    host: ServiceHost
    storage: FilesystemStorage | S3Storage

    def close(self, grace: float | None = 0) -> None:
        """Stops serving (draining for ``grace`` seconds), then closes the storage."""
        self.host.stop(grace)
        self.storage.close()


def build(
    common: CommonConfig,
    config: ModelstoreConfig,
    *,
    identity: WorkloadIdentity,
    tracer_provider: TracerProvider | None = None,
) -> ModelStore:
    """Opens the storage (sweeping interrupted uploads) and builds the host."""
    # An object store that does not answer, a long sweep: waited for only until a SIGTERM asks
    # the starting store to stop (strongroom.runtime.starting).
    storage = starting.interruptible(
        "storage",
        lambda: open_storage(config, single_secrets=common.production),
        _close_storage,
    )
    # Until the store is returned, whatever stops the build (its port taken, a SIGTERM at a
    # checkpoint) closes the storage: it was left open, its index's connection and root lock
    # held.
    with contextlib.ExitStack() as undo:
        undo.callback(storage.close)
        starting.checkpoint("storage")
        store = _build_on(common, config, storage, identity, tracer_provider)
        undo.callback(store.host.stop, 0)  # never started: its ports are released
        starting.checkpoint("host")  # its ports bound
        undo.pop_all()
        return store


def _close_storage(storage: FilesystemStorage | S3Storage) -> None:
    storage.close()


def _build_on(
    common: CommonConfig,
    config: ModelstoreConfig,
    storage: FilesystemStorage | S3Storage,
    identity: WorkloadIdentity,
    tracer_provider: TracerProvider | None,
) -> ModelStore:
    """The store on ``storage``, opened: its host built (ports bound), not started."""
    log.info(
        "storage opened",
        extra={"backend": config.storage.backend, "sweep": str(storage.last_sweep)},
    )
    if config.publishers is not None:
        unroled = sorted(
            p.spiffe_id for p in config.publishers if p.spiffe_id not in common.authz.publisher
        )
        if unroled:
            # Harmless (the role is checked first) but likely a typo in one of the two lists.
            log.warning(
                "modelstore.publishers names identities without the publisher role: %s",
                ", ".join(unroled),
            )
    servicer = ModelStoreServicer(
        storage,
        publishers=config.publisher_scopes,
        unscoped_readers=common.authz.ids("inference", "admin"),
        accept_unbound=config.accept_unbound_uploads,
    )
    host = serving_host(common, servicer, identity=identity, tracer_provider=tracer_provider)
    return ModelStore(host=host, storage=storage)


def serving_host(
    common: CommonConfig,
    servicer: ModelStoreServicer,
    *,
    identity: WorkloadIdentity,
    tracer_provider: TracerProvider | None = None,
) -> ServiceHost:
    """The host ``strongroom serve modelstore`` serves ``servicer`` on: mTLS with ``identity``,
    its roles, message limits (from the servicer's chunk sizes), control plane, and the runtime's
    whole interceptor chain (:func:`~strongroom.runtime.bootstrap.build_host`). Not started.

    :func:`build` uses it; so does ``tests/bench/modelstore_bench.py``, whose servers must be the
    production ones to measure what a deployment serves."""
    return build_host(
        common,
        identity=identity,
        services=[ServiceSpec(SERVICE_NAME, lambda s: add_to_server(servicer, s))],
        roles=RoleTable(ROLE_RULES),
        tracer_provider=tracer_provider
        or make_tracer_provider(
            "modelstore", common.tracing, identity=lambda: identity.credentials
        ),
        message_limits=message_limits(servicer.max_chunk, servicer.download_chunk),
        control_plane=CONTROL_PLANE,
    )


def serve(config_path: Path | None) -> int:
    """``strongroom serve modelstore``: runs until SIGTERM, then drains and exits."""
    return run_service(
        "modelstore",
        config_path,
        ModelstoreConfig,
        lambda common, config, identity, tracer: build(
            common, config, identity=identity, tracer_provider=tracer
        ),
    )
