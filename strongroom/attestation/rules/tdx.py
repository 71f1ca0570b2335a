"""TDX release rules: the ``tdx`` section of a policy (``services/keybroker/POLICY.md``)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

from strongroom.attestation.abi import tdx as abi
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
# Intel's advisory ids as TCB info lists them (INTEL-SA-00615, INTEL-DOC-...).
_ADVISORY_ID = re.compile(r"\AINTEL-[A-Z]{2,8}-[0-9]{1,8}\Z")


def _advisory_ids(value: Any) -> frozenset[str]:
    items = schema.allow_list(value)
    bad = [i for i in items if not isinstance(i, str) or not _ADVISORY_ID.match(i)]
    if bad:
        raise schema.invalid(
            Reason.POLICY_BAD_VALUE, f"{bad[0]!r} is not an Intel advisory id (INTEL-SA-00615)"
        )
    return frozenset(items)


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


def _bits(bits: tuple[int, ...]) -> str:
    return ", ".join(str(b) for b in bits)


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
    # Statuses below UpToDate come with the advisories that explain them: a fleet that reviewed
    # some accepts those and refuses a platform whose level names any other.
    accepted_advisory_ids: Annotated[frozenset[str] | None, BeforeValidator(_advisory_ids)] = None
    allow_debug: schema.Bool = False
    fmspcs: schema.OptionalHex6 = None
    allow_simulated: schema.Bool = False
    min_tcb_evaluation_data_number: schema.U32 = 0
    # The host chooses ATTRIBUTES, XFAM and the bound service TDs when it creates the TD; none of
    # them is in MRTD or the RTMRs, so only these rules tie them to what the owner intended.
    allow_migratable: schema.Bool = False
    mr_servicetds: schema.OptionalHex48 = None
    require_sept_ve_disable: schema.Bool = False
    td_attributes: schema.OptionalHex8 = None
    xfams: schema.OptionalHex8 = None

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
        self._check_launch_settings(c)
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
                f"TCB evaluation data number {number} (the lower of the TCB info's and the QE "
                f"identity's) is below the policy's minimum "
                f"{self.min_tcb_evaluation_data_number}",
                Reason.TCB_EVALUATION_TOO_OLD,
            )
        if c.tcb_status not in self.accepted_tcb_statuses:
            raise _deny(
                f"TCB status {c.tcb_status} is not accepted", Reason.TCB_STATUS_NOT_ACCEPTED
            )
        if self.accepted_advisory_ids is not None:
            unreviewed = [a for a in c.advisory_ids if a not in self.accepted_advisory_ids]
            if unreviewed:
                raise _deny(
                    f"TCB status {c.tcb_status} names advisories the policy does not accept: "
                    f"{', '.join(unreviewed)}",
                    Reason.ADVISORY_NOT_ACCEPTED,
                )
        return c.mrtd

    def _check_launch_settings(self, c: TdxClaims) -> None:
        """Judges what the host set when it created the TD (ATTRIBUTES, XFAM, MR_SERVICETD)."""
        attrs = c.td_attributes.hex()
        debug = abi.attribute_bits(c.td_attributes, abi.TD_ATTR_UNDER_DEBUG_MASK)
        if debug and not self.allow_debug:
            raise _deny(
                f"TD attributes {attrs} set TD-under-debug bit(s) {_bits(debug)} (bits 0-7: the "
                "host can read or observe the TD)",
                Reason.DEBUG_FORBIDDEN,
            )
        reserved = abi.attribute_bits(c.td_attributes, abi.TD_ATTR_RESERVED_MASK)
        if reserved:
            raise _deny(
                f"TD attributes {attrs} set reserved bit(s) {_bits(reserved)}, which no known "
                "TDX module defines",
                Reason.TD_ATTRIBUTES_RESERVED,
            )
        migratable = abi.attribute_bits(c.td_attributes, 1 << abi.TD_ATTR_MIGRATABLE_BIT)
        if migratable and not self.allow_migratable:
            raise _deny(
                f"TD attributes {attrs} set MIGRATABLE (bit 29): the TD's memory can be moved "
                "to another platform",
                Reason.MIGRATABLE_FORBIDDEN,
            )
        # All zeros: no service TD is bound. A TD 1.0 body has no MR_SERVICETD field at all.
        servicetd = c.mr_servicetd or bytes(48)
        if any(servicetd) and servicetd not in (self.mr_servicetds or ()):
            raise _deny(
                f"MR_SERVICETD {servicetd.hex()} is not allowed (a service TD, such as a "
                "migration TD, is bound to this TD)",
                Reason.MR_SERVICETD_NOT_ALLOWED,
            )
        sept = abi.attribute_bits(c.td_attributes, 1 << abi.TD_ATTR_SEPT_VE_DISABLE_BIT)
        if self.require_sept_ve_disable and not sept:
            raise _deny(
                f"TD attributes {attrs} do not set SEPT_VE_DISABLE (bit 28), which the policy "
                "requires",
                Reason.SEPT_VE_DISABLE_REQUIRED,
            )
        if self.td_attributes is not None and c.td_attributes not in self.td_attributes:
            raise _deny(f"TD attributes {attrs} are not allowed", Reason.TD_ATTRIBUTES_NOT_ALLOWED)
        if self.xfams is not None and c.xfam not in self.xfams:
            raise _deny(f"XFAM {c.xfam.hex()} is not allowed", Reason.XFAM_NOT_ALLOWED)


class _TdxPolicy:
    """The TDX entry of the rules registry."""

    section = SECTION

    def parse(self, section: Any, *, production: bool) -> TdxRules:
        """Strictly validates a ``tdx`` section (the broker's mode changes nothing here)."""
        return schema.load(TdxRules, SECTION, section)


TDX_POLICY = _TdxPolicy()
"""Registered for ``TeeType.TDX`` in ``strongroom.attestation.rules``."""
