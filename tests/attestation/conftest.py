"""Fixtures for the attestation tests: the shared real vectors and a simulated TEE authority."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from strongroom.attestation.simulated import SimulatedAuthority
from strongroom.attestation.trust import TrustStore

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def vectors_dir() -> Path | None:
    """The shared attestation vectors: $STRONGROOM_ATTESTATION_VECTORS or ../shared beside the repo."""
    env = os.environ.get("STRONGROOM_ATTESTATION_VECTORS")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "attestation-vectors")
    for path in candidates:
        if (path / "SOURCES.md").is_file():
            return path
    return None


@pytest.fixture(scope="session")
def vectors() -> Path:
    path = vectors_dir()
    if path is None:
        pytest.skip("shared attestation vectors not found (set STRONGROOM_ATTESTATION_VECTORS)")
    return path


@pytest.fixture(scope="session")
def production() -> TrustStore:
    return TrustStore.production()


@pytest.fixture(scope="session")
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="session")
def authority(now: dt.datetime) -> SimulatedAuthority:
    return SimulatedAuthority.generate(now=now)


@pytest.fixture(scope="session")
def sim_trust(authority: SimulatedAuthority) -> TrustStore:
    return authority.trust_store()


@pytest.fixture(scope="session")
def other_authority(now: dt.datetime) -> SimulatedAuthority:
    """A second, unrelated simulated PKI (a 'foreign' root)."""
    return SimulatedAuthority.generate(now=now)
