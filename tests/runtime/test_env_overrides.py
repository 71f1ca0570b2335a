"""What a ``STRONGROOM__`` environment variable may change in production mode.

A container's environment is easier to extend than its configuration (a Helm value passed through,
an orchestrator's defaults, one more override file). In production the environment must not decide
whom a service trusts: the roles (``authz``), its CA and trust domain, the broker's attestation
trust (simulated chain, policies, collateral and where it comes from, how stale it may be, the
audit log), inference's attester, peers and model signature key. The overrides deploys use
(``MODE``, ``IDENTITY__DNS_NAMES``, ``KEYBROKER__ALLOW_SIMULATED_TEE=false``,
``INFERENCE__ATTESTER=auto``, the HSM module and its recycle quota) keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from strongroom.inference.config import InferenceConfig
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.runtime.config import ConfigError, load_service_config

IDENTITY = """
listen: 127.0.0.1:7443
identity:
  trust_domain: strongroom.test
  spiffe_id: spiffe://strongroom.test/{service}
  ca_url: https://ca.strongroom.test:9000
  ca_root_file: /tmp/root.pem
authz:
  admin: [spiffe://strongroom.test/admin]
"""
KEYBROKER = """
keybroker:
  pkcs11_module: /opt/hsm/libvendor.so
  token_label: strongroom
  audit_log: /var/lib/strongroom/audit.log
  policies_dir: /var/lib/strongroom/policies
  collateral_dir: /var/lib/strongroom/collateral
"""
INFERENCE = """
inference:
  model_store: modelstore:7443
  key_broker: keybroker:7443
"""
MODELSTORE = """
modelstore:
  data_dir: /var/lib/strongroom/models
"""
SECTIONS: dict[str, tuple[str, type[Any]]] = {
    "keybroker": (KEYBROKER, KeybrokerConfig),
    "inference": (INFERENCE, InferenceConfig),
    "modelstore": (MODELSTORE, ModelstoreConfig),
}


def _load(tmp_path: Path, service: str, environ: dict[str, str], mode: str = "") -> Any:
    text, cls = SECTIONS[service]
    path = tmp_path / f"{service}.yaml"
    path.write_text(mode + IDENTITY.format(service=service) + text)
    return load_service_config(path, service, cls, environ=environ)


LOCKED = [
    ("keybroker", "STRONGROOM__AUTHZ__ADMIN", "[spiffe://strongroom.test/attacker]", "authz.admin"),
    ("keybroker", "STRONGROOM__AUTHZ__CLIENT", "[spiffe://strongroom.test/x]", "authz.client"),
    ("inference", "STRONGROOM__AUTHZ", "{admin: [spiffe://strongroom.test/x]}", "authz"),
    ("keybroker", "STRONGROOM__IDENTITY__CA_ROOT_FILE", "/tmp/attacker.pem", "identity.ca_root_file"),
    ("keybroker", "STRONGROOM__IDENTITY__CA_URL", "https://127.0.0.1:9000", "identity.ca_url"),
    ("keybroker", "STRONGROOM__IDENTITY__TRUST_DOMAIN", "other.test", "identity.trust_domain"),
    ("keybroker", "STRONGROOM__IDENTITY__SPIFFE_ID", "spiffe://strongroom.test/admin", "identity.spiffe_id"),
    ("keybroker", "STRONGROOM__IDENTITY", "{trust_domain: x.test}", "identity"),
    ("keybroker", "STRONGROOM__KEYBROKER__ALLOW_SIMULATED_TEE", "true", "keybroker.allow_simulated_tee"),
    ("keybroker", "STRONGROOM__KEYBROKER__SIMULATED_ROOTS_DIR", "/tmp/sim", "keybroker.simulated_roots_dir"),
    ("keybroker", "STRONGROOM__KEYBROKER__POLICIES_DIR", "/tmp/policies", "keybroker.policies_dir"),
    ("keybroker", "STRONGROOM__KEYBROKER__COLLATERAL_DIR", "/tmp/c", "keybroker.collateral_dir"),
    ("keybroker", "STRONGROOM__KEYBROKER__COLLATERAL_GRACE_SECONDS", "604800", "keybroker.collateral_grace_seconds"),
    ("keybroker", "STRONGROOM__KEYBROKER__PCS_URL", "http://pcs.attacker", "keybroker.pcs_url"),
    ("keybroker", "STRONGROOM__KEYBROKER__KDS_URL", "http://kds.attacker", "keybroker.kds_url"),
    ("keybroker", "STRONGROOM__KEYBROKER__PCS_ROOT_CA_CRL_URL", "http://x", "keybroker.pcs_root_ca_crl_url"),
    ("keybroker", "STRONGROOM__KEYBROKER__AUDIT_LOG", "/tmp/audit.log", "keybroker.audit_log"),
    # Another token on a shared network HSM (its PIN beside it in STRONGROOM_HSM_PIN): new data
    # keys wrapped under the environment's KEK.
    ("keybroker", "STRONGROOM__KEYBROKER__TOKEN_LABEL", "someone-else", "keybroker.token_label"),
    ("keybroker", "STRONGROOM__KEYBROKER", "{pkcs11_module: /x.so}", "keybroker"),
    ("inference", "STRONGROOM__INFERENCE__ATTESTER", "simulated", "inference.attester"),
    ("inference", "STRONGROOM__INFERENCE__KEY_BROKER_SPIFFE_ID", "spiffe://strongroom.test/x", "inference.key_broker_spiffe_id"),
    ("inference", "STRONGROOM__INFERENCE__MODEL_STORE_SPIFFE_ID", "spiffe://strongroom.test/x", "inference.model_store_spiffe_id"),
    ("inference", "STRONGROOM__INFERENCE__MODEL_SIGNING_PUBLIC_KEY", "/tmp/k.pem", "inference.model_signing_public_key"),
    ("inference", "STRONGROOM__INFERENCE__REQUIRE_MODEL_SIGNATURE", "false", "inference.require_model_signature"),
    # Models any holder of an old (unbound) data key could have written for any name.
    ("inference", "STRONGROOM__INFERENCE__ACCEPT_UNBOUND_ARTIFACTS", "true", "inference.accept_unbound_artifacts"),
    ("inference", "STRONGROOM__INFERENCE__MODEL_KEYS", "[{key_id: x, model_names: [a/]}]", "inference.model_keys"),
    # Models whose strings escape the inference memory cap: one request could OOM the VM.
    ("inference", "STRONGROOM__INFERENCE__ALLOW_STRING_EXPANSION", "true", "inference.allow_string_expansion"),
    ("inference", "STRONGROOM__INFERENCE__STRING_EXPANSION_MODELS", "[a/]", "inference.string_expansion_models"),
    # Whose names a publisher may take: one more entry lets an identity squat any version.
    ("modelstore", "STRONGROOM__MODELSTORE__PUBLISHERS", "[{spiffe_id: spiffe://strongroom.test/x, model_names: [a/]}]", "modelstore.publishers"),
    # New unbound uploads: a holder of an old data key publishes under another tenant's name.
    ("modelstore", "STRONGROOM__MODELSTORE__ACCEPT_UNBOUND_UPLOADS", "true", "modelstore.accept_unbound_uploads"),
]  # fmt: skip


@pytest.mark.parametrize(("service", "name", "value", "key"), LOCKED)
@pytest.mark.parametrize("mode", ["", "mode: production\n", "mode: development\n"])
def test_production_refuses_environment_overrides_of_trust(
    tmp_path: Path, service: str, name: str, value: str, key: str, mode: str
) -> None:
    environ = {name: value}
    if mode == "mode: development\n":
        # Raised to production by the environment: the overrides beside it are judged in it.
        environ["STRONGROOM__MODE"] = "production"
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, service, environ, mode)
    assert f"environment override {name}: {key} " in info.value.message
    assert "production" in info.value.message
    assert info.value.reason == "CONFIG_INVALID"


@pytest.mark.parametrize(("service", "name", "value", "key"), LOCKED)
def test_development_keeps_every_override(
    tmp_path: Path, service: str, name: str, value: str, key: str
) -> None:
    """Development (the file says so, the environment leaves it) may still override anything; a
    value may then fail its own check, but not for coming from the environment."""
    try:
        _load(tmp_path, service, {name: value}, "mode: development\n")
    except ConfigError as exc:
        assert "environment override" not in exc.message


def test_the_overrides_deploys_use_keep_working_in_production(tmp_path: Path) -> None:
    common, broker = _load(
        tmp_path,
        "keybroker",
        {
            "STRONGROOM__MODE": "production",
            "STRONGROOM__IDENTITY__DNS_NAMES": "[keybroker]",
            "STRONGROOM__KEYBROKER__ALLOW_SIMULATED_TEE": "false",
            "STRONGROOM__KEYBROKER__PKCS11_MODULE": "/opt/hsm/other.so",
            "STRONGROOM__KEYBROKER__HSM_RECYCLE_AFTER_OPERATIONS": "0",
            "STRONGROOM__LOGGING__LEVEL": "WARNING",
        },
        "mode: development\n",
    )
    assert common.production and common.identity.dns_names == ("keybroker",)
    assert broker.allow_simulated_tee is False and broker.hsm_recycle_after_operations == 0
    assert broker.pkcs11_module == Path("/opt/hsm/other.so")
    for attester in ("auto", "configfs-tsm", "sev-guest", "tdx-guest"):
        _, inference = _load(tmp_path, "inference", {"STRONGROOM__INFERENCE__ATTESTER": attester})
        assert inference.attester == attester


def test_the_environment_may_require_model_signatures_in_production(tmp_path: Path) -> None:
    """Raising a check is not what the lock is about: ``true`` is accepted (and then needs the
    key, which only the file can name)."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "inference", {"STRONGROOM__INFERENCE__REQUIRE_MODEL_SIGNATURE": "true"})
    assert "needs model_signing_public_key" in info.value.message
