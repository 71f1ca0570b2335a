"""The broker memory soak (:mod:`tests.bench.brokersoak_bench`), shortened for the test suite.

The real broker process, started through the memory probe, serves 400 releases to 16 concurrent
callers over mTLS with a small HSM recycle quota (50 operations), so that the PKCS#11 module is
re-initialised several times under concurrent load. Checked: every release succeeds, the probe answers (RSS,
malloc figures, gc counts, tracemalloc, malloc_trim), the configured quota reached the broker (it
logs its recycles), the broker froze its startup objects for the collector, and the audit log
verifies with the broker's public key. No memory figure is asserted: ``python -m tests.bench.run
brokersoak`` measures the slope over 100,000 releases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from strongroom.runtime.process import PROCESS_ENV
from tests.bench.brokersoak_bench import figures, soak


@pytest.mark.slow
def test_releases_under_concurrent_load_with_recycling(
    tmp_path: Path, step_ca_binary: Path
) -> None:
    raw = soak(
        tmp_path,
        releases=400,
        recycle_after_operations=50,
        sample_every=100,
        trace_releases=40,
        step_ca_binary=step_ca_binary,
    )
    assert raw["failed"] == 0, raw["failures"]
    assert raw["process_env"] == dict(PROCESS_ENV)  # the broker runs as its images run it
    assert raw["trace"]["failed"] == 0
    assert [s["releases"] for s in raw["samples"]] == [0, 100, 200, 300, 400]
    for sample in raw["samples"]:
        assert sample["rss_kib"] > 0 and sample["malloc_in_use_kib"] > 0
        assert len(sample["gc_counts"]) == 3
    assert raw["trace"]["top"], raw["trace"]
    assert raw["trim"]["rss_after_kib"] > 0
    # Startup's objects are frozen once it serves, so the cycle collector's full collections come
    # often and cheap: python-pkcs11's per-object classes (two per release) do not pile up.
    assert raw["final"]["gc_frozen"] > 20_000, raw["final"]
    assert raw["final"]["gc_objects"] < raw["final"]["gc_frozen"], raw["final"]
    # Each release is one unwrap + re-wrap: 440 operations at 50 each is at least 7 recycles.
    log = (tmp_path / "logs" / "keybroker.log").read_text()
    assert log.count("HSM connection recycled") >= 7
    # The challenge, release and key-creation records of the run, every one verified.
    assert raw["audit"]["intact"], raw["audit"]
    assert raw["audit"]["records"] >= 440
    # Censuses where the slope's window starts (the first sample past 30 %) and at the end.
    assert [c["releases"] for c in raw["censuses"]] == [200, 400]
    report = figures(raw)
    assert report["releases"] == 400 and report["failed"] == 0
    census = report["after_full_collection"]
    assert census["releases"] == [200, 400]
    assert min(census["python_objects"]) > 0 and min(census["pymalloc_blocks"]) > 0
