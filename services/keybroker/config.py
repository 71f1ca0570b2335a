"""The key broker's own configuration section (``keybroker:`` in the service configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from strongroom.runtime.config import ConfigError

PIN_ENV = "STRONGROOM_HSM_PIN"
NONCE_KEY_ENV = "STRONGROOM_NONCE_KEY"
AUDIT_KEY_ENV = "STRONGROOM_AUDIT_KEY"


@dataclass(frozen=True)
class KeybrokerConfig:
    """Where the HSM, secrets, policies and audit log are.

    ``pkcs11_module`` is the switch between SoftHSM2 (development) and a real HSM. Secrets are
    files (mode 0600) or environment variables, never configuration values.
    """

    pkcs11_module: Path
    token_label: str
    audit_log: Path
    policies_dir: Path
    pin_file: Path | None = None
    nonce_key_file: Path | None = None
    audit_key_file: Path | None = None
    # SoftHSM2 only: the softhsm2.conf naming the token directory.
    softhsm2_conf: Path | None = None
    challenge_lifetime_seconds: float = 60.0
    hsm_operation_timeout_seconds: float = 5.0
    # Development only: trust the simulated TEE chain (amd_trust.pem, intel_root.pem) in this directory.
    allow_simulated_tee: bool = False
    simulated_roots_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.allow_simulated_tee and self.simulated_roots_dir is None:
            raise ConfigError("keybroker.allow_simulated_tee needs keybroker.simulated_roots_dir")
        if not 5 <= self.challenge_lifetime_seconds <= 600:
            raise ConfigError("keybroker.challenge_lifetime_seconds must be between 5 and 600")
