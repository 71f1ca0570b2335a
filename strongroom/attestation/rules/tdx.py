"""TDX release rules: the ``tdx`` section of a policy (``services/keybroker/POLICY.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strongroom.attestation.claims import TdxClaims, VerifiedClaims
from strongroom.attestation.errors import PolicyViolation
from strongroom.attestation.rules import fields
from strongroom.reasons import Reason

# Intel's statuses a policy may accept. Revoked, NoMatchingTcbLevel and NotEvaluated never pass.
ACCEPTABLE_TDX_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TdRelaunchAdvised",
    "TdRelaunchAdvisedConfigurationNeeded",
)
SECTION = "tdx"
_KEYS = {
    "mrtds",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrconfigids",
    "mrowners",
    "mrownerconfigs",
    "accepted_tcb_statuses",
    "allow_debug",
    "fmspcs",
    "min_tcb_evaluation_data_number",
    "allow_simulated",
}


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


@dataclass(frozen=True)
class TdxRules:
    """Rules for TDX evidence."""

    mrtds: frozenset[bytes]
    rtmrs: tuple[frozenset[bytes] | None, ...]
    mrconfigids: frozenset[bytes] | None
    mrowners: frozenset[bytes] | None
    mrownerconfigs: frozenset[bytes] | None
    accepted_tcb_statuses: frozenset[str]
    allow_debug: bool
    fmspcs: frozenset[bytes] | None
    allow_simulated: bool
    min_tcb_evaluation_data_number: int = 0

    def evaluate(self, claims: VerifiedClaims) -> bytes:
        """Checks TDX claims in the documented order; returns the allowed MRTD."""
        if not isinstance(claims, TdxClaims):
            raise TypeError(f"TDX rules cannot judge {claims.tee_type.value} claims")
        c = claims
        if c.simulated and not self.allow_simulated:
            raise _deny(
                "evidence from a simulated TEE is not allowed", Reason.SIMULATED_TEE_NOT_ALLOWED
            )
        if c.mrtd not in self.mrtds:
            raise _deny(f"MRTD {c.mrtd.hex()} is not allowed", Reason.MRTD_NOT_ALLOWED)
        if c.debug and not self.allow_debug:
            raise _deny("TD attributes allow debugging", Reason.DEBUG_FORBIDDEN)
        for i, allowed in enumerate(self.rtmrs):
            if allowed is not None and c.rtmrs[i] not in allowed:
                raise _deny(f"RTMR{i} is not allowed", Reason.RTMR_NOT_ALLOWED)
        if self.mrconfigids is not None and c.mrconfigid not in self.mrconfigids:
            raise _deny("MRCONFIGID is not allowed", Reason.MRCONFIGID_NOT_ALLOWED)
        if self.mrowners is not None and c.mrowner not in self.mrowners:
            raise _deny("MROWNER is not allowed", Reason.MROWNER_NOT_ALLOWED)
        if self.mrownerconfigs is not None and c.mrownerconfig not in self.mrownerconfigs:
            raise _deny("MROWNERCONFIG is not allowed", Reason.MROWNERCONFIG_NOT_ALLOWED)
        if self.fmspcs is not None and c.fmspc not in self.fmspcs:
            raise _deny(f"FMSPC {c.fmspc.hex()} is not allowed", Reason.FMSPC_NOT_ALLOWED)
        number = c.tcb_evaluation_data_number
        if number is None or number < self.min_tcb_evaluation_data_number:
            raise _deny(
                f"TCB info evaluation data number {number} is below the policy's minimum "
                f"{self.min_tcb_evaluation_data_number}",
                Reason.TCB_EVALUATION_TOO_OLD,
            )
        if c.tcb_status not in self.accepted_tcb_statuses:
            raise _deny(
                f"TCB status {c.tcb_status} is not accepted", Reason.TCB_STATUS_NOT_ACCEPTED
            )
        return c.mrtd


class _TdxPolicy:
    """The TDX entry of the rules registry."""

    section = SECTION

    def parse(self, section: Any, *, production: bool) -> TdxRules:
        """Strictly validates a ``tdx`` section (the broker's mode changes nothing here)."""
        w = SECTION
        s = fields.mapping(section, w, _KEYS)
        mrtds = fields.required_hex_set(s, "mrtds", 48, w)
        statuses = fields.choices(
            s, "accepted_tcb_statuses", ACCEPTABLE_TDX_STATUSES, ("UpToDate",), w
        )
        assert statuses is not None  # a default is given
        return TdxRules(
            mrtds=mrtds,
            rtmrs=tuple(fields.hex_set(s, f"rtmr{i}", 48, w) for i in range(4)),
            mrconfigids=fields.hex_set(s, "mrconfigids", 48, w),
            mrowners=fields.hex_set(s, "mrowners", 48, w),
            mrownerconfigs=fields.hex_set(s, "mrownerconfigs", 48, w),
            accepted_tcb_statuses=statuses,
            allow_debug=fields.boolean(s, "allow_debug", False, w),
            fmspcs=fields.hex_set(s, "fmspcs", 6, w),
            allow_simulated=fields.boolean(s, "allow_simulated", False, w),
            min_tcb_evaluation_data_number=fields.integer(
                s, "min_tcb_evaluation_data_number", 0, w, 0xFFFFFFFF
            ),
        )


TDX_POLICY = _TdxPolicy()
"""Registered for ``TeeType.TDX`` in ``strongroom.attestation.rules``."""
