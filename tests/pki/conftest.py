"""Fixtures for the PKI tests: the step-ca binary (built once), a real CA per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.pki import StepCa, WorkloadIdentity
from tests.pki.helpers import enrol, new_ca


@pytest.fixture(scope="module")
def ca(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepCa]:
    """A real step-ca with its own fresh CA, shared by one test module."""
    running = new_ca(tmp_path_factory.mktemp("ca") / "ca", step_ca_binary)
    try:
        yield running
    finally:
        running.stop()


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
