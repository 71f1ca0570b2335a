"""What a response really holds at its peak, on a real server, against what the response budget
reserves for it.

The server runs in a process of its own with the inference service's environment
(:mod:`tests.inference.peak_server`), its peak resident memory read from the kernel (``VmHWM``,
reset before the call); the client is another process, so that its copies of the response do
not count. Each output is 16 MiB or more, so the few MiB a process allocates besides are far
inside the margins. The peak is the whole process's (ONNX Runtime's arena, which a cap of its
own counts, included): a stricter check than the budget needs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from strongroom.runtime.process import SERVICE_ENV

MIB = 1 << 20

_CLIENT = """
import sys, grpc
from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.api.oip.v2.grpc_service_pb2_grpc import GRPCInferenceServiceStub
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.max_receive_message_length", -1)])
request = pb.ModelInferRequest(model_name="filled")
tensor = request.inputs.add(name="n", datatype="INT64", shape=[1])
if sys.argv[3] == "raw":  # a raw request is answered raw
    request.raw_input_contents.append(int(sys.argv[2]).to_bytes(8, "little", signed=True))
else:
    tensor.contents.int64_contents.append(int(sys.argv[2]))
GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
"""


@pytest.mark.parametrize(
    ("datatype", "value", "elements", "contents"),
    [
        # Raw FP32, 24 MiB: gRPC serialises the message into a buffer grown by doubling, 32 MiB
        # (and the 16 MiB it outgrew, while it copies them), beside the message and the bytes
        # made from it: 3.96 times (5.0 at 32 and 64 MiB, the default bound; 3.0 at 63 MiB).
        ("FP32", 1.5, 6 * MIB, "raw"),
        # FP32: 16 MiB on the wire (the measured 6.1 times, under the 5 reserved before).
        ("FP32", 1.5, 4 * MIB, "typed"),
        # INT8 ones: 1 byte each on the wire and in the array, 4 in the message's int32 field
        # (13 times the 16 MiB counted before, 5 reserved).
        ("INT8", 1, 16 * MIB, "typed"),
        # BOOL: 1 byte each everywhere (7 times).
        ("BOOL", 1, 16 * MIB, "typed"),
        # Negative INT64s: 10 bytes each on the wire, 8 in the array and the field (5.4 times).
        ("INT64", -1, 4 * MIB, "typed"),
    ],
)
def test_a_responses_reservation_covers_what_it_holds(
    datatype: str, value: float, elements: int, contents: str
) -> None:
    env = {**os.environ, **SERVICE_ENV["inference"]}
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.inference.peak_server", datatype, str(value)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        address = server.stdout.readline().strip()
        client = [sys.executable, "-c", _CLIENT, address]
        subprocess.run([*client, "16", contents], check=True, timeout=120)  # warm: threads
        server.stdin.write("reset\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "ok"
        subprocess.run([*client, str(elements), contents], check=True, timeout=120)
        server.stdin.write("report\n")
        server.stdin.flush()
        held, reserved = map(int, server.stdout.readline().split())
    finally:
        server.stdin.close()
        server.wait(30)
    assert reserved >= held, (
        f"{contents} {datatype}: the response held {held / MIB:.0f} MiB at its peak, "
        f"the budget reserved {reserved / MIB:.0f} MiB"
    )
