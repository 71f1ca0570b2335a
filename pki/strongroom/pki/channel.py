"""A client channel that follows certificate rotation without failing in-flight calls.

gRPC Python cannot swap a channel's client certificate in place (grpc#41779), so on rotation we build
a new ``grpc.secure_channel`` with the new certificate and route new calls to it, while the old one
stays open until its last in-flight call ends, then closes. Each channel gets its own subchannel pool
(``grpc.use_local_subchannel_pool``) so a new channel never reuses a connection made with the old
certificate.

:class:`RotatingChannel` is a ``grpc.Channel``: generated stubs and ``grpc.intercept_channel`` work on
it unchanged. A handshake rejection of our certificate surfaces as
:class:`~strongroom.pki.handshake.ClientCertificateRejected` (UNAUTHENTICATED) instead of gRPC's
opaque UNAVAILABLE; futures (``.future()``) are not translated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc

from strongroom.pki.handshake import TlsPresentation, translate

ChannelOption = tuple[str, Any]


class _CredentialsLike(Protocol):
    generation: int
    key_pem: bytes
    chain_pem: bytes


class CredentialSource(Protocol):
    """What a :class:`RotatingChannel` reads: the current credentials and the pinned root."""

    @property
    def credentials(self) -> _CredentialsLike: ...

    @property
    def root_pem(self) -> bytes: ...


class _Slot:
    """One underlying channel and the calls in flight on it."""

    def __init__(self, channel: grpc.Channel, generation: int, presentation: TlsPresentation):
        self.channel = channel
        self.generation = generation
        self.presentation = presentation
        self.inflight = 0
        self.retired = False
        self.closed = False
        self.callables: dict[int, Any] = {}


class _Lease:
    """One call's hold on a slot; :meth:`release` is idempotent."""

    __slots__ = ("_done", "_owner", "slot")

    def __init__(self, owner: RotatingChannel, slot: _Slot) -> None:
        self._owner = owner
        self.slot = slot
        self._done = False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._owner._release(self.slot)


class RotatingChannel(grpc.Channel):
    """A ``grpc.Channel`` over mTLS that rebuilds itself when the workload certificate rotates."""

    def __init__(
        self,
        source: CredentialSource,
        target: str,
        *,
        server_name: str | None = None,
        options: Sequence[ChannelOption] = (),
    ) -> None:
        self._source = source
        self._target = target
        self._server_name = server_name
        self._options = list(options)
        self._lock = threading.Lock()
        self._closed = False
        self._subscriptions: list[tuple[Callable[[grpc.ChannelConnectivity], None], bool]] = []
        self._slot = self._build()
        self._retired: set[_Slot] = set()
        self.rebuilds = 0

    @property
    def target(self) -> str:
        """The target this channel connects to."""
        return self._target

    def _build(self) -> _Slot:
        credentials = self._source.credentials
        presentation = TlsPresentation(
            self._source.root_pem, credentials.key_pem, credentials.chain_pem
        )
        options: list[ChannelOption] = [*self._options, ("grpc.use_local_subchannel_pool", 1)]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        channel = grpc.secure_channel(
            self._target,
            grpc.ssl_channel_credentials(
                presentation.root_pem, presentation.key_pem, presentation.chain_pem
            ),
            options=options,
        )
        for callback, try_to_connect in self._subscriptions:
            channel.subscribe(callback, try_to_connect)
        return _Slot(channel, credentials.generation, presentation)

    def _acquire(self) -> _Lease:
        generation = self._source.credentials.generation
        retired: _Slot | None = None
        with self._lock:
            if self._closed:
                raise ValueError("Cannot invoke RPC on closed channel!")
            if generation != self._slot.generation:
                retired = self._slot
                retired.retired = True
                self._slot = self._build()
                self.rebuilds += 1
                self._retired.add(retired)
            slot = self._slot
            slot.inflight += 1
            close_retired = retired is not None and self._take_if_idle(retired)
            subscriptions = list(self._subscriptions)
        if retired is not None:
            for callback, _ in subscriptions:
                retired.channel.unsubscribe(callback)
            if close_retired:
                _close_later(retired.channel)
        return _Lease(self, slot)

    def _take_if_idle(self, slot: _Slot) -> bool:
        # Under self._lock: claims the close of a retired, idle slot exactly once.
        if slot.retired and slot.inflight == 0 and not slot.closed:
            slot.closed = True
            self._retired.discard(slot)
            return True
        return False

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.inflight -= 1
            close = self._take_if_idle(slot)
        if close:
            _close_later(slot.channel)

    def _translate(self, error: grpc.RpcError, slot: _Slot) -> grpc.RpcError:
        return translate(error, self._target, slot.presentation, server_name=self._server_name)

    # ------------------------------------------------------------------ grpc.Channel

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        """Subscribes to connectivity of the current channel (carried over on rotation)."""
        with self._lock:
            self._subscriptions.append((callback, try_to_connect))
            channel = self._slot.channel
        channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Removes a connectivity subscription."""
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if s[0] is not callback]
            channel = self._slot.channel
        channel.unsubscribe(callback)

    def unary_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        """A unary-unary callable that runs each call on the current channel."""
        return _UnaryUnary(
            self, "unary_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable:
        """A unary-stream callable that runs each call on the current channel."""
        return _UnaryStream(
            self, "unary_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable:
        """A stream-unary callable that runs each call on the current channel."""
        return _StreamUnary(
            self, "stream_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable:
        """A stream-stream callable that runs each call on the current channel."""
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def close(self) -> None:
        """Closes the current channel and every retired one (cancelling their calls)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots = [self._slot, *self._retired]
            self._retired.clear()
            for slot in slots:
                slot.closed = True
        for slot in slots:
            slot.channel.close()

    def __enter__(self) -> RotatingChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RotatingChannel({self._target!r}, generation={self._slot.generation})"


def _close_later(channel: grpc.Channel) -> None:
    # Never close a channel on one of its own callback threads.
    threading.Thread(target=channel.close, name="pki-channel-close", daemon=True).start()


class _MultiCallable:
    """Shared plumbing: resolves the underlying multi-callable for a slot, once per slot."""

    def __init__(
        self,
        owner: RotatingChannel,
        kind: str,
        method: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
        registered: bool | None,
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._request_serializer = request_serializer
        self._response_deserializer = response_deserializer
        self._registered = registered

    def _underlying(self, slot: _Slot) -> Any:
        key = id(self)
        callable_ = slot.callables.get(key)
        if callable_ is None:
            factory = getattr(slot.channel, self._kind)
            callable_ = factory(
                self._method,
                request_serializer=self._request_serializer,
                response_deserializer=self._response_deserializer,
                _registered_method=self._registered,
            )
            slot.callables[key] = callable_
        return callable_

    def _blocking(self, attribute: str | None, argument: Any, kwargs: dict[str, Any]) -> Any:
        lease = self._owner._acquire()
        try:
            target = self._underlying(lease.slot)
            call = getattr(target, attribute) if attribute else target
            return call(argument, **kwargs)
        except grpc.RpcError as error:
            translated = self._owner._translate(error, lease.slot)
            if translated is error:
                raise
            raise translated from None
        finally:
            lease.release()

    def _future(self, argument: Any, kwargs: dict[str, Any]) -> Any:
        lease = self._owner._acquire()
        try:
            future = self._underlying(lease.slot).future(argument, **kwargs)
        except BaseException:
            lease.release()
            raise
        if not future.add_callback(lease.release):
            lease.release()
        return future

    def _streaming(self, argument: Any, kwargs: dict[str, Any]) -> _ResponseStream:
        lease = self._owner._acquire()
        try:
            call = self._underlying(lease.slot)(argument, **kwargs)
        except BaseException:
            lease.release()
            raise
        if not call.add_callback(lease.release):
            lease.release()
        return _ResponseStream(call, lambda error: self._owner._translate(error, lease.slot))


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):
    def __call__(self, request: Any, **kwargs: Any) -> Any:
        return self._blocking(None, request, kwargs)

    def with_call(self, request: Any, **kwargs: Any) -> Any:
        return self._blocking("with_call", request, kwargs)

    def future(self, request: Any, **kwargs: Any) -> Any:
        return self._future(request, kwargs)


class _StreamUnary(_MultiCallable, grpc.StreamUnaryMultiCallable):
    def __call__(self, request_iterator: Any, **kwargs: Any) -> Any:
        return self._blocking(None, request_iterator, kwargs)

    def with_call(self, request_iterator: Any, **kwargs: Any) -> Any:
        return self._blocking("with_call", request_iterator, kwargs)

    def future(self, request_iterator: Any, **kwargs: Any) -> Any:
        return self._future(request_iterator, kwargs)


class _UnaryStream(_MultiCallable, grpc.UnaryStreamMultiCallable):
    def __call__(self, request: Any, **kwargs: Any) -> Any:
        return self._streaming(request, kwargs)


class _StreamStream(_MultiCallable, grpc.StreamStreamMultiCallable):
    def __call__(self, request_iterator: Any, **kwargs: Any) -> Any:
        return self._streaming(request_iterator, kwargs)


class _ResponseStream:
    """The call object of a response-streaming RPC, with handshake rejections translated."""

    def __init__(self, call: Any, translate_error: Callable[[grpc.RpcError], grpc.RpcError]):
        self._call = call
        self._translate_error = translate_error

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            translated = self._translate_error(error)
            if translated is error:
                raise
            raise translated from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)
