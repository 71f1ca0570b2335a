"""Attestation verification micro-benchmark.

Measures, in one run: verify time per SEV-SNP report with a cached VCEK chain, per TDX quote with a
cached PCK chain and cached collateral, and the cold (first, uncached) SNP chain verification; each
against a bare ECDSA verify of the same curve and message size measured in the same run, reported
as a ratio.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.attestation import verify_evidence
from strongroom.dev.simulated import SimulatedAuthority


def _per_call(fn: Callable[[], Any], *, min_seconds: float = 0.5, min_calls: int = 50) -> float:
    fn()  # warm
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= min_seconds:
            return elapsed / calls


def _bare_ecdsa(curve: ec.EllipticCurve, hash_alg: hashes.HashAlgorithm, size: int) -> float:
    key = ec.generate_private_key(curve)
    msg = b"\x5a" * size
    sig = key.sign(msg, ec.ECDSA(hash_alg))
    pub = key.public_key()
    return _per_call(lambda: pub.verify(sig, msg, ec.ECDSA(hash_alg)))


def run(results: dict[str, Any]) -> None:
    """Records per-verification times (µs) and ratios against bare ECDSA verifies."""
    now = dt.datetime.now(dt.UTC)
    authority = SimulatedAuthority.generate(now=now)
    trust = authority.trust_store()
    report_data = hashlib.sha512(b"bench").digest()

    snp = authority.snp()
    snp_ev = snp.evidence(report_data, measurement=bytes(48))
    verify_evidence(snp_ev, trust=trust, now=now)
    snp_us = _per_call(lambda: verify_evidence(snp_ev, trust=trust, now=now)) * 1e6

    def cold() -> None:
        trust.cache.clear()
        verify_evidence(snp_ev, trust=trust, now=now)

    snp_cold_us = _per_call(cold, min_calls=20) * 1e6
    p384_us = _bare_ecdsa(ec.SECP384R1(), hashes.SHA384(), 0x2A0) * 1e6

    tdx = authority.tdx()
    tdx_ev = tdx.evidence(report_data, mrtd=bytes(48), now=now)
    verify_evidence(tdx_ev, trust=trust, now=now)
    tdx_us = _per_call(lambda: verify_evidence(tdx_ev, trust=trust, now=now)) * 1e6
    p256_us = _bare_ecdsa(ec.SECP256R1(), hashes.SHA256(), 632) * 1e6

    results["snp_verify_cached_us"] = round(snp_us, 1)
    results["snp_verify_cold_chain_us"] = round(snp_cold_us, 1)
    results["baseline_ecdsa_p384_verify_us"] = round(p384_us, 1)
    results["snp_cached_vs_bare_p384_ratio"] = round(snp_us / p384_us, 2)
    results["snp_cold_vs_cached_ratio"] = round(snp_cold_us / snp_us, 2)
    results["tdx_verify_cached_us"] = round(tdx_us, 1)
    results["baseline_ecdsa_p256_verify_us"] = round(p256_us, 1)
    results["tdx_cached_vs_bare_p256_ratio"] = round(tdx_us / p256_us, 2)
    results["_note"] = (
        "SNP = 1 P-384 verify + parse + bindings; TDX = 2 P-256 verifies (quote, QE report) + "
        "parse + TCB evaluation; chains and collateral signatures cached per trust store"
    )


if __name__ == "__main__":
    out: dict[str, Any] = {}
    run(out)
    for k, v in out.items():
        print(f"{k}: {v}")
