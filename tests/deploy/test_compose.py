"""docker-compose stack and Dockerfile: exposure, hardening, start-up order, volumes, configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from strongroom.attestation.evidence import TeeType
from strongroom.attestation.policy import ReleasePolicy
from strongroom.attestation.rules.snp import SnpRules
from strongroom.cli.client import ClientConfig
from strongroom.cli.main import build_parser
from strongroom.inference.config import InferenceConfig
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.runtime.bootstrap import STOP_MARGIN_SECONDS, stop_seconds
from strongroom.runtime.config import SERVICES, build, load_mapping, load_service_config
from tests.deploy.conftest import DEPLOY, ROOT, load_compose

COMPOSE_DIR = DEPLOY / "compose"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SECRETISH = re.compile(r"PIN|PASSW|SECRET|TOKEN|KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
# Names that match SECRETISH but hold no secret (a label and a duration).
NOT_SECRET_ENV = {"STRONGROOM_HSM_TOKEN_LABEL", "STRONGROOM_TOKEN_LIFETIME"}
TOOLS = {"publisher", "admin", "client"}
SECTION_CLASSES: dict[str, type[Any]] = {
    "keybroker": KeybrokerConfig,
    "modelstore": ModelstoreConfig,
    "inference": InferenceConfig,
}
# Images we do not build: their health cannot be checked from inside (collector) or they are one-shot.
NO_HEALTHCHECK = {"bootstrap", "otel-collector", *TOOLS}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def volume_sources(service: dict[str, Any]) -> dict[str, str]:
    """Named-volume or bind source -> target, for the short volume syntax the file uses."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[source] = target
    return out


def test_compose_file_passes_docker_compose_config() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (deploy/dev/setup.sh installs Debian's 1.29)")
    for files in (
        ["docker-compose.yml"],
        ["docker-compose.yml", "docker-compose.confidential.yml"],
    ):
        args = [a for f in files for a in ("-f", str(COMPOSE_DIR / f))]
        result = subprocess.run(
            [binary, *args, "config", "-q"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


def test_only_inference_is_published(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert list(published) == ["inference"]
    # The mTLS port (never the health port), on the loopback interface unless the operator says otherwise.
    assert published["inference"] == [
        "${STRONGROOM_INFERENCE_BIND:-127.0.0.1}:${STRONGROOM_INFERENCE_PORT:-7443}:7443"
    ]
    for name, service in compose["services"].items():
        assert "expose" not in service, name
        assert service.get("network_mode") in (None, "none"), name


def test_networks_keep_services_off_the_outside(compose: dict[str, Any]) -> None:
    assert compose["networks"]["backend"]["internal"] is True
    on_frontend = [n for n, s in compose["services"].items() if "frontend" in s.get("networks", [])]
    assert on_frontend == ["inference"]
    assert compose["services"]["bootstrap"]["network_mode"] == "none"


def test_every_container_is_hardened(compose: dict[str, Any]) -> None:
    for name, s in compose["services"].items():
        assert s["read_only"] is True, name
        assert s["user"] == "10001:10001", name
        assert s["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in s["security_opt"], name
        assert any(t.startswith("/tmp:") for t in s["tmpfs"]), name
        assert s.get("mem_limit"), name
        assert not s.get("privileged"), name
        # Only the official step-ca binary needs its file capability kept in the bounding set.
        assert s.get("cap_add", []) == (["NET_BIND_SERVICE"] if name == "step-ca" else []), name


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, s in services.items():
        if name in NO_HEALTHCHECK:
            assert s["healthcheck"] == {"disable": True}, name
        else:
            assert s["healthcheck"]["test"][0] == "CMD", name
        for dep, cond in (s.get("depends_on") or {}).items():
            expected = {
                "bootstrap": "service_completed_successfully",
                "otel-collector": "service_started",
            }.get(dep, "service_healthy")
            assert cond == {"condition": expected}, (name, dep)
    for service in SERVICES:
        deps = services[service]["depends_on"]
        assert "step-ca" in deps
    assert set(services["inference"]["depends_on"]) >= {"keybroker", "modelstore"}
    assert set(services["step-ca"]["depends_on"]) == {"bootstrap"}


def test_health_check_commands_parse_with_the_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name in SERVICES:
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "strongroom"]
        args = parser.parse_args(test[2:])
        assert (args.command, args.address) == ("health", "127.0.0.1:8081")
    healthcheck = re.search(r'CMD \["strongroom", (.*)\]', DOCKERFILE.read_text())
    assert healthcheck
    argv = [a.strip().strip('"') for a in healthcheck.group(1).split(",")]
    assert parser.parse_args(argv).address == "127.0.0.1:8081"


def test_service_commands_parse_with_the_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name in SERVICES:
        args = parser.parse_args(compose["services"][name]["command"])
        assert (args.command, args.service) == ("serve", name)
        assert str(args.config) == "/etc/strongroom/config.yaml"
    client = parser.parse_args(compose["services"]["client"]["command"])
    assert (client.command, client.pki_command) == ("pki", "enrol")


def test_each_identity_sees_only_its_own_token_and_secrets(compose: dict[str, Any]) -> None:
    mounts = {name: volume_sources(s) for name, s in compose["services"].items()}
    owners: dict[str, set[str]] = {}
    for name, sources in mounts.items():
        for source in sources:
            owners.setdefault(source, set()).add(name)
    for identity in (*SERVICES, *TOOLS):
        assert owners[f"{identity}-token"] == {identity, "bootstrap"}
        assert mounts[identity][f"{identity}-token"] == "/run/strongroom/bootstrap"
    # CA keys: the CA and the bootstrap job only. HSM PIN and nonce key: the broker and the bootstrap job.
    assert owners["step-ca"] == {"step-ca", "bootstrap"}
    assert owners["keybroker-secrets"] == {"keybroker", "bootstrap"}
    assert owners["keybroker-hsm"] == {"keybroker", "bootstrap"}
    assert owners["simulated-tee"] == {"keybroker", "inference", "bootstrap"}
    # Everyone else only reads the root certificate.
    for name, sources in mounts.items():
        if name != "bootstrap" and "pki-public" in sources:
            assert f"pki-public:{sources['pki-public']}:ro" in compose["services"][name]["volumes"]


def test_no_secret_in_compose_environment(compose: dict[str, Any]) -> None:
    for name, s in compose["services"].items():
        for key, value in (s.get("environment") or {}).items():
            if SECRETISH.search(key) and key not in NOT_SECRET_ENV:
                assert str(value).startswith("/"), f"{name}: {key} holds a literal, not a path"


def _config_file(compose: dict[str, Any], name: str) -> Path:
    service = compose["services"][name]
    source: str = next(
        v.split(":", maxsplit=1)[0]
        for v in service["volumes"]
        if ":/etc/strongroom/config.yaml" in v
    )
    return COMPOSE_DIR / source


def test_service_configs_load_with_the_service_runtime(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        common, section = load_service_config(
            _config_file(compose, name), name, SECTION_CLASSES[name], environ={}
        )
        assert common.service == name
        assert common.mode == "development"
        assert common.identity.ca_url == "https://step-ca:9000"
        assert common.identity.dns_names[0] == name
        assert common.identity.token_file == Path(f"/run/strongroom/bootstrap/{name}.token")
        assert common.tracing.otlp_endpoint == "http://otel-collector:4317"
        mounts = {t.split(":")[0] for t in volume_sources(compose["services"][name]).values()}
        for path in _paths(section):
            # Every file or directory the configuration names is in the image (/usr) or on a mount.
            assert str(path).startswith("/usr/") or any(str(path).startswith(m) for m in mounts), (
                name,
                path,
            )


def _duration(text: str) -> float:
    """Seconds in a compose duration (``1m30s``, ``40s``, ``500ms``)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_every_service_is_given_the_longest_stop_before_it_is_killed(
    compose: dict[str, Any],
) -> None:
    """``docker-compose stop`` (or ``down``) kills a container ``stop_grace_period`` after its
    SIGTERM, 10 s when unset: every service was killed half way through its calls' grace
    (20 s), its log's last lines never written. Each now waits its longest stop (its grace as it
    loads it from its configuration file) and a margin."""
    for name in SERVICES:
        common, _ = load_service_config(
            _config_file(compose, name), name, SECTION_CLASSES[name], environ={}
        )
        waits = _duration(compose["services"][name].get("stop_grace_period", "10s"))
        assert waits >= stop_seconds(common.server) + STOP_MARGIN_SECONDS, name


def _paths(section: Any) -> list[Path]:
    return [v for v in vars(section).values() if isinstance(v, Path)]


def test_confidential_override_loads_in_production(compose: dict[str, Any]) -> None:
    override = yaml.safe_load((COMPOSE_DIR / "docker-compose.confidential.yml").read_text())
    for name in SERVICES:
        environ = {str(k): str(v) for k, v in override["services"][name]["environment"].items()}
        common, section = load_service_config(
            _config_file(compose, name), name, SECTION_CLASSES[name], environ=environ
        )
        assert common.production
        if name == "keybroker":
            assert section.allow_simulated_tee is False
        if name == "inference":
            assert section.attester == "auto"


def test_confidential_override_turns_production_on() -> None:
    override = yaml.safe_load((COMPOSE_DIR / "docker-compose.confidential.yml").read_text())
    services = override["services"]
    for name in SERVICES:
        assert services[name]["environment"]["STRONGROOM__MODE"] == "production"
    assert (
        services["keybroker"]["environment"]["STRONGROOM__KEYBROKER__ALLOW_SIMULATED_TEE"]
        == "false"
    )
    assert services["inference"]["environment"]["STRONGROOM__INFERENCE__ATTESTER"] == "auto"


def test_compose_images_are_targets_of_the_dockerfile(compose: dict[str, Any]) -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert {"builder", "runtime", "runtime-softhsm"} <= targets
    for name, s in compose["services"].items():
        if "build" in s:
            assert s["build"]["target"] in targets, name
            assert (ROOT / s["build"]["context"].replace("../..", ".")).resolve() == ROOT
    assert compose["services"]["keybroker"]["build"]["target"] == "runtime-softhsm"
    assert compose["services"]["inference"]["build"]["target"] == "runtime"


def test_dockerfile_final_stages_are_non_root_and_tool_free() -> None:
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    final = [
        s
        for s in stages
        if not s.startswith(("${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE} AS install"))
    ]
    for stage in final:
        users = re.findall(r"^USER (\S+)$", stage, re.MULTILINE)
        # Each final stage ends as uid 10001 (or inherits it from runtime without changing user).
        if users:
            assert users[-1] == "10001:10001", stage.splitlines()[0]
        for tool in ("build-essential", "gcc", "git ", "curl"):
            assert tool not in stage, (tool, stage.splitlines()[0])
    assert "HEALTHCHECK" in text and "127.0.0.1:8081" in text
    assert not re.search(r"^(ARG|ENV) \S*(PIN|PASSWORD|SECRET|TOKEN)", text, re.MULTILINE)
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("*")] == "*"  # allow-list, not deny-list


def test_bootstrap_mounts_match_its_paths(compose: dict[str, Any]) -> None:
    bootstrap = compose["services"]["bootstrap"]
    mounts = volume_sources(bootstrap)
    assert bootstrap["entrypoint"] == ["bash", "/etc/strongroom/bootstrap.sh"]
    assert mounts["./bootstrap.sh"] == "/etc/strongroom/bootstrap.sh"
    assert mounts["step-ca"] == "/home/step"
    assert mounts["keybroker-secrets"] == "/run/secrets"
    script = (COMPOSE_DIR / "bootstrap.sh").read_text()
    assert 'strongroom pki init --dir "$ca_dir"' in script
    # The mount points the compose file uses must exist in the image, owned by the service user.
    dockerfile = DOCKERFILE.read_text()
    for identity in (*SERVICES, *TOOLS):
        assert f"/run/strongroom/bootstrap/{identity}" in dockerfile, identity
    step_ca = compose["services"]["step-ca"]
    assert step_ca["environment"]["CONFIGPATH"] == "/home/step/config/ca.json"


def test_tool_configs_load_as_client_configurations(compose: dict[str, Any]) -> None:
    for name in TOOLS:
        data = load_mapping(COMPOSE_DIR / "config" / f"{name}.yaml", environ={})
        config = build(ClientConfig, data, "client")
        assert config.identity.spiffe_id == f"spiffe://strongroom.internal/{name}"
        if name != "client":
            env = compose["services"][name]["environment"]
            assert env["STRONGROOM_CLIENT_CONFIG"] == "/etc/strongroom/config.yaml"
            assert (
                f"./config/{name}.yaml:/etc/strongroom/config.yaml:ro"
                in compose["services"][name]["volumes"]
            )


def test_development_policy_releases_to_the_simulated_guest_only() -> None:
    policy = ReleasePolicy.load(
        (COMPOSE_DIR / "policies" / "resnet.yaml").read_text(), production=False
    )
    inference = yaml.safe_load((COMPOSE_DIR / "config" / "inference.yaml").read_text())["inference"]
    assert policy.allowed_spiffe_ids == frozenset({"spiffe://strongroom.internal/inference"})
    snp = policy.rules[TeeType.SEV_SNP]
    assert isinstance(snp, SnpRules) and snp.allow_simulated
    measurements = {m.hex() if isinstance(m, bytes) else str(m) for m in snp.measurements}
    assert measurements == {inference["simulated_measurement"]}


def test_the_confidential_broker_can_get_real_collateral(compose: dict[str, Any]) -> None:
    """In production the bootstrap fills no collateral and config/keybroker.yaml fetches none, on a
    network with no route off the host: the confidential override's broker refused every real
    release COLLATERAL_MISSING. It now fetches, through a network of its own that leaves the host."""
    override = yaml.safe_load((COMPOSE_DIR / "docker-compose.confidential.yml").read_text())
    broker = override["services"]["keybroker"]
    environ = {str(k): str(v) for k, v in broker["environment"].items()}
    _, section = load_service_config(
        _config_file(compose, "keybroker"), "keybroker", KeybrokerConfig, environ=environ
    )
    assert isinstance(section, KeybrokerConfig)
    assert section.collateral_fetch is True and not section.collateral_read_only
    networks = {**compose["networks"], **override["networks"]}
    exits = [n for n in broker["networks"] if not (networks[n] or {}).get("internal")]
    assert exits == ["collateral"] and "backend" in broker["networks"]
    # Only the broker leaves the host that way.
    joined = [n for n, s in override["services"].items() if "collateral" in s.get("networks", [])]
    assert joined == ["keybroker"]
    assert compose["networks"]["backend"]["internal"] is True
