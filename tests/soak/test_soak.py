"""The soak/fault run, shortened for the test suite (``make soak`` runs the long one).

Short certificates (every service rotates at least three times), concurrent releasers and
inference clients, LoadModel in a loop, the broker and the store restarted mid-run and the HSM
token taken away and put back: no operation may fail after its documented bounded retry, and the
audit log must verify with the broker's public key. RSS slopes are reported, not asserted here
(a 26-second run is too short for them; ``make soak`` reports them over minutes). The run is as
short as its checks allow: 10-second certificates (the development CA's minimum) renew about every
6.7 s, so every service shows its first certificate and three renewals within 26 s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from strongroom.runtime.process import SERVICE_ENV
from tests.soak.run import Soak, SoakConfig

_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _without_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    tunables = env.get("GLIBC_TUNABLES", "").split(":")
    kept = ":".join(t for t in tunables if not t.startswith("glibc.malloc.hugetlb="))
    return {**env, "GLIBC_TUNABLES": kept}


@pytest.mark.slow
def test_short_soak_under_faults(tmp_path: Path, step_ca_binary: Path) -> None:
    soak = Soak(
        tmp_path / "stack",
        SoakConfig(
            duration=26, cert_lifetime=10, releasers=4, inference_clients=2, census_interval=0.25
        ),
        step_ca_binary=step_ca_binary,
    )
    try:
        report = soak.run()
    finally:
        soak.close()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    assert report["failed_total"] == 0, report["failures"]
    assert report["audit"]["intact"], report["audit"]
    assert all(report["ok"].get(kind, 0) > 0 for kind in ("release", "infer", "load")), report["ok"]
    events = [what for _, what in report["events"]]
    assert {"keybroker serving again", "modelstore serving again", "HSM token restored"} <= set(
        events
    )
    for name, entry in report["rss"].items():  # the memory probe answered in every service
        assert [c["label"] for c in entry["censuses"]] == ["window start", "end"], name
    # Every service ran with the environment it ships with (the development stack sets it), and
    # inference's malloc put its heap on huge pages (glibc erases that tunable from the process's
    # environment once applied, so it is checked by its effect).
    seen = {name: _without_huge_pages(env) for name, env in report["process_env"].items()}
    assert seen == {name: _without_huge_pages(SERVICE_ENV[name]) for name in report["rss"]}
    if _THP_MODE.exists() and "[never]" not in _THP_MODE.read_text():
        assert report["anon_huge_pages_kib"]["inference"] > 0, report["anon_huge_pages_kib"]
    # The first certificate plus at least three renewals, for every service.
    assert all(n >= 4 for n in report["certificates_seen"].values()), report["certificates_seen"]
