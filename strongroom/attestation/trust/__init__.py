"""Pinned trust anchors: AMD ARK/ASK/ASVK per product and the Intel SGX Root CA.

The PEM files beside this module are the public AMD and Intel roots (fingerprints are checked by
``tests/attestation/test_trust.py`` against the values published in the vectors' SOURCES.md).
:meth:`TrustStore.production` trusts exactly these. Simulated roots can only be added with the
explicit :meth:`TrustStore.with_simulated_roots`, which accepts nothing but certificates marked
``Strongroom SIMULATED TEE - NOT FOR PRODUCTION`` and sets :attr:`TrustStore.includes_simulated`
so that services can refuse such a store in production mode.

The store also owns a small cache of verified certificate chains and collateral signatures (keyed
by the exact bytes and used only inside the validity window they were verified for); only
successes are cached.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from strongroom.attestation._x509 import verify_issued_by
from strongroom.attestation.abi.certs import (
    common_name,
    is_simulated,
    load_certificate,
    split_pem_certificates,
)
from strongroom.attestation.abi.snp import PRODUCTS

_PINNED_AMD_FILES = {
    "Milan": ("ark_milan.pem", "ask_milan.pem", "asvk_ark_milan.pem"),
    "Genoa": ("ark_genoa.pem", "ask_genoa.pem", "asvk_ark_genoa.pem"),
    "Turin": ("ark_turin.pem", "ask_turin.pem", "asvk_ark_turin.pem"),
}
_PINNED_INTEL_FILES = ("intel_sgx_root_ca.pem",)


@dataclass(frozen=True)
class PinnedCert:
    """A trusted certificate with its DER bytes."""

    der: bytes
    cert: x509.Certificate
    simulated: bool

    @property
    def spki_sha256(self) -> str:
        """SHA-256 of the SubjectPublicKeyInfo, hex."""
        spki = self.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(spki).hexdigest()

    @property
    def der_sha256(self) -> str:
        """SHA-256 of the DER certificate, hex."""
        return hashlib.sha256(self.der).hexdigest()


@dataclass(frozen=True)
class AmdProductRoots:
    """The pinned AMD chain tops for one product: ARK, ASK (signs VCEKs), ASVK (signs VLEKs)."""

    product: str
    ark: PinnedCert
    asks: tuple[PinnedCert, ...]
    asvks: tuple[PinnedCert, ...]


def _pinned(der: bytes) -> PinnedCert:
    cert = load_certificate(der)
    return PinnedCert(der=cert.public_bytes(Encoding.DER), cert=cert, simulated=is_simulated(cert))


def _product_of(cn: str, prefix: str) -> str | None:
    if cn.startswith(prefix):
        product = cn[len(prefix) :]
        return product if product in PRODUCTS else None
    return None


def _build_amd(certs: Iterable[PinnedCert]) -> dict[str, AmdProductRoots]:
    arks: dict[str, PinnedCert] = {}
    asks: dict[str, list[PinnedCert]] = {}
    asvks: dict[str, list[PinnedCert]] = {}
    for pc in certs:
        cn = common_name(pc.cert)
        if (p := _product_of(cn, "ARK-")) is not None:
            if p in arks and arks[p].der != pc.der:
                raise ValueError(f"two different ARKs for {p}")
            arks[p] = pc
        elif (p := _product_of(cn, "SEV-VLEK-")) is not None:
            asvks.setdefault(p, []).append(pc)
        elif (p := _product_of(cn, "SEV-")) is not None:
            asks.setdefault(p, []).append(pc)
        else:
            raise ValueError(f"certificate {cn!r} is not an AMD ARK, ASK or ASVK")
    out: dict[str, AmdProductRoots] = {}
    for product, ark in arks.items():
        verify_issued_by(ark.cert, ark.cert, amd_pss=True)
        for inter in asks.get(product, []) + asvks.get(product, []):
            verify_issued_by(inter.cert, ark.cert, amd_pss=True)
        out[product] = AmdProductRoots(
            product=product,
            ark=ark,
            asks=tuple(_dedupe(asks.get(product, []))),
            asvks=tuple(_dedupe(asvks.get(product, []))),
        )
    for product in set(asks) | set(asvks):
        if product not in arks:
            raise ValueError(f"AMD intermediate for {product} without its ARK")
    return out


def _dedupe(items: list[PinnedCert]) -> list[PinnedCert]:
    seen: set[bytes] = set()
    out = []
    for item in items:
        if item.der not in seen:
            seen.add(item.der)
            out.append(item)
    return out


@functools.lru_cache(maxsize=1)
def _production_certs() -> tuple[tuple[PinnedCert, ...], tuple[PinnedCert, ...]]:
    base = resources.files(__name__)
    amd: list[PinnedCert] = []
    for files in _PINNED_AMD_FILES.values():
        for name in files:
            for der in split_pem_certificates(base.joinpath(name).read_bytes()):
                amd.append(_pinned(der))
    intel = [
        _pinned(der)
        for name in _PINNED_INTEL_FILES
        for der in split_pem_certificates(base.joinpath(name).read_bytes())
    ]
    return tuple(amd), tuple(intel)


class VerificationCache:
    """A bounded LRU of successful verifications, each usable only inside its validity window."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, bytes], tuple[datetime, datetime, Any]] = (
            OrderedDict()
        )

    @staticmethod
    def key(purpose: str, *parts: bytes) -> tuple[str, bytes]:
        """A cache key over the exact bytes of every part (length-prefixed, so unambiguous)."""
        h = hashlib.sha256()
        for part in parts:
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return purpose, h.digest()

    def get(self, key: tuple[str, bytes], now: datetime) -> Any:
        """The cached value if present and ``now`` is inside its window, else ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        not_before, not_after, value = entry
        return value if not_before <= now <= not_after else None

    def put(self, key: tuple[str, bytes], window: tuple[datetime, datetime], value: Any) -> None:
        """Records a success valid for ``window``."""
        with self._lock:
            self._entries[key] = (window[0], window[1], value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forgets everything."""
        with self._lock:
            self._entries.clear()


class TrustStore:
    """The roots the verifiers chain to, and the cache of verified chains."""

    def __init__(
        self,
        amd: Sequence[PinnedCert],
        intel: Sequence[PinnedCert],
        *,
        _allow_simulated: bool = False,
    ) -> None:
        if not _allow_simulated and any(c.simulated for c in (*amd, *intel)):
            raise ValueError("simulated roots need TrustStore.with_simulated_roots")
        self._amd_certs = tuple(amd)
        self._intel = tuple(_dedupe(list(intel)))
        for root in self._intel:
            verify_issued_by(root.cert, root.cert)
        self._amd = _build_amd(self._amd_certs)
        self._simulated_amd: dict[str, AmdProductRoots] = {}
        self.includes_simulated = any(c.simulated for c in (*self._amd_certs, *self._intel))
        self.cache = VerificationCache()

    @classmethod
    def production(cls) -> TrustStore:
        """The pinned public AMD and Intel roots, and nothing else."""
        amd, intel = _production_certs()
        return cls(amd, intel)

    def with_simulated_roots(
        self, *, amd: Sequence[bytes] = (), intel: Sequence[bytes] = ()
    ) -> TrustStore:
        """A new store that also trusts simulated roots (PEM or DER; bundles allowed).

        Every added certificate must carry the simulated-TEE marking; services must refuse a store
        whose :attr:`includes_simulated` is true when they run in production mode.
        """
        added_amd = [_pinned(d) for blob in amd for d in _as_ders(blob)]
        added_intel = [_pinned(d) for blob in intel for d in _as_ders(blob)]
        for pc in (*added_amd, *added_intel):
            if not pc.simulated:
                raise ValueError(
                    f"{common_name(pc.cert)!r} is not marked as a simulated-TEE certificate; "
                    "only simulated roots can be added to a trust store"
                )
        store = TrustStore.__new__(TrustStore)
        store._amd_certs = self._amd_certs
        store._intel = tuple(_dedupe([*self._intel, *added_intel]))
        for root in added_intel:
            verify_issued_by(root.cert, root.cert)
        store._amd = dict(self._amd)
        # Simulated product roots live apart from the real ones, so a chain is only ever matched
        # against an ARK by signature, never by product name alone.
        store._simulated_amd = {**self._simulated_amd, **_build_amd(added_amd)}
        store.includes_simulated = True
        store.cache = VerificationCache()
        return store

    def amd_roots(self) -> list[AmdProductRoots]:
        """Every AMD product root set, real ones first."""
        return [*self._amd.values(), *self._simulated_amd.values()]

    def amd_pinned_ders(self) -> set[bytes]:
        """DER of every pinned AMD certificate (ARK, ASK, ASVK)."""
        out: set[bytes] = set()
        for roots in self.amd_roots():
            out.add(roots.ark.der)
            out.update(c.der for c in (*roots.asks, *roots.asvks))
        return out

    def intel_roots(self) -> tuple[PinnedCert, ...]:
        """Every trusted Intel SGX root."""
        return self._intel

    def describe(self) -> list[dict[str, object]]:
        """A loggable list of the anchors (name, product, SPKI fingerprint, simulated flag)."""
        out: list[dict[str, object]] = []
        for roots in self.amd_roots():
            for pc in (roots.ark, *roots.asks, *roots.asvks):
                out.append(
                    {
                        "vendor": "AMD",
                        "product": roots.product,
                        "subject": common_name(pc.cert),
                        "spki_sha256": pc.spki_sha256,
                        "simulated": pc.simulated,
                    }
                )
        for pc in self._intel:
            out.append(
                {
                    "vendor": "Intel",
                    "subject": common_name(pc.cert),
                    "spki_sha256": pc.spki_sha256,
                    "simulated": pc.simulated,
                }
            )
        return out

    def __repr__(self) -> str:
        return (
            f"TrustStore(amd={[r.product for r in self.amd_roots()]}, "
            f"intel={len(self._intel)}, includes_simulated={self.includes_simulated})"
        )


def _as_ders(blob: bytes) -> list[bytes]:
    if bytes(blob).lstrip().startswith(b"-----BEGIN"):
        return split_pem_certificates(blob)
    return [bytes(blob)]
