"""Runs a benchmark's measurement in a child process with a service's shipped process environment.

glibc and gRPC read that environment (:data:`strongroom.runtime.process.SERVICE_ENV`) when the
process starts, so a benchmark that runs a service inside its own process measures it as shipped
only in a child started with it. The child runs ``python -m <module> '<options as JSON>'``, the
module calling :func:`child_main`, and prints its figures as JSON on its last line of output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from strongroom.runtime.process import SERVICE_ENV


def run_in_child(module: str, service: str, options: dict[str, Any]) -> dict[str, Any]:
    """The figures ``module``'s measurement returned in a child with ``service``'s environment;
    ``process_env`` records that environment."""
    child = subprocess.run(
        [sys.executable, "-m", module, json.dumps(options)],
        env={**os.environ, **SERVICE_ENV[service]},
        stdout=subprocess.PIPE,
        check=True,
        timeout=3600,
    )
    figures: dict[str, Any] = json.loads(child.stdout.decode().strip().splitlines()[-1])
    figures["process_env"] = dict(SERVICE_ENV[service])
    return figures


def child_main(measure: Callable[..., None]) -> None:
    """The child's side: ``measure(figures, **options)``, then the figures on one line."""
    figures: dict[str, Any] = {}
    measure(figures, **json.loads(sys.argv[1]))
    print(json.dumps(figures), flush=True)
