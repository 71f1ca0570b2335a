"""A real inference server in a process of its own, reporting its peak resident memory and the
most its response budget reserved (``python -m tests.inference.peak_server DATATYPE VALUE``).

It prints its address, then answers lines on stdin: ``reset`` (the peak counted from now, the
budget's most forgotten) with ``ok``, ``report`` with the peak's growth since the reset and the
most the budget reserved meanwhile, in bytes. A process of its own, run with the inference
service's environment (:data:`~strongroom.runtime.process.SERVICE_ENV`): the allocator's state
after other tests in a shared process changed what the same response held.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import ResponseBudget
from strongroom.inference.oip._budget import Reservation
from tests.inference import onnx_models
from tests.inference.conftest import start, stop


class _Recording(ResponseBudget):
    """A budget that remembers the most its reservations held at once."""

    def __init__(self) -> None:
        super().__init__(8 << 30, wait_seconds=0, per_caller=8 << 30)
        self.most = 0
        self._lock = threading.Lock()

    def _take(self, size: int, caller: str | None, certificate: str | None) -> Reservation:
        reservation = super()._take(size, caller, certificate)
        with self._lock:
            self.most = max(self.most, self.max_bytes - self._free)
        return reservation


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def main() -> None:
    """Serves ``filled`` of the datatype and value given until stdin ends."""
    repository = ModelRepository(["filled"])
    repository.load("filled", "1", onnx_models.filled(sys.argv[1], float(sys.argv[2])))
    budget = _Recording()
    running = start(repository, response_budget=budget)
    print(running.address, flush=True)
    base = 0
    for line in sys.stdin:
        if line.strip() == "reset":
            base = _status("VmRSS")
            budget.most = 0
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
            print("ok", flush=True)
        elif line.strip() == "report":
            print(_status("VmHWM") - base, budget.most, flush=True)
    stop(running)


if __name__ == "__main__":
    main()
