"""``strongroom serve`` switches core dumps off for every service before it reads anything secret.

Each service runs in a child process (the limit cannot be raised again once lowered) with its core
limit raised to the hard limit, as container runtimes commonly start processes, and a configuration
that does not exist: the command stops at once, and the child reports the limit it was left with.
The inference service's crash test (tests/e2e/test_core_dumps.py) shows what the limit prevents.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strongroom.runtime.config import SERVICES

REPO = Path(__file__).resolve().parents[2]
_CHILD = (
    "import resource, sys\n"
    "hard = resource.getrlimit(resource.RLIMIT_CORE)[1]\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))\n"
    "from strongroom.cli.main import main\n"
    "code = main(['serve', sys.argv[1], '--config', sys.argv[2]])\n"
    "print(code, *resource.getrlimit(resource.RLIMIT_CORE))\n"
)


@pytest.mark.parametrize("service", SERVICES)
def test_serving_any_service_sets_the_core_limit_to_zero(service: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("STRONGROOM__")}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, service, str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    code, soft, hard = done.stdout.split()
    assert code != "0", "the service should have refused the missing configuration"
    assert (soft, hard) == ("0", "0")
