"""The broker's own configuration section: the HSM recycle quota (issue 12 item 2), the audit
log's size cap and rotation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from strongroom.keybroker.config import MAX_RECYCLE_AFTER_OPERATIONS, KeybrokerConfig
from strongroom.keybroker.grant_budget import GrantLimits
from strongroom.keybroker.hsm import HsmConfig
from strongroom.runtime.config import ConfigError, load_service_config

BASE = """
service: keybroker
listen: 127.0.0.1:7443
identity:
  trust_domain: strongroom.test
  spiffe_id: spiffe://strongroom.test/keybroker
  ca_url: https://127.0.0.1:9000
  ca_root_file: /tmp/root.pem
keybroker:
  pkcs11_module: /usr/lib/softhsm/libsofthsm2.so
  token_label: strongroom
  audit_log: /var/lib/strongroom/audit.log
  policies_dir: /var/lib/strongroom/policies
"""
ENV = "STRONGROOM__KEYBROKER__HSM_RECYCLE_AFTER_OPERATIONS"


def _load(tmp_path: Path, environ: dict[str, str]) -> KeybrokerConfig:
    path = tmp_path / "keybroker.yaml"
    path.write_text(BASE)
    _, section = load_service_config(path, "keybroker", KeybrokerConfig, environ=environ)
    assert isinstance(section, KeybrokerConfig)
    return section


def test_the_default_quota_is_the_hsm_backends() -> None:
    """One default, whichever way the broker is built."""
    broker = {f.name: f.default for f in dataclasses.fields(KeybrokerConfig)}
    hsm = {f.name: f.default for f in dataclasses.fields(HsmConfig)}
    assert broker["hsm_recycle_after_operations"] == hsm["recycle_after_operations"] == 2000


@pytest.mark.parametrize("value", ["0", "1", "50000", str(MAX_RECYCLE_AFTER_OPERATIONS)])
def test_quota_in_range_is_accepted(tmp_path: Path, value: str) -> None:
    assert _load(tmp_path, {ENV: value}).hsm_recycle_after_operations == int(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "between 0 (never) and 10000000"),
        (str(MAX_RECYCLE_AFTER_OPERATIONS + 1), "between 0 (never) and 10000000"),
        ("often", "expected an integer"),
        ("2.5", "expected an integer"),
        ("true", "expected an integer"),
    ],
)
def test_quota_out_of_range_or_not_an_integer_is_refused(
    tmp_path: Path, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="hsm_recycle_after_operations") as info:
        _load(tmp_path, {ENV: value})
    assert message in str(info.value)


ROTATE_ENV = "STRONGROOM__KEYBROKER__AUDIT_ROTATE_BYTES"
CAP_ENV = "STRONGROOM__KEYBROKER__AUDIT_MAX_BYTES"


def test_audit_rotation_is_off_unless_configured(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).audit_rotate_bytes == 0
    config = _load(tmp_path, {ROTATE_ENV: str(64 << 20), CAP_ENV: str(900 << 20)})
    assert (config.audit_rotate_bytes, config.audit_max_bytes) == (64 << 20, 900 << 20)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({ROTATE_ENV: "1000"}, "at least 1 MiB"),
        ({ROTATE_ENV: "-1"}, "at least 1 MiB"),
        ({ROTATE_ENV: str(600 << 20), CAP_ENV: str(900 << 20)}, "at most half"),
    ],
)
def test_audit_rotation_settings_out_of_range_are_refused(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match="audit_rotate_bytes") as info:
        _load(tmp_path, environ)
    assert message in str(info.value)


BUDGET_ENV = "STRONGROOM__KEYBROKER__RELEASE_BUDGET_{}"


def test_the_release_grant_budget_defaults_to_the_engines_and_is_configurable(
    tmp_path: Path,
) -> None:
    """Unset, the broker builds its engine with the sized defaults; set (here by the
    environment, as its neighbours may be), each of the four reaches the engine's limits."""
    assert _load(tmp_path, {}).grant_limits() == GrantLimits()
    config = _load(
        tmp_path,
        {
            BUDGET_ENV.format("CERTIFICATE_BURST"): "2",
            BUDGET_ENV.format("CERTIFICATE_RATE"): "0.5",
            BUDGET_ENV.format("IDENTITY_BURST"): "100000",
            BUDGET_ENV.format("IDENTITY_RATE"): "5000",
        },
    )
    assert config.grant_limits() == GrantLimits(
        certificate_burst=2, certificate_rate=0.5, identity_burst=100_000, identity_rate=5000.0
    )


@pytest.mark.parametrize("scope", ["CERTIFICATE", "IDENTITY"])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("BURST", "0", "between 1 and 1000000"),
        ("BURST", "1000001", "between 1 and 1000000"),
        ("BURST", "many", "expected an integer"),
        ("RATE", "0", "above 0 and at most 100000"),
        ("RATE", "-1", "above 0 and at most 100000"),
        ("RATE", "nan", "expected a number"),
        ("RATE", "100001", "above 0 and at most 100000"),
    ],
)
def test_release_grant_budget_settings_out_of_range_are_refused(
    tmp_path: Path, scope: str, field: str, value: str, message: str
) -> None:
    name = f"release_budget_{scope.lower()}_{field.lower()}"
    with pytest.raises(ConfigError, match=name) as info:
        _load(tmp_path, {BUDGET_ENV.format(f"{scope}_{field}"): value})
    assert message in str(info.value)
