"""Fixtures for the deploy tests: the helm binary and rendered charts (cached per values set)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from strongroom.inference.config import InferenceConfig
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.runtime.config import ServerConfig, load_service_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "strongroom"
NAMESPACE = "strongroom"
RELEASE = "sr"
KUBE_VERSION = "1.31.0"

# The chart's defaults plus the one choice they leave open (where the broker's collateral comes
# from): the chart refuses to render its bare defaults, so "the defaults" are rendered with this.
MINIMAL = (DEPLOY / "helm" / "values-minimal.yaml",)

# Values sets the chart is rendered with: name -> extra values files.
VALUES_SETS = {
    "minimal": MINIMAL,
    "development": (DEPLOY / "helm" / "values-development.yaml",),
    "production": (DEPLOY / "helm" / "values-production.yaml",),
}


def helm_binary() -> str | None:
    """The helm the project unpacks (deploy/dev/setup.sh), else one on PATH, else None."""
    configured = os.environ.get("HELM")
    if configured and os.access(configured, os.X_OK):
        return configured
    bundled = ROOT / ".build" / "tools" / "helm" / "helm"
    if os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of helm; the chart tests skip (with the reason) when it is missing."""
    found = helm_binary()
    if found is None:
        pytest.skip("helm not found: run deploy/dev/setup.sh (it unpacks helm into .build/tools)")
    return found


def run_helm_template(
    helm: str,
    values_files: tuple[Path, ...] | None = None,
    set_args: tuple[str, ...] = (),
    *,
    kubeconfig: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs ``helm template`` and returns the completed process (not checked); ``values_files``
    None is :data:`MINIMAL` (``()`` is the chart's bare defaults). With ``kubeconfig`` (a
    :func:`tests.deploy.kubeapi.kube_api`), ``--dry-run=server``: ``lookup`` reads that server."""
    if values_files is None:
        values_files = MINIMAL
    cmd = [
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]
    for f in values_files:
        cmd += ["-f", str(f)]
    for s in set_args:
        cmd += ["--set", s]
    env = None
    if kubeconfig is not None:
        cmd.append("--dry-run=server")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)


@functools.cache
def _render_cached(helm: str, values_files: tuple[Path, ...], set_args: tuple[str, ...]) -> str:
    result = run_helm_template(helm, values_files, set_args)
    if result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return result.stdout


def render(
    helm: str, values_files: tuple[Path, ...] | None = None, set_args: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Renders the chart and returns its documents (fresh copies: tests may mutate them);
    ``values_files`` None is :data:`MINIMAL`."""
    files = MINIMAL if values_files is None else tuple(values_files)
    text = _render_cached(helm, files, tuple(set_args))
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(params=sorted(VALUES_SETS))
def rendered(request: pytest.FixtureRequest, helm: str) -> tuple[str, list[dict[str, Any]]]:
    """(values set name, rendered documents) for each of the chart's values sets."""
    name: str = request.param
    return name, render(helm, VALUES_SETS[name])


def schema_nodes(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object in a JSON schema (or any JSON value), depth first, with its JSON pointer."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from schema_nodes(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schema_nodes(value, f"{where}/{i}")


def kind(docs: list[dict[str, Any]], k: str) -> list[dict[str, Any]]:
    """The documents of one kind."""
    return [d for d in docs if d.get("kind") == k]


#: The service sections :func:`server_section` loads a rendered configuration with.
SERVER_SECTIONS: dict[str, type[Any]] = {
    "modelstore": ModelstoreConfig,
    "keybroker": KeybrokerConfig,
    "inference": InferenceConfig,
}


def server_section(
    helm: str,
    tmp_path: Path,
    service: str,
    *set_args: str,
    values_files: tuple[Path, ...] | None = None,
) -> ServerConfig:
    """A service's server section as the service itself loads it from the chart rendered with
    ``values_files`` (None: the minimal values) and ``set_args``."""
    docs = render(helm, values_files, set_args=set_args)
    (cm,) = [
        c
        for c in kind(docs, "ConfigMap")
        if c["metadata"]["labels"]["app.kubernetes.io/component"] == service
        and c["metadata"]["name"].endswith(service)
        and "config.yaml" in c.get("data", {})
    ]
    path = tmp_path / f"{service}.yaml"
    path.write_text(cm["data"]["config.yaml"])
    common, _ = load_service_config(path, service, SERVER_SECTIONS[service], environ={})
    return common.server


def load_compose() -> dict[str, Any]:
    """The compose file as YAML (anchors and merge keys resolved by the YAML loader)."""
    data: dict[str, Any] = yaml.safe_load(
        (DEPLOY / "compose" / "docker-compose.yml").read_text(encoding="utf-8")
    )
    return data


SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


@pytest.fixture
def softhsm_conf(tmp_path: Path) -> Path:
    """A SoftHSM2 configuration with its own empty token directory (one per test)."""
    if not SOFTHSM_MODULE.exists():
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = tmp_path / "softhsm" / "tokens"
    tokens.mkdir(parents=True)
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf


def token_login_works(conf: Path, label: str, pin: str) -> bool:
    """Logs in to a SoftHSM2 token in a fresh process (the module reads SOFTHSM2_CONF once)."""
    code = (
        "import sys, pkcs11\n"
        "lib = pkcs11.lib(sys.argv[1])\n"
        "token = lib.get_token(token_label=sys.argv[2])\n"
        "with token.open(user_pin=sys.stdin.read()):\n"
        "    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(SOFTHSM_MODULE), label],
        input=pin,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0
