"""Per-TEE release-policy rules: each TEE's section of a policy document and how claims meet it.

``strongroom.attestation.policy`` holds what every TEE shares (the document, the callers' SPIFFE
IDs, the allowed TEE types, the collateral-completeness gate, the decision record) and dispatches
everything TEE-specific through this registry, the same way ``verify_evidence`` dispatches to a
verifier. A new TEE is one verifier module (registered in ``strongroom.attestation.verify``) plus
one rules module registered in :data:`_RULES`; nothing else names a TEE type.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from strongroom.attestation.claims import VerifiedClaims
from strongroom.attestation.evidence import TeeType


class TeeRules(Protocol):
    """One TEE's rules, parsed from its section of a policy document."""

    @property
    def allow_debug(self) -> bool:
        """Whether these rules release to a debuggable VM (refused by a production broker)."""
        ...

    @property
    def allow_simulated(self) -> bool:
        """Whether these rules admit the simulated TEE (refused by a production broker)."""
        ...

    def evaluate(self, claims: VerifiedClaims) -> bytes:
        """Raises :class:`~strongroom.attestation.errors.PolicyViolation` (with its reason code)
        at the first failed check; otherwise returns the launch measurement that matched, for
        the decision record. ``claims`` are this TEE's (the policy dispatches on their type)."""
        ...


class TeePolicy(Protocol):
    """What a TEE's rules module registers: its section name and the section's parser."""

    @property
    def section(self) -> str:
        """The policy document's key for this TEE's section (``sev_snp``, ``tdx``)."""
        ...

    def parse(self, section: Any, *, production: bool) -> TeeRules:
        """Strictly validates the section (raising
        :class:`~strongroom.attestation.errors.PolicyInvalid` with the field path) into rules.
        ``production`` is the broker's mode."""
        ...


# One rules module per TEE, imported when first needed: (module, name of its TeePolicy).
_RULES: dict[TeeType, tuple[str, str]] = {
    TeeType.SEV_SNP: ("strongroom.attestation.rules.snp", "SNP_POLICY"),
    TeeType.TDX: ("strongroom.attestation.rules.tdx", "TDX_POLICY"),
}


def registered() -> dict[TeeType, TeePolicy]:
    """Every registered TEE and its policy module, in registration order."""
    out: dict[TeeType, TeePolicy] = {}
    for tee, (module, name) in _RULES.items():
        policy: TeePolicy = getattr(importlib.import_module(module), name)
        out[tee] = policy
    return out
