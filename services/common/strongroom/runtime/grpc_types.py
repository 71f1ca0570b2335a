"""Type aliases for grpc classes that are generic only in their type stubs (grpc-stubs).

Use ``ServerInterceptorBase`` as the base class of a server interceptor and the other aliases in
annotations; at run time they are the plain grpc classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    ServerInterceptorBase: TypeAlias = grpc.ServerInterceptor[Any, Any]
    RpcMethodHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    ServerInterceptorBase = grpc.ServerInterceptor
    RpcMethodHandler = grpc.RpcMethodHandler

ServerInterceptor: TypeAlias = "ServerInterceptorBase"
