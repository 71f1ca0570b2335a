"""A certificate over the key broker's release-signing key, made where the private key is.

Inference trusts a key listed as a certificate only within the certificate's validity
(:mod:`strongroom.attestation.release_keys`), so a deploy that certifies the key gives it a
bounded life by default. This module makes such a certificate and keeps an existing one while it
still does: compose's bootstrap runs it at every ``up``::

    python3 -m strongroom.attestation.release_certificate --key release-signing-key \\
        --out release-signing-key.crt.pem [--days 365]

A fresh certificate begins :data:`BACKDATE` before the clock of the machine that makes it: a
server whose clock is behind that machine's by up to that, plus inference's own leeway, trusts it
at once. An existing certificate is kept (the file is not rewritten) while it certifies this very
key, is valid now and ends later than :func:`renew_within` of the validity asked for from now;
otherwise it is made again. Nothing of the private key is written or printed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from strongroom.attestation.release_keys import load_trusted_keys
from strongroom.attestation.release_signature import (
    DEFAULT_WARN_WITHIN,
    load_signing_key,
    signing_key_id,
)
from strongroom.errors import InvalidArgument
from strongroom.files import NotDurable, atomic_write

log = logging.getLogger(__name__)

#: How long before its making a fresh certificate begins (the module docstring).
BACKDATE = timedelta(minutes=5)
#: A certificate ending within this is made again: twice inference's default warning window, so
#: a deploy re-run at least monthly renews it before inference starts warning of it. Shorter for
#: a short validity (:func:`renew_within`).
RENEW_WITHIN = 2 * DEFAULT_WARN_WITHIN
#: The certificate's subject (and issuer: it is self-signed; inference reads neither).
SUBJECT = "strongroom key broker release-signing key"
#: The validity of a fresh certificate unless told otherwise.
DEFAULT_DAYS = 365
#: The longest validity made: the chart's own 100 years (a date past year 9999 cannot be made).
MAX_DAYS = 36500


def certify(key: Ed25519PrivateKey, *, days: int, now: datetime) -> bytes:
    """A self-signed PEM certificate over ``key``'s public half, valid from :data:`BACKDATE`
    before ``now`` to ``days`` days after ``now``."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"a release-signing certificate lasts 1 to {MAX_DAYS} days, not {days}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SUBJECT)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)  # Ed25519 signs without a separate digest
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def renew_within(days: int) -> timedelta:
    """How close to its end a certificate is made again when a fresh one lasts ``days``:
    :data:`RENEW_WITHIN`, or half the validity when that is shorter. A fixed 60 days made a
    certificate of 60 days or less again at every ``up`` (a fresh one already ends within them),
    so its dates moved and inference had to be restarted after each."""
    return min(RENEW_WITHIN, timedelta(days=days) / 2)


def renewal_reason(
    pem: bytes, key: Ed25519PrivateKey, now: datetime, *, within: timedelta = RENEW_WITHIN
) -> str | None:
    """Why the certificate ``pem`` does not do for ``key`` at ``now`` (so a fresh one is made);
    None when it does: one certificate, over this key, valid now, ending after ``within``
    (:func:`renew_within`)."""
    try:
        entries = load_trusted_keys(pem, source="the existing certificate")
    except InvalidArgument as exc:
        return exc.message
    not_after = entries[0].not_after if len(entries) == 1 else None
    if not_after is None:
        return "the file is not one certificate"
    if signing_key_id(entries[0].key) != signing_key_id(key.public_key()):
        return "it certifies another key"
    refused = entries[0].refusal(now)
    if refused is not None:
        return refused.message
    if not_after - now <= within:
        return f"it ends at {not_after.isoformat()}, within {within / timedelta(days=1):g} days"
    return None


def ensure(key_file: Path, out: Path, *, days: int, now: datetime) -> bool:
    """Makes ``out`` a certificate over the key in ``key_file`` unless the one there does
    (:func:`renewal_reason`); True when it wrote one. The file is public (mode 0644)."""
    key = load_signing_key(key_file.read_bytes())
    try:
        existing = out.read_bytes()
    except FileNotFoundError:
        reason = "none yet"
    else:
        reason = renewal_reason(existing, key, now, within=renew_within(days)) or ""
    if not reason:
        log.info("kept the release-signing certificate %s", out)
        return False
    atomic_write(out, certify(key, days=days, now=now), mode=0o644)
    log.info("made the release-signing certificate %s (%d days; %s)", out, days, reason)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``--key FILE --out FILE [--days N]``: :func:`ensure`, reporting on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--key", type=Path, required=True, help="the release-signing private key")
    parser.add_argument("--out", type=Path, required=True, help="the certificate (PEM) to keep")
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="validity of a fresh certificate"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.days <= MAX_DAYS:
        parser.error(f"--days must be 1 to {MAX_DAYS}, not {args.days}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        ensure(args.key, args.out, days=args.days, now=datetime.now(UTC))
    except InvalidArgument as exc:
        print(f"{exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except NotDurable as exc:
        # It names no file: the certificate is in place, only its directory's sync failed.
        print(
            f"{args.out}: the certificate was written, but its directory {args.out.parent} could "
            f"not be synced ({exc.strerror}): it may not survive a crash of the host (the next "
            "run keeps it, or makes it again)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        # A failed write names no file either (ENOSPC, EIO): the one being made is the one.
        problem = exc.strerror or type(exc).__name__
        print(f"{exc.filename or args.out}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
