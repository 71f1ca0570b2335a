"""Every benchmark area ``make bench`` runs imports, and has the entry point the runner calls.

A benchmark importing a name a refactor removed would otherwise break only the next ``make bench``
(as ``audit_bench`` did once); ``tests/bench/test_bench_smoke.py`` then runs every area, at tiny
sizes.
"""

from __future__ import annotations

import importlib

import pytest

from tests.bench.run import AREAS


@pytest.mark.parametrize("area", AREAS)
def test_benchmark_area_imports(area: str) -> None:
    module = importlib.import_module(f"tests.bench.{area}_bench")
    assert callable(module.run)
