"""How a key-encryption key version is stored in the token: metadata lives in the HSM only.

Every KEK version is one token object (AES-256, sensitive, never extractable, wrap/unwrap only,
``CKA_ALLOWED_MECHANISMS = [CKM_AES_KEY_WRAP_PAD]``), described entirely by its own attributes, so
broker replicas sharing the HSM agree with no other shared state:

- ``CKA_ID``    = ``b"strongroom/kek/" + key_id`` — shared by all versions of a key, so one
  ``C_FindObjects`` returns a key's versions.
- ``CKA_LABEL`` = ``strongroom/kek/<key_id>/v<version>/<created_at_ms>/<nonce16hex>`` — the version
  and creation time; the random nonce tells apart two replicas racing to create the same version.
  A version being created carries the suffix ``/pending`` and is invisible to readers until its
  creator has checked that no rival object claims the same version and renamed it (publication is one
  ``C_SetAttributeValue`` on ``CKA_LABEL``). A pending object older than :data:`PENDING_TTL_MS` is an
  abandoned attempt (its creator crashed) and may be destroyed by anyone.
- state    = ``CKA_WRAP`` and ``CKA_UNWRAP``: both true is *enabled*; disabling clears both, so the
  HSM itself refuses a disabled version (``CKR_KEY_FUNCTION_NOT_PERMITTED``) even if a replica's
  check raced with the change.

**Duplicates are tolerated, not assumed away.** Nothing in PKCS#11 makes a label unique, and two
SoftHSM2 instances sharing a token do not even see each other's objects reliably: measured here, when
two instances create objects at the same moment, one of them can miss the other's new object
*permanently* (until it is re-initialised), so two replicas rotating at once sometimes both publish
the same version despite the pending/check/publish protocol. So a version may have several
*candidate* objects. Readers agree on a deterministic winner (smallest ``(created_at_ms, nonce)``),
the only one used to wrap; unwrapping tries the winner first and then the others — RFC 5649's
integrity check tells which candidate a blob was wrapped under — so a data key wrapped under a
losing candidate stays usable by every replica that can see that candidate. Disabling a version
disables every candidate. With SoftHSM2, a replica that missed a concurrent creation cannot use data
keys wrapped under the object it missed until it reconnects; rotate on one replica at a time there.
A network HSM with one object store does not have this gap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from strongroom.identifiers import KEY_ID_PATTERN
from strongroom.keybroker.errors import HsmUnavailable
from strongroom.reasons import Reason

PREFIX = "strongroom/kek/"
PENDING_SUFFIX = "/pending"
PENDING_TTL_MS = 60_000
KEK_BITS = 256

_LABEL_RE = re.compile(
    rf"^strongroom/kek/(?P<key>{KEY_ID_PATTERN.pattern})/v(?P<version>[1-9][0-9]{{0,9}})"
    r"/(?P<ms>[0-9]{1,15})/(?P<nonce>[0-9a-f]{16})(?P<pending>/pending)?$"
)

#: Attributes of a KEK version at creation (python-pkcs11 adds CLASS, KEY_TYPE and VALUE_LEN).
KEK_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: True,
    Attribute.COPYABLE: False,
    Attribute.WRAP: True,
    Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_KEY_WRAP_PAD],
}

#: A data key unwrapped for re-wrapping: a session object nobody can read, only wrap.
SESSION_DEK_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}

#: A freshly generated data key that generate_data_key returns to its caller.
RETURNED_DEK_TEMPLATE: dict[Attribute, Any] = {
    **SESSION_DEK_TEMPLATE,
    Attribute.SENSITIVE: False,
}

#: Attributes read to describe a candidate object.
DESCRIBE_ATTRIBUTES = [Attribute.LABEL, Attribute.WRAP, Attribute.UNWRAP, Attribute.KEY_TYPE]

#: The search template for every KEK object in the token.
ALL_KEKS: dict[Attribute, Any] = {
    Attribute.CLASS: ObjectClass.SECRET_KEY,
    Attribute.KEY_TYPE: KeyType.AES,
    Attribute.TOKEN: True,
}


def object_id(key_id: str) -> bytes:
    """The CKA_ID shared by every version of ``key_id``."""
    return (PREFIX + key_id).encode("ascii")


def label(key_id: str, version: int, created_at_ms: int, nonce: str, *, pending: bool) -> str:
    """The CKA_LABEL of a version (see the module docstring)."""
    base = f"{PREFIX}{key_id}/v{version}/{created_at_ms}/{nonce}"
    return base + PENDING_SUFFIX if pending else base


@dataclass
class KekObject:
    """One KEK version found in the token, with the handle to use it."""

    key: Any  # python-pkcs11 SecretKey
    key_id: str
    version: int
    created_at_ms: int
    nonce: str
    pending: bool
    wrap: bool
    unwrap: bool

    @property
    def enabled(self) -> bool:
        """Both wrap and unwrap are permitted."""
        return self.wrap and self.unwrap


@dataclass
class KekVersion:
    """All candidate objects claiming one version of a key, winner first."""

    key_id: str
    version: int
    candidates: list[KekObject]

    @property
    def winner(self) -> KekObject:
        """The candidate every replica uses to wrap."""
        return self.candidates[0]

    @property
    def enabled(self) -> bool:
        """True only if every candidate is enabled (a half-disabled version counts as disabled)."""
        return all(c.enabled for c in self.candidates)


def group_versions(objects: list[KekObject]) -> list[KekVersion]:
    """Groups published objects of one key by version, ascending, each with its winner first."""
    by_version: dict[int, list[KekObject]] = {}
    for obj in objects:
        if not obj.pending:
            by_version.setdefault(obj.version, []).append(obj)
    return [
        KekVersion(
            key_id=candidates[0].key_id,
            version=version,
            candidates=sorted(candidates, key=lambda c: (c.created_at_ms, c.nonce)),
        )
        for version, candidates in sorted(by_version.items())
    ]


def describe(key: Any) -> KekObject | None:
    """Parses a candidate object; None when it is not a Strongroom KEK version."""
    try:
        attrs = key.get_attributes(DESCRIBE_ATTRIBUTES)
    except UnicodeDecodeError:
        # python-pkcs11 decodes CKA_LABEL as UTF-8: a damaged object file gives garbage.
        raise HsmUnavailable(
            "a key object in the token has an unreadable label (damaged object?)",
            reason=Reason.HSM_OPERATION_FAILED,
        ) from None
    text = attrs.get(Attribute.LABEL)
    if attrs.get(Attribute.KEY_TYPE) != KeyType.AES or not isinstance(text, str):
        return None
    match = _LABEL_RE.match(text)
    if match is None:
        return None
    return KekObject(
        key=key,
        key_id=match["key"],
        version=int(match["version"]),
        created_at_ms=int(match["ms"]),
        nonce=match["nonce"],
        pending=match["pending"] is not None,
        wrap=bool(attrs.get(Attribute.WRAP)),
        unwrap=bool(attrs.get(Attribute.UNWRAP)),
    )
