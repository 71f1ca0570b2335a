"""Evidence domain type ⇄ proto, and encoding detection."""

from __future__ import annotations

from pathlib import Path

from strongroom.attestation import Collateral, CollateralKind, Evidence, TeeType
from strongroom.attestation.encoding import detect_evidence


def test_proto_round_trip() -> None:
    ev = Evidence(
        TeeType.TDX, b"quote", (b"cert",),
        (Collateral(CollateralKind.TDX_TCB_INFO, b"{}"), Collateral(CollateralKind.CRL, b"\x30")),
    )  # fmt: skip
    msg = ev.to_proto()
    assert msg.tee_type == 2 and msg.collateral[1].kind == 3
    assert Evidence.from_proto(msg) == ev
    assert "quote" not in repr(ev)


def test_detects_every_vector_format(vectors: Path) -> None:
    seen = set()
    for path in sorted((vectors / "snp").glob("*.bin")) + sorted((vectors / "tdx").glob("*.dat")):
        d = detect_evidence(path.read_bytes())
        seen.add((d.tee_type, d.container))
    hexed = detect_evidence((vectors / "snp/milan_v2_virtee.hex").read_bytes())
    assert (
        hexed.encoding == "hex" and hexed.data == (vectors / "snp/milan_v2_virtee.bin").read_bytes()
    )
    assert seen == {
        (TeeType.SEV_SNP, "snp"),
        (TeeType.SEV_SNP, "azure-hcl"),
        (TeeType.TDX, "tdx-quote"),
    }


def test_every_tee_type_has_exactly_one_verifier() -> None:
    """The verifier registry covers every TEE the evidence format names, each with its own module."""
    import importlib

    from strongroom.attestation.evidence import TeeType
    from strongroom.attestation.verify import _VERIFIERS

    assert set(_VERIFIERS) == set(TeeType)
    for tee_type, (module, name) in _VERIFIERS.items():
        assert callable(getattr(importlib.import_module(module), name)), tee_type
    assert len({module for module, _ in _VERIFIERS.values()}) == len(_VERIFIERS)
