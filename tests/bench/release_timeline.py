"""A per-stage timeline of one lone key release: where its milliseconds go, thread by thread.

``python -m tests.bench.release_timeline [--releases N]`` starts a DevStack broker in this process
(as ``keybroker_bench`` does, in a child with the broker's process environment), makes lone
releases from one caller, and stamps ``time.perf_counter_ns()`` at each step of each release:
the caller's two RPCs and its simulated report, the handler's first step, the engine's steps
(the verification's own: parse, chain, signature, bindings, revocation), the audit commit (its
locks, its identity checks, each syscall of the write and the head, the signatures), the HSM
worker's hand-offs and its C call, and the answer's signature. The
stamps are wrappers put around those functions for the run (bench-only: the broker's code is
not changed); each wrapper costs about a microsecond, which the figures include.

It prints each wrapped step's median duration over every release, then, for each stamp in the
order most releases make them (over those releases only), the median time since the caller sent
GetChallenge and since the stamp before it (``gap``), and the thread that made it: a gap between
stamps of two threads is a hand-off (a wake-up of a sleeping thread on this VM, whose idle vCPUs
halt at once), a gap within one thread is work or a wait of that thread. Compare builds in
alternated runs; absolute figures swing with the machine's load.

The broker is started with its release grant budget set explicitly out of reach
(``tests/bench/_budget.py``): its callers release keys back to back from one inference identity,
far past the default budget (1,024 at once, then 8 a second, per SPIFFE ID), which would otherwise
turn all but the first thousand into ``RELEASES_RATE_LIMITED`` refusals and time those instead.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from strongroom.attestation.verify import snp
from strongroom.dev.devstack import DevStack
from strongroom.keybroker import audit as audit_module
from strongroom.keybroker import audit_head, hsm, keys, release, service
from tests.bench._budget import bench_broker_section
from tests.bench._child import child_main, run_in_child
from tests.bench.keybroker_bench import FLEET_SERVER, caller_factory

#: The module its child process runs (``python -m``: then ``__name__`` is ``__main__``).
CHILD_MODULE = "tests.bench.release_timeline"
_stamps: list[tuple[str, str, int]] = []
_recording = threading.Event()


def _stamp(name: str) -> None:
    if _recording.is_set():
        _stamps.append((name, threading.current_thread().name, time.perf_counter_ns()))


def _wrap(owner: Any, attribute: str, label: str | None = None) -> None:
    """Stamps ``label`` (default: ``attribute``) around each call of ``owner.attribute``."""
    original = getattr(owner, attribute)
    name = label or attribute

    @functools.wraps(original)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        _stamp(f"{name}>")
        try:
            return original(*args, **kwargs)
        finally:
            _stamp(f"<{name}")

    setattr(owner, attribute, stamped)


def _instrument(engine: Any, audit_log: Any) -> None:
    # The handlers' first step (the servicer's methods were bound when the server started).
    _wrap(service, "_caller", "handler.verified_caller")
    _wrap(engine, "release", "engine.release")
    _wrap(release, "verify_evidence", "verify_evidence")
    # Inside the verification (SEV-SNP).
    for name in ("parse_snp_report", "_split_certificates", "verify_key_chain"):
        _wrap(snp, name, f"verify.{name}")
    for name in ("_verify_signature", "_check_bindings"):
        _wrap(snp, name, f"verify.{name}")
    _wrap(engine._collateral, "crl", "verify.collateral.crl")
    _wrap(snp._crl, "check_revocation", "verify.check_revocation")
    _wrap(engine._keys, "begin_release", "keys.begin_release")
    _wrap(engine._signer, "sign", "answer.sign")
    _wrap(release.log, "info", "log.info")
    _wrap(audit_log, "append", "audit.append")
    _wrap(audit_log, "_commit", "audit._commit")
    _wrap(audit_log, "_resync", "audit._resync")
    _wrap(audit_log, "_write_batch", "audit._write_batch")
    _wrap(audit_log._head, "write", "head.write")
    _wrap(audit_module, "_record_line", "record.sign+hash")
    _wrap(audit_head, "_slot_bytes", "head.sign")
    _wrap(audit_module, "_Pending", "audit.encode_event")
    _wrap(keys.PendingRelease, "start", "hsm.start(on_written)")
    _wrap(keys.PendingRelease, "result", "hsm.result")
    _wrap(hsm.HsmCall, "_begin", "hsm.worker_took")
    # The re-wrap's one C call makes the version's still-enabled read too (its last step).
    _wrap(keys, "_release_with", "hsm.C_rewrap+read")
    for name in ("fsync", "fdatasync", "write", "pwrite", "pread", "fstat", "stat", "ftruncate"):
        _wrap(os, name, f"os.{name}")
    _wrap(fcntl, "flock", "fcntl.flock")


def _timeline(releases: int, sequential: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp)) as stack:
        broker = stack.start_in_process(
            "keybroker", bench_broker_section(stack), server=FLEET_SERVER
        )
        caller = caller_factory(stack)()
        audit_log = broker.handle.audit
        if sequential:
            # The re-wrap after the audit, not overlapping it (``keybroker_bench``'s overlap A/B).
            append = audit_log.append
            audit_log.append = lambda event, on_written=None: append(event)
        _instrument(broker.handle.engine, audit_log)
        for _ in range(20):
            caller.release()  # connections, caches
        runs: list[list[tuple[str, str, int]]] = []
        platform_report = caller.platform.report

        def report(*args: Any, **kwargs: Any) -> Any:
            _stamp("client.report>")
            try:
                return platform_report(*args, **kwargs)
            finally:
                _stamp("<client.report")

        caller.platform.report = report  # type: ignore[method-assign]
        stub = caller.stub
        for method in ("GetChallenge", "ReleaseKey"):
            _wrap(stub, method, f"client.{method}")
        for _ in range(releases):
            time.sleep(0.002)  # a lone caller: nothing of the last release still runs
            _stamps.clear()
            _recording.set()
            caller.release()
            _recording.clear()
            runs.append(list(_stamps))
    return _summarise(runs)


def _summarise(runs: list[list[tuple[str, str, int]]]) -> dict[str, Any]:
    # Key each stamp by its name and how many times that name came before it in its release.
    shapes: dict[tuple[str, ...], int] = {}
    for run in runs:
        shape = tuple(name for name, _, _ in run)
        shapes[shape] = shapes.get(shape, 0) + 1
    common = max(shapes, key=lambda s: shapes[s])
    chosen = [run for run in runs if tuple(name for name, _, _ in run) == common]
    rows = []
    for index, name in enumerate(common):
        since_start = [(run[index][2] - run[0][2]) / 1e3 for run in chosen]
        gap = [(run[index][2] - run[index - 1][2]) / 1e3 if index else 0.0 for run in chosen]
        thread = chosen[0][index][1]
        rows.append(
            {
                "stamp": name,
                "thread": thread,
                "at_us": round(statistics.median(since_start), 1),
                "gap_us": round(statistics.median(gap), 1),
            }
        )
    return {
        "releases": len(runs),
        "releases_with_the_usual_order": len(chosen),
        # Over every release, whatever its order (the rows are over the usual order only).
        "total_us_p50": round(statistics.median((r[-1][2] - r[0][2]) / 1e3 for r in runs), 1),
        "spans_us_p50": _spans(runs),
        "rows": rows,
    }


def _spans(runs: list[list[tuple[str, str, int]]]) -> dict[str, float]:
    """Each wrapped step's median duration over every release that made it (its first call)."""
    durations: dict[str, list[float]] = {}
    for run in runs:
        began: dict[str, int] = {}
        seen: set[str] = set()
        for name, _, at in run:
            if name.endswith(">") and name[:-1] not in began:
                began[name[:-1]] = at
            elif name.startswith("<") and name[1:] in began and name[1:] not in seen:
                seen.add(name[1:])
                durations.setdefault(name[1:], []).append((at - began[name[1:]]) / 1e3)
    return {name: round(statistics.median(d), 1) for name, d in durations.items()}


def measure(results: dict[str, Any], *, releases: int = 300, sequential: bool = False) -> None:
    """The timeline of ``releases`` lone releases (module doc); ``sequential``: with the HSM's
    re-wrap started after the audit commit instead of overlapping it."""
    results.update(_timeline(releases, sequential))


def _print(result: dict[str, Any]) -> None:
    print(
        f"p50 total {result['total_us_p50']} µs over {result['releases']} releases; the rows: "
        f"the {result['releases_with_the_usual_order']} whose stamps came in the usual order"
    )
    for name, us in result["spans_us_p50"].items():
        print(f"{us:9.1f} µs  {name} (p50 over every release)")
    print(f"{'at µs':>9} {'gap µs':>8}  {'thread':<22} stamp")
    for row in result["rows"]:
        print(f"{row['at_us']:9.1f} {row['gap_us']:8.1f}  {row['thread'][:22]:<22} {row['stamp']}")


def _main(argv: list[str]) -> None:
    releases = int(argv[argv.index("--releases") + 1]) if "--releases" in argv else 300
    options = {"releases": releases, "sequential": "--sequential" in argv}
    result = run_in_child(CHILD_MODULE, "keybroker", options)
    if "--json" in argv:
        print(json.dumps(result, indent=1))
    else:
        _print(result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("{"):
        child_main(measure)
    else:
        _main(sys.argv)
