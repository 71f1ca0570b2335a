"""Fetchers for AMD KDS and Intel PCS v4 / PCCS, and the broker's refreshing collateral service.

URL layouts (base URLs configurable; a PCCS serves the Intel paths under its own base):

* AMD KDS (``https://kdsintf.amd.com``):
  ``/vcek/v1/<product>/<hwid hex>?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..[&fmcSPL=..]`` (DER VCEK;
  Turin chip ids are 8 bytes), ``/vcek/v1/<product>/cert_chain`` (PEM ASK + ARK),
  ``/vcek/v1/<product>/crl`` (DER CRL signed by the ARK), and ``/vlek/v1/<product>/cert_chain``,
  ``/vlek/v1/<product>/crl`` for VLEKs.
* Intel PCS v4 (``https://api.trustedservices.intel.com``) or a PCCS:
  ``/tdx/certification/v4/tcb?fmspc=<hex>`` (header ``TCB-Info-Issuer-Chain``),
  ``/tdx/certification/v4/qe/identity`` (header ``SGX-Enclave-Identity-Issuer-Chain``),
  ``/sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der`` (header
  ``SGX-PCK-CRL-Issuer-Chain``), and the root CA CRL: ``/sgx/certification/v4/rootcacrl`` on a
  PCCS, ``https://certificates.trustedservices.intel.com/IntelSGXRootCA.der`` for Intel's PCS.
  Issuer-chain headers are URL-encoded PEM.

Every request has a timeout and is retried with exponential backoff on connection errors,
timeouts, 429 and 5xx (a bounded number of times); 404 means the service has no such document.
Nothing fetched is trusted: the cache verifies every document before storing it.

:class:`CollateralService` is the broker's :class:`CollateralSource`: it serves from the cache,
fetches what is missing on first use, refreshes documents ``refresh_before`` their ``nextUpdate``
(in the background when the cached one is still usable), and keeps serving the cached documents
while the upstream is down — until they are stale past the grace, when the verifier refuses. A
fetch that failed, or that the upstream answered 404 (a PCCS that does not cache a quote's FMSPC),
is not tried again for ``retry_after_seconds`` per document.

A VCEK is fetched for a report that has not been verified yet (it is what verifies it), so the
fetch is all an unsigned report can cause: the answer is kept only once the report verifies with it
(:meth:`CollateralCache.put_vcek`), and a failed fetch or a 404 is remembered per product, chip id
and TCB, so the same request is not sent again for ``retry_after_seconds``. A 404, fresh or
remembered, refuses the report (``VCEK_NOT_FOUND``, PERMISSION_DENIED: the evidence names a chip
and TCB AMD does not know), where an outage is ``UNAVAILABLE``, as is an answer that is no VCEK
certificate at all (``COLLATERAL_FETCH_FAILED``, remembered like an outage), and so is one that
does not chain to a pinned AMD root (``VCEK_FETCHED_UNTRUSTED``: KDS serves no such certificate
for any chip, so the broker's ``kds_url`` is wrong), one outside its validity
period (``VCEK_FETCHED_NOT_VALID``: an old one a proxy or mirror kept), or one of AMD's that is not
the VCEK asked for, of another chip, TCB or product (``VCEK_FETCHED_MISMATCH``: KDS answers a
request for exactly what it names, so a proxy or mirror answered wrongly). Those memories are
bounded (:data:`MAX_FAILURES`, the oldest forgotten first). A report can name any chip id, and each
new one is a fetch on the request's thread: one runs per chip and at most
:data:`MAX_VCEK_FETCHES` at once; more are refused at once (``COLLATERAL_FETCH_BUSY``,
UNAVAILABLE), so that made-up chip ids can neither hold every request thread nor get the broker
rate-limited by KDS; and a caller's fetches are budgeted by the broker (``vcek_fetch_gate``), so
that they are bounded in rate too, not only in number at once.

No refusal's message names a URL (``kds_url``, ``pcs_url``: the broker's internal endpoints) or a
cache file, or carries a failed fetch's error text (which can name the host or quote a proxy): it
reaches the caller (the gRPC status) and the audit, and says what was missing or wrong and the
kind of failure; the broker's log lines name the URL and the error for its operators.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cryptography import x509

from strongroom.attestation.abi.certs import common_name
from strongroom.attestation.abi.snp import SnpReport
from strongroom.attestation.collateral import INTEL_CA_BY_CN, SignedDocument
from strongroom.attestation.collateral_cache import CacheEntry, CollateralCache, vcek_key
from strongroom.attestation.errors import (
    CollateralUnavailable,
    MalformedEvidence,
    VerificationFailed,
)
from strongroom.errors import StrongroomError
from strongroom.reasons import Reason

log = logging.getLogger(__name__)
_Doc = TypeVar("_Doc", bytes, SignedDocument)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
AMD_KDS_URL = "https://kdsintf.amd.com"
TCB_INFO_CHAIN_HEADER = "TCB-Info-Issuer-Chain"
TCB_INFO_CHAIN_HEADER_V3 = "SGX-TCB-Info-Issuer-Chain"
QE_IDENTITY_CHAIN_HEADER = "SGX-Enclave-Identity-Issuer-Chain"
PCK_CRL_CHAIN_HEADER = "SGX-PCK-CRL-Issuer-Chain"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: The most failed fetches remembered (for the retry back-off); forgetting one costs one fetch.
MAX_FAILURES = 4096
#: The most VCEK fetches in flight at once (each holds a request thread for up to its timeout and
#: retries); a genuine platform needs one, once, before its VCEK is cached.
MAX_VCEK_FETCHES = 4
#: The most verified VCEKs held in memory because the cache volume would not take them.
MAX_UNSTORED_VCEKS = 64
#: A fetched VCEK refused as the broker's source's fault (never the caller's evidence): not
#: cached, and backed off like an outage.
_FETCHED_WRONG = (
    Reason.VCEK_FETCHED_MISMATCH,
    Reason.VCEK_FETCHED_NOT_VALID,
    Reason.VCEK_FETCHED_UNTRUSTED,
)


@dataclass(frozen=True)
class FetchSettings:
    """Where and how to fetch collateral (the broker's ``collateral`` configuration)."""

    pcs_url: str = INTEL_PCS_URL
    kds_url: str = AMD_KDS_URL
    root_ca_crl_url: str | None = None  # default: Intel's for the PCS, rootcacrl for a PCCS
    timeout_seconds: float = 10.0
    retries: int = 3
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0

    def __post_init__(self) -> None:
        for name in ("pcs_url", "kds_url"):
            url = getattr(self, name)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"{name} must be an http(s) URL")
        if self.timeout_seconds <= 0 or not 0 <= self.retries <= 10:
            raise ValueError("timeout_seconds must be positive and retries 0..10")

    @property
    def root_crl_url(self) -> str:
        """The Intel SGX root CA CRL location."""
        if self.root_ca_crl_url:
            return self.root_ca_crl_url
        if self.pcs_url.rstrip("/") == INTEL_PCS_URL:
            return INTEL_ROOT_CA_CRL_URL
        return f"{self.pcs_url.rstrip('/')}/sgx/certification/v4/rootcacrl"


def unreachable_sources(settings: FetchSettings) -> list[tuple[str, str]]:
    """The collateral URLs (PCS/PCCS, KDS, the root CA CRL) this process cannot open a TCP
    connection for, each with the error; a URL urllib would reach through a proxy
    (``https_proxy``, ``no_proxy``) is judged by a connection to that proxy.

    A connection, not a request: nothing is asked of the vendors' services, which rate-limit, and
    what a blocked egress or an unresolvable name looks like (a timeout, a refusal, a DNS error)
    shows at this step. Takes up to ``timeout_seconds`` per source that does not answer."""
    proxies = urllib.request.getproxies()
    problems: list[tuple[str, str]] = []
    tried: dict[tuple[str, int], str | None] = {}
    for url in dict.fromkeys((settings.pcs_url, settings.kds_url, settings.root_crl_url)):
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            problems.append((url, f"bad port: {exc}"))
            continue
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(host):
            via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host, port = via.hostname or "", via.port or 80
        if (host, port) not in tried:
            try:
                with socket.create_connection((host, port), timeout=settings.timeout_seconds):
                    tried[(host, port)] = None
            except OSError as exc:  # refused, timed out, no route, name not resolved
                tried[(host, port)] = f"{host}:{port}: {type(exc).__name__} ({exc})"
        error = tried[(host, port)]
        if error is not None:
            problems.append((url, error))
    return problems


@dataclass(frozen=True)
class Response:
    """One successful HTTP response."""

    body: bytes
    headers: Mapping[str, str]

    def chain(self, *names: str) -> bytes | None:
        """A URL-encoded PEM issuer-chain header, decoded."""
        for name in names:
            value = self.headers.get(name.lower())
            if value:
                return urllib.parse.unquote(value).encode("ascii", "replace")
        return None


class HttpGetter:
    """GET with a timeout, bounded retries and exponential backoff with jitter."""

    def __init__(self, settings: FetchSettings, *, sleep: Callable[[float], None] = time.sleep):
        self._s = settings
        self._sleep = sleep

    def get(self, url: str, what: str) -> Response | None:
        """The response, ``None`` for 404, or :class:`CollateralUnavailable` after the retries.

        Its message names ``what`` was asked for, never ``url``: it reaches the caller whose
        release needed the document (the gRPC status) and the audit, to whom the broker's
        internal endpoints (a PCCS, a KDS proxy) are none of their business; the log names it."""
        last = ""  # the failure, in full: for the broker's log only
        said = ""  # its kind, for the message (see _failure_kind)
        for attempt in range(self._s.retries + 1):
            if attempt:
                delay = min(
                    self._s.max_backoff_seconds, self._s.backoff_seconds * 2 ** (attempt - 1)
                )
                self._sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not crypto
            try:
                request = urllib.request.Request(url, headers={"Accept": "*/*"})  # noqa: S310
                with urllib.request.urlopen(request, timeout=self._s.timeout_seconds) as resp:  # noqa: S310
                    body = resp.read(MAX_RESPONSE_BYTES + 1)
                    if len(body) > MAX_RESPONSE_BYTES:
                        log.warning(
                            "collateral response too large",
                            extra={"url": url, "limit": MAX_RESPONSE_BYTES},
                        )
                        raise CollateralUnavailable(
                            f"the answer for {what} is larger than {MAX_RESPONSE_BYTES} bytes",
                            reason=Reason.COLLATERAL_FETCH_FAILED,
                        )
                    headers = {k.lower(): v for k, v in resp.headers.items()}
                    return Response(body, headers)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                last = said = f"HTTP {exc.code}"
                if exc.code != 429 and exc.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                last = type(exc).__name__ + (f" ({exc.reason})" if hasattr(exc, "reason") else "")
                said = _failure_kind(exc)
            except http.client.HTTPException as exc:
                # An answer that is not HTTP (a bad status line, an over-long header, a cut chunked
                # body): http.client's own errors, which urllib does not wrap in URLError.
                last = said = type(exc).__name__
            log.info(
                "collateral fetch failed", extra={"url": url, "attempt": attempt, "error": last}
            )
        log.warning("collateral fetch gave up", extra={"url": url, "error": last})
        raise CollateralUnavailable(
            f"fetching {what} failed: {said} (the broker's log names the source and the error)",
            reason=Reason.COLLATERAL_FETCH_FAILED,
        )


def _failure_kind(exc: BaseException) -> str:
    """What kind of failure ``exc`` is, for a message that reaches the caller (the gRPC status)
    and the audit: its class and, for a ``URLError``, its cause's class, never their text. The
    text names what the broker connected to (an SSL error: "certificate is not valid for
    'kds-mirror.corp'") or carries a proxy's own words (a refused CONNECT: "Tunnel connection
    failed: 403 ..."); the broker's log keeps it."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib.error.URLError) and isinstance(reason, BaseException):
        return f"{type(exc).__name__} ({type(reason).__name__})"
    return type(exc).__name__


class PcsClient:
    """Intel PCS v4 / PCCS: TDX TCB info, TDX QE identity, PCK CRLs, root CA CRL."""

    def __init__(self, settings: FetchSettings, getter: HttpGetter | None = None) -> None:
        self._s = settings
        self._get = getter or HttpGetter(settings)
        self._base = settings.pcs_url.rstrip("/")

    def tdx_tcb_info(self, fmspc: bytes) -> SignedDocument | None:
        """``GET /tdx/certification/v4/tcb?fmspc=`` with its issuer chain."""
        url = f"{self._base}/tdx/certification/v4/tcb?fmspc={fmspc.hex().upper()}"
        what = f"the TDX TCB info for FMSPC {fmspc.hex()} from Intel PCS/PCCS"
        return self._signed(url, what, TCB_INFO_CHAIN_HEADER, TCB_INFO_CHAIN_HEADER_V3)

    def tdx_qe_identity(self) -> SignedDocument | None:
        """``GET /tdx/certification/v4/qe/identity`` with its issuer chain."""
        return self._signed(
            f"{self._base}/tdx/certification/v4/qe/identity",
            "the TD_QE identity from Intel PCS/PCCS",
            QE_IDENTITY_CHAIN_HEADER,
        )

    def pck_crl(self, ca: str) -> tuple[bytes, bytes | None] | None:
        """``GET /sgx/certification/v4/pckcrl?ca=<ca>&encoding=der``: (CRL, issuer chain)."""
        resp = self._get.get(
            f"{self._base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
            f"the PCK {ca} CA CRL from Intel PCS/PCCS",
        )
        return (resp.body, resp.chain(PCK_CRL_CHAIN_HEADER)) if resp else None

    def root_ca_crl(self) -> bytes | None:
        """The Intel SGX Root CA CRL (DER; hex text from older PCCS is accepted by the cache)."""
        resp = self._get.get(self._s.root_crl_url, "the Intel SGX root CA CRL")
        return resp.body if resp else None

    def _signed(self, url: str, what: str, *headers: str) -> SignedDocument | None:
        resp = self._get.get(url, what)
        if resp is None:
            return None
        chain = resp.chain(*headers)
        if chain is None:
            log.warning("collateral response lacks its issuer chain", extra={"url": url})
            raise CollateralUnavailable(
                f"the answer for {what} lacks the {headers[0]} header",
                reason=Reason.COLLATERAL_FETCH_FAILED,
            )
        return SignedDocument(resp.body, chain)


class KdsClient:
    """AMD KDS: VCEKs by chip id and TCB, and the ARK-signed CRL and chain per product."""

    def __init__(self, settings: FetchSettings, getter: HttpGetter | None = None) -> None:
        self._get = getter or HttpGetter(settings)
        self._base = settings.kds_url.rstrip("/")

    def vcek_url(self, product: str, report: SnpReport) -> str:
        """Where the VCEK for the report's chip id and reported TCB is asked for."""
        tcb = report.reported_tcb.components()
        names = {"bootloader": "blSPL", "tee": "teeSPL", "snp": "snpSPL", "microcode": "ucodeSPL"}
        query = "&".join(f"{names[k]}={tcb[k]:02d}" for k in names)
        if "fmc" in tcb:
            query += f"&fmcSPL={tcb['fmc']:02d}"
        return f"{self._base}/vcek/v1/{product}/{report.chip_id_for_kds().hex()}?{query}"

    def vcek(self, product: str, report: SnpReport) -> bytes | None:
        """``GET /vcek/v1/<product>/<hwid>?blSPL=..`` (DER)."""
        resp = self._get.get(self.vcek_url(product, report), f"the {product} VCEK from AMD KDS")
        return resp.body if resp else None

    def cert_chain(self, product: str, scope: str = "vcek") -> bytes | None:
        """``GET /<scope>/v1/<product>/cert_chain`` (PEM ASK/ASVK + ARK)."""
        resp = self._get.get(
            f"{self._base}/{scope}/v1/{product}/cert_chain",
            f"the {product} {scope.upper()} certificate chain from AMD KDS",
        )
        return resp.body if resp else None

    def crl(self, product: str, scope: str = "vcek") -> bytes | None:
        """``GET /<scope>/v1/<product>/crl`` (DER, signed by the ARK)."""
        resp = self._get.get(
            f"{self._base}/{scope}/v1/{product}/crl",
            f"the {product} {scope.upper()} CRL from AMD KDS",
        )
        return resp.body if resp else None


def _no_such_vcek(product: str) -> VerificationFailed:
    """KDS answered 404 for the chip id and TCB a report names: the report's fault, not an
    outage. As ``COLLATERAL_MISSING`` (UNAVAILABLE, the broker's own failure) it was recorded one
    by one outside the caller's refusal budget, so reports naming a made-up chip filled the
    audit log (each fetched once, then refused from memory)."""
    return VerificationFailed(
        f"AMD KDS has no {product} VCEK for the chip id and TCB the SNP report names (a report "
        "not made by that AMD processor, or a KDS URL that serves no VCEKs)",
        reason=Reason.VCEK_NOT_FOUND,
    )


class CollateralService:
    """The broker's collateral source: the cache, filled and refreshed from KDS and PCS/PCCS."""

    def __init__(
        self,
        cache: CollateralCache,
        settings: FetchSettings | None,
        *,
        refresh_before: timedelta = timedelta(days=1),
        retry_after_seconds: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        vcek_fetch_gate: Callable[[], bool] | None = None,
    ) -> None:
        """``vcek_fetch_gate``, if given, is asked before each VCEK fetch from KDS and refuses it
        by returning False (``COLLATERAL_FETCH_RATE_LIMITED``): the key broker's budget of
        fetches per caller (:mod:`strongroom.keybroker.fetch_budget`)."""
        self.cache = cache
        self._vcek_fetch_gate = vcek_fetch_gate
        self._pcs = PcsClient(settings) if settings is not None else None
        self._kds = KdsClient(settings) if settings is not None else None
        self._refresh_before = refresh_before
        self._retry_after = retry_after_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failed: dict[str, float] = {}  # what -> monotonic time of the last failure
        # The keys of _failed whose failure was KDS's 404 (it has no such VCEK), not an outage.
        self._absent: set[str] = set()
        self._running: set[str] = set()
        self._vcek_fetching: set[str] = set()  # product:chip id of each VCEK fetch in flight
        # VCEKs a report verified with that the cache could not store (a full or read-only
        # volume), by what was fetched: without them every release of that platform fetched its
        # VCEK again, each spending its caller's fetch budget. Public certificates; bounded.
        self._unstored_vceks: OrderedDict[str, bytes] = OrderedDict()

    def __repr__(self) -> str:
        return f"CollateralService({self.cache!r}, fetching={self._pcs is not None})"

    # --------------------------------------------------------------- CollateralSource ----------

    def _held(self, read: Callable[[], _Doc | None]) -> _Doc | None:
        """What the cache holds; a cached file it refused (:class:`CollateralUnavailable`) is
        missing when there is an upstream to fetch its replacement from (the refusal is raised
        again, by the cache, if that fetch brings none)."""
        try:
            return read()
        except CollateralUnavailable:
            if self._pcs is None:
                raise
            return None

    def crl(self, issuer: x509.Certificate, scope: str = "") -> bytes | None:
        """The cached CRL of ``issuer``, fetched first if missing or due."""
        held = self._held(lambda: self.cache.crl(issuer, scope))
        if self._pcs is None:  # nothing to fetch from (checked first: a release asks every time)
            return held
        self._refresh(f"crl:{common_name(issuer)}:{scope}", held is None, self._due_crl(issuer, scope),
                      lambda: self.fetch_crl(issuer, scope))  # fmt: skip
        return self.cache.crl(issuer, scope) if held is None else held

    def tdx_tcb_info(self, fmspc: bytes) -> SignedDocument | None:
        """The cached TCB info for the FMSPC, fetched first if missing or due."""
        held = self._held(lambda: self.cache.tdx_tcb_info(fmspc))
        if self._pcs is None:
            return held
        due = self._due(lambda e: e.kind == "tdx-tcb-info" and e.key == fmspc.hex())
        self._refresh(f"tcb:{fmspc.hex()}", held is None, due, lambda: self.fetch_tcb_info(fmspc))
        return self.cache.tdx_tcb_info(fmspc) if held is None else held

    def tdx_qe_identity(self) -> SignedDocument | None:
        """The cached QE identity, fetched first if missing or due."""
        held = self._held(self.cache.tdx_qe_identity)
        if self._pcs is None:
            return held
        due = self._due(lambda e: e.kind == "tdx-qe-identity")
        self._refresh("qe", held is None, due, self.fetch_qe_identity)
        return self.cache.tdx_qe_identity() if held is None else held

    def snp_key_certificate(self, report: SnpReport) -> bytes | None:
        """A cached VCEK for the report, else one fetched from KDS (cached only if the report
        verifies with it; otherwise it serves this verification alone, which then refuses)."""
        held = self.cache.snp_key_certificate(report)
        if held is not None or self._kds is None:
            return held
        product = report.product
        if product is None:
            # Which KDS product to ask cannot be known: the report's fault, not an outage. As a
            # COLLATERAL_MISSING (the broker's own failure) each was an audit record outside the
            # caller's refusal budget.
            raise MalformedEvidence(
                "the SNP report does not name its product (version 2, or a CPU family AMD KDS "
                "does not serve), so its VCEK cannot be fetched: the evidence must carry it",
                reason=Reason.VCEK_CERTIFICATE_MISSING,
            )
        # Keyed by exactly what is requested: a 404 for one TCB says nothing of another, and a
        # key by chip id alone would let a forged report for a real chip hold its fetch back.
        tcb = report.reported_tcb.components()
        key = f"vcek:{product}:{vcek_key(report.chip_id_for_kds(), tcb)}"
        with self._lock:
            unstored = self._unstored_vceks.get(key)
            if unstored is not None:
                self._unstored_vceks.move_to_end(key)
                return unstored
        if not self._may_try(key):
            if key in self._absent:
                raise _no_such_vcek(product)
            return None
        chip = f"{product}:{report.chip_id_for_kds().hex()}"
        self._claim_vcek_fetch(chip)
        # The caller's budget is asked only once this request will really go to KDS: asked
        # before the slot, every COLLATERAL_FETCH_BUSY (another VM on the same chip being
        # fetched, the slots taken by others) spent a fetch that never happened, and a fleet's
        # cold start ran out of its burst on refusals.
        if self._vcek_fetch_gate is not None and not self._vcek_fetch_gate():
            with self._lock:
                self._vcek_fetching.discard(chip)
            raise CollateralUnavailable(
                "too many VCEK fetches from AMD KDS for this caller's reports; retry shortly",
                reason=Reason.COLLATERAL_FETCH_RATE_LIMITED,
            )
        try:
            der = self._kds.vcek(product, report)
        except CollateralUnavailable:
            self._note_failure(key)
            raise
        finally:
            with self._lock:
                self._vcek_fetching.discard(chip)
        if der is None:  # KDS has no such VCEK: do not ask again for every report naming it
            self._note_failure(key, absent=True)
            raise _no_such_vcek(product)
        try:
            self.cache.put_vcek(der, report)
        except CollateralUnavailable as exc:
            if exc.reason not in _FETCHED_WRONG:
                # The cache cannot be written (COLLATERAL_STORE_FAILED): the VCEK, which the
                # report verified with, still serves, and is held in memory until it can be.
                log.info(
                    "fetched VCEK not cached",
                    extra={"what": key, "reason": exc.reason, "detail": exc.message},
                )
                with self._lock:
                    self._unstored_vceks[key] = der
                    while len(self._unstored_vceks) > MAX_UNSTORED_VCEKS:
                        self._unstored_vceks.popitem(last=False)
                return der
            # A certificate of another chain, outside its validity, or not the VCEK asked for: the
            # broker's source is wrong (this log line names the URL; the caller's message does
            # not), not the caller's evidence. Backed off like an outage, since a kds_url that is
            # not KDS answers every chip so.
            self._note_failure(key)
            log.warning(
                "AMD KDS answered a VCEK request with a certificate of another chain, outside "
                "its validity, or not the VCEK asked for",
                extra={
                    "what": key,
                    "url": self._kds.vcek_url(product, report),
                    "reason": exc.reason,
                    "detail": exc.message,
                },
            )
            raise
        except MalformedEvidence as exc:
            # What KDS answered is no VCEK certificate at all (a proxy's page, a cut body): the
            # upstream failed, whatever the report is. Handed to the verifier it was the caller's
            # BAD_CERTIFICATE (INVALID_ARGUMENT: never retried by the inference loader), and
            # fetched again for every release. A VCEK that parses but does not verify the report
            # still serves the verification, which names why.
            self._note_failure(key)
            log.warning(
                "AMD KDS answered a VCEK request with no VCEK certificate",
                extra={
                    "what": key,
                    "url": self._kds.vcek_url(product, report),
                    "reason": exc.reason,
                    "detail": exc.message,
                },
            )
            # Its reason only: the parser's words quote what answered (a certificate's name),
            # which the log line above keeps for the operators.
            raise CollateralUnavailable(
                f"AMD KDS answered the {product} VCEK request with something that is not a VCEK "
                f"certificate ({exc.reason})",
                reason=Reason.COLLATERAL_FETCH_FAILED,
            ) from None
        except StrongroomError as exc:
            # Not stored: the verifier, which checks the same, names why (or the cache cannot be
            # written: COLLATERAL_STORE_FAILED). Not remembered as a failure either: the answer may
            # be right and the report forged, and a back-off would then hold back the genuine
            # platform's first verification.
            log.info(
                "fetched VCEK not cached",
                extra={"what": key, "reason": exc.reason, "detail": exc.message},
            )
            if isinstance(exc, VerificationFailed):
                # The report's own refusal, as the cache judged it with this VCEK (the same
                # checks the verifier makes): handed on, a VCEK outside its validity made the
                # verifier name its dates (CERT_NOT_VALID_AT_TIME) for a forged report.
                raise
        return der

    # --------------------------------------------------------------- fetching -----------------

    def fetch_tcb_info(self, fmspc: bytes) -> CacheEntry | None:
        """Fetches and stores the TCB info for an FMSPC."""
        assert self._pcs is not None
        doc = self._pcs.tdx_tcb_info(fmspc)
        return self.cache.put_tdx_tcb_info(doc.data, doc.issuer_chain) if doc else None

    def fetch_qe_identity(self) -> CacheEntry | None:
        """Fetches and stores the TD_QE identity."""
        assert self._pcs is not None
        doc = self._pcs.tdx_qe_identity()
        return self.cache.put_tdx_qe_identity(doc.data, doc.issuer_chain) if doc else None

    def fetch_crl(self, issuer: x509.Certificate, scope: str = "") -> CacheEntry | None:
        """Fetches and stores the CRL ``issuer`` publishes."""
        assert self._pcs is not None and self._kds is not None
        cn = common_name(issuer)
        if cn.startswith("ARK-"):
            product = cn.removeprefix("ARK-")
            data = self._kds.crl(product, scope or "vcek")
            return self.cache.put_crl(data, scope=scope or "vcek") if data else None
        ca = INTEL_CA_BY_CN.get(cn)
        if ca == "root":
            data = self._pcs.root_ca_crl()
            return self.cache.put_crl(data) if data else None
        if ca in ("platform", "processor"):
            got = self._pcs.pck_crl(ca)
            return self.cache.put_crl(got[0], issuer_chain=got[1]) if got else None
        return None

    def fetch_all(
        self, *, fmspcs: tuple[bytes, ...] = (), products: tuple[str, ...] = ()
    ) -> list[CacheEntry]:
        """Fills the cache: TDX collateral for ``fmspcs``, AMD CRLs for ``products`` (CLI/startup)."""
        assert self._pcs is not None and self._kds is not None
        out: list[CacheEntry] = []
        if fmspcs:
            for fmspc in fmspcs:
                if (entry := self.fetch_tcb_info(fmspc)) is not None:
                    out.append(entry)
            if (entry := self.fetch_qe_identity()) is not None:
                out.append(entry)
            data = self._pcs.root_ca_crl()
            if data:
                out.append(self.cache.put_crl(data))
            for ca in ("platform", "processor"):
                got = self._pcs.pck_crl(ca)
                if got:
                    out.append(self.cache.put_crl(got[0], issuer_chain=got[1]))
        for product in products:
            for scope in ("vcek", "vlek"):
                data = self._kds.crl(product, scope)
                if data:
                    out.append(self.cache.put_crl(data, scope=scope))
        return out

    def refresh_due(self) -> None:
        """Re-fetches every held document that is due (the background refresher's one pass)."""
        if self._pcs is None:
            return
        for issuer, scope in self.cache.held_crl_issuers():
            self.crl(issuer, "" if scope == "ca" else scope)
        for fmspc in self.cache.held_fmspcs():
            self.tdx_tcb_info(fmspc)
        if self._held(self.cache.tdx_qe_identity) is not None:
            self.tdx_qe_identity()

    # --------------------------------------------------------------- refresh policy -----------

    def _due(self, match: Callable[[CacheEntry], bool]) -> bool:
        now = self._clock()
        for entry in self.cache.entries():
            if match(entry):
                return entry.next_update is None or now >= entry.next_update - self._refresh_before
        return True

    def _due_crl(self, issuer: x509.Certificate, scope: str) -> bool:
        from strongroom.attestation.collateral_cache import issuer_id

        prefix = f"{issuer_id(issuer)}-{scope or 'ca'}"
        return self._due(lambda e: e.kind == "crl" and e.path.stem == prefix)

    def _may_try(self, key: str) -> bool:
        with self._lock:
            failed = self._failed.get(key)
            return failed is None or time.monotonic() - failed >= self._retry_after

    def _claim_vcek_fetch(self, chip: str) -> None:
        """Takes a VCEK fetch slot for ``chip``, or refuses (UNAVAILABLE, COLLATERAL_FETCH_BUSY)
        while that chip's VCEK is being fetched or :data:`MAX_VCEK_FETCHES` fetches run.

        Refused, not queued: a waiting request would hold its thread all the same. Per chip, not
        per chip and TCB: made-up TCBs for one chip id are as many fetches otherwise."""
        with self._lock:
            if chip in self._vcek_fetching:
                problem = "the VCEK of this chip is being fetched from AMD KDS"
            elif len(self._vcek_fetching) >= MAX_VCEK_FETCHES:
                problem = f"{MAX_VCEK_FETCHES} VCEK fetches from AMD KDS are under way"
            else:
                self._vcek_fetching.add(chip)
                return
        raise CollateralUnavailable(
            f"{problem}; retry shortly", reason=Reason.COLLATERAL_FETCH_BUSY
        )

    def _note_failure(self, key: str, *, absent: bool = False) -> None:
        with self._lock:
            self._failed.pop(key, None)  # re-inserted as the newest
            self._failed[key] = time.monotonic()
            if absent:
                self._absent.add(key)
            else:
                self._absent.discard(key)
            while len(self._failed) > MAX_FAILURES:
                self._absent.discard(oldest := next(iter(self._failed)))
                del self._failed[oldest]

    def _refresh(self, key: str, missing: bool, due: bool, fetch: Callable[[], object]) -> None:
        """Fetches now when missing; in the background when merely due; never hammers a failing
        upstream (one try per ``retry_after_seconds`` and key)."""
        if self._pcs is None or not (missing or due) or not self._may_try(key):
            return
        if missing:
            self._run(key, fetch, wait=True)
            return
        with self._lock:
            if key in self._running:
                return
            self._running.add(key)
        threading.Thread(
            target=self._run, args=(key, fetch, False), name="collateral-refresh", daemon=True
        ).start()

    def _run(self, key: str, fetch: Callable[[], object], wait: bool) -> None:
        try:
            if fetch() is None:
                # The upstream has no such document (a 404: a PCCS not caching this FMSPC, a
                # pcs_url that is no PCS). Not remembered, every release naming it sent another
                # request on its thread: an FMSPC is any genuine quote's, replayed or not.
                self._note_failure(key)
                log.warning(
                    "collateral not found upstream; serving what the cache holds",
                    extra={"what": key},
                )
        except StrongroomError as exc:
            self._note_failure(key)
            log.warning(
                "collateral refresh failed; serving what the cache holds",
                extra={"what": key, "reason": exc.reason, "detail": exc.message},
            )
        except Exception as exc:  # a defect's, on a thread nobody joins
            # Uncaught, it ended a background refresh with a bare traceback on stderr and was not
            # remembered as a failure: every release while the document was due started another
            # fetch. Backed off like any failure; its class named, its text not (it may quote
            # what the upstream sent).
            self._note_failure(key)
            log.error(
                "collateral refresh failed unexpectedly; serving what the cache holds",
                extra={"what": key, "error": type(exc).__name__},
            )
        finally:
            if not wait:
                with self._lock:
                    self._running.discard(key)
