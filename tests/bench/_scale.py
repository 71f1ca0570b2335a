"""Fixed sample counts of a benchmark area, scaled down for the CI smoke test.

An area's ``run(results, *, scale=...)`` multiplies the counts it does not take as arguments of
their own (warm-up calls, samples, rounds, minimums) by ``scale``: 1.0, the default, is what
``make bench`` measures; ``tests/bench/test_bench_smoke.py`` runs every area with a small one, to
show the area still runs and records its figures, not to measure anything.
"""

from __future__ import annotations


def scaled(count: int, scale: float) -> int:
    """``count`` at ``scale``, at least 1 (``count`` itself at 1.0)."""
    if scale == 1.0:
        return count
    return max(1, round(count * scale))
