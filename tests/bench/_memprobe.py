"""A small memory probe inside a service process, queried over a Unix socket by a benchmark.

Run a service through it: ``python -m tests.bench._memprobe serve keybroker --config ...`` with
``STRONGROOM_MEMPROBE`` naming the socket path; it starts the probe's thread, then runs the CLI
unchanged. Each connection sends one JSON line ``{"op": ...}`` and gets one JSON line back:

- ``sample``: RSS (``/proc/self/status``), glibc ``mallinfo2`` (bytes in use by malloc, free in
  its arenas, in mmapped blocks), the gc generation counts and, while tracing, the bytes
  tracemalloc sees;
- ``trace_start``: starts tracemalloc (``frames`` deep) and takes the baseline snapshot;
- ``trace_mark``: a new baseline with tracing left on (growth after caches have filled);
- ``trace_top``: the ``limit`` source lines (or, with ``"group": "traceback"``, whole call paths)
  whose Python allocations grew most since the baseline, and the total growth; stops tracing.
  Both snapshots follow a full ``gc.collect()``; what is in flight at either moment (up to one
  release per caller) still shows as growth;
- ``garbage``: a full collection that counts, by type, the objects only reference cycles kept
  alive (and the malloc bytes and RSS their collection freed);
- ``census``: a full collection, then the live gc-tracked objects by type and the blocks pymalloc
  holds (``sys.getallocatedblocks``): two censuses apart tell Python objects from native memory;
- ``trim``: ``malloc_trim(0)``, with RSS before and after (what glibc kept but could return).

Only for benchmarks: the socket is created 0600 in a directory the benchmark owns.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import os
import resource
import socket
import sys
import threading
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench._proc import rss_kib

ENV = "STRONGROOM_MEMPROBE"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc() -> Any:
    # Once: each ctypes.CDLL() makes new function-pointer types tied up in reference cycles
    # (~10 KiB of malloc'd memory per load, freed only by a full collection), which the probe
    # would otherwise add to the very figures it samples.
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def sample() -> dict[str, Any]:
    """RSS, malloc's view of the heap and the gc counts (the ``sample`` answer)."""
    info = _libc().mallinfo2()
    out: dict[str, Any] = {
        "rss_kib": rss_kib(),
        "malloc_in_use_kib": info.uordblks // 1024,  # allocated by malloc from its arenas
        "malloc_free_kib": info.fordblks // 1024,  # free inside the arenas (fragmentation)
        "malloc_mmapped_kib": info.hblkhd // 1024,  # large blocks mapped directly
        "malloc_arena_kib": info.arena // 1024,
        "gc_counts": list(gc.get_count()),
        "gc_objects": len(gc.get_objects()),  # tracked and not frozen
        "gc_frozen": gc.get_freeze_count(),  # frozen once the service serves (settle_heap)
        "threads": threading.active_count(),  # a worker pool still growing holds memory too
        "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 4),  # user + system
    }
    if tracemalloc.is_tracing():
        out["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
    return out


def _garbage(limit: int) -> dict[str, Any]:
    """Collects every generation, keeping what was unreachable (``gc.DEBUG_SAVEALL``) to count it
    by type, then drops it: memory that only reference cycles held, waiting for a collection."""
    before = sample()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        found = gc.collect()
        kinds = Counter(
            f"class {obj.__module__}.{obj.__qualname__}"  # which classes are made and dropped
            if isinstance(obj, type)
            else type(obj).__qualname__
            for obj in gc.garbage
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    gc.collect()  # what the saved objects alone kept alive
    after = sample()
    return {
        "unreachable": found,
        "by_type": kinds.most_common(limit),
        "malloc_in_use_freed_kib": before["malloc_in_use_kib"] - after["malloc_in_use_kib"],
        "rss_freed_kib": before["rss_kib"] - after["rss_kib"],
    }


def _census() -> dict[str, Any]:
    """After a full collection: the live gc-tracked objects by type (frozen ones not counted), the
    blocks pymalloc holds and a :func:`sample`, to diff between two moments of a soak. The
    service's background threads (readiness checks, gRPC's pollers) keep running, so a few dozen
    objects they have in flight can differ between ``by_type`` and the sample's ``gc_objects``."""
    gc.collect()
    kinds = Counter(type(obj).__qualname__ for obj in gc.get_objects())
    return {"pymalloc_blocks": sys.getallocatedblocks(), "by_type": dict(kinds), **sample()}


def _live_snapshot() -> tracemalloc.Snapshot:
    gc.collect()  # compare live objects, not garbage that the next collection frees
    return tracemalloc.take_snapshot()


class _Probe:
    def __init__(self) -> None:
        self.baseline: tracemalloc.Snapshot | None = None

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "sample":
            return sample()
        if op in ("trace_mark", "trace_top") and self.baseline is None:
            return {"error": "trace_start first"}
        if op == "trace_start":
            tracemalloc.start(int(request.get("frames", 1)))
            self.baseline = _live_snapshot()
            return {"tracing": True}
        if op == "trace_mark":  # a new baseline, tracing on: growth after caches filled up
            self.baseline = _live_snapshot()
            return {"tracing": True}
        if op == "trace_top":
            assert self.baseline is not None  # checked above
            now = _live_snapshot()
            group = str(request.get("group", "lineno"))  # or "traceback": whole call paths
            stats = now.compare_to(self.baseline, group)
            tracemalloc.stop()
            self.baseline = None
            limit = int(request.get("limit", 10))
            return {
                "growth_kib": round(sum(s.size_diff for s in stats) / 1024, 1),
                "top": [
                    {
                        "where": str(s.traceback[0])
                        if group == "lineno"
                        else [str(frame) for frame in s.traceback],
                        "growth_kib": round(s.size_diff / 1024, 1),
                        "count_diff": s.count_diff,
                    }
                    for s in stats[:limit]
                ],
            }
        if op == "garbage":
            return _garbage(int(request.get("limit", 10)))
        if op == "census":
            return _census()
        if op == "trim":
            before = rss_kib()
            _libc().malloc_trim(0)
            return {"rss_before_kib": before, "rss_after_kib": rss_kib()}
        return {"error": f"unknown op {op!r}"}

    def serve(self, server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as stream:
                try:
                    reply = self.answer(json.loads(stream.readline()))
                except Exception as exc:  # the probe must never take the service down
                    reply = {"error": repr(exc)}
                stream.write(json.dumps(reply).encode() + b"\n")


def install(path: str) -> None:
    """Starts the probe's daemon thread listening on the Unix socket ``path``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(4)
    threading.Thread(target=_Probe().serve, args=(server,), name="memprobe", daemon=True).start()


def ask(path: Path | str, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
    """Sends one request to the probe at ``path`` and returns its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        with client.makefile("rwb") as stream:
            stream.write(json.dumps({"op": op, **args}).encode() + b"\n")
            stream.flush()
            reply: dict[str, Any] = json.loads(stream.readline())
    if "error" in reply:
        raise RuntimeError(f"memprobe {op}: {reply['error']}")
    return reply


def main() -> int:
    """Installs the probe (``STRONGROOM_MEMPROBE``), then runs the Strongroom CLI."""
    install(os.environ[ENV])
    from strongroom.cli.main import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
