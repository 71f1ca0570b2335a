"""``strongroom`` with a test's hand in its start-up, for tests of a SIGTERM while a service starts
(tests/e2e/test_early_stop.py). Run as ``python -m tests.e2e.early_stop_launcher MODE ARG --
serve SERVICE --config PATH``.

``pause POINT``: start-up pauses at its checkpoint POINT (:mod:`strongroom.runtime.starting`),
printing ``paused POINT``, until a signal asks it to stop. ``reached POINT``: prints ``reached
POINT`` there and goes on. ``hold POINT:PATH``: start-up holds at POINT the first time it gets
there, printing ``held POINT PID``, until the file PATH exists (or a signal asks it to stop);
the test signals the process there (tests/e2e/test_serve_signals.py: a SIGHUP while starting).
``signal-in-servicer DIR``: the model store's build signals its own process while it builds its
servicer (the storage open), and at exit prints ``storage locked`` if the storage root DIR is
still locked by this process, else ``storage unlocked``.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from strongroom.cli.main import main


def _at_point(point: str, *, pause: bool) -> None:
    from strongroom.runtime import starting

    def reached(at: str) -> None:
        if at != point:
            return
        print(f"{'paused' if pause else 'reached'} {at}", flush=True)
        while pause and starting.requested() is None:
            time.sleep(0.01)  # a step that takes long, waited for as every step is

    starting._reached = reached  # type: ignore[assignment]


def _hold_at(point: str, release: Path) -> None:
    from strongroom.runtime import starting

    held = False

    def reached(at: str) -> None:
        nonlocal held
        if at != point or held:
            return
        held = True
        print(f"held {at} {os.getpid()}", flush=True)
        while not release.exists() and starting.requested() is None:
            time.sleep(0.01)  # a step that takes long

    starting._reached = reached  # type: ignore[assignment]


def _signal_in_servicer(root: Path) -> None:
    from strongroom.modelstore import server

    real = server.ModelStoreServicer

    def signalled(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    server.ModelStoreServicer = signalled  # type: ignore[assignment,misc]

    def report() -> None:
        fd = os.open(root / "LOCK", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open file: ours conflicts too
        except BlockingIOError:
            print("storage locked", flush=True)
        else:
            print("storage unlocked", flush=True)
        finally:
            os.close(fd)

    atexit.register(report)


if __name__ == "__main__":
    mode, arg, separator, *command = sys.argv[1:]
    assert separator == "--"
    if mode == "signal-in-servicer":
        _signal_in_servicer(Path(arg))
    elif mode == "hold":
        point, _, release = arg.partition(":")
        _hold_at(point, Path(release))
    else:
        _at_point(arg, pause=mode == "pause")
    sys.exit(main(command))
