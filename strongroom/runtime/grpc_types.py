"""Type aliases for grpc classes that are generic only in their type stubs (grpc-stubs).

Use ``ServerInterceptorBase`` as the base class of a server interceptor and the other aliases in
annotations; at run time they are the plain grpc classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def rewrap_handler(
    handler: RpcMethodHandler,
    unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    stream: Callable[[StreamBehaviour], StreamBehaviour],
) -> RpcMethodHandler:
    """The same handler with its behaviour wrapped: ``unary`` for handlers returning one response
    (unary-unary, stream-unary), ``stream`` for those returning a stream."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)
    return handler
