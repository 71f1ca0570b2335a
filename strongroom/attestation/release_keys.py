"""The key broker's release-signing public keys an inference server trusts, and for how long.

A key is given as a PEM public key (``PUBLIC KEY``) or as an X.509 certificate over it. **A
certificate bounds the key's life**: the key is trusted from its notBefore to its notAfter, judged
at each verification with this server's clock, so a retired or stolen key stops being trusted
when its certificate ends, whether or not every configuration was edited. A bare public key is
trusted until it is taken out of the configuration. The bound is a certificate's rather than a
date in the configuration because the configuration lists files (``release_signing_public_keys``):
the date then travels in the file with the key it bounds, and the Helm chart publishes the key as
a certificate already.

notBefore is given :data:`NOT_BEFORE_LEEWAY`: a certificate is often made moments before it is
used, on another machine (the chart makes one at each ``helm upgrade``, dated by the clock of the
machine that runs Helm), and a server whose clock is a little behind would otherwise refuse every
answer until it caught up. notAfter has none: past it, the key is refused.

Nothing else of a certificate is read (issuer, signature, extensions): the file that lists it is
what the operator trusts, and whoever can change the file can change the key in it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from strongroom.cryptoparse import KEY_PARSE_ERRORS, X509_PARSE_ERRORS
from strongroom.errors import InvalidArgument, Unauthenticated
from strongroom.reasons import Reason

#: How far ahead of this server's clock a certificate's notBefore may be (module docstring).
NOT_BEFORE_LEEWAY = timedelta(minutes=5)

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (PUBLIC KEY|CERTIFICATE)-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END \1-----"
)
# Every block's start, whatever follows it, so that one of another type, one that does not
# parse, or one whose BEGIN line is damaged is refused rather than passed over. A start read with
# its label (up to "-----") skipped a line that lost a dash ("-----BEGIN PRIVATE KEY----").
_PEM_BEGIN = re.compile(rb"-----BEGIN ?")
# How much of what follows "-----BEGIN " is looked at for its label (up to its closing dashes or
# the line's end): a private key's on one line runs on for its whole length.
_HEAD_MAX = 200
_HEAD_END = re.compile(rb"-----|[\r\n]")
# A label as PEM writers make them (RFC 7468's words, joined by single spaces or hyphens; in
# practice upper case, digits, "#" and "."), the only kind shown: a BEGIN line that lost its
# closing dashes runs on into the block's body, a private key's on one line included.
_PEM_LABEL = re.compile(rb"[A-Z0-9#.]{1,40}(?:[ -][A-Z0-9#.]{1,40}){0,7}")


@dataclass(frozen=True)
class TrustedKey:
    """One trusted release-signing public key, where it was read, and the validity of the
    certificate it came in (None for a bare public key: no bound)."""

    key: Ed25519PublicKey = field(repr=False)
    source: str
    not_before: datetime | None = None
    not_after: datetime | None = None

    def refusal(self, now: datetime) -> Unauthenticated | None:
        """Why an answer signed with this key is refused at ``now``; None while it is valid."""
        # ``source`` (this server's key file, the certificate's subject) is the operator's: a
        # refused LoadModel's caller is told the dates and what to do, not this server's paths.
        if self.not_after is not None and now > self.not_after:
            expired = f"expired at {self.not_after.isoformat()}"
            return Unauthenticated(
                _signed_with(expired, f"{self.source}; now {now.isoformat()}", _ROTATE),
                reason=Reason.RELEASE_SIGNING_KEY_EXPIRED,
                public=_signed_with(expired, f"now {now.isoformat()}", _ROTATE),
            )
        # now + leeway, not notBefore - leeway: a certificate may begin at year 1 (GeneralizedTime
        # admits it), before which no datetime reaches.
        if self.not_before is not None and now + NOT_BEFORE_LEEWAY < self.not_before:
            early = f"is valid only from {self.not_before.isoformat()}"
            check = "check this server's clock and the certificate's dates"
            return Unauthenticated(
                _signed_with(early, f"{self.source}; now {now.isoformat()}", check),
                reason=Reason.RELEASE_SIGNING_KEY_NOT_YET_VALID,
                public=_signed_with(early, f"now {now.isoformat()}", check),
            )
        return None

    def expiry_note(self, now: datetime, within: timedelta) -> str | None:
        """What an operator should hear of this key's validity at ``now``: expired, not yet
        valid, or ending within ``within``; None otherwise (and always for a bare key)."""
        refused = self.refusal(now)
        if refused is not None:
            return refused.message
        if self.not_after is not None and self.not_after - now <= within:
            return (
                f"the release-signing key of {self.source} expires at "
                f"{self.not_after.isoformat()}: answers signed with it are refused from then; "
                "list its successor beside it and switch the broker before then "
                "(deploy/README.md, 'Rotating the release-signing key')"
            )
        return None


_ROTATE = (
    "rotate the broker's release-signing key (deploy/README.md, 'Rotating the release-signing key')"
)


def _signed_with(state: str, where: str, todo: str) -> str:
    """Why an answer signed with a key whose certificate is in ``state`` is refused."""
    return (
        f"the key broker's release answer is signed with a key whose certificate {state} "
        f"({where}): {todo}"
    )


def load_trusted_keys(pem: bytes, *, source: str) -> list[TrustedKey]:
    """Every Ed25519 public key in ``pem``: SPKI PEM blocks (``PUBLIC KEY``) or certificates,
    whose validity bounds the key's (module docstring). One file may hold several: the old and
    the new key while the broker's is rotated. ``source`` names the file in errors and notes."""
    matches = list(_PEM_BLOCK.finditer(pem))
    _refuse_other_blocks(pem, {match.start() for match in matches}, source)
    blocks = [match.group(0) for match in matches]
    if not blocks:
        raise InvalidArgument(
            f"{source} holds no PEM public key (-----BEGIN PUBLIC KEY-----)",
            reason=Reason.RELEASE_SIGNING_KEY_INVALID,
        )
    trusted = []
    for number, block in enumerate(blocks, start=1):
        where = f"{source} key {number}" if len(blocks) > 1 else source
        key: object
        certificate = None
        try:
            if block.startswith(b"-----BEGIN CERTIFICATE-----"):
                certificate = x509.load_pem_x509_certificate(block)
                key = certificate.public_key()
            else:
                key = serialization.load_pem_public_key(block)
        except (*KEY_PARSE_ERRORS, *X509_PARSE_ERRORS):
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument(
                f"{source}: a key in it is not an Ed25519 public key",
                reason=Reason.RELEASE_SIGNING_KEY_INVALID,
            )
        if certificate is None:
            trusted.append(TrustedKey(key, where))
            continue
        trusted.append(_certified(key, certificate, where))
    return trusted


def _refuse_other_blocks(pem: bytes, starts: set[int], source: str) -> None:
    """Refuses a PEM block in ``pem`` that is not a public key or certificate ``starts`` (the
    offsets of those that parse) holds: passed over, a block pasted in by mistake (a CSR, a
    private key) or cut short left the operator believing it trusted, or harmless. A private key
    is named as one, and nothing of any block is shown but its type, and that only if it reads
    as a label."""
    for number, begin in enumerate(_PEM_BEGIN.finditer(pem), start=1):
        if begin.start() in starts:
            continue
        rest = pem[begin.end() : begin.end() + _HEAD_MAX]
        head = _HEAD_END.split(rest, maxsplit=1)[0]
        closed = rest.startswith(b"-----", len(head))
        label = head if closed and _PEM_LABEL.fullmatch(head) else None
        shown = repr(label.decode()) if label is not None else "its BEGIN line damaged"
        if b"PRIVATE KEY" in head.upper():  # "Private Key": no parser reads it, but it is one
            raise InvalidArgument(
                f"{source}: PEM block {number} is a private key ({shown}; not shown): a list "
                "of trusted release-signing keys holds public keys and certificates only, and "
                "whoever can read it could sign with that key; take it out of the file, and if "
                "it is the broker's release-signing key, replace that key (deploy/README.md, "
                "'Rotating the release-signing key')",
                reason=Reason.RELEASE_SIGNING_KEY_INVALID,
            )
        if label in (b"PUBLIC KEY", b"CERTIFICATE"):
            raise InvalidArgument(
                f"{source}: PEM block {number} ({shown}) does not parse: its END line is "
                "missing, or a line of it holds something besides base64 (spaces or tabs "
                "before or after it, which an editor or a terminal's copy may add, or a header "
                "line): write it as openssl does, each line nothing but its base64",
                reason=Reason.RELEASE_SIGNING_KEY_INVALID,
            )
        kind = f"is of type {shown}" if label is not None else f"has {shown} (not shown)"
        raise InvalidArgument(
            f"{source}: PEM block {number} {kind}: a list of trusted "
            "release-signing keys holds only public keys (-----BEGIN PUBLIC KEY-----) and "
            "certificates (-----BEGIN CERTIFICATE-----); take it out of the file",
            reason=Reason.RELEASE_SIGNING_KEY_INVALID,
        )


def _certified(key: Ed25519PublicKey, certificate: x509.Certificate, where: str) -> TrustedKey:
    """``key`` bounded by ``certificate``'s validity; refuses a validity no instant is within."""
    try:
        # Read on access, not at parse: a year no datetime holds (GeneralizedTime admits year 0)
        # raises here.
        subject = certificate.subject.rfc4514_string()
        not_before = certificate.not_valid_before_utc
        not_after = certificate.not_valid_after_utc
    except ValueError as exc:
        raise InvalidArgument(
            f"{where}: the certificate's dates or subject cannot be read ({exc})",
            reason=Reason.RELEASE_SIGNING_KEY_INVALID,
        ) from None
    if not_after < not_before:
        # notBefore's leeway would otherwise trust it for the minutes before notBefore that
        # are still before notAfter.
        raise InvalidArgument(
            f"{where}: the certificate's validity ends before it begins (notBefore "
            f"{not_before.isoformat()}, notAfter {not_after.isoformat()})",
            reason=Reason.RELEASE_SIGNING_KEY_INVALID,
        )
    return TrustedKey(key, f"{where}, certificate {subject!r}", not_before, not_after)


def judge(entries: Sequence[TrustedKey], now: datetime) -> Unauthenticated | TrustedKey | None:
    """How one key stands at ``now``, listed as ``entries`` (the same key may be listed several
    times: a renewed certificate beside the old, or bare beside a certificate): the refusal of
    its first entry when none is valid; else the valid certificate that bounds its life longest;
    None when a bare listing leaves it unbounded."""
    refusals = [entry.refusal(now) for entry in entries]
    valid = [entry for entry, refused in zip(entries, refusals, strict=True) if refused is None]
    if not valid:
        first = refusals[0]
        assert first is not None
        return first
    bounded = [entry for entry in valid if entry.not_after is not None]
    if len(bounded) < len(valid):
        return None
    return max(bounded, key=lambda entry: entry.not_after or now)
