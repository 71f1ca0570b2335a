"""A real S3-compatible server for the tests: moto's standalone server, on loopback, in its own process.

Why moto's server: it is the most faithful S3 implementation installable here from a registry that
the suite can start in a second — it speaks the S3 REST API over HTTP (SigV4 and all), and it
enforces the conditional writes the store relies on (``If-None-Match: *`` on PutObject and
CompleteMultipartUpload, ``If-Match`` on PutObject and DeleteObject), multipart uploads with the
5 MiB part minimum and Content-MD5 checks, ranged GETs and ListObjectsV2 ordering. Ceph RGW
(Debian's ``radosgw``) would be more faithful still, but it needs a running Ceph cluster (monitors,
OSDs) that cannot be set up per test run on these machines; MinIO's server is not in the package
registries available here.

:class:`FaultProxy` sits between the store and the server and injects what a real network and a
real object store do: 5xx responses, slowness, connections dropped mid-request.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

_RUNNING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
ACCESS_KEY = "strongroom-test"
SECRET_KEY = "strongroom-test-secret"

# One session for every test client: a fresh session loads botocore's S3 model from disk again
# (0.1 to 0.2 s a client, dozens of clients a run). Clients carry their own credentials and
# configuration, so sharing the session shares nothing else; creating clients from one session
# is not thread-safe, hence the lock.
_SESSION = boto3.session.Session()
_SESSION_LOCK = threading.Lock()


class MotoServer:
    """``moto_server`` on 127.0.0.1 (a free port it picks itself); :meth:`stop` kills it."""

    def __init__(self, log_path: Path, *, auth: bool = False) -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("AWS_PROFILE", None)
        if auth:
            # Authenticate every request after the first few (which set up the IAM user).
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
        executable = Path(sys.executable).with_name("moto_server")
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [str(executable), "-H", "127.0.0.1", "-p", "0"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.port = self._wait_for_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = _RUNNING.search(self.log_path.read_bytes())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Kills the server (SIGKILL: a crash, not a shutdown) and waits for it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


def client(
    endpoint: str,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    read_timeout: float = 30,
    max_attempts: int = 2,
) -> Any:
    """A boto3 S3 client configured as the store configures its own (path style, SigV4)."""
    with _SESSION_LOCK:
        return _SESSION.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                connect_timeout=5,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=32,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def iam_client(endpoint: str, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
    """A boto3 IAM client on the same server (moto serves every API on one port)."""
    with _SESSION_LOCK:
        return _SESSION.client(
            "iam",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
        )


def new_bucket(s3: Any) -> str:
    """Creates a bucket with a fresh name and returns the name."""
    name = f"strongroom-{secrets.token_hex(6)}"
    s3.create_bucket(Bucket=name)
    return name


@dataclass
class Fault:
    """One injected behaviour for requests that ``match``; applies ``times`` times (None: always)."""

    match: Callable[[str, str], bool]
    """(method, path with query) → whether this fault applies."""
    status: int | None = None
    code: str | None = None
    """The S3 error code in the answer (default: by status, ServiceUnavailable or InternalError)."""
    message: str = "injected"
    """The S3 error message in the answer (AWS's name the resource: a KMS key's ARN, say)."""
    delay: float = 0.0
    drop: bool = False
    """Close the connection without answering (the server went away mid-request)."""
    after_upstream: bool = False
    """Send the request to the server first, then apply ``status`` or ``drop`` to its answer:
    the request took effect but its caller cannot know (an answer lost on the way back)."""
    times: int | None = None
    hits: int = 0


@dataclass
class FaultProxy:
    """An HTTP reverse proxy on 127.0.0.1 in front of an S3 server, injecting :class:`Fault`s."""

    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    ignored_headers: frozenset[str] = frozenset()
    """Request headers (lower case) not passed on: a server that does not implement them."""
    ignored_on: frozenset[str] = frozenset()
    """The methods whose ``ignored_headers`` are not passed on (empty: every method): a server
    that implements a header on some requests only (If-Match on PutObject, not DeleteObject)."""
    not_implemented: frozenset[tuple[str, str]] = frozenset()
    """(method, request header in lower case) answered 501 NotImplemented when the request
    carries that header: a server that refuses it outright (AWS's DeleteObject If-Match once)."""
    refused_headers: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    """(method, request header in lower case) → (status, code) answered when the request carries
    that header: a server that refuses a header it does not support with an error of its own
    (400 InvalidArgument, 403 AccessDenied) rather than 501."""
    conditional_deletes_required: bool = False
    """Answer 403 AccessDenied to a DeleteObject without ``If-Match``: a bucket policy that
    requires conditional deletes (AWS's ``s3:if-match`` condition key). An abort of a multipart
    upload (DELETE with ``uploadId``) is another action and passes."""
    chunked: bool = False
    """Answer every GET's body in the chunked transfer coding, without Content-Length (legitimate
    HTTP/1.1: a server or proxy that streams what it does not measure first)."""
    head_without_length: bool = False
    """Answer every HEAD without Content-Length (RFC 9110, 9.3.2 lets a server leave it out: the
    size of a body it would stream chunked is not known before it is sent)."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # The status line and headers go out in one write and the body in the next: with
                # Nagle's algorithm on, the body waited for the client's delayed ACK of the
                # headers (40 ms on Linux), on every answer with a body. Real servers answer at
                # once; the proxy's faults are what it adds, not this stall.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault(self.command, self.path)
                if any(
                    method == self.command and header in self.headers
                    for method, header in proxy.not_implemented
                ):
                    fault = Fault(lambda m, p: True, status=501, code="NotImplemented")
                for (method, header), (status, code) in proxy.refused_headers.items():
                    if method == self.command and header in self.headers:
                        fault = Fault(lambda m, p: True, status=status, code=code)
                if (
                    proxy.conditional_deletes_required
                    and self.command == "DELETE"
                    and "uploadId=" not in self.path
                    and "if-match" not in {k.lower() for k in self.headers}
                ):
                    fault = Fault(lambda m, p: True, status=403, code="AccessDenied")
                if fault is not None and fault.after_upstream:
                    proxy._forward(self.command, self.path, body, dict(self.headers.items()))
                if fault is not None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.drop:
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if fault.status is not None:
                        code = fault.code or (
                            "ServiceUnavailable" if fault.status == 503 else "InternalError"
                        )
                        payload = (
                            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
                            + code.encode()
                            + b"</Code><Message>"
                            + fault.message.encode()
                            + b"</Message></Error>"
                        )
                        self.send_response(fault.status)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        if self.command != "HEAD":
                            self.wfile.write(payload)
                        return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() != "connection"
                        and not (
                            k.lower() in proxy.ignored_headers
                            and (not proxy.ignored_on or self.command in proxy.ignored_on)
                        )
                    }
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                            self.send_header(key, value)
                    if proxy.chunked and self.command == "GET":
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for start in range(0, len(data), 1000):
                            piece = data[start : start + 1000]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    # A HEAD answer has no body: its Content-Length is the object's size.
                    size = response.getheader("Content-Length") if self.command == "HEAD" else None
                    if not (proxy.head_without_length and self.command == "HEAD"):
                        self.send_header("Content-Length", size or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # Every close's shutdown() waits for the loop's next look: 0.5 s apart by default.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def _forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        """Sends one request to the server and discards its answer."""
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() != "connection"}
            upstream.request(method, path, body=body, headers=sent)
            upstream.getresponse().read()
        finally:
            upstream.close()

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if (fault.times is None or fault.hits < fault.times) and fault.match(method, path):
                    fault.hits += 1
                    return fault
        return None

    def inject(self, fault: Fault) -> Fault:
        """Adds ``fault`` (first match wins) and returns it."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Removes every fault."""
        with self._lock:
            self.faults.clear()

    def close(self) -> None:
        """Stops the proxy."""
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def moto_server(log_dir: Path, *, auth: bool = False) -> Iterator[MotoServer]:
    """A running moto server for the duration of the ``with`` block."""
    server = MotoServer(log_dir / f"moto-{secrets.token_hex(4)}.log", auth=auth)
    try:
        yield server
    finally:
        server.stop()
