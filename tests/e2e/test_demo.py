"""The README's first command: the lifecycle demo runs to completion as separate processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_every_step(tmp_path: Path, step_ca_binary: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "strongroom.cli.main", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in range(8):
        assert f"=== {step}." in out
    assert "MEASUREMENT_NOT_ALLOWED" in out
    assert "DATA_LOSS DECRYPTION_FAILED" in out
    assert "Demo complete" in out
