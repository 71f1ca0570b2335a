"""A real local Strongroom per test module: step-ca, SoftHSM2, key broker and model store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.dev.devstack import DevStack


@pytest.fixture(scope="module")
def stack(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """step-ca + key broker + model store, in this process, over real mTLS."""
    with DevStack(tmp_path_factory.mktemp("stack"), step_ca_binary=step_ca_binary) as dev:
        dev.start_in_process("keybroker")
        dev.start_in_process("modelstore")
        yield dev
