"""The import graph points one way (see README, "Architecture").

Every Python file of every package is parsed (imports inside functions included) and each import
of a ``strongroom`` module, or of gRPC, is checked against the layer contracts below. The folder
-> package map is the one the build uses, ``[tool.strongroom.packages]`` in pyproject.toml.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"][
    "strongroom"
]["packages"]

SERVICES = ("strongroom.keybroker", "strongroom.modelstore", "strongroom.inference")
# Pure libraries: formats, verifiers, rules. No transport, no services, no process runtime.
LIBRARIES = (
    "strongroom.errors",
    "strongroom.reasons",
    "strongroom.identifiers",
    "strongroom.spiffe",
    "strongroom.oaep",
    "strongroom.files",
    "strongroom.closing",
    "strongroom.wire",
    "strongroom.artifact",
    "strongroom.attestation",
)
DEV = "strongroom.dev"
# The services' RPC APIs. The at-rest artifact format must not depend on any of them: a stored
# artifact outlives the RPC version that published it.
RPC_APIS = ("strongroom.api.keybroker", "strongroom.api.modelstore", "strongroom.api.inference")


def _module_name(path: Path) -> str:
    for prefix, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[1])):
        base = REPO / folder
        if path.is_relative_to(base):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([prefix, *parts])
    raise AssertionError(f"{path} is in no package")


def _files() -> Iterator[Path]:
    seen: set[Path] = set()
    for prefix, folder in PACKAGES.items():
        if prefix == "strongroom.api":
            continue  # generated code
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" not in path.parts and path not in seen:
                seen.add(path)
                yield path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                package = module.rsplit(".", node.level)[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


GRAPH = {_module_name(p): (p, list(_imports(p))) for p in _files()}


def _within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(source: tuple[str, ...] | str, forbidden: tuple[str, ...] | str) -> list[str]:
    found = []
    for module, (path, imports) in GRAPH.items():
        if not _within(module, source):
            continue
        for line, target in imports:
            if _within(target, forbidden) and not _within(target, source):
                found.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return sorted(set(found))


def test_the_graph_sees_every_package() -> None:
    for prefix in (*SERVICES, *LIBRARIES, "strongroom.pki", "strongroom.runtime", DEV):
        assert any(_within(m, prefix) for m in GRAPH), prefix


def test_the_error_tree_and_the_reason_catalogue_are_leaves() -> None:
    _, imports = GRAPH["strongroom.errors"]
    assert {t for _, t in imports if t.split(".")[0] != "__future__"} <= {
        "strongroom.reasons",
        "strongroom.reasons.Reason",
    }
    _, imports = GRAPH["strongroom.reasons"]
    assert {t for _, t in imports if t.split(".")[0] != "__future__"} <= {"enum"}


def test_libraries_import_no_transport_runtime_or_services() -> None:
    forbidden = (
        "grpc",
        "strongroom.runtime",
        "strongroom.pki",
        "strongroom.client",
        "strongroom.cli",
        *SERVICES,
        DEV,
    )
    assert _violations(LIBRARIES, forbidden) == []


def test_the_artifact_format_imports_no_rpc_api() -> None:
    assert _violations("strongroom.artifact", RPC_APIS) == []
    # Nor do its protos (generated code is outside GRAPH): each artifact file's imports, checked
    # through the descriptors the generated modules carry.
    from strongroom.api.artifact.v1 import header_pb2, manifest_pb2

    for module in (header_pb2, manifest_pb2):
        deps = [d.package for d in module.DESCRIPTOR.dependencies]
        assert not [d for d in deps if _within(d, RPC_APIS)], (module.DESCRIPTOR.name, deps)


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service: str) -> None:
    others = tuple(s for s in SERVICES if s != service)
    assert _violations(service, (*others, "strongroom.cli")) == []


def test_shared_layers_never_import_services() -> None:
    shared = ("strongroom.pki", "strongroom.runtime", "strongroom.client", "strongroom.attesters")
    assert _violations(shared, (*SERVICES, "strongroom.cli")) == []


def test_pki_does_not_depend_on_the_service_runtime() -> None:
    assert _violations("strongroom.pki", ("strongroom.runtime", "strongroom.client")) == []


def test_production_code_never_imports_the_development_kit() -> None:
    production = tuple(m for m in GRAPH if not _within(m, DEV))
    assert _violations(production, DEV) == []


def test_the_development_kit_is_its_own_distribution() -> None:
    """`pip install .` (what production images run) must not carry strongroom.dev."""
    setup = (REPO / "setup.py").read_text()
    assert 'DEVELOPMENT_ONLY = {"strongroom.dev"}' in setup
    dev = tomllib.loads((REPO / "dev" / "pyproject.toml").read_text())
    assert dev["project"]["name"] == "strongroom-dev"


def test_one_place_maps_errors_to_statuses() -> None:
    """Only the runtime's error mapping answers an RPC with a status; everything else raises."""
    found = []
    for module, (path, _) in GRAPH.items():
        if module == "strongroom.runtime.interceptors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"abort", "set_trailing_metadata", "set_code"}
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "context"
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
