"""Who a caller is, for every per-identity limit, and the cap on the unary RPCs it may run at once.

A per-identity limit must count one identity once, however its certificates differ: the key is
the SPIFFE ID the authoriser verified (:func:`~strongroom.pki.authz.verified_caller`, the same
parse), never the certificate's SANs as a string. Two certificates of one workload that carry
different DNS names share a bucket; a DNS name added to a certificate buys no second one.

Streams are limited by :class:`~strongroom.runtime.streams.StreamGuard`. A unary RPC holds one of
the server's ``max_workers`` threads for as long as its handler runs (a key release waiting on
collateral or the HSM, a store call against a slow backend), so :class:`UnaryGuard` admits one
only while its caller has fewer than ``max_per_identity`` running; the excess fails at once with
``RESOURCE_EXHAUSTED`` (``TOO_MANY_UNARY_CALLS_PER_IDENTITY``) instead of queueing every other
caller behind it. A call counts from the moment its handler starts until the handler returns,
however it ends (an answer, an error, an abort); a call its client cancelled counts until its
handler returns too, since gRPC cannot stop the thread that runs it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from strongroom.errors import ResourceExhausted
from strongroom.pki.authz import verified_caller
from strongroom.pki.errors import PeerUnauthenticated
from strongroom.reasons import Reason
from strongroom.runtime.grpc_types import HandlerInterceptor, RpcMethodHandler

log = logging.getLogger(__name__)

UNVERIFIED = "unverified-certificate"
"""The one bucket shared by every caller whose certificate yields no usable SPIFFE ID (only public
methods admit them, such as health): a certified client cannot multiply its buckets by holding
certificates the authoriser would refuse. It cannot collide with a SPIFFE ID (no ``spiffe://``)."""

Identify = Callable[[grpc.ServicerContext], str]
"""Names the caller of an RPC for per-identity accounting (default: :func:`caller_key`)."""


def caller_key(context: grpc.ServicerContext) -> str:
    """The caller of this RPC for per-identity accounting: its verified SPIFFE ID.

    A caller without a usable identity counts in :data:`UNVERIFIED`; a peer without any client
    certificate (a plaintext host, which only tests run) counts by its address.
    """
    try:
        return str(verified_caller(context).spiffe_id)
    except PeerUnauthenticated as exc:
        if exc.reason == Reason.NO_PEER_CERT:
            return f"peer:{context.peer()}"
        return UNVERIFIED


class UnaryGuard(HandlerInterceptor):
    """Admits a unary-unary RPC while its caller runs fewer than ``max_per_identity``; streams
    pass untouched (:class:`~strongroom.runtime.streams.StreamGuard` limits them).

    It goes after the authoriser (it counts verified callers, and a caller refused there holds no
    thread) and inside the error mapping, which answers its refusal and tells a method's refusal
    observer of it (the key broker audits a refused release)."""

    def __init__(self, max_per_identity: int, identify: Identify = caller_key) -> None:
        if max_per_identity < 1:
            raise ValueError("max_per_identity must be at least 1")
        self._max = max_per_identity
        self._identify = identify
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()

    def running(self, identity: str) -> int:
        """Unary calls of ``identity`` whose handlers run now."""
        with self._lock:
            return self._running[identity]

    def _enter(self, identity: str, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            if self._running[identity] < self._max:
                self._running[identity] += 1
                return
        log.warning(
            "unary call refused",
            extra={
                "method": method,
                "peer": context.peer(),
                "reason": Reason.TOO_MANY_UNARY_CALLS_PER_IDENTITY,
            },
        )
        raise ResourceExhausted(
            f"{identity} already has {self._max} calls running "
            f"(server.max_unary_calls_per_identity); {method} refused, retry later",
            reason=Reason.TOO_MANY_UNARY_CALLS_PER_IDENTITY,
        )

    def _leave(self, identity: str) -> None:
        with self._lock:
            self._running[identity] -= 1
            if self._running[identity] <= 0:
                del self._running[identity]

    def wrap_handler(
        self, handler: RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> RpcMethodHandler:
        """A unary-unary ``handler`` admitted within the limit; any other as it is."""
        behaviour = handler.unary_unary
        if behaviour is None:
            return handler
        method = details.method

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            identity = self._identify(context)
            self._enter(identity, method, context)
            try:
                return behaviour(request, context)
            finally:
                self._leave(identity)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
