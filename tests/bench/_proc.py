"""A process as Linux's /proc shows it: memory figures and the shipped environment it runs with.

Shared by the benchmarks, the soak and the memory probe (which runs inside services).
"""

from __future__ import annotations

import os
from pathlib import Path

from strongroom.runtime.process import PROCESS_ENV


def status(pid: int | str = "self") -> dict[str, int]:
    """The numeric fields of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``, ... in KiB; ``Threads``).
    Raises OSError once the process is gone."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        words = value.split()
        if words and words[0].isdigit():
            fields[key] = int(words[0])
    return fields


def rss_kib(pid: int | str = "self") -> int:
    """A process's resident set size in KiB."""
    return status(pid)["VmRSS"]


def process_env(pid: int) -> dict[str, str]:
    """A service process's settings of :data:`PROCESS_ENV`'s variables, as it actually runs.
    Debian 12's glibc applies ``glibc.malloc.hugetlb`` and then erases it from the process's
    ``GLIBC_TUNABLES``: see :func:`anon_huge_pages_kib` for its effect."""
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(p.decode().split("=", 1) for p in pairs if b"=" in p)
    return {k: env[k] for k in PROCESS_ENV if k in env}


def anon_huge_pages_kib(pid: int) -> int:
    """How much of a process's anonymous memory sits on transparent huge pages (KiB)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _utime_stime(stat: str) -> float:
    # After "pid (comm)" the state is field 3, so utime (14) and stime (15) are at 11 and 12.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def cpu_seconds(pid: int | str = "self") -> float:
    """A process's CPU time so far (utime + stime of all its threads), in seconds."""
    return _utime_stime(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """Each live thread's OS name and CPU time so far, by thread id (threads that end while
    being read are left out)."""
    threads: dict[int, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        threads[int(tid)] = (stat[stat.index("(") + 1 : stat.rindex(")")], _utime_stime(stat))
    return threads


def context_switches(pid: int | str = "self") -> tuple[int, int]:
    """A process's (voluntary, involuntary) context switches so far, summed over its live threads:
    voluntary ones are waits (a lock, the interpreter lock, I/O), involuntary ones preemptions."""
    voluntary = involuntary = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = status(f"{pid}/task/{tid}")
        except OSError:
            continue
        voluntary += fields.get("voluntary_ctxt_switches", 0)
        involuntary += fields.get("nonvoluntary_ctxt_switches", 0)
    return voluntary, involuntary


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy so far (every process, kernel and interrupts)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S
