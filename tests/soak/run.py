"""Soak and fault run: the whole stack for minutes under load, certificate rotation and faults.

The key broker, the model store and the inference service run as child processes (``strongroom
serve``) with short-lived certificates, on loopback. While they run:

- ``releasers`` threads do attested key releases straight against the broker
  (:class:`~strongroom.client.keyrelease.KeyReleaseClient` over pinned channels, short-lived
  client certificates);
- ``inference_clients`` threads call ModelInfer on the inference service;
- one admin thread calls LoadModel (store fetch + attested release + decrypt) in a loop;
- a fault schedule restarts the model store and the key broker, and takes the HSM token away
  (its directory is moved) and puts it back.

An operation counts as *failed* only if it fails after the documented bounded retries (module docs
of the key release client and the loader): releasers retry ``UNAVAILABLE`` and ``CANCELLED``
for up to :data:`RETRY_WINDOW` seconds, as the loader does; ModelInfer is not retried at all.
Transient answers are counted separately.

The report (JSON, also written to ``--out``): operations and failures per kind, certificate
rotations per service, RSS samples and the RSS slope per service (KiB per minute after warm-up,
the first 30% of the last process's life; for the broker also KiB per 1,000 releases), each
service's malloc in use after full collections at the start and the end of that window (they run
under :mod:`tests.bench._memprobe`), and ``strongroom audit verify`` of the broker's log with its
public key.

Usage: ``make soak`` (10 minutes) or ``python -m tests.soak.run --duration 120 --cert-lifetime 30``.
The test suite runs a short version (:mod:`tests.soak.test_soak`).

The broker is started with its release grant budget set explicitly out of reach
(``tests/bench/_budget.py``): its releasers release keys as fast as the broker answers from one
inference identity, far past the default budget (1,024 at once, then 8 a second, per SPIFFE ID),
which would otherwise turn all but the first thousand into ``RELEASES_RATE_LIMITED`` refusals and
time those instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as oip_pb
from strongroom.api.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from strongroom.attesters import SimulatedAttester, TeeType
from strongroom.client.keyrelease import KeyReleaseClient, PinnedChannels
from strongroom.client.publish import publish_model
from strongroom.client.remote import peer_reason
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import FEATURES, train
from strongroom.dev.devstack.stack import DEMO_MEASUREMENT
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.keybroker.audit import load_public_key
from strongroom.keybroker.audit_verify import verify_audit_log
from strongroom.pki._state import STATE_FILE
from strongroom.pki.stepca import BINARY_ENV
from tests.bench import _memprobe
from tests.bench._budget import bench_broker_section
from tests.bench._proc import anon_huge_pages_kib, process_env, status
from tests.keybroker.helpers import bound, data_key_request

log = logging.getLogger("soak")
_REPO = Path(__file__).resolve().parents[2]

KEY = "soak"
MODEL = "soakmodel"
RETRY_WINDOW = 30.0
# What a client of a restarting server sees: UNAVAILABLE while it is down, CANCELLED for a call
# that arrived while it was draining (the loader treats both alike).
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
SERVICES = ("keybroker", "modelstore", "inference")


@dataclass
class Counters:
    """Thread-safe operation counters."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, table: str, kind: str, detail: str | None = None) -> None:
        with self.lock:
            counts = getattr(self, table)
            counts[kind] = counts.get(kind, 0) + 1
            if detail is not None and len(self.failures) < 50:
                self.failures.append(f"{kind}: {detail}")


@dataclass
class SoakConfig:
    """How long, how hard, and which faults."""

    duration: float = 600.0
    cert_lifetime: float = 60.0
    releasers: int = 16
    inference_clients: int = 8
    faults: bool = True
    sample_interval: float = 1.0
    census_interval: float = 1.0
    """Seconds between the three censuses of one measurement (the short test run takes less:
    it only checks that censuses are taken, not what they measure)."""


def _status(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, threads) of a process, from /proc; None once it is gone."""
    try:
        fields = status(pid)
        return fields["VmRSS"], fields["Threads"]
    except (OSError, KeyError):
        return None


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (None with fewer than 3 points)."""
    if len(points) < 3:
        return None
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if np.ptp(x) == 0:
        return None
    return float(np.polyfit(x, y, 1)[0])


class Soak:
    """One soak run on a fresh development stack under ``root``."""

    def __init__(self, root: Path, config: SoakConfig, *, step_ca_binary: Path | None = None):
        self.root = root
        self.config = config
        self.counters = Counters()
        self.stop = threading.Event()
        self.stack = DevStack(
            root,
            cert_lifetime=timedelta(seconds=config.cert_lifetime),
            step_ca_binary=step_ca_binary,
        )
        # (service, pid, seconds since start, RSS KiB, releases so far, threads)
        self.samples: list[tuple[str, int, float, int, int, int]] = []
        self.events: list[tuple[float, str]] = []
        self.started = 0.0
        self.rotations: dict[str, set[str]] = {s: set() for s in SERVICES}
        self.rotation_times: dict[str, list[float]] = {s: [] for s in SERVICES}
        # Each service runs under the memory probe: censuses (malloc in use after a full
        # collection) at the start of its measured window and at the end tell memory it keeps
        # from RSS the allocator holds.
        self.probes = {name: root / f"{name}.probe" for name in SERVICES}
        self.born: dict[str, float] = {}
        self.censuses: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVICES}
        # Each process's settings of PROCESS_ENV's variables, as it actually ran.
        self.process_env: dict[str, dict[str, str]] = {}
        # Each process's anonymous memory on transparent huge pages once it served (inference's
        # environment asks for them).
        self.huge_pages_kib: dict[str, int] = {}

    # ------------------------------------------------------------------ setup

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _event(self, what: str) -> None:
        self.events.append((round(self._elapsed(), 1), what))
        log.info("soak: %s", what)

    def _start(self, name: str, section: dict[str, Any] | None = None) -> None:
        running = self.stack.start_process(
            name,
            section,
            env={
                _memprobe.ENV: str(self.probes[name]),
                "PYTHONPATH": os.pathsep.join(filter(None, (str(_REPO), os.getenv("PYTHONPATH")))),
            },
            launcher=(sys.executable, "-m", "tests.bench._memprobe"),
        )
        assert running.process is not None  # started as a process
        self.process_env[name] = process_env(running.process.pid)
        self.huge_pages_kib[name] = anon_huge_pages_kib(running.process.pid)
        self.born[name] = self._elapsed() if self.started else 0.0
        self.censuses[name] = []  # a new process: only its own censuses compare

    def _census(self, name: str, label: str) -> None:
        """Three censuses ``census_interval`` apart, the median kept: calls in flight (up to one per
        caller) move a single one by tens of KiB. Dropped if the service restarted meanwhile."""
        process = self.stack.services.get(name)
        taken = []
        for _ in range(3):
            try:
                taken.append(_memprobe.ask(self.probes[name], "census", timeout=30))
            except (OSError, RuntimeError) as exc:
                log.warning("soak: %s census failed: %s", name, exc)
                return
            time.sleep(self.config.census_interval)
        if self.stack.services.get(name) is not process:
            return
        median = sorted(taken, key=lambda c: c["malloc_in_use_kib"])[1]
        self.censuses[name].append(
            {
                "label": label,
                "at_s": round(self._elapsed(), 1),
                "releases": self.counters.ok.get("release", 0),
                "malloc_in_use_kib": [c["malloc_in_use_kib"] for c in taken],
                "median_malloc_in_use_kib": median["malloc_in_use_kib"],
                "rss_kib": median["rss_kib"],
                "gc_objects": statistics.median(c["gc_objects"] for c in taken),
                "pymalloc_blocks": statistics.median(c["pymalloc_blocks"] for c in taken),
                "threads": median["threads"],
            }
        )

    def _window_start(self, name: str) -> float:
        """When the measured window of the service's last process starts: after its warm-up, the
        first 30% of its life in the run."""
        born = self.born[name]
        return born + 0.3 * (self.config.duration - born)

    def setup(self) -> None:
        stack = self.stack
        self._start("keybroker", bench_broker_section(self.stack))
        self._start("modelstore")
        lifetime = timedelta(seconds=self.config.cert_lifetime)
        self.admin = stack.identity("admin", lifetime=lifetime)
        self.publisher = stack.identity("publisher", lifetime=lifetime)
        stack.create_release_key(self.admin, KEY, policy_version="soak-1")
        broker = pb_grpc.KeyBrokerServiceStub(stack.channel(self.publisher, "keybroker"))
        generated = broker.GenerateDataKey(data_key_request(KEY), timeout=30)
        self.data_key = generated.data_key
        self.wrapped = generated.wrapped_data_key
        self.version = generated.key_version
        model = train(self.root / "model.onnx")
        publish_model(
            model.path,
            name=MODEL,
            version="1",
            key_id=KEY,
            broker=stack.channel(self.publisher, "keybroker"),
            store=stack.channel(self.publisher, "modelstore"),
        )
        section = {
            **stack.default_section("inference"),
            "models": [{"name": MODEL, "version": "1"}],
        }
        self.inference_section = section
        self._start("inference", section)
        client = stack.identity("client", lifetime=lifetime)
        self.client = client
        oip = oip_grpc.GRPCInferenceServiceStub(stack.channel(client, "inference"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = oip.ModelReady(oip_pb.ModelReadyRequest(name=MODEL, version="1"), timeout=5)
                if ready.ready:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the configured model did not load")
        self.authority = SimulatedAuthority.load(stack.root / "simulated-tee")

    # ------------------------------------------------------------------ workers

    def _attester(self) -> SimulatedAttester:
        return SimulatedAttester(
            self.authority.snp(),
            TeeType.SEV_SNP,
            production=False,
            claims={"measurement": bytes.fromhex(DEMO_MEASUREMENT)},
        )

    def _retrying(self, kind: str, operation: Callable[[], object]) -> None:
        deadline = time.monotonic() + RETRY_WINDOW
        delay = 0.1
        while True:
            try:
                operation()
            except grpc.RpcError as exc:
                code = exc.code()
                if code in _TRANSIENT and time.monotonic() + delay < deadline:
                    self.counters.add("transient", kind)
                    if self.stop.wait(delay):
                        return
                    delay = min(delay * 2, 2.0)
                    continue
                self.counters.add(
                    "failed", kind, f"{code.name} {peer_reason(exc)}: {exc.details()}"
                )
                return
            self.counters.add("ok", kind)
            return

    def releaser(self) -> None:
        identity = self.stack.identity(
            "inference", lifetime=timedelta(seconds=self.config.cert_lifetime)
        )
        channels = PinnedChannels(
            identity, self.stack.address("keybroker"), server_name="keybroker"
        )
        client = KeyReleaseClient(
            channels, self._attester(), timeout=10, verifier=self.stack.release_verifier()
        )
        # RSA-3072 generation (0.1-0.3 s a key) would bound the release rate far below what the
        # broker serves; the broker does not care whether an ephemeral key is fresh, so this
        # load generator reuses one key per thread. (Production clients never do: each key is
        # used for exactly one exchange.)
        fixed = client._take_key()
        client._take_key = lambda: fixed  # type: ignore[method-assign]
        try:
            while not self.stop.is_set():

                def release() -> None:
                    released = client.release(KEY, self.version, self.wrapped)
                    if bound(released.dek) != self.data_key:
                        raise AssertionError("released the wrong key")

                self._retrying("release", release)
        finally:
            channels.close()

    def inference_client(self) -> None:
        stub = oip_grpc.GRPCInferenceServiceStub(self.stack.channel(self.client, "inference"))
        x = np.random.default_rng(1).normal(size=(4, FEATURES)).astype("<f4")
        request = oip_pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[
                oip_pb.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=list(x.shape)
                )
            ],
            raw_input_contents=[x.tobytes()],
        )
        while not self.stop.is_set():
            try:
                stub.ModelInfer(request, timeout=10)
            except grpc.RpcError as exc:
                self.counters.add("failed", "infer", f"{exc.code().name}: {exc.details()}")
            else:
                self.counters.add("ok", "infer")

    def loader(self) -> None:
        control = control_grpc.ModelControlServiceStub(self.stack.channel(self.admin, "inference"))
        request = control_pb.LoadModelRequest(name=MODEL, version="1")
        while not self.stop.wait(2.0):
            # LoadModel retries UNAVAILABLE itself (within 30 s): a failure here is a failure.
            try:
                control.LoadModel(request, timeout=60)
            except grpc.RpcError as exc:
                self.counters.add("failed", "load", f"{exc.code().name}: {exc.details()}")
            else:
                self.counters.add("ok", "load")

    def sampler(self) -> None:
        while not self.stop.wait(self.config.sample_interval):
            releases = self.counters.ok.get("release", 0)
            for name in SERVICES:
                running = self.stack.services.get(name)
                if running is None or running.process is None:
                    continue
                pid = running.process.pid
                status = _status(pid)
                if status is not None:
                    rss, threads = status
                    self.samples.append((name, pid, self._elapsed(), rss, releases, threads))
            self._note_rotations()
            for name in SERVICES:
                if not self.censuses[name] and self._elapsed() >= self._window_start(name):
                    self._census(name, "window start")

    def _note_rotations(self) -> None:
        for name in SERVICES:
            # The persisted identity changes with every renewal (and re-enrolment on restart).
            state = self.stack.root / "state" / name / "identity" / STATE_FILE
            try:
                digest = hashlib.sha256(state.read_bytes()).hexdigest()
            except OSError:
                continue
            if digest not in self.rotations[name]:
                self.rotations[name].add(digest)
                self.rotation_times[name].append(round(self._elapsed(), 1))

    # ------------------------------------------------------------------ faults

    def _restart(self, name: str, section: dict[str, Any] | None = None) -> None:
        self._event(f"restart {name}")
        self.born[name] = float("inf")  # no window-start census while it restarts
        self.stack.services.pop(name).stop()
        time.sleep(0.5)
        self._start(name, section)
        self._event(f"{name} serving again")

    def _hsm_blink(self) -> None:
        tokens = self.stack.root / "hsm" / "tokens"
        store = next(p for p in tokens.iterdir() if p.is_dir())
        away = store.with_name(store.name + ".away")
        self._event("HSM token removed")
        store.rename(away)
        time.sleep(1.5)
        away.rename(store)
        self._event("HSM token restored")

    def faults(self) -> None:
        duration = self.config.duration
        # The broker restarts first, so that its last process lives long enough to measure.
        schedule: list[tuple[float, Callable[[], None]]] = [
            (0.1, lambda: self._restart("keybroker", bench_broker_section(self.stack))),
            (0.3, lambda: self._restart("modelstore")),
            (0.5, self._hsm_blink),
        ]
        for fraction, fault in schedule:
            if self.stop.wait(max(0.0, fraction * duration - self._elapsed())):
                return
            fault()

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Sets up, runs for ``duration`` seconds, stops, and returns the report."""
        self.setup()
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.sampler, name="sampler", daemon=True)]
        threads += [
            threading.Thread(target=self.releaser, name=f"releaser-{i}", daemon=True)
            for i in range(self.config.releasers)
        ]
        threads += [
            threading.Thread(target=self.inference_client, name=f"infer-{i}", daemon=True)
            for i in range(self.config.inference_clients)
        ]
        threads.append(threading.Thread(target=self.loader, name="loader", daemon=True))
        if self.config.faults:
            threads.append(threading.Thread(target=self.faults, name="faults", daemon=True))
        for t in threads:
            t.start()
        self.stop.wait(self.config.duration)
        for name in SERVICES:
            self._census(name, "end")
        self.stop.set()
        for t in threads:
            t.join(90)
        return self.report()

    def report(self) -> dict[str, Any]:
        """The figures described in the module docstring."""
        public = load_public_key((self.stack.secrets_dir / "audit-key.pub.pem").read_bytes())
        audit = verify_audit_log(
            self.stack.root / "state" / "keybroker" / "audit.log", public_key=public
        )
        rss: dict[str, Any] = {}
        for name in SERVICES:
            # The last process of the service (a restart starts a new one), after its warm-up:
            # the first 30% of its life in the run.
            mine = [x for x in self.samples if x[0] == name]
            if not mine:
                continue
            pid = mine[-1][1]
            points = [x for x in mine if x[1] == pid]
            points = [x for x in points if x[2] >= self._window_start(name)]
            per_minute = _slope([(t / 60, r) for _, _, t, r, _, _ in points])
            entry: dict[str, Any] = {
                "pid": pid,
                "window_s": round(points[-1][2] - points[0][2], 1) if points else 0,
                "first_kib": points[0][3] if points else None,
                "last_kib": points[-1][3] if points else None,
                "slope_kib_per_minute": None if per_minute is None else round(per_minute, 1),
            }
            if name == "keybroker":
                per_k = _slope([(releases / 1000, r) for _, _, _, r, releases, _ in points])
                entry["releases_in_window"] = points[-1][4] - points[0][4] if points else 0
                entry["slope_kib_per_1000_releases"] = None if per_k is None else round(per_k, 2)
            censuses = self.censuses[name]
            entry["censuses"] = censuses
            if len(censuses) == 2:
                first, last = censuses
                kept = last["median_malloc_in_use_kib"] - first["median_malloc_in_use_kib"]
                entry["malloc_in_use_change_kib"] = kept
                entry["malloc_in_use_kib_per_minute"] = round(
                    kept / (last["at_s"] - first["at_s"]) * 60, 1
                )
                if name == "keybroker":
                    releases = last["releases"] - first["releases"]
                    entry["malloc_in_use_kib_per_1000_releases"] = (
                        round(kept / releases * 1000, 2) if releases else None
                    )
            # The whole series of the last process, to see where growth happens (at rotations,
            # restarts, faults, a worker pool growing) rather than only how much:
            # [seconds, KiB, releases so far, threads].
            entry["series"] = [[round(t, 1), r, n, k] for _, p, t, r, n, k in mine if p == pid]
            rss[name] = entry
        counters = self.counters
        return {
            "duration_s": self.config.duration,
            "cert_lifetime_s": self.config.cert_lifetime,
            "ok": dict(counters.ok),
            "failed": dict(counters.failed),
            "failed_total": sum(counters.failed.values()),
            "transient_unavailable": dict(counters.transient),
            "failures": counters.failures,
            "certificates_seen": {name: len(seen) for name, seen in self.rotations.items()},
            "certificate_times_s": self.rotation_times,
            "events": self.events,
            "process_env": self.process_env,
            "anon_huge_pages_kib": self.huge_pages_kib,
            "rss": rss,
            "audit": {
                "intact": audit.intact,
                "records": audit.records,
                "problem": audit.problem,
                "message": audit.message,
            },
        }

    def close(self) -> None:
        """Stops every process and the CA."""
        self.stack.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.soak.run``: runs one soak and prints its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--cert-lifetime", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--releasers", type=int, default=16)
    parser.add_argument("--inference-clients", type=int, default=8)
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--root", type=Path, default=Path(".build/soak"))
    parser.add_argument("--out", type=Path, default=Path(".build/soak/report.json"))
    args = parser.parse_args(argv)
    args.root = args.root.resolve()  # the stack's configuration files need absolute paths
    built = Path(__file__).resolve().parents[2] / ".build" / "bin" / "step-ca"
    os.environ.setdefault(BINARY_ENV, str(built))  # what `make soak` exports
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("strongroom").setLevel(logging.WARNING)  # one line per release is noise
    import shutil

    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    soak = Soak(
        args.root / "stack",
        SoakConfig(
            duration=args.duration,
            cert_lifetime=args.cert_lifetime,
            releasers=args.releasers,
            inference_clients=args.inference_clients,
            faults=not args.no_faults,
        ),
    )
    try:
        report = soak.run()
    finally:
        soak.close()
    text = json.dumps(report, indent=2)
    args.out.write_text(text + "\n")
    print(text)
    broker = report["rss"]["keybroker"]
    broker_slope = broker.get("slope_kib_per_1000_releases")
    kept = broker.get("malloc_in_use_kib_per_1000_releases")
    ok = report["failed_total"] == 0 and report["audit"]["intact"]
    print(
        f"soak: {sum(report['ok'].values())} operations, {report['failed_total']} failed; "
        f"broker RSS slope {broker_slope} KiB per 1,000 releases, malloc in use {kept}; "
        f"audit {'intact' if report['audit']['intact'] else 'NOT intact'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
