"""Every benchmark area ``make bench`` runs imports, and has the entry point the runner calls.

Benchmarks are not run by the test suite, so a benchmark importing a name a refactor removed would
otherwise break only the next ``make bench`` (as ``audit_bench`` did once).
"""

from __future__ import annotations

import importlib

import pytest

from tests.bench.run import AREAS


@pytest.mark.parametrize("area", AREAS)
def test_benchmark_area_imports(area: str) -> None:
    module = importlib.import_module(f"tests.bench.{area}_bench")
    assert callable(module.run)
