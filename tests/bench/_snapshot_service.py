"""Runs ``strongroom serve ...`` with the key broker's package taken from another directory.

The reference side of ``releasecpu_bench``'s A/B against another revision (``python -m
tests.bench.releasecpu_bench --ab-against REV``): that revision's ``services/keybroker``, extracted
by :func:`tests.bench.releasecpu_bench.snapshot_launcher`, is served as ``strongroom.keybroker``
while every other package is this checkout's. Usage:
``python -m tests.bench._snapshot_service DIR serve keybroker --config C``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = "strongroom.keybroker"


class _FromDirectory(importlib.abc.MetaPathFinder):
    """Finds :data:`PACKAGE` in a directory of its own; its modules then follow its ``__path__``
    (the path finder, which comes before the editable install's, looks there first)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != PACKAGE:
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            self._directory / "__init__.py",
            submodule_search_locations=[str(self._directory)],
        )


def main(argv: list[str]) -> int:
    """Serves :data:`PACKAGE` from ``argv[0]`` and runs the CLI with the rest."""
    directory = Path(argv[0]).resolve()
    sys.meta_path.insert(0, _FromDirectory(directory))
    from strongroom.cli.main import main as cli_main
    from strongroom.keybroker import audit

    # A module found anywhere else would make the A/B compare a checkout with itself.
    if Path(audit.__file__ or "").parent != directory:
        raise SystemExit(f"{PACKAGE} was not imported from {directory}")
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
