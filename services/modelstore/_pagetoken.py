"""Opaque page tokens for keyset pagination: the last (name, version) returned, bound to the prefix.

The token is not secret (it only names a model the caller has just been shown) and not signed: a
forged token can only start a listing at another place the caller could ask for anyway. It is bound
to the prefix so that reusing it with another listing is an error rather than a silent skip.

Its name and version are a resume point, compared with the index's keys and never looked up, so
they are held to the grammar's lengths only, not to its characters: a page may end at a corrupt
filesystem index row whose name an edit put outside the grammar (``acme/m\n``), and the next page
must resume after that row rather than fail or list it again. They must still name a key a store
can hold: text that encodes to bytes (a row's bytes that are not UTF-8 read as surrogateescape's
``\udc80``-``\udcff``), and, for a backend whose keys are all in the grammar (S3's, ``grammar``),
a key in it: nothing else is any listing's resume point.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from strongroom import jsonparse
from strongroom.errors import InvalidArgument, StrongroomError
from strongroom.identifiers import (
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    validate_name,
    validate_prefix,
    validate_version,
)
from strongroom.modelstore.limits import MAX_PAGE_SIZE
from strongroom.modelstore.records import CorruptEntry, ModelPage, ModelRecord
from strongroom.reasons import Reason

_TAG = "ms1"
MAX_TOKEN_LENGTH = 4096
"""Room for the longest key a listing can end at: a name of MAX_NAME_LENGTH and a version of
MAX_VERSION_LENGTH characters outside ASCII (12 characters each in the token's escaped JSON) and
the longest prefix, base64-encoded."""


def encode(prefix: str, name: str, version: str) -> str:
    """The token resuming a listing of ``prefix`` after ``name``/``version``."""
    raw = json.dumps([_TAG, prefix, name, version], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(token: str, prefix: str, *, grammar: bool = False) -> tuple[str, str]:
    """The (name, version) to resume after; InvalidArgument(INVALID_PAGE_TOKEN) if unusable
    (``grammar``: unless both are in the name and version grammar)."""
    try:
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError("too long")
        padded = token + "=" * (-len(token) % 4)
        value = jsonparse.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if (
            not isinstance(value, list)
            or len(value) != 4
            or value[0] != _TAG
            or not all(isinstance(item, str) for item in value)
        ):
            raise ValueError("bad structure")
        _, token_prefix, name, version = value
        validate_prefix(token_prefix)
        if len(name) > MAX_NAME_LENGTH or len(version) > MAX_VERSION_LENGTH:
            raise ValueError("key too long")
        # The token is JSON, whose escapes make any code point: a lone surrogate ("\ud800") names
        # no key, and the backend's encoding of it failed with an untyped UnicodeEncodeError, so
        # any reader's forged token was INTERNAL, logged with a traceback, outside every budget.
        name.encode("utf-8", "surrogateescape")
        version.encode("utf-8", "surrogateescape")
        if grammar:
            # Keys outside it are no record of such a backend, never a page's last: one in a
            # listing's StartAfter (a NUL, U+FFFF) was answered 500 by the object store, UNAVAILABLE
            # to the caller and an ERROR for the operator, each retried by the client.
            validate_name(name)
            validate_version(version)
    except (ValueError, UnicodeError, binascii.Error, StrongroomError):
        raise InvalidArgument(
            "page_token is not a valid token", reason=Reason.INVALID_PAGE_TOKEN
        ) from None
    if token_prefix != prefix:
        raise InvalidArgument(
            "page_token belongs to a listing with another name_prefix",
            reason=Reason.INVALID_PAGE_TOKEN,
        )
    return name, version


def start(
    prefix: str, page_size: int, page_token: str, *, grammar: bool = False
) -> tuple[str, str] | None:
    """Checks a listing request; the (name, version) to resume after, None for the first page.

    InvalidArgument for a malformed prefix, a ``page_size`` outside 1..MAX_PAGE_SIZE
    (INVALID_PAGE_SIZE) or an unusable token (INVALID_PAGE_TOKEN; ``grammar``: one naming a key
    outside the name and version grammar is, see :func:`decode`).
    """
    validate_prefix(prefix)
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be between 1 and {MAX_PAGE_SIZE}", reason=Reason.INVALID_PAGE_SIZE
        )
    return decode(page_token, prefix, grammar=grammar) if page_token else None


def page_of(prefix: str, entries: Sequence[ModelRecord | CorruptEntry], *, more: bool) -> ModelPage:
    """The page of ``entries`` (in key order; ``more``: others follow them), its token naming
    the last entry, a corrupt one included (resuming before it would list it again)."""
    models = tuple(e for e in entries if isinstance(e, ModelRecord))
    corrupt = tuple(e for e in entries if isinstance(e, CorruptEntry))
    token = encode(prefix, entries[-1].name, entries[-1].version) if more and entries else ""
    return ModelPage(models=models, next_page_token=token, corrupt=corrupt)
