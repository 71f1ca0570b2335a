"""Type aliases for grpc classes that are generic only in their type stubs (grpc-stubs).

Use ``ServerInterceptorBase`` as the base class of a server interceptor and the other aliases in
annotations; at run time they are the plain grpc classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    ServerInterceptorBase: TypeAlias = grpc.ServerInterceptor[Any, Any]
    RpcMethodHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    ServerInterceptorBase = grpc.ServerInterceptor
    RpcMethodHandler = grpc.RpcMethodHandler

ServerInterceptor: TypeAlias = "ServerInterceptorBase"


UnaryBehaviour: TypeAlias = Callable[[Any, grpc.ServicerContext], Any]
StreamBehaviour: TypeAlias = Callable[[Any, grpc.ServicerContext], Iterator[Any]]


NON_BLOCKING_ATTRIBUTES = ("experimental_non_blocking", "experimental_thread_pool")
"""Attributes gRPC reads from a method's behaviour; every wrapper must carry them over."""


def is_non_blocking(handler: RpcMethodHandler) -> bool:
    """True when ``handler``'s behaviour runs in gRPC's non-blocking mode (it returns at once and
    sends its responses through a callback, holding no worker thread: health ``Watch``)."""
    behaviour = handler.unary_stream or handler.stream_stream
    return bool(getattr(behaviour, "experimental_non_blocking", False))


def carry_attributes(wrapper: Callable[..., Any], wrapped: Callable[..., Any]) -> None:
    """Copies gRPC's behaviour attributes from ``wrapped`` to ``wrapper``.

    A wrapper that drops ``experimental_non_blocking`` turns a non-blocking stream (health
    ``Watch``) into one that holds a worker thread for its whole life: a handful of such streams
    then starve every other RPC.
    """
    for name in NON_BLOCKING_ATTRIBUTES:
        if hasattr(wrapped, name):
            setattr(wrapper, name, getattr(wrapped, name))


class HandlerInterceptor(ServerInterceptorBase):
    """A server interceptor that decorates the handler of every known method.

    Subclasses implement :meth:`wrap_handler`; an unknown method (no handler) passes through as
    None, so gRPC still answers UNIMPLEMENTED.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> RpcMethodHandler | None:
        """Asks ``continuation`` for the method's handler and returns it wrapped."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap_handler(handler, handler_call_details)

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler | None:
        """The handler to serve ``details.method`` with, in place of ``handler``."""
        raise NotImplementedError


def rewrap_handler(
    handler: RpcMethodHandler,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> RpcMethodHandler:
    """The same handler with its behaviour wrapped: ``unary`` for handlers returning one response
    (unary-unary, stream-unary), ``stream`` for those returning a stream.

    A non-blocking behaviour (it returns at once and sends responses through the callback gRPC
    passes as a third argument) is wrapped with ``unary`` around the synchronous part, and stays
    non-blocking. ``request_deserializer`` replaces the handler's own when given.
    """
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _stream_or_non_blocking(handler.unary_stream, unary, stream), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            _stream_or_non_blocking(handler.stream_stream, unary, stream), **kwargs
        )
    return handler


def _stream_or_non_blocking(
    behaviour: Callable[..., Any],
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
) -> Callable[..., Any]:
    if not getattr(behaviour, "experimental_non_blocking", False):
        wrapped = stream(behaviour)
        carry_attributes(wrapped, behaviour)
        return wrapped

    def non_blocking(request: Any, context: grpc.ServicerContext, send: Any) -> Any:
        return unary(lambda r, c: behaviour(r, c, send))(request, context)

    carry_attributes(non_blocking, behaviour)
    return non_blocking


class HandlerCollector:
    """Stands in for a server to catch the handlers a generated registration function builds, so
    that a service can register them with one replaced (its own serialiser or deserialiser)."""

    def __init__(self) -> None:
        self.handlers: dict[str, RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: the same handlers also come through ``add_registered_method_handlers``."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, RpcMethodHandler]
    ) -> None:
        """Keeps the per-method handlers."""
        self.handlers.update(handlers)
