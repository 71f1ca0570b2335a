"""``strongroom attest``: verify evidence offline, and manage a collateral cache.

``attest verify`` recognises the evidence type (SEV-SNP raw, Azure HCL-wrapped SNP, TDX quote) and
encoding (raw, hex, base64). ``--cert`` takes the VCEK/VLEK (DER or PEM); a PEM bundle may also
carry the ASK/ARK, which must be the pinned ones. The collateral that judges the evidence (CRLs,
TDX TCB info, QE identity) comes from the verifier, resolved as the broker does: ``--collateral-dir``
(a collateral cache), filled on demand from ``--pcs-url`` / ``--kds-url`` when given, or explicit
``--collateral`` files (TCB info / QE identity JSON, TCB-signing chain PEM, CRLs; of several CRLs
of one CA the newest counts, and an ARK's VCEK and VLEK CRLs, which share its name, are told apart
by their issuing distribution point or refused as COLLATERAL_AMBIGUOUS). Missing or
stale collateral fails closed unless ``--allow-incomplete-collateral`` (inspection only: the
claims then say what was not checked). Verification is as of ``--at`` (RFC 3339, default now)
against the pinned production roots. Exit codes: 0 verified, 2 refused (with its reason), 1 usage.

``attest collateral fetch|import|ls`` fill and list a collateral cache (see POLICY.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from strongroom.attestation.abi.snp import PRODUCTS
from strongroom.attestation.collateral import (
    CollateralSource,
    StaticCollateralSource,
    sniff_collateral_json,
)
from strongroom.attestation.collateral_cache import CollateralCache
from strongroom.attestation.collateral_fetch import (
    AMD_KDS_URL,
    INTEL_PCS_URL,
    CollateralService,
    FetchSettings,
)
from strongroom.attestation.encoding import detect_evidence
from strongroom.attestation.errors import MalformedEvidence
from strongroom.attestation.evidence import Evidence
from strongroom.attestation.trust import TrustStore
from strongroom.attestation.verify import verify_evidence
from strongroom.errors import InvalidArgument, StrongroomError
from strongroom.files import read_file
from strongroom.reasons import Reason


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
        help="explicit collateral file: TCB info / QE identity JSON, TCB-signing chain PEM, CRL",
    )
    verify.add_argument("--collateral-dir", type=Path, help="a collateral cache directory")
    _fetch_args(verify, required=False)
    verify.add_argument(
        "--allow-incomplete-collateral",
        action="store_true",
        help="inspect evidence whose CRLs/TCB info/QE identity are not available (never a pass "
        "for a release policy)",
    )
    verify.add_argument("--grace-seconds", type=float, default=0.0, help="accept collateral "
                        "this long past its nextUpdate")  # fmt: skip
    verify.add_argument("--at", help="verify as of this RFC 3339 time (default: now)")
    verify.set_defaults(func=_verify)

    coll = sub.add_parser("collateral", help="fill and list a collateral cache")
    csub = coll.add_subparsers(dest="collateral_command", metavar="ACTION", required=True)
    fetch = csub.add_parser("fetch", help="fetch collateral from KDS and PCS/PCCS into a cache")
    fetch.add_argument("--dir", type=Path, required=True, help="the collateral cache directory")
    fetch.add_argument("--fmspc", action="append", default=[], help="TDX FMSPC (hex), repeatable")
    fetch.add_argument(
        "--product", action="append", default=[], choices=PRODUCTS,
        help="AMD product whose VCEK/VLEK CRLs to fetch, repeatable",
    )  # fmt: skip
    _fetch_args(fetch, required=False)
    fetch.set_defaults(func=_collateral_fetch)
    imp = csub.add_parser("import", help="verify and import a directory in the cache layout")
    imp.add_argument("source", type=Path, help="directory to import (e.g. carried in)")
    imp.add_argument("--dir", type=Path, required=True, help="the collateral cache directory")
    imp.set_defaults(func=_collateral_import)
    ls = csub.add_parser(
        "ls", help="list what a cache holds and until when, and the files it refuses (and why)"
    )
    ls.add_argument("--dir", type=Path, required=True, help="the collateral cache directory")
    ls.set_defaults(func=_collateral_ls)


def _fetch_args(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--pcs-url", help=f"Intel PCS or a PCCS (e.g. {INTEL_PCS_URL})")
    parser.add_argument("--kds-url", help=f"AMD KDS (e.g. {AMD_KDS_URL})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=3, help="retries with backoff")


def _settings(args: argparse.Namespace) -> FetchSettings | None:
    if not args.pcs_url and not args.kds_url:
        return None
    try:
        return FetchSettings(
            pcs_url=args.pcs_url or INTEL_PCS_URL,
            kds_url=args.kds_url or AMD_KDS_URL,
            timeout_seconds=args.timeout,
            retries=args.retries,
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc), reason=Reason.BAD_URL) from None


def _parse_time(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"--at {text!r} is not an RFC 3339 time", reason=Reason.BAD_TIME
        ) from None
    if when.tzinfo is None:
        raise InvalidArgument(
            "--at needs a time zone (e.g. 2026-01-01T00:00:00Z)", reason=Reason.BAD_TIME
        )
    return when


def _static_source(paths: list[Path]) -> StaticCollateralSource:
    tcb: list[bytes] = []
    qe: list[bytes] = []
    chains: list[bytes] = []
    crls: list[bytes] = []
    for path in paths:
        data = read_file(path)
        kind = sniff_collateral_json(data)
        stripped = data.lstrip()
        if kind == "tcbInfo":
            tcb.append(data)
        elif kind == "enclaveIdentity":
            qe.append(data)
        elif stripped.startswith(b"-----BEGIN CERTIFICATE-----"):
            chains.append(data)
        elif stripped.startswith(b"-----BEGIN X509 CRL-----") or stripped[:1] == b"\x30":
            crls.append(data)
        else:
            raise MalformedEvidence(
                f"{path}: not TCB info, QE identity, a certificate chain or a CRL",
                reason=Reason.BAD_COLLATERAL,
            )
    return StaticCollateralSource(
        tcb_infos=tuple(tcb),
        qe_identity=qe[0] if qe else None,
        signing_chain=chains[0] if chains else None,
        crl_list=tuple(crls),
    )


class _Layered:
    """Explicit files first, then the cache (each a verifier-owned source)."""

    def __init__(self, *sources: CollateralSource) -> None:
        self._sources = sources

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            for source in self._sources:
                found = getattr(source, name)(*args)
                if found is not None:
                    return found
            return None

        return call


def _source(args: argparse.Namespace, trust: TrustStore, now: dt.datetime) -> CollateralSource:
    sources: list[CollateralSource] = [_static_source(args.collateral)]
    settings = _settings(args)
    directory = args.collateral_dir
    if directory is None and settings is not None:
        directory = Path(tempfile.mkdtemp(prefix="strongroom-collateral-"))
    if directory is not None:
        # The cache judges a VCEK's validity at its clock (one it holds, one it fetches): the
        # verification's time (--at), or a VCEK valid then but not today was not held, or was
        # refused as fetched outside its validity.
        cache = CollateralCache(directory, trust, writable=settings is not None, clock=lambda: now)
        sources.append(CollateralService(cache, settings))
    return _Layered(*sources)


def _verify(args: argparse.Namespace) -> int:
    now = _parse_time(args.at)
    trust = TrustStore.production()
    try:
        detected = detect_evidence(read_file(args.evidence))
        evidence = Evidence(
            tee_type=detected.tee_type,
            report=detected.data,
            certificates=tuple(read_file(p) for p in args.cert),
        )
        claims = verify_evidence(
            evidence,
            trust=trust,
            now=now,
            collateral=_source(args, trust, now),
            require_collateral=not args.allow_incomplete_collateral,
            collateral_grace=dt.timedelta(seconds=max(0.0, args.grace_seconds)),
        )
    except StrongroomError as exc:
        if exc.reason in ("FILE_UNREADABLE", "BAD_URL"):
            raise
        print(f"strongroom: verification failed: {exc}", file=sys.stderr)
        return 2
    out = {
        "verified": True,
        "collateral_complete": claims.collateral_complete,
        "as_of": now.isoformat(),
        "format": {"container": detected.container, "encoding": detected.encoding},
        "claims": claims.as_dict(),
    }
    print(json.dumps(out, indent=2, sort_keys=False))
    return 0


def _collateral_fetch(args: argparse.Namespace) -> int:
    settings = _settings(args) or FetchSettings(timeout_seconds=args.timeout, retries=args.retries)
    try:
        fmspcs = tuple(bytes.fromhex(f) for f in args.fmspc)
    except ValueError:
        raise InvalidArgument("--fmspc must be hex", reason=Reason.BAD_FMSPC) from None
    if any(len(f) != 6 for f in fmspcs):
        raise InvalidArgument("--fmspc must be 6 bytes (12 hex digits)", reason=Reason.BAD_FMSPC)
    cache = CollateralCache(args.dir, TrustStore.production())
    entries = CollateralService(cache, settings).fetch_all(
        fmspcs=fmspcs, products=tuple(args.product)
    )
    print(json.dumps([e.as_dict() for e in entries], indent=2))
    return 0


def _collateral_import(args: argparse.Namespace) -> int:
    cache = CollateralCache(args.dir, TrustStore.production())
    entries = cache.import_directory(args.source)
    print(json.dumps([e.as_dict() for e in entries], indent=2))
    return 0


def _collateral_ls(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise InvalidArgument(f"{args.dir} is not a directory", reason=Reason.FILE_UNREADABLE)
    cache = CollateralCache(args.dir, TrustStore.production(), writable=False)
    now = dt.datetime.now(dt.UTC)
    rows = []
    for entry in cache.entries():
        row = entry.as_dict()
        row["current"] = entry.next_update is None or now <= entry.next_update
        rows.append(row)
    # Files the cache skipped: a release needing one is refused COLLATERAL_MISSING although the
    # file is there, and this is where an operator sees why.
    for path, why in sorted(cache.refused().items()):
        rows.append({"path": str(path), "refused": why, "current": False})
    print(json.dumps(rows, indent=2))
    return 0
