"""The legitimate client's latency while certified clients abuse the mesh (issue 11).

A DevStack runs the key broker and the model store as separate processes (real step-ca,
SoftHSM2, mutual TLS, loopback). The legitimate client (the inference identity) calls
GetChallenge, ListModels and health Check in a loop; its p50/p99 under each attack is reported as
a ratio of its p50/p99 without attack, measured in the same run. The attacks are those of
``tests/abuse``: 200 health Watch streams, 64 stalled uploads, 32 concurrent 60 MB unary requests
from an identity every RPC refuses, malformed frames, and nested policy YAML; and a slow unary
flood from one certified identity (64 GenerateDataKey calls from the publisher kept in flight,
each waiting for the HSM: its statuses show how many the per-identity cap on unary calls refused). The broker's memory
(VmRSS, and VmHWM for the peak) is read from /proc around the oversized requests.

Client and servers share the machine's two cores, so an attack that costs CPU (malformed frames,
nested YAML sent in a tight loop) also slows the client's side: the ratios are upper bounds.

The broker is started with its release grant budget set explicitly out of reach
(``tests/bench/_budget.py``): its legitimate callers release keys beside the abuse, as before the
budget, from one inference identity, far past the default budget (1,024 at once, then 8 a second,
per SPIFFE ID), which would otherwise turn all but the first thousand into
``RELEASES_RATE_LIMITED`` refusals and time those instead.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.dev.devstack import DevStack
from tests.abuse.traffic import (
    ADMIN,
    KEY_ID,
    MALFORMED,
    Identities,
    LegitClient,
    nested_yaml,
    outcome,
    oversized_unary,
    stalled_uploads,
    watch_streams,
)
from tests.bench._budget import bench_broker_section
from tests.bench._proc import status

ROUNDS = 300  # legitimate rounds (3 RPCs each) per scenario
OVERSIZED_BYTES = 60_000_000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _memory_mib(pid: int) -> dict[str, float]:
    fields = status(pid)
    return {key: round(fields[key] / 1024, 1) for key in ("VmRSS", "VmHWM")}


def _measure(stack: DevStack, who: Identities, rounds: int) -> tuple[float, float, int]:
    client = LegitClient(stack, who.legit)
    client.run(rounds=rounds)
    return _pct(client.latencies, 0.5), _pct(client.latencies, 0.99), len(client.failures)


@contextmanager
def _looping(action: Callable[[], object], threads: int = 1) -> Iterator[Counter[str]]:
    """Runs ``action`` in a loop on ``threads`` other threads (bounded by time) and counts
    outcomes."""
    stop = threading.Event()
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def loop() -> None:
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                action()
                key = "OK"
            except grpc.RpcError as exc:
                key = "/".join(str(x) for x in outcome(exc))
            with lock:  # Counter's += is not atomic across threads
                counts[key] += 1

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield counts
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)


def run(results: dict[str, Any], *, rounds: int = ROUNDS) -> None:
    """Measures the legitimate client without attack, then under each attack (``rounds``
    legitimate rounds each)."""
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        broker = stack.start_process("keybroker", bench_broker_section(stack))
        stack.start_process("modelstore")
        stack.create_release_key(stack.identity("admin"), KEY_ID, policy_version="1")
        who = Identities.enrol(stack)
        assert broker.process is not None
        pid = broker.process.pid

        _measure(stack, who, rounds)  # warm-up: channels, connections, caches
        base_p50, base_p99, base_failures = _measure(stack, who, rounds)
        results["baseline"] = {
            "p50_ms": round(base_p50 * 1000, 2),
            "p99_ms": round(base_p99 * 1000, 2),
            "failures": base_failures,
        }

        def record(name: str, extra: dict[str, Any] | None = None) -> None:
            p50, p99, failures = _measure(stack, who, rounds)
            results[name] = {
                "p50_ratio": round(p50 / base_p50, 2),
                "p99_ratio": round(p99 / base_p99, 2),
                "legit_failures": failures,
                **(extra or {}),
            }

        # 200 health Watch streams from a foreign trust domain and a refused identity.
        _calls, finish = watch_streams(stack, [who.foreign, who.nobody], 200)
        time.sleep(0.5)
        record("watch_200")
        results["watch_200"]["streams"] = {
            "/".join(str(x) for x in k): v for k, v in finish().items()
        }

        # 64 stalled uploads from a publisher (the idle timeout is 30 s: all stay stalled).
        futures, stop = stalled_uploads(stack, who.publisher, 64)
        time.sleep(0.5)
        try:
            record("stalled_uploads_64")
        finally:
            stop.set()
        results["stalled_uploads_64"]["uploads"] = dict(
            Counter("/".join(str(x) for x in outcome(f.exception(60))) for f in futures)
        )

        # 32 concurrent 60 MB unary requests from an identity that every RPC refuses.
        before = _memory_mib(pid)
        oversized = oversized_unary(stack, who.nobody, 32, OVERSIZED_BYTES)
        record("oversized_unary_32")
        codes = Counter(outcome(f.exception(120))[0] for f in oversized)
        after = _memory_mib(pid)
        results["oversized_unary_32"].update(
            {
                "statuses": dict(codes),
                "broker_rss_mib_before": before["VmRSS"],
                "broker_peak_rss_mib": after["VmHWM"],
                "broker_rss_mib_after": after["VmRSS"],
            }
        )
        del oversized

        # Malformed frames, in a loop from an authorised identity.
        raw = stack.channel(who.admin, "keybroker").unary_unary(
            f"/{ADMIN}/SetReleasePolicy", None, None
        )
        bodies = list(MALFORMED.values())
        index = iter(range(10**9))
        with _looping(lambda: raw(bodies[next(index) % len(bodies)], timeout=30)) as counts:
            record("malformed_loop")
        results["malformed_loop"]["attack_statuses"] = dict(counts)

        # Nested policy YAML, in a loop from the admin identity.
        admin = kb_grpc.KeyAdminServiceStub(stack.channel(who.admin, "keybroker"))
        request = kb.SetReleasePolicyRequest(key_id=KEY_ID, policy_document=nested_yaml(20_000))
        with _looping(lambda: admin.SetReleasePolicy(request, timeout=30)) as counts:
            record("nested_yaml_loop")
        results["nested_yaml_loop"]["attack_statuses"] = dict(counts)

        # A slow unary flood from one identity: the publisher keeps 64 GenerateDataKey calls in
        # flight, each waiting for the broker's one HSM worker while it holds a gRPC worker
        # thread; beyond its certificate's share of its identity's data-plane bound (6 of 13, of
        # the 28 data-plane workers) they are refused at once (TOO_MANY_CALLS_PER_CERTIFICATE),
        # so the rest stays for the legitimate client.
        publisher = kb_grpc.KeyBrokerServiceStub(stack.channel(who.publisher, "keybroker"))
        data_key = kb.GenerateDataKeyRequest(
            key_id=KEY_ID, model_name="abuse/flood", model_version="1"
        )
        with _looping(lambda: publisher.GenerateDataKey(data_key, timeout=30), 64) as counts:
            time.sleep(0.5)  # the flood is at full strength before the client is measured
            record("slow_unary_flood_64")
        results["slow_unary_flood_64"]["attack_statuses"] = dict(counts)
