"""Per-RPC authorisation by the caller's SPIFFE ID, deny by default.

The TLS handshake has already verified the client's chain against our root (gRPC Python offers no
request-but-don't-verify mode, see ``pki/README.md``). :class:`SpiffeAuthorizer` then checks, for every
RPC: a peer certificate is present; it is time-valid NOW (a connection may outlive its certificate);
it has exactly one URI SAN, a SPIFFE ID in our trust domain; it is not a CA's (CA:TRUE, keyCertSign or
cRLSign: the handshake accepts those as leaves); the connection negotiated TLS 1.3; and
the method's rule lists that ID. Failures raise :class:`PeerUnauthenticated` (UNAUTHENTICATED: no
usable identity) or :class:`PeerNotAllowed` (PERMISSION_DENIED: known identity, not allowed), naming
the identity and the method, before the method's behaviour runs. The authoriser only raises: the
service runtime's error mapping, its outermost interceptor, reports the status and reason.

By then gRPC has received a unary request's message (up to the server's receive limit), and it
has called the handler's ``request_deserializer`` on it before any interceptor ran: the check
cannot keep a request from being *parsed*. The service runtime does
(:class:`~strongroom.runtime.interceptors.RequestDecodingInterceptor` registers every unary-request
method with a deserialiser that only boxes the bytes, and parses them after this check and the
admission checks); a
request stream's messages are deserialised as the behaviour reads them, after this check.

The authoriser reads the connection's auth context once per RPC and hands the identity it verified
to the handler (:func:`verified_caller`), which need not parse it again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509

from strongroom.cryptoparse import X509_PARSE_ERRORS
from strongroom.errors import REFUSAL_LINE, StrongroomError
from strongroom.pki._x509 import cert_spki_der, signing_capability, uri_sans
from strongroom.pki.errors import (
    InvalidPkiConfig,
    PeerNotAllowed,
    PeerUnauthenticated,
)
from strongroom.pki.identity import Clock, utc_now
from strongroom.reasons import Reason
from strongroom.spiffe import MalformedSpiffeId, SpiffeId

_log = logging.getLogger(__name__)

_METHOD = re.compile(r"/([A-Za-z_][\w.]*)/([A-Za-z_]\w*|\*)")
_SERVICE = re.compile(r"[A-Za-z_][\w.]*")

# grpc-stubs makes ServerInterceptor generic; at run time it is a plain class.
if TYPE_CHECKING:
    _InterceptorBase = grpc.ServerInterceptor[Any, Any]
else:
    _InterceptorBase = grpc.ServerInterceptor


@dataclass(frozen=True)
class CallerIdentity:
    """Who is calling, from the peer certificate of this RPC's connection."""

    spiffe_id: SpiffeId
    serial: int
    public_key_der: bytes = field(repr=False)
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class _ParsedPeer:
    """A peer certificate parsed once (cached by its PEM bytes); ``problem`` explains unusable ones."""

    serial: int
    not_before: datetime
    not_after: datetime
    public_key_der: bytes
    spiffe_id: SpiffeId | None
    problem: str | None


def _peer_spiffe_id(cert: x509.Certificate) -> tuple[SpiffeId | None, str | None]:
    try:
        uris = uri_sans(cert)
    except ValueError:
        return None, "the certificate's SAN extension is malformed"
    if len(uris) != 1:
        return None, (
            "the client certificate must carry exactly one URI SAN (a SPIFFE ID), "
            f"it has {len(uris)}"
        )
    try:
        return SpiffeId.parse(uris[0]), None
    except MalformedSpiffeId as exc:
        return None, exc.message


def _parse_peer(pem: bytes) -> _ParsedPeer:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except X509_PARSE_ERRORS:
        never = datetime.min.replace(tzinfo=UTC)  # expired: the cache drops it at the next miss
        return _ParsedPeer(0, never, never, b"", None, "malformed peer certificate")
    spiffe_id, problem = _peer_spiffe_id(cert)
    if problem is None:
        # A certificate able to sign certificates is a CA's, whatever URI SAN it carries.
        problem = signing_capability(cert)
    return _ParsedPeer(
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        public_key_der=cert_spki_der(cert),
        spiffe_id=spiffe_id,
        problem=problem,
    )


class _PeerCache:
    """Parsed peer certificates by PEM, holding only certificates that can still authenticate.

    Every renewal of every peer brings a new certificate, and an entry is ~1.2 KiB, so a cache
    bounded by count alone grows with the renewal history until it is full: with 60 s
    certificates and ~24 renewals a minute, a 256-entry LRU fills for ~10 minutes, which soaks
    read as a leak. An expired
    certificate never passes :func:`_identity` again, so a miss first drops expired entries and
    the cache holds about as many entries as there are live peers. ``maxsize`` still bounds it
    against many live peers at once; past it, the oldest entry goes and a miss costs one parse
    (~30 us) per RPC, never a failure.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._entries: dict[bytes, _ParsedPeer] = {}
        self._lock = threading.Lock()

    def get(self, pem: bytes, now: datetime) -> _ParsedPeer:
        """The parsed certificate, parsing it on a miss."""
        entry = self._entries.get(pem)  # a dict read is atomic; the lock guards changes
        if entry is not None:
            return entry
        entry = _parse_peer(pem)
        with self._lock:
            expired = [k for k, v in self._entries.items() if v.not_after < now]
            for key in expired:
                del self._entries[key]
            while len(self._entries) >= self._maxsize:
                del self._entries[next(iter(self._entries))]
            self._entries[pem] = entry
        return entry

    def __len__(self) -> int:
        return len(self._entries)


_PEERS = _PeerCache(maxsize=256)


def _auth_properties(context: grpc.ServicerContext) -> Mapping[str, Any]:
    # gRPC builds a fresh mapping of name -> list of bytes on every call (grpc-stubs types it as
    # name -> bytes): read it once per RPC.
    return context.auth_context() or {}


def _auth_property(properties: Mapping[str, Any], name: str) -> list[bytes]:
    values = properties.get(name)
    return [bytes(v) for v in values] if values else []


def _peer_pem(properties: Mapping[str, Any]) -> bytes | None:
    certs = _auth_property(properties, "x509_pem_cert")
    return certs[0] if len(certs) == 1 else None


_VERIFIED: ContextVar[CallerIdentity | None] = ContextVar(
    "strongroom_verified_caller", default=None
)
# Where an outer layer of the call (the error mapping) asked to hear whom the authoriser verified
# (admitted_caller): the list it is appended to.
_ADMITTED: ContextVar[list[CallerIdentity] | None] = ContextVar(
    "strongroom_admitted_caller", default=None
)


@contextlib.contextmanager
def admitted_caller() -> Iterator[list[CallerIdentity]]:
    """Within it, the caller a :class:`SpiffeAuthorizer` verifies for this thread's RPC is added to
    the list it gives, where it outlives the authoriser's own scope (:func:`verified_caller` holds
    it only while the handler runs). For a refusal heard once the inner layers returned
    (:func:`verified_as`): checked again then, a certificate that expired since its call was
    admitted made that call's caller role-less."""
    admitted: list[CallerIdentity] = []
    token = _ADMITTED.set(admitted)
    try:
        yield admitted
    finally:
        _ADMITTED.reset(token)


@contextlib.contextmanager
def verified_as(admitted: list[CallerIdentity]) -> Iterator[None]:
    """Within it, :func:`verified_caller` is the caller :func:`admitted_caller` heard of, if the
    authoriser verified one (else the certificate, checked again, as without it)."""
    token = _VERIFIED.set(admitted[-1] if admitted else None)
    try:
        yield
    finally:
        _VERIFIED.reset(token)


def _verify(
    check: Callable[[grpc.ServicerContext], CallerIdentity | None], context: grpc.ServicerContext
) -> Token[CallerIdentity | None]:
    """Runs the authoriser's ``check`` and holds the caller it verified for the call (reset the
    token when the behaviour returns); an outer layer that asked (:func:`admitted_caller`) hears
    of it too."""
    caller = check(context)
    admitted = _ADMITTED.get()
    if admitted is not None and caller is not None:
        admitted.append(caller)
    return _VERIFIED.set(caller)


def verified_caller(context: grpc.ServicerContext) -> CallerIdentity:
    """The caller of this RPC as :class:`SpiffeAuthorizer` verified it before the handler ran;
    where no authoriser ran (public methods, a servicer called directly), :func:`caller_identity`.
    """
    caller = _VERIFIED.get()
    return caller if caller is not None else caller_identity(context)


def caller_identity(
    context: grpc.ServicerContext,
    *,
    trust_domain: str | None = None,
    now: datetime | None = None,
) -> CallerIdentity:
    """The verified identity of the caller of this RPC; raises :class:`PeerUnauthenticated`.

    Checks exactly what :class:`SpiffeAuthorizer` checks about the certificate (presence, time
    validity, one URI SAN, SPIFFE syntax, and the trust domain when given).
    """
    return _identity(_peer_pem(_auth_properties(context)), trust_domain, now)


def _identity(pem: bytes | None, trust_domain: str | None, now: datetime | None) -> CallerIdentity:
    if pem is None:
        raise PeerUnauthenticated(
            "the caller presented no client certificate", reason=Reason.NO_PEER_CERT
        )
    moment = now or utc_now()
    peer = _PEERS.get(pem, moment)
    if peer.problem is not None or peer.spiffe_id is None:
        raise PeerUnauthenticated(
            f"the caller's certificate (serial {peer.serial:x}) is unusable: {peer.problem}",
            reason=Reason.PEER_CERT_UNUSABLE,
        )
    if moment > peer.not_after:
        raise PeerUnauthenticated(
            f"the certificate of {peer.spiffe_id} (serial {peer.serial:x}) expired at "
            f"{peer.not_after.isoformat()}",
            reason=Reason.PEER_CERT_EXPIRED,
        )
    if moment < peer.not_before:
        raise PeerUnauthenticated(
            f"the certificate of {peer.spiffe_id} (serial {peer.serial:x}) is not valid before "
            f"{peer.not_before.isoformat()}",
            reason=Reason.PEER_CERT_NOT_YET_VALID,
        )
    if trust_domain is not None and not peer.spiffe_id.member_of(trust_domain):
        raise PeerUnauthenticated(
            f"{peer.spiffe_id} belongs to trust domain {peer.spiffe_id.trust_domain!r}, "
            f"not ours ({trust_domain!r})",
            reason=Reason.FOREIGN_TRUST_DOMAIN,
        )
    return CallerIdentity(
        spiffe_id=peer.spiffe_id,
        serial=peer.serial,
        public_key_der=peer.public_key_der,
        not_before=peer.not_before,
        not_after=peer.not_after,
    )


def _normalise_pattern(pattern: str) -> str:
    if _SERVICE.fullmatch(pattern):
        return f"/{pattern}/*"  # a bare service name means all of its methods
    if not _METHOD.fullmatch(pattern):
        raise InvalidPkiConfig(
            f"authorisation rule {pattern!r} must be '/pkg.Service/Method', '/pkg.Service/*' "
            "or 'pkg.Service'"
        )
    return pattern


class SpiffeAuthorizer(_InterceptorBase):
    """Authorises every RPC by the caller's SPIFFE ID; unlisted methods are denied.

    ``rules`` maps ``/pkg.Service/Method`` or ``/pkg.Service/*`` to the SPIFFE IDs allowed to call it
    (an exact method rule takes precedence over its service's ``*`` rule). ``public`` lists methods
    or services anyone may call (e.g. ``grpc.health.v1.Health``); the TLS handshake still requires a
    certificate from our CA. ``require_tls13`` rejects connections that negotiated an older TLS.
    """

    def __init__(
        self,
        trust_domain: str,
        rules: Mapping[str, Iterable[str | SpiffeId]],
        *,
        public: Iterable[str] = (),
        require_tls13: bool = True,
        clock: Clock = utc_now,
    ) -> None:
        SpiffeId.of(trust_domain)
        self.trust_domain = trust_domain
        self._clock = clock
        self._require_tls13 = require_tls13
        self._rules: dict[str, frozenset[SpiffeId]] = {}
        for pattern, ids in rules.items():
            key = _normalise_pattern(pattern)
            allowed = frozenset(i if isinstance(i, SpiffeId) else SpiffeId.parse(i) for i in ids)
            if not allowed:
                raise InvalidPkiConfig(f"rule {pattern!r} allows nobody: list IDs or remove it")
            foreign = sorted(str(i) for i in allowed if not i.member_of(trust_domain))
            if foreign:
                raise InvalidPkiConfig(
                    f"rule {pattern!r} names IDs outside {trust_domain!r}: {foreign}"
                )
            if key in self._rules:
                raise InvalidPkiConfig(f"rule {pattern!r} appears twice")
            self._rules[key] = allowed
        self._granted: frozenset[SpiffeId] = frozenset().union(*self._rules.values())
        self._public = frozenset(_normalise_pattern(p) for p in public)
        overlap = self._public & self._rules.keys()
        if overlap:
            raise InvalidPkiConfig(f"{sorted(overlap)} are both public and restricted")

    def _is_public(self, method: str) -> bool:
        return method in self._public or f"{_service_of(method)}*" in self._public

    def grants_any(self, spiffe_id: SpiffeId) -> bool:
        """Whether any rule lets ``spiffe_id`` call a method that is not public: an identity it
        grants nothing (role-less) may call only what anyone may, and the service runtime counts
        all such callers as one (:data:`~strongroom.runtime.callers.ROLELESS`)."""
        return spiffe_id in self._granted

    def allowed(self, method: str) -> frozenset[SpiffeId] | None:
        """The IDs allowed to call ``method`` (None when unlisted, i.e. denied to everyone)."""
        exact = self._rules.get(method)
        if exact is not None:
            return exact
        return self._rules.get(f"{_service_of(method)}*")

    def authorize(self, method: str, context: grpc.ServicerContext) -> CallerIdentity | None:
        """Checks one RPC; returns the caller (None for public methods) or raises a
        :class:`PeerUnauthenticated` / :class:`PeerNotAllowed`."""
        properties = _auth_properties(context)
        if self._require_tls13:
            versions = _auth_property(properties, "ssl_tls_version")
            if versions and versions[0] != b"TLSv1.3":
                raise PeerUnauthenticated(
                    f"{method} requires TLS 1.3; this connection negotiated "
                    f"{versions[0].decode(errors='replace')}",
                    reason=Reason.TLS_VERSION,
                )
        if self._is_public(method):
            return None
        caller = _identity(_peer_pem(properties), self.trust_domain, self._clock())
        allowed = self.allowed(method)
        if allowed is None:
            raise PeerNotAllowed(
                f"{method} is not listed in the authorisation table: denied to {caller.spiffe_id}",
                reason=Reason.METHOD_NOT_LISTED,
            )
        if caller.spiffe_id not in allowed:
            raise PeerNotAllowed(f"{caller.spiffe_id} may not call {method}")
        return caller

    def _check(self, method: str, context: grpc.ServicerContext) -> CallerIdentity | None:
        try:
            return self.authorize(method, context)
        except StrongroomError as exc:
            # Raised, not answered: the service runtime's error mapping (outermost) reports it.
            _log.warning(
                "denied RPC %s: %s", method, exc, extra={"reason": exc.reason, REFUSAL_LINE: True}
            )
            raise

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wraps the method's handler so the check runs before its behaviour (a unary request
        has been received by then, and parsed unless its deserialiser is deferred: see the
        module's documentation)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return _guarded(handler, functools.partial(self._check, method))


def _service_of(method: str) -> str:
    return method[: method.rfind("/") + 1]


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any],
    check: Callable[[grpc.ServicerContext], CallerIdentity | None],
) -> grpc.RpcMethodHandler[Any, Any]:
    # The identity is visible to the handler through a context variable (see verified_caller),
    # reset when the behaviour returns so that it never outlives its RPC on a worker thread.
    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        def guarded_unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            token = _verify(check, context)
            try:
                return unary_unary(request, context)
            finally:
                _VERIFIED.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded_unary_unary, request_deserializer=deserializer, response_serializer=serializer
        )
    streaming = handler.unary_stream or handler.stream_stream
    if streaming is not None and getattr(streaming, "experimental_non_blocking", False):
        # A non-blocking stream (health Watch) returns at once and answers through a callback:
        # keep it that way, or each such stream holds a worker thread for its whole life.
        behaviour: Any = streaming

        def guarded_non_blocking(request: Any, context: grpc.ServicerContext, send: Any) -> Any:
            check(context)
            return behaviour(request, context, send)

        for name in ("experimental_non_blocking", "experimental_thread_pool"):
            setattr(guarded_non_blocking, name, getattr(behaviour, name, None))
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            guarded_non_blocking, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        def guarded_unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _verify(check, context)
            try:
                yield from unary_stream(request, context)
            finally:
                _VERIFIED.reset(token)

        return grpc.unary_stream_rpc_method_handler(
            guarded_unary_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        def guarded_stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            token = _verify(check, context)
            try:
                return stream_unary(requests, context)
            finally:
                _VERIFIED.reset(token)

        return grpc.stream_unary_rpc_method_handler(
            guarded_stream_unary, request_deserializer=deserializer, response_serializer=serializer
        )
    if handler.stream_stream is not None:
        stream_stream = handler.stream_stream

        def guarded_stream_stream(
            requests: Iterator[Any], context: grpc.ServicerContext
        ) -> Iterator[Any]:
            token = _verify(check, context)
            try:
                yield from stream_stream(requests, context)
            finally:
                _VERIFIED.reset(token)

        return grpc.stream_stream_rpc_method_handler(
            guarded_stream_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    raise InvalidPkiConfig("RPC method handler has no behaviour")
