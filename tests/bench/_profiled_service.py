"""Runs ``strongroom serve ...`` under yappi (CPU clock, every thread) for ``releasecpu_bench``.

Usage: ``python -m tests.bench._profiled_service --profile OUT.json serve keybroker --config C``.
The service runs exactly as ``strongroom serve`` runs it. ``SIGUSR1`` clears the statistics (the
bench sends it when its measured window starts); ``SIGUSR2`` writes them to ``OUT.json`` (written
to a temporary name, then renamed, so the bench never reads half a file). Both run on the
service's ``signals`` thread (:mod:`strongroom.runtime.signals`), not in the signal handler: a
handler runs on the main thread between two bytecodes, holding what it held, and yappi's walk of
every thread's statistics and the file's write took the profiler's state and the interpreter's
I/O locks from there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

TOP = 80


def _dump(path: Path) -> None:
    import yappi

    stats = list(yappi.get_func_stats())
    stats.sort(key=lambda s: s.tsub, reverse=True)
    by_total = sorted(stats, key=lambda s: s.ttot, reverse=True)
    document: dict[str, Any] = {
        "calls": sum(s.ncall for s in stats),
        "python_calls": sum(s.ncall for s in stats if not s.builtin),
        "cpu_seconds": sum(s.tsub for s in stats),
        "top": [
            {
                "name": s.name,
                "where": f"{s.module}:{s.lineno}",
                "builtin": bool(s.builtin),
                "ncall": s.ncall,
                "tsub": s.tsub,
                "ttot": s.ttot,
            }
            for s in stats[:TOP]
        ],
        "top_inclusive": [
            {"name": s.name, "where": f"{s.module}:{s.lineno}", "ncall": s.ncall, "ttot": s.ttot}
            for s in by_total[:TOP]
        ],
    }
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    """Starts the profiler, installs the two signal handlers and runs the CLI."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", type=Path, required=True)
    args, rest = parser.parse_known_args(argv)
    import yappi

    from strongroom.cli.main import main as cli_main
    from strongroom.runtime import signals

    yappi.set_clock_type("cpu")
    # Kept: this process ends with its service, as ``strongroom serve``'s does.
    with signals.restoring(keep=True):
        install(args.profile)
        yappi.start(builtins=True, profile_threads=True)
        return cli_main(rest)


def install(profile: Path) -> None:
    """Has SIGUSR1 clear yappi's statistics and SIGUSR2 write them to ``profile``, each handed
    to the ``signals`` thread (call from the main thread, inside
    :func:`strongroom.runtime.signals.restoring`)."""
    import yappi

    from strongroom.runtime import signals

    signals.install(lambda *_: signals.later(yappi.clear_stats), signal.SIGUSR1)
    signals.install(lambda *_: signals.later(lambda: _dump(profile)), signal.SIGUSR2)


if __name__ == "__main__":
    sys.exit(main())
