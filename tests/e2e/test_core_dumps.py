"""A crash of the inference process leaves no core dump holding the decrypted model.

The real ``strongroom serve inference`` runs as a child process with its core size limit raised
(as container runtimes commonly start processes: no limit) and its working directory in a fresh
tmp dir; it loads a model whose weights carry a random canary over mTLS (attested release from the
real broker), then aborts as a crash would (SIGABRT). Before, the kernel then wrote the whole
process memory, decrypted model included, to a ``core`` file; the service now sets its core limit
to 0 (soft and hard) before anything is decrypted.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from pathlib import Path

import numpy as np

from strongroom.api.inference.v1 import model_control_pb2 as control_pb
from strongroom.api.inference.v1 import model_control_pb2_grpc as control_grpc
from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from tests.inference import onnx_models

NAME = "coredump"
# The launcher ``strongroom serve inference`` is started through: the core limit raised to the
# hard limit (no limit here and under most container runtimes), the working directory (where the
# kernel's default core_pattern "core" writes) moved into the test's own directory.
_LAUNCH = (
    "import os, resource, sys\n"
    "os.chdir(sys.argv[1])\n"
    "hard = resource.getrlimit(resource.RLIMIT_CORE)[1]\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))\n"
    "from strongroom.cli.main import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def _core_limit(pid: int) -> tuple[str, str]:
    """The (soft, hard) core file size limit of process ``pid``, as /proc shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit in /proc/pid/limits")


def _holds(path: Path, canary: bytes) -> bool:
    with path.open("rb") as f:
        tail = b""
        while block := f.read(16 << 20):
            if canary in tail + block:
                return True
            tail = block[-len(canary) :]
    return False


def test_a_crashing_inference_process_leaves_no_core_dump(stack: DevStack, tmp_path: Path) -> None:
    canary = secrets.token_bytes(16)
    table = np.frombuffer(canary * 4096, dtype="<f4")
    model = tmp_path / "plain" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(onnx_models.lookup(table))
    admin, publisher = stack.identity("admin"), stack.identity("publisher")
    stack.create_release_key(admin, NAME, policy_version="1")
    publish_model(
        model,
        name=NAME,
        version="1",
        key_id=NAME,
        broker=stack.channel(publisher, "keybroker"),
        store=stack.channel(publisher, "modelstore"),
    )
    model.unlink()  # the only plaintext on disk is the test's own: gone before the service runs

    crash_dir = tmp_path / "cwd"
    crash_dir.mkdir()
    running = stack.start_process(
        "inference", launcher=(sys.executable, "-c", _LAUNCH, str(crash_dir))
    )
    try:
        process = running.process
        assert process is not None
        control = control_grpc.ModelControlServiceStub(stack.channel(admin, "inference"))
        control.LoadModel(control_pb.LoadModelRequest(name=NAME, version="1"), timeout=120)
        limit = _core_limit(process.pid)
        os.kill(process.pid, signal.SIGABRT)
        assert process.wait(120) == -signal.SIGABRT
    finally:
        stack.services.pop("inference").stop()
    written = sorted(p for p in crash_dir.rglob("*") if p.is_file())
    leaked = [p.name for p in written if _holds(p, canary)]
    for path in written:  # a core is hundreds of MB: not left in the tmp dirs pytest keeps
        path.unlink()
    assert leaked == [], "the decrypted model reached disk in a core dump"
    assert written == []
    assert limit == ("0", "0")
