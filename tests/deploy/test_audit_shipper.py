"""The audit shipper sidecar (Helm) and the documented backup of each broker pod's audit log.

What leaves the pod must be checkable with `audit verify`: the shipper sends the records, and the
README's procedure copies the log with its signed head (which the shipper cannot follow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.keybroker.audit import AuditEvent, AuditLog, Decision
from strongroom.keybroker.audit_verify import verify_audit_log
from tests.deploy.conftest import DEPLOY, ROOT, kind, render

AUDIT_DIR = "/var/lib/strongroom/audit/"


def _shipper_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("audit-shipper")]
    return dict(yaml.safe_load(cm["data"]["config.yaml"]))


def _shipper_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shipper container and its pod spec."""
    for deployment in kind(docs, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"]:
            if container["name"] == "audit-shipper":
                return container, spec
    raise AssertionError("no audit-shipper container")


def test_a_restarted_shipper_goes_on_where_it_stopped(helm: str) -> None:
    """The receiver kept its read positions in memory only: with `start_at: beginning` every
    restart of the sidecar (an OOM kill at its 128 MiB limit, a liveness failure) shipped the
    whole log again, duplicating every record downstream."""
    docs = render(helm, (DEPLOY / "helm" / "values-production.yaml",))
    config = _shipper_config(docs)
    storage = config["receivers"]["filelog/audit"]["storage"]
    assert storage in config["service"]["extensions"]
    directory = config["extensions"][storage]["directory"]
    container, spec = _shipper_container(docs)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume  # outlives the container, as the audit emptyDir it indexes does


def test_the_shipper_does_not_share_the_brokers_tmp(helm: str) -> None:
    """Both containers mounted the pod's one memory-backed /tmp volume, where the broker's
    PKCS#11 library (a vendor's, in production) may write: the third-party shipper image could
    read it."""
    docs = render(helm, (DEPLOY / "helm" / "values-production.yaml",))
    shipper, spec = _shipper_container(docs)
    (broker,) = [c for c in spec["containers"] if c["name"] == "keybroker"]

    def tmp_volume(container: dict[str, Any]) -> str:
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        return str(mount["name"])

    assert tmp_volume(shipper) != tmp_volume(broker)
    shared = {m["name"] for m in shipper["volumeMounts"]} & {
        m["name"] for m in broker["volumeMounts"] if not m.get("readOnly", False)
    }
    assert shared == {"audit"}  # the shipper reads the broker's audit log, read-only, and no more
    (audit,) = [m for m in shipper["volumeMounts"] if m["name"] == "audit"]
    assert audit["readOnly"] is True


def test_the_brokers_audit_cap_is_below_the_volumes_size_limit(helm: str) -> None:
    """The audit emptyDir's sizeLimit is enforced by evicting the pod (the log and its head lost,
    a new chain in the next pod), so the broker must refuse decisions before it: its configured
    audit_max_bytes is below the volume's limit."""
    docs = render(helm, (DEPLOY / "helm" / "values-production.yaml",))
    _, spec = _shipper_container(docs)
    (volume,) = [v for v in spec["volumes"] if v["name"] == "audit"]
    limit = volume["emptyDir"]["sizeLimit"]
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    (cm,) = [
        d
        for d in kind(docs, "ConfigMap")
        if "audit_log" in d.get("data", {}).get("config.yaml", "")
    ]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert 0 < config["keybroker"]["audit_max_bytes"] < limit_bytes


def _documented_backup() -> str:
    """The Python program of deploy/README.md's audit backup (the `python3 -` here-document)."""
    readme = (DEPLOY / "README.md").read_text()
    found = re.search(r"python3 - > \"audit-\$POD\.tar\" <<'EOF'\n(.*?)\nEOF\n", readme, re.S)
    assert found, "deploy/README.md has no backup of the audit log with its head"
    return found.group(1)


def test_the_documented_backup_of_a_brokers_log_and_head_verifies(tmp_path: Path) -> None:
    """The shipped copy has no head (`audit verify` says HEAD_MISSING) and the pod's emptyDir goes
    with the pod: the README's copy of the pair, taken while the broker runs, must verify."""
    directory = tmp_path / "audit"
    directory.mkdir()
    key = Ed25519PrivateKey.generate()
    program = _documented_backup().replace(AUDIT_DIR, f"{directory}/")
    with AuditLog.open(directory / "audit.log", key) as log:
        for n in range(5):
            log.append(AuditEvent(decision=Decision.DENIED, reason="TEST", claims={"n": n}))
        copied = subprocess.run(
            [sys.executable, "-"],
            input=program.encode(),
            capture_output=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=60,
        ).stdout
    archive = tmp_path / "audit.tar"
    archive.write_bytes(copied)
    restored = tmp_path / "restored"
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["audit.log", "audit.log.head"]
        tar.extractall(restored, filter="data")
    result = verify_audit_log(restored / "audit.log", public_key=key.public_key())
    assert result.intact and result.records == 5, result
