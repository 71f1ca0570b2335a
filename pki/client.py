"""A small HTTPS client for step-ca's API (``/health``, ``/1.0/sign``, ``/1.0/renew``, ``/1.0/rekey``,
``/1.0/revoke``).

Standard library only (``http.client`` + ``ssl``) with the CA's root pinned: the system trust store is
never consulted. Every certificate chain the CA returns is verified against that root before use.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from strongroom import jsonparse
from strongroom.pki._duration import go_duration
from strongroom.pki._files import memory_file
from strongroom.pki._x509 import (
    cert_spki_der,
    csr_spki_der,
    load_chain,
    load_roots,
    verify_chain,
)
from strongroom.pki.errors import CaRejected, CaUnavailable, CertificateInvalid, InvalidPkiConfig
from strongroom.reasons import Reason
from strongroom.spiffe import identity_dns_name, is_workload_id

_log = logging.getLogger(__name__)

_MAX_RESPONSE = 1 << 20

#: RFC 5280 CRLReason codes step-ca's ``/1.0/revoke`` accepts (8, removeFromCRL, means nothing here).
REVOCATION_REASONS: dict[str, int] = {
    "unspecified": 0,
    "key-compromise": 1,
    "ca-compromise": 2,
    "affiliation-changed": 3,
    "superseded": 4,
    "cessation-of-operation": 5,
    "certificate-hold": 6,
    "privilege-withdrawn": 9,
    "aa-compromise": 10,
}


def check_ca_url(url: str) -> tuple[str, int]:
    """The host and port of a CA URL ``https://host[:port]``; :class:`InvalidPkiConfig` otherwise.

    The one check of a CA URL: ``pki init`` runs it before writing a CA (a URL no client accepts
    would make a CA every later command refuses), and a port out of range is this error too, not
    the ``ValueError`` that ``urlsplit(...).port`` raises.
    """
    problem = f"CA URL {url!r} must be https://host[:port]"
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError:
        raise InvalidPkiConfig(f"{problem} with a port in 1-65535") from None
    if parts.scheme != "https" or not parts.hostname or parts.path not in {"", "/"}:
        raise InvalidPkiConfig(problem)
    return parts.hostname, port


@dataclass(frozen=True)
class ClientCertificate:
    """The current key and chain, presented to the CA over mTLS for renewal."""

    key_pem: bytes
    chain_pem: bytes

    def __repr__(self) -> str:
        return "ClientCertificate(<redacted>)"


class _Connection(http.client.HTTPSConnection):
    """HTTPS to ``connect_to`` (when given) while the TLS host name, checked against the
    certificate, and the ``Host`` header stay the URL's."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        context: ssl.SSLContext,
        connect_to: tuple[str, int] | None,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls = context
        self._connect_to = connect_to

    def connect(self) -> None:
        if self._connect_to is None:
            super().connect()
            return
        raw = socket.create_connection(self._connect_to, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class CaClient:
    """Talks to one step-ca over TLS with ``root_pem`` pinned.

    ``root_pem`` holds one or more self-signed root CA certificates (more than one while a root is
    rotated); every one is trusted, for the CA's TLS and for the chains it returns.

    ``connect_to`` (host, port) connects there instead of to the URL's host, the certificate still
    verified against the root and the URL's host name: how the process that started step-ca
    probes it on its listen address, where the URL's name may not resolve.
    """

    def __init__(
        self,
        url: str,
        root_pem: bytes,
        *,
        timeout: float = 10.0,
        connect_to: tuple[str, int] | None = None,
    ) -> None:
        self.host, self.port = check_ca_url(url)
        self.url = url.rstrip("/")
        # Every certificate of the root file is a trust anchor, as for TLS and gRPC (root rotation).
        self.roots = load_roots(root_pem)
        self.root_pem = root_pem
        self.timeout = timeout
        self.connect_to = connect_to

    def __repr__(self) -> str:
        return f"CaClient({self.url!r})"

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.root_pem.decode())
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        client_cert: ClientCertificate | None = None,
    ) -> dict[str, Any]:
        context = self._context()
        if client_cert is not None:
            with memory_file(client_cert.chain_pem + client_cert.key_pem, "tls-client") as path_:
                context.load_cert_chain(path_)
        connection = _Connection(
            self.host, self.port, timeout=self.timeout, context=context, connect_to=self.connect_to
        )
        _log.debug("CA request %s %s%s", method, self.url, path)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read(_MAX_RESPONSE)
            status = response.status
        except ssl.SSLCertVerificationError as exc:
            raise CertificateInvalid(
                f"the CA at {self.url} presented a certificate that does not verify against the "
                f"pinned root: {exc.verify_message}",
                reason=Reason.CA_CERT_UNVERIFIED,
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise CaUnavailable(f"cannot reach the CA at {self.url}{path}: {exc}") from exc
        finally:
            connection.close()
        try:
            document = jsonparse.loads(raw) if raw else {}
        except ValueError:
            document = {}
        if not isinstance(document, dict):
            document = {}
        if status >= 500:
            raise CaUnavailable(
                f"the CA answered {method} {path} with HTTP {status}: {_ca_message(document, raw)}",
                reason=Reason.CA_ERROR,
            )
        if status >= 400:
            raise CaRejected(
                f"the CA refused {method} {path} (HTTP {status}): {_ca_message(document, raw)}"
            )
        return document

    def health(self) -> None:
        """Raises :class:`CaUnavailable` unless ``/health`` answers ``{"status": "ok"}``."""
        document = self._request("GET", "/health")
        if document.get("status") != "ok":
            raise CaUnavailable(f"the CA at {self.url} is not healthy: {document!r}")

    def sign(
        self, csr_pem: bytes, token: str, *, lifetime: timedelta | None = None
    ) -> list[x509.Certificate]:
        """Exchanges a one-time token and a CSR for a verified chain (leaf first)."""
        body: dict[str, Any] = {"csr": csr_pem.decode(), "ott": token}
        if lifetime is not None:
            body["notAfter"] = go_duration(lifetime)
        csr = x509.load_pem_x509_csr(csr_pem)
        try:
            document = self._request("POST", "/1.0/sign", body)
        except CaRejected as exc:
            outdated = _provisioner_without_derived_names(exc.message)
            if outdated is None:
                raise
            # step-ca reads ca.json only when it starts: after `pki upgrade` without a restart
            # (or a CA of the organisation's whose template was not replaced) it still runs the
            # earlier template, and its bare refusal named neither cause nor cure.
            raise CaRejected(
                f"{exc.message.rstrip('.')}. The CA's provisioner does not issue "
                f"{', '.join(outdated)}, the DNS name derived from the SPIFFE ID that workload "
                "certificates now carry: step-ca still runs a provisioner template made before "
                "them. Run `strongroom pki upgrade --dir CA` if not done and restart step-ca (it "
                "reads ca.json only when it starts; a CA of your own: replace the provisioner's "
                "template with `strongroom pki template`'s output), then give this workload a "
                "fresh token: the CA took this one (a Helm pod mints one when it restarts; "
                "README, upgrade item 19)",
                reason=Reason.PROVISIONER_OUTDATED,
            ) from exc
        return self._chain(document, csr_spki_der(csr))

    def renew(self, current: ClientCertificate) -> list[x509.Certificate]:
        """Renews the current certificate (same key, same lifetime) over mTLS."""
        leaf = load_chain(current.chain_pem)[0]
        return self._chain(
            self._request("POST", "/1.0/renew", {}, client_cert=current), cert_spki_der(leaf)
        )

    def rekey(self, current: ClientCertificate, csr_pem: bytes) -> list[x509.Certificate]:
        """Renews the current certificate onto the new key in ``csr_pem``, over mTLS."""
        csr = x509.load_pem_x509_csr(csr_pem)
        document = self._request(
            "POST", "/1.0/rekey", {"csr": csr_pem.decode()}, client_cert=current
        )
        return self._chain(document, csr_spki_der(csr))

    def revoke(
        self,
        serial: int,
        *,
        reason_code: int = REVOCATION_REASONS["unspecified"],
        comment: str = "",
        certificate: ClientCertificate | None = None,
        token: str | None = None,
    ) -> bool:
        """Revokes ``serial`` passively: step-ca will no longer renew or re-key it.

        step-ca 0.19 has no CRL or OCSP, so a revoked certificate keeps working for TLS until it
        expires; what stops is renewal. Authenticated either by the certificate itself over mTLS
        (``certificate``, whose leaf must carry ``serial``) or by a provisioner's one-time token
        (``token``, see :func:`~strongroom.pki.token.mint_revoke_token`). Returns True when revoked
        now, False when step-ca says it already was. Raises :class:`CaRejected` when refused and
        :class:`CaUnavailable` when the CA cannot be reached.
        """
        if (certificate is None) == (token is None):
            raise InvalidPkiConfig("revoke with exactly one of a certificate (mTLS) or a token")
        if reason_code not in REVOCATION_REASONS.values():
            raise InvalidPkiConfig(f"revocation reason code {reason_code} is not one step-ca takes")
        if certificate is not None and load_chain(certificate.chain_pem)[0].serial_number != serial:
            raise InvalidPkiConfig(
                f"over mTLS a certificate can revoke only itself, not serial 0x{serial:x}"
            )
        body: dict[str, Any] = {
            "serial": str(serial),  # step-ca compares the DECIMAL string
            "reasonCode": reason_code,
            "reason": comment,
            "passive": True,  # the only kind step-ca 0.19 implements
        }
        if token is not None:
            body["ott"] = token
        try:
            self._request("POST", "/1.0/revoke", body, client_cert=certificate)
        except CaRejected as exc:
            # step-ca answers 400 "certificate with serial number '<n>' is already revoked".
            if f"'{serial}' is already revoked" in exc.message:
                return False
            raise
        return True

    def _chain(self, document: dict[str, Any], expected_spki: bytes) -> list[x509.Certificate]:
        pems = document.get("certChain") or [document.get("crt"), document.get("ca")]
        if not isinstance(pems, list) or not all(isinstance(p, str) and p for p in pems):
            raise CaUnavailable(
                "the CA's answer has no certificate chain", reason=Reason.CA_BAD_ANSWER
            )
        chain = load_chain("".join(pems).encode())
        verify_chain(chain, self.roots)
        if cert_spki_der(chain[0]) != expected_spki:
            raise CertificateInvalid(
                "the CA returned a certificate for a different key", reason=Reason.KEY_MISMATCH
            )
        return chain


_TEMPLATE_REFUSAL = re.compile(r"this provisioner issues only (\[[^\]]*\]), not (\[[^\]]*\])")


def _provisioner_without_derived_names(message: str) -> list[str] | None:
    """The derived names (:func:`~strongroom.spiffe.identity_dns_name`) a workload template's
    refusal (``workload_template``'s "this provisioner issues only [...], not [...]") shows its
    provisioner lacking, when they are all that sets the token apart; else None."""
    found = _TEMPLATE_REFUSAL.search(message)
    if found is None:
        return None
    try:
        allowed, asked = (jsonparse.loads(part.encode()) for part in found.groups())
    except ValueError:
        return None
    if not isinstance(allowed, list) or not isinstance(asked, list):
        return None
    if not all(isinstance(name, str) for name in (*allowed, *asked)):
        return None
    derived = {identity_dns_name(name) for name in asked if is_workload_id(name)}
    missing = sorted(name for name in derived if name in asked and name not in allowed)
    if not missing or set(asked) - set(missing) != set(allowed):
        return None
    return missing


def _ca_message(document: dict[str, Any], raw: bytes) -> str:
    message = document.get("message")
    if isinstance(message, str) and message:
        return message
    return raw[:200].decode("utf-8", "replace").strip() or "(no message)"
