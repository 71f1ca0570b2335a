"""Rendered Helm chart: hardening, probes, resources, secrets handling, configuration, scheduling."""

from __future__ import annotations

import base64
import datetime as dt
import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from strongroom.attestation.release_keys import NOT_BEFORE_LEEWAY, load_trusted_keys
from strongroom.attestation.release_signature import ReleaseVerifier, signing_key_id
from strongroom.attestation.release_signature import load_signing_key as load_release_key
from strongroom.cli.main import build_parser
from strongroom.inference.config import InferenceConfig
from strongroom.keybroker.audit import load_signing_key
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.keybroker.grant_budget import GrantLimits
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.runtime.bootstrap import STOP_MARGIN_SECONDS, stop_seconds
from strongroom.runtime.config import SERVICES, load_service_config
from strongroom.runtime.secrets import Secret
from tests.certs import self_signed_pem
from tests.deploy.conftest import (
    CHART,
    DEPLOY,
    MINIMAL,
    VALUES_SETS,
    kind,
    render,
    run_helm_template,
    schema_nodes,
)

SECTION_CLASSES: dict[str, type[Any]] = {
    "keybroker": KeybrokerConfig,
    "modelstore": ModelstoreConfig,
    "inference": InferenceConfig,
}
SECRETISH = re.compile(r"PIN|PASSW|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
# Environment names that match SECRETISH but carry no secret (checked: values are IDs/durations).
NOT_SECRET_ENV = {"TOKEN_SPIFFE_ID", "TOKEN_DNS", "TOKEN_LIFETIME"}


def containers(dep: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = dep["spec"]["template"]["spec"]
    return [("init", c) for c in spec.get("initContainers", [])] + [
        ("main", c) for c in spec["containers"]
    ]


def component(dep: dict[str, Any]) -> str:
    return str(dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def test_every_deployment_pod_is_hardened(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deployments = kind(docs, "Deployment")
    assert {component(d) for d in deployments} >= set(SERVICES)
    for dep in deployments:
        spec = dep["spec"]["template"]["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] != 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host_ns), host_ns
        for where, c in containers(dep):
            sc = c["securityContext"]
            name = f"{component(dep)}/{where}/{c['name']}"
            assert sc["runAsNonRoot"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            added = sc["capabilities"].get("add", [])
            # Only the official step-ca binary needs a capability kept in the bounding set (see values).
            assert added in ([], ["NET_BIND_SERVICE"]), name
            if added:
                assert (component(dep), c["name"]) == ("step-ca", "step-ca"), name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name


def test_every_container_has_requests_and_limits(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for dep in kind(docs, "Deployment"):
        for where, c in containers(dep):
            res = c["resources"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[section]), f"{c['name']} ({where}) {section}"


def test_services_have_grpc_probes_on_the_health_port(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    for dep in kind(docs, "Deployment"):
        for where, c in containers(dep):
            if where != "main":
                continue
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{c['name']} has no {probe}"
            if c["name"] in SERVICES:
                # Readiness: the overall status. Liveness: strongroom.Liveness, independent of models
                # and HSM, so an outage makes the pod unready, not restarted.
                assert c["readinessProbe"]["grpc"] == {"port": 8081}, c["name"]
                live: dict[str, object] = {"port": 8081, "service": "strongroom.Liveness"}
                for probe in ("startupProbe", "livenessProbe"):
                    assert c[probe]["grpc"] == live, (c["name"], probe)
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert ports == {"grpc": 7443, "health": 8081}
            elif c["name"] == "step-ca":
                assert c["livenessProbe"]["httpGet"]["path"] == "/health"


def test_services_expose_only_the_mtls_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for svc in kind(docs, "Service"):
        ports = [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]]
        if svc["metadata"]["name"] == "step-ca":
            assert ports == [(9000, "https")]
        else:
            assert ports == [(7443, "grpc")], svc["metadata"]["name"]
        if svc["metadata"]["name"] != "inference":
            assert svc["spec"]["type"] == "ClusterIP"


def test_every_deployment_has_a_disruption_budget(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    budgets = [p["spec"]["selector"]["matchLabels"] for p in kind(docs, "PodDisruptionBudget")]
    for dep in kind(docs, "Deployment"):
        assert dep["spec"]["selector"]["matchLabels"] in budgets, component(dep)


def test_every_service_pod_is_given_the_longest_stop_before_it_is_killed(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The kubelet kills a pod ``terminationGracePeriodSeconds`` after its SIGTERM: the key
    broker's and inference's 30 s were less than the calls' grace (20 s), the handlers' drain
    (5 s), the close once calls were abandoned (3 s) and the log's flush (5 s), so a stop that
    used them all was killed before its log's last lines were written. Each service's pod now
    waits its longest stop (its grace as the service loads it from the rendered configuration)
    and a margin."""
    _, docs = rendered
    configs = _configs(docs)
    for service in SERVICES:
        path = tmp_path / f"{service}.yaml"
        path.write_text(configs[service])
        common, _ = load_service_config(path, service, SECTION_CLASSES[service], environ={})
        (dep,) = [d for d in kind(docs, "Deployment") if component(d) == service]
        waits = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert waits >= stop_seconds(common.server) + STOP_MARGIN_SECONDS, service


def test_no_secret_in_plain_environment_values(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for dep in kind(docs, "Deployment"):
        for _where, c in containers(dep):
            for env in c.get("env", []):
                if "valueFrom" in env:
                    ref = env["valueFrom"]
                    assert set(ref) <= {"secretKeyRef", "fieldRef"}, env
                    continue
                name, value = env["name"], str(env.get("value", ""))
                if SECRETISH.search(name) and name not in NOT_SECRET_ENV:
                    assert value.startswith("/"), f"{c['name']}: {name} holds a literal, not a path"
            assert not c.get("envFrom"), "envFrom would import a whole Secret or ConfigMap"


def test_generated_secret_values_appear_nowhere_else(helm: str, tmp_path: Path) -> None:
    docs = render(helm)
    (secret,) = [s for s in kind(docs, "Secret")]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"hsm-pin", "hsm-so-pin", "nonce-key", "audit-key", "release-signing-key"}
    assert len(data["nonce-key"]) == 32
    assert len(data["hsm-pin"]) >= 16
    # The broker's own loader accepts the generated audit signing key.
    load_signing_key(Secret(data["audit-key"]))
    # And the release-signing key, whose public half inference reads from a ConfigMap of its own
    # (a certificate over it: Helm cannot print a public key), never from the broker's Secret.
    release_key = load_release_key(data["release-signing-key"])
    (public,) = [
        c for c in kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-release-signing")
    ]
    path = tmp_path / "release-signing-keys.pem"
    path.write_text(public["data"]["release-signing-keys.pem"])
    assert ReleaseVerifier.from_files([path]).key_ids == (signing_key_id(release_key.public_key()),)
    # Inference trusts it within the certificate's dates: a century from this render.
    (trusted,) = load_trusted_keys(path.read_bytes(), source=str(path))
    assert trusted.not_before is not None and trusted.not_after is not None
    assert abs(trusted.not_before - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1)
    assert trusted.not_after - trusted.not_before == dt.timedelta(days=36500)
    # Dated by the clock of the machine running Helm: a pod whose clock is more than
    # NOT_BEFORE_LEEWAY behind it refuses every answer until it catches up (deploy/README).
    assert trusted.refusal(trusted.not_before - NOT_BEFORE_LEEWAY) is None
    behind = trusted.refusal(trusted.not_before - NOT_BEFORE_LEEWAY - dt.timedelta(seconds=1))
    assert behind is not None and behind.reason == "RELEASE_SIGNING_KEY_NOT_YET_VALID"
    others = yaml.safe_dump_all([d for d in docs if d is not secret])
    for value in secret["data"].values():
        assert value not in others


def test_service_secrets_are_mounted_only_where_needed(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    # The provisioner key is for the bootstrap init container; the services see the root cert only.
    _, docs = rendered
    for dep in kind(docs, "Deployment"):
        for where, c in containers(dep):
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            if "provisioner" in mounts:
                assert (where, c["name"]) == ("init", "bootstrap")
            if "secrets-src" in mounts:
                assert (where, c["name"]) == ("init", "bootstrap")
            if "hsm-init" in mounts:
                assert (where, c["name"]) == ("init", "softhsm-init")
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        if "pki" in volumes:
            assert volumes["pki"]["secret"]["items"] == [
                {"key": "root_ca.crt", "path": "root_ca.crt"}
            ]
        for v in volumes.values():
            assert "hostPath" not in v, f"{component(dep)} mounts a hostPath"


#: Settings naming a file a service loads as a secret (``Secret.load``: refused unless private).
SECRET_FILE_SETTING = re.compile(
    r"^(token|pin|nonce_key|audit_key|access_key_id|secret_access_key)_file$"
)


def _secret_file_settings(node: Any, where: str = "") -> list[tuple[str, str]]:
    """(setting, path) of every secret file a rendered service configuration names."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if SECRET_FILE_SETTING.match(str(key)) and isinstance(value, str):
                found.append((f"{where}{key}", value))
            else:
                found += _secret_file_settings(value, f"{where}{key}.")
    return found


def test_every_secret_file_a_service_loads_is_the_init_containers_private_copy(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """The kubelet writes a Secret volume's files root-owned, and with the pod's fsGroup adds the
    group's read bit (0400 becomes 0440): the service (uid 10001) then either cannot read them or
    refuses them as not private (``Secret.load``). So every secret file a service's configuration
    names must be one the bootstrap init container wrote (its ``COPY_FILES`` destinations, 0600
    and the service's own, or its token) on a memory emptyDir. The model store's S3 key pair was
    mounted straight from its Secret: with the s3 backend (the production values) every store
    replica refused to start."""
    name, docs = rendered
    configs = _configs(docs)
    checked = 0
    for dep in kind(docs, "Deployment"):
        service = component(dep)
        if service not in SERVICES:
            continue
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (init,) = [c for c in pod["initContainers"] if c["name"] == "bootstrap"]
        env = {e["name"]: e.get("value", "") for e in init["env"]}
        written = {pair.split("=", 1)[1] for pair in env["COPY_FILES"].split()}
        written.add(env["TOKEN_FILE"])
        (main,) = [c for c in pod["containers"] if c["name"] == service]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        for setting, path in _secret_file_settings(yaml.safe_load(configs[service])):
            where = f"{name}: {service} {setting} {path}"
            mount = max((m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len)
            volume = volumes[mounts[mount]]
            assert volume.get("emptyDir", {}).get("medium") == "Memory", (
                f"{where} is on volume {mounts[mount]} ({sorted(set(volume) - {'name'})}), "
                "not a private copy in memory"
            )
            assert path in written, f"{where}: the bootstrap init container does not write it"
            checked += 1
    assert checked >= 6, checked  # the broker's three, and each service's token


def test_each_pod_mounts_only_its_own_provisioner_secret(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    # Each service's provisioner issues only that service's identity; a pod (and so its node)
    # must see no other service's provisioner, and the operator's unrestricted one in no pod.
    values_set, docs = rendered
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for extra in VALUES_SETS[values_set]:
        values["pki"].update(yaml.safe_load(extra.read_text()).get("pki", {}))
    own = values["pki"]["provisionerSecrets"]
    assert set(own) == set(SERVICES) and len(set(own.values())) == len(own)
    for dep in kind(docs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        mounted = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert "strongroom-pki-provisioner" not in mounted  # the former shared, unrestricted one
        provisioners = mounted & set(own.values())
        if component(dep) in SERVICES:
            assert provisioners == {own[component(dep)]}, component(dep)
        else:
            assert not provisioners, component(dep)


def test_an_operators_secret_needs_the_release_signing_public_key(helm: str) -> None:
    """With the operator's Secret the chart cannot know the release-signing key's public half:
    inference would refuse every release answer (or, before, verify none)."""
    result = run_helm_template(helm, set_args=("keybroker.secrets.existingSecret=kb-secrets",))
    assert result.returncode != 0
    assert "inference.releaseSigning.publicKeys is required" in result.stderr


def test_an_operators_release_signing_certificate_is_taken_with_its_dates(
    helm: str, tmp_path: Path
) -> None:
    """A certificate bounds a release-signing key's life (strongroom.attestation.release_keys),
    but the schema took PUBLIC KEY blocks only: an operator's Secret could not have a key that
    expires. A certificate (here beside a bare key, as while a key is rotated) is published to
    inference as given, and read with its dates."""
    ends = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    certificate = self_signed_pem(
        Ed25519PrivateKey.generate(), "release-signing 2030", not_after=ends
    ).decode()
    bundle = certificate + RELEASE_PUBLIC_PEM
    docs = render(
        helm,
        set_args=(
            "keybroker.secrets.existingSecret=kb-secrets",
            f"inference.releaseSigning.publicKeys={bundle}",
        ),
    )
    (public,) = [
        c for c in kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-release-signing")
    ]
    path = tmp_path / "release-signing-keys.pem"
    path.write_text(public["data"]["release-signing-keys.pem"])
    assert [key.not_after for key in load_trusted_keys(path.read_bytes(), source="x")] == [
        ends,
        None,
    ]


def test_services_sharing_a_provisioner_secret_are_refused(helm: str) -> None:
    result = run_helm_template(
        helm, set_args=("pki.provisionerSecrets.inference=strongroom-pki-keybroker",)
    )
    assert result.returncode != 0
    assert "each service needs its own" in result.stderr


def test_the_single_provisioner_secret_value_is_gone(helm: str) -> None:
    # An old values file naming one Secret for every pod fails the schema instead of being ignored.
    result = run_helm_template(helm, set_args=("pki.provisionerSecret=strongroom-pki-provisioner",))
    assert result.returncode != 0
    assert "provisionerSecret" in result.stderr


def _configs(docs: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for cm in kind(docs, "ConfigMap"):
        labels = cm["metadata"]["labels"]
        service = labels["app.kubernetes.io/component"]
        if (
            service in SERVICES
            and cm["metadata"]["name"].endswith(service)
            and "config.yaml" in cm["data"]
        ):
            out[service] = cm["data"]["config.yaml"]
    return out


def test_rendered_configs_load_with_the_service_runtime(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    values_set, docs = rendered
    configs = _configs(docs)
    assert set(configs) == set(SERVICES)
    for service, text in configs.items():
        path = tmp_path / f"{service}.yaml"
        path.write_text(text)
        common, section = load_service_config(path, service, SECTION_CLASSES[service], environ={})
        assert common.service == service
        assert common.listen == "0.0.0.0:7443" and common.health_listen == "0.0.0.0:8081"
        assert common.mode == ("development" if values_set == "development" else "production")
        assert common.identity.token_file == Path(f"/run/strongroom/bootstrap/{service}.token")
        if isinstance(section, KeybrokerConfig):
            assert section.pin_file == Path("/run/secrets/hsm-pin")
            assert section.audit_key_file == Path("/run/secrets/audit-key")
            assert section.allow_simulated_tee is (values_set == "development")
            assert (
                section.hsm_recycle_after_operations == 2000
            )  # the chart's and the code's default
            assert section.grant_limits() == GrantLimits()  # the chart's are the code's
        if isinstance(section, InferenceConfig):
            assert section.attester == ("simulated" if values_set == "development" else "auto")
            assert section.key_broker == "keybroker:7443"
            assert section.key_broker_server_name == "keybroker"
            named_keys = [str(p) for p in section.release_signing_public_keys]
            assert named_keys == ["/etc/strongroom/release-signing/release-signing-keys.pem"]
        # Every path the configuration names is in the image (/usr) or on one of the pod's mounts.
        (dep,) = [d for d in kind(docs, "Deployment") if component(d) == service]
        (main,) = [c for w, c in containers(dep) if w == "main" and c["name"] == service]
        mounts = [m["mountPath"] for m in main["volumeMounts"]]
        named = [str(v) for v in vars(section).values() if isinstance(v, Path)]
        named += [
            str(p)
            for v in vars(section).values()
            if isinstance(v, tuple)
            for p in v
            if isinstance(p, Path)
        ]
        for where in named:
            assert where.startswith("/usr/") or any(
                where == m or where.startswith(m.rstrip("/") + "/") for m in mounts
            ), (service, where)


def test_enrolment_token_matches_the_service_identity(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    # The CA signs only a CSR whose SANs equal the token's: the init container must mint for
    # exactly the SPIFFE ID and DNS names the service's configuration will request.
    _, docs = rendered
    configs = {k: yaml.safe_load(v) for k, v in _configs(docs).items()}
    for dep in kind(docs, "Deployment"):
        service = component(dep)
        if service not in SERVICES:
            continue
        (boot,) = [c for w, c in containers(dep) if w == "init" and c["name"] == "bootstrap"]
        env = {e["name"]: e.get("value") for e in boot["env"]}
        identity = configs[service]["identity"]
        assert env["TOKEN_SPIFFE_ID"] == identity["spiffe_id"]
        assert env["TOKEN_DNS"].split() == identity["dns_names"]
        assert env["TOKEN_FILE"] == identity["token_file"]


def test_container_commands_parse_with_the_cli(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    parser = build_parser()
    for dep in kind(docs, "Deployment"):
        for where, c in containers(dep):
            if where == "main" and c["name"] in SERVICES:
                args = parser.parse_args(c["args"])
                assert (args.command, args.service) == ("serve", c["name"])
                assert str(args.config) == "/etc/strongroom/config.yaml"


def test_production_values_schedule_and_scale_as_documented(helm: str) -> None:
    docs = render(helm, VALUES_SETS["production"])
    deps = {component(d): d for d in kind(docs, "Deployment")}
    assert "step-ca" not in deps  # external CA
    inference = deps["inference"]["spec"]
    pod = inference["template"]["spec"]
    assert inference["replicas"] == 3
    assert pod["runtimeClassName"] == "kata-qemu-snp"
    assert pod["nodeSelector"] == {"strongroom.io/confidential": "sev-snp"}
    assert pod["tolerations"][0]["key"] == "strongroom.io/confidential"
    assert {t["topologyKey"] for t in pod["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    broker = deps["keybroker"]["spec"]
    assert broker["replicas"] == 3
    images = [c["image"] for _w, c in containers(deps["keybroker"])]
    assert not any(i.endswith("-softhsm") for i in images)
    names = [c["name"] for _w, c in containers(deps["keybroker"])]
    assert names == ["bootstrap", "hsm-library", "keybroker", "audit-shipper"]
    assert not kind(docs, "Secret")  # every secret is operator-provided in production
    config = yaml.safe_load(_configs(docs)["keybroker"])
    assert config["keybroker"]["pkcs11_module"] == "/opt/hsm/lib/libvendor-pkcs11.so"


def test_default_values_use_the_development_hsm_with_one_replica(helm: str) -> None:
    docs = render(helm)
    (broker,) = [d for d in kind(docs, "Deployment") if component(d) == "keybroker"]
    assert broker["spec"]["replicas"] == 1
    assert broker["spec"]["strategy"]["type"] == "Recreate"
    init = [c["name"] for w, c in containers(broker) if w == "init"]
    assert init == ["bootstrap", "softhsm-init"]
    (main,) = [c for w, c in containers(broker) if w == "main"]
    assert main["image"].endswith("-softhsm")
    assert {"name": "SOFTHSM2_CONF", "value": "/etc/strongroom/softhsm2.conf"} in main["env"]
    pvcs = {p["metadata"]["name"]: p for p in kind(docs, "PersistentVolumeClaim")}
    for pvc in pvcs.values():
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_images_are_pinned(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for dep in kind(docs, "Deployment"):
        for _where, c in containers(dep):
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[A-Za-z0-9_][A-Za-z0-9_.-]*$", image), image
            assert not image.endswith(":latest"), image


def test_invalid_values_files_are_rejected_for_their_stated_reason(helm: str) -> None:
    files = sorted((DEPLOY / "helm" / "tests").glob("*.yaml"))
    assert (DEPLOY / "helm" / "tests" / "invalid-values.yaml") in files
    assert len(files) >= 10
    for f in files:
        text = f.read_text()
        # What a draft-07 schema cannot say (one value above another) the chart refuses while
        # rendering the file on top of the minimal values (deploy/check.sh does the same).
        at_render = re.search(r"^# refused-at-render: (.+)$", text, re.MULTILINE)
        if at_render:
            result = run_helm_template(helm, (*MINIMAL, f))
            assert result.returncode != 0, f"{f.name} was accepted"
            assert at_render.group(1) in result.stderr, (f.name, result.stderr)
            continue
        expect = re.search(r"^# expect: (.+)$", text, re.MULTILINE)
        assert expect, f"{f.name} must state the error it expects"
        result = run_helm_template(helm, (f,))
        assert result.returncode != 0, f"{f.name} was accepted"
        assert "values don't meet the specifications of the schema" in result.stderr, f.name
        assert expect.group(1) in result.stderr, (f.name, result.stderr)


def test_schema_is_strict_everywhere() -> None:
    # Every object in the schema either closes its properties or constrains its values.
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    for where, node in schema_nodes(schema):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, where


@pytest.mark.parametrize("override", ["keybroker.hsm.softhsm.persistence.existingClaim=hsm-pvc"])
def test_existing_claims_are_used_instead_of_new_ones(helm: str, override: str) -> None:
    docs = render(helm, set_args=(override,))
    assert "sr-strongroom-softhsm" not in {
        p["metadata"]["name"] for p in kind(docs, "PersistentVolumeClaim")
    }
    (broker,) = [d for d in kind(docs, "Deployment") if component(d) == "keybroker"]
    vols = {v["name"]: v for v in broker["spec"]["template"]["spec"]["volumes"]}
    assert vols["softhsm-tokens"]["persistentVolumeClaim"]["claimName"] == "hsm-pvc"


#: The public half of an operator's release-signing key (with keybroker.secrets.existingSecret).
RELEASE_PUBLIC_PEM = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
OPTION_SETS = {
    "external-ca": (
        "stepCa.enabled=false",
        "pki.caURL=https://ca.example.internal",
        "pki.externalCAEgress[0].cidr=192.0.2.10/32",
        "pki.externalCAEgress[0].port=443",
    ),
    "hsm-from-host": (
        "keybroker.hsm.type=pkcs11",
        "keybroker.hsm.pkcs11.modulePath=/opt/hsm/libvendor.so",
        "keybroker.hsm.pkcs11.library.hostPath=/opt/vendor-hsm",
        "keybroker.hsm.pkcs11.egress[0].cidr=10.30.0.0/28",
        "keybroker.hsm.pkcs11.egress[0].port=1792",
        "keybroker.secrets.existingSecret=broker-secrets",
        f"inference.releaseSigning.publicKeys={RELEASE_PUBLIC_PEM}",
        "keybroker.replicas=2",
    ),
    "tracing-and-exposure": (
        "observability.otlpEndpoint=https://collector.obs:4317",
        "observability.collector.podSelector.matchLabels.app=collector",
        "inference.service.type=LoadBalancer",
        "inference.service.loadBalancerSourceRanges[0]=10.0.0.0/8",
        "inference.confidential.runtimeClassName=kata-qemu-tdx",
        "inference.confidential.deviceResources.tdx\\.intel\\.com/guest=1",
        "inference.replicas=4",
    ),
}


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_option_combinations_render_valid_manifests(helm: str, option_set: str) -> None:
    docs = render(helm, set_args=OPTION_SETS[option_set])
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    deps = {component(d): d for d in kind(docs, "Deployment")}
    if option_set == "external-ca":
        assert "step-ca" not in deps
        for service in SERVICES:
            identity = yaml.safe_load(_configs(docs)[service])["identity"]
            assert identity["ca_url"] == "https://ca.example.internal"
    if option_set == "hsm-from-host":
        pod = deps["keybroker"]["spec"]["template"]["spec"]
        (lib,) = [v for v in pod["volumes"] if v["name"] == "hsm-library"]
        assert lib["hostPath"] == {"path": "/opt/vendor-hsm", "type": "Directory"}
        assert deps["keybroker"]["spec"]["strategy"]["type"] == "RollingUpdate"
        assert not [c for c in pod["initContainers"] if c["name"] == "softhsm-init"]
        (public,) = [
            c for c in kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-release-signing")
        ]
        assert public["data"]["release-signing-keys.pem"].strip() == RELEASE_PUBLIC_PEM.strip()
    if option_set == "tracing-and-exposure":
        pod = deps["inference"]["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "kata-qemu-tdx"
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["tdx.intel.com/guest"] == 1
        (svc,) = [s for s in kind(docs, "Service") if s["metadata"]["name"] == "inference"]
        assert svc["spec"]["type"] == "LoadBalancer"
        for service in SERVICES:
            assert "tracing" in yaml.safe_load(_configs(docs)[service])


def test_hsm_recycling_is_an_operator_value(helm: str, tmp_path: Path) -> None:
    """``keybroker.hsm.recycleAfterOperations`` reaches the broker's configuration (0: never)."""
    docs = render(helm, set_args=("keybroker.hsm.recycleAfterOperations=0",))
    path = tmp_path / "keybroker.yaml"
    path.write_text(_configs(docs)["keybroker"])
    _, section = load_service_config(path, "keybroker", KeybrokerConfig, environ={})
    assert isinstance(section, KeybrokerConfig)
    assert section.hsm_recycle_after_operations == 0


def test_the_release_grant_budget_is_an_operator_value(helm: str, tmp_path: Path) -> None:
    """``keybroker.releaseBudget`` reaches the broker's configuration (a larger fleet's). From a
    values file: ``--set`` reads a fractional rate as a string, which the schema refuses."""
    values = tmp_path / "budget.yaml"
    values.write_text(
        "keybroker:\n  releaseBudget:\n    certificate: {burst: 128, rate: 0.5}\n"
        "    identity: {burst: 8192, rate: 64}\n"
    )
    docs = render(helm, (*MINIMAL, values))
    path = tmp_path / "keybroker.yaml"
    path.write_text(_configs(docs)["keybroker"])
    _, section = load_service_config(path, "keybroker", KeybrokerConfig, environ={})
    assert isinstance(section, KeybrokerConfig)
    assert section.grant_limits() == GrantLimits(
        certificate_burst=128, certificate_rate=0.5, identity_burst=8192, identity_rate=64.0
    )


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", 0), ("2", 2)])
def test_the_attester_privlevel_is_an_operator_value(
    helm: str, tmp_path: Path, value: str | None, expected: int | None
) -> None:
    """``inference.attesterPrivlevel`` reaches ``inference.attester_privlevel`` (null: unset,
    the kernel's default; 0 is a level, not "unset")."""
    set_args = () if value is None else (f"inference.attesterPrivlevel={value}",)
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert section.attester_privlevel == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 2 << 30), ("17179869184", 16 << 30), ("16777216", 16 << 20)]
)
def test_the_inference_memory_cap_is_an_operator_value(
    helm: str, tmp_path: Path, value: str | None, expected: int
) -> None:
    """``inference.maxInferenceMemoryBytes`` reaches ``inference.max_inference_memory_bytes``
    (null: the service's default), without a float's rounding for large values (under a pod
    memory limit that leaves room above it)."""
    set_args: tuple[str, ...] = ("inference.resources.limits.memory=18Gi",)
    if value is not None:
        set_args += (f"inference.maxInferenceMemoryBytes={value}",)
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert section.max_inference_memory_bytes == expected


@pytest.mark.parametrize(
    ("set_args", "expected"),
    [
        ((), (1 << 30, 5.0)),
        (
            (
                "inference.maxResponseMemoryBytes=17179869184",
                "inference.responseMemoryWaitSeconds=30",
            ),
            (16 << 30, 30.0),
        ),
    ],
)
def test_the_response_memory_budget_is_an_operator_value(
    helm: str, tmp_path: Path, set_args: tuple[str, ...], expected: tuple[int, float]
) -> None:
    """``inference.maxResponseMemoryBytes`` and ``responseMemoryWaitSeconds`` reach
    ``inference.max_response_memory_bytes`` and ``response_memory_wait_seconds`` (null: the
    service's defaults), without a float's rounding for large values."""
    path = tmp_path / "inference.yaml"
    rendered = render(helm, set_args=("inference.resources.limits.memory=19Gi", *set_args))
    path.write_text(_configs(rendered)["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert (section.max_response_memory_bytes, section.response_memory_wait_seconds) == expected


@pytest.mark.parametrize(
    ("set_args", "models", "everyone"),
    [
        ((), (), False),
        (("inference.stringExpansionModels={tenant-a/,solo}",), ("tenant-a/", "solo"), False),
        (("inference.allowStringExpansion=true",), (), True),
    ],
)
def test_models_let_through_the_string_check_are_operator_values(
    helm: str, tmp_path: Path, set_args: tuple[str, ...], models: tuple[str, ...], everyone: bool
) -> None:
    """``inference.stringExpansionModels`` and ``allowStringExpansion`` reach the service's
    ``string_expansion_models`` and ``allow_string_expansion`` (by default: none, false)."""
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert section.string_expansion_models == models
    assert section.allow_string_expansion is everyone


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("false", False), ("true", True)])
def test_uncapped_operators_are_an_operator_value(
    helm: str, tmp_path: Path, value: str | None, expected: bool
) -> None:
    """``inference.allowUncappedOperators`` reaches ``inference.allow_uncapped_operators`` and,
    through the service's settings, every session's options (off by default)."""
    set_args = () if value is None else (f"inference.allowUncappedOperators={value}",)
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert section.runtime.allow_uncapped_operators is expected


@pytest.mark.parametrize(("value", "expected"), [(None, 100_000), ("5000", 5000)])
def test_the_graph_node_budget_is_an_operator_value(
    helm: str, tmp_path: Path, value: str | None, expected: int
) -> None:
    """``inference.maxGraphNodes`` reaches ``inference.max_graph_nodes`` and every session's
    options (the service's default when null)."""
    set_args = () if value is None else (f"inference.maxGraphNodes={value}",)
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert section.runtime.max_graph_nodes == expected


@pytest.mark.parametrize(
    ("set_args", "expected"),
    [
        ((), (30.0, 300.0)),
        (("inference.failedLoadRetrySeconds=0",), (0.0, 300.0)),
        (
            ("inference.failedLoadRetrySeconds=60", "inference.failedLoadRetryMaxSeconds=900"),
            (60.0, 900.0),
        ),
    ],
)
def test_the_slow_load_retries_are_operator_values(
    helm: str, tmp_path: Path, set_args: tuple[str, ...], expected: tuple[float, float]
) -> None:
    """``inference.failedLoadRetrySeconds`` and ``failedLoadRetryMaxSeconds`` reach the service's
    ``failed_load_retry_seconds`` and ``failed_load_retry_max_seconds`` (its defaults when null;
    0 turns the retries of failures that are not transient off)."""
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    assert (section.failed_load_retry_seconds, section.failed_load_retry_max_seconds) == expected


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("false", False), ("true", True)])
def test_the_unbound_upload_window_is_an_operator_value(
    helm: str, tmp_path: Path, value: str | None, expected: bool
) -> None:
    """``modelstore.acceptUnboundUploads`` reaches ``modelstore.accept_unbound_uploads`` (off
    unless set: a migration window)."""
    set_args = () if value is None else (f"modelstore.acceptUnboundUploads={value}",)
    path = tmp_path / "modelstore.yaml"
    path.write_text(_configs(render(helm, set_args=set_args))["modelstore"])
    _, section = load_service_config(path, "modelstore", ModelstoreConfig, environ={})
    assert isinstance(section, ModelstoreConfig)
    assert section.accept_unbound_uploads is expected


def test_inference_trust_pins_are_operator_values(helm: str, tmp_path: Path) -> None:
    """Header pins, model keys, client scopes and model signing reach the inference
    configuration from Helm values, under the names the service accepts (``tenant/`` names, ``+build`` versions)."""
    public_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "inference": {
                    "models": [
                        {
                            "name": "tenant-a/fraud",
                            "version": "1.4.0+b7",
                            "header_sha256": "ab" * 32,
                        }
                    ],
                    "modelKeys": [{"keyId": "tenant-a-kek", "modelNames": ["tenant-a/", "m"]}],
                    "clientModels": [
                        {
                            "spiffeId": "spiffe://example.org/tenant-a-app",
                            "modelNames": ["tenant-a/"],
                        }
                    ],
                    "modelSigning": {"publicKey": public_pem, "requireSignature": True},
                }
            }
        )
    )
    docs = render(helm, (DEPLOY / "helm" / "values-production.yaml", values))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    path = tmp_path / "inference.yaml"
    path.write_text(_configs(docs)["inference"])
    _, section = load_service_config(path, "inference", InferenceConfig, environ={})
    assert isinstance(section, InferenceConfig)
    (model,) = section.models
    assert (model.name, model.version, model.pin) == (
        "tenant-a/fraud",
        "1.4.0+b7",
        bytes.fromhex("ab" * 32),
    )
    assert [(m.key_id, m.model_names) for m in section.model_keys] == [
        ("tenant-a-kek", ("tenant-a/", "m"))
    ]
    assert section.client_scopes == {"spiffe://example.org/tenant-a-app": ("tenant-a/",)}
    assert section.require_model_signature is True
    assert section.model_signing_public_key == Path("/etc/strongroom/model-signing-key.pem")
    (cm,) = [
        c
        for c in kind(docs, "ConfigMap")
        if "config.yaml" in c["data"]
        and c["metadata"]["labels"]["app.kubernetes.io/component"] == "inference"
    ]
    assert cm["data"]["model-signing-key.pem"] == public_pem
    (dep,) = [d for d in kind(docs, "Deployment") if component(d) == "inference"]
    (main,) = [c for w, c in containers(dep) if w == "main"]
    assert {
        "name": "config",
        "mountPath": "/etc/strongroom/model-signing-key.pem",
        "subPath": "model-signing-key.pem",
        "readOnly": True,
    } in main["volumeMounts"]


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("STRONGROOM__MODE", True),
        ("STRONGROOM__AUTHZ__ADMIN", True),
        # The broker's secrets, read from the environment before their files (runtime.secrets).
        ("STRONGROOM_HSM_PIN", True),
        ("STRONGROOM_NONCE_KEY", True),
        ("STRONGROOM_AUDIT_KEY", True),
        ("ChrystokiConfigurationPath", False),
    ],
)
def test_the_hsm_library_environment_cannot_reach_the_brokers_configuration(
    helm: str, name: str, refused: bool
) -> None:
    """``keybroker.hsm.pkcs11.env`` goes into the broker's environment as it is: a STRONGROOM__
    name there overrode the rendered configuration past every check of the chart (a production
    install flipped to development mode, which trusts the simulated TEE; another caller made
    admin), and a STRONGROOM_ secret variable replaced the operator's Secret (the HSM PIN, the
    nonce or audit key in plain values)."""
    result = run_helm_template(
        helm,
        (DEPLOY / "helm" / "values-production.yaml",),
        (f"keybroker.hsm.pkcs11.env[0].name={name}", "keybroker.hsm.pkcs11.env[0].value=x"),
    )
    if refused:
        assert result.returncode != 0
        assert "keybroker.hsm.pkcs11.env.0.name: Must not validate" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr


POLICY_HEAD = (
    'version: "1"\n'
    "allowed_spiffe_ids: [spiffe://strongroom.internal/inference]\n"
    "tee_types: [TDX]\n"
    "tdx:\n"
    f'  mrtds: ["{"ab" * 48}"]\n'
)


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        ("  allow_simulated: true\n", True),
        ("  allow_simulated:   yes\n", True),  # YAML 1.1: a bool to the broker's loader
        ('  "allow_simulated": True\n', True),
        ("  {allow_simulated: ON}\n", True),
        ("  allow_simulated: false\n", False),
        ("  # allow_simulated: true only in development\n", False),
    ],
)
def test_production_values_refuse_a_policy_that_allows_the_simulated_tee(
    helm: str, tmp_path: Path, line: str, refused: bool
) -> None:
    """The production broker refuses such a policy at every release (POLICY_SIMULATED_IN_PRODUCTION);
    the chart installed it. Development keeps it (values-development.yaml's policies need it)."""
    values = tmp_path / "values.yaml"
    for mode in ("production", "development"):
        values.write_text(
            yaml.safe_dump(
                {"mode": mode, "keybroker": {"policies": {"k.yaml": POLICY_HEAD + line}}}
            )
        )
        extra = (DEPLOY / "helm" / "values-development.yaml",) if mode == "development" else MINIMAL
        result = run_helm_template(helm, (*extra, values))
        if refused and mode == "production":
            assert result.returncode != 0
            assert "keybroker.policies.k.yaml: Must not validate" in result.stderr, result.stderr
        else:
            assert result.returncode == 0, result.stderr
