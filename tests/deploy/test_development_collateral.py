"""The chart's development broker holds the simulated chain's collateral.

The broker judges evidence only with collateral from its own cache; no vendor service has the
simulated chain's, and the chart filled nothing, so every release of a development install (the
simulated TEE) was refused COLLATERAL_MISSING. The compose bootstrap and the dev stack fill it; the
chart now does too, in an init container whose command this test runs for real.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from strongroom.attestation import CollateralUnavailable, Evidence, TeeType, verify_evidence
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.reasons import Reason
from tests.deploy.conftest import DEPLOY, kind, render

DEVELOPMENT = (DEPLOY / "helm" / "values-development.yaml",)
SIMULATED_TEE = "/var/lib/strongroom/simulated-tee"
COLLATERAL = "/var/lib/strongroom/collateral"
REPORT_DATA = hashlib.sha512(b"helm development collateral").digest()
MEASUREMENT = bytes(range(48))


def _broker_init(docs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    (broker,) = [d for d in kind(docs, "Deployment") if d["metadata"]["name"].endswith("keybroker")]
    found = [c for c in broker["spec"]["template"]["spec"]["initContainers"] if c["name"] == name]
    return found[0] if found else None


def test_development_fills_the_brokers_cache_with_the_simulated_collateral(
    helm: str,
    tmp_path: Path,
    simulated_tee_dir: Path,
    sim_authority: SimulatedAuthority,
    sim_now: dt.datetime,
) -> None:
    init = _broker_init(render(helm, DEVELOPMENT), "simulated-collateral")
    assert init is not None, "nothing fills the development broker's collateral cache"
    mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    assert mounts[SIMULATED_TEE]["name"] == "simulated-tee" and mounts[SIMULATED_TEE]["readOnly"]
    assert mounts[COLLATERAL]["name"] == "collateral" and not mounts[COLLATERAL].get("readOnly")
    assert init["image"].endswith("-softhsm")  # the image with the development kit
    # The pod's paths, as the broker's configuration names them, become this test's.
    cache_dir = tmp_path / "collateral"
    cache_dir.mkdir()
    where = {SIMULATED_TEE: str(simulated_tee_dir), COLLATERAL: str(cache_dir)}
    command = [where.get(arg, arg) for arg in init["command"]]
    assert command[0] == "python3"
    result = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr

    # What the broker then reads (read-only, as a replica would) judges both simulated TEEs with
    # complete collateral: no release is refused COLLATERAL_MISSING.
    trust = sim_authority.trust_store()
    cache = CollateralCache(cache_dir, trust, writable=False)
    snp = sim_authority.snp().evidence(REPORT_DATA, measurement=MEASUREMENT)  # with its VCEK
    tdx = Evidence(TeeType.TDX, sim_authority.tdx().quote(REPORT_DATA, mrtd=MEASUREMENT))
    for evidence in (snp, tdx):
        claims = verify_evidence(evidence, trust=trust, now=sim_now, collateral=cache)
        assert claims.collateral_complete, evidence.tee_type
    # The same evidence against an empty cache: what a development install got before.
    empty = CollateralCache(tmp_path / "empty", trust)
    with pytest.raises(CollateralUnavailable) as refused:
        verify_evidence(snp, trust=trust, now=sim_now, collateral=empty)
    assert refused.value.reason == Reason.COLLATERAL_MISSING


@pytest.mark.parametrize(
    "set_args",
    [
        (),  # production: no simulated chain at all
        # Another writer fills a shared cache.
        (
            "keybroker.collateral.readOnly=true",
            "keybroker.collateral.persistence.existingClaim=collateral",
        ),
    ],
)
def test_only_a_development_broker_with_its_own_cache_fills_it(
    helm: str, set_args: tuple[str, ...]
) -> None:
    files = DEVELOPMENT if set_args else None
    assert _broker_init(render(helm, files, set_args), "simulated-collateral") is None
