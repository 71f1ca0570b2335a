"""The audit log's signed head on disk: two slots overwritten in place, one ``fdatasync`` per commit.

**Why in place.** A head rewritten as a new file costs a create, a write, an fsync, a rename and an
fsync of the directory on every commit (0.64 ms here, against 0.13 ms for overwriting a block of
an existing file and ``fdatasync``). So the head file has a fixed size and two slots that commits
overwrite in turn.

**Layout** (head format 2). :data:`FILE_BYTES` bytes. Head *generation* ``g`` lives in slot
``g % 2``, at offset ``(g % 2) * SLOT_STRIDE``: the canonical JSON of ``{v, gen, count, last_hash,
time, key, pub, sig}`` and a newline, zero-padded to :data:`SLOT_BYTES`. ``sig`` is the broker's
Ed25519 signature over the domain ``strongroom-audit-head-v1`` and the document without ``sig``.
``key`` names the signing key (:func:`key_fingerprint`) and ``pub`` is that key (its raw public
bytes in base64; heads written before it was added lack it), so that ``audit verify`` without a
pinned key can check every head of a series with the key one of its heads carries: a forger who
keeps older files can only continue them with heads this key verifies, which needs the broker's
private key. Only a pinned key proves that key the broker's (a series replaced whole carries the
forger's). A reader that predates ``pub`` ignores it (the signature covers it). A commit
writes generation ``g + 1`` over generation ``g - 1`` with one ``pwrite`` and one ``fdatasync``.

**Crashes.** Each slot is one 512-byte sector at the start of its own 4 KiB page, written whole by
one ``pwrite``; a drive writes a sector entirely or not at all, so a crash during a commit leaves
the slot it was writing either as it was (generation ``g - 1``: the head is then ``g``, the batch's
records follow it unanchored, and the crash repair of :mod:`strongroom.keybroker.audit` anchors
them) or as it became. There is no torn state to repair, so a slot that does not parse is
tampering, not a crash. This is the assumption LMDB's two meta pages make.

**Checks when read.** Both slots parse, their ``gen`` matches their slot, and they hold consecutive
generations ``g - 1`` and ``g`` whose counts never decrease (or, right after creation, generation 0
in slot 0 and an all-zero slot 1); the current head is generation ``g``. So copying one slot over the
other, swapping them or zeroing one is caught. Putting back a whole older head file together with
an older log is a rollback, not caught once the broker restarts (a running one notices: see
:mod:`strongroom.keybroker.audit`), as with any head kept beside its log.

**Rotation** (see :mod:`strongroom.keybroker.audit`) adds two members, written only when they
apply, so a log never rotated keeps its heads' bytes: ``base``, the ``seq`` of the file's first
record (its sealed predecessor's count; both slots must agree), and ``sealed: true`` on the last
generation of a log that was sealed (the older slot is never sealed: nothing is written after a
seal), with ``size``, the sealed log's length in bytes (heads sealed before it was added lack it),
so that the broker's check of its sealed files at start finds a record removed, added or
resized anywhere in one from its length alone, without reading it.

**Refused batches** (see :mod:`strongroom.keybroker.audit`, *Durability and failure*): a head
written after a batch was refused keeps its ``count`` and ``last_hash`` and adds ``void``, the
first 32 hex digits of the hash of each refused batch's first record (at most :data:`VOID_MAX`),
or ``void_all: true`` past that. The next head that anchors more records drops them. Written as
generation 1, it is written again as generation 2: generation 0 with a zeroed slot 1 is a valid
file (a new head), so the names must not be in slot 1 alone.

**Format 1**, one JSON line rewritten by rename on every commit, is still read; the broker converts
it to format 2 when it opens the log (a new file, renamed into place). A new head file is written
under a random temporary name, created exclusively and never through a symlink: the directory's
other names are not the broker's to trust.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom import jsonparse
from strongroom.files import os_error_cause

LEGACY_VERSION = 1
VERSION = 2
SLOT_STRIDE = 4096  # each slot starts its own page
SLOT_BYTES = 512  # and fits one sector
FILE_BYTES = 2 * SLOT_STRIDE
HEAD_DOMAIN = b"strongroom-audit-head-v1\n"
GENESIS_HASH = "0" * 64
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")  # a SHA-256 in lowercase hex
# A head voids at most this many refused batches by their first record's hash (this prefix of
# it); past that, every record after it that it does not anchor (``void_all``). Sized to fit a
# slot beside the largest head (with ``pub``: 510 of 512 bytes at 2**63 counts).
VOID_MAX = 3
VOID_PREFIX = 32
_VOID_RE = re.compile(r"^[0-9a-f]{32}$")
_PUBLIC_BYTES = 32  # an Ed25519 public key's raw bytes
_log = logging.getLogger("strongroom.keybroker.audit")


@dataclass(frozen=True)
class Head:
    """What a head anchors: the number of records and the hash of the last one.

    ``count`` is the chain's length up to this file's end, and ``base`` the ``seq`` of the file's
    first record: 0 for a log never rotated, the sealed predecessor's ``count`` for a log that
    continues one (see the rotation section of :mod:`strongroom.keybroker.audit`).
    """

    count: int
    last_hash: str
    base: int = 0


@dataclass(frozen=True)
class ParsedHead:
    """A head file read: the current head, its generation (None in format 1) and the format;
    ``sealed`` when its current slot seals the log (no record is ever added to it again), and
    ``size`` the sealed log's length in bytes (None: sealed before heads said it, or not sealed);
    ``void``/``void_all``: the batches written after it that the broker refused (see
    :meth:`HeadFile.write`); ``key``: the fingerprint of the signing key the current head names
    (None if it names none), which only a check of its signature with that key proves;
    ``public``: the raw public key the current head carries (``pub``; None in heads written
    before it), already checked to be the key it names, not that it signed the head."""

    head: Head
    generation: int | None
    version: int
    sealed: bool = False
    void: tuple[str, ...] = ()
    void_all: bool = False
    size: int | None = None
    key: str | None = None
    public: bytes | None = None

    def voids(self, record_hash: str) -> bool:
        """Whether the record chained right after this head with ``record_hash`` was refused."""
        return self.void_all or record_hash[:VOID_PREFIX] in self.void


# One encoder for every call: json.dumps with non-default arguments builds a new one each time,
# most of the cost of encoding a short string (the audit encodes ~20 values per release).
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only, no NaN/Infinity."""
    return _CANONICAL.encode(value).encode("ascii")


def key_fingerprint(raw_public: bytes) -> str:
    """What a head's ``key`` says of its signing key: the first 32 hex digits of the SHA-256 of
    the key's raw public bytes."""
    return hashlib.sha256(raw_public).hexdigest()[:32]


def public_text(key: Ed25519PublicKey) -> str:
    """A head's ``pub``: ``key``'s raw public bytes in base64."""
    return base64.b64encode(
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def _embedded_key(document: dict[str, Any]) -> bytes | None:
    """The raw public key a head document carries (``pub``), checked to be the key its ``key``
    names; None if it carries none. Raises ValueError."""
    if "pub" not in document:
        return None
    text = document["pub"]
    raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    if len(raw) != _PUBLIC_BYTES or key_fingerprint(raw) != document.get("key"):
        raise ValueError("its pub is not the key it names")
    return raw


def _document(raw: bytes, public_key: Ed25519PublicKey | None) -> dict[str, Any]:
    """One signed head document (without ``sig``), its fields checked. Raises ValueError, or
    cryptography's InvalidSignature with ``public_key``."""
    document = jsonparse.loads(raw)
    if not isinstance(document, dict):
        raise ValueError("not an object")
    signature = base64.b64decode(document.pop("sig"), validate=True)
    count, last_hash = document.get("count"), document.get("last_hash")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError("bad count")
    if not isinstance(last_hash, str) or not HEX64_RE.match(last_hash):
        raise ValueError("bad last_hash")
    # Written only when they differ from a log never rotated: such heads keep their bytes.
    base = document.get("base", 0)
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= count:
        raise ValueError("bad base")
    if document.get("sealed", True) is not True or document.get("void_all", True) is not True:
        raise ValueError("bad sealed or void_all")
    size = document.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("bad size")
    if "size" in document and "sealed" not in document:
        raise ValueError("only a sealed head says its log's size")
    void = document.get("void", [])
    if (
        not isinstance(void, list)
        or len(void) > VOID_MAX
        or not all(isinstance(v, str) and _VOID_RE.match(v) for v in void)
    ):
        raise ValueError("bad void")
    if public_key is not None:
        public_key.verify(signature, HEAD_DOMAIN + canonical_json(document))
    _embedded_key(document)  # after the signature: a pinned key's verdict is the stronger
    return document


def _slot(raw: bytes, index: int, public_key: Ed25519PublicKey | None) -> dict[str, Any] | None:
    """The document in slot ``index`` (None if the slot is all zeros). Raises ValueError."""
    area = raw[index * SLOT_STRIDE : (index + 1) * SLOT_STRIDE]
    if not area.strip(b"\0"):
        return None
    text, newline, padding = area[:SLOT_BYTES].partition(b"\n")
    if not newline or padding.strip(b"\0") or area[SLOT_BYTES:].strip(b"\0"):
        raise ValueError(f"slot {index} is not one document and zero padding")
    document = _document(text, public_key)
    generation = document.get("gen")
    if (
        document.get("v") != VERSION
        or isinstance(generation, bool)
        or not isinstance(generation, int)
    ):
        raise ValueError(f"slot {index} is not a format-{VERSION} head")
    if generation < 0 or generation % 2 != index:
        raise ValueError(
            f"slot {index} holds generation {generation}: it belongs to the other slot"
        )
    return document


def parse(raw: bytes, public_key: Ed25519PublicKey | None) -> ParsedHead:
    """Reads a head file of either format and returns its current head.

    Raises ValueError for anything malformed or inconsistent (see the module doc), and
    cryptography's InvalidSignature if ``public_key`` is given and a signature does not verify.
    """
    if len(raw) != FILE_BYTES:
        if raw.startswith(b"{") and raw.endswith(b"\n") and raw.count(b"\n") == 1:
            document = _document(raw, public_key)
            if document.get("v") != LEGACY_VERSION or {
                "base",
                "sealed",
                "size",
                "void",
                "void_all",
            } & set(document):
                raise ValueError("a one-line head must be format 1")
            return ParsedHead(
                Head(document["count"], document["last_hash"]),
                None,
                LEGACY_VERSION,
                key=_named_key(document),
            )
        raise ValueError(f"a head file is {FILE_BYTES} bytes, not {len(raw)}")
    first, second = _slot(raw, 0, public_key), _slot(raw, 1, public_key)
    if first is None:
        raise ValueError("slot 0 is empty")
    if second is None:
        if first["gen"] != 0:
            raise ValueError("slot 1 is empty after generation 0")
        current = first
    else:
        older, current = sorted((first, second), key=lambda d: int(d["gen"]))
        if current["gen"] != older["gen"] + 1:
            raise ValueError(
                f"the slots hold generations {older['gen']} and {current['gen']}, not consecutive"
            )
        if current["count"] < older["count"]:
            raise ValueError("the newer head anchors fewer records than the older one")
        if older.get("base", 0) != current.get("base", 0):
            raise ValueError("the slots disagree on where the log starts")
        if older.get("sealed"):
            raise ValueError("a head was written after the log was sealed")
    head = Head(current["count"], current["last_hash"], current.get("base", 0))
    return ParsedHead(
        head,
        current["gen"],
        VERSION,
        bool(current.get("sealed")),
        tuple(current.get("void", ())),
        bool(current.get("void_all")),
        current.get("size"),
        _named_key(current),
        _embedded_key(current),
    )


def _named_key(document: dict[str, Any]) -> str | None:
    """The signing key's fingerprint a head document names (``key``), if it names one."""
    key = document.get("key")
    return key if isinstance(key, str) else None


def _slot_bytes(
    head: Head,
    generation: int,
    key: Ed25519PrivateKey,
    fingerprint: str,
    time_text: str,
    *,
    sealed: bool = False,
    size: int | None = None,
    void: tuple[str, ...] = (),
    void_all: bool = False,
    public: str | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "v": VERSION,
        "gen": generation,
        "count": head.count,
        "last_hash": head.last_hash,
        "time": time_text,
        "key": fingerprint,
        "pub": public_text(key.public_key()) if public is None else public,
    }
    if head.base:
        body["base"] = head.base
    if sealed:
        body["sealed"] = True
        if size is not None:
            body["size"] = size
    if void:
        body["void"] = list(void)
    if void_all:
        body["void_all"] = True
    signature = base64.b64encode(key.sign(HEAD_DOMAIN + canonical_json(body))).decode()
    document = canonical_json({**body, "sig": signature}) + b"\n"
    if len(document) > SLOT_BYTES:
        raise ValueError(f"a head document of {len(document)} bytes does not fit a slot")
    return document.ljust(SLOT_BYTES, b"\0")


class HeadFile:
    """The head file of one log, as its writer sees it: reads, checks and overwrites the slots.

    Not thread-safe: the audit log calls it under its commit lock (and ``flock``). It notices
    another process's writes, and a file replaced under it, through :meth:`changed`.
    """

    def __init__(
        self,
        path: Path,
        key: Ed25519PrivateKey,
        fingerprint: str,
        now_text: Callable[[], str],
        dir_fd: int,
    ) -> None:
        self._path = path
        self._key = key
        self._public = key.public_key()
        self._public_text = public_text(self._public)
        self._fingerprint = fingerprint
        self._now_text = now_text
        self._dir_fd = dir_fd
        self._fd: int | None = None
        self._raw = b""  # the file's bytes as last read or written by us
        self._generation: int | None = None  # None: format 1 or no file; the next write creates
        # A plain next head signed ahead of its write (prepare): the head, the generation it
        # follows, and its slot's bytes.
        self._prepared: tuple[Head, int, bytes] | None = None

    def close(self) -> None:
        """Closes the file descriptor; idempotent."""
        fd, self._fd = self._fd, None
        self._prepared = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def read(self) -> ParsedHead | None:
        """The current head (None if there is no head file). Raises OSError, ValueError or
        InvalidSignature (see :func:`parse`)."""
        self.close()
        try:
            # The head is written in place through this descriptor: never through a symlink
            # (into whatever file it names) and never anything but a regular file.
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            self._raw, self._generation = b"", None
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "the audit head is not a regular file")
        self._fd = fd
        self._raw = os.pread(fd, FILE_BYTES + 1, 0)
        parsed = parse(self._raw, self._public)
        self._generation = parsed.generation
        return parsed

    @property
    def generation(self) -> int | None:
        """The current head's generation as last read or written (None: no file, or format 1)."""
        return self._generation

    def changed(self) -> bool:
        """Whether the file differs from what this object last read or wrote (another process
        committed, or the file was replaced or edited)."""
        if self._fd is None:
            return True
        try:
            if os.stat(self._path).st_ino != os.fstat(self._fd).st_ino:
                return True
            return os.pread(self._fd, FILE_BYTES + 1, 0) != self._raw
        except OSError:
            return True

    def prepare(self, head: Head) -> None:
        """Signs the slot a plain :meth:`write` of ``head`` will write next (not sealed, voiding
        nothing), so that the write, if it comes next and for this head, only writes and syncs
        it. The audit log signs it while its records' writeback runs, before their fsync: the
        head's signature was ~70 us after that fsync, on every release's path. A head in place
        only (a new file is made by :meth:`write` itself). Nothing is written here."""
        self._prepared = None
        if self._fd is None or self._generation is None:
            return
        self._prepared = (head, self._generation, self._slot(head, self._generation + 1))

    def write(
        self,
        head: Head,
        *,
        sealed: bool = False,
        size: int | None = None,
        void: tuple[str, ...] = (),
        void_all: bool = False,
    ) -> None:
        """Makes ``head`` the current head, durably: the next generation in place, or a new
        format-2 file when there is none yet or it is in format 1. ``sealed`` marks it the log's
        last head (rotation), ``size`` (with ``sealed``) the sealed log's length in bytes;
        ``void`` (hash prefixes, at most :data:`VOID_MAX`) names refused batches by the first
        record they chained after it, ``void_all`` refuses every record after it that it does
        not anchor. Raises OSError."""
        prepared, self._prepared = self._prepared, None
        if self._fd is None or self._generation is None:
            if sealed or void or void_all:
                raise OSError(errno.EINVAL, "only a head in place can be sealed or void records")
            self._create(head)
            return
        generation = self._generation + 1
        plain = not (sealed or void or void_all)
        if plain and prepared is not None and prepared[:2] == (head, self._generation):
            slot = prepared[2]  # signed by prepare for exactly this head after this generation
        else:
            slot = self._slot(
                head, generation, sealed=sealed, size=size, void=void, void_all=void_all
            )
        offset = (generation % 2) * SLOT_STRIDE
        before = self._raw[offset : offset + len(slot)]
        try:
            if os.pwrite(self._fd, slot, offset) != len(slot):
                raise OSError(errno.EIO, "short write of the audit head")
            os.fdatasync(self._fd)
        except BaseException:
            # The caller cuts the batch back off the log, so the head it would have anchored must
            # not stay in the page cache either: put the slot's previous generation back, durably
            # (the cut-back is synced; a new slot on disk over a shorter log reads as tampering).
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, before, offset)
                os.fdatasync(self._fd)
            raise
        self._raw = self._raw[:offset] + slot + self._raw[offset + len(slot) :]
        self._generation = generation

    def _slot(
        self,
        head: Head,
        generation: int,
        *,
        sealed: bool = False,
        size: int | None = None,
        void: tuple[str, ...] = (),
        void_all: bool = False,
    ) -> bytes:
        # The one place a slot is signed with this file's key and clock, so that a slot signed
        # ahead (prepare) is what write would have signed itself.
        return _slot_bytes(
            head,
            generation,
            self._key,
            self._fingerprint,
            self._now_text(),
            sealed=sealed,
            size=size,
            void=void,
            void_all=void_all,
            public=self._public_text,
        )

    def _create(self, head: Head) -> None:
        raw = self._slot(head, 0).ljust(FILE_BYTES, b"\0")
        # Whoever can write the directory can plant names in it: a fresh random name, created
        # exclusively and never through a symlink, so no planted file or link is written through
        # (a predictable name let a symlink make the broker overwrite any file it may write).
        tmp = f".{self._path.name}.{secrets.token_hex(16)}.tmp"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self._dir_fd)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.replace(tmp, self._path.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir_fd)
            raise
        self.close()
        self._fd, self._raw, self._generation = fd, raw, 0
        try:
            os.fsync(self._dir_fd)
        except OSError as exc:
            # The new file is in place; after a power loss the old one may come back, which is the
            # crash case the log's repair handles (its records follow the old head unanchored).
            # Failing now would cut back records this head already anchors.
            _log.error(
                "cannot fsync the audit directory after a head update: %s", os_error_cause(exc)
            )
