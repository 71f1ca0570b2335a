"""Broker memory per release: the real key broker under 16 concurrent releasers over mTLS.

Issue 12 item 2. The broker runs as its own process (``strongroom serve keybroker`` on a fresh
DevStack: real step-ca, SoftHSM2, mTLS) through :mod:`tests.bench._memprobe`, which this benchmark
asks for RSS, glibc's malloc figures and gc counts every :data:`SAMPLE_EVERY` releases.
:data:`CALLERS` simulated VMs (:class:`tests.bench.keybroker_bench._Caller`: GetChallenge, then
ReleaseKey with a signed report) share :data:`RELEASES` releases. The slope of RSS (KiB per 1,000
releases, least squares) is taken after 30% of the run (warm-up), and also from 50% and 70%, from
one sample per HSM recycle (every 2,000 releases by default): between recycles SoftHSM2's session
objects draw a ~0.5 MB sawtooth, and samples at alternating phases of it made the slopes of short
windows swing by tens of KiB per 1,000. That needs recycles exactly 2,000 releases apart: only
operations that create objects count toward the quota. While the readiness loop's health checks
(two a second) counted too, each recycle fell ~20 operations later than the one before, and the
samples climbed the sawtooth by ~3.9 KiB per 1,000 releases that were not growth.

Configurations, one after the other, each on its own fresh stack:

- ``shipped``: the default configuration (``keybroker.hsm_recycle_after_operations``: the PKCS#11
  module re-initialised every N operations so that SoftHSM2 frees its session objects);
- ``recycling_off``: the same with ``hsm_recycle_after_operations: 0`` — the baseline, what the
  broker did before recycling;
- ``eventengine_endpoints``: the shipped configuration with ``GRPC_EXPERIMENTS`` empty, i.e. gRPC's
  default EventEngine endpoints, which lose ~128 bytes about every 0.75 s under load (see
  :mod:`strongroom.runtime.process`) — the baseline for that setting;
- one more per entry of ``STRONGROOM_BENCH_BROKERSOAK_ENVS`` (``;``-separated ``NAME=VALUE[,...]``
  lists, e.g. ``MALLOC_ARENA_MAX=2``), the shipped configuration with that environment.

After the measured releases of ``shipped``, a diagnosis phase that is not part of the slope:
tracemalloc on for :data:`TRACE_RELEASES` more releases (the Python heap's growth and the lines
it came from, to tell Python from native growth) and ``malloc_trim(0)`` (what glibc kept but
could return). Every configuration also takes a census (memprobe ``census``: a full collection,
then malloc's bytes in use, Python's live objects by type and pymalloc's blocks) where the slope's
window starts and at the end: with garbage collected on both sides, those figures are much less
noisy than the samples', and they tell Python objects from native memory. Each configuration ends
with ``strongroom audit verify`` of its log with the broker's public key. The load average is
recorded at every sample: the machine is shared.

Usage: ``python -m tests.bench.run brokersoak``; ``STRONGROOM_BENCH_BROKERSOAK_RELEASES`` sets the
releases per configuration (default :data:`RELEASES`).

The broker is started with its release grant budget set explicitly out of reach
(``tests/bench/_budget.py``): its callers release about 320 keys a second, 100,000 in a run, from
one inference identity, far past the default budget (1,024 at once, then 8 a second, per SPIFFE
ID), which would otherwise turn all but the first thousand into ``RELEASES_RATE_LIMITED`` refusals
and time those instead.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from strongroom.dev.devstack import DevStack
from strongroom.keybroker.audit import load_public_key
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.keybroker.config import KeybrokerConfig
from tests.bench import _memprobe
from tests.bench._budget import bench_broker_section
from tests.bench._proc import process_env
from tests.bench.keybroker_bench import FLEET_SERVER, _Caller, caller_factory

RELEASES = 100_000
CALLERS = 16
SAMPLE_EVERY = 1_000
TRACE_RELEASES = 5_000
WARMUPS = (0.3, 0.5, 0.7)
RELEASES_ENV = "STRONGROOM_BENCH_BROKERSOAK_RELEASES"
ENVS_ENV = "STRONGROOM_BENCH_BROKERSOAK_ENVS"
GOAL_KIB_PER_1000 = 1.0
_RECYCLE_FIELD = KeybrokerConfig.__dataclass_fields__["hsm_recycle_after_operations"]
assert isinstance(_RECYCLE_FIELD.default, int)
DEFAULT_RECYCLE: int = _RECYCLE_FIELD.default
# The probe module must be importable by the broker's process whatever its working directory.
_REPO = str(Path(__file__).resolve().parents[2])


def _drive(callers: list[_Caller], releases: int, on_sample: Any, every: int) -> dict[str, Any]:
    """Runs ``releases`` releases over ``callers`` (one thread each); calls ``on_sample(n)`` when
    n releases are done, for each multiple n of ``every``, with none in flight: the callers pause
    at each multiple until the sample is taken, so a sample never counts the memory of requests
    half-way through (16 of them scattered single RSS samples by a few hundred KiB)."""
    cond = threading.Condition()
    state = {"claimed": 0, "done": 0, "failed": 0, "sampled": 0}
    failures: list[str] = []

    def work(caller: _Caller) -> None:
        while True:
            with cond:
                while (
                    state["claimed"] < releases
                    and state["claimed"] % every == 0
                    and state["claimed"] > state["sampled"]
                ):
                    cond.wait()  # the sample at this multiple is not taken yet
                if state["claimed"] >= releases:
                    return
                state["claimed"] += 1
            try:
                caller.release()
            except Exception as exc:  # counted and reported; the run goes on
                with cond:
                    state["failed"] += 1
                    if len(failures) < 10:
                        failures.append(repr(exc)[:300])
            with cond:
                state["done"] += 1
                n = state["done"]
            if n % every == 0:  # claims stop at multiples: n == claimed, nothing in flight
                on_sample(n)
                with cond:
                    state["sampled"] = n
                    cond.notify_all()

    threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in callers]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "seconds": time.perf_counter() - started,
        "failed": state["failed"],
        "failures": failures,
    }


def soak(
    root: Path,
    *,
    releases: int,
    recycle_after_operations: int | None = None,
    env: Mapping[str, str] | None = None,
    callers: int = CALLERS,
    sample_every: int = SAMPLE_EVERY,
    trace_releases: int = 0,
    step_ca_binary: Path | None = None,
    shared_ephemeral_key: bool = False,
) -> dict[str, Any]:
    """One configuration on a fresh stack under ``root``; returns the raw samples and outcomes.

    ``recycle_after_operations`` None keeps the broker's default configuration. The broker's log
    stays at ``root/logs/keybroker.log``.
    """
    with DevStack(root, step_ca_binary=step_ca_binary) as stack:
        section = bench_broker_section(stack)
        if recycle_after_operations is not None:
            section["hsm_recycle_after_operations"] = recycle_after_operations
        probe = root / "memprobe.sock"
        broker = stack.start_process(
            "keybroker",
            section,
            server=FLEET_SERVER,
            env={
                _memprobe.ENV: str(probe),
                "PYTHONPATH": os.pathsep.join(filter(None, (_REPO, os.environ.get("PYTHONPATH")))),
                **(env or {}),
            },
            launcher=(sys.executable, "-m", "tests.bench._memprobe"),
        )
        assert broker.process is not None
        shipped_env = process_env(broker.process.pid)
        make_caller = caller_factory(stack, shared_ephemeral_key=shared_ephemeral_key)
        vms = [make_caller() for _ in range(callers)]
        samples: list[dict[str, Any]] = [
            {"releases": 0, "load1": os.getloadavg()[0], **_memprobe.ask(probe, "sample")}
        ]

        # Two censuses (after a full collection): where the slope's window starts, and the end.
        start = -(-int(releases * WARMUPS[0]) // sample_every) * sample_every
        censuses: dict[int, dict[str, Any]] = {}

        def on_sample(n: int) -> None:
            samples.append(
                {"releases": n, "load1": os.getloadavg()[0]} | _memprobe.ask(probe, "sample")
            )
            if n in (start, releases):
                censuses[n] = _memprobe.ask(probe, "census")

        outcome = _drive(vms, releases, on_sample, sample_every)
        samples.sort(key=lambda s: int(s["releases"]))
        # Slopes from one sample per recycle (see _slope); every sample without recycling.
        quota = section.get("hsm_recycle_after_operations", DEFAULT_RECYCLE)
        period = quota if quota and quota % sample_every == 0 else sample_every
        raw: dict[str, Any] = {
            "samples": samples,
            "censuses": [censuses[n] | {"releases": n} for n in sorted(censuses)],
            **outcome,
            "process_env": shipped_env,
            "slope_period": period,
        }
        if trace_releases:
            _memprobe.ask(probe, "trace_start", frames=1)
            traced = _drive(vms, trace_releases, lambda n: None, trace_releases)
            top = _memprobe.ask(probe, "trace_top", limit=8)
            raw["trace"] = {"releases": trace_releases, "failed": traced["failed"], **top}
            raw["trim"] = _memprobe.ask(probe, "trim")
        raw["final"] = _memprobe.ask(probe, "sample")
        public = load_public_key((stack.secrets_dir / "audit-key.pub.pem").read_bytes())
        audit = verify_audit_log(root / "state" / "keybroker" / "audit.log", public_key=public)
        raw["audit"] = {"intact": audit.intact, "records": audit.records, "problem": audit.problem}
        return raw


def _window(
    samples: list[dict[str, Any]], field: str, start: float, period: int
) -> tuple[Any, Any]:
    """(releases in thousands, ``field``) of the samples after the first ``start`` of the run
    that were taken every ``period`` releases: one per HSM recycle, so all at the same phase of the
    sawtooth that SoftHSM2's session objects draw between recycles (~0.5 MB high just before one)."""
    last = samples[-1]["releases"]
    kept = [s for s in samples if s["releases"] >= start * last and s["releases"] % period == 0]
    x = np.array([s["releases"] for s in kept], dtype=float) / 1000
    y = np.array([s[field] for s in kept], dtype=float)
    return x, y


def _slope(samples: list[dict[str, Any]], field: str, start: float, period: int) -> float | None:
    """KiB of ``field`` per 1,000 releases over :func:`_window` (least squares)."""
    x, y = _window(samples, field, start, period)
    if len(x) < 3:
        return None
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def _slope_error(samples: list[dict[str, Any]], start: float, period: int) -> float | None:
    """The standard error of the RSS slope of :func:`_slope` (KiB per 1,000 releases): how
    uncertain the scatter of the samples leaves it."""
    x, y = _window(samples, "rss_kib", start, period)
    if len(x) < 4:
        return None
    _, cov = np.polyfit(x, y, 1, cov=True)
    return round(float(np.sqrt(cov[0][0])), 3)


def _rss_at(samples: list[dict[str, Any]], releases: int) -> int | None:
    return next((s["rss_kib"] for s in samples if s["releases"] == releases), None)


def _every_10k(samples: list[dict[str, Any]], field: str) -> list[Any]:
    return [s[field] for s in samples if s["releases"] % 10_000 == 0]


def _census_figures(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Two censuses compared: malloc's bytes in use, Python's live objects and pymalloc's blocks,
    each after a full collection, so that neither garbage nor the sampling's noise counts."""
    releases = last["releases"] - first["releases"]
    before, after = first["by_type"], last["by_type"]
    grown = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in before | after}
    most = sorted((kind for kind in grown if grown[kind]), key=lambda kind: -abs(grown[kind]))
    return {
        "releases": [first["releases"], last["releases"]],
        "malloc_in_use_kib": [first["malloc_in_use_kib"], last["malloc_in_use_kib"]],
        "malloc_in_use_kib_per_1000_releases": round(
            (last["malloc_in_use_kib"] - first["malloc_in_use_kib"]) / releases * 1000, 3
        ),
        "rss_kib": [first["rss_kib"], last["rss_kib"]],
        "python_objects": [first["gc_objects"], last["gc_objects"]],
        "pymalloc_blocks": [first["pymalloc_blocks"], last["pymalloc_blocks"]],
        "threads": [first["threads"], last["threads"]],
        "object_types_grown_most": [f"{kind} {grown[kind]:+d}" for kind in most[:5]],
    }


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """The reported figures of one configuration (see the module docstring)."""
    samples = raw["samples"]
    period = raw["slope_period"]
    done = samples[-1]["releases"]
    loads = [s["load1"] for s in samples]
    out: dict[str, Any] = {
        "releases": done,
        "failed": raw["failed"],
        "releases_per_s": round(done / raw["seconds"], 1),
        "broker_cpu_ms_per_release": round(
            (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / done * 1000, 3
        ),
        "rss_start_kib": samples[0]["rss_kib"],
        "rss_at_2k_kib": _rss_at(samples, 2_000),
        "rss_at_30k_kib": _rss_at(samples, 30_000),
        "rss_end_kib": samples[-1]["rss_kib"],
        "rss_kib_per_1000_releases": {
            f"after_{int(w * 100)}pct": _slope(samples, "rss_kib", w, period) for w in WARMUPS
        },
        "rss_slope_standard_error_after_30pct": _slope_error(samples, 0.3, period),
        "malloc_in_use_kib_per_1000_releases_after_30pct": _slope(
            samples, "malloc_in_use_kib", 0.3, period
        ),
        "slope_from_samples_every_n_releases": period,
        "malloc_in_use_start_end_kib": [
            samples[0]["malloc_in_use_kib"],
            samples[-1]["malloc_in_use_kib"],
        ],
        "gc_objects_start_end": [samples[0]["gc_objects"], samples[-1]["gc_objects"]],
        # gRPC adds a worker thread when a call finds none idle, up to server.max_workers: each
        # new one is a step up in RSS, bounded but inside the slope's window if it comes late.
        "threads_every_10k": _every_10k(samples, "threads"),
        "load1_min_mean_max": [
            round(min(loads), 2),
            round(sum(loads) / len(loads), 2),
            round(max(loads), 2),
        ],
        "rss_kib_every_10k": _every_10k(samples, "rss_kib"),
        "malloc_in_use_kib_every_10k": _every_10k(samples, "malloc_in_use_kib"),
        "process_env": raw["process_env"],
        "audit_intact": raw["audit"]["intact"],
        "audit_records": raw["audit"]["records"],
    }
    if len(raw["censuses"]) == 2:
        out["after_full_collection"] = _census_figures(*raw["censuses"])
    if raw["failures"]:
        out["failures"] = raw["failures"]
    if "trace" in raw:
        trace = raw["trace"]
        out["tracemalloc"] = {
            "releases": trace["releases"],
            "python_heap_growth_kib_per_1000_releases": round(
                trace["growth_kib"] / trace["releases"] * 1000, 3
            ),
            "top_growth": [
                f"{t['where']}: {t['growth_kib']} KiB ({t['count_diff']:+d} blocks)"
                for t in trace["top"]
            ],
        }
        out["malloc_trim"] = raw["trim"]
    return out


def _extra_envs() -> list[dict[str, str]]:
    spec = os.environ.get(ENVS_ENV, "")
    envs = []
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        pairs = (item.split("=", 1) for item in entry.split(","))
        envs.append({name.strip(): value.strip() for name, value in pairs})
    return envs


class _Config(NamedTuple):
    """One brokersoak configuration: the keybroker's recycle quota (None: its default), extra
    environment, and releases traced with tracemalloc afterwards."""

    label: str
    recycle: int | None = None
    env: Mapping[str, str] = {}
    trace: int = 0


def run(
    results: dict[str, Any],
    releases: int | None = None,
    *,
    callers: int = CALLERS,
    sample_every: int = SAMPLE_EVERY,
    trace_releases: int = TRACE_RELEASES,
    shipped_recycle: int | None = None,
    shared_ephemeral_key: bool = False,
) -> None:
    """Measures and records the figures described in the module docstring into ``results``.

    The keyword arguments shorten the soak (the CI smoke test's): ``callers`` concurrent
    releasers, a sample every ``sample_every`` releases, ``trace_releases`` under tracemalloc,
    and ``shipped_recycle`` the HSM recycle quota of the configurations that otherwise keep the
    broker's default (the slopes take one sample per recycle); ``shared_ephemeral_key``:
    :func:`~tests.bench.keybroker_bench.caller_factory`'s.
    """
    releases = releases or int(os.environ.get(RELEASES_ENV, RELEASES))
    configs = [
        _Config("shipped", recycle=shipped_recycle, trace=trace_releases),
        _Config("eventengine_endpoints", recycle=shipped_recycle, env={"GRPC_EXPERIMENTS": ""}),
        _Config("recycling_off", recycle=0),
    ]
    for env in _extra_envs():
        label = "shipped_" + "_".join(f"{k}={v}" for k, v in env.items())
        configs.append(_Config(label, recycle=shipped_recycle, env=env))
    started = time.perf_counter()
    measured: dict[str, Any] = {}
    for config in configs:
        label = config.label
        with tempfile.TemporaryDirectory(prefix="sr-brokersoak-") as tmp:
            raw = soak(
                Path(tmp),
                releases=releases,
                recycle_after_operations=config.recycle,
                env=config.env,
                callers=callers,
                sample_every=sample_every,
                trace_releases=config.trace,
                shared_ephemeral_key=shared_ephemeral_key,
            )
        measured[label] = figures(raw) | ({"env": config.env} if config.env else {})
        shown = {k: measured[label][k] for k in ("rss_kib_per_1000_releases", "rss_kib_every_10k")}
        print(f"bench: brokersoak {label}: {shown}", flush=True)
    shipped = measured["shipped"]["rss_kib_per_1000_releases"]["after_30pct"]
    error = measured["shipped"]["rss_slope_standard_error_after_30pct"]
    off = measured["recycling_off"]["rss_kib_per_1000_releases"]["after_30pct"]
    results.update(
        {
            "releases_per_configuration": releases,
            "callers": callers,
            "hsm_recycle_after_operations_default": DEFAULT_RECYCLE,
            **measured,
            "slope_ratio_recycling_off_over_shipped": (
                round(off / shipped, 1) if shipped and off and shipped > 0 else None
            ),
            "goal_under_1_kib_per_1000_after_warmup": (
                shipped is not None and shipped < GOAL_KIB_PER_1000
            ),
            # The goal is shown only if the slope's two-standard-error band is below it too.
            "goal_shown_beyond_2_standard_errors": (
                shipped is not None
                and error is not None
                and shipped + 2 * error < GOAL_KIB_PER_1000
            ),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )


if __name__ == "__main__":
    import json

    out: dict[str, Any] = {}
    run(out)
    print(json.dumps(out, indent=2))
