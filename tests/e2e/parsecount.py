"""Counts the parses of a real service's unary requests, and holds its calls, from the handlers the
service registers: the service, its interceptors and gRPC run as in production, and each method's
own deserialiser and behaviour run in full, once the count is taken or the hold let go."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from strongroom.runtime import bootstrap
from strongroom.runtime.grpc_types import RpcMethodHandler
from strongroom.runtime.server import ServiceSpec

if TYPE_CHECKING:  # generic only in grpc-stubs
    GenericRpcHandler = grpc.GenericRpcHandler[Any, Any]
else:
    GenericRpcHandler = grpc.GenericRpcHandler


class ParseCount:
    """Parses of each method's requests (``parsed["/pkg.Service/Method"]``), and holds."""

    def __init__(self) -> None:
        self.parsed: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._holds: dict[str, threading.Event] = {}
        self.entered = threading.Semaphore(0)

    @contextmanager
    def hold(self, method: str) -> Iterator[None]:
        """Unary-unary calls of ``method`` admitted meanwhile wait (each releases
        :attr:`entered` once it waits) until the block ends."""
        gate = threading.Event()
        self._holds[method] = gate
        try:
            yield
        finally:
            del self._holds[method]
            gate.set()

    def _counted(self, method: str, deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        def counted(data: bytes) -> Any:
            with self._lock:
                self.parsed[method] += 1
            return deserialize(data)

        # The class a generated deserialiser is bound to, which names the message in refusals.
        counted.__self__ = getattr(deserialize, "__self__", None)  # type: ignore[attr-defined]
        return counted

    def _held(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def held(request: Any, context: grpc.ServicerContext) -> Any:
            gate = self._holds.get(method)
            if gate is not None:
                self.entered.release()
                gate.wait(60)
            return behaviour(request, context)

        return held

    def wrap(self, method: str, handler: RpcMethodHandler) -> RpcMethodHandler:
        """``handler`` with its deserialiser counted and its unary-unary behaviour holdable."""
        changes: dict[str, Any] = {}
        if handler.request_deserializer is not None and not handler.request_streaming:
            changes["request_deserializer"] = self._counted(method, handler.request_deserializer)
        if handler.unary_unary is not None:
            changes["unary_unary"] = self._held(method, handler.unary_unary)
        replace: Callable[..., RpcMethodHandler] = handler._replace  # type: ignore[attr-defined]
        return replace(**changes)

    def spec(self, spec: ServiceSpec) -> ServiceSpec:
        """``spec`` registering its handlers through :meth:`wrap`."""
        return ServiceSpec(
            spec.name,
            lambda server: spec.register(_Registering(server, self)),  # type: ignore[arg-type]
            spec.checks,
        )


class _Generic(GenericRpcHandler):
    def __init__(self, inner: Any, count: ParseCount) -> None:
        self._inner = inner
        self._count = count
        self._wrapped: dict[str, tuple[RpcMethodHandler, RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = (handler, self._count.wrap(method, handler))
            self._wrapped[method] = known
        return known[1]


class _Registering:
    """The real server, its services' handlers registered through :meth:`ParseCount.wrap`."""

    def __init__(self, server: grpc.Server, count: ParseCount) -> None:
        self._server = server
        self._count = count

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Generic(h, self._count) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, RpcMethodHandler]
    ) -> None:
        wrapped = {n: self._count.wrap(f"/{service}/{n}", h) for n, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


@contextmanager
def counting_parses() -> Iterator[ParseCount]:
    """Services built meanwhile (``build_host``: every service's ``build``) register their
    handlers through one :class:`ParseCount`."""
    count = ParseCount()
    real = bootstrap.ServiceHost

    def host(*, services: Sequence[ServiceSpec], **kwargs: Any) -> Any:
        return real(services=[count.spec(s) for s in services], **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bootstrap, "ServiceHost", host)
        yield count
