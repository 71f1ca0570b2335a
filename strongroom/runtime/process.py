"""The environment of every service's process (key broker, model store, inference): the same in the
images, the chart, compose and the development stack (so that soaks and benchmarks measure what
ships).

Measured first on the key broker (below), then on the model store and inference under `make soak`'s
load (16 releasers, 8 inference clients, LoadModel every 2 s, 60 s certificates, two 300 s runs side
by side, malloc in use after full collections over the last 70% of each): with the default
environment the model store kept 178 KiB and inference 662 KiB of native memory (RSS slopes 93 and
173 KiB a minute); with this one, +4 and -91 KiB (RSS 9 and 51 KiB a minute), at the same
ModelInfer rate (127,246 against 129,234 calls). With no load but 20 s certificates, each kept ~3
KiB per renewal with the default environment and nothing with this one.

``GLIBC_TUNABLES=glibc.malloc.tcache_count=0`` turns off glibc's per-thread cache of freed
chunks. Each of the gRPC worker threads fills its own cache with the native allocations of a
release (OpenSSL, SoftHSM2, gRPC core) and keeps it: measured (issue 12, 16 callers), the broker's
RSS kept creeping for tens of thousands of releases and settled ~3 MB higher with the caches than
without, at the same CPU per release (5.27 against 5.28 ms, alternated runs). Python's own small
objects do not use malloc's caches (pymalloc), so the interpreter is unaffected.

``MALLOC_ARENA_MAX=1`` keeps every thread's native allocations in the one main heap. By default
glibc gives threads up to 8 arenas per core; each gRPC worker thread's arena fragmented on its own
(free space scattered between chunks still in use), and the broker's RSS crept by ~6-10 KiB per
1,000 releases while the bytes actually in use stayed level (a broker serving only health checks
crept the same way). In one heap the free space is reused: measured over 60,000 releases at 16
callers, ~2.3 MB lower and a slope of ~1.3 instead of ~9 KiB per 1,000. Contention for the one arena
costs nothing measurable here (the interpreter's lock already serialises most of a release): in two
alternated pairs of 10,000 releases, 4.54 / 4.85 ms of CPU per release with one arena against
4.95 / 5.36 with the default.

``GRPC_EXPERIMENTS=-event_engine_listener`` serves the broker's connections with gRPC core's
classic (iomgr) TCP endpoints instead of its EventEngine ones. With the EventEngine endpoints,
gRPC 1.85.3 loses one 128-byte array of a slice buffer on the HTTP/2 write path (the first growth
of the transport's outgoing buffer, taken out by the endpoint's write) about every 0.75 s under
load, whatever the calls are: heaptrack attached to a loaded broker found 426 such arrays still
allocated after 40,000 releases (303 s), 94 after 8,000, none freed when every client connection
closed; with the listener turned off, none after 8,000 releases (and no other allocation on that
path). A bare grpcio server with the same options, credentials and load did not show it, so the
trigger is not known. Measured without heaptrack (which slows the process), after full
collections 70,000 releases apart in a 100,000-release soak: 13 KiB kept with the EventEngine
endpoints, 4 KiB with the classic ones. The cost, in alternated runs of ``releasecpu`` (only this
variable): none measurable at 16 callers, ~11 % on a lone caller's release p50; of ``keybroker``
(the whole environment against none, 2026-12-04, another instance): the lone release 4 % faster
with it, 16 callers 7 % slower. Setting the variable empty goes back.

**Inference only:** ``glibc.malloc.hugetlb=1`` (added to ``GLIBC_TUNABLES``) has malloc ask for
transparent huge pages (``madvise``) for its heap and large allocations. Loading a model is bound
by first touches of fresh memory: ONNX Runtime copies a 512 MB model twice while it builds the
session, 262,000 page faults with 4 KiB pages against ~1,500 with 2 MiB ones; measured here (a
standalone process, six loads each, 2026-12-04): 0.28-0.30 s per load with it, 0.58-0.94 s without,
and the secure cold start of ``make bench``'s ``coldstart`` 1.51 s against 2.00 s (one run each,
with this VM's free page reporting held off: see the README's "Performance"). Idle RSS +0.3-1.7
MB. Only for inference: the broker and the store hold no large buffers, and their memory figures
were measured without it.

:func:`forbid_core_dumps` is the other half of how a service's process runs: ``strongroom serve``
calls it for every service before anything else. How it ends: while starting,
:mod:`strongroom.runtime.starting`; once its calls were abandoned, :func:`exit_abandoning`.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn

from strongroom.runtime import signals

PROCESS_ENV: Mapping[str, str] = MappingProxyType(
    {
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0",
        "MALLOC_ARENA_MAX": "1",
        "GRPC_EXPERIMENTS": "-event_engine_listener",
    }
)
"""What every service's process runs with."""

SERVICE_ENV: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "keybroker": PROCESS_ENV,
        "modelstore": PROCESS_ENV,
        "inference": MappingProxyType(
            {
                **PROCESS_ENV,
                "GLIBC_TUNABLES": PROCESS_ENV["GLIBC_TUNABLES"] + ":glibc.malloc.hugetlb=1",
            }
        ),
    }
)
"""Each service's process environment: :data:`PROCESS_ENV`, and huge pages for inference."""


def forbid_core_dumps() -> None:
    """Keeps this process's memory out of core dumps: for a process that holds keys or models.

    A crash (a model that trips a bug in ONNX Runtime, an abort, a ``kill -ABRT``) would otherwise
    have the kernel write every decrypted model, data key and private key in memory to a core
    file, or hand it to a crash collector that stores it: the one way plaintext reaches disk
    without the process writing it. Container runtimes commonly start processes with no core size
    limit. The limit goes to 0, the hard one too, so that nothing in the process raises it again;
    collectors behind a piped ``core_pattern`` (systemd-coredump) honour it as well.

    The process is not also made non-dumpable (``PR_SET_DUMPABLE``): that would hide its
    ``/proc/<pid>`` files (environment, memory maps) from the same user's tools, which the soak
    and benchmarks read, and the limit already keeps the core from being written.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


log = logging.getLogger(__name__)


def exit_abandoning(calls: int, *, status: int = 0) -> NoReturn:
    """Ends the process now, its log written first (within its flush budget, FLUSH_SECONDS),
    without waiting for the ``calls`` handlers the server's stop gave up on.

    At exit, ``concurrent.futures`` joins every worker thread of the server's pool: past the
    drain (:data:`~strongroom.runtime.server.HANDLER_DRAIN_SECONDS`), a hung handler (an audit
    commit on storage that stalled) held the process until the kubelet killed it at 30 s, its last log
    lines (queued for a slow collector) lost, and its exit handlers cut off wherever they were.
    Exit handlers (pending spans' export among them) do not run: each may wait on what hangs.
    The status is 0 (``status``: 1 when the service's close failed or did not finish): the
    service stopped when asked, the abandoned calls are the log's to say."""
    log.warning("exiting with %d calls abandoned", calls, extra={"abandoned": calls})
    exit_now(status)


def exit_now(status: int) -> NoReturn:
    """Writes the log (``logging.shutdown``, within its flush budget) and ends the process with
    ``status`` at once: no exit handler runs, no thread is waited for (``concurrent.futures``
    joins its pools' workers at exit, however long their tasks take). The lines of signals
    handled meanwhile are written first (:func:`~strongroom.runtime.signals.settle`)."""
    signals.settle()
    logging.shutdown()
    os._exit(status)
