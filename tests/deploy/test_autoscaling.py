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
import yaml

from strongroom.keybroker.service import MESSAGE_LIMITS as BROKER_LIMITS
from strongroom.modelstore.service import message_limits
from tests.deploy.conftest import (
    DEPLOY,
    MINIMAL,
    kind,
    render,
    run_helm_template,
    server_section,
)

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


def _config_checksums(docs: list[dict[str, Any]]) -> set[str]:
    return {
        d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for d in kind(docs, "Deployment")
        if "checksum/config" in d["spec"]["template"]["metadata"].get("annotations", {})
    }


def test_an_upgrade_without_autoscaling_restarts_no_pod(helm: str) -> None:
    """Every pod's configuration checksum covers the comments of the broker's and the store's
    configuration: the chart that added autoscaling reworded them ("at most inference.replicas
    3"), so upgrading a release that does not use it restarted every pod (the whole inference
    fleet attesting and loading its models again) for a comment. Without autoscaling they are
    the words the chart rendered before it."""
    docs = render(helm, (DEPLOY / "helm" / "values-production.yaml",))
    configs = {
        c["metadata"]["labels"]["app.kubernetes.io/component"]: c["data"]["config.yaml"]
        for c in kind(docs, "ConfigMap")
        if c["metadata"]["name"].endswith(("-keybroker", "-modelstore"))
    }
    assert (
        "# Per broker replica. The inference fleet (inference.replicas: 3) shares one\n"
        "# SPIFFE ID, so its unary-call limit is all of its replicas' (keybroker.server in"
        " values.yaml).\n"
    ) in configs["keybroker"]
    assert (
        "# Per store replica. The inference fleet (inference.replicas: 3) shares one SPIFFE\n"
        "# ID, so the per-identity limits are all of its replicas' (modelstore.server in"
        " values.yaml).\n"
    ) in configs["modelstore"]
    # The autoscaling values are not read without it.
    ignored = render(
        helm,
        (DEPLOY / "helm" / "values-production.yaml",),
        ("inference.autoscaling.maxReplicas=40", "inference.autoscaling.minReplicas=3"),
    )
    assert _config_checksums(ignored) == _config_checksums(docs)


def test_a_ceiling_that_moves_no_limit_restarts_no_pod(helm: str) -> None:
    """maxReplicas 3 and 4 derive the same limits (the services' own floors): the configuration,
    and so every pod, stays as it was; the comment names no number."""
    base = ("inference.autoscaling.enabled=true", "inference.replicas=2")
    three = render(helm, set_args=(*base, "inference.autoscaling.maxReplicas=3"))
    four = render(helm, set_args=(*base, "inference.autoscaling.maxReplicas=4"))
    (hpa,) = _inference(four, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 4
    assert _config_checksums(three) == _config_checksums(four)
    assert len(_config_checksums(four)) == 1


def test_every_field_of_the_hpas_behavior_renders(helm: str, tmp_path: Path) -> None:
    """The schema checks behavior's fields (a misspelt one was dropped by the API server): every
    field autoscaling/v2 knows still passes, and renders as given."""
    rules = {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15},
            {"type": "Pods", "value": 4, "periodSeconds": 15},
        ],
    }
    behavior = {"scaleUp": rules, "scaleDown": rules}
    autoscaling = {"enabled": True, "maxReplicas": 8, "behavior": behavior}
    path = tmp_path / "behavior.yaml"
    path.write_text(yaml.safe_dump({"inference": {"autoscaling": autoscaling}}))
    docs = render(helm, (*MINIMAL, path))
    (hpa,) = _inference(docs, "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, "1.31.0", strict=True)
    assert hpa["spec"]["behavior"] == behavior


def test_a_memory_limit_that_cannot_hold_the_derived_streams_is_refused(helm: str) -> None:
    """maxReplicas 200 derives 408 blocking streams per store replica; each may be an upload
    holding a message of up to 4 MiB (and with S3 its 16 MiB part), 1.7 GiB in all, and the
    chart rendered them into the store's default 1Gi limit: a burst of uploads got the store
    OOM-killed, taking the fleet's downloads with it, where it would have refused the excess."""
    autoscaled = ("inference.autoscaling.enabled=true", "inference.autoscaling.maxReplicas=200")
    result = run_helm_template(helm, set_args=autoscaled)
    assert result.returncode != 0
    assert "modelstore.resources.limits.memory (1Gi) cannot hold" in result.stderr, result.stderr
    assert "maxBlockingStreams 408 (derived from inference.autoscaling.maxReplicas 200" in (
        result.stderr
    )
    assert f"at least {_least_mib(408, message_limits().receive_cap)}Mi" in result.stderr
    # The broker likewise: every worker may hold a request of up to its limit's cap.
    result = run_helm_template(
        helm,
        set_args=(
            *autoscaled,
            "modelstore.resources.limits.memory=2Gi",
            "keybroker.resources.limits.memory=128Mi",
        ),
    )
    assert result.returncode != 0
    assert "keybroker.resources.limits.memory (128Mi) cannot hold" in result.stderr, result.stderr
    assert "maxWorkers 419" in result.stderr
    # The production values (S3, 2Gi) hold the streams check.sh's autoscaled fleet of 20 admits.
    render(
        helm,
        (DEPLOY / "helm" / "values-production.yaml",),
        ("inference.autoscaling.enabled=true", "inference.autoscaling.maxReplicas=20"),
    )


def _least_mib(count: int, per: int) -> int:
    """The least memory limit (MiB, rounded up) the chart lets hold ``count`` calls of ``per``
    bytes each beside the process's own 64 MiB."""
    return -(-(64 * 2**20 + count * per) // 2**20)


@pytest.mark.parametrize(
    ("service", "count", "per", "others"),
    [
        # maxReplicas 200: 408 blocking streams per store replica, 419 broker workers.
        ("modelstore", 408, message_limits().receive_cap, ()),
        ("keybroker", 419, BROKER_LIMITS.receive_cap, ("modelstore.resources.limits.memory=2Gi",)),
    ],
)
def test_the_memory_floors_count_what_grpc_takes_of_each_message(
    helm: str, service: str, count: int, per: int, others: tuple[str, ...]
) -> None:
    """gRPC takes a request message up to 64 KiB over a service's limit
    (``MessageLimits.receive_cap``) before the runtime refuses it ``MESSAGE_TOO_LARGE``, so each
    upload or broker worker can hold that much more than the limit; the chart's floors counted
    the limit alone (4 MiB + 64 KiB, 256 KiB), and rendered a memory limit a burst of such
    messages did not fit into. They follow the services' caps: the least limit renders, one MiB
    less is refused naming it."""
    autoscaled = ("inference.autoscaling.enabled=true", "inference.autoscaling.maxReplicas=200")
    least = _least_mib(count, per)
    result = run_helm_template(
        helm, set_args=(*autoscaled, *others, f"{service}.resources.limits.memory={least - 1}Mi")
    )
    assert result.returncode != 0
    assert f"{service}.resources.limits.memory ({least - 1}Mi) cannot hold" in result.stderr, (
        result.stderr
    )
    assert f"at least {least}Mi" in result.stderr
    render(helm, set_args=(*autoscaled, *others, f"{service}.resources.limits.memory={least}Mi"))
