"""Lays the `strongroom` packages out as one tree of links, for tools that cannot read package_dir.

``python dev/srctree.py OUT`` makes ``OUT/strongroom/<name>`` a link to each package's folder, as
``[tool.strongroom.packages]`` in pyproject.toml maps them (the shared-library folder's entries are
linked one by one). mypy checks that tree; nothing imports from it.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path


def build(repo: Path, out: Path) -> None:
    """Recreates ``out/strongroom`` from the package map of ``repo``'s pyproject.toml."""
    roots = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["strongroom"]["packages"]
    tree = out / "strongroom"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    for prefix, folder in roots.items():
        source = (repo / folder).resolve()
        if prefix == "strongroom":
            for entry in source.iterdir():
                if entry.name != "__pycache__":
                    (tree / entry.name).symlink_to(entry)
        elif source.is_dir():
            (tree / prefix.removeprefix("strongroom.")).symlink_to(source)


if __name__ == "__main__":
    build(Path(__file__).resolve().parents[1], Path(sys.argv[1]))
