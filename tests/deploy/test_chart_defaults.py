"""The chart's defaults deploy something that works, or refuse clearly.

Values that would render a deployment which cannot work (a broker whose NetworkPolicy blocks its
collateral fetches) are refused at render time with a message naming the ways out; the documented
ways out render.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    DEPLOY,
    MINIMAL,
    kind,
    render,
    run_helm_template,
)

DEVELOPMENT = (DEPLOY / "helm" / "values-development.yaml",)
COLLATERAL_REFUSAL = "keybroker.collateral: the broker fetches attestation collateral"


def _component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def _broker_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [
        c
        for c in kind(docs, "ConfigMap")
        if _component(c) == "keybroker" and "config.yaml" in c.get("data", {})
    ]
    section: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])["keybroker"]
    return section


def _broker_egress_cidrs(docs: list[dict[str, Any]]) -> set[str]:
    (policy,) = [p for p in kind(docs, "NetworkPolicy") if _component(p) == "keybroker"]
    return {
        peer["ipBlock"]["cidr"]
        for rule in policy["spec"]["egress"]
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    }


@pytest.mark.parametrize("mode", ["production", "development"])
def test_bare_defaults_are_refused_naming_both_ways_out(helm: str, mode: str) -> None:
    """The defaults fetch collateral (AMD KDS, Intel PCS) with no egress for it: the chart rendered
    a broker whose every release was refused COLLATERAL_MISSING, with nothing saying why."""
    files = () if mode == "production" else DEVELOPMENT
    set_args = () if mode == "production" else ("keybroker.collateral.fetch=true",)
    result = run_helm_template(helm, files, set_args)
    assert result.returncode != 0, "the chart rendered a broker that cannot fetch its collateral"
    message = result.stderr
    assert COLLATERAL_REFUSAL in message, message
    for way_out in ("keybroker.collateral.egress", "keybroker.collateral.fetch: false"):
        assert way_out in message, message
    assert "COLLATERAL_MISSING" in message
    assert "https://kdsintf.amd.com" in message  # names the sources it could not reach
    assert "goroutine" not in message and "panic" not in message


def test_the_minimal_values_open_the_brokers_egress_to_its_collateral_source(helm: str) -> None:
    docs = render(helm, MINIMAL)
    minimal = yaml.safe_load(MINIMAL[0].read_text())["keybroker"]["collateral"]
    assert _broker_egress_cidrs(docs) >= {e["cidr"] for e in minimal["egress"]}
    config = _broker_config(docs)
    assert config["collateral_fetch"] is True
    assert (config["pcs_url"], config["kds_url"]) == (minimal["pcsUrl"], minimal["kdsUrl"])


@pytest.mark.parametrize(
    "way_out",
    [
        # Air-gapped: no fetches, the cache is filled with `attest collateral import`.
        ("keybroker.collateral.fetch=false",),
        # Replicas reading a cache another writer fills fetch nothing themselves.
        ("keybroker.collateral.readOnly=true",),
    ],
)
def test_a_broker_that_fetches_nothing_needs_no_collateral_egress(
    helm: str, way_out: tuple[str, ...]
) -> None:
    docs = render(helm, (), way_out)
    assert not _broker_egress_cidrs(docs)
    config = _broker_config(docs)
    assert config["collateral_fetch"] is False or config["collateral_read_only"] is True


def test_the_deploy_instructions_pass_a_values_file_to_every_install(helm: str) -> None:
    """The README's `helm install` commands must not be the bare defaults the chart refuses; the
    quick start's values file must render."""
    text = (DEPLOY / "README.md").read_text()
    commands = re.findall(r"helm (?:upgrade --install|install) (?:[^\n]*\\\n)*[^\n]*", text)
    assert commands
    for command in commands:
        assert re.search(r"(?:^|\s)-f\s", command), command
    assert "-f deploy/helm/values-minimal.yaml" in text
    assert render(helm, MINIMAL)
