"""The README's first command: the lifecycle demo runs to completion as separate processes; what
it writes is private; SIGTERM to ``demo --keep`` stops everything it started (issue 11, 6 and 9)."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

PUBLISHED_BY_THE_PKI = {
    "pki/certs/root_ca.crt",
    "pki/certs/intermediate_ca.crt",
    "pki/config/ca.json",
    "pki/config/strongroom.json",
}
"""What the PKI writes world-readable on purpose (certificates, the CA's public configuration)."""


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def _stop(pids: set[int]) -> None:
    """Last resort for a failing test: stop what the demo left behind (our own children)."""
    for pid in pids:
        if _alive(pid):
            subprocess.run(["kill", "-9", str(pid)], check=False)


@pytest.mark.slow
def test_demo_runs_every_step_writes_privately_and_stops_everything_on_sigterm(
    tmp_path: Path, step_ca_binary: Path
) -> None:
    root = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "strongroom.cli.main", "demo", "--keep", "--dir", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: nothing here can signal the test runner
    )
    lines: list[str] = []
    children: set[int] = set()
    try:
        assert process.stdout is not None
        for line in process.stdout:  # bounded by the demo itself and the test timeout
            lines.append(line)
            if line.startswith("Services keep running"):
                break
        out = "".join(lines)
        assert "Services keep running" in out, out[-3000:]
        for step in range(8):
            assert f"=== {step}." in out
        assert "MEASUREMENT_NOT_ALLOWED" in out
        assert "inference verified the broker's release signature" in out
        assert "DATA_LOSS DECRYPTION_FAILED" in out
        assert "loading a model written under another model's data key: DATA_LOSS" in out
        assert "Demo complete" in out
        children = _children(process.pid)
        assert len(children) >= 4, children

        # Finding 6: logs (step-ca's records one-time tokens), the plaintext model and every
        # directory are for the demo's user only.
        written = [root, *root.rglob("*")]
        assert len(list((root / "logs").glob("*.log"))) >= 3
        assert any(p.name == "model.onnx" for p in written)
        assert any(p.suffix == ".log" and "pki" in p.parts for p in written)
        public = {str(p.relative_to(root)) for p in written if not _private(p)}
        assert public <= PUBLISHED_BY_THE_PKI, public
        assert _private(root)

        # Finding 9: SIGTERM stops step-ca and every service, not only the demo.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        _stop(children)
