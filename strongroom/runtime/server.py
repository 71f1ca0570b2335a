"""The gRPC server every Strongroom service runs on.

It serves the service's RPCs over mutual TLS with the workload identity's hot-swapping credentials,
behind tracing, SPIFFE authorisation and error mapping; gRPC health (also on an optional plaintext
port that serves health only, for kubelet and compose probes, without worker threads:
:mod:`strongroom.runtime.health_port`) and reflection; sane message-size and keepalive limits; and
a graceful stop that drains in-flight calls on SIGTERM.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ParamSpec, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from strongroom.errors import Unavailable
from strongroom.pki.authz import SpiffeAuthorizer
from strongroom.runtime import signals, starting
from strongroom.runtime.callers import UnaryGuard, WorkerShares, caller_key, identify_by_role
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.grpc_types import (
    HandlerInterceptor,
    RpcMethodHandler,
    ServerInterceptor,
    rewrap_handler,
)
from strongroom.runtime.health import CallerView, HealthServicer
from strongroom.runtime.health_port import HEALTH_SERVICE as _HEALTH
from strongroom.runtime.health_port import PlaintextHealthPort
from strongroom.runtime.interceptors import (
    CachedChain,
    DeferredRequests,
    ErrorMappingInterceptor,
    RefusalObserver,
    RequestDecodingInterceptor,
    abort_with,
)
from strongroom.runtime.listen import add_port
from strongroom.runtime.log_writer import never_wait_here
from strongroom.runtime.metrics import MetricsInterceptor
from strongroom.runtime.streams import StreamGuard, StreamLimits

log = logging.getLogger(__name__)

# Keepalive: detect dead peers within about a minute, and refuse clients that ping too eagerly.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_connection_idle_ms", 15 * 60_000),
)

HANDLER_DRAIN_SECONDS = 5.0
"""How long :meth:`ServiceHost.stop` waits, after gRPC's own grace, for handlers of cancelled
calls that are still running (each bounded by its own timeouts: HSM operations, collateral
fetches, storage calls); part of :func:`~strongroom.runtime.bootstrap.stop_seconds`, which the
chart's ``terminationGracePeriodSeconds`` and compose's ``stop_grace_period`` must exceed."""
HEALTH_SERVICE = _HEALTH
# A health name that is SERVING for as long as the process serves at all, whatever its
# dependencies say: for liveness probes, which must not restart a process waiting for its HSM.
LIVENESS = "strongroom.Liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ReadinessCheck = Callable[[], str | None]
"""Returns None when ready, or a short reason why the service must not take traffic."""


@dataclass(frozen=True)
class MessageLimits:
    """The largest message a service receives and sends, derived from its API by the service.

    gRPC reads a whole request message before any handler (and so before authorisation) runs:
    what one call from any certified peer can make the server buffer is :attr:`receive_cap`.

    ``requests``: the largest request message of the methods (full names, ``/pkg.Service/Method``)
    whose requests are smaller than :attr:`receive`, the largest of any (:meth:`request`). One
    source for two rules: a larger message is refused ``MESSAGE_TOO_LARGE`` naming the method's
    limit (:class:`~strongroom.runtime.interceptors.ErrorMappingInterceptor`), and how long the
    wait for one's message may last follows from it
    (:meth:`~strongroom.runtime.config.ServerConfig.request_wait_for`), so that a store
    ``StatModel`` waits for its few bytes no longer than a key release, not as long as the 4 MiB
    of an upload chunk would take at the stream floor. With the wait alone, a 100 KiB
    ``StatModel`` was taken (the store's limit was the upload's) and on a slow link cut
    ``CANCELLED`` at its short wait, never told it was too large.
    """

    receive: int
    send: int
    requests: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("receive", "send"):
            value = getattr(self, name)
            if not 1024 <= value < 2**31:
                raise ValueError(f"message limit {name}={value} outside 1 KiB .. 2 GiB")
        for method, size in self.requests.items():
            if not 1 <= size <= self.receive:
                raise ValueError(
                    f"request limit of {method}={size} outside 1 byte .. receive ({self.receive})"
                )
        object.__setattr__(self, "requests", MappingProxyType(dict(self.requests)))

    def request(self, method: str) -> int:
        """The largest request message of ``method``: its own, where the service names one in
        ``requests``; else :attr:`receive`."""
        return self.requests.get(method, self.receive)

    @property
    def receive_cap(self) -> int:
        """gRPC's own receive limit: :data:`RECEIVE_CAP_MARGIN` above :attr:`receive`, which the
        runtime enforces itself (:class:`~strongroom.runtime.interceptors.ErrorMappingInterceptor`).

        A message gRPC refuses never reaches the service: gRPC fails the call toward the client
        and the handler sees its request stream end as if the client had cancelled, so a
        ``ReleaseKey`` over the limit was audited ``CANCELLED``. A message within the cap reaches
        the runtime, which refuses one over the limit ``MESSAGE_TOO_LARGE``; gRPC refuses one over
        the cap from its length prefix, before buffering any more of it."""
        return min(self.receive + RECEIVE_CAP_MARGIN, 2**31 - 1)


RECEIVE_CAP_MARGIN = 64 * 1024
"""How far above a service's receive limit gRPC still takes a message, for the runtime to refuse
it by name: every memory bound written for the limit (the chart's memory floors, the store's
upload buffers) stays within this of what it says, and a client's message a little too large
(evidence with more collateral than the limit foresaw, a chunk size a little off) is named."""


DEFAULT_MESSAGE_LIMITS = MessageLimits(receive=4 * 1024 * 1024, send=4 * 1024 * 1024)
"""gRPC's own defaults, for hosts built without a service's limits (tests)."""


CallerChecks = Callable[[grpc.ServicerContext], Sequence[ReadinessCheck] | None]
"""For one caller of the health service on the service's port: the readiness checks it is
answered by, in place of the service's own (None: the service's own)."""


@dataclass
class ServiceSpec:
    """One gRPC service to host: how to register it, its full name, and its readiness checks.

    ``caller_checks``: the checks a caller of the health service on the service's port is
    answered by instead (for that service and for the server's overall name), where the server's
    answer is not every caller's to learn: the inference service's readiness covers every
    tenant's models, a tenant's callers are answered for their own. The plaintext health port
    (the kubelet's probes) answers by ``checks``."""

    name: str
    register: Callable[[grpc.Server], None]
    checks: Sequence[ReadinessCheck] = field(default_factory=tuple)
    caller_checks: CallerChecks | None = None


class ServiceHost:
    """Runs a set of gRPC services until stopped.

    ``interceptors`` run inside the error mapping, so that their refusals become statuses (an
    authoriser goes last); ``tracing`` (:func:`~strongroom.runtime.tracing.server_tracing_interceptor`)
    runs outside it, so that each server span records the status the caller got.
    ``refusal_observers`` (full method name -> observer) hear of the refusals of a method that its
    behaviour never sees (authorisation, stream and unary-call limits, a request that does not
    decode): see :class:`~strongroom.runtime.interceptors.ErrorMappingInterceptor`.
    ``control_plane`` names the methods (``/pkg.Service/Method``) and services (``pkg.Service``)
    that may use the workers reserved from data-plane calls (``server.control_plane_workers``;
    :class:`~strongroom.runtime.callers.WorkerShares`): an operator's calls, which a flood of
    data-plane calls must not queue. Health and reflection always are. ``public`` names the
    methods and services the authoriser lets any certified caller call (health always is): the
    wait for one of their request messages is a data-plane wait, never the reserve's.
    """

    def __init__(
        self,
        *,
        listen: str,
        credentials: grpc.ServerCredentials | None,
        services: Iterable[ServiceSpec],
        interceptors: Sequence[ServerInterceptor] = (),
        tracing: ServerInterceptor | None = None,
        refusal_observers: Mapping[str, RefusalObserver] | None = None,
        control_plane: Iterable[str] = (),
        public: Iterable[str] = (),
        health_listen: str | None = None,
        config: ServerConfig | None = None,
        message_limits: MessageLimits = DEFAULT_MESSAGE_LIMITS,
        check_interval: float = 1.0,
    ) -> None:
        config = config or ServerConfig()
        self._config = config
        self.message_limits = message_limits
        self._services = list(services)
        scoped = any(spec.caller_checks is not None for spec in self._services)
        self._health = HealthServicer(self._caller_view if scoped else None)
        self._stopped = threading.Event()
        self._drained = threading.Event()  # stop() has returned: drained, or given up on them
        # Orders start() against stop(): a stop that came between start()'s look at _stopped and
        # gRPC's start found nothing started to stop, and the server then started, served on
        # after stop() had returned. Held while the servers start, not while they stop.
        self._lifecycle = threading.Lock()
        self._started = False
        # Set before a server never started is started to free its port (_release_port): a call
        # waiting on the port was served then, by a service told to stop.
        self._refusing = threading.Event()
        self._check_interval = check_interval
        self.not_ready_reason: str | None = "starting"
        options = [
            ("grpc.max_receive_message_length", message_limits.receive_cap),
            ("grpc.max_send_message_length", message_limits.send),
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
            *config.connection_age_options,
        ]
        # An operator's look at the server is answered however busy its data plane. Health is
        # too once its request is read, but that wait is a data-plane one: any certificate may
        # call health, and the reserve is for the callers the authoriser restricts (the
        # kubelet's probes use the plaintext health port).
        self.shares = WorkerShares(
            config.data_plane_workers,
            {HEALTH_SERVICE, reflection.SERVICE_NAME, *control_plane},
            public={HEALTH_SERVICE, *public},
            per_identity=config.data_plane_workers_per_identity,
            per_certificate=config.max_calls_per_certificate,
        )
        # Callers the authoriser grants no role count as one (they may call health only): N
        # certificates of the CA with no role buy no N buckets. One rule for every limit here and
        # for the refusal observers (the broker's audit budget of releases refused unread).
        authorizers = [i for i in interceptors if isinstance(i, SpiffeAuthorizer)]
        identify = (
            identify_by_role(lambda spiffe_id: any(a.grants_any(spiffe_id) for a in authorizers))
            if authorizers
            else caller_key
        )
        self.streams = StreamGuard(
            StreamLimits(
                max_streams_per_identity=config.max_streams_per_identity,
                max_blocking_streams=config.blocking_streams,
                idle_timeout=config.stream_idle_timeout_seconds,
                min_bytes_per_second=config.stream_min_bytes_per_second,
                max_streams_per_certificate=config.max_streams_per_certificate,
            ),
            identify=identify,
            shares=self.shares,
        )
        self.unary = UnaryGuard(
            config.unary_calls_per_identity,
            identify=identify,
            shares=self.shares,
            max_roleless_waits=config.roleless_request_waits,
            public_wait=config.health_request_wait_seconds,
            request_wait=config.request_wait_for(message_limits.receive),
            # Per method, as each one's largest request allows (an explicit setting is every
            # method's: request_wait_for answers it for each).
            request_waits={
                method: config.request_wait_for(size)
                for method, size in message_limits.requests.items()
            },
        )
        shares = self.shares

        def counted(method: str, non_blocking: bool) -> bool:
            # Data-plane unary calls and blocking streams hold a data-plane worker already.
            return not non_blocking and not shares.is_control_plane(method)

        self._pool = _CountingPool(max_workers=config.max_workers, thread_name_prefix="rpc")
        self.abandoned = 0
        """Handlers still running when :meth:`stop` gave up waiting for them (0: none); the
        process that stops with any must not wait for them at exit
        (:func:`~strongroom.runtime.process.exit_abandoning`)."""
        self._server = grpc.server(
            self._pool,
            # Outermost first. Metrics read the final status; tracing comes next so that the error
            # mapping aborts through its span (which then records the status the caller gets, not
            # the raw exception) and logs inside the call's trace; error mapping is the one place
            # that turns any exception (an authoriser's or stream guard's refusal included) into a
            # status and reason trailer; the stream and unary guards count verified callers
            # only, so they follow the authoriser that the caller's `interceptors` end with, and
            # come before the request decoding, so that a method's refusal observer hears of
            # their refusals and a unary request is parsed (there, not by gRPC) only for a caller
            # they let through. The chain wraps each method's handler once, not on every call.
            # Outside it all, a unary request is read by the request decoding too, not by gRPC
            # before any of them: a peer that never sends its message then holds no worker
            # unless the authoriser and the limits admitted it (DeferredRequests).
            interceptors=[
                _RefuseWhile(self._refusing),
                DeferredRequests(
                    counted, self.unary.wait_for_request, read=self.unary.read_request
                ),
                CachedChain(
                    [
                        MetricsInterceptor(),
                        *([tracing] if tracing is not None else []),
                        # Each method's own largest request, as its wait above: a StatModel
                        # of 100 KiB was taken whole (the store's 4 MiB upload limit) and, on a
                        # slow link, cut CANCELLED at its 10 s wait instead of refused by size.
                        ErrorMappingInterceptor(
                            refusal_observers, identify, max_request=message_limits.request
                        ),
                        *interceptors,
                        self.streams,
                        self.unary,
                        RequestDecodingInterceptor(),
                    ]
                ),
            ],
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        for spec in self._services:
            spec.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [*(s.name for s in self._services), HEALTH_SERVICE, reflection.SERVICE_NAME],
            self._server,
        )
        self.port = add_port(self._server, listen, credentials)
        self._health_server: PlaintextHealthPort | None = None
        self.health_port: int | None = None
        if health_listen:
            try:
                self._health_server = self._health_port(health_listen, config)
            except BaseException:
                self._release_port()  # bound above: it was held for the process's life
                raise
            self.health_port = self._health_server.port
        self._set_all(NOT_SERVING)

    def _health_port(self, health_listen: str, config: ServerConfig) -> PlaintextHealthPort:
        # Plaintext and unauthenticated (probes): served without worker threads, so that no
        # number of calls that never send their message can keep a probe waiting
        # (strongroom.runtime.health_port). No cap on concurrent RPCs: open Watch streams
        # would then refuse the kubelet's probes. Connections age and dead peers are found
        # as on the service's port: a Watch of a peer that vanished (or of anyone who holds
        # it) kept its connection and its watcher for the process's life.
        return PlaintextHealthPort(
            self._health,
            health_listen,
            config.health_request_wait_seconds,
            options=(*KEEPALIVE_OPTIONS, *config.connection_age_options),
        )

    def _release_port(self) -> None:
        """Frees the port of a server never started. gRPC frees a server's port only when it
        shuts down, and shuts down only a started server (destroying one never started with a
        port bound aborts the process: "Check failed: ShutdownCalled() ||
        listener_states_.empty()"). So it starts, refusing every call (one that connected
        before would otherwise be served by a service told to stop), and stops at once."""
        self._refusing.set()
        self._server.start()
        self._server.stop(0).wait()

    def _caller_view(self, context: grpc.ServicerContext) -> CallerView | None:
        """What this caller of the health service is told (:attr:`ServiceSpec.caller_checks`):
        the statuses of its own checks, evaluated when asked; None: the server's statuses."""
        checks: dict[str, Sequence[ReadinessCheck]] = {}
        for spec in self._services:
            if spec.caller_checks is not None:
                own = spec.caller_checks(context)
                if own is not None:
                    checks[spec.name] = own
        if not checks:
            return None

        def view(service: str, status: int) -> int:
            if service and service not in checks:
                return status
            ready = all(
                not any(check() for check in checks.get(spec.name, spec.checks))
                for spec in self._services
                if service in ("", spec.name)
            )
            return int(SERVING if ready else NOT_SERVING)

        return view

    def _set_all(self, status: int) -> None:
        self._health.set("", status)
        for spec in self._services:
            self._health.set(spec.name, status)

    def _evaluate(self) -> None:
        overall: str | None = None
        for spec in self._services:
            reason = next((r for r in (check() for check in spec.checks) if r), None)
            self._health.set(spec.name, SERVING if reason is None else NOT_SERVING)
            if reason is not None and overall is None:
                overall = f"{spec.name}: {reason}"
        if overall != self.not_ready_reason:
            if overall:
                log.warning("not serving", extra={"reason": overall})
            else:
                log.info("serving")
        self.not_ready_reason = overall
        self._health.set(
            "",
            SERVING if overall is None else NOT_SERVING,
        )

    def _watch(self) -> None:
        while not self._stopped.wait(self._check_interval):
            try:
                self._evaluate()
            except Exception:
                log.exception("readiness check failed")
                self._set_all(NOT_SERVING)

    def start(self) -> None:
        """Starts serving; readiness is evaluated at once and then every ``check_interval``. A
        host stopped before it started (a SIGTERM as it was handed the signals) never starts:
        its stop would not stop it again."""
        with self._lifecycle:
            if self._stopped.is_set():
                return
            self._server.start()
            # At once: a stop after a start that failed past here stops the server, which a
            # second start (the stop's of a host never started) would refuse to.
            self._started = True
            if self._health_server is not None:
                self._health_server.start()
        self._health.set(LIVENESS, SERVING)
        self._evaluate()
        threading.Thread(target=self._watch, name="readiness", daemon=True).start()
        log.info("listening", extra={"port": self.port, "health_port": self.health_port})

    def stop(self, grace: float | None = None) -> None:
        """Stops taking new calls, reports NOT_SERVING and waits for in-flight calls to finish;
        a host never started releases its ports and threads. Waits for a :meth:`start` under
        way to end first (then stops what it started), so never call it from a signal handler
        of the thread that calls :meth:`start`: it would wait for that start for good (the
        handler of :meth:`run_until_signal` stops on a thread of its own)."""
        with self._lifecycle:
            if self._stopped.is_set():
                return
            self._stopped.set()
            started = self._started
        try:
            self._health.enter_graceful_shutdown()
            grace = self._config.grace_seconds if grace is None else grace
            if started:
                self._server.stop(grace).wait()
            else:
                # A host built and stopped before it served (a SIGTERM while the service
                # started) held its port for the process's life.
                self._release_port()
            self._drain_handlers()
            # Their watchdogs' threads end with the server (each stopped host left two running).
            self.unary.close()
            self.streams.close()
            if self._health_server is not None:
                self._health_server.stop()
            log.info("stopped")
        finally:
            self._drained.set()

    def _drain_handlers(self) -> None:
        """Waits, up to :data:`HANDLER_DRAIN_SECONDS`, for handlers still running.

        gRPC's stop cancels the calls still in flight after the grace, but a cancelled call's
        handler runs on until it returns: what a service does once stopped (the key broker's last
        audit records, then closing its log) ran beside handlers still deciding, whose records
        then met a closed log. A handler stuck past the bound (an audit commit
        whose fsync never returns on stalled storage; an HSM call times out) is left behind, logged.
        """
        waiter = threading.Thread(
            target=self._pool.shutdown,
            kwargs={"wait": True, "cancel_futures": True},
            name="rpc-drain",
            daemon=True,
        )
        waiter.start()
        waiter.join(HANDLER_DRAIN_SECONDS)
        if waiter.is_alive():
            self.abandoned = max(1, self._pool.running())  # one at least keeps the pool alive
            log.warning(
                "%d calls' handlers still running %.0f s after the server stopped; stopping "
                "without them",
                self.abandoned,
                HANDLER_DRAIN_SECONDS,
                extra={"abandoned": self.abandoned},
            )

    def wait(self) -> None:
        """Blocks until :meth:`stop` (for instance on SIGTERM) has returned.

        It returned once gRPC's server had terminated, before the stop's drain of the handlers
        still running: what a service does once stopped (the key broker's last audit records,
        then closing its log) ran beside them after all, and :attr:`abandoned` was not known."""
        self._drained.wait()

    def run_until_signal(self, after_start: Callable[[], None] | None = None) -> None:
        """Starts (then calls ``after_start``), and stops gracefully on SIGTERM or SIGINT (each
        logged, ``signal received, draining``, and the stop begun on the ``signals`` thread:
        :mod:`strongroom.runtime.signals`). Called outside a service's run (``run_service``,
        which gives its handlers back once its close is over), it gives the handlers it
        installed back when it returns (:func:`~strongroom.runtime.signals.given_back`): they
        stayed, a later Ctrl-C taken for the stop of a host long stopped."""

        def on_signal(signum: int, _frame: object) -> None:
            # Only a hand-over: a log line or a thread started here could wait for good on a
            # lock the interrupted main thread holds.
            signals.later(functools.partial(self._stop_on_signal, signum))

        with signals.given_back():
            # A stop asked for while the service started ends it here, before it serves.
            starting.hand_over(on_signal)
            settle_heap()  # before any call or background load: only startup's objects are frozen
            self.start()
            if after_start is not None:
                after_start()
            self.wait()

    def _stop_on_signal(self, signum: int) -> None:
        log.info("signal received, draining", extra={"signal": signum})
        if self._stopped.is_set():
            return  # a further signal: the stop is under way
        try:
            # On a thread of its own: the next signal's line is not held up by the drain.
            threading.Thread(target=self._stop_never_waiting, name="shutdown").start()
        except RuntimeError:
            # No thread to be had (the process at its limit): the stop runs here, later
            # signals' lines after it. Only logged, the signal was spent and the service served
            # on until its orchestrator's SIGKILL.
            self.stop()

    def _stop_never_waiting(self) -> None:
        # Its lines queued, not written here: one that waited in its write (another writer
        # filled stderr's pipe, its reader stopped reading) held the stop short of its end, and
        # the service's close (the broker's audit log) never ran.
        never_wait_here()
        self.stop()


class _RefuseWhile(HandlerInterceptor):
    """Refuses every call UNAVAILABLE while ``refusing`` is set, before any of the chain or the
    service's behaviour runs (the host's outermost interceptor)."""

    def __init__(self, refusing: threading.Event) -> None:
        self._refusing = refusing

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """``handler`` itself, or while refusing one of its kind that refuses."""
        if not self._refusing.is_set():
            return handler
        return rewrap_handler(handler, lambda _behaviour: _refuse, lambda _behaviour: _refuse)


def _refuse(_request: Any, context: grpc.ServicerContext, *_send: Any) -> Any:
    abort_with(context, Unavailable("the service is stopping"))


P = ParamSpec("P")
T = TypeVar("T")


class _CountingPool(futures.ThreadPoolExecutor):
    """The server's worker pool, counting the tasks (gRPC's handlers of calls) running now: how
    many calls a stop that gave up on them abandons."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count = threading.Lock()
        self._running = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> futures.Future[T]:
        """Schedules ``fn`` as the pool does, counted in :meth:`running` while it runs."""

        def counted() -> T:
            with self._count:
                self._running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count:
                    self._running -= 1

        return super().submit(counted)

    def running(self) -> int:
        """Tasks running now."""
        with self._count:
            return self._running


def settle_heap() -> None:
    """Freezes startup's objects for the cycle collector (``gc.freeze``) before a service serves.

    What a service builds at startup (modules, configuration, stubs: ~70,000 objects in the key
    broker) lives as long as the process, yet Python's cycle collector runs a full collection only
    once the objects promoted since the last one reach a quarter of all long-lived ones, so each
    full collection scans them all and happens rarely: ~170,000 releases apart in the key broker,
    where python-pkcs11 makes a new class for every PKCS#11 object (two per release, each a
    reference cycle of ~1.7 KiB), so memory crept by ~5 KiB per 1,000 releases in between.
    Frozen, they are neither scanned nor counted: full collections come often and stay cheap.
    Frozen objects are still freed when their last reference goes; only cycles among them would
    be kept, which is why this runs before the first call or model load, not after.
    """
    gc.collect()  # garbage still pending now would otherwise be frozen with the rest, for good
    gc.freeze()
