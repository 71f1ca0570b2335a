"""Fixtures for the attestation tests: the vendored real vectors and a simulated TEE authority."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from strongroom.attestation.trust import TrustStore
from strongroom.dev.simulated import SimulatedAuthority
from tests.conftest import DATA

SPR = "tdx/v4_spr_gotdxguest.dat"
# go-tdx-guest appended 39 non-zero bytes to this hardware quote "only for testing purpose"
# (SOURCES.md). A quote is judged as exactly its declared length (zero padding aside), so the tests
# use the quote itself; test_vectors checks that the file as vendored is refused TRAILING_DATA.
APPENDED_TEST_BYTES = {SPR: 39}


def read_vector(vectors: Path, name: str) -> bytes:
    """The vendored vector ``name``, less any bytes its source appended for its own tests."""
    raw = (vectors / name).read_bytes()
    return raw[: len(raw) - APPENDED_TEST_BYTES.get(name, 0)]


@pytest.fixture(scope="session")
def spr_file(vectors: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SPR quote (:data:`SPR`, without go-tdx-guest's test bytes) as a file, for the CLI."""
    path = tmp_path_factory.mktemp("vectors") / "v4_spr.dat"
    path.write_bytes(read_vector(vectors, SPR))
    return path


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
