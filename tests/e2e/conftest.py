"""A real local Strongroom per test module: step-ca, SoftHSM2, key broker and model store."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.devstack import DevStack
from strongroom.pki.stepca import BINARY_ENV, repo_root


@pytest.fixture(scope="session")
def step_ca_binary() -> Path:
    """The step-ca binary, built from Debian's packaged source when missing."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        return Path(configured)
    out = repo_root() / ".build" / "bin" / "step-ca"
    result = subprocess.run(
        [str(repo_root() / "pki" / "stepca" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"step-ca could not be built: {result.stderr.strip()[-500:]}")
    return out


@pytest.fixture(scope="module")
def stack(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """step-ca + key broker + model store, in this process, over real mTLS."""
    with DevStack(tmp_path_factory.mktemp("stack"), step_ca_binary=step_ca_binary) as dev:
        dev.start_in_process("keybroker")
        dev.start_in_process("modelstore")
        yield dev
