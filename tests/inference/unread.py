"""A client that sends unary gRPC calls over plain HTTP/2 and never takes their responses.

It never sends a ``WINDOW_UPDATE``: the server may send it 65,535 bytes over the whole connection
(HTTP/2's initial window) and no more, so every larger response stays in the server, its call
unfinished, until this client goes away (a gRPC client cannot be made to do this: its transport
reads a unary response whatever its application does). It reads the socket all the same, so that
the server's ``SETTINGS`` are acknowledged and a refusal's trailers (not flow-controlled) arrive:
:meth:`UnreadClient.ended` counts the calls that ended. Given a ``read_rate`` it takes what it is
sent after all, at that many bytes a second (a slow client's ``WINDOW_UPDATE``s); given ``tls``
(a client context with its certificate), it speaks HTTP/2 over TLS, as a certified client does.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _SETTINGS, _WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
_TURN = 0.02  # seconds the reader waits for bytes before it lets a writer have the socket


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _literal(name: str, value: str) -> bytes:
    # HPACK: a literal header field without indexing, new name, no Huffman coding (short strings).
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


class UnreadClient:
    """One HTTP/2 connection to ``address`` (host:port; plaintext unless ``tls``) calling
    ``path``."""

    def __init__(
        self,
        address: str,
        path: str,
        *,
        read_rate: float | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        host, port = address.rsplit(":", 1)
        self._address = address
        self._path = path
        self._read_rate = read_rate
        self._scheme = "https" if tls is not None else "http"
        self._socket = socket.create_connection((host, int(port)), timeout=30)
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
            self._socket = tls.wrap_socket(self._socket, server_hostname=host)
        # One thread at a time on the socket (a TLS connection's state is not thread-safe: a
        # send beside the reader's receive broke it now and then), the reader's turns short.
        self._socket.settimeout(_TURN)
        self._io = threading.Lock()
        self._closed = threading.Event()
        self._send(_PREFACE + _frame(_SETTINGS, 0, 0, b""))
        self._next_stream = 1
        self._lock = threading.Lock()
        self._ended: set[int] = set()
        self._reader = threading.Thread(target=self._read, name="unread-client", daemon=True)
        self._reader.start()

    def call(self, message: bytes) -> int:
        """Sends one call with ``message`` (a serialised request); its stream id."""
        with self._lock:
            stream = self._next_stream
            self._next_stream += 2
        headers = b"".join(
            _literal(name, value)
            for name, value in (
                (":method", "POST"),
                (":scheme", self._scheme),
                (":path", self._path),
                (":authority", self._address),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        body = b"\x00" + struct.pack(">I", len(message)) + message
        self._send(
            _frame(_HEADERS, _END_HEADERS, stream, headers)
            + _frame(_DATA, _END_STREAM, stream, body)
        )
        return stream

    def ended(self) -> int:
        """How many of its calls the server has ended (their trailers came)."""
        with self._lock:
            return len(self._ended)

    def close(self) -> None:
        """Goes away: the server cancels every call still open."""
        self._closed.set()
        self._reader.join(30)
        self._socket.close()

    def _send(self, data: bytes) -> None:
        with self._io:
            self._socket.sendall(data)

    def _receive(self) -> bytes:
        """The next bytes received; empty once the connection or this client closed."""
        while not self._closed.is_set():
            with self._io:
                try:
                    return self._socket.recv(1 << 16)
                except TimeoutError:
                    pass  # nothing yet: the writers' turn
        return b""

    def _read(self) -> None:
        buffer = b""
        try:
            while chunk := self._receive():
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags, stream = struct.unpack(">BBI", buffer[3:9])
                    buffer = buffer[9 + length :]
                    if kind == _SETTINGS and not flags & _ACK:
                        self._send(_frame(_SETTINGS, _ACK, 0, b""))
                    elif kind == _HEADERS and flags & _END_STREAM:
                        with self._lock:
                            self._ended.add(stream & 0x7FFFFFFF)
                    elif kind == _DATA and length and self._read_rate is not None:
                        time.sleep(length / self._read_rate)
                        increment = struct.pack(">I", length)
                        self._send(
                            _frame(_WINDOW_UPDATE, 0, 0, increment)
                            + _frame(_WINDOW_UPDATE, 0, stream, increment)
                        )
        except OSError:
            pass  # closed
