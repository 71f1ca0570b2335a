"""The chart's PKI plumbing, end to end, outside Kubernetes but with the real pieces.

deploy/helm/pki_secrets.py makes the two PKI Secrets with ``strongroom pki init``; their files are laid
out exactly as the rendered pods mount them (the step-ca Deployment's subPath mounts, the bootstrap
init container's Secret items, kubelet's 0440 mode); a real step-ca serves from that layout; the
chart's own init script (files/pod-init.sh) copies the broker's secrets and mints the enrolment token
with the environment the rendered Deployment gives it; and ``strongroom pki enrol`` obtains the
service certificate with that token. If the Secret keys, the values' file maps, the init script or
the CLI drift apart, this fails.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from strongroom.dev.simulated import SimulatedAuthority
from tests.deploy.conftest import CHART, DEPLOY, ROOT, kind, render

HOME = "/home/step"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def materialise(data: dict[str, str], items: list[dict[str, str]], where: Path) -> None:
    """Writes Secret items as the kubelet does: root-owned in a pod, group-readable 0440."""
    for item in items:
        path = where / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data[item["key"]]))
        path.chmod(0o440)


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (dep,) = [
        d
        for d in kind(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return dep


@pytest.fixture
def pki(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "helm" / "pki_secrets.py"),
            "--namespace",
            "strongroom",
            "--out",
            str(tmp_path / "pki"),
            "--ca-dns",
            "localhost",
            "--address",
            f"127.0.0.1:{port}",
            "--strongroom",
            str(ROOT / ".venv" / "bin" / "strongroom"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    step_ca, provisioner = (json.loads(doc) for doc in result.stdout.split("\n---\n"))
    return step_ca, provisioner, port


@pytest.fixture
def running_ca(
    helm: str, step_ca_binary: Path, tmp_path: Path, pki: tuple[dict[str, Any], dict[str, Any], int]
) -> Iterator[tuple[dict[str, Any], int]]:
    step_ca_secret, provisioner, port = pki
    docs = render(helm)
    container = deployment(docs, "step-ca")["spec"]["template"]["spec"]["containers"][0]
    home = tmp_path / "step-home"
    # The Deployment mounts each Secret key at its path under /home/step (subPath mounts).
    items = [
        {"key": m["subPath"], "path": m["mountPath"].removeprefix(HOME + "/")}
        for m in container["volumeMounts"]
        if m["name"] == "ca-material"
    ]
    assert {i["key"] for i in items} == set(step_ca_secret["data"])
    materialise(step_ca_secret["data"], items, home)
    (home / "db").mkdir()
    args = [a.replace(HOME, str(home)) for a in container["args"]]
    assert container["workingDir"] == HOME
    with (tmp_path / "step-ca.log").open("wb") as log:
        process = subprocess.Popen(
            [str(step_ca_binary), *args], cwd=home, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            context = ssl.create_default_context(cafile=str(home / "certs" / "root_ca.crt"))
            deadline = time.monotonic() + 30
            while True:
                try:
                    url = f"https://localhost:{port}/health"
                    with urllib.request.urlopen(url, context=context) as response:
                        assert json.load(response) == {"status": "ok"}
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail((tmp_path / "step-ca.log").read_text()[-2000:])
                    time.sleep(0.2)
            yield provisioner, port
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_pod_init_mints_a_token_the_ca_accepts(
    helm: str, tmp_path: Path, running_ca: tuple[dict[str, Any], int]
) -> None:
    provisioner, port = running_ca
    docs = render(helm)
    pod = deployment(docs, "keybroker")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (init,) = [c for c in pod["initContainers"] if c["name"] == "bootstrap"]

    # Lay out the pod's volumes under tmp_path, as the kubelet would.
    remap = {
        "/run/strongroom/secrets-src": tmp_path / "secrets-src",
        "/run/strongroom/provisioner": tmp_path / "provisioner",
        "/run/strongroom/bootstrap": tmp_path / "bootstrap",
        "/run/secrets": tmp_path / "secrets",
    }
    materialise(
        provisioner["data"],
        volumes["provisioner"]["secret"]["items"],
        remap["/run/strongroom/provisioner"],
    )
    (broker_secret,) = kind(docs, "Secret")
    materialise(
        broker_secret["data"],
        volumes["secrets-src"]["secret"]["items"],
        remap["/run/strongroom/secrets-src"],
    )
    for d in ("/run/strongroom/bootstrap", "/run/secrets"):
        remap[d].mkdir()
    init_tmp = tmp_path / "init-tmp"
    init_tmp.mkdir()

    def relocated(value: str) -> str:
        for old, new in remap.items():
            value = value.replace(old, str(new))
        return value

    env = {e["name"]: relocated(e["value"]) for e in init["env"]}
    script = CHART / "files" / "pod-init.sh"
    assert init["command"] == ["bash", "/etc/strongroom/scripts/pod-init.sh"]
    result = subprocess.run(
        ["bash", str(script)],
        env={
            **env,
            "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin",
            "TMPDIR": str(init_tmp),
            "HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    # Secrets: private copies for the service (Secret.load refuses group-readable files).
    for name in ("hsm-pin", "nonce-key"):
        copy = tmp_path / "secrets" / name
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert copy.read_bytes() == base64.b64decode(broker_secret["data"][name])
    # The provisioner copy is gone; only the token is left behind.
    assert not list(init_tmp.iterdir())
    token = tmp_path / "bootstrap" / "keybroker.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert "pki-provisioner" not in result.stderr and token.read_text().strip() not in result.stderr

    enrol = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "strongroom"),
            "pki",
            "enrol",
            "--ca-url",
            f"https://localhost:{port}",
            "--root",
            str(tmp_path / "provisioner" / "root_ca.crt"),
            "--token-file",
            str(token),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert enrol.returncode == 0, enrol.stderr
    assert "enrolled spiffe://strongroom.internal/keybroker" in enrol.stdout

    # One-time: the same token cannot enrol twice.
    again = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "strongroom"),
            "pki",
            "enrol",
            "--ca-url",
            f"https://localhost:{port}",
            "--root",
            str(tmp_path / "provisioner" / "root_ca.crt"),
            "--token-file",
            str(token),
            "--state-dir",
            str(tmp_path / "state2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode != 0


def test_pki_secrets_refuses_to_overwrite_a_pki(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "keep").write_text("x")
    result = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "helm" / "pki_secrets.py"),
            "--namespace",
            "x",
            "--out",
            str(tmp_path / "pki"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (tmp_path / "pki" / "keep").read_text() == "x"


def test_pki_secrets_match_the_values_file_maps(
    pki: tuple[dict[str, Any], dict[str, Any], int],
) -> None:

    step_ca, provisioner, _port = pki
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {f["key"] for f in values["stepCa"]["files"]} == set(step_ca["data"])
    assert {f["key"] for f in values["pki"]["provisionerFiles"]} == set(provisioner["data"])
    assert values["pki"]["rootCertificateKey"] in provisioner["data"]
    # The provisioner Secret carries no CA key: a leaked init container cannot issue an intermediate.
    assert not {"intermediate_ca_key", "root_ca_key", "password"} & set(provisioner["data"])
    assert "root_ca_key" not in step_ca["data"]
    assert step_ca["metadata"]["name"] == values["stepCa"]["existingSecret"]
    assert provisioner["metadata"]["name"] == values["pki"]["provisionerSecret"]


def test_simulated_tee_secret_is_what_the_development_values_mount(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "helm" / "pki_secrets.py"), "--namespace", "dev", "--out",
         str(tmp_path / "pki"), "--strongroom", str(ROOT / ".venv" / "bin" / "strongroom"),
         "--simulated-tee-secret", "strongroom-simulated-tee"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = [json.loads(doc) for doc in result.stdout.split("\n---\n")]
    assert len(docs) == 3
    secret = docs[2]
    development = yaml.safe_load((DEPLOY / "helm" / "values-development.yaml").read_text())
    assert secret["metadata"]["name"] == development["simulatedTee"]["existingSecret"]
    tee = tmp_path / "simulated-tee"
    materialise(secret["data"], [{"key": k, "path": k} for k in secret["data"]], tee)
    SimulatedAuthority.load(tee)  # what the simulated attester reads
    assert (tee / "amd_trust.pem").is_file() and (tee / "intel_root.pem").is_file()  # the broker
