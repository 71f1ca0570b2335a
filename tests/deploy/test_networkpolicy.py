"""The chart's NetworkPolicies allow EXACTLY the documented flows (deploy/README.md, "Network flows").

The allowed (source, destination, port) set is computed from the rendered policies for a population
of parties (the chart's own pods, with the labels their Deployments give them; publishers, clients,
DNS, strangers in and out of the namespace, addresses outside the cluster) and compared in both
directions with the documented set: nothing missing, nothing extra.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import NAMESPACE, VALUES_SETS, kind, render
from tests.deploy.netpol import Evaluator, Flow, Party, selector_matches

COMPONENTS = ("keybroker", "modelstore", "inference", "step-ca")
SERVICES = ("keybroker", "modelstore", "inference")


def ns_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def chart_pods(docs: list[dict[str, Any]]) -> list[Party]:
    """One party per rendered Deployment, labelled exactly as its pod template."""
    pods = []
    for i, dep in enumerate(kind(docs, "Deployment"), start=10):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pods.append(
            Party(
                name=labels["app.kubernetes.io/component"],
                ip=f"10.244.1.{i}",
                namespace=NAMESPACE,
                labels=labels,
                namespace_labels=ns_labels(NAMESPACE),
                ours=True,
            )
        )
    return pods


def pod(name: str, ip: str, namespace: str, **labels: str) -> Party:
    return Party(name, ip, namespace, labels, ns_labels(namespace))


# Parties that exist whatever the values: DNS, strangers that must never get in or out.
COMMON_PARTIES = [
    pod("kube-dns", "10.244.0.10", "kube-system", **{"k8s-app": "kube-dns"}),
    pod("stranger", "10.244.2.5", NAMESPACE, app="something-else"),
    pod("stranger-other-ns", "10.244.3.5", "tenant-b", app="something-else"),
    # Right labels, wrong namespace: a pod selector without a namespace selector means this namespace.
    pod(
        "labelled-publisher-other-ns",
        "10.244.3.6",
        "tenant-b",
        **{"strongroom.io/role": "publisher"},
    ),
    pod("labelled-client-other-ns", "10.244.3.7", "tenant-b", **{"strongroom.io/role": "client"}),
    Party("internet", "203.0.113.7"),
    Party("metadata-service", "169.254.169.254"),
]


def parties_for(values_set: str, docs: list[dict[str, Any]]) -> list[Party]:
    parties = chart_pods(docs) + list(COMMON_PARTIES)
    if values_set == "production":
        parties += [
            pod("publisher", "10.244.4.5", "model-pipeline", **{"strongroom.io/role": "publisher"}),
            # The default-values publisher label no longer suffices in production.
            pod(
                "labelled-publisher-same-ns",
                "10.244.1.99",
                NAMESPACE,
                **{"strongroom.io/role": "publisher"},
            ),
            Party("client", "10.50.3.4"),  # behind the internal load balancer
            Party("other-internal-address", "10.60.0.1"),
            Party("external-ca", "10.20.0.10"),
            Party("hsm", "10.30.0.5"),
            Party("object-store", "10.40.0.5"),  # modelstore.storage.s3.endpoint
            Party("collateral-mirror", "10.20.0.20"),  # keybroker.collateral pcsUrl/kdsUrl
            pod(
                "otel-collector",
                "10.244.5.5",
                "observability",
                **{"app.kubernetes.io/name": "opentelemetry-collector"},
            ),
        ]
    else:
        parties += [
            pod("publisher", "10.244.1.50", NAMESPACE, **{"strongroom.io/role": "publisher"}),
            pod("client", "10.244.1.51", NAMESPACE, **{"strongroom.io/role": "client"}),
            Party("collateral-mirror", "192.0.2.20"),  # values-minimal.yaml's collateral egress
        ]
    return parties


def dns(*sources: str) -> set[Flow]:
    return {(s, "kube-dns", f"53/{p}") for s in sources for p in ("UDP", "TCP")}


# The documented flows (deploy/README.md, "Network flows").
DOCUMENTED_DEFAULT: set[Flow] = {
    ("inference", "modelstore", "7443/TCP"),
    ("inference", "keybroker", "7443/TCP"),
    ("publisher", "modelstore", "7443/TCP"),
    ("publisher", "keybroker", "7443/TCP"),
    ("client", "inference", "7443/TCP"),
    *{
        (s, "step-ca", "9000/TCP")
        for s in ("keybroker", "modelstore", "inference", "publisher", "client")
    },
    *dns(*SERVICES),
}
# The minimal values fetch collateral from a mirror; development fetches none (simulated chain).
DOCUMENTED_MINIMAL: set[Flow] = DOCUMENTED_DEFAULT | {("keybroker", "collateral-mirror", "443/TCP")}
DOCUMENTED_PRODUCTION: set[Flow] = {
    ("inference", "modelstore", "7443/TCP"),
    ("inference", "keybroker", "7443/TCP"),
    ("publisher", "modelstore", "7443/TCP"),
    ("publisher", "keybroker", "7443/TCP"),
    ("client", "inference", "7443/TCP"),
    *{(s, "external-ca", "9000/TCP") for s in SERVICES},
    *{(s, "otel-collector", "4317/TCP") for s in SERVICES},
    ("keybroker", "hsm", "1792/TCP"),
    ("modelstore", "object-store", "443/TCP"),
    ("keybroker", "collateral-mirror", "443/TCP"),
    *dns(*SERVICES),
}
DOCUMENTED = {
    "minimal": DOCUMENTED_MINIMAL,
    "development": DOCUMENTED_DEFAULT,
    "production": DOCUMENTED_PRODUCTION,
}


def compute(values_set: str, docs: list[dict[str, Any]]) -> set[Flow]:
    evaluator = Evaluator(kind(docs, "NetworkPolicy"), NAMESPACE)
    return evaluator.flows(
        parties_for(values_set, docs), extra_ports=(53, 443, 1792, 4317, 7443, 9000)
    )


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_network_policies_allow_exactly_the_documented_flows(helm: str, values_set: str) -> None:
    docs = render(helm, VALUES_SETS[values_set])
    allowed = compute(values_set, docs)
    documented = DOCUMENTED[values_set]
    missing = sorted(documented - allowed)
    extra = sorted(allowed - documented)
    assert not missing, f"documented flows the policies block: {missing}"
    assert not extra, f"flows the policies allow but the documentation does not list: {extra}"


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_every_chart_pod_is_isolated_both_ways(helm: str, values_set: str) -> None:
    docs = render(helm, VALUES_SETS[values_set])
    policies = kind(docs, "NetworkPolicy")
    for party in chart_pods(docs):
        types = set()
        for p in policies:
            if selector_matches(p["spec"]["podSelector"], party.labels):
                types |= set(p["spec"]["policyTypes"])
        assert types == {"Ingress", "Egress"}, f"{party.name} is not isolated: {types}"


def test_the_health_port_is_never_opened_to_the_network(helm: str) -> None:
    # kubelet probes come from the node, which NetworkPolicy always admits; nobody else needs 8081.
    for values_set in VALUES_SETS:
        flows = compute(values_set, render(helm, VALUES_SETS[values_set]))
        assert not [f for f in flows if f[2].startswith("8081/")]


# ---- the evaluator must see a broken policy (so that the equality above means something) ----


def _mutated(helm: str, mutate: Any) -> set[Flow]:
    docs = copy.deepcopy(render(helm))
    for p in kind(docs, "NetworkPolicy"):
        mutate(p)
    return compute("minimal", docs)


def test_evaluator_sees_a_missing_policy(helm: str) -> None:
    docs = [
        d
        for d in render(helm)
        if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-keybroker"))
    ]
    extra = compute("minimal", docs) - DOCUMENTED_MINIMAL
    assert ("stranger", "keybroker", "7443/TCP") in extra
    assert ("keybroker", "internet", "443/TCP") in extra


def test_evaluator_sees_a_rule_without_ports(helm: str) -> None:
    def drop_ports(p: dict[str, Any]) -> None:
        if p["metadata"]["name"].endswith("-modelstore"):
            for rule in p["spec"]["ingress"]:
                rule.pop("ports", None)

    extra = _mutated(helm, drop_ports) - DOCUMENTED_MINIMAL
    assert (
        "inference",
        "modelstore",
        "8081/TCP",
    ) not in extra  # inference's egress still limits it
    assert ("publisher", "modelstore", "8081/TCP") in extra


def test_evaluator_sees_a_namespace_wide_peer(helm: str) -> None:
    def open_clients(p: dict[str, Any]) -> None:
        if p["metadata"]["name"].endswith("-inference"):
            p["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]

    extra = _mutated(helm, open_clients) - DOCUMENTED_MINIMAL
    assert ("stranger-other-ns", "inference", "7443/TCP") in extra


def test_evaluator_sees_a_missing_flow(helm: str) -> None:
    def drop_dns(p: dict[str, Any]) -> None:
        if p["metadata"]["name"].endswith("-inference"):
            p["spec"]["egress"] = p["spec"]["egress"][1:]

    missing = DOCUMENTED_MINIMAL - _mutated(helm, drop_dns)
    assert missing == {("inference", "kube-dns", "53/UDP"), ("inference", "kube-dns", "53/TCP")}


def test_selector_semantics() -> None:
    labels = {"a": "1", "b": "2"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"a": "1"}}, labels)
    assert not selector_matches({"matchLabels": {"a": "2"}}, labels)
    exprs = [
        ({"key": "a", "operator": "In", "values": ["1", "3"]}, True),
        ({"key": "a", "operator": "NotIn", "values": ["1"]}, False),
        ({"key": "c", "operator": "NotIn", "values": ["1"]}, True),
        ({"key": "b", "operator": "Exists"}, True),
        ({"key": "c", "operator": "Exists"}, False),
        ({"key": "c", "operator": "DoesNotExist"}, True),
    ]
    for expr, expected in exprs:
        assert selector_matches({"matchExpressions": [expr]}, labels) is expected, expr


def test_no_inference_clients_means_nobody_reaches_inference(helm: str, tmp_path: Path) -> None:
    """An operator with no client peers yet writes ``networkPolicy.clients: []``: the chart
    rendered ``from: []``, which Kubernetes reads as every source, so any pod of any namespace
    (and, behind the production load balancer, any address) reached inference's port. No clients
    now means no ingress to inference at all; every other documented flow stays."""
    no_clients = tmp_path / "no-clients.yaml"
    no_clients.write_text("networkPolicy:\n  clients: []\n")
    docs = render(helm, (*VALUES_SETS["production"], no_clients))
    extra = compute("production", docs) - DOCUMENTED_PRODUCTION
    assert not extra, f"with no clients, these still reach inference: {sorted(extra)}"
    allowed = compute("production", docs)
    assert allowed == DOCUMENTED_PRODUCTION - {("client", "inference", "7443/TCP")}
