"""A client channel that follows certificate rotation without failing in-flight calls.

gRPC Python cannot swap a channel's client certificate in place (grpc#41779), so on rotation we build
a new ``grpc.secure_channel`` with the new certificate and route new calls to it, while the old one
stays open until its last in-flight call ends, then closes. Each channel gets its own subchannel pool
(``grpc.use_local_subchannel_pool``) so a new channel never reuses a connection made with the old
certificate.

:class:`RotatingChannel` is a ``grpc.Channel``: generated stubs and ``grpc.intercept_channel`` work on
it unchanged. A handshake rejection of our certificate surfaces as
:class:`~strongroom.pki.handshake.ClientCertificateRejected` (UNAUTHENTICATED) instead of gRPC's
opaque UNAVAILABLE, for blocking, ``.future()`` and streaming calls alike.

With ``server_id``, the channel accepts only the workload expected at the target: it sets
``grpc.ssl_target_name_override`` to the DNS name derived from that SPIFFE ID
(:func:`~strongroom.spiffe.identity_dns_name`), which only that workload's certificates carry, so
gRPC's own host-name check, on every connection gRPC makes (its chain checked against our root),
is the identity check: no call goes to another server, whenever and wherever gRPC connects. A
refusal is explained by one TLS handshake of the channel's own after it
(:func:`~strongroom.pki.handshake.diagnose_server`):
:class:`~strongroom.pki.handshake.ServerIdentityMismatch` (UNAUTHENTICATED, naming both IDs) or
:class:`~strongroom.pki.handshake.ServerIdentityNameMissing` (a certificate issued before the
derived name, saying what to do).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc

from strongroom.pki.handshake import (
    RaisedAsRpcError,
    ServerExplanation,
    ServerIdentityMismatch,
    TlsPresentation,
    diagnose_server,
    names_missing_identity,
    translate,
)
from strongroom.spiffe import identity_dns_name

ChannelOption = tuple[str, Any]

#: How long the handshake explaining a refused connection may take (bounded by the call's deadline).
_DIAGNOSIS_TIMEOUT = 2.0
#: The channel option naming the host name gRPC's handshake checks in the server's certificate.
_NAME_OVERRIDE = "grpc.ssl_target_name_override"


def _option_name(name: object) -> object:
    """A channel option's name as gRPC reads it: ``bytes`` (which gRPC Python accepts too) as
    text and up to a NUL, so that ``b"grpc.ssl_target_name_override"`` is that option."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    # gRPC's core reads the name as a C string: it ends at the first NUL.
    return name.partition("\0")[0] if isinstance(name, str) else name


# grpc-stubs makes the multi-callable interfaces generic; at run time they are plain classes.
if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable


class ChannelCredentials(Protocol):
    """One generation of a workload's TLS credentials, as a channel presents them."""

    @property
    def generation(self) -> int: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def chain_pem(self) -> bytes: ...


class CredentialSource(Protocol):
    """What a :class:`RotatingChannel` reads: the current credentials and the pinned root."""

    @property
    def credentials(self) -> ChannelCredentials: ...

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
        self.callables: dict[tuple[str, Any], Any] = {}
        #: The last explaining handshake of a ``wait_for_ready`` call (:class:`_Lookout`).
        self.look: _Look | None = None


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
        server_id: str | None = None,
        options: Sequence[ChannelOption] = (),
    ) -> None:
        if server_id is not None and any(
            _option_name(name) == _NAME_OVERRIDE for name, _ in options
        ):
            # gRPC's host-name check is the identity check: another name there would replace it.
            # gRPC takes an option's name as str or bytes, and the first of two equal names wins.
            raise ValueError(
                f"cannot check that the server at {target} is {server_id}: the channel option "
                f"{_NAME_OVERRIDE} would replace the name derived from that ID"
            )
        self._source = source
        self._target = target
        self._server_id = server_id
        # The name gRPC's own handshake checks in the server's certificate, on every connection
        # it makes: with a server_id, the name derived from that ID, which only that workload's
        # certificates carry (an explicit server_name, an operator-chosen name, cannot stand in).
        self._checked_name = identity_dns_name(server_id) if server_id is not None else server_name
        self._options = list(options)
        self._lock = threading.Lock()
        self._closed = False
        self._subscriptions: list[tuple[Callable[[grpc.ChannelConnectivity], None], bool]] = []
        self._lookout = _Lookout(self)
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
        # Ours first: of two options of one name, gRPC uses the first.
        options: list[ChannelOption] = [("grpc.use_local_subchannel_pool", 1)]
        if self._checked_name:
            options.append((_NAME_OVERRIDE, self._checked_name))
        options += self._options
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

    @property
    def server_id(self) -> str | None:
        """The SPIFFE ID the server must present (None: only gRPC's host-name check)."""
        return self._server_id

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
                _close_channel(retired, ())
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
            _close_channel(slot, ())

    def _watch(
        self, slot: _Slot, kwargs: dict[str, Any], deadline: float | None
    ) -> _ReadinessWatch | None:
        """A :class:`_ReadinessWatch` for a ``wait_for_ready`` call with a deadline on a channel
        expecting a server, while gRPC has no ready connection; else None."""
        if self._server_id is None or not kwargs.get("wait_for_ready") or deadline is None:
            return None
        if _ready(slot.channel):
            return None
        return self._lookout.watch(slot, deadline)

    def _translate(
        self,
        error: grpc.RpcError,
        slot: _Slot,
        deadline: float | None = None,
        watch: _ReadinessWatch | None = None,
    ) -> grpc.RpcError:
        """``error`` as the call's caller should see it; ``deadline`` (monotonic) is the call's,
        which bounds the handshake made to explain a refusal; ``watch`` a ``wait_for_ready``
        call's look at why gRPC had no connection."""
        if isinstance(error, RaisedAsRpcError):
            return error  # already the channel's own explanation
        if _answered_by_server(error):
            # The server's own status (its HSM down, a downstream's refusal in its message):
            # gRPC's handshake with it passed, there is no refusal of ours to explain.
            return error
        if watch is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            found = watch.explanation()
            if found is not None:
                # The call waited for the expected server, and what answered was not it.
                return type(found)(
                    f"no connection to {self._server_id} within the call's deadline: "
                    f"{found.message}",
                    reason=found.reason,
                )
            return error
        left = None if deadline is None else deadline - time.monotonic()
        if self._server_id is not None and error.code() == grpc.StatusCode.UNAVAILABLE:
            # gRPC's host-name check (the derived name) may have failed, or the server changed
            # under us: say which server answered, from one handshake after the failure (it
            # explains gRPC's refusal; it decides nothing).
            if left is None or left > 0:
                timeout = _DIAGNOSIS_TIMEOUT if left is None else min(_DIAGNOSIS_TIMEOUT, left)
                explained = diagnose_server(
                    self._target, slot.presentation, self._server_id, timeout=timeout
                )
                if explained is not None:
                    return explained
            if names_missing_identity(error, self._server_id):
                # gRPC refused the server's certificate for lacking the name: not the server
                # expected, though the diagnosis could not reach it to say which it is.
                return ServerIdentityMismatch(
                    f"the server at {self._target} is not {self._server_id}: its certificate "
                    f"does not carry the name derived from that ID ({_details(error)})"
                )
        # What the explanation above left of the call's deadline bounds the probe too: past
        # it, the call's own error, with no connection of ours.
        remaining = _DIAGNOSIS_TIMEOUT if deadline is None else deadline - time.monotonic()
        return translate(
            error,
            self._target,
            slot.presentation,
            server_name=self._checked_name,
            timeout=min(_DIAGNOSIS_TIMEOUT, remaining),
        )

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

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        """A unary-unary callable that runs each call on the current channel."""
        return _UnaryUnary(
            self, _MethodSpec(method, request_serializer, response_deserializer, _registered_method)
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        """A unary-stream callable that runs each call on the current channel."""
        return _UnaryStream(
            self, _MethodSpec(method, request_serializer, response_deserializer, _registered_method)
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        """A stream-unary callable that runs each call on the current channel."""
        return _StreamUnary(
            self, _MethodSpec(method, request_serializer, response_deserializer, _registered_method)
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        """A stream-stream callable that runs each call on the current channel."""
        return _StreamStream(
            self, _MethodSpec(method, request_serializer, response_deserializer, _registered_method)
        )

    def close(self) -> None:
        """Closes the current channel and every retired one (cancelling their calls; a slot that
        had connectivity callbacks is closed once gRPC's poller has stopped, see
        :func:`_close_channel`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots = [self._slot, *self._retired]
            self._retired.clear()
            for slot in slots:
                slot.closed = True
            subscribed = [callback for callback, _ in self._subscriptions]
        _close_channel(slots[0], subscribed, at_once=True)
        for slot in slots[1:]:
            _close_channel(slot, (), at_once=True)

    def __enter__(self) -> RotatingChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RotatingChannel({self._target!r}, generation={self._slot.generation})"


# gRPC's connectivity poller (one thread per channel with callbacks) wakes every 0.2 s; one that
# wakes to find callbacks and then meets the channel closed dies with "ValueError: Cannot monitor
# channel state: Channel closed!" (a traceback on standard error; a third of 300 channels closed
# within 3 ms of subscribing, in a loop here). Without callbacks it leaves its loop at its next
# wake, clearing the channel's ``polling`` flag as it does; the channel is closed after that, not
# after a fixed delay (a poller starved of the interpreter lock can wake later than any delay).
_POLL_EVERY = 0.05
# When grpc's private state cannot be read (a grpc release changed it): a few of the poller's wakes.
_FALLBACK_WAIT = 0.5
# A poller that never stops must not keep the channel open for ever.
_POLLER_GIVEN_UP_AFTER = 30.0


def _close_after_poller(channel: grpc.Channel) -> None:
    """Closes ``channel`` once its connectivity poller has left its loop (grpc's private
    ``_connectivity_state.polling``, read defensively), or after :data:`_POLLER_GIVEN_UP_AFTER`
    seconds."""
    state: Any = getattr(channel, "_connectivity_state", None)
    if not isinstance(getattr(state, "polling", None), bool):
        time.sleep(_FALLBACK_WAIT)
    else:
        deadline = time.monotonic() + _POLLER_GIVEN_UP_AFTER
        while state.polling and time.monotonic() < deadline:
            time.sleep(_POLL_EVERY)
    channel.close()


def _close_channel(
    slot: _Slot,
    callbacks: Iterable[Callable[[grpc.ChannelConnectivity], None]],
    *,
    at_once: bool = False,
) -> None:
    """Closes a slot's channel without racing gRPC's connectivity poller: a slot with callbacks
    loses them now and is closed, on a thread of its own, once the poller has stopped. Otherwise
    it is closed at once (``at_once``) or on a thread of its own (a retired slot's last call may
    end on one of the channel's own callback threads, which must not close it)."""
    watched = list(callbacks)
    for callback in watched:
        slot.channel.unsubscribe(callback)
    if watched:
        closer = threading.Thread(
            target=_close_after_poller, args=(slot.channel,), name="pki-channel-close", daemon=True
        )
        closer.start()
    elif at_once:
        slot.channel.close()
    else:
        threading.Thread(target=slot.channel.close, name="pki-channel-close", daemon=True).start()


class _Lookout:
    """A channel's looks at why gRPC has no connection, for its ``wait_for_ready`` calls: gRPC
    ends such a call ``DEADLINE_EXCEEDED``, "Deadline Exceeded", however its connection attempts
    failed (another workload at the address, a plaintext port, a certificate outside its
    dates), and once the deadline has passed there is no time left to explain it.

    One timer thread serves all the channel's waiting calls (started while any waits, gone when
    none does), and each slot has one handshake at a time: a call whose time comes while one
    runs, or after one started during its wait, shares it. A thread and a handshake per call
    made a client with many waiting calls (``.future()`` costs no thread of the caller's) run
    as many threads and make as many handshakes to whatever answered at the address."""

    def __init__(self, owner: RotatingChannel) -> None:
        self._owner = owner
        self._wakeup = threading.Condition()
        self._due: list[tuple[float, int, _ReadinessWatch]] = []
        self._order = itertools.count()
        self._live = 0
        self._timer: threading.Thread | None = None

    def watch(self, slot: _Slot, deadline: float) -> _ReadinessWatch:
        """A watch for a call ending at ``deadline`` (monotonic) on ``slot``; its look is made
        shortly before it: the explaining handshake's time comes off the end of the wait, at
        most what an explanation of a refused call gets, at most half the call's time."""
        now = time.monotonic()
        left = deadline - now
        due = now + max(0.0, left - min(_DIAGNOSIS_TIMEOUT, left / 2))
        watch = _ReadinessWatch(self, slot, deadline)
        with self._wakeup:
            heapq.heappush(self._due, (due, next(self._order), watch))
            self._live += 1
            if self._timer is None:
                self._timer = threading.Thread(
                    target=self._run, name="pki-channel-watch", daemon=True
                )
                self._timer.start()
            else:
                self._wakeup.notify()
        return watch

    def ended(self) -> None:
        """One watch is over (its call ended): the timer leaves once none waits."""
        with self._wakeup:
            self._live -= 1
            self._wakeup.notify()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if self._live == 0:
                    self._due.clear()
                while self._due and self._due[0][2].over:
                    heapq.heappop(self._due)
                if not self._due:
                    self._timer = None
                    return
                due, _, watch = self._due[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._wakeup.wait(wait)
                    continue
                heapq.heappop(self._due)
            watch.fire()

    def look(self, slot: _Slot, since: float, deadline: float) -> _Look:
        """The slot's handshake running now, or the last one if it started after ``since``
        (the waiting call's start), else a new one ending by ``deadline``."""
        with self._wakeup:
            current = slot.look
            if current is not None and (not current.done.is_set() or current.started >= since):
                return current
            slot.look = _Look(self._owner, slot, deadline)
            return slot.look


class _Look:
    """One explaining handshake with the server at a slot's target, on a thread of its own."""

    def __init__(self, owner: RotatingChannel, slot: _Slot, deadline: float) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.found: ServerExplanation | None = None
        self._owner = owner
        self._slot = slot
        self._deadline = deadline
        threading.Thread(target=self._run, name="pki-channel-look", daemon=True).start()

    def _run(self) -> None:
        try:
            left = self._deadline - time.monotonic()
            server_id = self._owner.server_id
            if left > 0 and server_id is not None:
                self.found = diagnose_server(
                    self._owner.target, self._slot.presentation, server_id, timeout=left
                )
        finally:
            self.done.set()


class _ReadinessWatch:
    """A ``wait_for_ready`` call's look at why gRPC has no connection (:class:`_Lookout`).
    Made only while gRPC has no ready connection; the handshake runs only if it still has none
    when the call's time comes, and ends with the call's deadline."""

    def __init__(self, lookout: _Lookout, slot: _Slot, deadline: float) -> None:
        self._lookout = lookout
        self._slot = slot
        self._deadline = deadline
        self._began = time.monotonic()
        self._lock = threading.Lock()
        self._look: _Look | None = None
        self.over = False

    def fire(self) -> None:
        """The call's time to look has come (on the lookout's timer thread)."""
        with self._lock:
            if self.over or _ready(self._slot.channel):
                return
            self._look = self._lookout.look(self._slot, self._began, self._deadline)

    def end(self) -> None:
        """The call is over: no look is started for it from now on."""
        with self._lock:
            if self.over:
                return
            self.over = True
        self._lookout.ended()

    def explanation(self) -> ServerExplanation | None:
        """What the look found (None: nothing to say), once it is over; it ends with the call's
        deadline, which has passed when this is asked."""
        self.end()
        look = self._look
        if look is None:
            return None
        look.done.wait(max(0.0, self._deadline - time.monotonic()) + _JOIN_SLACK)
        return look.found if look.done.is_set() else None


#: How long past its deadline a look is waited for (it ends by the deadline; thread scheduling).
_JOIN_SLACK = 0.1


def _ready(channel: grpc.Channel) -> bool:
    """Whether gRPC holds a ready connection on ``channel`` (gRPC's private core channel, read
    defensively: unreadable reads as not ready, which costs at most one handshake)."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return False
    try:
        return bool(check(False) == _CORE_READY)
    except Exception:  # a gRPC release that changed its private API: not known to be ready
        return False


#: gRPC core's READY connectivity state (grpc_connectivity_state).
_CORE_READY = 2


@dataclass(frozen=True)
class _MethodSpec:
    """What a stub asked the channel for: method name, (de)serialisers, registration flag."""

    method: str
    request_serializer: Callable[[Any], bytes] | None
    response_deserializer: Callable[[bytes], Any] | None
    registered: bool | None


class _MultiCallable:
    """Shared plumbing: resolves the underlying multi-callable for a slot, once per slot."""

    _kind = ""  # the grpc.Channel factory method name, set by each subclass

    def __init__(self, owner: RotatingChannel, spec: _MethodSpec) -> None:
        self._owner = owner
        self._spec = spec

    def _underlying(self, slot: _Slot) -> Any:
        # Keyed by what was asked for, not by id(self): a multi-callable may be garbage-collected
        # and its id reused by another one of a different kind or method.
        key = (self._kind, self._spec)
        callable_ = slot.callables.get(key)
        if callable_ is None:
            factory = getattr(slot.channel, self._kind)
            callable_ = factory(
                self._spec.method,
                request_serializer=self._spec.request_serializer,
                response_deserializer=self._spec.response_deserializer,
                _registered_method=self._spec.registered,
            )
            slot.callables[key] = callable_
        return callable_

    def _blocking(self, attribute: str | None, argument: Any, kwargs: dict[str, Any]) -> Any:
        deadline = _deadline(kwargs["timeout"])
        lease = self._owner._acquire()
        watch = None
        try:
            target = self._underlying(lease.slot)
            call = getattr(target, attribute) if attribute else target
            watch = self._owner._watch(lease.slot, kwargs, deadline)
            return call(argument, **kwargs)
        except grpc.RpcError as error:
            translated = self._owner._translate(error, lease.slot, deadline, watch)
            if translated is error:
                raise
            raise translated from None
        finally:
            if watch is not None:
                watch.end()
            lease.release()

    def _future(self, argument: Any, kwargs: dict[str, Any]) -> grpc.CallFuture[Any]:
        deadline = _deadline(kwargs["timeout"])
        lease = self._owner._acquire()
        try:
            watch = self._owner._watch(lease.slot, kwargs, deadline)
            future: grpc.CallFuture[Any] = self._underlying(lease.slot).future(argument, **kwargs)
        except BaseException:
            lease.release()
            raise
        _end_with(future, lease, watch)
        # Its failure reads as a blocking call's does (a handshake rejection named, not UNAVAILABLE).
        translated = _TranslatedFuture(
            future,
            _Once(lambda error: self._owner._translate(error, lease.slot, deadline, watch)),
        )
        return cast("grpc.CallFuture[Any]", translated)

    def _streaming(self, argument: Any, kwargs: dict[str, Any]) -> grpc.CallIterator[Any]:
        deadline = _deadline(kwargs["timeout"])
        lease = self._owner._acquire()
        try:
            watch = self._owner._watch(lease.slot, kwargs, deadline)
            call = self._underlying(lease.slot)(argument, **kwargs)
        except BaseException:
            lease.release()
            raise
        _end_with(call, lease, watch)
        stream = _ResponseStream(
            call, _Once(lambda error: self._owner._translate(error, lease.slot, deadline, watch))
        )
        # Duck-typed: iterates like the call and delegates every Call method to it.
        return cast("grpc.CallIterator[Any]", stream)


def _end_with(call: Any, lease: _Lease, watch: _ReadinessWatch | None) -> None:
    """Releases ``lease`` and ends ``watch`` when ``call`` completes (at once if it has)."""

    def ended() -> None:
        lease.release()
        if watch is not None:
            watch.end()

    if not call.add_callback(ended):
        ended()


def _options(
    timeout: float | None,
    metadata: grpc.Metadata | None,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
) -> dict[str, Any]:
    return {
        "timeout": timeout,
        "metadata": metadata,
        "credentials": credentials,
        "wait_for_ready": wait_for_ready,
        "compression": compression,
    }


class _UnaryUnary(_MultiCallable, _UnaryUnaryBase):
    _kind = "unary_unary"

    def __call__(  # noqa: PLR0917 - gRPC's own signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._blocking(None, request, options)

    def with_call(  # noqa: PLR0917 - gRPC's own signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        result: tuple[Any, grpc.Call] = self._blocking("with_call", request, options)
        return result

    def future(  # noqa: PLR0917 - gRPC's own signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.CallFuture[Any]:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._future(request, options)


class _StreamUnary(_MultiCallable, _StreamUnaryBase):
    _kind = "stream_unary"

    def __call__(  # noqa: PLR0917 - gRPC's own signature
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._blocking(None, request_iterator, options)

    def with_call(  # noqa: PLR0917 - gRPC's own signature
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        result: tuple[Any, grpc.Call] = self._blocking("with_call", request_iterator, options)
        return result

    def future(  # noqa: PLR0917 - gRPC's own signature
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.CallFuture[Any]:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._future(request_iterator, options)


class _UnaryStream(_MultiCallable, _UnaryStreamBase):
    _kind = "unary_stream"

    def __call__(  # noqa: PLR0917 - gRPC's own signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.CallIterator[Any]:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._streaming(request, options)


class _StreamStream(_MultiCallable, _StreamStreamBase):
    _kind = "stream_stream"

    def __call__(  # noqa: PLR0917 - gRPC's own signature
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: grpc.Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.CallIterator[Any]:
        options = _options(timeout, metadata, credentials, wait_for_ready, compression)
        return self._streaming(request_iterator, options)


def _answered_by_server(error: grpc.RpcError) -> bool:
    """Whether ``error`` came with metadata from the server (a Strongroom service's refusal
    carries its ``strongroom-reason`` trailer): a connection gRPC could not make, or refused,
    has none."""
    received: list[object] = []
    for name in ("initial_metadata", "trailing_metadata"):
        read = getattr(error, name, None)
        with contextlib.suppress(Exception):  # an error object without metadata: none received
            received.append(read() if callable(read) else None)
    return any(received)


def _details(error: grpc.RpcError) -> str:
    """gRPC's description of a failed call (empty when it has none)."""
    return str((error.details() if hasattr(error, "details") else "") or "")


def _deadline(timeout: float | None) -> float | None:
    """The monotonic time a call of ``timeout`` seconds ends at (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


class _Once:
    """A call's error translation, made once: a failure read again (``exception()`` then
    ``result()``, ``next()`` after the stream ended) is the same error object, and gets the
    same explanation, with no second handshake to explain it (which might name another
    server). Concurrent reads wait for the one explanation."""

    def __init__(self, translate: Callable[[grpc.RpcError], grpc.RpcError]) -> None:
        self._translate = translate
        self._lock = threading.Lock()
        self._done: tuple[grpc.RpcError, grpc.RpcError] | None = None

    def __call__(self, error: grpc.RpcError) -> grpc.RpcError:
        with self._lock:
            if self._done is None or self._done[0] is not error:
                self._done = (error, self._translate(error))
            return self._done[1]


class _TranslatedFuture(grpc.Future):  # type: ignore[type-arg]
    """A unary call's future whose failure is translated as a blocking call's is; every other
    Call method is the call's own. A ``grpc.Future`` itself, so tracing still ends its span when
    the call completes rather than at once."""

    def __init__(self, future: Any, translate_error: Callable[[grpc.RpcError], grpc.RpcError]):
        self._future = future
        self._translate_error = translate_error

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._future.result(timeout)
        except grpc.RpcError as error:
            translated = self._translate_error(error)
            if translated is error:
                raise
            raise translated from None

    def exception(self, timeout: float | None = None) -> Exception | None:
        # grpc's own futures take a timeout here too; its stubs leave it out.
        error: Exception | None = self._future.exception(timeout)
        return self._translate_error(error) if isinstance(error, grpc.RpcError) else error

    def cancel(self) -> bool:
        return bool(self._future.cancel())

    def cancelled(self) -> bool:
        return bool(self._future.cancelled())

    def running(self) -> bool:
        return bool(self._future.running())

    def done(self) -> bool:
        return bool(self._future.done())

    def traceback(self, timeout: float | None = None) -> Any:
        return self._future.traceback(timeout)

    def add_done_callback(self, fn: Callable[[grpc.Future[Any]], None]) -> None:
        # The callback sees this future, so that its result() and exception() are translated.
        self._future.add_done_callback(lambda _: fn(self))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future, name)


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
