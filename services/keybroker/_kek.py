"""How a key-encryption key version is stored in the token: metadata lives in the HSM only.

Every KEK version is one token object (AES-256, sensitive, never extractable, wrap/unwrap only,
``CKA_ALLOWED_MECHANISMS = [CKM_AES_KEY_WRAP_PAD]``), described entirely by its own attributes, so
broker replicas sharing the HSM agree with no other shared state:

- ``CKA_ID``    = ``b"strongroom/kek/" + key_id`` — shared by all versions of a key, so one
  ``C_FindObjects`` returns a key's versions.
- ``CKA_LABEL`` = ``strongroom/kek/<key_id>/v<version>/<created_at_ms>/<nonce16hex>`` — the version
  and creation time; the random nonce tells apart two replicas racing to create the same version.

**A KEK is immutable** (``CKA_MODIFIABLE=false``, ``CKA_COPYABLE=false``, checked after creation with
``CKA_SENSITIVE=true`` and ``CKA_EXTRACTABLE=false``): nobody holding the token PIN can later turn on
an extra use, rename it into another key's identity or copy it. Nothing the broker does modifies one:

- *Creating a version* (claim/check/publish). A replica first makes the version's **enabler**: a
  small generic-secret object (no capability at all) with the version's label, its own nonce and the
  suffix ``/enabled``; until a KEK of that version exists it is only a claim, invisible to readers.
  If no rival object (another nonce's enabler or KEK) claims the same version, it generates the KEK
  with its final label — that generation is the publication, the one write that makes the version
  visible, and it passes the change's audit gate; otherwise it destroys its enabler and backs off.
  An enabler older than :data:`PENDING_TTL_MS` of a version above every published one that has no
  KEK is an abandoned attempt (its creator crashed) and may be destroyed by anyone — judged only
  on a token re-read (a creation that meets any claim without its KEK runs again on one), and
  recorded in the audit log before it goes (``reap_key_claim``); a creation reads its enabler
  back before it publishes, and one reaped meanwhile publishes nothing. An AES object with the
  suffix ``/pending`` is the claim of a broker before this (whose pending object was the KEK itself,
  renamed on publication): a rival, and reaped the same way.
- *State*: a version with an immutable KEK is enabled while an enabler of it exists (and every
  candidate's ``CKA_WRAP`` and ``CKA_UNWRAP`` are set, as they always are for one). Disabling
  destroys its enablers, enabling makes one. The HSM cannot refuse an immutable KEK, so every release,
  re-wrap and new data key reads the label of the version's enabler through the handle it holds
  (one ``C_GetAttributeValue`` per version used, *after* the HSM used it, so that a disable landing
  during the HSM call refuses the operation too; a release reads it before the unwrap as well, so
  that a version disabled before it is refused with nothing unwrapped): an enabler that another
  replica destroyed answers
  ``CKR_OBJECT_HANDLE_INVALID`` at once — SoftHSM2 too, across instances — or, on a token that gives
  its handle to a new object, another object's label; either way the operation looks
  the key up again and is refused (``KEY_DISABLED``), whatever its lookup cache holds. (A disable *marker* object would not
  do that: a replica learns of a new object only by searching, which the cache exists to avoid.)
- *KEKs created before* (``CKA_MODIFIABLE=true``) keep working: disabling also clears their
  ``CKA_WRAP``/``CKA_UNWRAP`` as before (so the HSM itself refuses them), enabling sets them again.
  A version with only such KEKs has no enabler: its winner's ``CKA_UNWRAP`` (the first flag a
  disable clears) is read after each operation instead, so a disable landing after the HSM's own
  check, before the answer, refuses it too.
  PKCS#11 cannot make them immutable in place (SoftHSM2 refuses ``CKA_MODIFIABLE`` in
  ``C_SetAttributeValue``, and they are not copyable); :func:`modifiable` names them, the broker
  warns about them at start, and a rotation replaces them (rotate, re-wrap, disable the old version).

**A KEK's value never left the token** (``CKA_LOCAL``, ``CKA_ALWAYS_SENSITIVE``,
``CKA_NEVER_EXTRACTABLE`` and ``CKA_PRIVATE`` all true, read with every lookup — a public object
is usable by any session without the PIN, and SoftHSM2 keeps its value in clear in the token's
files; an enabler, too, must be private, or a session without the PIN could enable a version a
disable retired): nobody can relabel a KEK, but a PIN
holder can still *create* an object under a key's labels — a value of their choosing
(``C_CreateObject``, ``C_UnwrapKey``) as the winner of the current version, or a key generated
readable as the next one, with its enabler. Every replica would then wrap new data keys under a
value the attacker knows, and every model published afterwards would open without the HSM, long
after the PIN was changed. Such an object is not a KEK: :func:`describe` ignores it (it is no
candidate, no rival, no version) and logs an ERROR naming it, once per process. Every KEK a broker
made, modifiable or not, was generated in the token as sensitive and unextractable.

Every object the broker uses shares the key's ``CKA_ID``, so one ``C_FindObjects`` returns the key's
versions and enablers. KEKs stay destroyable (``CKA_DESTROYABLE`` unset: true): destroying a
KEK is how an operator shreds every model under it, and a PIN holder who would destroy one could
unwrap its data keys anyway; the broker itself never destroys a published version.

**Duplicates are tolerated, not assumed away.** Nothing in PKCS#11 makes a label unique, and two
SoftHSM2 instances sharing a token do not even see each other's objects reliably: measured here, when
two instances create objects at the same moment, one of them can miss the other's new object
*permanently* (until it is re-initialised), so two replicas rotating at once sometimes both publish
the same version despite the pending/check/publish protocol. So a version may have several
*candidate* objects. Readers agree on a deterministic winner (smallest ``(created_at_ms, nonce)``),
the only one used to wrap; unwrapping tries the winner first and then the others — RFC 5649's
integrity check tells which candidate a blob was wrapped under — so a data key wrapped under a
losing candidate stays usable by every replica that can see that candidate. Disabling a version
disables every candidate and destroys every enabler: two replicas enabling a version at once each
make one, and the instance that wrote its own last, without a search in between, never sees the
other's (SoftHSM2 re-reads the token only when another instance wrote to it since its own last
write), so a disable re-initialises the module before its search (:meth:`Hsm.call`'s
``reread_token``, ~4 ms); before, it destroyed only the enabler it saw and answered DISABLED while
the other kept the version enabled on every other replica. With SoftHSM2, a replica that missed a concurrent creation cannot use data
keys wrapped under the object it missed until it reconnects (a release naming a version above
every one it sees re-reads the token first, at most every two seconds; a losing candidate of a
version it sees stays missed); rotate on one replica at a time there.
Such a replica sees the missed version's enabler without its KEK: a creation there re-reads the
token before it judges such a claim (it took it for a rival, ``KEY_VERSION_CONFLICT``, and once
it was a minute old reaped it, disabling the version everywhere and publishing a second KEK of
it). A network HSM with one object store does not have this gap.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from strongroom.identifiers import KEY_ID_PATTERN, MAX_KEY_VERSION
from strongroom.keybroker.errors import HsmUnavailable
from strongroom.keybroker.p11direct import AttributeQuery, DirectSession, Template
from strongroom.reasons import Reason

_log = logging.getLogger(__name__)

PREFIX = "strongroom/kek/"
PENDING_SUFFIX = "/pending"
ENABLED_SUFFIX = "/enabled"
MARKER_BITS = 128
PENDING_TTL_MS = 60_000
KEK_BITS = 256

#: The longest label :data:`_LABEL_RE` accepts: the prefix, a 63-character key id, a 10-digit
#: version, a 15-digit creation time, the nonce and a suffix. A label is read into a buffer of
#: this size: a longer one is no KEK's (and no enabler's).
LABEL_MAX_BYTES = (
    len(PREFIX) + 63 + len("/v") + 10 + len("/") + 15 + len("/") + 16 + len(PENDING_SUFFIX)
)

#: The last millisecond a version's creation time can name (the end of year 9999, the last
#: a ``datetime`` holds). The label grammar allows 15 digits, up to year 33658: a label beyond
#: this is no broker's (each writes its own clock's time) and is not a KEK. Parsed as one, it
#: failed every list of keys, and every look at its key, with a bare ValueError (INTERNAL).
MAX_CREATED_AT_MS = (
    datetime.max.replace(tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
) // timedelta(milliseconds=1)  # exact: through a float timestamp it rounds up into year 10000

_LABEL_RE = re.compile(
    rf"^strongroom/kek/(?P<key>{KEY_ID_PATTERN.pattern})/v(?P<version>[1-9][0-9]{{0,9}})"
    r"/(?P<ms>[0-9]{1,15})/(?P<nonce>[0-9a-f]{16})(?P<suffix>/pending|/enabled)?$"
)

#: Attributes of a KEK version at creation (python-pkcs11 adds CLASS, KEY_TYPE and VALUE_LEN).
KEK_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
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

#: What a new KEK must read back as (a token that silently ignored part of the template is refused).
KEK_REQUIRED: dict[Attribute, bool] = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.NEVER_EXTRACTABLE: True,
}
#: Read back too where the token knows the attribute (PKCS#11 2.40).
KEK_REQUIRED_IF_SUPPORTED: dict[Attribute, bool] = {Attribute.COPYABLE: False}

#: An enabler: a generic secret nothing can use, immutable, destroyable.
MARKER_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.COPYABLE: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
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

#: What a KEK must read as true: generated in the token, never readable (module docstring), and
#: private: a public object is usable by any session of the token without the PIN, and SoftHSM2
#: keeps a public object's value in clear in its token files.
PROVENANCE = [
    Attribute.LOCAL,
    Attribute.ALWAYS_SENSITIVE,
    Attribute.NEVER_EXTRACTABLE,
    Attribute.PRIVATE,
]

#: The longest CKA_ID of a key's objects (:func:`object_id` of a 63-character key id).
ID_MAX_BYTES = len(PREFIX) + 63

#: Attributes read to describe a candidate object, in one ``C_GetAttributeValue``.
DESCRIBE_ATTRIBUTES = AttributeQuery(
    [
        (Attribute.ID, ID_MAX_BYTES),
        (Attribute.LABEL, LABEL_MAX_BYTES),
        (Attribute.WRAP, "bool"),
        (Attribute.UNWRAP, "bool"),
        (Attribute.KEY_TYPE, "ulong"),
        (Attribute.MODIFIABLE, "bool"),
        (Attribute.VALUE_LEN, "ulong"),
        *((a, "bool") for a in PROVENANCE),
    ]
)

#: Labels of objects refused as KEKs (:func:`describe`) already logged by this process, bounded;
#: past the bound, refusals of labels not logged are counted (``_REFUSED_UNLOGGED[0]``).
_REFUSED_LOGGED: set[str] = set()
_REFUSED_LOGGED_MAX = 1024
_REFUSED_LOCK = threading.Lock()
_REFUSED_UNLOGGED = [0]

#: The search template for every KEK object (and enabler) in the token.
ALL_KEKS = Template([(Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.TOKEN, True)])
# The search template for one key's objects, its CKA_ID filled in by key_objects.
_KEY_OBJECTS = Template(
    [(Attribute.CLASS, ObjectClass.SECRET_KEY), (Attribute.TOKEN, True), (Attribute.ID, b"")]
)


_ID_PREFIX = PREFIX.encode("ascii")


def object_id(key_id: str) -> bytes:
    """The CKA_ID shared by every version of ``key_id``."""
    return (PREFIX + key_id).encode("ascii")


def key_objects(key_id: str) -> Template:
    """The search template for every object of ``key_id`` (its versions and enablers)."""
    return _KEY_OBJECTS.with_bytes({Attribute.ID: object_id(key_id)})


def label(
    key_id: str,
    version: int,
    created_at_ms: int,
    nonce: str,
    *,
    pending: bool,
    enabler: bool = False,
) -> str:
    """The CKA_LABEL of a version (``pending``: an older broker's claim on one) or its enabler."""
    base = f"{PREFIX}{key_id}/v{version}/{created_at_ms}/{nonce}"
    if enabler:
        return base + ENABLED_SUFFIX
    return base + PENDING_SUFFIX if pending else base


@dataclass
class KekObject:
    """One KEK version found in the token, with the handle to use it."""

    #: The object's handle in the work session that found it (:mod:`p11direct` calls take it).
    handle: int
    key_id: str
    version: int
    created_at_ms: int
    nonce: str
    pending: bool
    wrap: bool
    unwrap: bool
    #: ``kek`` (a version's key, or an older broker's pending one) or ``enabler``.
    kind: Literal["kek", "enabler"] = "kek"
    #: CKA_MODIFIABLE: true only for KEKs made before they were created immutable.
    modifiable: bool = False
    #: CKA_LABEL as the token returned it: unique to this object (version, time, nonce), so a read
    #: of it through :attr:`handle` tells whether the handle still names this object.
    label: bytes = b""

    @property
    def enabled(self) -> bool:
        """Both wrap and unwrap are permitted."""
        return self.wrap and self.unwrap

    @property
    def published(self) -> bool:
        """A version's key that readers use (not a pending object or an enabler)."""
        return self.kind == "kek" and not self.pending


@dataclass
class KekVersion:
    """All candidate objects claiming one version of a key, winner first."""

    key_id: str
    version: int
    candidates: list[KekObject]
    #: The version's enablers (see the module docstring).
    enablers: list[KekObject] = field(default_factory=list)

    @property
    def winner(self) -> KekObject:
        """The candidate every replica uses to wrap."""
        return self.candidates[0]

    @property
    def needs_enabler(self) -> bool:
        """Whether an enabler decides its state: a candidate is immutable (one made modifiable
        before, alone, is enabled and disabled by its flags)."""
        return any(not c.modifiable for c in self.candidates)

    @property
    def enabled(self) -> bool:
        """True only with every candidate enabled (a half-disabled version counts as disabled)
        and, when it needs one, an enabler."""
        if self.needs_enabler and not self.enablers:
            return False
        return all(c.enabled for c in self.candidates)


def group_versions(objects: list[KekObject]) -> list[KekVersion]:
    """Groups published objects of one key by version, ascending, each with its winner first and
    its enablers."""
    by_version: dict[int, list[KekObject]] = {}
    enablers: dict[int, list[KekObject]] = {}
    for obj in objects:
        if obj.published:
            by_version.setdefault(obj.version, []).append(obj)
        elif obj.kind == "enabler":
            enablers.setdefault(obj.version, []).append(obj)
    return [
        KekVersion(
            key_id=candidates[0].key_id,
            version=version,
            candidates=sorted(candidates, key=lambda c: (c.created_at_ms, c.nonce)),
            enablers=enablers.get(version, []),
        )
        for version, candidates in sorted(by_version.items())
    ]


def modifiable(versions: list[KekVersion]) -> list[int]:
    """The versions with a candidate created modifiable (before KEKs were made immutable)."""
    return [v.version for v in versions if any(c.modifiable for c in v.candidates)]


def describe(direct: DirectSession, handle: int) -> KekObject | None:
    """Parses the candidate object ``handle`` (one ``C_GetAttributeValue`` of
    :data:`DESCRIBE_ATTRIBUTES`); None when it is not a Strongroom KEK version: its CKA_ID is not
    the :func:`object_id` of the key its label names, or its label is longer than
    :data:`LABEL_MAX_BYTES` (the token does not return it, and it is no KEK's), outside the
    grammar, or naming a version beyond ``MAX_KEY_VERSION`` or a time beyond
    :data:`MAX_CREATED_AT_MS`. A label under one of our CKA_IDs that is not UTF-8 is a damaged object
    (``HsmUnavailable``, HSM_OPERATION_FAILED)."""
    attrs = direct.read_attributes(handle, DESCRIBE_ATTRIBUTES)
    identity = attrs.get(Attribute.ID)
    raw = attrs.get(Attribute.LABEL)
    key_type = attrs.get(Attribute.KEY_TYPE)
    # Another application's object in a shared token (list_keys finds every secret key) is none
    # of ours whatever its label holds: its binary label made every list of keys fail, and drop
    # the session, as a damaged object.
    if not isinstance(identity, bytes) or not identity.startswith(_ID_PREFIX):
        return None
    if not isinstance(raw, bytes):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # SoftHSM2 stores a private object's label encrypted: a damaged object file decrypts to
        # garbage. Not "no KEK here": the key would read as missing while its object is broken.
        raise HsmUnavailable(
            "a key object in the token has an unreadable label (damaged object?)",
            reason=Reason.HSM_OPERATION_FAILED,
        ) from None
    match = _LABEL_RE.match(text)
    if (
        match is None
        or int(match["ms"]) > MAX_CREATED_AT_MS
        or int(match["version"]) > MAX_KEY_VERSION
    ):
        # No broker writes either (it numbers versions 1..MAX_KEY_VERSION and dates them with
        # its clock): a PIN holder's KEK generated in the token as version 2**31 was every
        # key's current version, its data keys unreleasable (KEY_VERSION_INVALID).
        return None
    if identity != object_id(match["key"]):
        return None  # labelled as one key, filed under another: neither's (every search agrees)
    suffix = match["suffix"]
    kind: Literal["kek", "enabler"]
    if key_type == KeyType.AES and suffix != ENABLED_SUFFIX:
        kind = "kek"  # a version's key, or (/pending) an older broker's pending one
    elif key_type == KeyType.GENERIC_SECRET and suffix == ENABLED_SUFFIX:
        kind = "enabler"
    else:
        return None
    if kind == "kek" and not all(attrs.get(a) is True for a in PROVENANCE):
        _refused(text, match, {a: attrs.get(a) for a in PROVENANCE})
        return None
    if kind == "kek" and attrs.get(Attribute.VALUE_LEN) != KEK_BITS // 8:
        # Every broker generates 256-bit KEKs: a PIN holder's AES-128 one generated in the token
        # (private, never readable) would otherwise win a version and wrap data keys at half
        # the strength the artifact format promises.
        _refused(text, match, {Attribute.VALUE_LEN: attrs.get(Attribute.VALUE_LEN)})
        return None
    if kind == "enabler" and attrs.get(Attribute.PRIVATE) is not True:
        # Every broker's enabler is private: a public one is made without the PIN (any session
        # of the token can create one) and would enable a version a disable retired.
        _refused(text, match, {Attribute.PRIVATE: attrs.get(Attribute.PRIVATE)})
        return None
    return KekObject(
        handle=handle,
        key_id=match["key"],
        version=int(match["version"]),
        created_at_ms=int(match["ms"]),
        nonce=match["nonce"],
        pending=suffix == PENDING_SUFFIX,
        wrap=kind == "kek" and bool(attrs.get(Attribute.WRAP)),
        unwrap=kind == "kek" and bool(attrs.get(Attribute.UNWRAP)),
        kind=kind,
        modifiable=bool(attrs.get(Attribute.MODIFIABLE)),
        label=raw,
    )


def _refused(text: str, match: re.Match[str], provenance: dict[Attribute, Any]) -> None:
    """Logs, once per label and process, an object with a KEK's label whose value did not stay in
    the token (see the module docstring)."""
    with _REFUSED_LOCK:
        if text in _REFUSED_LOGGED:
            return
        if len(_REFUSED_LOGGED) >= _REFUSED_LOGGED_MAX:
            # Planting 1,024 objects must not hide the next one: past the bound each refusal is
            # counted (each lookup meets them again), and a line at each power of two says so.
            _REFUSED_UNLOGGED[0] += 1
            unlogged = _REFUSED_UNLOGGED[0]
        else:
            _REFUSED_LOGGED.add(text)
            unlogged = 0
    if unlogged:
        if unlogged & (unlogged - 1) == 0:
            _log.error(
                "more objects labelled as KEK versions were ignored than are logged one by one "
                "(the latest named here): the token holds objects someone with its PIN made",
                extra={"refusals_unlogged": unlogged, "key_id": match["key"], "label": text},
            )
        return
    _log.error(
        "an object labelled as a KEK version (or its enabler) was not generated in the token as "
        "a private, never-readable key (someone holding the token PIN created, imported or "
        "unwrapped it, or made it public): it is ignored, never used to wrap or unwrap nor to "
        "enable a version; destroy it and find out who made it",
        extra={
            "key_id": match["key"],
            "key_version": int(match["version"]),
            "label": text,
            "provenance": {a.name: v for a, v in provenance.items()},
        },
    )
