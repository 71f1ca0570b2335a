"""SPIFFE IDs (``spiffe://<trust-domain>/<path>``), parsed strictly as the SPIFFE-ID specification says.

The trust domain is lowercase letters, digits, ``.``, ``-`` and ``_``; the path is ``/``-separated
non-empty segments of letters, digits, ``.``, ``-`` and ``_`` with no ``.``/``..`` segment and no
trailing slash; no port, user info, query or fragment; at most 2048 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from strongroom.errors import InvalidArgument
from strongroom.reasons import Reason


class MalformedSpiffeId(InvalidArgument):
    """A string is not a valid SPIFFE ID (scheme, trust domain or path)."""

    default_reason = Reason.MALFORMED_SPIFFE_ID


_SCHEME = "spiffe://"
_MAX_LENGTH = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def _check_trust_domain(trust_domain: str, original: str) -> None:
    if not trust_domain:
        raise MalformedSpiffeId(f"SPIFFE ID {original!r} has an empty trust domain")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise MalformedSpiffeId(
            f"SPIFFE ID {original!r}: the trust domain may hold only lowercase letters, digits, "
            "'.', '-' and '_' (no port, user info or upper case)"
        )


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. Build one with :meth:`parse` or :meth:`of`."""

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain, str(self))
        if self.path:
            if not self.path.startswith("/"):
                raise MalformedSpiffeId(f"SPIFFE ID path {self.path!r} must start with '/'")
            for segment in self.path[1:].split("/"):
                if not segment:
                    raise MalformedSpiffeId(
                        f"SPIFFE ID {str(self)!r} has an empty path segment or a trailing '/'"
                    )
                if segment in {".", ".."}:
                    raise MalformedSpiffeId(
                        f"SPIFFE ID {str(self)!r} has a '.' or '..' path segment"
                    )
                if not _SEGMENT.fullmatch(segment):
                    raise MalformedSpiffeId(
                        f"SPIFFE ID {str(self)!r}: path segments may hold only letters, digits, "
                        "'.', '-' and '_'"
                    )
        if len(str(self).encode()) > _MAX_LENGTH:
            raise MalformedSpiffeId(f"SPIFFE ID is longer than {_MAX_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parses ``spiffe://trust-domain/path``; raises :class:`MalformedSpiffeId` otherwise."""
        if len(text.encode()) > _MAX_LENGTH:
            raise MalformedSpiffeId(f"SPIFFE ID is longer than {_MAX_LENGTH} bytes")
        if not text.startswith(_SCHEME):
            shown = text if len(text) <= 80 else text[:80] + "…"
            raise MalformedSpiffeId(f"{shown!r} is not a SPIFFE ID (scheme must be 'spiffe://')")
        rest = text[len(_SCHEME) :]
        if "?" in rest or "#" in rest:
            raise MalformedSpiffeId(f"SPIFFE ID {text!r} must not have a query or fragment")
        trust_domain, slash, path = rest.partition("/")
        _check_trust_domain(trust_domain, text)
        return cls(trust_domain, slash + path if slash else "")

    @classmethod
    def of(cls, trust_domain: str, *segments: str) -> SpiffeId:
        """Builds ``spiffe://trust_domain/seg1/seg2``."""
        return cls(trust_domain, "".join("/" + s for s in segments))

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    def member_of(self, trust_domain: str) -> bool:
        """Tells whether this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain


def is_workload_id(text: str) -> bool:
    """Tells whether ``text`` is a valid SPIFFE ID naming a workload (a trust domain and a path)."""
    try:
        return bool(SpiffeId.parse(text).path)
    except MalformedSpiffeId:
        return False


#: The DNS suffix reserved for names derived from SPIFFE IDs (:func:`identity_dns_name`): no
#: operator-chosen DNS name may end in it, so that only the certificate of the workload a derived
#: name stands for carries it. ``.invalid`` (RFC 2606) never resolves: the name is only checked.
IDENTITY_DNS_SUFFIX = "spiffe-id.strongroom.invalid"


def identity_dns_name(spiffe_id: SpiffeId | str) -> str:
    """The DNS name that stands for ``spiffe_id`` in certificates: ``<label>.`` + :data:`IDENTITY_DNS_SUFFIX`.

    ``<label>`` is the SHA-256 of the ID's text (``spiffe://...``, UTF-8), in lower-case base32
    without padding (52 characters, within a DNS label's 63). A hash rather than the ID itself:
    path segments may hold upper case and ``_`` and be longer than a label, which host-name
    matching (case-insensitive) would not keep apart; SHA-256 keeps distinct IDs apart (a
    collision is not known to be findable). Every workload certificate carries the name of its
    own ID, and a channel expecting a server's ID makes gRPC's host-name check ask for it, so
    that check, made by gRPC on every connection, is the identity check.
    """
    text = str(SpiffeId.parse(str(spiffe_id)))  # validated, in its one canonical form
    digest = hashlib.sha256(text.encode()).digest()
    label = base64.b32encode(digest).decode("ascii").rstrip("=").lower()
    return f"{label}.{IDENTITY_DNS_SUFFIX}"


def is_reserved_dns_name(name: str) -> bool:
    """Whether ``name`` is in the suffix reserved for derived names (case-insensitive, as DNS
    names are matched; a trailing dot ignored)."""
    folded = name.strip().rstrip(".").lower()
    return folded == IDENTITY_DNS_SUFFIX or folded.endswith("." + IDENTITY_DNS_SUFFIX)
