"""Checking what an inference server is before sending it data.

:func:`verify_inference_server` asks the server for evidence bound to a fresh nonce of ours
(``InferenceAttestationService.GetEvidence``) and accepts it only if

1. the evidence verifies against the roots in ``trust``, judged with collateral (CRLs, TCB info,
   QE identity) from the caller's own source, never from the server;
2. its REPORT_DATA is exactly ``binding.client_report_data_for(nonce, key)`` where ``key`` is the
   public key of the certificate the server presented to *us* on the connection the evidence
   came over (:class:`ServerConnection`), so evidence fetched by someone else, or relayed from
   another machine, does not pass. It takes the connection, not a channel and a key: a key read
   over another connection (:func:`server_tls_public_key`) proves nothing about the channel;
3. when a release policy is given, the claims satisfy it for the SPIFFE ID the connection checked
   the server's certificate for (:attr:`ServerConnection.server_id`) — the same
   document the key broker releases the model's key under, so a client can hold the server to
   exactly the measurement, TCB and platform rules the model's owner set. As on a production
   broker, a policy allowing debug VMs or the simulated TEE is refused unless ``trust`` includes
   the simulated roots (development).

gRPC Python shows a client nothing of the server's certificate. :class:`ServerConnection` makes
the TLS connection itself, reads the key from it and carries a gRPC channel over that very
connection (through an abstract Unix socket only this process may use), so the evidence, and whatever the caller sends after
it, go over the connection whose key the evidence is checked against. A key read over a handshake
of its own (:func:`server_tls_public_key`) would only hold if the server presented the same
certificate on every connection: a machine in front of a genuine server that routes that one
handshake to it and answers the gRPC channel itself (with any certificate valid for the same
SPIFFE ID, relaying GetEvidence) would pass, which is why :func:`verify_inference_server` takes
the connection and not a channel and a key. A renewal of the server's certificate between the
connection and the evidence makes the two disagree: that is refused (``SERVER_TLS_KEY_CHANGED``),
and asking again on a new connection succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from strongroom.api.inference.v1 import attestation_pb2 as pb
from strongroom.api.inference.v1 import attestation_pb2_grpc as pb_grpc
from strongroom.attestation import (
    CollateralSource,
    Evidence,
    TrustStore,
    VerifiedClaims,
    verify_evidence,
)
from strongroom.attestation.binding import check_report_data, client_report_data_for
from strongroom.attestation.policy import PolicyDecision, ReleasePolicy
from strongroom.closing import Closing
from strongroom.errors import FailedPrecondition, InvalidArgument, Unavailable
from strongroom.pki.handshake import (
    ClientCertificateRejected,
    RaisedAsRpcError,
    ServerIdentityMismatch,
    TlsPresentation,
    client_context,
    describe_rejection,
    leaf_of,
    parse_target,
    require_server_id,
    workload_spiffe_ids,
)
from strongroom.reasons import Reason

if TYPE_CHECKING:
    from strongroom.pki.identity import WorkloadIdentity

log = logging.getLogger(__name__)

NONCE_BYTES = 32
# OpenSSL's reasons for a handshake with a server that does not offer TLS 1.3.
_OLDER_TLS = frozenset(
    {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"}
)


@dataclass(frozen=True)
class VerifiedServer:
    """What :func:`verify_inference_server` established about the server."""

    claims: VerifiedClaims
    #: The policy's decision (its version and the measurement it matched), or None without one.
    decision: PolicyDecision | None
    nonce: bytes
    #: SHA-256 of the DER SubjectPublicKeyInfo of the server's TLS certificate.
    tls_public_key_sha256: bytes


def server_tls_public_key(
    address: str,
    *,
    server_name: str,
    server_id: str,
    root_pem: bytes,
    chain_pem: bytes,
    key_pem: bytes,
    timeout: float = 10.0,
) -> bytes:
    """The DER SubjectPublicKeyInfo of the certificate the server at ``address`` presents on a
    connection of its own (see :class:`ServerConnection` for the checks and errors), which is
    then closed. It says nothing about any other connection to that address:
    :func:`verify_inference_server` takes a :class:`ServerConnection`, never this key."""
    with ServerConnection(
        address,
        server_name=server_name,
        server_id=server_id,
        root_pem=root_pem,
        chain_pem=chain_pem,
        key_pem=key_pem,
        timeout=timeout,
    ) as connection:
        return connection.tls_public_key_der


def _spki_of(address: str, der: bytes, server_id: str) -> bytes:
    certificate = x509.load_der_x509_certificate(der)
    # The policy is judged for ``server_id`` and the evidence is bound to this key: the two must
    # be one workload's. Host names are shared (every dev service is ``localhost``).
    require_server_id(address, workload_spiffe_ids(address, certificate), server_id)
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ConnectionEnded(Unavailable, RaisedAsRpcError):
    """A call on a :class:`ServerConnection` whose connection has ended (the server closed it or
    sent GOAWAY, or the network cut it): it never reconnects, a new connection would be an
    unchecked one. Also a ``grpc.RpcError`` whose ``code()`` is UNAVAILABLE, so generated-stub
    callers handle it like any RPC error: raised by a blocking call and by a response stream,
    returned by a future's ``exception()``."""

    default_reason = Reason.SERVER_CONNECTION_ENDED
    status = grpc.StatusCode.UNAVAILABLE


if TYPE_CHECKING:  # grpc-stubs makes the interceptor interfaces generic; at run time plain
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
    _Future = grpc.Future[Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor
    _Future = grpc.Future


class _SayWhenEnded(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Every call on the connection's channel, of every kind, in one place: once the connection
    has ended, a call fails :class:`ConnectionEnded` (naming the server and what to do) rather
    than gRPC's UNAVAILABLE naming its Unix socket. A call made after the end is not started
    (gRPC would only be refused by our socket, or wait for it with ``wait_for_ready``); one
    that fails UNAVAILABLE while or after the connection ends reads the same."""

    def __init__(
        self, ended: Callable[[], ConnectionEnded | None], closed: Callable[[], bool]
    ) -> None:
        self._ended = ended
        self._closed = closed

    def _call(self, continuation: Any, details: Any, request: Any) -> _Outcome:
        if self._closed():
            # Closed by its owner, not ended by the server: as gRPC's closed channels and
            # ServerConnection.channel say.
            raise ValueError("the connection is closed")
        error = self._ended()
        if error is not None:
            return _Outcome(_Refused(error), self._ended)
        return _Outcome(continuation(details, request), self._ended)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """A unary call (blocking, ``with_call`` or ``future``); see the class doc."""
        return self._call(continuation, details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """A response-streaming call; see the class doc."""
        return self._call(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """A request-streaming call (blocking, ``with_call`` or ``future``); see the class doc."""
        return self._call(continuation, details, requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        """A bidirectional call; see the class doc."""
        return self._call(continuation, details, requests)


class _Outcome(_Future):
    """What gRPC's interceptor machinery hands the caller for every kind of call (a blocking
    call's result or error, a future, a response stream), delegating to gRPC's own, with an
    UNAVAILABLE once the connection has ended read as :class:`ConnectionEnded`: raised by
    ``result()`` and by iteration, returned by ``exception()``, its message by ``details()``."""

    def __init__(self, call: Any, ended: Callable[[], ConnectionEnded | None]) -> None:
        self._call = call
        self._ended = ended

    def _instead(self, error: BaseException | None) -> ConnectionEnded | None:
        if isinstance(error, ConnectionEnded):
            return error
        if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE:
            return self._ended()
        return None

    def result(self, timeout: float | None = None) -> Any:
        """The response, or the call's error (:class:`ConnectionEnded` once it ended)."""
        try:
            return self._call.result(timeout)
        except grpc.RpcError as error:
            ended = self._instead(error)
            if ended is None:
                raise
            raise ended from None

    def exception(self, timeout: float | None = None) -> Exception | None:
        """The call's error, if any (:class:`ConnectionEnded` once it ended)."""
        error: Exception | None = self._call.exception(timeout)
        return self._instead(error) or error

    def __iter__(self) -> _Outcome:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            ended = self._instead(error)
            if ended is None:
                raise
            raise ended from None

    def code(self) -> grpc.StatusCode:
        """The call's status (UNAVAILABLE, as :class:`ConnectionEnded`'s, once it ended)."""
        code: grpc.StatusCode = self._call.code()
        return code

    def details(self) -> str | None:
        """The status message, :class:`ConnectionEnded`'s once it ended."""
        ended = self._ended() if self.code() == grpc.StatusCode.UNAVAILABLE else None
        return ended.details() if ended is not None else self._call.details()

    def cancel(self) -> bool:
        """Cancels the call."""
        return bool(self._call.cancel())

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return bool(self._call.cancelled())

    def running(self) -> bool:
        """Whether the call is still running."""
        return bool(self._call.running())

    def done(self) -> bool:
        """Whether the call has ended."""
        return bool(self._call.done())

    def traceback(self, timeout: float | None = None) -> Any:
        """The traceback of the call's error."""
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Calls ``fn`` with this outcome (so that it reads the error as the caller does)."""
        self._call.add_done_callback(lambda _: fn(self))

    def __getattr__(self, name: str) -> Any:
        # The rest of grpc.Call (metadata, is_active, time_remaining, add_callback).
        return getattr(self._call, name)


class _Refused(_Future):
    """A call not started because the connection had ended: it failed at once, with
    :class:`ConnectionEnded`."""

    def __init__(self, error: ConnectionEnded) -> None:
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        """Raises the error."""
        raise self._error

    def exception(self, timeout: float | None = None) -> Exception | None:
        """The error."""
        return self._error

    def __next__(self) -> Any:
        raise self._error

    def code(self) -> grpc.StatusCode:
        """UNAVAILABLE."""
        return self._error.code()

    def details(self) -> str:
        """The error's message."""
        return self._error.details()

    def initial_metadata(self) -> tuple[Any, ...]:
        """None was received."""
        return ()

    def trailing_metadata(self) -> tuple[Any, ...]:
        """None was received."""
        return ()

    def is_active(self) -> bool:
        """Never started."""
        return False

    def time_remaining(self) -> float | None:
        """No deadline runs."""
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Already ended: not registered (as gRPC's own ended calls answer)."""
        return False

    def cancel(self) -> bool:
        """Already ended."""
        return False

    def cancelled(self) -> bool:
        """Not cancelled: failed."""
        return False

    def running(self) -> bool:
        """Not running."""
        return False

    def done(self) -> bool:
        """Done."""
        return True

    def traceback(self, timeout: float | None = None) -> Any:
        """None: it was never raised."""
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Calls ``fn`` at once: the call is done."""
        fn(self)


class ServerConnection(Closing):
    """One mutual-TLS connection to the server at ``address`` (verified against ``root_pem`` for
    ``server_name``, its certificate carrying exactly ``server_id``), with a gRPC
    :attr:`channel` over that connection and :attr:`tls_public_key_der`, the key of the
    certificate it presented on it: what :func:`verify_inference_server` needs, from one
    connection. The channel never reconnects (a new connection would be an unchecked one):
    once the connection has ended, every call on it, of every kind (blocking, ``with_call``,
    ``future``, streaming either way), fails :class:`ConnectionEnded` (UNAVAILABLE,
    ``SERVER_CONNECTION_ENDED``, naming the server's SPIFFE ID and address); open a new
    ServerConnection.

    The connection is TLS 1.3 (as every mesh server requires; ``Unavailable(TLS_VERSION)``
    otherwise) with HTTP/2 agreed by ALPN ``h2`` (as gRPC's own channels require). The channel
    connects before the constructor returns: a server that ends the connection without a byte
    has rejected our certificate (:class:`~strongroom.pki.handshake.ClientCertificateRejected`,
    as the mesh's other clients say), one that does not answer HTTP/2 within ``timeout`` is
    ``Unavailable``.
    The client key goes to OpenSSL through an in-memory file, never on disk; gRPC reaches the
    connection through an abstract Unix socket with a random name, held until close (nothing on
    disk another process could replace), accepted once and only from this process (another
    process, of any user, is refused).
    Close it when done (a context manager). A constructor that fails, or is interrupted (a
    KeyboardInterrupt while it waits for the server), closes all it opened first: its thread,
    sockets and channel.
    """

    def __init__(
        self,
        address: str,
        *,
        server_name: str,
        server_id: str,
        root_pem: bytes,
        chain_pem: bytes,
        key_pem: bytes,
        timeout: float = 10.0,
    ) -> None:
        try:
            target = parse_target(address)
        except ValueError as exc:
            # A misread target (dns://8.8.8.8/host:port read as host "//8.8.8.8/host") failed
            # later as an unknown name, or reached another machine than gRPC would.
            raise InvalidArgument(
                f"cannot connect to {address}: {exc}", reason=Reason.SERVER_ADDRESS_INVALID
            ) from None
        context = client_context(TlsPresentation(root_pem, key_pem, chain_pem))
        # As every mesh server requires (and TLS 1.2's renegotiation could show another
        # certificate on this connection after its key was read): TLS 1.3 only.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # An abstract Unix socket: a name no process can take while we hold it bound (until
        # close), where a file in a private directory could be replaced by another process of
        # this user once the connection ended and gRPC reconnected to its path.
        self._socket_name = f"strongroom-connection-{secrets.token_hex(16)}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="strongroom-server-connection", daemon=True
        )
        self._upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._listener: asyncio.Server | None = None
        self._accepted = False
        self._writers: list[asyncio.StreamWriter] = []
        # Bytes the server sent on the connection, and set when that direction ends: a server
        # that ends it without one has rejected our certificate (TLS 1.3: after the handshake).
        self._from_server = 0
        self._server_ended = False
        self._client_ended = False
        self._settled = threading.Event()
        self._closed = False
        self._channel: grpc.Channel | None = None
        #: The SPIFFE ID the server's certificate carries (checked on this connection).
        self.server_id = server_id
        try:
            self._connect(
                address,
                target,
                context,
                server_name=server_name,
                chain_pem=chain_pem,
                timeout=timeout,
            )
        except BaseException:
            # Whatever ended the wait (a refusal, a KeyboardInterrupt, an error of our own), the
            # loop thread, the sockets and the channel go with it: nothing else would close them
            # before the process exits.
            self.close()
            raise

    def _connect(
        self,
        address: str,
        target: tuple[str, int],
        context: ssl.SSLContext,
        *,
        server_name: str,
        chain_pem: bytes,
        timeout: float,
    ) -> None:
        """Makes the TLS connection, checks it and connects the channel over it; raises the
        refusals the class doc names (the caller closes what was opened)."""
        self._thread.start()
        try:
            der, alpn = self._run(self._open(target, context, server_name), timeout=timeout)
            if alpn != "h2":
                # gRPC's own channels refuse it too: the server did not agree to speak HTTP/2
                # on this connection, so it is not a gRPC server's (or a protocol confusion).
                raise Unavailable(
                    f"the server at {address} did not agree to HTTP/2 (ALPN h2) on the TLS "
                    f"connection (it selected {alpn or 'no protocol'})",
                    reason=Reason.SERVER_UNREACHABLE,
                )
            self.tls_public_key_der = _spki_of(address, der, self.server_id)
        except ssl.SSLCertVerificationError as exc:
            raise ServerIdentityMismatch(
                f"the server at {address} presented a certificate we do not accept for "
                f"{server_name!r} ({exc.verify_message})"
            ) from None
        except TimeoutError:
            raise Unavailable(
                f"no TLS connection to {address} within {timeout:g} s",
                reason=Reason.SERVER_UNREACHABLE,
            ) from None
        except ssl.SSLError as exc:
            # A TLS 1.2 server's alert, or our own refusal of its ServerHello; not
            # WRONG_VERSION_NUMBER, which is an answer that is no TLS at all.
            if (exc.reason or "").upper() in _OLDER_TLS:
                raise Unavailable(
                    f"the server at {address} does not speak TLS 1.3, which the mesh requires "
                    f"({exc.reason})",
                    reason=Reason.TLS_VERSION,
                ) from None
            raise Unavailable(
                f"cannot connect to {address}: {exc}", reason=Reason.SERVER_UNREACHABLE
            ) from None
        except (OSError, ValueError) as exc:
            raise Unavailable(
                f"cannot connect to {address}: {exc}", reason=Reason.SERVER_UNREACHABLE
            ) from None
        self._channel = grpc.insecure_channel(
            f"unix-abstract:{self._socket_name}",
            # Its own connection, never shared with another channel to the same path.
            options=[("grpc.use_local_subchannel_pool", 1)],
        )
        self._public_channel = grpc.intercept_channel(
            self._channel, _SayWhenEnded(lambda: self._ended_error(address), lambda: self._closed)
        )
        self._await_http2(address, chain_pem, timeout)

    def _ended_error(self, address: str) -> ConnectionEnded | None:
        """:class:`ConnectionEnded` naming the server, once the connection has ended."""
        if self._closed:
            return ConnectionEnded(
                f"the connection to {self.server_id} at {address} was closed "
                "(ServerConnection.close()): open a new ServerConnection, and verify the server "
                "again"
            )
        if not (self._server_ended or self._client_ended):
            return None
        return ConnectionEnded(
            f"the connection to {self.server_id} at {address} has ended (the server closed it "
            "or sent GOAWAY, or the network cut it) and is never made again (it would be an "
            "unchecked one): open a new ServerConnection, and verify the server again"
        )

    def _await_http2(self, address: str, chain_pem: bytes, timeout: float) -> None:
        """Connects the channel now (gRPC would at the first call) and waits for the server's
        HTTP/2 answer: a refusal then names the server and its cause, not gRPC's Unix socket."""
        assert self._channel is not None
        # grpc.channel_ready_future would poll from a thread of gRPC's that raises (a traceback
        # on stderr) when the channel closes under it; the core channel's own request to
        # connect has no thread. Our pumps then say when the server answered, or ended.
        connect = getattr(
            getattr(self._channel, "_channel", None), "check_connectivity_state", None
        )
        if connect is None:  # pragma: no cover - another gRPC: it connects at the first call
            return
        connect(True)
        self._settled.wait(timeout)
        if self._from_server > 0:
            return
        if self._server_ended:
            raise ClientCertificateRejected(describe_rejection(address, leaf_of(chain_pem)))
        raise Unavailable(
            f"the server at {address} did not answer HTTP/2 on the TLS connection within "
            f"{timeout:g} s",
            reason=Reason.SERVER_UNREACHABLE,
        )

    @classmethod
    def of_identity(
        cls,
        identity: WorkloadIdentity,
        address: str,
        *,
        server_name: str,
        server_id: str,
        timeout: float = 10.0,
    ) -> Self:
        """A connection presenting ``identity``'s current certificate (chain and key from one
        snapshot, so a renewal in between cannot pair a new chain with an old key)."""
        credentials = identity.credentials
        return cls(
            address,
            server_name=server_name,
            server_id=server_id,
            root_pem=identity.root_pem,
            chain_pem=credentials.chain_pem,
            key_pem=credentials.key_pem,
            timeout=timeout,
        )

    @property
    def channel(self) -> grpc.Channel:
        """The gRPC channel over this connection."""
        if self._channel is None or self._closed:
            raise ValueError("the connection is closed")
        return self._public_channel

    def _run(self, coroutine: Any, *, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _open(
        self, target: tuple[str, int], context: ssl.SSLContext, server_name: str
    ) -> tuple[bytes, str | None]:
        """Connects; returns the server's certificate (DER) and the protocol ALPN selected."""
        host, port = target
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=server_name
        )
        self._upstream = (reader, writer)
        self._writers.append(writer)
        tls = writer.get_extra_info("ssl_object")
        der: bytes | None = tls.getpeercert(binary_form=True) if tls is not None else None
        if der is None:  # pragma: no cover - a verified handshake always has a peer certificate
            raise ValueError("the server presented no certificate")
        alpn: str | None = tls.selected_alpn_protocol()
        if alpn != "h2":
            return der, alpn  # refused by the caller, before gRPC could connect
        self._listener = await asyncio.start_unix_server(self._carry, path="\0" + self._socket_name)
        return der, alpn

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not _from_this_process(writer):
            # gRPC connects only at the first call: until then another process of this user
            # (which cannot read our memory, nor so the client key, under Yama) could take the
            # connection, authenticated as us. Refused, and the socket waits for gRPC's.
            writer.transport.abort()
            return
        if self._accepted or self._upstream is None:
            writer.transport.abort()  # one connection: a second would not be the checked one
            return
        # Only the accepted one is kept for close(): refused ones are aborted already, and
        # kept they would pile up for as long as another process keeps connecting.
        self._writers.append(writer)
        self._accepted = True
        # The listener stays bound until close(): the name stays ours, and a reconnect by gRPC
        # comes here, to be refused, and never to a socket of anyone else's.
        upstream_reader, upstream_writer = self._upstream
        # close() cancels the pumps: the end of this connection, not an error. Raised, asyncio
        # logs it (a traceback on stderr) as an unexpected exception of a connection task.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                _pump(reader, upstream_writer, self._sent),
                _pump(upstream_reader, writer, self._heard),
            )

    def _heard(self, size: int | None) -> None:
        if size is not None:
            self._from_server += size
            self._settled.set()
            return
        # Only when it ended first: gRPC ending its side ends this one too.
        self._server_ended = not self._client_ended
        self._settled.set()

    def _sent(self, size: int | None) -> None:
        if size is None:
            self._client_ended = not self._server_ended
            self._settled.set()

    def close(self) -> None:
        """Closes the channel and the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        # Alive, not "running": a close() right after the thread started (an interrupt) finds
        # the loop not yet running, and what is scheduled now runs once it is.
        if self._thread.is_alive():
            try:
                with contextlib.suppress(Exception):
                    self._run(self._shutdown(), timeout=5)
            finally:
                # Even when interrupted (a second Ctrl-C): the thread ends all the same.
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        # Aborted, not closed: a TLS close waits for the peer's close_notify, and nothing more
        # is to be said on this connection.
        for writer in self._writers:
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # lets the aborted transports' connection_lost run

    def __repr__(self) -> str:
        return f"ServerConnection(closed={self._closed})"


def _from_this_process(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of an accepted Unix connection is this process (its gRPC channel), by
    the kernel's record of who connected (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:  # pragma: no cover - an accepted Unix stream always has its socket
        return False
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return bool(pid == os.getpid())


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    heard: Callable[[int | None], None] | None = None,
) -> None:
    """Copies ``source`` to ``sink`` until either ends; ``heard`` is told each chunk's size
    and, at the end, None."""
    try:
        while data := await source.read(256 * 1024):
            if heard is not None:
                heard(len(data))
            sink.write(data)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        # Either side ending ends both: gRPC then sees the connection gone.
        sink.close()
        if heard is not None:
            heard(None)


def verify_inference_server(
    connection: ServerConnection,
    *,
    trust: TrustStore,
    collateral: CollateralSource,
    policy: ReleasePolicy | None = None,
    now: datetime | None = None,
    timeout: float = 30.0,
) -> VerifiedServer:
    """Fetches the server's evidence over ``connection``'s channel for a fresh nonce and verifies
    it against the key the server presented on that connection (see the module doc); send the
    data over the same ``connection.channel`` afterwards. With a ``policy``, the identity its
    ``callers`` must list is ``connection.server_id``; with a ``trust`` store that does not
    include the simulated roots (production), a policy that allows debug VMs or the simulated
    TEE, or was loaded with ``production=False``, is refused (``PolicyInvalid``, as a production
    key broker refuses it) before the server is asked.

    Raises the verifier's errors (``MalformedEvidence``, ``VerificationFailed``,
    ``CollateralUnavailable``; ``VerificationFailed(REPORT_DATA_MISMATCH)`` for evidence bound to
    another nonce or key, ``FailedPrecondition(SERVER_TLS_KEY_CHANGED)`` when the server's
    certificate changed since the handshake, ``PolicyViolation`` for claims the policy refuses,
    and ``grpc.RpcError`` from the call itself.
    """
    if not isinstance(connection, ServerConnection):
        # A channel with a key read elsewhere was accepted: nothing tied the two to one
        # connection, so a relay answering the channel passed (see the module doc).
        raise TypeError(
            "verify_inference_server needs the ServerConnection the evidence comes over (not a "
            "channel and a key read over another connection), got "
            f"{type(connection).__name__}"
        )
    channel = connection.channel
    tls_public_key_der = connection.tls_public_key_der
    if policy is None:
        # Any genuine confidential VM passes without one: a debuggable one (whose memory the host
        # reads), or one running software of anyone's choosing.
        log.warning(
            "inference server checked without a release policy: its TEE is genuine, but what it "
            "runs (measurement, debug, TCB) was NOT checked; pass the policy its model's key is "
            "released under",
            extra={"server_id": connection.server_id},
        )
    else:
        # What a production broker refuses to release a key under (a debuggable VM, whose memory
        # the host reads; the simulated TEE; a policy loaded in development mode, which may state
        # no TCB minimum) must not pass a production client's check either: "production" is a
        # trust store without the simulated roots. Before any call.
        policy.check_deployment(trust_domain=None, production=not trust.includes_simulated)
    nonce = secrets.token_bytes(NONCE_BYTES)
    response = pb_grpc.InferenceAttestationServiceStub(channel).GetEvidence(
        pb.GetEvidenceRequest(nonce=nonce), timeout=timeout
    )
    observed = hashlib.sha256(tls_public_key_der).digest()
    if not secrets.compare_digest(response.tls_public_key_sha256, observed):
        # Only a clearer message: the REPORT_DATA check below would refuse it too.
        raise FailedPrecondition(
            "the server's evidence is bound to a TLS key other than the one it presented to us "
            "(its certificate was renewed between the two connections, or the evidence is "
            "relayed): ask again",
            reason=Reason.SERVER_TLS_KEY_CHANGED,
        )
    claims = verify_evidence(
        Evidence.from_proto(response.evidence),
        trust=trust,
        now=now or datetime.now(UTC),
        collateral=collateral,
    )
    check_report_data(claims.report_data, client_report_data_for(nonce, tls_public_key_der))
    decision = None
    if policy is not None:
        decision = policy.evaluate(claims, connection.server_id)
    return VerifiedServer(claims, decision, nonce, observed)
