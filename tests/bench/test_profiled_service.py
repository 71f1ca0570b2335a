"""The profiling wrapper of ``releasecpu_bench`` (tests.bench._profiled_service)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from strongroom.runtime import signals
from tests.bench import _profiled_service


def test_the_profile_is_written_on_the_signals_thread_not_in_the_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR2's handler walked yappi's statistics and wrote the file itself, on the main thread
    between two bytecodes of whatever it was doing (a handler may take no lock the interrupted
    code could hold). It hands the dump to the ``signals`` thread now."""
    written: list[str] = []
    monkeypatch.setattr(
        _profiled_service, "_dump", lambda _path: written.append(threading.current_thread().name)
    )
    with signals.restoring():  # SIGUSR1's and SIGUSR2's handlers put back after the test
        _profiled_service.install(tmp_path / "profile.json")
        signal.raise_signal(signal.SIGUSR2)
        assert signals.settle(30)
    assert written == ["signals"]
