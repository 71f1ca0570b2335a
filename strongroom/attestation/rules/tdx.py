"""TDX release rules: the ``tdx`` section of a policy (``services/keybroker/POLICY.md``)."""

from __future__ import annotations

from typing import Annotated, Any

from strongroom.attestation.claims import TdxClaims, VerifiedClaims
from strongroom.attestation.errors import PolicyViolation
from strongroom.attestation.rules import schema
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


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


class TdxRules(schema.Section):
    """Rules for TDX evidence (the ``tdx`` section; see POLICY.md for each key)."""

    mrtds: schema.Hex48
    rtmr0: schema.OptionalHex48 = None
    rtmr1: schema.OptionalHex48 = None
    rtmr2: schema.OptionalHex48 = None
    rtmr3: schema.OptionalHex48 = None
    mrconfigids: schema.OptionalHex48 = None
    mrowners: schema.OptionalHex48 = None
    mrownerconfigs: schema.OptionalHex48 = None
    accepted_tcb_statuses: Annotated[frozenset[str], schema.one_of(ACCEPTABLE_TDX_STATUSES)] = (
        frozenset({"UpToDate"})
    )
    allow_debug: schema.Bool = False
    fmspcs: schema.OptionalHex6 = None
    allow_simulated: schema.Bool = False
    min_tcb_evaluation_data_number: schema.U32 = 0

    @property
    def rtmrs(self) -> tuple[frozenset[bytes] | None, ...]:
        """The RTMR0..3 allow-lists in register order (None: unconstrained)."""
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

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
        return schema.load(TdxRules, SECTION, section)


TDX_POLICY = _TdxPolicy()
"""Registered for ``TeeType.TDX`` in ``strongroom.attestation.rules``."""
