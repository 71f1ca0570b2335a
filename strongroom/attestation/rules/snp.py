"""SEV-SNP release rules: the ``sev_snp`` section of a policy (``services/keybroker/POLICY.md``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strongroom.attestation.claims import SnpClaims, VerifiedClaims
from strongroom.attestation.errors import PolicyViolation
from strongroom.attestation.rules import fields
from strongroom.reasons import Reason

SNP_PRODUCTS = ("Milan", "Genoa", "Turin")
SNP_SIGNING_KEYS = ("VCEK", "VLEK")
SNP_TCB_COMPONENTS = ("fmc", "bootloader", "tee", "snp", "microcode")
# The TCB components a stated minimum must cover (``fmc`` only exists on Turin).
_REQUIRED_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode")
ANY_TCB = "any"
SECTION = "sev_snp"
_KEYS = {
    "measurements",
    "products",
    "signing_keys",
    "allow_debug",
    "vmpl",
    "allow_smt",
    "allow_migrate_ma",
    "min_guest_svn",
    "min_reported_tcb",
    "host_data",
    "allow_simulated",
}


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


@dataclass(frozen=True)
class SnpRules:
    """Rules for SEV-SNP evidence."""

    measurements: frozenset[bytes]
    products: frozenset[str] | None
    signing_keys: frozenset[str]
    allow_debug: bool
    vmpl: int
    allow_smt: bool
    allow_migrate_ma: bool
    min_guest_svn: int
    min_reported_tcb: Mapping[str, int]  # empty only for an explicit development "any"
    host_data: frozenset[bytes] | None
    allow_simulated: bool

    def evaluate(self, claims: VerifiedClaims) -> bytes:
        """Checks SNP claims in the documented order; returns the allowed measurement."""
        if not isinstance(claims, SnpClaims):
            raise TypeError(f"SEV-SNP rules cannot judge {claims.tee_type.value} claims")
        c = claims
        if c.simulated and not self.allow_simulated:
            raise _deny(
                "evidence from a simulated TEE is not allowed", Reason.SIMULATED_TEE_NOT_ALLOWED
            )
        if c.measurement not in self.measurements:
            raise _deny(
                f"measurement {c.measurement.hex()} is not allowed", Reason.MEASUREMENT_NOT_ALLOWED
            )
        if c.policy.debug and not self.allow_debug:
            raise _deny("guest policy allows debugging", Reason.DEBUG_FORBIDDEN)
        if c.vmpl != self.vmpl:
            raise _deny(
                f"report is from VMPL {c.vmpl}, policy requires {self.vmpl}",
                Reason.VMPL_NOT_ALLOWED,
            )
        if c.policy.smt and not self.allow_smt:
            raise _deny("guest policy allows SMT", Reason.SMT_FORBIDDEN)
        if c.policy.migrate_ma and not self.allow_migrate_ma:
            raise _deny("guest policy allows a migration agent", Reason.MIGRATE_MA_FORBIDDEN)
        if c.signing_key not in self.signing_keys:
            raise _deny(
                f"{c.signing_key}-signed reports are not allowed", Reason.SIGNING_KEY_NOT_ALLOWED
            )
        if self.products is not None and c.product not in self.products:
            raise _deny(f"product {c.product} is not allowed", Reason.PRODUCT_NOT_ALLOWED)
        if c.guest_svn < self.min_guest_svn:
            raise _deny(f"guest SVN {c.guest_svn} < {self.min_guest_svn}", Reason.GUEST_SVN_TOO_OLD)
        have = c.reported_tcb.components()
        for name, minimum in self.min_reported_tcb.items():
            if name in have and have[name] < minimum:
                raise _deny(
                    f"reported TCB {name}={have[name]} is below the minimum {minimum}",
                    Reason.TCB_TOO_OLD,
                )
        if self.host_data is not None and c.host_data not in self.host_data:
            raise _deny("host data is not allowed", Reason.HOST_DATA_NOT_ALLOWED)
        return c.measurement


def _min_tcb(s: Mapping[str, Any], production: bool) -> dict[str, int]:
    """The stated minimum reported TCB: a mapping of every component, or (development) "any"."""
    where = f"{SECTION}.min_reported_tcb"
    if "min_reported_tcb" not in s:
        raise fields.fail(
            where,
            "is required: state the minimum reported TCB (bootloader, tee, snp, microcode; fmc "
            'for Turin), or in development mode "any"',
            Reason.POLICY_MISSING_KEY,
        )
    raw = s["min_reported_tcb"]
    if raw == ANY_TCB:
        if production:
            raise fields.fail(
                where, '"any" is only allowed in development mode', Reason.POLICY_BAD_VALUE
            )
        return {}
    tcb_map = fields.mapping(raw, where, set(SNP_TCB_COMPONENTS))
    missing = [c for c in _REQUIRED_TCB_COMPONENTS if c not in tcb_map]
    if missing:
        raise fields.fail(where, f"must state {missing}", Reason.POLICY_MISSING_KEY)
    return {k: fields.integer(tcb_map, k, 0, where, 255) for k in tcb_map}


class _SnpPolicy:
    """The SEV-SNP entry of the rules registry."""

    section = SECTION

    def parse(self, section: Any, *, production: bool) -> SnpRules:
        """Strictly validates a ``sev_snp`` section (``min_reported_tcb: any`` only in development)."""
        w = SECTION
        s = fields.mapping(section, w, _KEYS)
        measurements = fields.required_hex_set(s, "measurements", 48, w)
        signing = fields.choices(s, "signing_keys", SNP_SIGNING_KEYS, ("VCEK",), w)
        assert signing is not None  # a default is given
        vmpl = fields.integer(s, "vmpl", 0, w, 3)
        min_tcb = _min_tcb(s, production)
        return SnpRules(
            measurements=measurements,
            products=fields.choices(s, "products", SNP_PRODUCTS, None, w),
            signing_keys=signing,
            allow_debug=fields.boolean(s, "allow_debug", False, w),
            vmpl=vmpl,
            allow_smt=fields.boolean(s, "allow_smt", True, w),
            allow_migrate_ma=fields.boolean(s, "allow_migrate_ma", False, w),
            min_guest_svn=fields.integer(s, "min_guest_svn", 0, w, 0xFFFFFFFF),
            min_reported_tcb=min_tcb,
            host_data=fields.hex_set(s, "host_data", 32, w),
            allow_simulated=fields.boolean(s, "allow_simulated", False, w),
        )


SNP_POLICY = _SnpPolicy()
"""Registered for ``TeeType.SEV_SNP`` in ``strongroom.attestation.rules``."""
