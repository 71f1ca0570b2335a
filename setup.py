"""Assembles the one `strongroom` import namespace from the project's fixed top-level folders.

setuptools' declarative package discovery cannot merge one namespace from several roots, so the
package list and the package-to-folder map are computed here; everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOTS = [
    "services/common",
    "pki",
    "services/keybroker",
    "services/modelstore",
    "services/inference",
    "protos/_gen",
]

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    if not Path(root, "strongroom").is_dir():
        continue
    for pkg in find_namespace_packages(where=root, include=["strongroom.*"]):
        packages.append(pkg)
        package_dir[pkg] = str(Path(root, *pkg.split(".")))

setup(packages=packages, package_dir=package_dir)
