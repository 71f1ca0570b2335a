"""Review of the audit shipper (Helm): what leaves the pod must be checkable with `audit verify`."""

from __future__ import annotations

import fnmatch
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, kind, render


def _shipper_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("audit-shipper")]
    return dict(yaml.safe_load(cm["data"]["config.yaml"]))


def _broker_audit_log(docs: list[dict[str, Any]]) -> str:
    (cm,) = [
        d
        for d in kind(docs, "ConfigMap")
        if d["metadata"]["name"].endswith("keybroker") and "config.yaml" in d.get("data", {})
    ]
    return str(yaml.safe_load(cm["data"]["config.yaml"])["keybroker"]["audit_log"])


def test_the_shipper_ships_the_signed_head_too(helm: str) -> None:
    """The shipper tails `*.log` only: `audit.log.head` never leaves the pod (an emptyDir, wiped
    when the pod goes, including its eviction at `audit.sizeLimit`). The shipped copy, which the
    README's backup section names as the audit log's backup, then has no head to verify against
    (`audit verify` says HEAD_MISSING), and nothing outside the pod can tell a log cut short,
    rolled back or restarted from scratch: the heads are what the module doc says to ship."""
    docs = render(helm, (DEPLOY / "helm" / "values-production.yaml",))
    log = _broker_audit_log(docs)
    shipped: list[str] = []
    for name, receiver in _shipper_config(docs)["receivers"].items():
        if name.startswith("filelog"):
            shipped += receiver["include"]
    assert any(fnmatch.fnmatch(log, pattern) for pattern in shipped)
    assert any(fnmatch.fnmatch(log + ".head", pattern) for pattern in shipped), shipped
