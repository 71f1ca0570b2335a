"""``strongroom audit verify PATH [--public-key PEM]``: check an audit log for tampering.

Exit status 0 when the log is intact (a one-line summary on stdout), 2 when it is not (the first
bad record and the problem on stderr). Each is one line, non-printable characters shown escaped.
Without ``--public-key`` the chain and the head's count are checked but not the head's signature,
and the summary says so. A running broker's log can be
checked in place: the check covers the log as it stood between two commits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from strongroom.cli._text import printable
from strongroom.errors import NotFound
from strongroom.keybroker.audit import load_public_key, verify_audit_log
from strongroom.reasons import Reason

EXIT_TAMPERED = 2


def register(subparsers: Any) -> None:
    """Adds the ``audit`` command group to the ``strongroom`` parser."""
    audit = subparsers.add_parser("audit", help="inspect the key broker's audit log")
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        help="check an audit log's hash chain and signed head",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("path", type=Path, help="the audit log file (its head is PATH.head)")
    verify.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="Ed25519 public key (SPKI PEM) that signs the head; without it the signature is not checked",
    )
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    key = None
    if args.public_key is not None:
        try:
            pem = args.public_key.read_bytes()
        except OSError as exc:
            raise NotFound(
                f"cannot read {args.public_key}: {exc.strerror}", reason=Reason.AUDIT_KEY_NOT_FOUND
            ) from None
        key = load_public_key(pem)
    result = verify_audit_log(args.path, public_key=key)
    # What the files hold is the other side's to choose: nothing read from them (nor the path)
    # reaches the auditor's terminal as a control sequence that could fake an "intact" line.
    if result.intact:
        print(printable(f"{args.path}: intact: {result.message}; last hash {result.last_hash}"))
        return 0
    where = f"record {result.bad_record}" if result.bad_record is not None else "head"
    print(
        printable(f"{args.path}: NOT intact: {result.problem} at {where}: {result.message}"),
        file=sys.stderr,
    )
    return EXIT_TAMPERED
