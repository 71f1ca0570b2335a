"""The key broker's own CPU per key release, measured on a broker in its own process.

A DevStack (real step-ca, SoftHSM2, mTLS) starts the broker as a child process, as ``strongroom
serve keybroker`` runs it (logging to its file at INFO, no trace exporter). Callers in this process
(the release protocol of ``keybroker_bench``: GetChallenge, a simulated SNP report over the
binding, ReleaseKey) drive it with 1 and then 16 concurrent callers. The broker's CPU is read from
``/proc/PID/stat`` (utime + stime, all its threads, gRPC's C core included) before and after each
phase; ``broker_cpu_us_per_release`` is that difference over the releases of the phase, and
``broker_context_switches_per_release`` the same for the context switches of all its threads
(``/proc/PID/task/*/status``: voluntary ones are waits, for a lock or the interpreter lock or I/O).
``broker_cores_busy`` is the broker's CPU over the phase's wall time. The callers share the
machine's cores with the broker, so releases/s here is lower than a broker would serve to remote
callers; CPU per release does not depend on that.

``cpu_floor_us`` is the same accounting for the parts no release can do without, measured in the
same run: two bare RPCs (``grpc.health.v1.Health/Check`` on the same broker from 16 callers, its
CPU per call from ``/proc/PID/stat`` as above, the median of :data:`BARE_RPC_ROUNDS` measurements),
a bare P-384 verify (this thread's CPU), the HSM's re-wrap (``KeyManager.release_to_ephemeral``
of a broker in this process, on a second DevStack: the process's CPU, so the HSM worker thread's
and SoftHSM2's are counted) and one write + fsync of a record-sized line (its CPU; not divided by
any batch, so the floor errs high). ``ratio_broker_cpu_to_floor`` is the 16-caller release's CPU
over that sum: where a machine's cores are the limit, releases/s follow CPU per release.

``one_call_ab``: the release's re-wrap as one C call (shipped) against its six PKCS#11 calls made
one at a time (``_six_call_service``, the broker before 2026-12-05), a fresh broker per variant
and round, :data:`AB_ROUNDS` rounds with the order alternated: each variant's releases/s, CPU
and voluntary context switches per release with 16 callers and p50 with 1, every round listed,
and the ratios of the medians. :func:`alternated_ab` is that machinery for any variants (each a
launcher of the broker), for a change's own A/B; ``python -m tests.bench.releasecpu_bench
--ab-against REV [--rounds N] [--releases N]`` runs it for this checkout against ``REV``'s
``services/keybroker`` (:func:`snapshot_launcher`: e.g. ``HEAD``, for an uncommitted change).

With ``profile=True`` (``python -m tests.bench.run releasecpu --profile``) a second broker runs
under yappi (CPU clock, every thread, builtins included) for a 16-caller phase, and the top
:data:`PROFILE_TOP` functions by own time go to ``tests/bench/PROFILE.md``, per release, with the
function calls per release (all, and Python functions only). Profiling slows the broker several
times over: its shares matter, not its absolute times.

The broker is started with its release grant budget set explicitly out of reach
(``tests/bench/_budget.py``): its callers release hundreds of keys a second from one inference
identity, far past the default budget (1,024 at once, then 8 a second, per SPIFFE ID), which would
otherwise turn all but the first thousand into ``RELEASES_RATE_LIMITED`` refusals and time those
instead.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2_grpc

from strongroom.dev.devstack import DevStack
from strongroom.keybroker.ephemeral import ReleaseTarget
from strongroom.oaep import OaepHash
from tests.bench._budget import bench_broker_section
from tests.bench._proc import context_switches, cpu_seconds
from tests.bench._scale import scaled
from tests.bench.keybroker_bench import (
    FLEET_SERVER,
    KEY,
    MECHANISMS,
    _BareSyncs,
    _Caller,
    _run_callers,
    bare_calls,
    caller_factory,
    p384_verify,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROFILE_TOP = 15
SUPPORTS_PROFILE = True
#: Where to keep yappi's raw statistics too (``--raw PATH`` when run as a script), for digging.
RAW_PROFILE: Path | None = None
RECORD_BYTES = 2500  # an ALLOWED record of a simulated SNP release (keybroker_bench measures it)
AB_ROUNDS = 2
BARE_RPC_ROUNDS = 3


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


class _Broker:
    """A broker process in a fresh DevStack, with a release key and callers ready to release."""

    def __init__(
        self,
        stack: DevStack,
        launcher: tuple[str, ...] | None = None,
        *,
        warmup: int = 5,
        shared_ephemeral_key: bool = False,
    ) -> None:
        self.running = (
            stack.start_process(
                "keybroker", bench_broker_section(stack), launcher=launcher, server=FLEET_SERVER
            )
            if launcher
            else stack.start_process("keybroker", bench_broker_section(stack), server=FLEET_SERVER)
        )
        assert self.running.process is not None
        self.pid = self.running.process.pid
        self._make = caller_factory(stack, shared_ephemeral_key=shared_ephemeral_key)
        self._warmup = warmup

    def callers(self, n: int) -> list[_Caller]:
        """``n`` callers, each with its own channel, warmed up (connection, caches)."""
        made = [self._make() for _ in range(n)]
        for caller in made:
            for _ in range(self._warmup):
                caller.release()
        return made

    def phase(self, callers: list[_Caller], per_caller: int) -> dict[str, Any]:
        """Releases ``per_caller`` times from each caller; latency, rate and the broker's CPU."""
        load_before = _load()
        switches_before = context_switches(self.pid)
        cpu_before = cpu_seconds(self.pid)
        started = time.perf_counter()
        figures = _run_callers(callers, per_caller)
        wall = time.perf_counter() - started
        cpu = cpu_seconds(self.pid) - cpu_before
        switches = context_switches(self.pid)
        figures["broker_cpu_us_per_release"] = round(cpu / figures["releases"] * 1e6, 1)
        figures["broker_context_switches_per_release"] = _per_op(
            switches_before, switches, figures["releases"]
        )
        figures["broker_cores_busy"] = round(cpu / wall, 2)
        figures["load_avg_before_after"] = [load_before, _load()]
        return figures

    def bare_rpc_cost(
        self, stack: DevStack, callers: int, per_caller: int, rounds: int = BARE_RPC_ROUNDS
    ) -> tuple[float, dict[str, float]]:
        """The broker's CPU (µs) and context switches per bare unary RPC (Health/Check) from
        ``callers`` concurrent callers: the median of :data:`BARE_RPC_ROUNDS` measurements, each
        on channels of its own, closed after it (one measurement swung from 215 to 345 µs)."""
        identity = stack.identity("inference")
        measured: list[tuple[float, dict[str, float]]] = []
        for _ in range(rounds):
            channels = [stack.channel(identity, "keybroker") for _ in range(callers)]
            try:
                stubs = [health_pb2_grpc.HealthStub(channel) for channel in channels]
                bare_calls(stubs, 1)  # connections
                switches_before = context_switches(self.pid)
                cpu_before = cpu_seconds(self.pid)
                calls = bare_calls(stubs, per_caller)
                cpu = cpu_seconds(self.pid) - cpu_before
                switches = _per_op(switches_before, context_switches(self.pid), calls)
            finally:
                for channel in channels:
                    channel.close()
            measured.append((cpu / calls * 1e6, switches))
        measured.sort(key=lambda m: m[0])
        return measured[len(measured) // 2]


def _per_op(before: tuple[int, int], after: tuple[int, int], ops: int) -> dict[str, float]:
    """Context switches per operation between two :func:`context_switches` readings."""
    return {
        "voluntary": round((after[0] - before[0]) / ops, 1),
        "involuntary": round((after[1] - before[1]) / ops, 1),
    }


def _cpu_us(fn: Callable[[], object], n: int, clock: Callable[[], float]) -> float:
    """``clock``'s CPU time per call of ``fn`` over ``n`` calls (after one untimed call), in µs."""
    fn()
    started = clock()
    for _ in range(n):
        fn()
    return (clock() - started) / n * 1e6


def _rewrap_and_sync_cpu_us(
    record_bytes: int, calls: int, shared_ephemeral_key: bool
) -> tuple[float, float]:
    """CPU of one HSM re-wrap (a broker in this process, on its own DevStack) and of one write +
    fsync of a ``record_bytes`` line, in µs."""
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        broker = stack.start_in_process(
            "keybroker", bench_broker_section(stack), server=FLEET_SERVER
        )
        caller = caller_factory(stack, shared_ephemeral_key=shared_ephemeral_key)()
        keys = broker.handle.keys
        target = ReleaseTarget.parse(
            caller.ephemeral, [OaepHash.from_mechanism(m) for m in MECHANISMS]
        )
        rewrap = _cpu_us(
            lambda: keys.release_to_ephemeral(KEY, caller.version, caller.wrapped, target),
            calls,
            time.process_time,
        )
        syncs = _BareSyncs(Path(tmp), record_bytes)
        try:
            sync = _cpu_us(syncs.append, calls, time.process_time)
        finally:
            syncs.close()
    return rewrap, sync


def _measure(releases: int, scale: float, shared_key: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        broker = _Broker(stack, warmup=scaled(5, scale), shared_ephemeral_key=shared_key)
        single = broker.callers(1)
        one = broker.phase(single, releases)
        sixteen = broker.phase(broker.callers(16), max(2 * releases // 16, scaled(20, scale)))
        bare_rpc, bare_rpc_switches = broker.bare_rpc_cost(
            stack, 16, scaled(250, scale), scaled(BARE_RPC_ROUNDS, scale)
        )
    rewrap, sync = _rewrap_and_sync_cpu_us(RECORD_BYTES, scaled(300, scale), shared_key)
    floor = {
        "two_bare_rpcs": round(2 * bare_rpc, 1),
        "p384_verify": round(_cpu_us(p384_verify(), scaled(500, scale), time.thread_time), 1),
        "hsm_rewrap": round(rewrap, 1),
        "record_write_fsync": round(sync, 1),
    }
    total = sum(floor.values())
    return {
        "release_1_caller": one,
        "release_16_callers": sixteen,
        "bare_rpc_16_callers_broker_cpu_us": round(bare_rpc, 1),
        "bare_rpc_16_callers_broker_context_switches": bare_rpc_switches,
        "cpu_floor_us": floor | {"sum": round(total, 1)},
        "ratio_broker_cpu_to_floor": round(sixteen["broker_cpu_us_per_release"] / total, 2),
    }


def alternated_ab(
    variants: dict[str, tuple[str, ...] | None],
    releases: int,
    scale: float,
    shared_key: bool,
    *,
    baseline: str,
    rounds_wanted: int = AB_ROUNDS,
) -> dict[str, Any]:
    """Each of ``variants`` (label -> the broker's launcher, None: as shipped) on fresh brokers,
    ``rounds_wanted`` rounds with the order alternated (A B, B A, ...): each variant's
    releases/s, CPU and context switches per release with 16 callers and p50 (and switches) with
    1, every round listed, each variant's medians and their ratios to ``baseline``'s."""
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in variants}
    for round_number in range(scaled(rounds_wanted, scale)):
        order = list(variants.items())
        for label, launcher in order if round_number % 2 == 0 else reversed(order):
            with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
                broker = _Broker(
                    stack, launcher, warmup=scaled(5, scale), shared_ephemeral_key=shared_key
                )
                one = broker.phase(broker.callers(1), max(releases // 2, 1))
                sixteen = broker.phase(broker.callers(16), max(releases // 16, scaled(20, scale)))
            rounds[label].append(
                {
                    "p50_ms_1_caller": one["p50_ms"],
                    "releases_per_s_16_callers": sixteen["releases_per_s"],
                    "broker_cpu_us_per_release_16_callers": sixteen["broker_cpu_us_per_release"],
                    "voluntary_switches_per_release_16_callers": sixteen[
                        "broker_context_switches_per_release"
                    ]["voluntary"],
                    "involuntary_switches_per_release_16_callers": sixteen[
                        "broker_context_switches_per_release"
                    ]["involuntary"],
                    "voluntary_switches_per_release_1_caller": one[
                        "broker_context_switches_per_release"
                    ]["voluntary"],
                }
            )

    def median(label: str, figure: str) -> float:
        return float(statistics.median(r[figure] for r in rounds[label]))

    return {
        "rounds": rounds,
        "medians": {
            label: {figure: median(label, figure) for figure in rounds[label][0]}
            for label in variants
        },
        **{
            f"ratio_{label}_over_{baseline}_medians": {
                figure: round(median(label, figure) / (median(baseline, figure) or 1), 3)
                for figure in rounds[label][0]
            }
            for label in variants
            if label != baseline
        },
    }


def snapshot_launcher(revision: str, into: Path) -> tuple[str, ...]:
    """A launcher of the broker with ``revision``'s ``strongroom.keybroker`` (``git archive`` of its
    ``services/keybroker`` into ``into``; everything else is this checkout's): the reference side
    of an A/B of a change to the broker's package. Its C release calls are this checkout's build
    when their source is the same, else built with ``cc``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "services/keybroker"],
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "services" / "keybroker"
    here = REPO / "services" / "keybroker"
    source = "_p11release.c"
    built = next(here.glob("_p11release.*.so"))
    if (package / source).read_bytes() == (here / source).read_bytes():
        shutil.copy2(built, package / built.name)
    else:
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(package / built.name), source],
            cwd=package,
            check=True,
        )
    return (sys.executable, "-m", "tests.bench._snapshot_service", str(package))


def ab_against(revision: str, releases: int, rounds: int) -> dict[str, Any]:
    """:func:`alternated_ab` of this checkout's broker against ``revision``'s package."""
    with tempfile.TemporaryDirectory() as tmp:
        launcher = snapshot_launcher(revision, Path(tmp))
        return alternated_ab(
            {revision: launcher, "checkout": None},
            releases,
            1.0,
            False,
            baseline=revision,
            rounds_wanted=rounds,
        )


def _one_call_ab(releases: int, scale: float, shared_key: bool) -> dict[str, Any]:
    """The one-call re-wrap against six calls (module doc), each on fresh brokers."""
    ab = alternated_ab(
        {
            "one_call": None,
            "six_calls": (sys.executable, "-m", "tests.bench._six_call_service"),
        },
        releases,
        scale,
        shared_key,
        baseline="six_calls",
    )
    return {
        "rounds": ab["rounds"],
        "ratio_one_call_over_six_calls_medians": ab["ratio_one_call_over_six_calls_medians"],
    }


def _profile(releases: int, scale: float, shared_key: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        out = Path(tmp) / "profile.json"
        launcher = (sys.executable, "-m", "tests.bench._profiled_service", "--profile", str(out))
        broker = _Broker(stack, launcher, warmup=scaled(5, scale), shared_ephemeral_key=shared_key)
        callers = broker.callers(16)
        os.kill(broker.pid, signal.SIGUSR1)
        time.sleep(0.5)  # the clear runs on the broker's signals thread
        figures = _run_callers(callers, max(releases // 16, scaled(10, scale)))
        os.kill(broker.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not out.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the profiled broker wrote no statistics")
            time.sleep(0.2)
        stats = json.loads(out.read_text())
    if RAW_PROFILE is not None:
        RAW_PROFILE.write_text(json.dumps(stats | {"releases": figures["releases"]}, indent=1))
    n = figures["releases"]
    return {
        "releases": n,
        "calls_per_release": round(stats["calls"] / n),
        "python_calls_per_release": round(stats["python_calls"] / n),
        "profiled_cpu_us_per_release": round(stats["cpu_seconds"] / n * 1e6),
        "top": [
            {
                "function": f"{e['name']} ({_short(e['where'])})",
                "calls_per_release": round(e["ncall"] / n, 1),
                "own_us_per_release": round(e["tsub"] / n * 1e6, 1),
                "own_share": round(e["tsub"] / stats["cpu_seconds"], 3),
            }
            for e in stats["top"][:PROFILE_TOP]
        ],
    }


def _short(where: str) -> str:
    for marker in ("site-packages/", "/wt-cpu/", "/main/", "lib/python3.11/"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def _write_profile_md(profile: dict[str, Any], measured: dict[str, Any], path: Path) -> None:
    lines = [
        "# Key broker profile: releases at 16 concurrent callers",
        "",
        "Written by `python -m tests.bench.run releasecpu --profile` (yappi, CPU clock, every",
        "thread, builtins included). Profiling slows the broker several times over: read the",
        "shares, not the absolute times. Unprofiled figures of the same run are below.",
        "",
        f"- measured at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
        f"load average {_load()}",
        f"- releases profiled: {profile['releases']}",
        f"- function calls per release: {profile['calls_per_release']} "
        f"(Python functions: {profile['python_calls_per_release']})",
        f"- unprofiled broker CPU per release: 1 caller "
        f"{measured['release_1_caller']['broker_cpu_us_per_release']} µs, 16 callers "
        f"{measured['release_16_callers']['broker_cpu_us_per_release']} µs",
        "",
        "| # | function | calls/release | own µs/release (profiled) | share of own time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, entry in enumerate(profile["top"], 1):
        lines.append(
            f"| {i} | `{entry['function']}` | {entry['calls_per_release']} | "
            f"{entry['own_us_per_release']} | {entry['own_share']:.1%} |"
        )
    path.write_text("\n".join(lines) + "\n")


def run(
    results: dict[str, Any],
    *,
    releases: int = 400,
    profile: bool = False,
    scale: float = 1.0,
    profile_md: Path = HERE / "PROFILE.md",
    shared_ephemeral_key: bool = False,
) -> None:
    """Measures the broker's CPU per release (and, with ``profile``, writes ``profile_md``);
    ``scale``: :mod:`tests.bench._scale`; ``shared_ephemeral_key``: ``caller_factory``'s."""
    measured = _measure(releases, scale, shared_ephemeral_key)
    results.update(measured)
    results["one_call_ab"] = _one_call_ab(releases, scale, shared_ephemeral_key)
    results["note"] = (
        "broker in its own process; callers in the bench process share the "
        f"{os.cpu_count()} cores; CPU from /proc/PID/stat"
    )
    if profile:
        profiled = _profile(releases, scale, shared_ephemeral_key)
        results["profile_16_callers"] = {k: v for k, v in profiled.items() if k != "top"} | {
            "top5": [e["function"] for e in profiled["top"][:5]]
        }
        _write_profile_md(profiled, measured, profile_md)


def _option(name: str, default: int) -> int:
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


if __name__ == "__main__":
    out: dict[str, Any] = {}
    if "--ab-against" in sys.argv:
        # e.g. --ab-against HEAD --rounds 8 --releases 1600: this checkout's uncommitted change
        revision = sys.argv[sys.argv.index("--ab-against") + 1]
        ab = ab_against(revision, _option("--releases", 1600), _option("--rounds", 2 * AB_ROUNDS))
        print(json.dumps(ab, indent=2))
        sys.exit(0)
    if "--raw" in sys.argv:
        RAW_PROFILE = Path(sys.argv[sys.argv.index("--raw") + 1])
    run(out, profile="--profile" in sys.argv or RAW_PROFILE is not None)
    print(json.dumps(out, indent=2))
