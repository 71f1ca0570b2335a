"""Inference autoscaling: an HPA owns the fleet's size, and the limits are sized for its ceiling.

Every inference replica has the one inference SPIFFE ID, so the key broker's and the model
store's per-identity limits are the whole fleet's. The chart sized them for the fixed
``inference.replicas``; a fleet an HPA grew past it had the replicas it added refused
``TOO_MANY_*_PER_IDENTITY`` while they started, i.e. scaling out was slowest under the most load.
With ``inference.autoscaling`` the chart renders an ``autoscaling/v2`` HPA, leaves the
Deployment's replica count to it and derives every per-identity limit from ``maxReplicas``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.conftest import kind, render, run_helm_template, server_section

#: Autoscaling a fleet of 3 up to 40 replicas.
AUTOSCALED = (
    "inference.replicas=3",
    "inference.autoscaling.enabled=true",
    "inference.autoscaling.maxReplicas=40",
)


def _inference(docs: list[dict[str, Any]], k: str) -> list[dict[str, Any]]:
    return [
        d
        for d in kind(docs, k)
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "inference"
    ]


def test_the_hpa_owns_the_fleets_size_between_its_bounds(helm: str) -> None:
    docs = render(
        helm,
        set_args=(
            *AUTOSCALED,
            "inference.autoscaling.targetMemoryUtilizationPercentage=80",
            "inference.autoscaling.behavior.scaleDown.stabilizationWindowSeconds=900",
        ),
    )
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    (hpa,) = _inference(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (deployment,) = _inference(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 40)
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert targets == {
        "cpu": {"type": "Utilization", "averageUtilization": 70},
        "memory": {"type": "Utilization", "averageUtilization": 80},
    }
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 900}}
    # A count in the Deployment would reset the HPA's choice at every upgrade.
    assert "replicas" not in deployment["spec"]
    # Spread over nodes and zones: the fleet may grow past one pod.
    assert deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]


def test_without_autoscaling_there_is_no_hpa_and_the_count_is_fixed(helm: str) -> None:
    docs = render(helm, set_args=("inference.replicas=3",))
    assert not kind(docs, "HorizontalPodAutoscaler")
    (deployment,) = _inference(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3


def test_a_fleet_starting_at_one_pod_is_still_spread(helm: str) -> None:
    docs = render(
        helm, set_args=("inference.autoscaling.enabled=true", "inference.autoscaling.maxReplicas=4")
    )
    (deployment,) = _inference(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    (hpa,) = _inference(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 1  # minReplicas null: inference.replicas


@pytest.mark.parametrize("service", ["keybroker", "modelstore"])
def test_per_identity_limits_are_sized_for_the_largest_fleet(
    helm: str, tmp_path: Path, service: str
) -> None:
    """Limits derived from maxReplicas (40), as if the fleet were fixed at 40, not from the floor."""
    autoscaled = server_section(helm, tmp_path, service, *AUTOSCALED)
    fixed_at_max = server_section(helm, tmp_path, service, "inference.replicas=40")
    assert autoscaled == fixed_at_max
    assert autoscaled.unary_calls_per_identity == 80
    assert autoscaled.data_plane_workers - autoscaled.data_plane_workers_per_identity >= 15
    if service == "modelstore":
        assert autoscaled.max_streams_per_identity == 80
    floor = server_section(helm, tmp_path, service, "inference.replicas=3")
    assert floor.unary_calls_per_identity < autoscaled.unary_calls_per_identity


def test_limits_past_the_services_caps_are_refused_naming_max_replicas(helm: str) -> None:
    result = run_helm_template(
        helm,
        set_args=(
            "inference.autoscaling.enabled=true",
            "inference.autoscaling.maxReplicas=500",
            "modelstore.server.controlPlaneWorkers=10",
        ),
    )
    assert result.returncode != 0
    assert "but the store allows at most 1024" in result.stderr, result.stderr
    assert "derived from inference.autoscaling.maxReplicas 500" in result.stderr
    result = run_helm_template(
        helm,
        set_args=(
            "inference.autoscaling.enabled=true",
            "inference.autoscaling.maxReplicas=500",
            "keybroker.server.controlPlaneWorkers=10",
        ),
    )
    assert result.returncode != 0
    assert "but the broker allows at most 1024" in result.stderr, result.stderr
    assert "derived from inference.autoscaling.maxReplicas 500" in result.stderr


def test_an_explicit_floor_equal_to_replicas_renders(helm: str) -> None:
    docs = render(helm, set_args=(*AUTOSCALED, "inference.autoscaling.minReplicas=3"))
    (hpa,) = _inference(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3
