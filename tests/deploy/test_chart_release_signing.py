"""The chart's own release-signing certificate across upgrades (templates/secrets.yaml).

Each upgrade is rendered with ``--dry-run=server`` against :mod:`tests.deploy.kubeapi` serving
what the previous render made, as ``helm upgrade`` reads the live objects with ``lookup``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.attestation.release_certificate import RENEW_WITHIN
from strongroom.attestation.release_keys import load_trusted_keys
from strongroom.attestation.release_signature import load_signing_key, signing_key_id
from tests.deploy.conftest import NAMESPACE, kind, run_helm_template
from tests.deploy.kubeapi import kube_api

NOT_AFTER = "strongroom.io/release-signing-not-after"
BINDING = "strongroom.io/release-signing-binding"


def _render(helm: str, tmp_path: Path, live: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The chart's documents: an install/upgrade seeing ``live`` (None: plain ``helm template``)."""
    if live is None:
        result = run_helm_template(helm)
    else:
        # As the API server returns them: in the release's namespace.
        served = [o | {"metadata": o["metadata"] | {"namespace": NAMESPACE}} for o in live]
        with kube_api(served, tmp_path) as kubeconfig:
            result = run_helm_template(helm, kubeconfig=kubeconfig)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _secret_and_certificate(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (secret,) = kind(docs, "Secret")
    (cm,) = [
        c for c in kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-release-signing")
    ]
    return secret, cm


def _certified_key_id(cm: dict[str, Any]) -> bytes:
    (trusted,) = load_trusted_keys(cm["data"]["release-signing-keys.pem"].encode(), source="cm")
    return signing_key_id(trusted.key)


def _key_id(secret: dict[str, Any]) -> bytes:
    key = load_signing_key(base64.b64decode(secret["data"]["release-signing-key"]))
    return signing_key_id(key.public_key())


def _binding(secret: dict[str, Any], cm: dict[str, Any]) -> str:
    """What the chart binds ``cm``'s certificate to ``secret``'s key with (deploy/README.md):
    SHA-256 of the certificate, its notAfter annotation and the key."""
    cert = cm["data"]["release-signing-keys.pem"].strip()
    key = base64.b64decode(secret["data"]["release-signing-key"]).decode()
    return hashlib.sha256(
        f"{cert}\n{cm['metadata']['annotations'][NOT_AFTER]}\n{key}".encode()
    ).hexdigest()


def _ending(secret: dict[str, Any], cm: dict[str, Any], not_after: dt.datetime) -> None:
    """As if the chart had made ``cm``'s certificate to end at ``not_after``."""
    cm["metadata"]["annotations"][NOT_AFTER] = not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    secret["metadata"]["annotations"][BINDING] = _binding(secret, cm)


@pytest.fixture
def installed(helm: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Secret and the release-signing ConfigMap of an install (nothing live yet)."""
    return _secret_and_certificate(_render(helm, tmp_path, []))


def test_an_upgrade_keeps_the_certificate(
    helm: str, tmp_path: Path, installed: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """The chart made its certificate again at every render: a changed ConfigMap at every
    upgrade (GitOps drift), dated anew by the clock of the machine running Helm. An upgrade
    that finds it over the Secret's key, ending in more than 60 days, renders it unchanged."""
    secret, cm = installed
    assert _certified_key_id(cm) == _key_id(secret)
    again = _render(helm, tmp_path, [secret, cm])
    assert _secret_and_certificate(again) == (secret, cm)


def test_the_chart_renews_within_the_bootstrap_s_window(
    helm: str, tmp_path: Path, installed: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """The chart's 60 days are compose's (release_certificate.RENEW_WITHIN): a certificate
    ending a day later than that is kept ("ends soon" above: a day sooner, made again)."""
    secret, cm = installed
    _ending(secret, cm, dt.datetime.now(dt.UTC) + RENEW_WITHIN + dt.timedelta(days=1))
    again = _render(helm, tmp_path, [secret, cm])
    assert _secret_and_certificate(again) == (secret, cm)


@pytest.mark.parametrize(
    "change",
    ["key rotated", "ends soon", "no annotations", "edited", "appended", "not-after edited"],
)
def test_a_certificate_that_no_longer_does_is_made_again(
    helm: str,
    tmp_path: Path,
    installed: tuple[dict[str, Any], dict[str, Any]],
    change: str,
) -> None:
    """Made again over the Secret's key when the Secret holds another key (patched with
    kubectl, as "Rotating the release-signing key" does), when it ends within 60 days, when the
    ConfigMap is the operator's (inference.releaseSigning.publicKeys, since emptied) and when
    someone who may edit the ConfigMap but not the Secret changed it: its certificate replaced,
    another appended to it (trusted by inference beside the broker's), or its notAfter annotation
    moved on (which kept the certificate while the binding covered the certificate alone)."""
    secret, cm = installed
    if change == "key rotated":
        new_key = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        secret["data"]["release-signing-key"] = base64.b64encode(new_key).decode()
    elif change == "ends soon":
        _ending(secret, cm, dt.datetime.now(dt.UTC) + RENEW_WITHIN - dt.timedelta(days=1))
    elif change == "no annotations":
        del cm["metadata"]["annotations"]
    elif change == "not-after edited":
        cm["metadata"]["annotations"][NOT_AFTER] = "2999-01-01T00:00:00Z"
    else:
        other = _secret_and_certificate(_render(helm, tmp_path, []))[1]
        pem = other["data"]["release-signing-keys.pem"]
        if change == "appended":
            pem = cm["data"]["release-signing-keys.pem"] + pem
        cm["data"] = {"release-signing-keys.pem": pem}
    upgraded_secret, upgraded = _secret_and_certificate(_render(helm, tmp_path, [secret, cm]))
    assert upgraded["data"] != cm["data"]
    assert upgraded["metadata"]["annotations"][NOT_AFTER] != "2999-01-01T00:00:00Z"
    assert _certified_key_id(upgraded) == _key_id(upgraded_secret) == _key_id(secret)
    (trusted,) = load_trusted_keys(
        upgraded["data"]["release-signing-keys.pem"].encode(), source="cm"
    )
    assert trusted.not_after is not None
    assert trusted.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=36499)
    assert upgraded["metadata"]["annotations"][NOT_AFTER] <= trusted.not_after.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_helm_template_makes_a_certificate_at_every_render(helm: str, tmp_path: Path) -> None:
    """What deploy/README.md tells GitOps users: without a cluster to look up (helm template,
    Argo CD), there is nothing to keep, and every render makes a new key and certificate."""
    first = _secret_and_certificate(_render(helm, tmp_path, None))[1]
    second = _secret_and_certificate(_render(helm, tmp_path, None))[1]
    assert first["data"] != second["data"]
    assert NOT_AFTER in first["metadata"]["annotations"]


def test_the_binding_is_seen_only_by_those_who_may_read_the_key(
    installed: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """The binding is a SHA-256 over the private key: it was an annotation of the ConfigMap,
    which far more principals read (and write) than the Secret. It is the Secret's now; the
    ConfigMap says only when its certificate ends."""
    secret, cm = installed
    assert set(cm["metadata"]["annotations"]) == {NOT_AFTER}
    assert secret["metadata"]["annotations"][BINDING] == _binding(secret, cm)


def test_no_binding_without_the_chart_certificate(helm: str, tmp_path: Path) -> None:
    """With inference.releaseSigning.publicKeys the ConfigMap is the operator's: the chart makes
    no certificate, and the Secret binds none."""
    public = tmp_path / "keys.pem"
    public.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = run_helm_template(
        helm, set_args=(f"inference.releaseSigning.publicKeys={public.read_text()}",)
    )
    assert result.returncode == 0, result.stderr
    secret, cm = _secret_and_certificate([d for d in yaml.safe_load_all(result.stdout) if d])
    assert BINDING not in secret["metadata"]["annotations"]
    assert "annotations" not in cm["metadata"]
