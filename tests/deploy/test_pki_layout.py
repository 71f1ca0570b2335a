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
import shutil
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
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strongroom.dev.devstack.stack import free_port
from strongroom.dev.simulated import SimulatedAuthority
from strongroom.pki import CaClient, Provisioner, mint_token
from strongroom.pki._x509 import build_csr, generate_key
from strongroom.pki.errors import CaRejected
from strongroom.pki.token import with_identity_names
from strongroom.spiffe import identity_dns_name
from tests.deploy.conftest import CHART, DEPLOY, ROOT, kind, render
from tests.pki.helpers import as_made_before_derived_names

HOME = "/home/step"


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


# The PKI and its CA are made once per module (pki_secrets.py runs ``strongroom pki init`` and
# friends, seconds of CLI start-ups; step-ca starts in another second or two), not once per test:
# every test reads the Secrets without changing them, and what a test does at the CA (mint its own
# one-time token, enrol, be refused) neither depends on nor changes what another test sees there.


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where :func:`pki` has pki_secrets.py write the PKI (its ``--out``)."""
    return tmp_path_factory.mktemp("pki-secrets") / "pki"


@pytest.fixture(scope="module")
def pki(pki_dir: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The Secrets pki_secrets.py prints, by name, and the port of the CA it made."""
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "helm" / "pki_secrets.py"),
            "--namespace",
            "strongroom",
            "--out",
            str(pki_dir),
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
    docs = [json.loads(doc) for doc in result.stdout.split("\n---\n")]
    return {d["metadata"]["name"]: d for d in docs}, port


def pod_secret(
    docs: list[dict[str, Any]], secrets: dict[str, dict[str, Any]], component: str, volume: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Secret a pod's volume names, that volume) for one component's Deployment."""
    pod = deployment(docs, component)["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == volume]
    return secrets[vol["secret"]["secretName"]], vol


@pytest.fixture(scope="module")
def running_ca(
    helm: str,
    step_ca_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pki: tuple[dict[str, dict[str, Any]], int],
) -> Iterator[tuple[dict[str, dict[str, Any]], int]]:
    """step-ca serving from the layout the step-ca Deployment mounts (the PKI's Secrets)."""
    tmp_path = tmp_path_factory.mktemp("running-ca")
    secrets, port = pki
    docs = render(helm)
    step_ca_secret, _ = pod_secret(docs, secrets, "step-ca", "ca-material")
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
            yield secrets, port
        finally:
            process.terminate()
            process.wait(timeout=10)


def run_pod_init(
    docs: list[dict[str, Any]], secrets: dict[str, dict[str, Any]], service: str, where: Path
) -> subprocess.CompletedProcess[str]:
    """Runs the chart's init script for one service's pod, its volumes laid out under ``where``."""
    pod = deployment(docs, service)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (init,) = [c for c in pod["initContainers"] if c["name"] == "bootstrap"]

    # Lay out the pod's volumes under ``where``, as the kubelet would.
    remap = {
        "/run/strongroom/secrets-src": where / "secrets-src",
        "/run/strongroom/provisioner": where / "provisioner",
        "/run/strongroom/bootstrap": where / "bootstrap",
        "/run/secrets": where / "secrets",
    }
    provisioner, _ = pod_secret(docs, secrets, service, "provisioner")
    materialise(
        provisioner["data"],
        volumes["provisioner"]["secret"]["items"],
        remap["/run/strongroom/provisioner"],
    )
    if "secrets-src" in volumes:
        (broker_secret,) = kind(docs, "Secret")
        materialise(
            broker_secret["data"],
            volumes["secrets-src"]["secret"]["items"],
            remap["/run/strongroom/secrets-src"],
        )
    for d in ("/run/strongroom/bootstrap", "/run/secrets"):
        remap[d].mkdir(parents=True)
    init_tmp = where / "init-tmp"
    init_tmp.mkdir()

    def relocated(value: str) -> str:
        for old, new in remap.items():
            value = value.replace(old, str(new))
        return value

    env = {e["name"]: relocated(e["value"]) for e in init["env"]}
    script = CHART / "files" / "pod-init.sh"
    assert init["command"] == ["bash", "/etc/strongroom/scripts/pod-init.sh"]
    return subprocess.run(
        ["bash", str(script)],
        env={
            **env,
            "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin",
            "TMPDIR": str(init_tmp),
            "HOME": str(where),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cli_enrol(port: int, root: Path, token: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "strongroom"),
            "pki",
            "enrol",
            "--ca-url",
            f"https://localhost:{port}",
            "--root",
            str(root),
            "--token-file",
            str(token),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("service", ["keybroker", "modelstore", "inference"])
def test_pod_init_mints_a_token_the_ca_accepts(
    helm: str, tmp_path: Path, running_ca: tuple[dict[str, dict[str, Any]], int], service: str
) -> None:
    secrets, port = running_ca
    docs = render(helm)
    result = run_pod_init(docs, secrets, service, tmp_path)
    assert result.returncode == 0, result.stderr

    if service == "keybroker":
        # Secrets: private copies for the service (Secret.load refuses group-readable files).
        (broker_secret,) = kind(docs, "Secret")
        for name in ("hsm-pin", "nonce-key"):
            copy = tmp_path / "secrets" / name
            assert stat.S_IMODE(copy.stat().st_mode) == 0o600
            assert copy.read_bytes() == base64.b64decode(broker_secret["data"][name])
    # The provisioner copy is gone; only the token is left behind.
    assert not list((tmp_path / "init-tmp").iterdir())
    token = tmp_path / "bootstrap" / f"{service}.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert "pki-provisioner" not in result.stderr and token.read_text().strip() not in result.stderr

    root = tmp_path / "provisioner" / "root_ca.crt"
    enrol = cli_enrol(port, root, token, tmp_path / "state")
    assert enrol.returncode == 0, enrol.stderr
    assert f"enrolled spiffe://strongroom.internal/{service}" in enrol.stdout

    # One-time: the same token cannot enrol twice.
    assert cli_enrol(port, root, token, tmp_path / "state2").returncode != 0


# What the confidential-VM host (or anyone on a node running a Strongroom pod) could try with the
# provisioner files the kubelet fetched for a pod: tokens for identities that are not the pod's.
FOREIGN_IDENTITIES = {
    ("inference", "admin"): (),
    ("inference", "publisher"): (),
    ("inference", "keybroker"): ("keybroker", "keybroker.strongroom.svc"),
    ("modelstore", "keybroker"): ("keybroker",),
    ("keybroker", "inference"): ("inference",),
}


@pytest.mark.parametrize(("pod", "target"), sorted(FOREIGN_IDENTITIES))
def test_a_pod_provisioner_key_obtains_only_the_pods_own_identity(
    helm: str,
    tmp_path: Path,
    running_ca: tuple[dict[str, dict[str, Any]], int],
    pod: str,
    target: str,
) -> None:
    secrets, port = running_ca
    docs = render(helm)
    secret, volume = pod_secret(docs, secrets, pod, "provisioner")
    stolen = tmp_path / "stolen"
    materialise(secret["data"], volume["secret"]["items"], stolen)
    # The attacker signs the token itself (no CLI check to get past) with the pod's key.
    meta = json.loads((stolen / "strongroom.json").read_text())
    key = serialization.load_pem_private_key((stolen / "provisioner_key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    root_pem = (stolen / "root_ca.crt").read_bytes()
    ca_url = f"https://localhost:{port}"
    wanted = f"spiffe://strongroom.internal/{target}"
    sans = [wanted, *FOREIGN_IDENTITIES[pod, target]]
    token = mint_token(
        Provisioner(meta["provisioner_name"], key), ca_url=ca_url, subject=wanted, sans=sans
    )
    try:
        # The CSR asks for what the token does (with the ID's derived name).
        csr = build_csr(generate_key(), with_identity_names(sans))
        chain = CaClient(ca_url, root_pem).sign(csr, token)
    except CaRejected as refused:
        # Refused by the pod's provisioner's certificate template, naming what it issues.
        assert f"spiffe://strongroom.internal/{pod}" in str(refused)
        return
    issued = x509.load_pem_x509_certificate(chain[0].public_bytes(serialization.Encoding.PEM))
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    names = san.get_values_for_type(x509.DNSName)
    assert uris == [f"spiffe://strongroom.internal/{pod}"], f"{pod}'s key obtained {uris}"
    assert not set(names) & set(FOREIGN_IDENTITIES[pod, target]), names


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


def test_pki_secrets_upgrades_an_earlier_pki_and_prints_its_secrets_again(
    pki_dir: Path, pki: tuple[dict[str, dict[str, Any]], int], tmp_path: Path
) -> None:
    """A PKI made before workload certificates carried the name derived from their SPIFFE ID:
    ``--upgrade`` updates it in place and prints the Secrets again, whose provisioner templates
    and recorded SANs now hold the derived names; without a PKI there, it refuses."""
    earlier = tmp_path / "pki"
    shutil.copytree(pki_dir, earlier)
    as_made_before_derived_names(earlier)
    command = [sys.executable, str(DEPLOY / "helm" / "pki_secrets.py"), "--namespace", "strongroom"]
    command += ["--strongroom", str(ROOT / ".venv" / "bin" / "strongroom"), "--upgrade"]
    result = subprocess.run(
        [*command, "--out", str(earlier)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    # What is left to do, not init's "PKI written ... move its root key offline" (done long ago).
    assert "PKI written" not in result.stderr and "restart step-ca" in result.stderr
    secrets = {d["metadata"]["name"]: d for d in map(json.loads, result.stdout.split("\n---\n"))}
    assert set(secrets) == set(pki[0])
    ca_json = json.loads(base64.b64decode(secrets["strongroom-step-ca"]["data"]["ca.json"]))
    templates = {
        p["name"]: p["options"]["x509"]["template"]
        for p in ca_json["authority"]["provisioners"]
        if "options" in p
    }
    for service in ("keybroker", "modelstore", "inference"):
        derived = identity_dns_name(f"spiffe://strongroom.internal/{service}")
        assert derived in templates[f"strongroom-{service}"]
        data = secrets[f"strongroom-pki-{service}"]["data"]
        assert derived in json.loads(base64.b64decode(data["strongroom.json"]))["sans"]
    refused = subprocess.run(
        [*command, "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2 and "no PKI to upgrade" in refused.stderr


def test_pki_secrets_upgrade_of_a_broken_pki_says_why_in_a_line(tmp_path: Path) -> None:
    """``--upgrade`` of a PKI that ``strongroom pki upgrade`` refuses (a ca.json cut short) ended
    in a Python traceback (CalledProcessError) after strongroom's message; now strongroom's
    line and one of the script's, its exit status, and no Secret."""
    broken = tmp_path / "pki"
    (broken / "config").mkdir(parents=True)
    (broken / "config" / "ca.json").write_text("{")
    (broken / "config" / "strongroom.json").write_text("{}")
    command = [sys.executable, str(DEPLOY / "helm" / "pki_secrets.py"), "--namespace", "strongroom"]
    command += ["--strongroom", str(ROOT / ".venv" / "bin" / "strongroom"), "--upgrade"]
    result = subprocess.run(
        [*command, "--out", str(broken)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "INVALID_PKI_CONFIG" in result.stderr and "no Secret printed" in result.stderr
    assert result.stdout == ""


def test_pki_secrets_match_the_values_file_maps(
    helm: str, pki_dir: Path, pki: tuple[dict[str, dict[str, Any]], int]
) -> None:
    secrets, _port = pki
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    own = values["pki"]["provisionerSecrets"]
    assert set(secrets) == {values["stepCa"]["existingSecret"], *own.values()}
    step_ca = secrets[values["stepCa"]["existingSecret"]]
    assert {f["key"] for f in values["stepCa"]["files"]} == set(step_ca["data"])
    assert "root_ca_key" not in step_ca["data"]
    docs = render(helm)
    configs = {
        cm["metadata"]["labels"]["app.kubernetes.io/component"]: yaml.safe_load(
            cm["data"]["config.yaml"]
        )
        for cm in kind(docs, "ConfigMap")
        if "config.yaml" in cm.get("data", {})
    }
    operator_key = (pki_dir / "secrets" / "provisioner_key").read_bytes()
    keys = set()
    for service, name in own.items():
        data = secrets[name]["data"]
        assert {f["key"] for f in values["pki"]["provisionerFiles"]} == set(data)
        assert values["pki"]["rootCertificateKey"] in data
        # The provisioner Secret carries no CA key: a leaked init container cannot issue an
        # intermediate; nor the operator's provisioner key, which mints any identity.
        assert not {"intermediate_ca_key", "root_ca_key", "password"} & set(data)
        key = base64.b64decode(data["provisioner_key"])
        assert key != operator_key
        keys.add(key)
        # The service's own provisioner, restricted to exactly what its pod asks for.
        meta = json.loads(base64.b64decode(data["strongroom.json"]))
        identity = configs[service]["identity"]
        assert meta["provisioner_name"] == f"strongroom-{service}"
        assert meta["sans"] == [
            identity["spiffe_id"],
            identity_dns_name(identity["spiffe_id"]),
            *identity["dns_names"],
        ]
    assert len(keys) == len(own)
    everything = json.dumps(list(secrets.values()))
    assert base64.b64encode(operator_key).decode() not in everything


def test_simulated_tee_secret_is_what_the_development_values_mount(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "helm" / "pki_secrets.py"), "--namespace", "dev", "--out",
         str(tmp_path / "pki"), "--strongroom", str(ROOT / ".venv" / "bin" / "strongroom"),
         "--simulated-tee-secret", "strongroom-simulated-tee"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    docs = {d["metadata"]["name"]: d for d in map(json.loads, result.stdout.split("\n---\n"))}
    development = yaml.safe_load((DEPLOY / "helm" / "values-development.yaml").read_text())
    secret = docs[development["simulatedTee"]["existingSecret"]]
    tee = tmp_path / "simulated-tee"
    materialise(secret["data"], [{"key": k, "path": k} for k in secret["data"]], tee)
    SimulatedAuthority.load(tee)  # what the simulated attester reads
    assert (tee / "amd_trust.pem").is_file() and (tee / "intel_root.pem").is_file()  # the broker
