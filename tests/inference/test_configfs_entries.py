"""configfs-tsm report entries never outlive their use: removed on every exit path, a failed removal
retried, and the entries of a process that died removed by the next attester (only those: never
another program's, another pid namespace's or a live process's). And the ``privlevel`` setting."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.inference.config import InferenceConfig
from strongroom.attesters import (
    AttestationUnavailable,
    ConfigfsTsmAttester,
    ReportBindingMismatch,
    _configfs,
    select_attester,
)
from strongroom.reasons import Reason
from strongroom.runtime.config import ConfigError, build
from tests.inference.fake_tee import EmulatedConfigfs

RD = bytes(range(64))
REPO = Path(__file__).resolve().parents[2]

# A process that dies (SIGKILL) while the kernel makes its report: the entry stays behind.
_CRASHING_CHILD = """
import os, signal, sys
from pathlib import Path
from strongroom.attesters import ConfigfsTsmAttester
from tests.inference.fake_tee import EmulatedConfigfs

root = Path(sys.argv[1])
fs = EmulatedConfigfs(root, before_outblob=lambda entry: os.kill(os.getpid(), signal.SIGKILL))
ConfigfsTsmAttester(root, fs=fs).attest(bytes(64))
"""


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def test_an_entry_left_by_a_crashed_process_is_removed_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "report"
    root.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, str(root)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    (left,) = os.listdir(root)
    assert left.startswith(f"strongroom-{_configfs._pid_namespace()}-")
    with caplog.at_level(logging.WARNING, logger=_configfs.__name__):
        fs = EmulatedConfigfs(root)
        attester = ConfigfsTsmAttester(root, fs=fs)
    assert os.listdir(root) == []
    assert any(getattr(r, "entries", None) == [left] for r in caplog.records)
    attester.attest(RD)
    assert os.listdir(root) == []


def test_the_sweep_touches_only_dead_processes_entries_of_its_own_namespace(
    tmp_path: Path,
) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    namespace = _configfs._pid_namespace()
    dead = _dead_pid()
    keep = [
        "other-tool-entry",  # not ours
        f"strongroom-{namespace + 1}-{dead}-{'cd' * 8}",  # another pid namespace: cannot judge
        f"strongroom-{dead}-{'cd' * 8}",  # the old name, without a namespace
        f"strongroom-{namespace}-{os.getppid()}-{'cd' * 8}",  # a live process's
    ]
    gone = [
        f"strongroom-{namespace}-{dead}-{'ef' * 8}",  # a dead process's
        f"strongroom-{namespace}-{os.getpid()}-{'ef' * 8}",  # ours, held by no attester
    ]
    for name in keep + gone:
        fs.mkdir(fs.root / name)
    ConfigfsTsmAttester(fs.root, fs=fs)
    assert sorted(os.listdir(fs.root)) == sorted(keep)


def test_an_entry_held_by_another_attester_of_this_process_survives_a_sweep(
    tmp_path: Path,
) -> None:
    fs = EmulatedConfigfs(tmp_path / "report")
    first = ConfigfsTsmAttester(fs.root, fs=fs)
    swept: list[list[str]] = []

    def start_another(entry: Path) -> None:
        # A second attester starting while the first one's entry is in use.
        swept.append(ConfigfsTsmAttester(fs.root, fs=fs).remove_stale_entries())

    fs.before_outblob = start_another
    first.attest(RD)
    assert swept == [[]]
    assert os.listdir(fs.root) == []


def test_entries_are_removed_on_every_exit_path(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", echo=False)
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    with pytest.raises(ReportBindingMismatch):
        attester.attest(RD)
    assert os.listdir(fs.root) == []

    def interrupt(entry: Path) -> None:
        raise KeyboardInterrupt

    fs.before_outblob = interrupt
    with pytest.raises(KeyboardInterrupt):
        attester.attest(RD)
    assert os.listdir(fs.root) == []
    assert not _configfs._HELD


def test_a_failed_removal_is_retried_before_the_next_attestation(tmp_path: Path) -> None:
    class BusyOnce(EmulatedConfigfs):
        busy = 0

        def rmdir(self, path: Path) -> None:
            if self.busy:
                self.busy -= 1
                raise OSError(16, "Device or resource busy")
            super().rmdir(path)

    fs = BusyOnce(tmp_path / "report")
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    fs.busy = 1
    attester.attest(RD)
    assert len(os.listdir(fs.root)) == 1  # the kernel kept it
    attester.attest(RD)
    assert os.listdir(fs.root) == []


# -- privlevel -----------------------------------------------------------------------------------


def test_privlevel_below_the_guests_floor_fails_the_start(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", privlevel_floor=2)
    with pytest.raises(AttestationUnavailable) as info:
        select_attester("auto", production=True, configfs_root=fs.root, fs=fs, privlevel=1)
    assert info.value.reason == Reason.TSM_PRIVLEVEL_BELOW_FLOOR
    assert "privlevel 1 is below this guest's privlevel_floor 2" in info.value.message
    assert os.listdir(fs.root) == []
    attester = select_attester("auto", production=True, configfs_root=fs.root, fs=fs, privlevel=2)
    assert attester.attest(RD).report  # written before inblob, at the floor


def test_privlevel_is_ignored_for_tdx(tmp_path: Path) -> None:
    fs = EmulatedConfigfs(tmp_path / "report", provider="tdx_guest")
    attester = ConfigfsTsmAttester(fs.root, fs=fs, privlevel=2)
    assert attester.attest(RD).report


@pytest.mark.parametrize("value", [-1, 4])
def test_the_privlevel_setting_is_validated(value: int) -> None:
    section = {"model_store": "s:1", "key_broker": "b:1", "attester_privlevel": value}
    with pytest.raises(
        ConfigError, match=f"attester_privlevel must be between 0 and 3.*got {value}"
    ):
        build(InferenceConfig, section, "inference")
    assert (
        build(InferenceConfig, {**section, "attester_privlevel": 3}, "inference").attester_privlevel
        == 3
    )


def test_a_process_that_cannot_tell_its_pid_namespace_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without /proc a process names its entries with namespace 0, as does every other process
    without /proc, in any container: the sweep judged their pids in its own namespace and removed
    a live entry of another container mid-report (its attestation then failed)."""
    fs = EmulatedConfigfs(tmp_path / "report")
    another_container = f"strongroom-0-{_dead_pid()}-{'ab' * 8}"  # its pid means nothing here
    fs.mkdir(fs.root / another_container)
    monkeypatch.setattr(_configfs, "_pid_namespace", lambda: 0)
    attester = ConfigfsTsmAttester(fs.root, fs=fs)
    assert attester.remove_stale_entries() == []
    assert attester.attest(RD).report
    assert os.listdir(fs.root) == [another_container]
