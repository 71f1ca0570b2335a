"""A simulated TEE behind the attester interface, for development and tests only.

It wraps a simulator (``strongroom.attestation.simulated.SimulatedSnp`` / ``SimulatedTdx``) that
produces byte-exact reports signed by a test chain. It refuses to exist in production mode, so a
test shortcut can never be reached from a production configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from strongroom.inference.attesters._base import (
    AttesterNotConfigured,
    Collateral,
    EvidenceBundle,
    TeeType,
    check_echo,
    require_report_data,
)
from strongroom.inference.attesters._layouts import snp_report_data, tdx_quote_report_data


class SimulatedTee(Protocol):
    """What the attester needs from a simulator."""

    def report(self, report_data: bytes, /, **claims: Any) -> bytes:
        """A report (SNP) or quote (TDX) binding ``report_data``."""
        ...


class SimulatedAttester:
    """Attester over a simulator; ``production=True`` is refused with SIMULATOR_IN_PRODUCTION."""

    def __init__(
        self,
        sim: SimulatedTee,
        tee_type: TeeType,
        *,
        production: bool,
        certificates: Sequence[bytes] | None = None,
        collateral: Sequence[Collateral] = (),
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        if production:
            raise AttesterNotConfigured(
                "the simulated attester cannot be used in production mode",
                reason="SIMULATOR_IN_PRODUCTION",
            )
        self._sim = sim
        self._tee_type = TeeType(tee_type)
        if certificates is None:
            certificates = _simulator_certificates(sim)
        self._certificates = tuple(certificates)
        self._collateral = tuple(collateral)
        self._claims = dict(claims or {})

    def __repr__(self) -> str:
        return f"SimulatedAttester(tee_type={self._tee_type.name})"

    @property
    def tee_type(self) -> TeeType:
        """The simulated technology."""
        return self._tee_type

    def attest(self, report_data: bytes) -> EvidenceBundle:
        """A simulated report binding exactly ``report_data``."""
        data = require_report_data(report_data)
        report = self._sim.report(data, **self._claims)
        if self._tee_type is TeeType.SEV_SNP:
            check_echo(snp_report_data(report), data, "simulated SNP report")
        else:
            check_echo(tdx_quote_report_data(report), data, "simulated TDX quote")
        return EvidenceBundle(
            tee_type=self._tee_type,
            report=report,
            certificates=self._certificates,
            collateral=self._collateral,
            source="simulated",
        )


def _simulator_certificates(sim: object) -> tuple[bytes, ...]:
    """The DER certificates a simulator publishes, if it has a ``certificates`` attribute."""
    certificates = getattr(sim, "certificates", None)
    if callable(certificates):
        certificates = certificates()
    if certificates is None:
        return ()
    return tuple(bytes(c) for c in certificates)
