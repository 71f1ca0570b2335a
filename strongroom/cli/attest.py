"""``strongroom attest verify``: verify an SNP report or TDX quote offline and print its claims.

The evidence type (SEV-SNP raw, Azure HCL-wrapped SNP, TDX quote) and encoding (raw, hex, base64)
are detected. ``--cert`` takes the VCEK/VLEK (DER or PEM); a PEM bundle may also carry the ASK/ARK,
which must be the pinned ones. ``--collateral`` takes TCB info / QE identity JSON, TCB-signing
chains (PEM) and CRLs (DER or PEM), recognised by content. Verification is as of ``--at``
(RFC 3339, default now) against the pinned production roots only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from strongroom.attestation.collateral import sniff_collateral_json
from strongroom.attestation.encoding import detect_evidence
from strongroom.attestation.errors import BAD_COLLATERAL, MalformedEvidence
from strongroom.attestation.evidence import Collateral, CollateralKind, Evidence
from strongroom.attestation.trust import TrustStore
from strongroom.attestation.verify import verify_evidence
from strongroom.errors import InvalidArgument, StrongroomError


def register(subparsers: Any) -> None:
    """Adds the ``attest`` command group to the ``strongroom`` CLI."""
    attest = subparsers.add_parser("attest", help="attestation evidence tools")
    sub = attest.add_subparsers(dest="attest_command", metavar="SUBCOMMAND", required=True)
    verify = sub.add_parser(
        "verify",
        help="verify an SEV-SNP report or TDX quote against the pinned AMD/Intel roots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("evidence", type=Path, help="report or quote file (raw, hex or base64)")
    verify.add_argument(
        "--cert", type=Path, action="append", default=[], help="VCEK/VLEK certificate (DER/PEM)"
    )
    verify.add_argument(
        "--collateral",
        type=Path,
        action="append",
        default=[],
        help="TCB info / QE identity JSON, TCB-signing chain PEM or CRL",
    )
    verify.add_argument("--at", help="verify as of this RFC 3339 time (default: now)")
    verify.set_defaults(func=_verify)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read {path}: {exc.strerror}", reason="FILE_UNREADABLE"
        ) from None


def _parse_time(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"--at {text!r} is not an RFC 3339 time", reason="BAD_TIME") from None
    if when.tzinfo is None:
        raise InvalidArgument(
            "--at needs a time zone (e.g. 2026-01-01T00:00:00Z)", reason="BAD_TIME"
        )
    return when


def _collateral_item(path: Path) -> Collateral:
    data = _read(path)
    kind = sniff_collateral_json(data)
    if kind == "tcbInfo":
        return Collateral(CollateralKind.TDX_TCB_INFO, data)
    if kind == "enclaveIdentity":
        return Collateral(CollateralKind.TDX_QE_IDENTITY, data)
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN CERTIFICATE-----"):
        return Collateral(CollateralKind.TCB_SIGNING_CHAIN, data)
    if stripped.startswith(b"-----BEGIN X509 CRL-----") or stripped[:1] == b"\x30":
        return Collateral(CollateralKind.CRL, data)
    raise MalformedEvidence(
        f"{path}: not TCB info, QE identity, a certificate chain or a CRL", reason=BAD_COLLATERAL
    )


def _verify(args: argparse.Namespace) -> int:
    detected = detect_evidence(_read(args.evidence))
    evidence = Evidence(
        tee_type=detected.tee_type,
        report=detected.data,
        certificates=tuple(_read(p) for p in args.cert),
        collateral=tuple(_collateral_item(p) for p in args.collateral),
    )
    now = _parse_time(args.at)
    try:
        claims = verify_evidence(evidence, trust=TrustStore.production(), now=now)
    except StrongroomError as exc:
        print(f"strongroom: verification failed: {exc}", file=sys.stderr)
        return 2
    out = {
        "verified": True,
        "as_of": now.isoformat(),
        "format": {"container": detected.container, "encoding": detected.encoding},
        "claims": claims.as_dict(),
    }
    print(json.dumps(out, indent=2, sort_keys=False))
    return 0
