"""Fixtures for the attestation tests: the vendored real vectors and a simulated TEE authority."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from strongroom.attestation.trust import TrustStore
from strongroom.dev.simulated import SimulatedAuthority
from tests.conftest import DATA


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The real attestation vectors vendored in ``tests/data/attestation`` (see its SOURCES.md)."""
    return DATA / "attestation"


@pytest.fixture(scope="session")
def production() -> TrustStore:
    return TrustStore.production()


@pytest.fixture(scope="session")
def now(sim_now: dt.datetime) -> dt.datetime:
    return sim_now


@pytest.fixture(scope="session")
def authority(sim_authority: SimulatedAuthority) -> SimulatedAuthority:
    """The run's simulated authority (``tests/conftest.py``), generated at :func:`now`."""
    return sim_authority


@pytest.fixture(scope="session")
def sim_trust(authority: SimulatedAuthority) -> TrustStore:
    return authority.trust_store()


@pytest.fixture(scope="session")
def other_authority(now: dt.datetime) -> SimulatedAuthority:
    """A second, unrelated simulated PKI (a 'foreign' root)."""
    return SimulatedAuthority.generate(now=now)


@pytest.fixture(scope="session")
def genoa(now: dt.datetime) -> SimulatedAuthority:
    """A simulated Genoa PKI (ARK-Genoa, SEV-Genoa), for the run."""
    return SimulatedAuthority.generate(product="Genoa", now=now)
