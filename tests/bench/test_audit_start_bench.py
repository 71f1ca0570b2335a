"""``tests.bench.audit_start`` (not an area: run by hand) still runs: at the smallest size, its
series opens (the check passes on what it builds) and every figure is there. Nothing is judged."""

from __future__ import annotations

from tests.bench import audit_start


def test_the_audit_start_measurement_runs() -> None:
    figures = audit_start.measure(files=2, file_mib=0.05, repeats=1)
    assert figures["files"] == 2 and figures["records_per_file"] >= 2
    assert all(value is not None for value in figures.values())
