"""Every benchmark area ``make bench`` runs, at the smallest sizes that still run its code paths.

Nothing else runs the benchmarks, so an area could break unnoticed until the next ``make bench``
(``hsm`` failed on every one for several landings). Each area's ``run`` is called through
:func:`tests.bench.run.run_area` with :data:`SMOKE`'s options (tiny sizes, counts and
``scale``, :mod:`tests.bench._scale`); checked is only that it completes and records the figures
the committed ``results.json`` (what ``RESULTS.md`` and the README quote) has for it, and those
:data:`REQUIRED` adds before a ``make bench`` writes them there: every key, numbers where it has
numbers (finite), and every failure counter 0. No figure's value is judged:
these runs measure nothing. The areas write only to temporary paths; ``results.json``,
``RESULTS.md`` and ``PROFILE.md`` stay as they are (checked).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strongroom.dev.devstack import DevStack
from strongroom.dev.simulated import SimulatedAuthority
from tests.bench import release_timeline, releasecpu_bench
from tests.bench import run as bench_run
from tests.bench._child import run_in_child

MiB = 1 << 20
HERE = Path(bench_run.__file__).resolve().parent
WRITTEN_BY_MAKE_BENCH = ("results.json", "RESULTS.md", "PROFILE.md")

#: Each area's options: the smallest run that still goes through all of its phases.
SMOKE: dict[str, dict[str, Any]] = {
    "artifact": {"size_mib": 1, "stream_mib": 16},
    "anchors": {"size_mib": 1},
    "attestation": {"scale": 0.01},
    "audit": {"scale": 0.05},
    "hsm": {"scale": 0.01},
    "hsmsoak": {"releases": 60, "sample_every": 10},
    # A recycle every 4 releases and a sample every 4: each slope window has samples enough.
    "brokersoak": {
        "releases": 48,
        "callers": 4,
        "sample_every": 4,
        "trace_releases": 4,
        "shipped_recycle": 4,
        "shared_ephemeral_key": True,
    },
    "keybroker": {"releases": 16, "scale": 0.02, "shared_ephemeral_key": True},
    "releasecpu": {"releases": 16, "scale": 0.02, "profile": True, "shared_ephemeral_key": True},
    "grpcserver": {"calls": 8, "scale": 0.05},
    "modelstore": {"size": 2 * MiB, "repeats": 1},
    # 32 MB loads: the load-time ratios divide by times rounded to the millisecond (1 MB: 2 ms).
    "inference": {"load_sizes_mb": (32,), "scale": 0.01},
    "mtls": {"size": 2 * MiB, "scale": 0.01},
    # 16 MB: a ratio divides by the machine's CPU time of the bare mTLS stream, counted in 10 ms
    # ticks (3 of them at 4 MB).
    "coldstart": {"size_mb": 16, "repeats": 1},
    # No warm-up round: it touches memory for the full-size model's first rounds, and at 2 MB runs
    # only the four loads the measured round runs again.
    "multipart": {"tensors": 2, "tensor_mb": 1, "parallel": 2, "repeats": 1, "warmup": False},
    "s3": {"size": 1 * MiB, "repeats": 1},
    "abuse": {"rounds": 5},
}

#: Where the reference's keys are data rather than figure names (status counts, one key per
#: model size measured): their contents are not compared.
OPAQUE: dict[str, tuple[str, ...]] = {
    "abuse": ("streams", "uploads", "statuses", "attack_statuses"),
    "inference": ("model_load",),
}

#: Figures that are None when a run is too short to have them (documented as such by the area).
MAY_BE_NONE: dict[str, tuple[str, ...]] = {
    "brokersoak": (
        "rss_at_2k_kib",
        "rss_at_30k_kib",
        # None unless the shipped slope is positive, which a few dozen releases need not show.
        "slope_ratio_recycling_off_over_shipped",
    ),
    # None when the threaded server's CPU over a phase is under one clock tick of /proc.
    "grpcserver": ("server_cpu_us_per_call",),
    # None without a warm-up round.
    "multipart": ("warmup_s",),
}

#: Figures an area must record whether or not the committed results.json has them yet (added
#: since the last ``make bench``): their shape, checked as the reference's are.
REQUIRED: dict[str, dict[str, Any]] = {
    "coldstart": {
        "realistic_model": {
            "model": "",
            "model_mb": 0.0,
            "artifact_mb": 0.0,
            "secure_best_s": {"total": 0.0, "load": 0.0, "cpu_s": 0.0},
            "bare_mtls_stream_best_s": {"total": 0.0, "load": 0.0, "cpu_s": 0.0},
            "secure_median_s": 0.0,
            "bare_mtls_stream_median_s": 0.0,
            "ratio_secure_to_bare_mtls_stream": 0.0,
            "ratio_of_medians": 0.0,
            "load_share_secure": 0.0,
            "load_share_bare_mtls_stream": 0.0,
        }
    }
}

FAILURE_COUNTERS = ("failed", "failures", "legit_failures")
MUST_BE_TRUE = ("audit_intact", "secure_output_equals_plaintext")


def _digests() -> dict[str, str | None]:
    return {
        name: hashlib.sha256((HERE / name).read_bytes()).hexdigest()
        if (HERE / name).exists()
        else None
        for name in WRITTEN_BY_MAKE_BENCH
    }


@pytest.fixture(scope="module", autouse=True)
def _committed_results_untouched() -> Iterator[None]:
    before = _digests()
    yield
    assert _digests() == before, "a smoke run wrote tests/bench's committed results"


@pytest.fixture(scope="module", autouse=True)
def _one_simulated_chain(simulated_tee_dir: Path) -> Iterator[None]:
    """Every DevStack the areas start in this process holds the run's simulated TEE chain before
    its broker is configured, as the suite's own stacks do (``tests.conftest.stack_root``): each
    generated its own, three RSA-4096 keys (1.5-4 s) a stack (``releasecpu`` alone starts five),
    measuring nothing. A stack's chain is only ever trusted by its own broker; ``make bench``
    still generates one per stack, and areas run in a child process (``run_in_child``) do here."""
    generate = DevStack.init_simulated_tee

    def init_simulated_tee(stack: DevStack) -> Path:
        directory = stack.root / "simulated-tee"
        if not directory.exists():
            shutil.copytree(simulated_tee_dir, directory)  # copy2 keeps the keys' 0600
        return generate(stack)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DevStack, "init_simulated_tee", init_simulated_tee)
        yield


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The committed figures of every area (``make bench``'s last run)."""
    areas: dict[str, Any] = json.loads((HERE / "results.json").read_text())["areas"]
    return areas


def test_every_area_has_smoke_options() -> None:
    assert set(SMOKE) == set(bench_run.AREAS)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mismatches(area: str, reference: Any, measured: Any, path: str = "") -> Iterator[str]:
    """How ``measured`` falls short of ``reference``'s keys and kinds of value."""
    name = path.rsplit(".", 1)[-1]
    if isinstance(reference, dict):
        if not isinstance(measured, dict):
            yield f"{path}: {measured!r} is not a mapping"
            return
        if name in OPAQUE.get(area, ()):
            return
        for key, value in reference.items():
            if key.startswith("_"):
                continue  # run_area's own (_seconds, _measured_at, _vm)
            where = f"{path}.{key}".lstrip(".")
            if key not in measured:
                yield f"{where}: missing"
            else:
                yield from _mismatches(area, value, measured[key], where)
    elif _is_number(reference):
        if measured is None and name in MAY_BE_NONE.get(area, ()):
            return
        if not _is_number(measured) or not math.isfinite(measured):
            yield f"{path}: {measured!r} is not a finite number"
    elif isinstance(reference, bool | str | list) and not isinstance(measured, type(reference)):
        yield f"{path}: {measured!r} is not a {type(reference).__name__}"


def _failures(figures: Any, path: str = "") -> Iterator[str]:
    """Every failure counter that is not 0 and every check that is not true, anywhere."""
    if not isinstance(figures, dict):
        return
    for key, value in figures.items():
        where = f"{path}.{key}".lstrip(".")
        failed = key in FAILURE_COUNTERS and value not in (0, [], {})
        if failed or (key in MUST_BE_TRUE and value is not True):
            yield f"{where} = {value!r}"
        else:
            yield from _failures(value, where)


@pytest.mark.parametrize("area", bench_run.AREAS)
def test_area_runs_and_records_its_figures(
    area: str, reference: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    options = dict(SMOKE[area])
    if area == "attestation":  # the suite's simulated authority saves generating one
        authority: SimulatedAuthority = request.getfixturevalue("sim_authority")
        now: dt.datetime = request.getfixturevalue("sim_now")
        options |= {"authority": authority, "now": now}
    if area == "releasecpu":
        options["profile_md"] = tmp_path / "PROFILE.md"
    figures = bench_run.run_area(area, **options)
    json.dumps(figures, allow_nan=False)  # results.json takes them as they are
    missing = list(_mismatches(area, reference[area], figures))
    missing += _mismatches(area, REQUIRED.get(area, {}), figures)
    # A figure dropped on purpose leaves results.json with the next `make bench`.
    assert missing == [], f"{area} does not record what results.json or REQUIRED has: {missing}"
    assert list(_failures(figures)) == []
    if area == "releasecpu":
        assert "| 1 |" in options["profile_md"].read_text()


def test_runner_writes_where_it_is_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRONGROOM_BENCH_ARTIFACT_MIB", "1")
    monkeypatch.setenv("STRONGROOM_BENCH_ARTIFACT_STREAM_MIB", "16")
    out, markdown = tmp_path / "results.json", tmp_path / "RESULTS.md"
    argv = ["artifact", "--out", str(out), "--markdown", str(markdown)]
    assert bench_run.main(argv) == 0
    assert set(json.loads(out.read_text())["areas"]) == {"artifact"}
    assert "| throughput.sha256_gbps |" in markdown.read_text()


def test_the_checks_catch_what_they_are_for() -> None:
    reference = {"a": {"n": 1.5, "ok": True, "_seconds": 3}, "counts": {"OK": 3}, "s": "x"}
    assert list(_mismatches("abuse", reference, {"a": {"n": 2, "ok": True}, "s": "y"})) == [
        "counts: missing"
    ]
    measured = {"a": {"n": None, "ok": 1}, "counts": {"OK": 1}, "s": "y"}
    assert list(_mismatches("abuse", reference, measured)) == [
        "a.n: None is not a finite number",
        "a.ok: 1 is not a bool",
    ]
    assert list(_mismatches("x", {"n": 1}, {"n": math.nan})) == ["n: nan is not a finite number"]
    # Status counts are data: whichever statuses a run saw.
    assert list(_mismatches("abuse", {"statuses": {"OK": 3}}, {"statuses": {}})) == []
    figures = {"failed": 0, "x": {"legit_failures": 2, "audit_intact": False}, "failures": []}
    assert list(_failures(figures)) == ["x.legit_failures = 2", "x.audit_intact = False"]


def test_the_snapshot_launcher_serves_another_revisions_broker_package(tmp_path: Path) -> None:
    """``releasecpu``'s A/B against a revision runs that revision's ``strongroom.keybroker``
    (extracted with ``git archive``, its C release calls alongside), the rest from this checkout."""
    launcher = releasecpu_bench.snapshot_launcher("HEAD", tmp_path)
    package = tmp_path / "services" / "keybroker"
    assert launcher[-1] == str(package)
    assert list(package.glob("_p11release.*.so"))
    # Marks the extracted package, to see that the launched broker imports it, not this checkout's.
    with (package / "__init__.py").open("a") as init:
        init.write('\nprint("keybroker from the snapshot")\n')
    shown = subprocess.run(
        [*launcher, "--help"], stdout=subprocess.PIPE, text=True, check=True, timeout=120
    )
    assert "keybroker from the snapshot" in shown.stdout


def test_the_release_timeline_stamps_every_step_of_a_lone_release() -> None:
    """``release_timeline`` (not an area: run by hand) in its child process, as its command line
    runs it: its wrappers replace functions for the whole process, so never in this one."""
    figures = run_in_child(release_timeline.CHILD_MODULE, "keybroker", {"releases": 3})
    assert figures["releases"] == 3
    spans = figures["spans_us_p50"]
    steps = ("client.ReleaseKey", "engine.release", "verify._verify_signature", "audit.append")
    for step in (*steps, "os.fsync", "os.fdatasync", "hsm.C_rewrap+read", "answer.sign"):
        assert math.isfinite(spans[step]) and spans[step] > 0, step
    assert figures["rows"][0]["stamp"] == "client.GetChallenge>"
    assert {row["thread"] for row in figures["rows"]} >= {"MainThread", "hsm-strongroom-dev"}
