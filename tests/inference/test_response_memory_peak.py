"""What a typed response really holds at its peak, on a real server, against what the response
budget reserves for it.

The server runs in this process and its peak resident memory is read from the kernel
(``VmHWM``, reset before each call through ``/proc/self/clear_refs``); the client is another
process, so that its copies of the response do not count. Each output is 16 MiB or more, so the
few MiB a process allocates besides are far inside the margins. The reservation is what the
budget held at most during the call.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from strongroom.inference.models import ModelRepository
from strongroom.inference.oip import ResponseBudget
from strongroom.inference.oip._budget import Reservation
from tests.inference import onnx_models
from tests.inference.conftest import Starter

MIB = 1 << 20

_CLIENT = """
import sys, grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2.grpc_service_pb2_grpc import GRPCInferenceServiceStub
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", -1)])
request = pb.ModelInferRequest(model_name=sys.argv[2])
request.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(
    int(sys.argv[3])
)
GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
"""


class _Recording(ResponseBudget):
    """A budget that remembers the most its reservations held at once."""

    def __init__(self) -> None:
        super().__init__(8 << 30, wait_seconds=0, per_caller=8 << 30)
        self.most = 0
        self._lock = threading.Lock()

    def _take(self, size: int, caller: str | None) -> Reservation:
        reservation = super()._take(size, caller)
        with self._lock:
            self.most = max(self.most, self.max_bytes - self._free)
        return reservation


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    ("datatype", "value", "elements"),
    [
        # FP32: 16 MiB on the wire (the measured 6.1 times, under the 5 reserved before).
        ("FP32", 1.5, 4 * MIB),
        # INT8 ones: 1 byte each on the wire and in the array, 4 in the message's int32 field
        # (13 times the 16 MiB counted before, 5 reserved).
        ("INT8", 1, 16 * MIB),
        # BOOL: 1 byte each everywhere (7 times).
        ("BOOL", 1, 16 * MIB),
        # Negative INT64s: 10 bytes each on the wire, 8 in the array and the field (5.4 times).
        ("INT64", -1, 4 * MIB),
    ],
)
def test_a_typed_responses_reservation_covers_what_it_holds(
    start_server: Starter, datatype: str, value: float, elements: int
) -> None:
    repository = ModelRepository(["filled"])
    repository.load("filled", "1", onnx_models.filled(datatype, value))
    budget = _Recording()
    running = start_server(repository, response_budget=budget)
    client = [sys.executable, "-c", _CLIENT, running.address, "filled"]
    subprocess.run([*client, "16"], check=True, timeout=120)  # warm: threads, sessions
    base = _resident()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    subprocess.run([*client, str(elements)], check=True, timeout=120)
    held = _peak() - base
    assert budget.most >= held, (
        f"{datatype}: the response held {held / MIB:.0f} MiB at its peak, "
        f"the budget reserved {budget.most / MIB:.0f} MiB"
    )
