"""Suite-wide fixtures: the repository root and the step-ca binary every real-CA test uses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from strongroom.pki.stepca import BINARY_ENV

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def step_ca_binary() -> Path:
    """``$STRONGROOM_STEP_CA``, or step-ca built by ``pki/step-ca/build.sh`` (a failed build fails)."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.fail(f"{BINARY_ENV}={configured} is not an executable step-ca")
        return Path(configured)
    out = REPO / ".build" / "bin" / "step-ca"
    result = subprocess.run(
        [str(REPO / "pki" / "step-ca" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"step-ca could not be built: {result.stderr.strip()[-500:]}")
    os.environ[BINARY_ENV] = str(out)
    return out
