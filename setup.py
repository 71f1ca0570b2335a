"""Maps each `strongroom.*` package straight to its folder, so the import graph is the folder graph.

The map is `[tool.strongroom.packages]` in pyproject.toml: the shared libraries live in
`strongroom/`, each service folder *is* its package (`services/keybroker` is
`strongroom.keybroker`), `pki/` is `strongroom.pki` and the generated API is `strongroom.api`.
`strongroom.dev` is listed there for the tools but ships as its own distribution (`dev/`), never in
this one. setuptools' declarative discovery cannot express such a map, so it is built here.
"""

import tomllib
from pathlib import Path

from setuptools import Extension, setup

DEVELOPMENT_ONLY = {"strongroom.dev"}


def _packages(prefix: str, folder: str) -> dict[str, str]:
    """Every folder below ``folder`` that holds Python code, as package name -> folder."""
    base = Path(folder)
    found: dict[str, str] = {}
    for path in sorted([base, *(p for p in base.rglob("*") if p.is_dir())]):
        if "__pycache__" in path.parts or (path != base and not any(path.glob("*.py"))):
            continue
        found[".".join((prefix, *path.relative_to(base).parts))] = str(path)
    return found


roots = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["strongroom"]["packages"]
package_dir: dict[str, str] = {}
for prefix, folder in roots.items():
    if prefix not in DEVELOPMENT_ONLY and Path(folder).is_dir():
        package_dir.update(_packages(prefix, folder))

# A plain C library, not a Python extension: the key broker loads it with ctypes (it has no
# PyInit and includes no Python header), so only a C compiler is needed to build it.
release_calls = Extension(
    "strongroom.keybroker._p11release",
    sources=["services/keybroker/_p11release.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

setup(packages=sorted(package_dir), package_dir=package_dir, ext_modules=[release_calls])
