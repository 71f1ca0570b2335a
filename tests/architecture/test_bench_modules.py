"""Every benchmark area ``make bench`` runs imports, and has the entry point the runner calls.

A benchmark importing a name a refactor removed would otherwise break only the next ``make bench``
(as ``audit_bench`` did once); ``tests/bench/test_bench_smoke.py`` then runs every area, at tiny
sizes.
"""

from __future__ import annotations

import importlib
import re

import pytest

from tests.bench.run import AREAS
from tests.conftest import REPO


@pytest.mark.parametrize("area", AREAS)
def test_benchmark_area_imports(area: str) -> None:
    module = importlib.import_module(f"tests.bench.{area}_bench")
    assert callable(module.run)


_BROKER_START = re.compile(r'start_(?:in_)?process\(\s*"keybroker"(?P<args>[^)]*)\)')


def test_every_broker_a_benchmark_starts_sets_its_release_grant_budget() -> None:
    """The benchmarks and the soak release hundreds of keys a second from one identity: a broker
    started with the default grant budget would refuse all but the first thousand, and their
    figures would time ``RELEASES_RATE_LIMITED`` refusals (``tests/bench/_budget.py``)."""
    starts = 0
    for path in [*sorted((REPO / "tests" / "bench").glob("*.py")), REPO / "tests/soak/run.py"]:
        text = path.read_text()
        for start in _BROKER_START.finditer(text):
            starts += 1
            args = start.group("args")
            assert "bench_broker_section" in args or (
                "section" in args and "section = bench_broker_section(" in text
            ), f"{path.name}: {start.group(0)!r} starts a broker with the default grant budget"
    assert starts >= 8
