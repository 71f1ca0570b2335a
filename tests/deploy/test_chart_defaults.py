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


NO_POLICIES_REFUSAL = "networkPolicy.enabled is false in production mode"


def test_production_without_the_charts_network_policies_needs_an_acknowledgement(
    helm: str,
) -> None:
    """networkPolicy.enabled: false in production was accepted silently: no policy at all, so any
    pod could reach the broker and the store, and the broker could connect anywhere."""
    result = run_helm_template(helm, set_args=("networkPolicy.enabled=false",))
    assert result.returncode != 0, "production rendered without any NetworkPolicy"
    assert NO_POLICIES_REFUSAL in result.stderr, result.stderr
    assert "networkPolicy.externallyEnforced: true" in result.stderr
    assert "networkPolicy.enabled: true" in result.stderr


def test_an_acknowledged_external_enforcement_renders_no_policy(helm: str) -> None:
    acknowledged = ("networkPolicy.enabled=false", "networkPolicy.externallyEnforced=true")
    assert not kind(render(helm, set_args=acknowledged), "NetworkPolicy")
    # Whoever enforces the flows also decides the broker's egress: the chart cannot check it.
    assert run_helm_template(helm, (), acknowledged).returncode == 0


def test_development_may_turn_the_policies_off_without_acknowledgement(helm: str) -> None:
    """kind and minikube often enforce no NetworkPolicy; development mode is no deployment."""
    docs = render(helm, DEVELOPMENT, ("networkPolicy.enabled=false",))
    assert not kind(docs, "NetworkPolicy")


def test_the_acknowledgement_is_a_boolean(helm: str) -> None:
    result = run_helm_template(
        helm, set_args=("networkPolicy.enabled=false", "networkPolicy.externallyEnforced=yes")
    )
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
