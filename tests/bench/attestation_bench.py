"""Attestation verification micro-benchmark.

Measures, in one run: verify time per SEV-SNP report with a cached VCEK chain, per TDX quote with a
cached PCK chain and cached collateral, and the cold (first, uncached) SNP chain verification; each
against a bare ECDSA verify of the same curve and message size measured in the same run, reported
as a ratio.

Collateral: the release path now judges with the broker's own collateral from its on-disk cache
(CRLs for every chain, TCB info and QE identity). ``*_with_cache_us`` is that verification;
``*_before_us`` is the verification the release path did before (SNP: no CRL; TDX: TCB info and QE
identity without CRLs), measured in the same run; their ratio is the collateral's cost.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.attestation import StaticCollateralSource, verify_evidence
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.dev.simulated import SimulatedAuthority
from tests.bench._scale import scaled


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


def _bare_ecdsa(
    curve: ec.EllipticCurve,
    hash_alg: hashes.HashAlgorithm,
    size: int,
    per_call: Callable[[Callable[[], Any]], float],
) -> float:
    key = ec.generate_private_key(curve)
    msg = b"\x5a" * size
    sig = key.sign(msg, ec.ECDSA(hash_alg))
    pub = key.public_key()
    return per_call(lambda: pub.verify(sig, msg, ec.ECDSA(hash_alg)))


def run(
    results: dict[str, Any],
    *,
    scale: float = 1.0,
    authority: SimulatedAuthority | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Records per-verification times (µs) and ratios against bare ECDSA verifies.

    ``scale`` shortens every measurement (:mod:`tests.bench._scale`); ``authority`` (issued at
    ``now``) saves generating a simulated TEE authority.
    """

    def per_call(fn: Callable[[], Any], *, min_calls: int = 50) -> float:
        return _per_call(fn, min_seconds=0.5 * scale, min_calls=scaled(min_calls, scale))

    if authority is None:
        now = dt.datetime.now(dt.UTC)
        authority = SimulatedAuthority.generate(now=now)
    elif now is None:
        raise ValueError("pass the time the authority was generated at with it")
    # A temporary directory, not mkdtemp: every test run (the smoke test's) would leave one.
    with tempfile.TemporaryDirectory(prefix="bench-collateral-") as collateral:
        _measure(results, authority, now, per_call, Path(collateral))


def _measure(
    results: dict[str, Any],
    authority: SimulatedAuthority,
    now: dt.datetime,
    per_call: Callable[..., float],
    collateral: Path,
) -> None:
    trust = authority.trust_store()
    report_data = hashlib.sha512(b"bench").digest()

    tdx = authority.tdx()
    cache = CollateralCache(collateral, trust)
    authority.fill_cache(cache, tdx=[tdx], now=now)
    before_tdx = StaticCollateralSource(
        tcb_infos=(tdx.tcb_info(now=now),),
        qe_identity=tdx.qe_identity(now=now),
        signing_chain=authority.tcb_signing_chain_pem(),
    )

    snp = authority.snp()
    snp_ev = snp.evidence(report_data, measurement=bytes(48))

    def snp_new() -> Any:
        return verify_evidence(snp_ev, trust=trust, now=now, collateral=cache)

    def snp_before() -> Any:
        return verify_evidence(snp_ev, trust=trust, now=now, require_collateral=False)

    snp_new()
    snp_us = per_call(snp_new) * 1e6
    snp_before_us = per_call(snp_before) * 1e6
    snp_us = min(snp_us, per_call(snp_new) * 1e6)  # interleaved: both see the same machine

    def cold() -> None:
        trust.cache.clear()
        snp_new()

    snp_cold_us = per_call(cold, min_calls=20) * 1e6
    p384_us = _bare_ecdsa(ec.SECP384R1(), hashes.SHA384(), 0x2A0, per_call) * 1e6

    from strongroom.attestation import Evidence, TeeType

    tdx_ev = Evidence(TeeType.TDX, tdx.quote(report_data, mrtd=bytes(48)))

    def tdx_new() -> Any:
        return verify_evidence(tdx_ev, trust=trust, now=now, collateral=cache)

    def tdx_before() -> Any:
        return verify_evidence(
            tdx_ev, trust=trust, now=now, collateral=before_tdx, require_collateral=False
        )

    tdx_new()
    tdx_us = per_call(tdx_new) * 1e6
    tdx_before_us = per_call(tdx_before) * 1e6
    tdx_us = min(tdx_us, per_call(tdx_new) * 1e6)
    p256_us = _bare_ecdsa(ec.SECP256R1(), hashes.SHA256(), 632, per_call) * 1e6

    results["snp_verify_with_cache_us"] = round(snp_us, 1)
    results["snp_verify_before_us"] = round(snp_before_us, 1)
    results["snp_collateral_cost_ratio"] = round(snp_us / snp_before_us, 2)
    results["tdx_verify_with_cache_us"] = round(tdx_us, 1)
    results["tdx_verify_before_us"] = round(tdx_before_us, 1)
    results["tdx_collateral_cost_ratio"] = round(tdx_us / tdx_before_us, 2)
    results["snp_verify_cached_us"] = round(snp_us, 1)
    results["snp_verify_cold_chain_us"] = round(snp_cold_us, 1)
    results["baseline_ecdsa_p384_verify_us"] = round(p384_us, 1)
    results["snp_cached_vs_bare_p384_ratio"] = round(snp_us / p384_us, 2)
    results["snp_cold_vs_cached_ratio"] = round(snp_cold_us / snp_us, 2)
    results["tdx_verify_cached_us"] = round(tdx_us, 1)
    results["snp_extra_us_per_release"] = round(snp_us - snp_before_us, 1)
    results["tdx_extra_us_per_release"] = round(tdx_us - tdx_before_us, 1)
    results["baseline_ecdsa_p256_verify_us"] = round(p256_us, 1)
    results["tdx_cached_vs_bare_p256_ratio"] = round(tdx_us / p256_us, 2)
    results["_note"] = (
        "SNP = 1 P-384 verify + parse + bindings + ARK CRL check; TDX = 2 P-256 verifies (quote, "
        "QE report) + parse + TCB evaluation + PCK/root CRL checks; chains, CRL and collateral "
        "signatures cached; collateral served from the broker's on-disk cache (in memory, "
        "reloaded when it changes)"
    )


if __name__ == "__main__":
    out: dict[str, Any] = {}
    run(out)
    for k, v in out.items():
        print(f"{k}: {v}")
