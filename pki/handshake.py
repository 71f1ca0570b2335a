"""Turning gRPC's opaque "Socket closed" into a clear "the server rejected our client certificate".

gRPC Python servers verify client certificates inside the TLS handshake (``require_client_auth``
is all-or-nothing: request-but-don't-verify is not exposed). With TLS 1.3 the client finishes its
side of the handshake before the server checks the client certificate, and gRPC's server then closes
the socket without an alert, so the client only sees ``UNAVAILABLE: ... Socket closed``. To tell
that apart from a dead server we probe: a TLS 1.3 handshake with the same certificate, ALPN ``h2``
and the HTTP/2 preface. A healthy gRPC server answers with a SETTINGS frame; a server that closes
the connection right after the handshake without a single byte has rejected our certificate.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509

from strongroom.pki._files import memory_file
from strongroom.pki._x509 import dns_sans, signing_capability
from strongroom.pki.errors import PeerUnauthenticated
from strongroom.reasons import Reason
from strongroom.spiffe import identity_dns_name

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
_HINTS = ("socket closed", "handshake", "ssl", "connection reset", "broken pipe")


class RaisedAsRpcError(grpc.RpcError):
    """Mixed into a domain error that a channel raises in place of an RPC's own error: it is also
    a ``grpc.RpcError`` whose ``code()`` is :attr:`status`, so generated-stub callers handle it
    like any RPC error. Nothing was received: no metadata."""

    status: grpc.StatusCode

    def code(self) -> grpc.StatusCode:
        """The status the error stands for."""
        return self.status

    def details(self) -> str:
        """The explanation (never key material)."""
        return str(self)

    def initial_metadata(self) -> tuple[Any, ...]:
        """None was received."""
        return ()

    def trailing_metadata(self) -> tuple[Any, ...]:
        """None was received."""
        return ()

    # A finished call's outcome too, as gRPC's own errors are: a channel wrapped again in
    # grpc.intercept_channel returns the RpcError its inner channel raised as the outcome, and
    # calls result() on it; without these that was an AttributeError in place of this error.
    def result(self, timeout: float | None = None) -> Any:
        """Raises this error: the call failed."""
        raise self

    def exception(self, timeout: float | None = None) -> BaseException:
        """This error."""
        return self

    def traceback(self, timeout: float | None = None) -> Any:
        """Where this error was raised."""
        return self.__traceback__

    def done(self) -> bool:
        """Done: failed."""
        return True

    def running(self) -> bool:
        """Not running."""
        return False

    def cancelled(self) -> bool:
        """Not cancelled: failed."""
        return False

    def cancel(self) -> bool:
        """Already ended."""
        return False

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Calls ``fn`` at once: the call is done."""
        fn(self)


class _RefusedBeforeTheCall(PeerUnauthenticated, RaisedAsRpcError):
    """A refusal the channel raises before any RPC."""

    status = grpc.StatusCode.UNAUTHENTICATED


class ClientCertificateRejected(_RefusedBeforeTheCall):
    """The server rejected our client certificate during the TLS handshake.

    Raised by :class:`~strongroom.pki.channel.RotatingChannel` in place of gRPC's UNAVAILABLE; it is
    both a :class:`~strongroom.errors.Unauthenticated` and a ``grpc.RpcError`` whose
    ``code()`` is UNAUTHENTICATED, so generated-stub callers handle it like any RPC error.
    """

    default_reason = Reason.CLIENT_CERTIFICATE_REJECTED


@dataclass(frozen=True)
class TlsPresentation:
    """What a client presents: its key and chain (None for no certificate) and whom it trusts."""

    root_pem: bytes
    key_pem: bytes | None = None
    chain_pem: bytes | None = None

    def __repr__(self) -> str:
        return "TlsPresentation(<redacted>)"


def client_context(presentation: TlsPresentation) -> ssl.SSLContext:
    """A TLS 1.2+ client context offering ALPN ``h2`` that trusts only ``presentation``'s root
    and presents its certificate (the key handed to OpenSSL through an in-memory file, never a
    file on disk); it checks the server's host name unless the caller turns that off."""
    context = ssl.create_default_context(cadata=presentation.root_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if presentation.key_pem is not None and presentation.chain_pem is not None:
        with memory_file(presentation.chain_pem + presentation.key_pem, "tls-client") as path:
            context.load_cert_chain(path)
    return context


# gRPC's resolvers (doc/naming.md) whose targets name no TCP host and port to connect to.
_NOT_TCP = frozenset({"unix", "unix-abstract", "vsock", "xds", "google-c2p"})
_SCHEMES = _NOT_TCP | {"dns", "ipv4", "ipv6"}
# What gRPC connects to when a dns:, ipv4: or ipv6: target names no port.
_DEFAULT_PORT = 443


def parse_target(target: str) -> tuple[str, int]:
    """The first of :func:`target_addresses`: host and port of a gRPC target."""
    return target_addresses(target)[0]


def target_addresses(target: str) -> list[tuple[str, int]]:
    """Hosts and ports of a gRPC target, in gRPC's order, read as gRPC reads it (its doc/naming.md):
    ``dns:[//authority/]host[:port]``, ``ipv4:address[:port][,...]``,
    ``ipv6:address[:port][,...]`` (brackets around an address given with a port) and a target
    of no known scheme, which gRPC takes as ``dns:///target``; each of several addresses (gRPC
    connects to the first that answers); port 443 when none is named, as gRPC's.

    Raises ``ValueError`` saying why for a target this process cannot connect to as gRPC would:
    one naming a DNS server (``dns://8.8.8.8/host:port``: gRPC asks that server, the system's
    resolver here might answer with another machine), a Unix socket, vsock or xDS one, a port
    that is not a number.

    The scheme is case-insensitive, a query or fragment is not part of the address, and the
    path's leading '/' is dropped (``IPV4:a:p``, ``dns:/host:port``, ``ipv4:///a:p``, as gRPC
    reads them: each was misread as an unresolvable host, its SPIFFE check found the server
    unreachable and every call went out unchecked). Every part after the scheme (and authority)
    is percent-decoded first, as gRPC's URI parser does (``ipv4:127.0.0%2E1:8443`` is 127.0.0.1, ``ipv6:[fe80::1%25eth0]:8443`` the zone
    ``eth0``): read undecoded, such a target's host did not resolve, so the SPIFFE check found
    the server unreachable and every call went out to it unchecked."""
    scheme, colon, rest = target.partition(":")
    scheme = scheme.lower()  # a URI's scheme is case-insensitive (RFC 3986), as in gRPC
    if not (colon and scheme in _SCHEMES):
        # No scheme gRPC knows: it reads the target as dns:///TARGET.
        scheme, rest = "dns", "///" + target
    if scheme in _NOT_TCP:
        raise ValueError(f"a {scheme}: target names no TCP host and port")
    # The URI's query and fragment are not its path (gRPC's parser drops them).
    rest = rest.partition("#")[0].partition("?")[0]
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if not slash:
            raise ValueError(
                f"a {scheme}:// target needs a '/' before its host ({scheme}:///host:port)"
            )
        if authority and scheme == "dns":
            raise ValueError(
                f"it names the DNS server {authority} to resolve its host with, which this "
                "client cannot ask (its own resolver could name another machine than gRPC "
                "connects to): write dns:///host:port"
            )
        if authority:
            raise ValueError(f"an {scheme}: target names no authority ({authority})")
    else:
        # gRPC's resolvers drop the path's leading '/' (dns:/host:port, ipv4:/address:port).
        rest = rest.removeprefix("/")
    rest = _percent_decoded(rest)  # the URI's path, as gRPC decodes it before reading it
    if scheme in ("ipv4", "ipv6"):
        return [
            # No brackets: the whole is the address (ipv6:::1), never address:port.
            (_checked_host(one), _DEFAULT_PORT)
            if scheme == "ipv6" and not one.startswith("[")
            else _split_host_port(one)
            for one in rest.split(",")
        ]
    return [_split_host_port(rest)]


def _percent_decoded(text: str) -> str:
    """``text`` with each ``%XX`` (two hex digits) decoded to its byte, as gRPC's URI parser
    does (any other ``%`` kept as it is); ValueError if the bytes are not UTF-8 or decode to a
    control character (``%00`` would end the host name in the resolver's C string)."""
    try:
        decoded = urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("its percent-encoded bytes are not UTF-8 text") from None
    if not decoded.isprintable():
        raise ValueError("it holds a control character")
    return decoded


def _split_host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (gRPC's SplitHostPort); an IPv6
    address without brackets is a host without a port."""
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{text!r} is not [address] or [address]:port")
        port = tail[1:] if tail else None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    if port is None:
        return _checked_host(host), _DEFAULT_PORT
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"its port {port!r} is not a number from 0 to 65535")
    return _checked_host(host), int(port)


def _checked_host(host: str) -> str:
    if not host:
        raise ValueError("it names no host")
    return host


def host_port(target: str) -> tuple[str, int] | None:
    """:func:`parse_target`'s host and port, None for a target it refuses."""
    try:
        return parse_target(target)
    except ValueError:
        return None


def _addresses(target: str) -> list[tuple[str, int]]:
    """:func:`target_addresses`, none for a target it refuses."""
    try:
        return target_addresses(target)
    except ValueError:
        return []


def looks_like_handshake_failure(error: grpc.RpcError) -> bool:
    """Cheap pre-filter: an UNAVAILABLE whose details could come from a closed TLS connection."""
    code = error.code() if hasattr(error, "code") else None
    if code != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (error.details() if hasattr(error, "details") else "") or ""
    return any(hint in details.lower() for hint in _HINTS)


def probe_rejection(
    target: str, presentation: TlsPresentation, *, server_name: str | None, timeout: float = 2.0
) -> bool:
    """True when the server completes TLS with this certificate but closes before speaking HTTP/2.

    ``timeout`` bounds the whole probe (connect, handshake, answer), not each step: a server
    holding each step held a call's explanation for three times it, past the call's deadline."""
    address = host_port(target)
    if address is None or timeout <= 0:
        return False
    host, port = address
    context = client_context(presentation)
    end = time.monotonic() + timeout
    try:
        with (
            _connect(host, port, end) as raw,
            context.wrap_socket(raw, server_hostname=server_name or host) as tls,
        ):
            tls.sendall(_H2_PREFACE)
            left = end - time.monotonic()
            if left <= 0:
                return False
            tls.settimeout(left)
            first = tls.recv(9)
    except ssl.SSLCertVerificationError:
        return False  # the SERVER's certificate failed our check: not a rejection of ours
    except ssl.SSLError as exc:
        # An explicit alert about our certificate (TLS 1.2 servers, other stacks).
        reason = (exc.reason or "").upper()
        return "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason)
    except OSError:
        return False
    return first == b""


def describe_rejection(target: str, leaf_pem: bytes | None, *, now: datetime | None = None) -> str:
    """The message of :class:`ClientCertificateRejected`, with what we can tell locally."""
    head = (
        f"the server at {target} rejected our client certificate during the TLS handshake "
        "(it closed the connection right after the handshake)"
    )
    if leaf_pem is None:
        return f"{head}: we presented no certificate and the server requires one"
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    moment = now or datetime.now(UTC)
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ", ".join(uris.get_values_for_type(x509.UniformResourceIdentifier)) or "no URI SAN"
    except x509.ExtensionNotFound:
        names = "no SAN"
    facts = f"our certificate ({names}, serial {leaf.serial_number:x})"
    if moment > leaf.not_valid_after_utc:
        finding = f"{facts} expired at {leaf.not_valid_after_utc.isoformat()}"
    elif moment < leaf.not_valid_before_utc:
        finding = f"{facts} is not valid before {leaf.not_valid_before_utc.isoformat()}"
    else:
        finding = (
            f"{facts} is time-valid here, so the server does not trust its issuer "
            "(a CA other than the server's) or the clocks disagree; the server's gRPC log says which"
        )
    return f"{head}: {finding}"


def translate(
    error: grpc.RpcError,
    target: str,
    presentation: TlsPresentation,
    *,
    server_name: str | None,
    timeout: float = 2.0,
) -> grpc.RpcError:
    """Returns a :class:`ClientCertificateRejected` when ``error`` is a handshake rejection of our
    certificate (confirmed by :func:`probe_rejection` within ``timeout`` seconds: what is left
    of the call's deadline), else ``error`` unchanged."""
    if not looks_like_handshake_failure(error):
        return error
    if not probe_rejection(target, presentation, server_name=server_name, timeout=timeout):
        return error
    return ClientCertificateRejected(describe_rejection(target, leaf_of(presentation.chain_pem)))


def leaf_of(chain_pem: bytes | None) -> bytes | None:
    """The first certificate (ours) of a PEM chain, None without one."""
    if chain_pem is None:
        return None
    return chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"


class ServerIdentityMismatch(_RefusedBeforeTheCall):
    """The server at a target is not the workload the client expected there.

    Raised by :class:`~strongroom.pki.channel.RotatingChannel` in place of gRPC's UNAVAILABLE when
    gRPC's handshake refused the server (its certificate lacks the name derived from the SPIFFE
    ID configured for that target) and :func:`diagnose_server` found another SPIFFE ID, a
    certificate not from our CA or a CA's; the call was never sent. Like :class:`ClientCertificateRejected` it is also a ``grpc.RpcError``
    whose ``code()`` is UNAUTHENTICATED.
    """

    default_reason = Reason.SERVER_IDENTITY_MISMATCH


class ServerIdentityNameMissing(_RefusedBeforeTheCall):
    """The server at a target presents the SPIFFE ID expected there, but its certificate lacks
    the DNS name derived from that ID (:func:`~strongroom.spiffe.identity_dns_name`), which a
    channel expecting the ID makes gRPC check: a certificate issued before workload certificates
    carried it. UNAUTHENTICATED, like :class:`ServerIdentityMismatch`; the message says what the
    operator must do.
    """

    default_reason = Reason.SERVER_IDENTITY_NAME_MISSING


class ServerCertificateOutsideValidity(_RefusedBeforeTheCall):
    """The server at a target presents the expected workload's certificate of our CA (its key
    held, checked by a handshake that skips only the dates), not valid at this machine's time:
    expired (``PEER_CERT_EXPIRED``) or not yet valid
    (``PEER_CERT_NOT_YET_VALID``). Its dates and this machine's time are in the message: one of
    the two clocks is off, or the server's certificate was not renewed. UNAUTHENTICATED, like
    :class:`ServerIdentityMismatch`, which it was reported as (a certificate "that does not chain
    to our CA", the wrong cause for a clock hours off).
    """

    default_reason = Reason.PEER_CERT_EXPIRED


#: What :func:`diagnose_server` explains a refusal with.
ServerExplanation = (
    ServerIdentityMismatch | ServerIdentityNameMissing | ServerCertificateOutsideValidity
)


def diagnose_server(
    target: str, presentation: TlsPresentation, expected: str, *, timeout: float
) -> ServerExplanation | None:
    """Why gRPC's own handshake with the server at ``target``, made by a channel expecting the
    SPIFFE ID ``expected``, may have failed, from one handshake of our own made after that
    failure (it only explains a refusal gRPC already made): :class:`ServerIdentityMismatch`
    naming both IDs (another workload, a certificate not from our CA, a CA's certificate, a
    server that does not speak TLS), :class:`ServerCertificateOutsideValidity` (a certificate of
    our CA outside its dates by this machine's clock), :class:`ServerIdentityNameMissing` (the
    expected ID, a certificate without its derived name), None when it cannot tell (unreachable
    now, or the expected server with the name)."""
    derived = identity_dns_name(expected)
    try:
        # SNI as gRPC's connection sends it (the derived name), so that a front end choosing
        # its certificate by name shows this handshake the one gRPC saw.
        cert, _ = _server_certificate(target, presentation, server_name=derived, timeout=timeout)
        if cert is None:
            return None
        require_server_id(target, workload_spiffe_ids(target, cert), expected)
    except ServerIdentityMismatch as refused:
        return refused
    except _RefusedForItsDates as refused:
        return _outside_validity(refused, presentation, expected)
    if derived in dns_sans(cert):
        return None
    return ServerIdentityNameMissing(
        f"the server at {target} presents {expected}, but its certificate (serial "
        f"{cert.serial_number:x}) lacks the DNS name {derived} derived from that ID, which "
        "clients expecting it check: it was issued before workload certificates carried that "
        "name. Update the CA (`strongroom pki upgrade --dir CA`, then restart step-ca) and give "
        "the server a fresh enrolment token, which replaces its certificate (README, upgrade "
        "item 19)"
    )


def names_missing_identity(error: grpc.RpcError, expected: str) -> bool:
    """Whether gRPC's ``error``, on a channel expecting ``expected`` (whose host-name check is of
    the name derived from it), says the server's certificate does not carry that name: gRPC's
    host-name check failed ("Hostname Verification Check failed"), or the name is cited."""
    details = str((error.details() if hasattr(error, "details") else "") or "")
    return "hostname verification" in details.lower() or identity_dns_name(expected) in details


def _server_certificate(
    target: str, presentation: TlsPresentation, *, server_name: str | None, timeout: float
) -> tuple[x509.Certificate | None, list[str]]:
    """The certificate the server at ``target`` presents to a handshake naming it as gRPC does
    (chain verified against our root, host name not checked: it explains a refusal gRPC made),
    and why each address tried before it could not be reached; None and every address's failure
    when none could."""
    context = client_context(presentation)
    context.check_hostname = False  # it names what was presented: gRPC's check decided
    failures: list[str] = []
    # ``timeout`` bounds the whole handshake, not each step: per address and per step (connect,
    # then handshake), a target of several addresses that accept TCP and never answer TLS held
    # it for twice the bound per address, past the call's deadline. (A handshake's socket
    # timeout is its total duration in CPython's ssl.)
    end = time.monotonic() + timeout
    # In gRPC's order, the first that answers: as gRPC's connection does, so that the server
    # named is the one gRPC most likely refused.
    for host, port in _addresses(target):
        left = end - time.monotonic()
        if left <= 0:
            failures.append(f"{_joined(host, port)}: not tried, the check's time ran out")
            continue
        try:
            with (
                _connect(host, port, end) as raw,
                # The name gRPC's connection sends (ssl_target_name_override, else the host), so
                # that a server choosing its certificate by name shows the one gRPC saw.
                context.wrap_socket(raw, server_hostname=server_name or host) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in _OUTSIDE_VALIDITY:
                where = _Where(target, host, port, server_name or host, end)
                raise _RefusedForItsDates(where, expired=exc.verify_code == _EXPIRED) from None
            raise ServerIdentityMismatch(
                f"the server at {target} presented a certificate that does not chain to our CA "
                f"({exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason in _NOT_TLS:
                # What answered our ClientHello was no TLS record: a plaintext port (a
                # service's health_listen, an HTTP server), which no retry turns into the
                # expected mTLS server. gRPC reports it as a transient handshake failure.
                raise ServerIdentityMismatch(
                    f"the server at {target} does not speak TLS ({exc.reason}): a plaintext "
                    "port answers there, such as a service's health port (health_listen), "
                    "not the mTLS port (listen) of the service expected"
                ) from None
            failures.append(f"{_joined(host, port)}: {exc or type(exc).__name__}")
            continue
        except OSError as exc:
            failures.append(f"{_joined(host, port)}: {exc or type(exc).__name__}")
            continue
        if der is not None:
            return x509.load_der_x509_certificate(der), failures
        failures.append(f"{_joined(host, port)}: no certificate presented")
    return None, failures or ["the target names no address"]


# OpenSSL's verify codes for a certificate outside its dates (X509_V_ERR_CERT_NOT_YET_VALID,
# X509_V_ERR_CERT_HAS_EXPIRED), and its reasons for an answer to a ClientHello that is not TLS.
_NOT_YET_VALID, _EXPIRED = 9, 10
_OUTSIDE_VALIDITY = (_NOT_YET_VALID, _EXPIRED)
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"})
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the chain is verified, its certificates' dates are not.
_NO_CHECK_TIME = 0x200000


@dataclass(frozen=True)
class _Where:
    """One address of a target, the name a handshake sends it, and when the check must end."""

    target: str
    host: str
    port: int
    server_name: str
    end: float


class _RefusedForItsDates(Exception):
    """The verified handshake with the server at ``where`` stopped at a certificate's dates.

    OpenSSL reports the first fault it finds, so this says nothing of whose certificate it is:
    a genuine certificate of our CA issued to another workload, expired, is refused for its
    dates before its name is ever looked at."""

    def __init__(self, where: _Where, *, expired: bool) -> None:
        super().__init__(where.target)
        self.where = where
        self.expired = expired


def _outside_validity(
    refused: _RefusedForItsDates, presentation: TlsPresentation, expected: str
) -> ServerExplanation:
    """The explanation of a server certificate OpenSSL refused for its dates, from a second
    handshake that checks everything but the dates (the chain to our root, and the server's
    proof that it holds the certificate's key): the workload it names must be ``expected``
    before one of the clocks is blamed; another workload's, or one that does not chain to our
    CA, is a :class:`ServerIdentityMismatch` (as is one that cannot be read again: who answered
    is then unknown, and the refusal stays one)."""
    where = refused.where
    now = datetime.now(UTC).isoformat(timespec="seconds")
    state = "has expired" if refused.expired else "is not valid yet"
    try:
        cert = _presented_but_for_dates(where, presentation)
    except ssl.SSLCertVerificationError as exc:
        return ServerIdentityMismatch(
            f"the server at {where.target} presented a certificate that does not chain to our "
            f"CA ({exc.verify_message})"
        )
    except (OSError, ValueError) as exc:
        cert, unread = None, str(exc) or type(exc).__name__
    else:
        unread = "no certificate presented"
    if cert is None:
        return ServerIdentityMismatch(
            f"the server at {where.target} presented a certificate that {state} by this "
            f"machine's clock, {now}, and a second handshake to read whose it is failed "
            f"({unread}): it is not known to be {expected}"
        )
    # Raises ServerIdentityMismatch for another workload's certificate, or a CA's.
    require_server_id(where.target, workload_spiffe_ids(where.target, cert), expected)
    dates = (
        f"valid from {cert.not_valid_before_utc.isoformat()} to "
        f"{cert.not_valid_after_utc.isoformat()}"
    )
    if cert.not_valid_before_utc <= datetime.now(UTC) <= cert.not_valid_after_utc:
        # Its own dates hold: a CA certificate of its chain is the one outside its dates.
        finding = f"a certificate of our CA ({dates}) whose chain holds a CA certificate that"
    else:
        finding = f"a certificate of our CA ({dates}) that"
    return ServerCertificateOutsideValidity(
        f"the server at {where.target} presents {expected} in {finding} {state} by this "
        f"machine's clock, {now}: this machine's clock or the server's is off (compare both "
        "with a time source), or the server's certificate was not renewed",
        reason=Reason.PEER_CERT_EXPIRED if refused.expired else Reason.PEER_CERT_NOT_YET_VALID,
    )


def _presented_but_for_dates(
    where: _Where, presentation: TlsPresentation
) -> x509.Certificate | None:
    """The certificate the server at ``where`` presents to a handshake that verifies it against
    our root as gRPC's does, but for the certificates' dates (host name not checked: the
    caller compares the SPIFFE ID). The handshake completes only if the server holds the
    certificate's key; ``ssl.SSLCertVerificationError`` when it does not chain to our CA."""
    context = client_context(presentation)
    context.check_hostname = False
    context.verify_flags |= _NO_CHECK_TIME
    with (
        _connect(where.host, where.port, where.end) as raw,
        context.wrap_socket(raw, server_hostname=where.server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return None if der is None else x509.load_der_x509_certificate(der)


def _connect(host: str, port: int, end: float) -> socket.socket:
    """A TCP connection to ``host``:``port`` (each of its addresses in the resolver's order, the
    first that connects) whose timeout is what is left before ``end`` (the monotonic time the
    check must be over by): the handshake gets what the connect left. ``create_connection`` on
    the name gave each of its addresses the whole timeout, so a name with an address that
    drops connections took the call's deadline there and went on to the next, past it."""
    error: OSError | None = None
    for address in _resolve(host, port, end):
        left = end - time.monotonic()
        if left <= 0:
            break
        try:
            sock = socket.create_connection((str(address[0]), int(address[1])), timeout=left)
        except OSError as exc:
            error = exc
            continue
        left = end - time.monotonic()
        if left <= 0:
            sock.close()
            break
        sock.settimeout(left)
        return sock
    if error is not None and end > time.monotonic():
        raise error
    raise TimeoutError("the check's time ran out") from error


def _resolve(host: str, port: int, end: float) -> list[tuple[str, int]]:
    """``host``'s addresses for ``port`` in the resolver's order, looked up before ``end`` (the
    monotonic time the check must be over by) or ``TimeoutError``. The system resolver has no
    deadline of its own: with the DNS servers down (gRPC's call failing at once, its name
    unresolved), a lookup made in line waited for the resolver's timeouts, many seconds past
    the call's deadline. It runs on a thread of its own that is left to end by itself."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # an address: nothing to look up
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [(str(a[0]), int(a[1])) for *_, a in found]
    answers: list[tuple[str, int]] = []
    failures: list[OSError] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answers.extend((str(a[0]), int(a[1])) for *_, a in found)
        except OSError as exc:
            failures.append(exc)
        finally:
            done.set()

    threading.Thread(target=look_up, name="pki-check-resolve", daemon=True).start()
    if not done.wait(max(0.0, end - time.monotonic())):
        raise TimeoutError(f"looking up {host} took longer than the check's time")
    if failures:
        raise failures[0]
    return answers


def _joined(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def workload_spiffe_ids(target: str, cert: x509.Certificate) -> list[str]:
    """The URI SANs of the certificate the server at ``target`` presented (chain already
    verified); raises :class:`ServerIdentityMismatch` when it is a CA's (CA:TRUE, keyCertSign or
    cRLSign)."""
    problem = signing_capability(cert)
    if problem is not None:
        # TLS takes a CA certificate as a server's leaf; no workload's certificate is one.
        raise ServerIdentityMismatch(
            f"the server at {target} presented a certificate that is no workload's: {problem}"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def require_server_id(target: str, presented: list[str], expected: str) -> None:
    """Raises :class:`ServerIdentityMismatch` naming both identities unless ``presented`` (the
    server's URI SANs) is exactly ``expected``."""
    if presented != [expected]:
        shown = ", ".join(presented) if presented else "no SPIFFE ID"
        raise ServerIdentityMismatch(
            f"the server at {target} is {shown}, but this client expects {expected} there "
            "(a misrouted address, or another workload answering on that port)"
        )
