"""The key broker's own configuration section (``keybroker:`` in the service configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from strongroom.keybroker.grant_budget import DEFAULT_GRANT_LIMITS, GrantLimits
from strongroom.runtime.config import ConfigError, EnvLocks

PIN_ENV = "STRONGROOM_HSM_PIN"
NONCE_KEY_ENV = "STRONGROOM_NONCE_KEY"
AUDIT_KEY_ENV = "STRONGROOM_AUDIT_KEY"
RELEASE_SIGNING_KEY_ENV = "STRONGROOM_RELEASE_SIGNING_KEY"
#: The largest ``hsm_recycle_after_operations`` (about 4 GB of SoftHSM2 objects at 0.4 KB each)
MAX_RECYCLE_AFTER_OPERATIONS = 10_000_000
#: The largest burst of a release grant budget (``release_budget_*_burst``)
MAX_RELEASE_BURST = 1_000_000
#: The largest rate of a release grant budget (``release_budget_*_rate``), grants a second
MAX_RELEASE_RATE = 100_000.0


@dataclass(frozen=True)
class KeybrokerConfig:
    """Where the HSM, secrets, policies and audit log are.

    ``pkcs11_module`` is the switch between SoftHSM2 (development) and a real HSM. Secrets are
    files (mode 0600) or environment variables, never configuration values.
    """

    # What decides which evidence releases a key, which token holds the KEKs and where each
    # release is recorded is never a STRONGROOM__ environment override in production
    # (strongroom.runtime.config): a policy directory or collateral mirror of the environment's
    # choosing, a week of grace for stale CRLs, the simulated chain, another token of a shared HSM.
    # Only the safe `allow_simulated_tee: false` is accepted. (pkcs11_module stays: the documented
    # switch to a real HSM, and a library must already be in the container.)
    ENV_LOCKED_IN_PRODUCTION: ClassVar[EnvLocks] = {
        "token_label": (),
        "allow_simulated_tee": (False,),
        "simulated_roots_dir": (),
        "policies_dir": (),
        "collateral_dir": (),
        "collateral_grace_seconds": (),
        "pcs_url": (),
        "kds_url": (),
        "pcs_root_ca_crl_url": (),
        "audit_log": (),
    }

    pkcs11_module: Path
    token_label: str
    audit_log: Path
    policies_dir: Path
    pin_file: Path | None = None
    nonce_key_file: Path | None = None
    audit_key_file: Path | None = None
    # Ed25519 (PKCS#8 PEM) signing every granted release answer over its request; inference
    # servers verify it with the public half (inference.release_signing_public_keys).
    release_signing_key_file: Path | None = None
    # The most bytes the audit log may hold (0: no cap); past it every decision is refused
    # (AUDIT_LOG_FULL) as on a full disk. Set it below a volume limit that is enforced by evicting
    # the pod (a Kubernetes emptyDir's sizeLimit) rather than by ENOSPC.
    audit_max_bytes: int = 0
    # Seal the audit log and continue its chain in a new one before a commit would take it past
    # this many bytes (0: never). Sealed files are named audit.log.<first seq>-<last seq> (with
    # their .head) for an operator to ship and delete; with a cap, they count against it.
    audit_rotate_bytes: int = 0
    # SoftHSM2 only: the softhsm2.conf naming the token directory.
    softhsm2_conf: Path | None = None
    challenge_lifetime_seconds: float = 60.0
    hsm_operation_timeout_seconds: float = 5.0
    # Re-initialise the PKCS#11 module after this many operations that can create objects (health
    # checks do not count), so that SoftHSM2 frees the objects it keeps until C_Finalize (~0.4 KB
    # per release; hsm.py module doc). 0 = never: for an HSM that frees objects itself, where a
    # re-login has a cost.
    hsm_recycle_after_operations: int = 2000
    # Key releases granted to one caller certificate, and to one SPIFFE ID over all its
    # certificates (a fleet's): a burst at once, then a rate a second; past either, a release is
    # refused before the HSM (RELEASES_RATE_LIMITED). Sized so that an honest fleet never meets
    # them (strongroom.keybroker.grant_budget.GrantLimits): 100 replicas x 4 models releasing
    # within a minute are 400 of the identity's 1,024; a replica's burst of LoadModels, 64.
    release_budget_certificate_burst: int = DEFAULT_GRANT_LIMITS.certificate_burst
    release_budget_certificate_rate: float = DEFAULT_GRANT_LIMITS.certificate_rate
    release_budget_identity_burst: int = DEFAULT_GRANT_LIMITS.identity_burst
    release_budget_identity_rate: float = DEFAULT_GRANT_LIMITS.identity_rate
    # Development only: trust the simulated TEE chain (amd_trust.pem, intel_root.pem) in this directory.
    allow_simulated_tee: bool = False
    simulated_roots_dir: Path | None = None
    # The broker's own attestation collateral (CRLs, TDX TCB info, QE identity): a directory it
    # owns (or shares read-only), filled from AMD KDS and Intel PCS/PCCS or by `attest collateral
    # import`. Without it every release is refused (COLLATERAL_MISSING).
    collateral_dir: Path | None = None
    collateral_read_only: bool = False
    # Fetch missing/due documents from the services below (false: offline, import only).
    collateral_fetch: bool = True
    pcs_url: str = "https://api.trustedservices.intel.com"
    kds_url: str = "https://kdsintf.amd.com"
    pcs_root_ca_crl_url: str | None = None
    collateral_timeout_seconds: float = 10.0
    collateral_retries: int = 3
    # Refresh a document this long before its nextUpdate; re-check every interval.
    collateral_refresh_before_seconds: float = 86400.0
    collateral_refresh_interval_seconds: float = 3600.0
    # Accept a document at most this long past its nextUpdate (upstream outage), then refuse.
    collateral_grace_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.allow_simulated_tee and self.simulated_roots_dir is None:
            raise ConfigError("keybroker.allow_simulated_tee needs keybroker.simulated_roots_dir")
        if not 0 <= self.collateral_grace_seconds <= 7 * 86400:
            raise ConfigError("keybroker.collateral_grace_seconds must be between 0 and 604800")
        if not 0 < self.collateral_timeout_seconds <= 120 or not 0 <= self.collateral_retries <= 10:
            raise ConfigError(
                "keybroker.collateral_timeout_seconds must be in (0, 120] and "
                "collateral_retries in 0..10"
            )
        for name in ("pcs_url", "kds_url"):
            if not getattr(self, name).startswith(("https://", "http://")):
                raise ConfigError(f"keybroker.{name} must be an http(s) URL")
        if not 0 <= self.hsm_recycle_after_operations <= MAX_RECYCLE_AFTER_OPERATIONS:
            raise ConfigError(
                "keybroker.hsm_recycle_after_operations must be between 0 (never) and "
                f"{MAX_RECYCLE_AFTER_OPERATIONS}"
            )
        if self.audit_max_bytes and self.audit_max_bytes < 1024 * 1024:
            raise ConfigError("keybroker.audit_max_bytes must be 0 (no cap) or at least 1 MiB")
        if self.audit_rotate_bytes and self.audit_rotate_bytes < 1024 * 1024:
            raise ConfigError(
                "keybroker.audit_rotate_bytes must be 0 (no rotation) or at least 1 MiB"
            )
        # Otherwise the cap is reached with the first sealed file, or before one exists.
        if self.audit_max_bytes and self.audit_rotate_bytes > self.audit_max_bytes // 2:
            raise ConfigError(
                "keybroker.audit_rotate_bytes must be at most half of keybroker.audit_max_bytes"
            )
        for scope in ("certificate", "identity"):
            burst = getattr(self, f"release_budget_{scope}_burst")
            rate = getattr(self, f"release_budget_{scope}_rate")
            if not 1 <= burst <= MAX_RELEASE_BURST:
                raise ConfigError(
                    f"keybroker.release_budget_{scope}_burst must be between 1 and "
                    f"{MAX_RELEASE_BURST}"
                )
            # `not rate > 0` also refuses NaN, which no comparison admits.
            if not 0 < rate <= MAX_RELEASE_RATE:
                raise ConfigError(
                    f"keybroker.release_budget_{scope}_rate must be above 0 and at most "
                    f"{MAX_RELEASE_RATE:g} (grants a second)"
                )
        if not 5 <= self.challenge_lifetime_seconds <= 600:
            raise ConfigError("keybroker.challenge_lifetime_seconds must be between 5 and 600")

    def grant_limits(self) -> GrantLimits:
        """The release grant budget these settings configure."""
        return GrantLimits(
            certificate_burst=self.release_budget_certificate_burst,
            certificate_rate=self.release_budget_certificate_rate,
            identity_burst=self.release_budget_identity_burst,
            identity_rate=self.release_budget_identity_rate,
        )
