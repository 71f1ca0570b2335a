"""The chart's defaults deploy something that works, or refuse clearly.

Values that would render a deployment which cannot work (a broker whose NetworkPolicy blocks its
collateral fetches, production without network policies nobody enforces, store limits the store
refuses) are refused at render time with a message naming the ways out; the documented ways out
render, and the store's per-identity limits follow the size of the inference fleet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from strongroom.attestation.collateral_fetch import FetchSettings
from strongroom.client.fetch import DEFAULT_PARALLEL_PARTS
from strongroom.inference.models import DEFAULT_MAX_INFERENCE_MEMORY_BYTES
from strongroom.inference.oip import DEFAULT_MAX_RESPONSE_MEMORY_BYTES
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.keybroker.grant_budget import GrantLimits
from strongroom.runtime.callers import certificate_share
from strongroom.runtime.config import ServerConfig, load_service_config
from tests.deploy.conftest import (
    DEPLOY,
    MINIMAL,
    kind,
    render,
    run_helm_template,
    server_section,
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
    # Names the sources it could not reach: with Intel's PCS the root CA CRL is a third host.
    for source in (
        "https://kdsintf.amd.com",
        "https://api.trustedservices.intel.com",
        "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der",
    ):
        assert source in message, message
    assert "goroutine" not in message and "panic" not in message


@pytest.mark.parametrize(
    "pcs_url", ["https://api.trustedservices.intel.com", "https://pccs.internal/"]
)
def test_the_refusal_names_the_root_ca_crl_the_broker_would_fetch(helm: str, pcs_url: str) -> None:
    """The chart derives the root CA CRL's location as the broker does (another host with
    Intel's PCS, the PCCS itself otherwise)."""
    result = run_helm_template(helm, (), (f"keybroker.collateral.pcsUrl={pcs_url}",))
    expected = FetchSettings(pcs_url=pcs_url).root_crl_url
    assert f"the root CA CRL ({expected})" in result.stderr, result.stderr


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
        # Air-gapped: no fetches, the cache (a claim that outlives the pods) is filled with
        # `attest collateral import`.
        (
            "keybroker.collateral.fetch=false",
            "keybroker.collateral.persistence.existingClaim=collateral",
        ),
        # Replicas reading a cache another writer fills fetch nothing themselves.
        (
            "keybroker.collateral.readOnly=true",
            "keybroker.collateral.persistence.existingClaim=collateral",
        ),
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


@pytest.mark.parametrize("service", ["keybroker", "modelstore", "inference"])
def test_each_service_takes_a_request_wait_from_the_chart(
    helm: str, tmp_path: Path, service: str
) -> None:
    """server.request_wait_seconds had no value in the chart: a deployment could not set the
    bound of a data-plane call's wait for its request message (one for every method) but by
    editing the rendered configuration. <service>.server.requestWaitSeconds sets it, a fraction
    too (the integer limits beside it are rendered as integers); null leaves each method's own
    bound (nothing rendered: an upgrade that sets none restarts no pod)."""
    assert server_section(helm, tmp_path, service).request_wait_seconds is None
    values = tmp_path / "request-wait.yaml"
    values.write_text(f"{service}:\n  server:\n    requestWaitSeconds: 2.5\n")
    server = server_section(helm, tmp_path, service, values_files=(*MINIMAL, values))
    assert server.request_wait_seconds == 2.5


def _store_server(helm: str, tmp_path: Path, *set_args: str) -> ServerConfig:
    return server_section(helm, tmp_path, "modelstore", *set_args)


def _room(replicas: int) -> tuple[str, ...]:
    """The store's memory limit for a fleet of ``replicas``: its default 1Gi cannot hold the
    uploads the limits derived for 500 admit (the chart refuses it)."""
    return ("modelstore.resources.limits.memory=5Gi",) if replicas > 100 else ()


@pytest.mark.parametrize("replicas", [1, 3, 10, 40, 500])
def test_store_limits_scale_with_the_inference_fleet(
    helm: str, tmp_path: Path, replicas: int
) -> None:
    """Every inference replica has the one inference SPIFFE ID, so the store's per-identity stream
    cap (a fixed 8) was the whole fleet's: a large fleet cold-starting queued behind it."""
    server = _store_server(helm, tmp_path, f"inference.replicas={replicas}", *_room(replicas))
    assert server.max_streams_per_identity >= 2 * replicas
    assert server.unary_calls_per_identity >= 2 * replicas
    # The fleet never takes every blocking stream (publishers keep some), nor streams every worker.
    assert server.blocking_streams >= server.max_streams_per_identity + 8
    assert server.blocking_streams < server.max_workers
    assert server.unary_calls_per_identity < server.data_plane_workers
    # The fleet's streams or unary calls at their caps leave data-plane workers to the others.
    assert server.data_plane_workers - server.blocking_streams >= 12
    assert server.data_plane_workers - server.unary_calls_per_identity >= 15
    # One identity's data-plane workers across kinds: the fleet's larger per-kind cap, and the
    # others keep as many beside the fleet at that bound.
    bound = server.data_plane_workers_per_identity
    assert bound >= max(server.max_streams_per_identity, server.unary_calls_per_identity)
    assert server.data_plane_workers - bound >= 15
    if replicas == 1:  # one replica: exactly the service's own defaults
        defaults = ServerConfig()
        assert bound == defaults.data_plane_workers_per_identity
        assert (server.max_streams_per_identity, server.blocking_streams) == (
            defaults.max_streams_per_identity,
            defaults.blocking_streams,
        )
        assert (server.unary_calls_per_identity, server.max_workers) == (
            defaults.unary_calls_per_identity,
            defaults.max_workers,
        )
        assert server.control_plane_reserve == defaults.control_plane_reserve


ONE_REPLICAS_LOAD = DEFAULT_PARALLEL_PARTS * 2
"""The streams one inference replica holds while it loads: its parallel part fetches (4) x the
models it loads at once (2)."""


@pytest.mark.parametrize("replicas", [1, 2, 3, 8, 10, 40, 500])
def test_store_shares_a_fleets_streams_among_its_certificates(
    helm: str, tmp_path: Path, replicas: int
) -> None:
    """Every replica has the one inference SPIFFE ID, so one replica whose downloads stalled held
    the fleet's every stream at the store and starved the others' loads: with more than one,
    each certificate holds at most half of them, and the cap is large enough that the half still
    lets one replica load its models in parallel. A lone replica keeps them all (no share)."""
    server = _store_server(helm, tmp_path, f"inference.replicas={replicas}", *_room(replicas))
    streams = server.max_streams_per_identity
    if replicas == 1:
        assert server.max_streams_per_certificate is None
        assert streams == ServerConfig().max_streams_per_identity
        return
    assert server.max_streams_per_certificate == certificate_share(streams) == streams // 2
    assert server.max_streams_per_certificate >= ONE_REPLICAS_LOAD
    assert streams == max(2 * ONE_REPLICAS_LOAD, 2 * replicas)
    # What the stalling replica leaves the rest of the fleet is at least what it holds.
    assert streams - server.max_streams_per_certificate >= server.max_streams_per_certificate
    overridden = _store_server(
        helm,
        tmp_path,
        f"inference.replicas={replicas}",
        "modelstore.server.maxStreamsPerIdentity=30",
        *_room(replicas),
    )
    assert overridden.max_streams_per_certificate == 15  # half of the operator's cap


ONE_REPLICAS_UNARY_CALLS = 4
"""The unary calls one inference replica makes to the store beside its downloads while it loads
its 2 models: a StatModel or two per model (multi-part or not, then what changed)."""


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        # streams, unary calls, bound across kinds, workers; each certificate's streams, workers
        (1, (8, 13, 13, 32, None, None)),  # the service's own defaults, no share
        (2, (16, 24, 24, 43, 8, 12)),
        (8, (16, 24, 24, 43, 8, 12)),
        (40, (80, 80, 80, 104, 40, 40)),
    ],
)
def test_store_shares_a_fleets_data_plane_bound_among_its_certificates(
    helm: str, tmp_path: Path, replicas: int, expected: tuple[int | None, ...]
) -> None:
    """The store's chart set the stream share but no share of the data-plane bound, and blocking
    streams counted in no certificate's share: one replica held its 8 stalled downloads and 8
    unary waits, the whole bound of 16, and every other replica's loads were refused
    TOO_MANY_WORKERS_PER_IDENTITY. With more than one replica each certificate now holds at most
    half the bound, streams and unary calls together, and that half still holds one healthy
    replica's load; the unary cap is at least the bound, so that one certificate's unary calls
    leave the others half of it too. A lone replica keeps everything (no share)."""
    server = _store_server(helm, tmp_path, f"inference.replicas={replicas}")
    bound = server.data_plane_workers_per_identity
    got = (
        server.max_streams_per_identity,
        server.unary_calls_per_identity,
        bound,
        server.max_workers,
        server.max_streams_per_certificate,
        server.max_calls_per_certificate,
    )
    assert got == expected
    share = server.max_calls_per_certificate
    if share is None:
        return
    assert share == certificate_share(bound)
    # What one certificate holds, whatever it does, is at most what it leaves the others.
    assert bound - share >= share
    assert server.unary_calls_per_identity - share >= share
    # One healthy replica's load fits: its downloads in its stream share, and those with its
    # unary calls in its share of the bound.
    assert server.max_streams_per_certificate is not None
    assert server.max_streams_per_certificate >= ONE_REPLICAS_LOAD
    assert share >= ONE_REPLICAS_LOAD + ONE_REPLICAS_UNARY_CALLS
    # A bound the operator sets is halved the same way.
    overridden = _store_server(
        helm,
        tmp_path,
        f"inference.replicas={replicas}",
        "modelstore.server.maxDataPlaneWorkersPerIdentity=90",
    )
    assert overridden.max_calls_per_certificate == 45


def test_store_limits_are_operator_values(helm: str, tmp_path: Path) -> None:
    server = _store_server(
        helm,
        tmp_path,
        "inference.replicas=3",
        "modelstore.server.maxStreamsPerIdentity=24",
        "modelstore.server.maxUnaryCallsPerIdentity=12",
    )
    assert (server.max_streams_per_identity, server.unary_calls_per_identity) == (24, 12)
    # What was left null still derives, from the values given: the bound across kinds from the
    # larger cap (the service's own default, just under half the data plane, would be 21 and
    # hold the fleet's 24 downloads back).
    assert (server.blocking_streams, server.max_workers) == (32, 48)
    assert server.data_plane_workers_per_identity == 24
    assert server.max_streams_per_certificate == 12
    server = _store_server(
        helm,
        tmp_path,
        "modelstore.server.maxBlockingStreams=40",
        "modelstore.server.maxWorkers=64",
        "modelstore.server.controlPlaneWorkers=0",
    )
    assert (server.blocking_streams, server.max_workers) == (40, 64)
    assert server.control_plane_reserve == 0  # 0 is a value, not "derive"


@pytest.mark.parametrize(
    ("set_args", "message"),
    [
        (
            ("modelstore.server.maxWorkers=16",),
            "modelstore.server.maxBlockingStreams (16) must be below maxWorkers (16)",
        ),
        (
            ("modelstore.server.maxUnaryCallsPerIdentity=40", "modelstore.server.maxWorkers=40"),
            "modelstore.server.maxUnaryCallsPerIdentity (40) must be below the data-plane workers "
            "(maxWorkers 40 - controlPlaneWorkers 4 = 36)",
        ),
        (
            (
                "modelstore.server.maxDataPlaneWorkersPerIdentity=36",
                "modelstore.server.maxWorkers=40",
            ),
            "modelstore.server.maxDataPlaneWorkersPerIdentity (36) must be below the data-plane "
            "workers (maxWorkers 40 - controlPlaneWorkers 4 = 36)",
        ),
        (
            ("modelstore.server.controlPlaneWorkers=40", "modelstore.server.maxWorkers=40"),
            "modelstore.server.controlPlaneWorkers (40) must be below maxWorkers (40)",
        ),
        (
            ("modelstore.server.maxStreamsPerIdentity=1020",),
            "but the store allows at most 1024",
        ),
    ],
)
def test_store_limits_the_store_would_refuse_are_refused_at_render(
    helm: str, set_args: tuple[str, ...], message: str
) -> None:
    result = run_helm_template(helm, set_args=set_args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("value", ["0", "many", "1025"])
def test_store_limits_are_schema_typed(helm: str, value: str) -> None:
    result = run_helm_template(helm, set_args=(f"modelstore.server.maxWorkers={value}",))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr


def test_an_external_ca_without_egress_is_refused(helm: str) -> None:
    """With an external CA and no pki.externalCAEgress, the policies blocked every service's
    connection to the CA: no pod could enrol, and the chart rendered it."""
    external = ("stepCa.enabled=false", "pki.caURL=https://ca.example.internal")
    result = run_helm_template(helm, set_args=external)
    assert result.returncode != 0
    assert "pki.externalCAEgress is empty" in result.stderr, result.stderr
    assert "https://ca.example.internal" in result.stderr
    opened = (*external, "pki.externalCAEgress[0].cidr=192.0.2.10/32")
    assert render(helm, set_args=(*opened, "pki.externalCAEgress[0].port=9000"))
    # Without the chart's policies there is nothing of the chart's to block it.
    unpoliced = ("networkPolicy.enabled=false", "networkPolicy.externallyEnforced=true")
    assert render(helm, set_args=(*external, *unpoliced))


@pytest.mark.parametrize(
    ("setting", "refusal", "read_only"),
    [
        # Reading a cache that starts empty and that nothing can fill: every release refused
        # COLLATERAL_MISSING.
        ("keybroker.collateral.readOnly=true", "keybroker.collateral.readOnly is true but", True),
        # Air-gapped, the imported collateral vanished at every pod start: after each restart
        # every release was refused COLLATERAL_MISSING until someone imported it into that pod
        # again. (Development installs, whose init container refills the simulated chain's
        # collateral at every start, are not affected.)
        ("keybroker.collateral.fetch=false", "keybroker.collateral.fetch is false but", False),
    ],
)
def test_a_cache_nothing_refills_must_be_a_claim_that_outlives_the_pod(
    helm: str, setting: str, refusal: str, read_only: bool
) -> None:
    """A collateral cache that the broker does not fill itself, left the default per-pod
    emptyDir, rendered a broker that refused every release after each pod start."""
    result = run_helm_template(helm, set_args=(setting,))
    assert result.returncode != 0
    assert refusal in result.stderr, result.stderr
    assert "collateral.persistence.existingClaim" in result.stderr
    docs = render(
        helm, set_args=(setting, "keybroker.collateral.persistence.existingClaim=collateral")
    )
    (broker,) = [d for d in kind(docs, "Deployment") if _component(d) == "keybroker"]
    (volume,) = [
        v for v in broker["spec"]["template"]["spec"]["volumes"] if v["name"] == "collateral"
    ]
    assert volume["persistentVolumeClaim"] == {"claimName": "collateral", "readOnly": read_only}


@pytest.mark.parametrize("replicas", [1, 8, 40, 500])
def test_broker_unary_limit_scales_with_the_inference_fleet(
    helm: str, tmp_path: Path, replicas: int
) -> None:
    """Each inference replica asks the broker a challenge, then a release, per model it loads: the
    fixed 16 unary calls of the one inference identity refused a large fleet's cold start
    (TOO_MANY_UNARY_CALLS_PER_IDENTITY, each refusal audited) until it backed off."""
    server = server_section(
        helm, tmp_path, "keybroker", f"inference.replicas={replicas}", *_room(replicas)
    )
    assert server.unary_calls_per_identity >= 2 * replicas
    assert server.data_plane_workers_per_identity == server.unary_calls_per_identity
    # Threads for the others, and the reserve for key administration beside them.
    assert server.data_plane_workers - server.unary_calls_per_identity >= 15
    assert server.control_plane_reserve == 4
    # A fleet's replicas share the bound: each certificate holds at most half of it (one replica
    # stalling its releases held it all); a lone replica keeps it whole.
    bound = server.data_plane_workers_per_identity
    assert server.max_calls_per_certificate == (None if replicas == 1 else max(2, bound // 2))
    if replicas == 1:
        defaults = ServerConfig()
        assert (server.unary_calls_per_identity, server.max_workers) == (
            defaults.unary_calls_per_identity,
            defaults.max_workers,
        )
    overridden = server_section(
        helm, tmp_path, "keybroker", "keybroker.server.maxUnaryCallsPerIdentity=20"
    )
    assert (overridden.unary_calls_per_identity, overridden.max_workers) == (20, 39)
    refused = run_helm_template(helm, set_args=("keybroker.server.maxWorkers=16",))
    assert (
        "keybroker.server.maxUnaryCallsPerIdentity (13) must be below the data-plane workers "
        "(maxWorkers 16 - controlPlaneWorkers 4 = 12)"
    ) in refused.stderr


def _grant_limits(helm: str, tmp_path: Path, *set_args: str) -> GrantLimits:
    """The release grant budget as the broker loads it from the chart rendered with
    ``set_args``."""
    (cm,) = [
        c
        for c in kind(render(helm, set_args=set_args), "ConfigMap")
        if _component(c) == "keybroker" and "config.yaml" in c.get("data", {})
    ]
    path = tmp_path / "keybroker.yaml"
    path.write_text(cm["data"]["config.yaml"])
    _, section = load_service_config(path, "keybroker", KeybrokerConfig, environ={})
    assert isinstance(section, KeybrokerConfig)
    return section.grant_limits()


def _models(count: int) -> tuple[str, ...]:
    """``--set`` arguments listing ``count`` start-up models."""
    return tuple(
        arg
        for i in range(count)
        for arg in (f"inference.models[{i}].name=m{i}", f"inference.models[{i}].version=v1")
    )


@pytest.mark.parametrize(
    ("fleet", "models", "burst", "rate"),
    [
        (("inference.replicas=1",), 0, 1024, 8.0),  # the service's own defaults
        (("inference.replicas=120",), 0, 1024, 8.0),
        (("inference.replicas=256",), 0, 1024, 18.0),
        (("inference.replicas=257",), 0, 1028, 18.0),
        (("inference.replicas=500",), 0, 2000, 34.0),
        (("inference.replicas=300",), 6, 1800, 30.0),  # more models than 4 listed
        (
            (
                "inference.replicas=3",
                "inference.autoscaling.enabled=true",
                "inference.autoscaling.maxReplicas=500",
            ),
            0,
            2000,
            34.0,
        ),
    ],
)
def test_identity_release_budget_scales_with_the_inference_fleet(
    helm: str, tmp_path: Path, fleet: tuple[str, ...], models: int, burst: int, rate: float
) -> None:
    """Every inference replica releases a key per model it loads, all as the one SPIFFE ID: the
    chart's fixed 1,024 grants at once refused the cold start of a fleet past 256 replicas x 4
    models (RELEASES_RATE_LIMITED), while the unary-call limits beside it grew with the fleet. The
    identity's budget now holds the largest fleet's cold start (R x M, M the listed models, at
    least 4) and its reloading every model every minute; the certificate's stays one replica's."""
    room = ("modelstore.resources.limits.memory=5Gi",)
    limits = _grant_limits(helm, tmp_path, *fleet, *room, *_models(models))
    assert (limits.identity_burst, limits.identity_rate) == (burst, rate)
    assert (limits.certificate_burst, limits.certificate_rate) == (64, 1.0)
    # What an operator sets is kept, the other value still derived.
    limits = _grant_limits(
        helm, tmp_path, *fleet, *room, *_models(models), "keybroker.releaseBudget.identity.burst=7"
    )
    assert (limits.identity_burst, limits.identity_rate) == (7, rate)


@pytest.mark.parametrize(
    ("memory", "cap", "responses", "refused"),
    [
        ("2Gi", None, None, True),  # the default cap (2 GiB) is the whole limit
        ("3758096383", None, None, True),  # a byte short of the cap + the budget + 512 MiB
        ("2.5Gi", None, None, True),  # the old floor: the default response budget left out
        ("3.5Gi", None, None, False),
        ("2.5Gi", None, "16777216", True),
        ("2Gi", "1073741824", "536870912", False),  # the development values'
        ("2Gi", "1073741824", None, True),
    ],
)
def test_the_inference_memory_cap_and_response_budget_must_fit_below_the_pods_memory_limit(
    helm: str, memory: str, cap: str | None, responses: str | None, refused: bool
) -> None:
    """ONNX Runtime's cap on what inference runs hold (default 2 GiB) rendered under any pod
    memory limit, the development values' 2Gi included: the pod was OOM-killed by the request
    the cap was meant to refuse. The chart wants 512 MiB above the cap and the budget of what
    responses hold outside it (default 1 GiB) together, and names the least limit."""
    set_args: tuple[str, ...] = (f"inference.resources.limits.memory={memory}",)
    if cap is not None:
        set_args += (f"inference.maxInferenceMemoryBytes={cap}",)
    if responses is not None:
        set_args += (f"inference.maxResponseMemoryBytes={responses}",)
    result = run_helm_template(helm, set_args=set_args)
    if refused:
        assert result.returncode != 0
        assert "inference.resources.limits.memory" in result.stderr, result.stderr
        assert "maxInferenceMemoryBytes" in result.stderr
        assert "maxResponseMemoryBytes" in result.stderr
        # The chart's fallbacks for null are the service's own defaults (it spells them again):
        # a default changed in one place only would let a pod below the floor render.
        least = (
            int(cap or DEFAULT_MAX_INFERENCE_MEMORY_BYTES)
            + int(responses or DEFAULT_MAX_RESPONSE_MEMORY_BYTES)
            + (512 << 20)
        )
        assert f"at least {least} bytes" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
