"""The guest kernel settings that move this VM's figures, recorded beside every area's results.

Two settings of a virtual machine move benchmark figures (some several-fold) without any change of
code (README, "Benchmarking on this VM"):

- **free page reporting** (``page_reporting_order``): memory the guest frees goes back to the host
  in blocks of ``2**order`` pages, and the next touch of it is a host fault; steps bound by first
  touches of fresh memory (ONNX Runtime's load, a fresh decryption buffer) then vary from run to run;
- **guest halt polling** (the ``haltpoll`` cpuidle driver's ``guest_halt_poll_ns``): how long an
  idle vCPU spins before it halts. A halted vCPU is woken through the host (an exit and a
  re-entry), so every wait of a request's path that outlasts the polling window (a reply, an
  ``fsync``, a hand-off between threads) costs that wake-up on top of itself; latency figures of a
  lone caller move with it.

Each value is ``None`` where the kernel does not expose it (no such module, not Linux).
"""

from __future__ import annotations

from pathlib import Path

PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
CPUIDLE_DRIVER = Path("/sys/devices/system/cpu/cpuidle/current_driver")


def read_int(path: Path) -> int | None:
    """The integer in ``path``, or None if it cannot be read."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def vm_state() -> dict[str, int | str | None]:
    """The idle and memory settings of this machine now (module docstring)."""
    try:
        driver: str | None = CPUIDLE_DRIVER.read_text().strip()
    except OSError:
        driver = None
    return {
        "cpuidle_driver": driver,
        "guest_halt_poll_ns": read_int(HALT_POLL) if driver == "haltpoll" else None,
        "page_reporting_order": read_int(PAGE_REPORTING / "page_reporting_order"),
    }
