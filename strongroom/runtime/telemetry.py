"""The process's telemetry (spans and metrics over OTLP) as ``strongroom serve`` runs it, and its
end within :data:`TELEMETRY_SECONDS`.

OpenTelemetry's providers shut themselves down at exit by default (``atexit``), each waiting for
its last export: with a collector that takes the connection and never answers, ~10 s each (the
exporter's timeout), ~14 s in all, and Python runs them before ``logging.shutdown``, so a service
whose grace was used up met the kubelet's SIGKILL before its queued log lines were written. The
providers made here have no exit handler: :func:`~strongroom.runtime.bootstrap.run_service`
writes the service's log first, then ends them with :meth:`Telemetry.shutdown`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from strongroom.runtime.config import TracingConfig
from strongroom.runtime.metrics import install_meter_provider
from strongroom.runtime.tracing import ClientIdentity, make_tracer_provider

log = logging.getLogger(__name__)

TELEMETRY_SECONDS = 2.5
"""How long a stopping service gives its last exports of spans and metrics, both together: past
it the process exits without them (a collector that does not answer held it ~14 s)."""


@dataclass(frozen=True)
class Telemetry:
    """The service's tracer provider (for its host and clients) and the meter provider it
    installed (None: metrics export nowhere)."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider | None

    @classmethod
    def install(
        cls, service: str, config: TracingConfig, *, identity: ClientIdentity | None
    ) -> Telemetry:
        """Makes the tracer provider and installs the process's meter provider, neither shut down
        at exit by OpenTelemetry (:meth:`shutdown` does it); ``identity`` as in
        :func:`~strongroom.runtime.tracing.make_tracer_provider`."""
        tracer = make_tracer_provider(service, config, identity=identity, shutdown_on_exit=False)
        meter = install_meter_provider(service, config, identity=identity, shutdown_on_exit=False)
        return cls(tracer, meter)

    def shutdown(self, seconds: float = TELEMETRY_SECONDS) -> bool:
        """Exports what is pending and shuts both providers down, each on its own thread, within
        ``seconds`` together; past them logs a WARNING and returns False, leaving the exports
        (daemon threads) behind: the process exits without them."""
        # Not given the budget as its own timeout: the meter provider then closes its exporter's
        # channel as the budget ends, and the export that cancels logs an ERROR racing the exit.
        shutdowns: list[tuple[str, Callable[[], object]]] = [
            ("spans", self.tracer_provider.shutdown)
        ]
        if self.meter_provider is not None:
            shutdowns.append(("metrics", self.meter_provider.shutdown))
        threads = [
            threading.Thread(
                target=_logged, args=(what, shut), name=f"telemetry-{what}", daemon=True
            )
            for what, shut in shutdowns
        ]
        deadline = time.monotonic() + seconds
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t.name.removeprefix("telemetry-") for t in threads if t.is_alive()]
        if unfinished:
            log.warning(
                "the last export of %s did not finish within %.1f s (the collector does not "
                "answer); exiting without it",
                " and ".join(unfinished),
                seconds,
                extra={"unexported": unfinished},
            )
        return not unfinished


def _logged(what: str, shutdown: Callable[[], object]) -> None:
    """Runs ``shutdown``; an error (a metric reader's last export that failed) is logged."""
    try:
        shutdown()
    except Exception as exc:  # the exit goes on without it
        log.warning("the last export of %s failed: %s", what, exc)
