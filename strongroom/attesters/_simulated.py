"""A simulated TEE behind the attester interface, for development and tests only.

It wraps ``strongroom.dev.simulated.SimulatedSnp`` / ``SimulatedTdx``, which produce
byte-exact reports and quotes signed by a TEST chain (verifiable only against a trust store that
adds the simulated roots). It refuses to exist in production mode, so a test shortcut can never be
reached from a production configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from strongroom.attestation.evidence import Evidence
from strongroom.attesters._base import (
    AttesterNotConfigured,
    EvidenceBundle,
    TeeType,
    check_echo,
    require_report_data,
)
from strongroom.attesters._layouts import snp_report_data, tdx_quote_report_data
from strongroom.reasons import Reason

# The launch measurement is a claim the simulator cannot invent: the deployment names it (it is
# what the release policy expects), so it is required rather than defaulted.
REQUIRED_CLAIMS = {TeeType.SEV_SNP: "measurement", TeeType.TDX: "mrtd"}


class SimulatedTee(Protocol):
    """What the attester needs from a simulator (``SimulatedSnp`` / ``SimulatedTdx``)."""

    def evidence(self, report_data: bytes, /, *args: Any, **claims: Any) -> Evidence:
        """Signed evidence (report or quote, certificates, collateral) binding ``report_data``."""
        ...


class SimulatedAttester:
    """Attester over a simulator; ``production=True`` is refused with SIMULATOR_IN_PRODUCTION.

    ``claims`` are passed to the simulator on every report: ``measurement`` (48 bytes) for SEV-SNP
    or ``mrtd`` (48 bytes) for TDX is required; other fields (``policy``, ``rtmrs``, ...) are
    optional.
    """

    def __init__(
        self,
        sim: SimulatedTee,
        tee_type: TeeType,
        *,
        production: bool,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        if production:
            raise AttesterNotConfigured(
                "the simulated attester cannot be used in production mode",
                reason=Reason.SIMULATOR_IN_PRODUCTION,
            )
        self._sim = sim
        self._tee_type = TeeType(tee_type)
        self._claims = dict(claims or {})
        required = REQUIRED_CLAIMS[self._tee_type]
        if required not in self._claims:
            raise AttesterNotConfigured(
                f"the simulated {self._tee_type.name} attester needs the {required!r} claim",
                reason=Reason.SIMULATOR_CLAIMS_MISSING,
            )

    def __repr__(self) -> str:
        return f"SimulatedAttester(tee_type={self._tee_type.name})"

    @property
    def tee_type(self) -> TeeType:
        """The simulated technology."""
        return self._tee_type

    def attest(self, report_data: bytes) -> EvidenceBundle:
        """Simulated, test-signed evidence binding exactly ``report_data``."""
        data = require_report_data(report_data)
        evidence = self._sim.evidence(data, **self._claims)
        if evidence.tee_type is not self._tee_type:
            raise AttesterNotConfigured(
                f"the simulator produced {evidence.tee_type.name} evidence, "
                f"configured for {self._tee_type.name}",
                reason=Reason.SIMULATOR_TEE_MISMATCH,
            )
        if self._tee_type is TeeType.SEV_SNP:
            check_echo(snp_report_data(evidence.report), data, "simulated SNP report")
        else:
            check_echo(tdx_quote_report_data(evidence.report), data, "simulated TDX quote")
        return EvidenceBundle(
            tee_type=self._tee_type,
            report=evidence.report,
            certificates=evidence.certificates,
            collateral=evidence.collateral,
            source="simulated",
        )
