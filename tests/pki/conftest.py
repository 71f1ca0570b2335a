"""Fixtures for the PKI tests: a real CA per test, the broker's and the inference server's
identities from the module's CA (``ca``, in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.pki import StepCa, WorkloadIdentity
from tests.pki.helpers import enrol, new_ca


@pytest.fixture
def own_ca(step_ca_binary: Path, tmp_path: Path) -> Iterator[StepCa]:
    """A real step-ca for one test (for tests that stop or restart it)."""
    running = new_ca(tmp_path / "ca", step_ca_binary)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server_identity(ca: StepCa) -> Iterator[WorkloadIdentity]:
    """The key broker's identity (DNS SAN ``keybroker``), no background renewal."""
    identity = enrol(ca, "keybroker", ["keybroker"], auto_renew=False)
    yield identity
    identity.close()


@pytest.fixture(scope="module")
def client_identity(ca: StepCa) -> Iterator[WorkloadIdentity]:
    """The inference server's identity, no background renewal."""
    identity = enrol(ca, "inference", auto_renew=False)
    yield identity
    identity.close()
