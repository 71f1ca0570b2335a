"""Configuration loading: file, environment overrides, strict validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from strongroom.runtime.config import ConfigError, load_service_config
from strongroom.runtime.secrets import Secret


@dataclasses.dataclass(frozen=True)
class Section:
    data_dir: Path
    limit: int = 10
    enabled: bool = False


BASE = """
service: modelstore
listen: 127.0.0.1:7443
identity:
  trust_domain: strongroom.test
  spiffe_id: spiffe://strongroom.test/modelstore
  ca_url: https://127.0.0.1:9000
  ca_root_file: /tmp/root.pem
modelstore:
  data_dir: /var/lib/models
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_loads_file_with_defaults(tmp_path: Path) -> None:
    common, section = load_service_config(write(tmp_path, BASE), "modelstore", Section, environ={})
    assert common.listen == "127.0.0.1:7443"
    assert common.production, "production must be the default mode"
    assert common.identity.dns_names == ()
    assert section == Section(data_dir=Path("/var/lib/models"))


def test_environment_overrides_nest_and_keep_types(tmp_path: Path) -> None:
    env = {
        "STRONGROOM__MODELSTORE__LIMIT": "42",
        "STRONGROOM__MODELSTORE__ENABLED": "true",
        "STRONGROOM__IDENTITY__DNS_NAMES": "[modelstore, localhost]",
        "UNRELATED": "x",
    }
    development = write(tmp_path, "mode: development\n" + BASE)
    common, section = load_service_config(development, "modelstore", Section, environ=env)
    assert section.limit == 42 and section.enabled is True
    assert common.mode == "development" and not common.production
    assert common.identity.dns_names == ("modelstore", "localhost")


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        ("STRONGROOM__MODELSTORE__LIMIT=many", "modelstore.limit: expected an integer"),
        ("STRONGROOM__MODELSTORE__TYPO=1", "unknown key(s) typo"),
        ("STRONGROOM__MODE=prod", "config.mode: must be one of production, development"),
        ("STRONGROOM__IDENTITY__SPIFFE_ID=spiffe://other.test/x", "outside trust domain"),
        ("STRONGROOM__IDENTITY__CA_URL=http://ca:9000", "https://"),
        ("STRONGROOM__AUTHZ__ADMIN=[not-a-spiffe-id]", "not a SPIFFE ID"),
        ("STRONGROOM__SERVICE=keybroker", "not 'modelstore'"),
    ],
)
def test_invalid_configuration_is_rejected_with_the_key_named(
    tmp_path: Path, mutation: str, message: str
) -> None:
    key, value = mutation.split("=", 1)
    # Development: production refuses some of these keys from the environment before their values
    # are judged (tests/runtime/test_env_overrides.py).
    path = write(tmp_path, "mode: development\n" + BASE)
    with pytest.raises(ConfigError) as info:
        load_service_config(path, "modelstore", Section, environ={key: value})
    assert message in str(info.value)
    assert info.value.reason == "CONFIG_INVALID"


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf", "3601"])
def test_an_impossible_stop_grace_is_refused(tmp_path: Path, value: str) -> None:
    """server.grace_seconds was not checked: a negative or NaN grace was loaded and reached
    gRPC's stop at SIGTERM, and an absurd one outlived any orchestrator's wait."""
    path = write(tmp_path, BASE + f"server:\n  grace_seconds: {value}\n")
    with pytest.raises(ConfigError, match=r"server\.grace_seconds must be between 0 and 3600"):
        load_service_config(path, "modelstore", Section, environ={})


@pytest.mark.parametrize("value", [0, 3600])
def test_a_stop_grace_from_none_to_an_hour_is_taken(tmp_path: Path, value: int) -> None:
    path = write(tmp_path, BASE + f"server:\n  grace_seconds: {value}\n")
    common, _ = load_service_config(path, "modelstore", Section, environ={})
    assert common.server.grace_seconds == value


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"modelstore\.data_dir: required"):
        load_service_config(
            write(tmp_path, BASE.replace("  data_dir: /var/lib/models\n", "  limit: 3\n")),
            "modelstore",
            Section,
            environ={},
        )


def test_not_yaml_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_service_config(write(tmp_path, "a: [b"), "modelstore", Section, environ={})


def test_secret_is_redacted_and_loaded_from_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pin"
    path.write_text("1234\n")
    path.chmod(0o600)
    secret = Secret.load(file=path, env="TEST_PIN_UNSET", what="HSM PIN")
    assert secret.reveal_text() == "1234"
    assert "1234" not in repr(secret) and "1234" not in str(secret) and "1234" not in f"{[secret]}"
    monkeypatch.setenv("TEST_PIN_SET", "9876")
    assert Secret.load(file=path, env="TEST_PIN_SET", what="HSM PIN").reveal_text() == "9876"


def test_world_readable_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text("1234")
    path.chmod(0o644)
    with pytest.raises(Exception, match="readable by group or others") as info:
        Secret.load(file=path, what="HSM PIN")
    assert "1234" not in str(info.value)


@pytest.mark.parametrize(
    "file_mode",
    # An empty or misspelt mode is not a development file: without the environment it fails, and
    # the environment's development used to make it load.
    ["", "mode: production\n", "mode:\n", "mode: null\n", "mode: Development\n", "mode: dev\n"],
)
def test_the_environment_cannot_lower_production_to_development(
    tmp_path: Path, file_mode: str
) -> None:
    """Development mode trusts the simulated TEE. A Helm value passed through to the broker's
    environment (the HSM's extra variables) used to flip a production install to it."""
    path = write(tmp_path, file_mode + BASE)
    with pytest.raises(ConfigError) as info:
        load_service_config(
            path, "modelstore", Section, environ={"STRONGROOM__MODE": "development"}
        )
    assert "cannot lower" in str(info.value)
    raised = write(tmp_path, "mode: development\n" + BASE)
    common, _ = load_service_config(
        raised, "modelstore", Section, environ={"STRONGROOM__MODE": "production"}
    )
    assert common.production  # raising it stays allowed (the confidential compose override)


@pytest.mark.parametrize(
    "environ",
    [
        # The confidential compose override raises a development file to production; a second
        # spelling of the same variable, sorted after it, lowered it again (and with it every
        # production check: the simulated chain, the environment's locks).
        {"STRONGROOM__MODE": "production", "STRONGROOM__mode": "development"},
        {"STRONGROOM__MODELSTORE__LIMIT": "1", "STRONGROOM__modelstore__limit": "2"},
        # A whole section after one of its keys: the key's override was silently dropped.
        {"STRONGROOM__MODELSTORE__LIMIT": "1", "STRONGROOM__modelstore": "{data_dir: /x}"},
        {"STRONGROOM__MODELSTORE": "{data_dir: /x}", "STRONGROOM__MODELSTORE__LIMIT": "1"},
    ],
)
def test_two_environment_variables_for_one_key_are_refused(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    path = write(tmp_path, "mode: development\n" + BASE)
    with pytest.raises(ConfigError) as info:
        load_service_config(path, "modelstore", Section, environ=environ)
    names = sorted(environ)
    assert f"environment overrides {names[0]} and {names[1]} both set" in info.value.message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # The later one silently won: a production file with a development line appended to it.
        ("mode: production\n" + BASE + "mode: development\n", "'mode'"),
        (BASE + "authz:\n  admin: [spiffe://strongroom.test/a]\n  admin: []\n", "'admin'"),
    ],
)
def test_a_key_given_twice_in_the_file_is_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_service_config(write(tmp_path, text), "modelstore", Section, environ={})
    assert f"duplicate key {key}" in info.value.message
