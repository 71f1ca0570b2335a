"""A loopback HTTP server that answers like AMD KDS and Intel PCS v4 / PCCS.

It serves whatever documents a test puts in :attr:`FakeCollateralServer.docs` under the exact URL
paths and issuer-chain headers of the real services, and can be told to fail (``status``), to be
slow (``delay``), to hold its answers until released (``hold``) or to send another chain. It
records every path it was asked for.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Doc:
    """One response: body and headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def chain_header(pem: bytes) -> str:
    """PEM as PCS sends it in an issuer-chain header (URL-encoded)."""
    return urllib.parse.quote(pem.decode())


class FakeCollateralServer:
    """KDS + PCS on 127.0.0.1; ``docs`` maps a path with query to a :class:`Doc`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """``tls``, if given, is the server side's context: the server speaks HTTPS."""
        self.docs: dict[str, Doc] = {}
        self.requests: list[str] = []
        self.status: int | None = None  # answer every request with this status
        self.delay = 0.0
        # While set, each request waits for this event (at most 30 s) before it is answered;
        # ``arrived`` is released once per request held, so a test knows a fetch is in flight.
        self.hold: threading.Event | None = None
        self.arrived = threading.Semaphore(0)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if server.delay:
                    time.sleep(server.delay)
                hold = server.hold
                if hold is not None:
                    server.arrived.release()
                    hold.wait(30)
                if server.status is not None:
                    self.send_response(server.status)
                    self.end_headers()
                    return
                doc = server.docs.get(self.path)
                if doc is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                for name, value in doc.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(doc.body)))
                self.end_headers()
                self.wfile.write(doc.body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._scheme = "http"
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
            self._scheme = "https"
        # Every close's shutdown() waits for the loop's next look: 0.5 s apart by default.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (``https`` with TLS)."""
        return f"{self._scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        """Stops serving."""
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- the real services' layouts -----------------------------------------------------------

    def tcb_info(self, fmspc: str, body: bytes, chain: bytes) -> None:
        """PCS v4 ``/tdx/certification/v4/tcb?fmspc=`` with ``TCB-Info-Issuer-Chain``."""
        self.docs[f"/tdx/certification/v4/tcb?fmspc={fmspc.upper()}"] = Doc(
            body, {"TCB-Info-Issuer-Chain": chain_header(chain), "Content-Type": "application/json"}
        )

    def qe_identity(self, body: bytes, chain: bytes) -> None:
        """PCS v4 ``/tdx/certification/v4/qe/identity`` with its issuer-chain header."""
        self.docs["/tdx/certification/v4/qe/identity"] = Doc(
            body, {"SGX-Enclave-Identity-Issuer-Chain": chain_header(chain)}
        )

    def pck_crl(self, ca: str, body: bytes, chain: bytes) -> None:
        """PCS v4 ``/sgx/certification/v4/pckcrl?ca=<ca>&encoding=der``."""
        self.docs[f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der"] = Doc(
            body, {"SGX-PCK-CRL-Issuer-Chain": chain_header(chain)}
        )

    def root_ca_crl(self, body: bytes) -> None:
        """PCCS ``/sgx/certification/v4/rootcacrl``."""
        self.docs["/sgx/certification/v4/rootcacrl"] = Doc(body)

    def amd_crl(self, product: str, body: bytes, scope: str = "vcek") -> None:
        """KDS ``/<scope>/v1/<product>/crl``."""
        self.docs[f"/{scope}/v1/{product}/crl"] = Doc(
            body, {"Content-Type": "application/pkix-crl"}
        )

    def amd_cert_chain(self, product: str, pem: bytes, scope: str = "vcek") -> None:
        """KDS ``/<scope>/v1/<product>/cert_chain``."""
        self.docs[f"/{scope}/v1/{product}/cert_chain"] = Doc(pem)

    def vcek(self, product: str, hwid: bytes, tcb: dict[str, int], der: bytes) -> None:
        """KDS ``/vcek/v1/<product>/<hwid>?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..``."""
        query = (
            f"blSPL={tcb['bootloader']:02d}&teeSPL={tcb['tee']:02d}&snpSPL={tcb['snp']:02d}"
            f"&ucodeSPL={tcb['microcode']:02d}"
        )
        if "fmc" in tcb:
            query += f"&fmcSPL={tcb['fmc']:02d}"
        self.docs[f"/vcek/v1/{product}/{hwid.hex()}?{query}"] = Doc(der)


def serve() -> Iterator[FakeCollateralServer]:
    """A fixture body: a server for the test's duration."""
    server = FakeCollateralServer()
    try:
        yield server
    finally:
        server.close()
