"""``strongroom audit verify PATH... [--log-name NAME] [--public-key PEM]``: check audit logs for tampering.

One file: its records, chain and signed head (PATH.head). A directory, or several paths: every
file of the log in them (``--log-name``, e.g. ``audit.log``: by default the one log whose files
they hold or given as a path; files of several logs are an error asking for ``--log-name``),
that is the log itself and the sealed ``<log>.<first>-<last>``
files a rotating broker leaves, each with its ``.head``, is checked alone, then as one chain:
each file must continue the one before it (its first seq and first record's ``prev`` are that
file's end and last hash) and be sealed if another follows. A file missing in the middle, a
reordered, renamed or substituted file is reported as tampering, naming it; a series starting
after seq 0 (older files deleted after shipping) is not, and the summary says where it starts.
A name shaped like a sealed file's but not as a rotation writes it (``audit.log.007-010``) is
SERIES_NAME_MISMATCH, as the broker's start calls it tampering; a log or head that is a symbolic
link is not followed (an error naming it, as the broker's). Files of other logs are left out,
as the broker reads only its own log's, and named. The summary ends with the granted key
releases per release-signing key (the key each record names,
by the first 16 hex digits of its id; "not named": releases recorded before records named it).

Exit status 0 when intact (a one-line summary on stdout), 2 when not (the first bad file or record
and the problem on stderr), 1 when it could not check (why, on stderr: a file it cannot read or
that is a link, no log, files of several logs, a log or directory another process keeps locked):
not verified either. Each is one line, non-printable characters shown escaped. Without
``--public-key`` the chain and the head's count are checked, but no signature against the broker's
key, and the summary says so and which key the heads carry or name: every head is checked with the key the
first head carrying one carries (HEAD_SIGNATURE_INVALID, exit 2), and a head naming another key
than the file before's is SERIES_KEY_CHANGED (exit 2: the broker never changes its key within a
chain), but a series rewritten whole with another key verifies, so pin the broker's public key
for a real guarantee. A running broker's log can be checked in place: the check covers the log as it
stood between two commits, and a directory whose series does not verify is listed and checked
again once a rotation under way has ended (one may come between the listing and the check:
SIGHUP's runs in a thread of its own), as is one whose listed file a shipper deleted meanwhile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from strongroom.cli._text import printable
from strongroom.errors import InvalidArgument, NotFound
from strongroom.files import os_error_cause
from strongroom.keybroker.audit import load_public_key
from strongroom.keybroker.audit_verify import verify_audit_log, verify_audit_paths
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
    verify.add_argument(
        "path",
        type=Path,
        nargs="+",
        help="an audit log file (its head is PATH.head), or a directory of them, or several",
    )
    verify.add_argument(
        "--log-name",
        metavar="NAME",
        help="the log whose files to check in a directory (the file name of the broker's "
        "keybroker.audit_log, e.g. audit.log); by default the one log whose files are there",
    )
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
                f"cannot read {args.public_key}: {os_error_cause(exc)}",
                reason=Reason.AUDIT_KEY_NOT_FOUND,
            ) from None
        key = load_public_key(pem)
    log_name: str | None = args.log_name
    if log_name is not None and (not log_name or log_name.startswith(".") or "/" in log_name):
        # Hidden names are a head's temporaries, never a log's (and not listed).
        raise InvalidArgument(
            f"--log-name {log_name!r}: give the log's file name, as audit.log (no '/', not hidden)"
        )
    paths: list[Path] = args.path
    if len(paths) > 1 or paths[0].is_dir():
        return _verify_series(paths, key, log_name)
    result = verify_audit_log(paths[0], public_key=key)
    # What the files hold is the other side's to choose: nothing read from them (nor the path)
    # reaches the auditor's terminal as a control sequence that could fake an "intact" line.
    if result.intact:
        print(printable(f"{paths[0]}: intact: {result.message}; last hash {result.last_hash}"))
        return 0
    where = f"record {result.bad_record}" if result.bad_record is not None else "head"
    print(
        printable(f"{paths[0]}: NOT intact: {result.problem} at {where}: {result.message}"),
        file=sys.stderr,
    )
    return EXIT_TAMPERED


def _verify_series(paths: list[Path], key: Any, log_name: str | None) -> int:
    result = verify_audit_paths(paths, public_key=key, log_name=log_name)
    if result.intact:
        last = result.files[-1][1].last_hash
        print(printable(f"intact: {result.message}; last hash {last}"))
        return 0
    where = f" record {result.bad_record}" if result.bad_record is not None else ""
    print(
        printable(f"{result.bad_file}{where}: NOT intact: {result.problem}: {result.message}"),
        file=sys.stderr,
    )
    return EXIT_TAMPERED
