"""gRPC health with non-blocking ``Watch`` streams that cannot deadlock the server.

grpcio-health-checking's ``HealthServicer`` sends to its watchers while holding its lock, and in
non-blocking mode a send waits until gRPC's completion-queue thread reports it done. When a
watcher's RPC ends at that moment, that same thread runs the servicer's close callback, which
waits for the lock: the server stops (grpc/grpc#43403). This subclass never sends under the
servicer's lock; each watcher has its own lock that orders its sends, and each send carries the
service's status as it is at that moment, so a watcher never sees an older status after a newer
one.

The plaintext health port (:mod:`strongroom.runtime.health_port`, an asyncio server) serves the same
statuses: :meth:`HealthServicer.status_of` for ``Check`` and :meth:`HealthServicer.watch` for
``Watch``, whose bounds on names and watchers hold on both ports together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

_Send = Callable[[Any], None]

CallerView = Callable[[str, int], int]
"""What one caller on the service's port is told of a service (its name and the server's
status): a service may answer each caller for what is that caller's (the inference service, a
tenant's own models)."""

MAX_SERVICE_NAME = 256
"""The longest service name a Watch is kept for: ours are short, and each watched name is held
for as long as its stream is open (the health port needs no certificate)."""
MAX_WATCHERS = 1024
"""Watch streams kept open at once, on both ports together; past it a Watch is told the status and
ended (``Check``, which probes use, is never refused). The plaintext health port's watchers (no
certificate needed) may hold half of them at most: holding them all, anyone who reached that port
had every certified caller's Watch on the mTLS port told the status and ended."""


def _not_serving(service: str, status: int) -> int:
    return int(health_pb2.HealthCheckResponse.NOT_SERVING)


class _Watcher:
    """One Watch stream: how to send to it, and the last status it was sent."""

    __slots__ = ("closed", "last", "lock", "send", "service", "view")

    def __init__(self, service: str, send: _Send, view: CallerView | None) -> None:
        self.service = service
        self.send = send
        self.view = view
        self.lock = threading.Lock()
        self.last: int | None = None
        self.closed = False


class HealthServicer(health.HealthServicer):
    """``grpc_health``'s servicer, non-blocking, without its send-under-lock deadlock.

    ``caller_view`` (a call's context -> :data:`CallerView`, or None for the server's own
    answer) is asked on the service's port, for ``Check`` and ``Watch``: the plaintext health
    port (the kubelet's probes) always answers for the whole server."""

    def __init__(
        self, caller_view: Callable[[grpc.ServicerContext], CallerView | None] | None = None
    ) -> None:
        super().__init__(experimental_non_blocking=True)
        self._caller_view = caller_view
        self._watchers: dict[str, set[_Watcher]] = {}
        self._watching = 0
        self._watching_plaintext = 0  # of which on the plaintext health port
        self._shutting_down = False

    def _status(self, service: str) -> int:
        with self._lock:
            status: int | None = self._server_status.get(service)
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status

    def _seen(self, service: str, view: CallerView | None) -> int:
        """``service``'s status as the caller of ``view`` is told it (shutting down, every
        caller is told NOT_SERVING; a name never set is unknown to every caller)."""
        status = self._status(service)
        if view is None or status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            return status
        with self._lock:
            if self._shutting_down:
                return status
        try:
            return view(service, status)
        except Exception:  # a check that cannot answer is not a ready one
            return int(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _view(self, context: grpc.ServicerContext) -> CallerView | None:
        if self._caller_view is None:
            return None
        try:
            return self._caller_view(context)
        except Exception:  # whose answer this caller may hear is unknown: never the server's
            return _not_serving

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        """The service's status, as this caller is told it (``caller_view``)."""
        view = self._view(context)
        if view is None or self.status_of(request.service) is None:
            return super().Check(request, context)
        return health_pb2.HealthCheckResponse(status=self._seen(request.service, view))

    def _update(self, watcher: _Watcher) -> None:
        # Never under self._lock: the send waits for gRPC's completion thread.
        with watcher.lock:
            if watcher.closed:
                return
            status = self._seen(watcher.service, watcher.view)
            if status != watcher.last:
                watcher.last = status
                watcher.send(health_pb2.HealthCheckResponse(status=status))

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: _Send | None = None,
    ) -> Any:
        """Sends the service's status now and whenever it changes, until the caller leaves."""
        if send_response_callback is None:  # a server without non-blocking support
            return super().Watch(request, context)
        closed = self.watch(request.service, send_response_callback, view=self._view(context))
        if closed is not None and not context.add_callback(closed):
            closed()
        return None

    def status_of(self, service: str) -> int | None:
        """The status set for ``service``, None when none was (``Check`` answers NOT_FOUND)."""
        with self._lock:
            status: int | None = self._server_status.get(service)
        return status

    def watch(
        self,
        service: str,
        send: _Send,
        *,
        plaintext: bool = False,
        view: CallerView | None = None,
    ) -> Callable[[], None] | None:
        """Starts watching ``service``: ``send`` gets its status now and whenever it changes, and
        None once the watch ends. Returns what to call when the caller leaves, or None when the
        watch was told the status and ended at once (a name too long, ``MAX_WATCHERS``
        watching, or half of them on the plaintext port for a ``plaintext`` watch). ``send``
        must not wait on the caller for long: it is called with a watcher's lock held.
        ``view``: what this caller is told of the service's status (:data:`CallerView`)."""
        if len(service) > MAX_SERVICE_NAME:
            # No service has such a name, nor ever will: said once, and nothing kept.
            self._tell_and_end(service, send, view)
            return None
        watcher = _Watcher(service, send, view)
        with self._lock:
            full = self._watching >= MAX_WATCHERS or (
                plaintext and self._watching_plaintext >= MAX_WATCHERS // 2
            )
            if not full:
                self._watchers.setdefault(watcher.service, set()).add(watcher)
                self._watching += 1
                self._watching_plaintext += plaintext
        if full:  # the caller may watch again later, or poll with Check
            self._tell_and_end(service, send, view)
            return None

        def closed() -> None:
            # Runs on gRPC's completion thread: take no lock a sender may hold while it waits.
            watcher.closed = True
            with self._lock:
                watching = self._watchers.get(watcher.service)
                if watching is not None and watcher in watching:
                    watching.discard(watcher)
                    self._watching -= 1
                    self._watching_plaintext -= plaintext
                    if not watching:  # else every name ever watched stays, by the caller's choice
                        del self._watchers[watcher.service]
            send(None)

        self._update(watcher)
        return closed

    def _tell_and_end(self, service: str, send: _Send, view: CallerView | None) -> None:
        send(health_pb2.HealthCheckResponse(status=self._seen(service, view)))
        send(None)

    def set(self, service: str, status: int) -> None:
        """Sets a service's status and tells its watchers (outside the servicer's lock)."""
        with self._lock:
            if self._shutting_down:
                return
            self._server_status[service] = status
            watchers = list(self._watchers.get(service, ()))
        for watcher in watchers:
            self._update(watcher)

    def enter_graceful_shutdown(self) -> None:
        """Sets every service NOT_SERVING for good (later ``set`` calls are ignored)."""
        with self._lock:
            if self._shutting_down:
                return
            services = list(self._server_status)
        for service in services:
            self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        with self._lock:
            self._shutting_down = True
