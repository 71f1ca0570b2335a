"""The key broker's audit log: one JSON line per decision, hash-chained, with a signed head.

**Records.** Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one record:
``seq`` (0, 1, 2, ...), ``prev`` (the previous record's hash; for the first, a random value the
log's first head anchored, so that no other log's records continue this one; 64 zeros in logs made
before that, except that a log made before that and still without a record gets a random start,
one more head generation, when a broker opens it), the decision
fields, ``sig`` and ``hash`` = SHA-256 over ``"strongroom-audit-record-v1\\n"`` + the canonical JSON
of the record without ``hash``. ``sig`` (records of version 2) is the broker's Ed25519 signature over
``"strongroom-audit-record-sig-v1\\n"`` + the canonical JSON of the record without ``hash`` and
``sig``: it is how the broker recognises a record as one it wrote itself (see crash repair below).
Editing, reordering, inserting or deleting a record breaks the chain, and a line that is not
byte-for-byte canonical counts as edited. The record of a granted key release also names the
release-signing key that signed its answer (``release_signing_key_id``: the SHA-256 of its raw
public key, as the answer carries it), so that across a rotation of that key the log says which
key vouched for which release; records without it (every other record, and releases recorded
before it was added) are unchanged and verify as before. A decision has one record, with one exception: a key
release whose HSM re-wrap fails after its ``ALLOWED`` record was committed (see
:mod:`strongroom.keybroker.release`) gets a second, ``DENIED`` record with the same
``decision_id``; a decision's last record is its outcome.

**The anchor.** A chain cannot show that records were cut off its end, so every commit also
updates ``<log>.head``: ``{count, last_hash, time}`` signed with an Ed25519 key the broker holds,
written in place into one of two slots and ``fdatasync``'d (:mod:`strongroom.keybroker.audit_head`
has the layout and why a crash cannot tear it). Truncating the log, or cutting a line in half, no
longer matches the head; forging a head needs the private key.
Ed25519 rather than an HMAC so that auditors verify with the public key alone
(``strongroom audit verify PATH --public-key PEM``). Not covered: someone able to write the files
could restore an *older* pair of log and head together (a rollback) while no broker runs, or an
older copy of the head alone that anchors as many records (which undoes its ``void``, below); ship
the heads to an append-only store elsewhere if that matters.

**While the broker runs.** Every commit first checks that the file at the log's path is still the
one it writes through its open descriptor (not removed, renamed or replaced). When either file
changed since its last commit, the files must still continue the chain the broker holds: the head
present and anchoring no fewer records, the log no shorter, and the record it last wrote still
ending where it wrote it, with that hash (for a log it found empty: the first record, or else the
head, starting from its anchor). A log emptied and its head deleted, or another log signed with
the same key copied over with its head (however long), is tampering (below), not a new log.

**Group commit.** Appends that arrive while a commit is under way wait in a queue; when it ends, the
first of them commits everything queued (at most :data:`MAX_BATCH_RECORDS`, in arrival order) as
one batch: it assigns consecutive ``seq`` and chains ``prev``, signs each record, writes all lines
with one write and one fsync, then writes one signed head whose ``count``/``last_hash`` cover the
whole batch. Nobody waits for company: a lone caller commits at once, a batch of one. When a
commit ends, its committer wakes exactly the callers of its batch and the first caller still
queued, which leads the next batch; the others sleep on (waking every waiter, as before, made most
of 16 concurrent callers wake, find their record not yet committed and sleep again). Every caller
returns only after its own record is fsync'd *and* covered by a signed head (written and
``fdatasync``'d), so the guarantee is the same as with one record per commit; what the batch shares is
the write, the two syncs and the head's signature. :attr:`AuditLog.batch_sizes` counts
the batches formed. Each record is still signed on its own, by the committer: its ``seq`` and
``prev``, which the signature covers, are known only at commit time. A caller may pass
``on_written`` to :meth:`AuditLog.append`: the committer calls it once the record has its place in
the batch, just before the write and the syncs, so work it starts overlaps them (the key broker
starts its HSM re-wrap there).

**Durability and failure.** A commit writes the lines and fsyncs them, then writes the head; if
either step fails (disk full, file too large, I/O error, permissions) all lines of the batch are cut
back off and every caller of that batch gets
:class:`~strongroom.keybroker.errors.AuditUnavailable` (naming the file, the call and the errno,
as every audit refusal does), so the broker refuses each release it was
about to make; nobody of a failed batch is told success. The next commit first re-reads the state
from disk, so the log recovers by itself when the disk does. A crash between the two steps leaves
at most one batch of unanchored records (and perhaps a torn line). The repair anchors them only if
each is the broker's own: chained after the head, its ``sig`` verifying with the broker's key, and
not a record this process cut back after a failed write (those, and whatever follows them, are cut
off again, since the decisions they describe never took effect). The process remembers those
until a commit takes their position, which makes them unanchorable; if more pile up at one position
than it keeps (256, while the disk stays full), it cuts off every unanchored record from that
position instead of forgetting any. That memory dies with the process, so the refusal is also
made durable before the cut-back and before any caller hears of it: one more head generation,
anchoring what the head did, names the refused batch in ``void`` (the first 32 hex digits of its
first record's hash, the only one that can chain on the head; past three batches at one position,
``void_all``). The repair at the next start then cuts off a refused batch whose lines survived the
cut-back (or were put back) instead of anchoring it as the broker's own, while a batch a later
crash leaves at the same position is still anchored; the next head that anchors more records
drops the names (no extra work for a commit). When that head is generation 1, it is written
twice, so that both slots name the refusal: generation 0 alone is a whole head file (a new one
reads so), and zeroing slot 1 would otherwise have dropped the names. If even that head cannot be
written (a failing disk), the refusal holds until a restart, as before, and an error is logged.
Anyone can compute a chained ``hash``; only the key holder can sign, so a correctly chained line
appended by someone else, or more unanchored records than one commit writes, is *tampering*. An
older copy of the head file that anchors as many records, put back while the broker is stopped,
still drops the names: it is a head the broker signed, which nothing beside the log tells from
the current one (a rollback of the head, see *The anchor*).

**Tampering** (any mismatch beyond those repairs, or a foreign unanchored record) raises
``DataLoss(AUDIT_LOG_TAMPERED)``, is logged at CRITICAL with ``alert=AUDIT_LOG_TAMPERED``, and
latches: every later append is refused the same way (so no release can happen) and
:attr:`AuditLog.tamper_problem` reports it for readiness, until an operator has looked at the files
and restarted the broker. Found by the open (in the log, or in a sealed file: *Sealed files at
start*), it is raised by the open, and the broker does not start.

**Rotation.** With ``rotate_bytes`` (or :meth:`AuditLog.rotate`), before a commit that would take
the log past that size the committer *seals* it and continues the chain in a new file, so that an
operator can ship and delete old records without starting an unrelated chain. ``seq`` runs on
across files. The steps, under the directory's ``flock`` (taken after the log's, never before;
waited for at most :data:`DIR_LOCK_WAIT_SECONDS`, since any process that can open the directory
can hold it: then ``AuditUnavailable``, the batch refused as on a failed write, the start refused):
(1) the log's head gets one more generation, marked ``sealed``: the rotation's commit point; a
sealed head is final (records after it are never anchored: tampering); (2) the log is renamed
``<name>.<first seq>-<last seq>``; (3) its head is renamed after it (``<that>.head``); (4) an
empty log and its first head are created at the log's path, the head carrying ``base`` (the new
file's first ``seq``) = the sealed log's count, and ``last_hash`` = its last hash, which the new
file's first record then takes as ``prev``. A file's head always says where it starts (``base``),
so an emptied rotated log is tampering as before, and ``audit verify`` on a series of files finds
a missing, reordered, renamed or substituted file by its first ``seq`` and ``prev``; files missing
only at the start (shipped and deleted) are retention. The sealing generation also says the sealed
log's length in bytes (``size``). The batch that triggered the rotation is
then written to the new log as usual, so each caller is still answered only once its record is
durable and covered by a signed head. Every step is read back from the directory, not from
memory: a crash, a failed step or a restart at any point is finished by the next commit or open
(a sealed head at the log's path: steps 2-4; the log's own file found under its sealed name with
a sealed head: 3-4; no log, or an empty one, without a head beside sealed logs: 4, from the latest
sealed log after checking its sealed head and last record), and another process sharing the log
follows the rotation (through every sealed file since its own; if its own was shipped and deleted
meanwhile, from that file's end, which the next file must continue; and again when the
other process rotates the new log before this one has taken its lock). A step the open cannot
make (a directory the broker's user cannot write, a file it cannot read: ``EACCES``, ``EIO``)
refuses the start with ``AuditUnavailable`` naming the file(s) and the errno; what was done
stays done, for the next start. A sealed log missing, altered or without its head is tampering. With a size cap, sealed files count against it until
deleted; without rotation the cap means what it did.

**Sealed files at start.** Once the open has finished any rotation, it checks every sealed log
still beside the log without reading its records (under a millisecond per file: 100 files of 64 MiB
took 41 ms warm, 97 ms with nothing cached, ``tests/bench/audit_start.py``): its head signed by
this broker and sealed, its name the range that head seals, its size the head's ``size``, its first
record at the head's ``base`` and its last the record the head anchors, both intact, and its
second record continuing its first (anyone can hash a record again: the first edited at its
length and hashed again kept its ``seq``, ``prev`` and the file's size); each file's
first record continuing the file before (``prev`` its last hash, its first ``seq`` that file's
count); and the log at the path starting where the newest ends (its head's ``base``, and its first
record's ``prev`` or, empty, its head's ``last_hash``). So a sealed file edited (other than in
place, at the same length, away from its ends), truncated, extended, replaced by another log signed
with the same key, given a forged head, or deleted after an older one that remains, is tampering at
start (raised by the open, so the broker does not start, as for an active log found tampered with
there); only the oldest may be missing (retention, as ``audit verify`` says; also when a shipper
goes on deleting the oldest while the check runs: every file checked so far deleted, or one of its
two files, leaves the next the oldest), or have lost its head or its log alone: being shipped,
whichever was deleted first (retention too, for ``audit verify`` alike; the broker logs a WARNING
naming them, since it does not check their records: deleting them is all that is left to do, and
all that tampering with them could do). A file sealed before heads said its size gets every check but that one.
Those reads are made before the open takes the log's and the directory's locks (brokers sharing
the directory commit and rotate meanwhile: a sealed file never changes once its rotation is
done); nothing found then is a verdict. Under the locks, after the resync, the open lists the
names again and judges the series as above from what it read, reading again only a file it did
not find whole then (tampered with, or met half-way through a sibling's rotation or a shipper's
deletion), a file sealed since, or one whose log or head is no longer the very file read (device,
inode, size, modification and change times): replaced, rewritten or resized since. So a sibling's
release waits for a start only as long as it takes to stat the files (2,000 files: 25-75 ms on a
loaded host, against 0.9-7 s of reads held before; 12,500 files: 0.2-0.5 s, where the reads
passed the sibling's 10 s wait; ``tests/bench/audit_start.py``). A file
changed in place between the two looks at the same length within one tick of the file system's
clock keeps its times and is not read again: one changed after a check was not caught at start
either, before.
Which names are sealed files, and which are tampering (a sealed name not as a rotation writes it,
e.g. with leading zeros) or being shipped, is read by :mod:`strongroom.keybroker.audit_names`,
as ``audit verify`` reads them; a sealed file or head that is a symbolic link is not followed
(``AUDIT_UNAVAILABLE``, as for the log at the path).
Not caught at start, nor by ``audit verify``: the newest files deleted while the broker is
stopped, the log at the path and its head with them (a rotation interrupted after its step 3
leaves the same directory, and the next log continues the newest file left: the chain cut at a
file's end, a rollback), and the oldest remaining file deleted (retention); ship the heads to
an append-only store elsewhere if that matters. Checking
every record is left to ``strongroom audit verify DIR``, run beside the broker: it took 2.2 s per
64 MiB file here, about 220 s for those 100 files, which a start would spend before serving, and
more with every file retained.

**Concurrency.** Within a process, one caller at a time commits (others queue, as above); across
processes on the same host, ``flock`` on the log file serialises commits, and each commit re-reads
the tail if another process moved it. That lock is waited for at most
:data:`LOG_LOCK_WAIT_SECONDS`, by every commit, the start and a rotation's switch to the new log
(one bound for the two locks of a commit that switches, counted from when its oldest caller
queued, so a caller queued behind a refused commit is not given a second bound):
any process that can open the log, for reading alone, can take it and keep it (then
``AuditUnavailable``, the batch refused as on a failed write, logged as one is: at ERROR naming
the file, when the failure is new, then with a count of the commits it refused, see
:mod:`~strongroom.keybroker.outage_lines`).
The wait is the kernel's own (:class:`~strongroom.files.BoundedFlock`), so the processes sharing a
log take turns as they did with a blocking ``flock``; a ``LOCK_NB`` poll would be starved by them. :func:`~strongroom.keybroker.audit_verify.verify_audit_log`
takes a *shared* ``flock`` only for as long as it reads the head and the log's length, then checks
the log up to that length: a snapshot between two commits, so a log being written is never
reported truncated, cut off or unanchored because a commit was under way (the writer waits
microseconds, not for the check; the check waits for that lock as long as a commit does, then
stops with ``AuditUnavailable``). It opens both files without blocking and reads them only if they
are regular files (the log before locking it), so a FIFO put in the place of either can neither
hang the check nor, through the lock, the broker's commits.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import collections
import contextlib
import copy
import enum
import fcntl
import hashlib
import itertools
import logging
import os
import re
import secrets
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from strongroom import jsonparse
from strongroom.closing import Closing
from strongroom.cryptoparse import KEY_PARSE_ERRORS, ed25519_private_key
from strongroom.errors import DataLoss, InvalidArgument, StrongroomError
from strongroom.files import BoundedFlock, lock_held, os_error_cause, start_writeback
from strongroom.identifiers import DECISION_ID_PATTERN, KEY_ID_PATTERN
from strongroom.keybroker.audit_head import (
    FILE_BYTES,
    GENESIS_HASH,
    HEX64_RE,
    VOID_MAX,
    VOID_PREFIX,
    Head,
    HeadFile,
    ParsedHead,
    canonical_json,
    key_fingerprint,
)
from strongroom.keybroker.audit_head import parse as parse_head
from strongroom.keybroker.audit_names import list_sealed, open_regular, sealed_log_name
from strongroom.keybroker.errors import (
    AuditLogClosed,
    AuditTampered,
    AuditUnavailable,
    audit_failure,
)
from strongroom.keybroker.outage_lines import OutageLines
from strongroom.reasons import Reason
from strongroom.runtime.secrets import Secret

_log = logging.getLogger(__name__)
T = TypeVar("T")

RECORD_VERSION = 2  # records carry ``sig``; version-1 records (no ``sig``) still verify
_RECORD_DOMAIN = b"strongroom-audit-record-v1\n"
_RECORD_SIG_DOMAIN = b"strongroom-audit-record-sig-v1\n"
_VERSION_JSON = b"%d" % RECORD_VERSION
# The most records one commit writes, and so the most a crash can leave after the signed head.
MAX_BATCH_RECORDS = 64
# The most refused records' hashes kept at once; past it their position is refused as a whole.
_REVOKED_MAX = 4 * MAX_BATCH_RECORDS
_MAX_CLAIMS_DEPTH = 16
MAX_RECORD_BYTES = 64 * 1024
_REASON_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_SERIAL_RE = re.compile(r"^[0-9a-f]{1,64}$")
_ACTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# The longest the broker and ``audit verify`` wait for the audit directory's ``flock`` before
# giving up (AUDIT_UNAVAILABLE): any process that can open the directory can hold that lock for
# ever. Its legitimate holders: a rotation's steps (a head write, two renames, a new log and its
# head: five syncs, 24 ms here), audit verify (a shared lock, let go at once) and another
# replica's start, which reads its sealed files (0.8 ms a file uncached) before it takes the
# locks and under them only stats each file and lists the names (2,000 files: 25-75 ms, 12,500:
# 0.2-0.5 s, on a loaded host; tests/bench/audit_start.py): some 100,000 retained files before
# it comes near this bound (it reached it at about 6,000 when it read them under it). Of the
# broker's processes only one whose log is a file another has since sealed waits here for a
# start (any other waits first, for the log's own flock, which the start holds too); audit
# verify does when its first check fails. A disk so slow that five syncs take longer refuses the
# releases of that moment, as a failed write does. Waited for in the kernel's queue
# (strongroom.files.BoundedFlock), as the log's lock is.
DIR_LOCK_WAIT_SECONDS = 5.0
# The longest the broker (each commit, rotation and start) and audit verify's snapshot wait for
# the log file's own ``flock`` (then AUDIT_UNAVAILABLE, logged at ERROR): any process that can
# open the log for reading can hold it for ever (flock needs no write access). Its legitimate
# holders: a commit (a write, an fsync and a head's fdatasync: milliseconds), audit verify (a
# shared lock while it reads a head and a length: microseconds), a commit that rotates and a
# start, each of which may wait DIR_LOCK_WAIT_SECONDS for the directory while holding this lock
# and then do the work that bound is sized for under it (a start's stat of each sealed file,
# its reads done before it locks). Twice that bound: a legitimate holder is never given up on
# while it is within its own. The wait is in the kernel's queue (strongroom.files.BoundedFlock),
# as fair between the brokers of one host as the blocking flock it replaces.
LOG_LOCK_WAIT_SECONDS = 2 * DIR_LOCK_WAIT_SECONDS
# A wait for the log's lock that ends in time but took longer than this is a WARNING: a holder
# that lets go just before LOG_LOCK_WAIT_SECONDS and takes the lock again delays every release
# by nearly that much with no refusal to show for it. A commit holds the lock for milliseconds.
LOG_LOCK_SLOW_SECONDS = 1.0


class Decision(enum.Enum):
    """The outcome being recorded."""

    ALLOWED = "allowed"
    DENIED = "denied"


@dataclass(frozen=True)
class AuditEvent:
    """What the broker decided, and on what evidence. Hex strings are lowercase.

    ``claims`` holds the verified claims the decision rested on (JSON types only: str, int, finite
    float, bool, None, lists, and dicts with str keys). ``decision_id`` is generated when None.
    ``release_signing_key_id`` (64 hex digits: the SHA-256 of the raw public key, the
    ``release_signing_key_id`` the answer carries) names the key that signs a granted release's
    answer; the record has the member only when it is set, so other records keep their bytes.
    """

    decision: Decision
    reason: str
    caller_spiffe_id: str | None = None
    caller_cert_serial: str | None = None
    evidence_sha256: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    policy_version: str | None = None
    policy_sha256: str | None = None
    key_id: str | None = None
    key_version: int | None = None
    oaep_mechanism: str | None = None
    action: str = "key_release"
    decision_id: str | None = None
    release_signing_key_id: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """An appended record's coordinates."""

    seq: int
    decision_id: str
    time: str
    hash: str


def record_hash(record_without_hash: Mapping[str, Any]) -> str:
    """The chain hash of a record (given without its ``hash`` field)."""
    return hashlib.sha256(_RECORD_DOMAIN + canonical_json(record_without_hash)).hexdigest()


def _scalar(value: str | int | None) -> bytes:
    """``canonical_json`` of a checked scalar member (a ``str``, a non-bool ``int`` or None)
    without a JSON encoder per value: the record's small objects are built from these."""
    if value is None:
        return b"null"
    if isinstance(value, str):
        return canonical_json(value)
    return int.__repr__(value).encode()  # what the encoder writes for an int (bools excluded)


def _record_line(
    members: Mapping[str, bytes], seq: int, prev: str, time_text: str, key: Ed25519PrivateKey
) -> tuple[bytes, str]:
    """A record's log line (with its newline) and hash: the caller's encoded ``members`` with
    ``v``, ``seq``, ``time`` and ``prev``, signed (``sig``) and hashed (``hash``). ``seq`` and
    ``prev`` are part of what is signed, so only the committer, who assigns them, can sign.

    ``members`` holds each member's value already in canonical JSON, so the record's canonical
    JSON is ``{`` + its ``"name":value`` members in sorted order + ``}`` (canonical JSON sorts every
    object's keys, so a value encodes alike on its own and inside the record): the committer
    writes the three forms (signed: without ``hash`` and ``sig``; hashed: without ``hash``;
    written: whole) without encoding the decision fields under the commit lock, sorting and
    formatting the members once and inserting ``sig`` and ``hash`` at their sorted places
    (``members`` never carries those two: only the committer has them)."""
    record = {
        **members,
        "v": _VERSION_JSON,
        "seq": _scalar(seq),
        "time": canonical_json(time_text),
        "prev": canonical_json(prev),
    }
    names = sorted(record)
    parts = [b'"%s":%s' % (name.encode(), record[name]) for name in names]
    signature = key.sign(_RECORD_SIG_DOMAIN + b"{" + b",".join(parts) + b"}")
    at = bisect.bisect(names, "sig")
    names.insert(at, "sig")
    parts.insert(at, b'"sig":' + canonical_json(base64.b64encode(signature).decode()))
    digest = hashlib.sha256(_RECORD_DOMAIN + b"{" + b",".join(parts) + b"}").hexdigest()
    parts.insert(bisect.bisect(names, "hash"), b'"hash":' + canonical_json(digest))
    return b"{" + b",".join(parts) + b"}\n", digest


def _record_signed_bytes(record: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in ("hash", "sig")}
    return _RECORD_SIG_DOMAIN + canonical_json(body)


def record_signed_by(line: bytes, public_key: Ed25519PublicKey) -> bool:
    """Whether ``line`` (one log line without its newline) is a canonical record whose ``hash`` is
    right and whose ``sig`` verifies with ``public_key``: a record that key's holder wrote."""
    try:
        record = jsonparse.loads(line)
        if not isinstance(record, dict) or canonical_json(record) != line:
            return False
        claimed = record["hash"]
        signature = base64.b64decode(record["sig"], validate=True)
        if record_hash({k: v for k, v in record.items() if k != "hash"}) != claimed:
            return False
        public_key.verify(signature, _record_signed_bytes(record))
    # RecursionError: canonical_json re-encodes what parsed, a little deeper in the stack.
    except (ValueError, KeyError, TypeError, RecursionError, binascii.Error, InvalidSignature):
        return False
    return True


def directory_locked(directory: Path) -> str:
    """Why the audit directory could not be locked: another process held its ``flock`` for all
    of :data:`DIR_LOCK_WAIT_SECONDS`."""
    return lock_held(
        f"the audit directory {directory}",
        DIR_LOCK_WAIT_SECONDS,
        "a rotation holds it for milliseconds, a start some 30 microseconds per sealed file",
    )


def log_locked(path: Path, waited: float) -> str:
    """Why the audit log could not be locked: another process held its ``flock`` for all of the
    ``waited`` seconds."""
    return lock_held(f"the audit log {path}", waited, "a commit holds it for milliseconds")


def _take_log_lock(lock: BoundedFlock, path: Path, deadline: float) -> None:
    """Takes the log's exclusive ``flock`` (``lock``) by ``deadline`` (``time.monotonic()``, at
    most :data:`LOG_LOCK_WAIT_SECONDS` after the wait began); AuditUnavailable if another process
    held it until then (naming the file: a refused commit logs it) or if it cannot be taken at
    all."""
    started = time.monotonic()
    try:
        locked = lock.acquire(deadline - started)
    except OSError as exc:
        raise _call_failed("lock the audit log", exc, path) from None
    if not locked:
        raise AuditUnavailable(
            log_locked(path, LOG_LOCK_WAIT_SECONDS), public=audit_failure("lock")
        )
    waited = time.monotonic() - started
    if waited > LOG_LOCK_SLOW_SECONDS:
        _log.warning(
            "waited %.1f s for the lock of the audit log %s: another process held it (a commit "
            "holds it for milliseconds; find the holder with fuser -v or lsof on that file)",
            waited,
            path,
        )


def head_path(log_path: Path) -> Path:
    """Where the signed head of ``log_path`` lives."""
    return log_path.with_name(log_path.name + ".head")


def new_signing_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 head-signing key: (private PKCS#8 PEM, public SPKI PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_signing_key(secret: Secret) -> Ed25519PrivateKey:
    """Reads an Ed25519 private key from a Secret holding PKCS#8 PEM or 32 raw bytes."""
    key = ed25519_private_key(secret.reveal())
    if key is None:
        raise InvalidArgument(
            "the audit signing key is not an Ed25519 private key", reason=Reason.AUDIT_KEY_INVALID
        )
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """Reads the Ed25519 public key (SPKI PEM) that verifies heads."""
    try:
        key = serialization.load_pem_public_key(pem)
    except KEY_PARSE_ERRORS:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(
            "the audit public key is not an Ed25519 PEM public key", reason=Reason.AUDIT_KEY_INVALID
        )
    return key


def _key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_fingerprint(raw)


def _now_text(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# A tuple, not ``dict | list | tuple``: that expression builds a new union object each time it is
# evaluated, once per claim value here (12 of the check's 17 µs for a release's claims).
_CONTAINERS = (dict, list, tuple)


def _check_claims_shape(claims: Mapping[str, Any]) -> None:
    """Rejects what ``json.dumps`` would encode without complaint but not faithfully: non-string
    keys (it converts them) and deep nesting. Values it cannot encode (bytes, NaN, sets, other
    mapping types) make the encoding itself fail. Only containers are visited: records carry
    dozens of claims, and this runs for every decision."""
    pending: list[tuple[Any, int]] = [(claims, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > _MAX_CLAIMS_DEPTH:
            raise ValueError("nested too deeply")
        if isinstance(value, dict):
            # map and a list comprehension, not generator expressions: no generator frame to
            # resume per key and per value (the same checks, in the same order).
            if not all(map(isinstance, value, repeat(str))):
                raise ValueError("non-string key")
            items = value.values()
        else:
            items = value
        depth += 1
        pending += [(v, depth) for v in items if isinstance(v, _CONTAINERS)]


def _event_members(event: AuditEvent) -> tuple[str, dict[str, bytes]]:
    """Validates an event; returns its decision id and its record members, encoded (all but
    ``v``, ``seq``, ``prev``, ``time``, ``sig`` and ``hash``, which the committer adds)."""

    def bad(what: str) -> InvalidArgument:
        return InvalidArgument(f"audit event: {what}", reason=Reason.AUDIT_RECORD_INVALID)

    if not isinstance(event.decision, Decision):
        raise bad("decision must be a Decision")
    # fullmatch: ``$`` alone would let a trailing newline through.
    if not isinstance(event.reason, str) or not _REASON_RE.fullmatch(event.reason):
        raise bad("reason must be an UPPER_SNAKE code")
    if not isinstance(event.action, str) or not _ACTION_RE.fullmatch(event.action):
        raise bad("action must be a lower_snake word")
    spiffe = event.caller_spiffe_id
    if spiffe is not None and (
        not isinstance(spiffe, str) or not spiffe.startswith("spiffe://") or len(spiffe) > 2048
    ):
        raise bad("caller_spiffe_id must be a spiffe:// URI")
    for name, pattern in (
        ("caller_cert_serial", _SERIAL_RE),
        ("evidence_sha256", HEX64_RE),
        ("policy_sha256", HEX64_RE),
        ("decision_id", DECISION_ID_PATTERN),
        ("key_id", KEY_ID_PATTERN),
        ("release_signing_key_id", HEX64_RE),
    ):
        value = getattr(event, name)
        if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
            raise bad(f"{name} is malformed")
    version = event.key_version
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise bad("key_version must be an integer")
    for name in ("policy_version", "oaep_mechanism"):
        value = getattr(event, name)
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            raise bad(f"{name} must be a short string")
    if not isinstance(event.claims, Mapping):
        raise bad("claims must be a mapping")
    claims = dict(event.claims)
    try:
        _check_claims_shape(claims)
        encoded_claims = canonical_json(claims)
    except (TypeError, ValueError, RecursionError) as exc:
        raise bad(f"claims: {exc}") from None
    decision_id = event.decision_id or uuid.uuid4().hex
    # Every value was checked above to be a str, None or (the version) a non-bool int: each is
    # encoded as canonical_json would, the two small objects with their keys in sorted order.
    members = {
        "action": canonical_json(event.action),
        "decision": canonical_json(event.decision.value),
        "reason": canonical_json(event.reason),
        "caller": b'{"cert_serial":%s,"spiffe_id":%s}'
        % (_scalar(event.caller_cert_serial), _scalar(spiffe)),
        "evidence_sha256": _scalar(event.evidence_sha256),
        "policy_version": _scalar(event.policy_version),
        "policy_sha256": _scalar(event.policy_sha256),
        "key": b'{"id":%s,"version":%s}' % (_scalar(event.key_id), _scalar(version)),
        "oaep_mechanism": _scalar(event.oaep_mechanism),
        "decision_id": canonical_json(decision_id),
        "claims": encoded_claims,
    }
    if event.release_signing_key_id is not None:
        # Only on records that have one (a granted release): every record written before, and
        # every other record, keeps its bytes.
        members["release_signing_key_id"] = canonical_json(event.release_signing_key_id)
    return decision_id, members


class _Pending:
    """One caller's event waiting for a commit; the committer fills in the outcome."""

    __slots__ = (
        "decision_id",
        "done",
        "error",
        "members",
        "on_written",
        "queued_at",
        "result",
        "wakeup",
    )

    def __init__(self, event: AuditEvent, on_written: Callable[[], None] | None) -> None:
        # Validated and encoded by the caller's thread, outside the commit.
        self.decision_id, self.members = _event_members(event)
        self.on_written = on_written
        # The log's lock is waited for from here (LOG_LOCK_WAIT_SECONDS), queueing included.
        self.queued_at = time.monotonic()
        self.done = False
        self.result: AuditRecord | None = None
        self.error: StrongroomError | None = None
        # While the caller sleeps: a lock it holds and blocks on again, which whoever wakes it
        # releases (once, under the queue's lock). None while it runs.
        self.wakeup: threading.Lock | None = None

    def wake(self) -> None:
        """Wakes the caller if it sleeps (called with the queue's lock held)."""
        wakeup, self.wakeup = self.wakeup, None
        if wakeup is not None:
            wakeup.release()

    def outcome(self) -> AuditRecord:
        if self.error is not None:
            # A fresh exception per caller: one batch's error object is not raised in many threads.
            # A copy, not the class called again: that lost what its caller is told (``public``).
            raise copy.copy(self.error)
        assert self.result is not None
        return self.result


class AuditLog(Closing):
    """An open audit log; :meth:`append` is safe from many threads and processes."""

    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey,
        clock: Callable[[], float],
        fd: int,
        dir_fd: int,
        *,
        max_batch: int = MAX_BATCH_RECORDS,
        max_bytes: int = 0,
        rotate_bytes: int = 0,
    ) -> None:
        """Internal: use :meth:`open`."""
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._rotate_bytes = rotate_bytes
        # The sealed files beside the log count against max_bytes (the volume holds them all
        # until they are shipped and deleted); re-counted when the cap is reached.
        self._sealed_bytes = 0
        self._path = path
        self._head_path = head_path(path)
        self._key = signing_key
        self._public = signing_key.public_key()
        self._clock = clock
        self._fd = fd
        self._log_lock = BoundedFlock(fd, fcntl.LOCK_EX)
        # When the log's locks must be had by (_flocked), for a switch to a new log under it.
        self._lock_deadline = 0.0
        self._dir_fd = dir_fd
        self._dir_lock = BoundedFlock(dir_fd, fcntl.LOCK_EX)
        self._head = HeadFile(
            self._head_path,
            signing_key,
            _key_fingerprint(self._public),
            lambda: _now_text(clock),
            dir_fd,
        )
        # Held by the one committer while it touches the files (and by open and close).
        self._lock = threading.Lock()
        # Guards the queue of callers waiting for a commit and whether a commit is under way.
        self._queue_lock = threading.Lock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._committing = False
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._count = 0
        self._last_hash = GENESIS_HASH
        self._base = 0  # the seq of this file's first record (the sealed predecessor's count)
        self._size = 0
        self._stale = True
        self._closed = False
        self._tamper: str | None = None
        # Set once a resync succeeded: from then on the files must continue that chain.
        self._has_chain = False
        # Records this process wrote but cut back (their decision never took effect), hash -> seq,
        # kept until a commit takes their position; and the position from which every unanchored
        # record is cut off, once more were refused there than _REVOKED_MAX (see _revoke).
        self._revoked: dict[str, int] = {}
        self._refused_from: int | None = None
        # The refused commits' lines, and those of what their refusals could not undo: bounded.
        self._outage = OutageLines(_log)
        # The same, durably, for the position the head is at: what its ``void`` names (the
        # refused batches' first records) or, past VOID_MAX of them, everything (``void_all``).
        # A restart forgets the above; the head does not (see _void_refused).
        self._void: tuple[str, ...] = ()
        self._void_all = False

    @classmethod
    def open(
        cls,
        path: Path | str,
        signing_key: Ed25519PrivateKey,
        *,
        clock: Callable[[], float] = time.time,
        max_batch: int = MAX_BATCH_RECORDS,
        max_bytes: int = 0,
        rotate_bytes: int = 0,
    ) -> AuditLog:
        """Opens (creating if absent) the log at ``path`` and checks its tail against the head.

        ``max_batch`` bounds the records one commit writes (1 = one commit per record, as before
        group commit; benchmarks compare the two); it cannot exceed :data:`MAX_BATCH_RECORDS`,
        the most that crash repair anchors.

        ``max_bytes`` (0: none) caps the log's size: a batch that would pass it is refused with
        ``AuditUnavailable(AUDIT_LOG_FULL)``, as on a full disk. It is for volumes whose limit is
        enforced otherwise than by ENOSPC: a Kubernetes emptyDir's ``sizeLimit`` evicts the pod,
        losing the log and its head, and the next pod would start a new chain. Sealed files
        beside the log (rotation) count against it too.

        ``rotate_bytes`` (0: never) seals the log and continues the chain in a new one before a
        commit that would take it past that size (see the module doc, *Rotation*); a rotation
        that a crash interrupted is completed here.

        Raises ``AuditUnavailable`` if the files cannot be opened and ``DataLoss(AUDIT_LOG_TAMPERED)``
        if the head does not match the log beyond the crash repairs described in the module doc.
        """
        if isinstance(max_batch, bool) or not 1 <= max_batch <= MAX_BATCH_RECORDS:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH_RECORDS}")
        if isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError("max_bytes must be 0 (no cap) or a size in bytes")
        if isinstance(rotate_bytes, bool) or rotate_bytes < 0:
            raise ValueError("rotate_bytes must be 0 (never) or a size in bytes")
        path = Path(path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise _call_failed("open the audit directory", exc, path.parent) from None
        # No symlink (the log would be written wherever it points) and nothing but a regular
        # file: a FIFO would block the broker's start and every commit's reads.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            os.close(dir_fd)
            raise _call_failed("open the audit log", exc, path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            os.close(dir_fd)
            raise AuditUnavailable(f"the audit log {path} is not a regular file")
        log = cls(
            path,
            signing_key,
            clock,
            fd,
            dir_fd,
            max_batch=max_batch,
            max_bytes=max_bytes,
            rotate_bytes=rotate_bytes,
        )
        try:
            # The sealed files cannot change any more: read them before the locks (a sibling's
            # releases and rotations wait for those), and under them only make sure that each
            # file is still the one read, and read whatever was sealed since.
            prechecked = _precheck_sealed(dir_fd, path.name, log._public)
            with log._lock, log._flocked(time.monotonic()):
                log._resync()
                log._check_sealed_series(prechecked)
                log._count_sealed_bytes()
        except OSError as exc:
            # Each step names what it could not do; a system call none of them expected to fail
            # (a read of a sealed file while finishing a rotation, EIO) refuses the start all the
            # same, naming its file, rather than ending it with a traceback.
            log.close()
            failed = _call_failed_in("access the audit file", exc, path.parent, path)
            # The refusal drops the OSError (``from None``): logged here, once, with its
            # traceback, or a programming error surfacing as one (EINVAL from a bad argument)
            # kept no word of where it was raised. Its message names paths and the errno only.
            _log.error(
                "%s (a call no step of the audit log's start expected to fail)",
                failed.message,
                exc_info=exc,
                extra={"reason": Reason.AUDIT_UNAVAILABLE.value},
            )
            raise failed from None
        except BaseException:
            log.close()
            raise
        return log

    def __repr__(self) -> str:
        return f"AuditLog({str(self._path)!r}, records={self._count})"

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def count(self) -> int:
        """Records in the log as of this process's last append or open."""
        return self._count

    @property
    def first_seq(self) -> int:
        """The ``seq`` of this file's first record: 0, or where the sealed predecessor ended."""
        return self._base

    def rotate(self) -> Path | None:
        """Seals the log now and continues the chain in a new one (an operator's or a test's
        rotation; with ``rotate_bytes`` the broker rotates by itself). Returns the sealed log's
        new path, or None when the log holds no record yet (nothing to seal).

        Raises ``AuditUnavailable`` if a step cannot be done (the next commit or open finishes
        what was started) and ``DataLoss(AUDIT_LOG_TAMPERED)`` as :meth:`append` does.
        """
        with self._writing(time.monotonic()):
            try:
                self._resync()
                if self._size == 0:
                    return None
                self._check_room_to_rotate()
                return self._rotate()
            except OSError as exc:
                failed = self._read_failed(exc)
                raise AuditUnavailable(
                    f"the audit log cannot be rotated: {failed.message}", public=failed.public
                ) from None

    @property
    def tamper_problem(self) -> str | None:
        """Why the log was found tampered with (latched until the broker restarts); None if not."""
        return self._tamper

    @property
    def queued(self) -> int:
        """Callers waiting for the next commit (not counting those of the commit under way)."""
        with self._queue_lock:
            return len(self._queue)

    @property
    def batch_sizes(self) -> dict[int, int]:
        """How many commits took how many callers' records: ``{batch size: commits}``, counting
        every batch formed since the log was opened (including batches that then failed)."""
        with self._queue_lock:
            return dict(self._batch_sizes)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run: nothing can be written, nor rotated, any more."""
        return self._closed

    def close(self) -> None:
        """Closes the file descriptors (after any commit under way); idempotent. A failure's
        refused commits not yet logged are said (:meth:`OutageLines.closing`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outage.closing()
            self._head.close()
            for fd in (self._fd, self._dir_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def append(
        self, event: AuditEvent, *, on_written: Callable[[], None] | None = None
    ) -> AuditRecord:
        """Makes one record durable (line + signed head, both fsync'd) and returns it.

        Callers that arrive while a commit is under way wait and are committed together by the
        first of them (group commit, see the module doc); each returns only once its own record is
        durable and covered by a signed head.

        ``on_written`` is called (by whichever thread commits) once the record has its place in
        the log and is about to be written and synced: work started there overlaps the syncs (the
        key broker starts its HSM re-wrap). It should be quick (the batch waits for it); if it
        raises, that is logged and the commit goes on. It is not called if the commit fails before
        that point (a closed or tampered log, a record too large).

        Raises InvalidArgument(AUDIT_RECORD_INVALID) for a malformed event, ``AuditUnavailable``
        if the record could not be made durable, and ``DataLoss(AUDIT_LOG_TAMPERED)`` once the log
        was found tampered with — in each case the decision must not take effect.
        """
        mine = _Pending(event, on_written)
        queue_lock = self._queue_lock
        queue_lock.acquire()
        self._queue.append(mine)
        while not mine.done:  # the queue's lock is held at the top of each pass
            if self._committing:
                # Sleep until the committer wakes this caller alone: its record's batch ended,
                # or it is first in the queue and leads the next one (see _committed).
                wakeup = threading.Lock()
                wakeup.acquire()
                mine.wakeup = wakeup
                queue_lock.release()
                try:
                    wakeup.acquire()
                except BaseException:  # interrupted (a signal's handler raised in this thread)
                    with queue_lock:
                        self._abandon(mine)
                    raise
                if mine.done:
                    # Set before the wake-up, under the queue's lock: no need to take it again.
                    return mine.outcome()
                queue_lock.acquire()
                continue
            # Nobody is committing: this caller commits everything queued so far (itself
            # included, unless more than a batch is ahead of it; then it loops).
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            self._batch_sizes[len(batch)] += 1
            self._committing = True
            queue_lock.release()
            try:
                self._commit(batch)
            except BaseException:
                with queue_lock:
                    # Raised to this caller: its own record, if still queued behind the batch,
                    # must not be committed by whoever commits next.
                    self._abandon(mine)
                    self._committed(batch)
                raise
            queue_lock.acquire()
            self._committed(batch)
        queue_lock.release()
        return mine.outcome()

    def _committed(self, batch: list[_Pending]) -> None:
        """Ends a commit (with the queue's lock held): every caller of ``batch`` has its outcome
        and is woken, and so is the first caller still queued, which leads the next batch. Nobody
        else is woken: a caller wakes once its record is committed, or to commit."""
        self._committing = False
        for pending in batch:
            if pending.result is None and pending.error is None:
                # Only after an unexpected exception, which the committer re-raises.
                pending.error = AuditUnavailable("the audit commit failed")
            pending.done = True
            pending.wake()
        if self._queue:
            self._queue[0].wake()  # a no-op when that is the committer itself: it loops

    def _abandon(self, mine: _Pending) -> None:
        """Takes the record of a caller that raises out of the queue (the queue's lock held);
        if it was to lead the next batch, the next in line leads instead."""
        if mine in self._queue:
            self._queue.remove(mine)
        if not self._committing and self._queue:
            self._queue[0].wake()

    def _commit(self, batch: list[_Pending]) -> None:
        """Writes the batch's records with one write, one fsync and one signed head, and sets each
        pending caller's outcome; a failure fails every caller of the batch."""
        try:
            # Its callers have waited since they queued (behind a refused commit, maybe).
            with self._writing(min(pending.queued_at for pending in batch)):
                self._resync()
                self._write_batch(batch)
        except OSError as exc:
            # Reading the state back (the tail, the head) failed: nothing of the batch was
            # written, and its callers hear what a failed write tells them.
            self._refuse(batch, self._read_failed(exc))
        except (AuditUnavailable, DataLoss) as exc:
            self._refuse(batch, exc)
        else:
            if any(pending.result is not None for pending in batch):
                self._outage.committed()

    def _refuse(self, batch: list[_Pending], error: AuditUnavailable | DataLoss) -> None:
        """Fails the batch's callers still without an outcome with ``error``. An outage is logged
        here (:class:`~strongroom.keybroker.outage_lines.OutageLines`: at ERROR when it is new,
        then with a count of the batches it refused), its message naming the file and the errno:
        the callers hear only its public words
        (:func:`~strongroom.keybroker.errors.audit_failure`), and the operator's only account of
        a failed commit is this line. A tamper verdict was logged (CRITICAL) when it was found."""
        if isinstance(error, AuditUnavailable):
            self._outage.refused(error)
        for pending in batch:
            if pending.result is None and pending.error is None:
                pending.error = error

    def _write_batch(self, batch: list[_Pending]) -> None:
        seq, prev = self._count, self._last_hash
        lines: list[bytes] = []
        written: list[tuple[_Pending, AuditRecord]] = []
        for pending in batch:
            time_text = _now_text(self._clock)
            line, record_digest = _record_line(pending.members, seq, prev, time_text, self._key)
            if len(line) > MAX_RECORD_BYTES:
                pending.error = InvalidArgument(
                    f"audit record is {len(line)} bytes (max {MAX_RECORD_BYTES})",
                    reason=Reason.AUDIT_RECORD_INVALID,
                )
                continue
            lines.append(line)
            written.append(
                (pending, AuditRecord(seq, pending.decision_id, time_text, record_digest))
            )
            seq, prev = seq + 1, record_digest
        if not lines:
            return
        data = b"".join(lines)
        rotating = bool(self._rotate_bytes and self._size) and (
            self._size + len(data) > self._rotate_bytes
        )
        # A rotation makes the log a sealed file and adds a head (FILE_BYTES) for the new one.
        adding = len(data) + (FILE_BYTES if rotating else 0)
        if self._max_bytes and self._sealed_bytes + self._size + adding > self._max_bytes:
            self._count_sealed_bytes()  # the operator may have deleted shipped sealed files
            if self._sealed_bytes + self._size + adding > self._max_bytes:
                # Before any hook, rotation or write: refused as on a full disk.
                raise AuditUnavailable(
                    f"the audit log has reached its size cap ({self._max_bytes} bytes"
                    + (", sealed files included" if self._sealed_bytes else "")
                    + "): ship and archive "
                    + (
                        "the sealed files and delete them"
                        if self._sealed_bytes or self._rotate_bytes
                        else "it, then start a new log"
                    )
                    + " (or raise the cap) to take decisions again",
                    reason=Reason.AUDIT_LOG_FULL,
                )
        if rotating:
            start = (self._count, self._last_hash)
            self._rotate()
            if (self._count, self._last_hash) != start:  # not expected: the records chain anew
                self._write_batch(batch)
                return
        hashes = [record.hash for _, record in written]
        for pending, _ in written:
            if pending.on_written is not None:
                try:
                    pending.on_written()
                except Exception:
                    # One caller's hook does not fail the batch: its work just does not overlap.
                    _log.exception("an audit append's on_written hook raised")
        head = Head(seq, prev, self._base)
        self._write_records(data, hashes, head)
        try:
            self._write_head(head)
        except BaseException as exc:
            # Nobody of this batch hears success, so none of its records may stay.
            self._cut_back(hashes)
            if isinstance(exc, OSError):
                raise _call_failed("write the audit head", exc, self._head_path) from None
            raise
        self._count, self._last_hash = head.count, head.last_hash
        self._void, self._void_all = (), False  # the new head anchors past the refused position
        self._size += len(data)
        self._forget_revoked()
        for pending, result in written:
            pending.result = result

    # --- internals (called with self._lock and the flock held) -------------------------------

    @contextlib.contextmanager
    def _writing(self, since: float) -> Iterator[None]:
        """The commit lock and the log's ``flock`` (waited for since ``since``: see
        :meth:`_flocked`), for a process that may still write: the log open and not found
        tampered with (else AuditUnavailable, or the latched DataLoss)."""
        with self._lock:
            if self._closed:
                raise AuditLogClosed
            if self._tamper is not None:
                raise AuditTampered(self._tamper)
            with self._flocked(since):
                yield

    @contextlib.contextmanager
    def _flocked(self, since: float) -> Iterator[None]:
        """The log's ``flock``, waited for until :data:`LOG_LOCK_WAIT_SECONDS` after ``since``
        (``time.monotonic()``: when the oldest caller served began to wait, a commit's queueing
        included), else AuditUnavailable naming the file (who holds it is for the operator to
        find), logged not here but by the commit it refuses (:meth:`_refuse`), as every failure
        of a commit is. The switch to a new log under it (_switch_to_new) waits until the same
        moment."""
        self._lock_deadline = since + LOG_LOCK_WAIT_SECONDS
        _take_log_lock(self._log_lock, self._path, self._lock_deadline)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write_records(self, data: bytes, hashes: list[str], head: Head | None = None) -> None:
        """Appends ``data`` (the records ``hashes``) durably; with ``head``, the head that will
        anchor them is signed while the disk writes them (:meth:`HeadFile.prepare`): their
        writeback is started first, so the signature no longer adds to the commit's time. The
        head is still written only once they are synced."""
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if head is not None:
                start_writeback(self._fd, self._size, len(data))
                self._head.prepare(head)
            os.fsync(self._fd)
        except BaseException as exc:
            self._cut_back(hashes)
            if isinstance(exc, OSError):
                raise _call_failed("write the audit log", exc, self._path) from None
            raise

    def _cut_back(self, revoked_hashes: list[str]) -> None:
        """Removes records that did not become durable; on failure, forces a resync next time.

        Their hashes are remembered: should the lines survive (the truncate failed, or someone
        re-appends the signed lines later), the repair cuts them off again instead of anchoring
        them.
        """
        self._revoke(revoked_hashes)
        self._stale = True
        if revoked_hashes:
            self._void_refused(revoked_hashes[0])
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            # The words before the file are the line's from before it named one: alerts match them.
            # Once per failure, then counted (each refused batch is at its callers' pace).
            self._outage.failed(
                "cut back",
                f"cannot cut failed audit records back off the log {self._path}: "
                f"{os_error_cause(exc)}",
            )

    def _void_refused(self, first_hash: str) -> None:
        """Makes the refusal of the batch whose first record is ``first_hash`` durable before its
        lines are cut back and its callers told: one more head generation, anchoring what the head
        did, that names it in ``void``. Only the first record matters: any other record chained
        after the head starts with one. The memory of _revoke dies with the process; without
        this, lines that survived the cut-back (or were put back) were anchored as the broker's
        own at its next start. In place, like every head write, so a full disk does not stop
        it; if it fails all the same, the refusal holds until a restart, as before (logged)."""
        void, void_all = self._void, self._void_all
        prefix = first_hash[:VOID_PREFIX]
        if not void_all and prefix not in void:
            if len(void) < VOID_MAX:
                void = (*void, prefix)
            else:
                void, void_all = (), True  # refuse the position as a whole, as _revoke does
        head = Head(self._count, self._last_hash, self._base)
        try:
            self._head.write(head, void=void, void_all=void_all)
        except (OSError, ValueError) as exc:
            # Both lines keep their words from before they named the file (alerts match them).
            self._outage.failed(
                "void",
                f"cannot record the refusal of audit records in the head {self._head_path} "
                f"({os_error_cause(exc) if isinstance(exc, OSError) else exc}): should their "
                "lines survive the cut-back, a restarted broker would anchor them",
            )
            return
        self._void, self._void_all = void, void_all
        if self._head.generation == 1:
            # The other slot holds generation 0, which is a whole head file on its own once slot
            # 1 is zeroed (that is how a new head file reads): zeroing it dropped the names
            # without any older copy of the file. Once more, and both slots name them.
            try:
                self._head.write(head, void=void, void_all=void_all)
            except OSError as exc:
                self._outage.failed(
                    "void other slot",
                    "cannot record the refusal of audit records in the head's other slot "
                    f"({self._head_path}: {os_error_cause(exc)}): whoever zeroes the newer slot "
                    "while the broker is stopped undoes it",
                )

    def _revoke(self, hashes: list[str]) -> None:
        """Remembers a refused batch's records (from seq ``self._count``, where it was written).

        While the disk stays full every refused batch lands at the same position, so the set can
        outgrow its bound without any commit taking that position. Forgetting a hash would let its
        signed line, put back, be anchored; so past the bound the position itself is refused:
        every unanchored record from there is cut off until a commit takes it.
        """
        for offset, digest in enumerate(hashes):
            self._revoked[digest] = self._count + offset
        if len(self._revoked) > _REVOKED_MAX:
            lowest = min(self._revoked.values())
            if self._refused_from is None or lowest < self._refused_from:
                self._refused_from = lowest
            self._revoked.clear()

    def _forget_revoked(self) -> None:
        """Drops what the chain made unanchorable: once ``self._count`` records are anchored, a
        record at a lower position can never again follow the head."""
        if self._refused_from is not None and self._refused_from < self._count:
            self._refused_from = None
        if self._revoked:
            self._revoked = {h: seq for h, seq in self._revoked.items() if seq >= self._count}

    def _first_refused(self, first_seq: int, hashes: list[str]) -> int | None:
        """The index of the first of these unanchored records (from ``first_seq``) that this
        process refused, or that sits at or after a position it refused as a whole, or that the
        head voids (the first only: the others chain on it)."""
        # self._void is the head's that these records follow (read by the same resync).
        if hashes and (self._void_all or hashes[0][:VOID_PREFIX] in self._void):
            return 0
        for index, digest in enumerate(hashes):
            if digest in self._revoked or (
                self._refused_from is not None and first_seq + index >= self._refused_from
            ):
                return index
        return None

    def _write_head(self, head: Head) -> None:
        self._head.write(head)

    def _resync(self, *, finishing: bool = False) -> None:
        """Re-reads count and last hash if the file changed since we last wrote it, after checking
        that the files at the log's path still continue the chain this process knows (finishing
        a rotation it finds sealed; ``finishing``: one was just finished)."""
        opened = os.fstat(self._fd)
        while not self._at_path(opened):
            # Not the file at the log's path: rotated (by this process before a failure, or by
            # another one) when it now sits under its sealed name with a sealed head; otherwise
            # _check_same_file calls it tampering. Again while it switches: another process may
            # rotate the new log between this one's opening it and taking its lock.
            held = (opened.st_dev, opened.st_ino)
            self._finish_rotation()
            opened = os.fstat(self._fd)
            if (opened.st_dev, opened.st_ino) == held:
                self._check_same_file(opened)
                break
        size = opened.st_size
        if not self._stale and size == self._size and not self._head.changed():
            return
        data_end, tail = self._checked(_read_tail, self._fd, size, 1)
        last = self._checked(_tail_record, tail[-1][1]) if tail else None
        parsed = self._checked(_read_head, self._head, self._head_path)
        if parsed is not None and parsed.sealed:
            if not finishing:
                # A rotation was sealed but not finished (a crash, a failed rename).
                self._finish_rotation()
                self._resync(finishing=True)
                return
            raise self._tampered("the audit log at the log's path is sealed after its rotation")
        head = None if parsed is None else parsed.head
        self._void, self._void_all = (parsed.void, parsed.void_all) if parsed else ((), False)
        if head is not None and head.count < self._count:
            # Heads only grow: an older (signed) head and log put back while the broker runs.
            raise self._tampered(
                f"the audit head went back from {self._count} to {head.count} records: an older "
                "log and head were put back"
            )
        new_log = head is None and last is None
        if new_log:
            # A new log's chain starts from a random value its first head anchors: records of
            # another log signed with the same key (a staging broker's, one from before a
            # reinstall) then never continue this one, and the crash repair cannot anchor them.
            # Beside sealed logs it continues the latest of them instead (rotation).
            head = self._new_anchor()
        elif (
            last is None
            and not self._has_chain
            and head is not None
            and (head.base, head.count, head.last_hash) == (0, 0, GENESIS_HASH)
        ):
            # A log made before random anchors that has no record yet: its head anchors the
            # all-zeros hash every such log shares, so it names no log, and the first records of
            # any other such log signed with the same key (another replica's) were a valid
            # unanchored tail for it, which the crash repair anchored as this broker's own. It
            # gets a start of its own now, before any record can follow it (one more head
            # generation: the old head still verifies, and nothing it anchored changes).
            _log.info("giving an empty audit log made before random anchors a start of its own")
            head = Head(0, secrets.token_hex(32))
            self._write_head_or_fail(head)
            self._void, self._void_all = (), False  # what it named chained on the zeros
        if self._has_chain:
            self._check_continues(head, size)
        if last is None:
            # An empty log's chain starts where its head says (logs made before: all zeros).
            count = 0 if head is None else head.base
            last_hash = (
                head.last_hash if head is not None and head.count == head.base else GENESIS_HASH
            )
        else:
            count, last_hash = last["seq"] + 1, last["hash"]
        if new_log:
            assert head is not None
            self._write_head_or_fail(head)
        if head is None:
            raise self._tampered("the audit head is missing")
        if count > head.count:
            head, repaired_end = self._repair_unanchored(head, count, size)
            if repaired_end is not None:
                data_end = size = repaired_end
            count, last_hash = head.count, head.last_hash
        if (count, last_hash) != (head.count, head.last_hash):
            raise self._tampered(
                f"the audit log ({count} records) does not match its signed head ({head.count})"
            )
        if data_end != size:
            _log.warning("removing a torn audit line left by a crash (%d bytes)", size - data_end)
            self._truncate(data_end)
        if parsed is not None and parsed.generation is None:
            _log.info("converting the audit head to format 2 (two slots written in place)")
            self._write_head_or_fail(head)
        self._count, self._last_hash, self._size = head.count, head.last_hash, data_end
        self._base = head.base
        self._stale = False
        self._has_chain = True
        self._forget_revoked()

    # --- rotation (called with self._lock and the log's flock held) ---------------------------

    def _check_room_to_rotate(self) -> None:
        """A rotation adds a head (FILE_BYTES) for the new log: refused like a commit past the
        cap (AUDIT_LOG_FULL) if that takes the files past ``max_bytes``."""
        if not self._max_bytes:
            return
        if self._sealed_bytes + self._size + FILE_BYTES > self._max_bytes:
            self._count_sealed_bytes()
            if self._sealed_bytes + self._size + FILE_BYTES > self._max_bytes:
                raise AuditUnavailable(
                    f"the audit log cannot be rotated within its size cap ({self._max_bytes} "
                    "bytes, sealed files included): ship and delete sealed files first",
                    reason=Reason.AUDIT_LOG_FULL,
                )

    def _rotate(self) -> Path:
        """Seals this log (its last head, marked sealed, is the rotation's commit point) and
        continues the chain in a new one; returns the sealed log's path."""
        sealed = Head(self._count, self._last_hash, self._base)
        name = sealed_log_name(self._path.name, sealed.base, sealed.count - 1)
        self._stale = True  # whatever happens next, the next commit re-reads the files
        unfinished = "cannot finish the audit log's rotation (the next commit goes on with it)"
        is_sealed = False
        try:
            with self._dir_locked():
                try:
                    self._head.write(sealed, sealed=True, size=self._size)
                except OSError as exc:
                    failed = _call_failed("write the audit head", exc, self._head_path)
                    raise AuditUnavailable(
                        f"cannot seal the audit log for its rotation: {failed.message}",
                        public=failed.public,
                    ) from None
                is_sealed = True
                self._complete_renames()
                self._prepare_new_log(sealed)
            self._switch_to_new(sealed)
            self._resync(finishing=True)
        except OSError as exc:
            failed = self._read_failed(exc)
            raise AuditUnavailable(
                f"{unfinished}: {failed.message}", public=failed.public
            ) from None
        except AuditUnavailable as exc:
            # Past the seal, the steps name their own file and errno; the operator still needs
            # to hear that the rotation is sealed and the next commit finishes it (and alerts
            # match this start).
            if not is_sealed or exc.reason != Reason.AUDIT_UNAVAILABLE:
                raise
            raise AuditUnavailable(f"{unfinished}: {exc.message}", public=exc.public) from None
        return self._path.with_name(name)

    def _finish_rotation(self) -> None:
        """Completes a sealed rotation from whatever step it reached (a crash, a failed step, or
        another process sharing the log rotated it), then writes to the new log.

        The steps, all under the directory's ``flock``: seal the head in place; rename the log to
        its sealed name; rename the head after it; create the new log and its first head, which
        starts from the sealed log's count and last hash. Each is read back from the directory,
        so whichever process comes next finishes what was started, and `audit verify`, which waits
        for that lock before it checks again, never reads a rotation half-done.
        """
        with self._dir_locked():
            self._complete_renames()
            opened = os.fstat(self._fd)
            if self._at_path(opened):
                self._stale = True  # the log at the path (a new one): resync starts its chain
                return
            sealed = self._sealed_head_of(opened) or self._shipped_end(opened)
            if sealed is None:
                return  # not a rotation: _check_same_file reports it
            if self._has_chain:
                if sealed.count < self._count:
                    raise self._tampered(
                        f"the sealed audit log ends at {sealed.count} records, before the "
                        f"{self._count} this broker wrote"
                    )
                self._check_continues(sealed, opened.st_size)
            # Another process may have rotated again since: follow the chain to its last file.
            latest = self._walk_sealed(sealed)
            self._prepare_new_log(latest)
        self._switch_to_new(latest)

    def _walk_sealed(self, sealed: Head) -> Head:
        """The last sealed log's head, each sealed log after the one ``sealed`` seals checked to
        continue the one before it (first seq and ``prev``, sealed head, last record)."""
        current = sealed
        for base, last, name in _sealed_logs(self._dir_fd, self._path):
            if base < current.count:
                continue
            parsed = self._sealed_head(name)
            head = parsed.head
            if base != current.count or (head.base, head.count) != (base, last + 1):
                raise self._tampered(f"the sealed audit log {name} does not continue the chain")
            self._check_sealed_log(name, parsed, after=current)
            current = head
        return current

    def _complete_renames(self) -> None:
        """With the directory locked: if the head at the log's path is sealed, moves the sealed
        log (unless already moved) and then its head to their sealed names."""
        head_name = self._head_path.name
        try:
            raw = self._read_in_dir(head_name, FILE_BYTES + 1)
        except FileNotFoundError:
            return
        parsed = self._checked(_parse_own_head, raw, self._public, head_name)
        if not parsed.sealed:
            return
        sealed = parsed.head
        if sealed.count <= sealed.base:
            raise self._tampered("the audit head seals a log without records")
        name = sealed_log_name(self._path.name, sealed.base, sealed.count - 1)
        active = self._lstat(self._path.name)
        if active is not None and active.st_size > 0:
            if self._lstat(name) is not None:
                raise self._tampered(f"the sealed audit log {name} already exists")
            self._check_sealed_log(self._path.name, parsed)
            self._rename_in_dir(self._path.name, name)
        elif self._lstat(name) is None:
            raise self._tampered(f"the audit head at the log's path seals {name}, which is missing")
        else:
            self._check_sealed_log(name, parsed)
        if self._lstat(name + ".head") is not None:
            raise self._tampered(f"the sealed audit head {name}.head already exists")
        self._rename_in_dir(head_name, name + ".head")
        _log.info("audit log rotated: %s sealed (seq %d..%d)", name, sealed.base, sealed.count - 1)

    def _prepare_new_log(self, sealed: Head) -> None:
        """With the directory locked, after the renames: the new log at the log's path (unless a
        process opening it made it already) and, unless there is one, its first head, anchored
        at the latest sealed log's end (its checks included: _new_anchor)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            os.close(os.open(self._path.name, flags, 0o600, dir_fd=self._dir_fd))
        except OSError as exc:
            raise _call_failed("create the audit log", exc, self._path) from None
        if self._lstat(self._head_path.name) is not None:
            return  # another process finished the rotation; resync checks what it wrote
        anchor = self._new_anchor_locked()
        if (anchor.base, anchor.last_hash) != (sealed.count, sealed.last_hash):
            raise self._tampered("a later sealed audit log appeared beside the one just sealed")
        self._head.close()
        try:
            self._head.read()  # none: the write below creates the file
            self._head.write(anchor)
        except OSError as exc:
            # Named as the head: a failed create names the temporary file it writes first.
            raise _call_failed("write the audit head", exc, self._head_path) from None
        self._sync_dir()

    def _switch_to_new(self, sealed: Head) -> None:
        """Writes to the log at the log's path from now on, its chain to continue ``sealed``.
        Its lock is taken after the directory's is released: a process committing to the new
        log holds its lock and may wait for the directory's."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self._path, flags, 0o600)
        except OSError as exc:
            raise _call_failed("open the audit log", exc, self._path) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AuditUnavailable(f"the audit log {self._path} is not a regular file")
            log_lock = BoundedFlock(fd, fcntl.LOCK_EX)
            _take_log_lock(log_lock, self._path, self._lock_deadline)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd, self._log_lock = self._fd, fd, log_lock
        with contextlib.suppress(OSError):
            os.close(old)  # releases the sealed file's lock
        self._head.close()
        self._count, self._last_hash = sealed.count, sealed.last_hash
        self._base, self._size = sealed.count, 0
        self._stale = True
        self._count_sealed_bytes()

    def _new_anchor(self) -> Head:
        """Where a new log's chain starts (see _new_anchor_locked)."""
        with self._dir_locked():
            return self._new_anchor_locked()

    def _new_anchor_locked(self) -> Head:
        """With the directory locked: where a new log's chain starts. After the latest sealed log
        beside it (checked: its head sealed and signed by this broker, its last record the one
        that head anchors), or at a random value when there is none."""
        sealed = _sealed_logs(self._dir_fd, self._path)
        if not sealed:
            return Head(0, secrets.token_hex(32))
        base, last, name = sealed[-1]
        parsed = self._sealed_head(name)
        head = parsed.head
        if (head.base, head.count) != (base, last + 1):
            raise self._tampered(f"the sealed audit log {name} does not hold what it is named")
        self._check_sealed_log(name, parsed)
        _log.info("the new audit log continues %s (from seq %d)", name, head.count)
        return Head(head.count, head.last_hash, head.count)

    def _sealed_head_of(self, opened: os.stat_result) -> Head | None:
        """The sealed head of the sealed log that is the file ``opened``; None if it is none."""
        for _, _, name in _sealed_logs(self._dir_fd, self._path):
            found = self._lstat(name)
            if found is not None and (found.st_dev, found.st_ino) == (
                opened.st_dev,
                opened.st_ino,
            ):
                if self._lstat(name + ".head") is None:
                    return None
                return self._sealed_head(name).head
        return None

    def _shipped_end(self, opened: os.stat_result) -> Head | None:
        """Where the file this process writes through ``self._fd`` (``opened``) ends, when another
        process sharing the log sealed it and it was then shipped and deleted, head and all,
        before this one followed; None when that is not the case.

        Only when the file was deleted (not renamed: that is a sealed log, or tampering) and a
        file continues it exactly: a sealed log, or the log at the path, whose head starts at its
        end (the chain's link itself is checked by the walk, or by the resync that follows). Only
        the broker's rotation of this very file makes such a head, so a deleted active log stays
        tampering; without this, a process idle across a rotation whose sealed file was shipped
        and deleted in the meantime (retention, as ``audit verify`` calls it) latched tampering.
        """
        if not self._has_chain or opened.st_nlink != 0:
            return None
        end, tail = self._checked(_read_tail, self._fd, opened.st_size, 1)
        if not tail or end != opened.st_size:
            return None  # a sealed log holds whole records only
        last = self._checked(_tail_record, tail[-1][1])
        shipped = Head(last["seq"] + 1, last["hash"], self._base)
        if not any(base == shipped.count for base, _, _ in _sealed_logs(self._dir_fd, self._path)):
            at_path = self._checked(_read_head, self._head, self._head_path)
            if at_path is None or at_path.sealed or at_path.head.base != shipped.count:
                return None
        _log.info(
            "following the audit log's rotation: the sealed log this process last wrote "
            "(seq ..%d) was shipped and deleted",
            shipped.count - 1,
        )
        return shipped

    def _sealed_head(self, name: str) -> ParsedHead:
        """The head of the sealed log ``name``: signed by this broker and sealed, or tampering."""
        try:
            return self._sealed_head_if_any(name)
        except FileNotFoundError:
            raise self._tampered(f"the sealed audit log {name} has no head") from None

    def _sealed_head_if_any(self, name: str) -> ParsedHead:
        """:meth:`_sealed_head`, but FileNotFoundError when there is no head."""
        return self._checked(_read_sealed_head, self._dir_fd, name, self._public)[0]

    def _check_sealed_log(
        self, name: str, sealed: ParsedHead, *, after: Head | None = None
    ) -> None:
        """The log ``name`` (in the log's directory) holds what its head ``sealed`` seals
        (:func:`_read_sealed_log`) and (with ``after``) its first record continues the chain
        ``after`` ends. Reads the first and last records only."""
        first_prev, _ = self._checked(_read_sealed_log, self._dir_fd, name, sealed)
        self._check_follows(name, first_prev, after)

    def _check_follows(self, name: str, first_prev: str, after: Head | None) -> None:
        """The sealed log ``name``, whose first record has ``first_prev``, continues ``after``."""
        if after is not None and first_prev != after.last_hash:
            raise self._tampered(f"the sealed audit log {name} does not continue the one before")

    def _still_as_read(self, known: _SealedRead | None, name: str) -> _SealedRead | None:
        """``known`` (what the check before the locks read of the sealed log ``name``) if the
        log and its head are still the very files it read; None otherwise (or without it)."""
        if known is None:
            return None
        log, head = self._lstat(name), self._lstat(name + ".head")
        if log is None or head is None:
            return None
        if (_file_id(log), _file_id(head)) != (known.log_id, known.head_id):
            return None
        return known

    def _check_sealed_series(self, prechecked: Mapping[str, _SealedRead]) -> None:
        """At open, after the resync (which finished any rotation a crash interrupted): the
        sealed logs still beside the log, each checked without reading it (its sealed head's
        signature, its size, first and last records: _check_sealed_log), continue one another
        and end where the log at the path starts. A file ``prechecked`` found intact before the
        locks were taken (:func:`_precheck_sealed`) is not read again if its log and head are
        still the files read then (:meth:`_still_as_read`); any other, a file sealed since
        included, is read here, under the locks. Only the oldest may be missing (shipped and
        deleted: retention), or lack its head (being shipped, head first: retention too); a file
        missing, or without its head, after one that is present is tampering, as is
        anything else that does not match. Reading every record of every file is what
        ``strongroom audit verify DIR`` does (see the module doc, *Sealed files at start*)."""
        before: Head | None = None
        before_name = ""
        with self._dir_locked():
            # One reading of the names with audit verify (audit_names): which are sealed files,
            # which are tampering, which are being shipped (retention: deleting them is all that
            # is left to do, and all that tampering with them could do).
            listing = list_sealed(_listdir(self._dir_fd, self._path.parent), self._path.name)
            odd = listing.not_canonical_problem()
            if odd is not None:
                raise self._tampered(odd)
            shipping = list(listing.shipping)
            checked: list[str] = []  # since the oldest file still whole when it was checked
            for found in listing.files:
                base, last, name = found.first, found.last, found.name
                if name in listing.shipping or not found.has_log:
                    continue  # a head without its log after a whole pair: the gap is reported
                # A file still as read is whole, so not shipped meanwhile: two stats fewer.
                known = self._still_as_read(prechecked.get(name), name)
                if known is None and self._shipped_meanwhile(checked, name):
                    shipping.extend(self._left_of([*checked, name]))
                    before, before_name, checked = None, "", []
                    continue
                if before is not None and base != before.count:
                    raise self._tampered(self._series_break(before_name, before, name, base))
                try:
                    parsed = self._sealed_head_if_any(name) if known is None else known.head
                    head = parsed.head
                    if (head.base, head.count) != (base, last + 1):
                        raise self._tampered(
                            f"the sealed audit log {name} does not hold what it is named "
                            f"(its head seals seq {head.base}..{head.count - 1})"
                        )
                    if known is None:
                        self._check_sealed_log(name, parsed, after=before)
                    else:
                        self._check_follows(name, known.first_prev, before)
                except FileNotFoundError:
                    if self._shipped_meanwhile(checked, name):  # the same, since the look above
                        shipping.extend(self._left_of([*checked, name]))
                        before, before_name, checked = None, "", []
                        continue
                    if self._lstat(name + ".head") is None:
                        raise self._tampered(f"the sealed audit log {name} has no head") from None
                    raise self._tampered(
                        f"the sealed audit log {name} was removed while the broker started"
                    ) from None
                except OSError as exc:
                    # The file it was about (the head, when it is the link or FIFO), as audit
                    # verify names it: the log beside it may be a regular file.
                    failed = exc.filename if isinstance(exc.filename, str) else name
                    what = "" if failed == name else f" {name}'s head"
                    raise _call_failed(
                        f"read the sealed audit log{what}", exc, self._path.parent / failed
                    ) from None
                before, before_name = head, name
                checked.append(name)
        if shipping:
            # One line, however many: a directory may hold any number of such names.
            _log.warning(
                "%d sealed audit log(s) without their head or their log taken as being shipped "
                "(retention), their records not checked: %s",
                len(shipping),
                ", ".join(shipping) if len(shipping) <= 3 else f"{shipping[0]} .. {shipping[-1]}",
            )
        if before is None:
            return
        if self._base != before.count:
            raise self._tampered(
                self._series_break(before_name, before, self._path.name, self._base)
            )
        if self._size == 0:
            continues = self._last_hash == before.last_hash
        else:
            line = _first_line(self._fd, self._size)
            continues = (
                line is not None and self._checked(_tail_record, line)["prev"] == before.last_hash
            )
        if not continues:
            raise self._tampered(
                f"the audit log does not continue the sealed log {before_name}: a file of "
                "another chain was put in the place of one of them"
            )

    def _shipped_meanwhile(self, checked: list[str], name: str) -> bool:
        """Whether the sealed log ``name`` has lost its log or head since the directory was
        listed, and so has every file ``checked`` before it (all of them whole when listed): a
        shipper deleting the oldest files went on while the start checked them, and ``name`` is
        now the oldest, being shipped (or gone), as a start listing now would find. Not when an
        older file is still whole: then ``name`` is missing from the middle (tampering)."""
        # chain, not [*checked, name]: a copy of every file checked so far, for each file, made
        # the check quadratic in the files retained (the first whole one ends the look at once).
        return not any(self._whole(member) for member in itertools.chain(checked, (name,)))

    def _whole(self, name: str) -> bool:
        return all(self._lstat(member) is not None for member in (name, name + ".head"))

    def _left_of(self, names: list[str]) -> list[str]:
        """The sealed logs among ``names`` of which the log or the head is still there."""
        return [
            name
            for name in names
            if any(self._lstat(member) is not None for member in (name, name + ".head"))
        ]

    def _lstat(self, name: str) -> os.stat_result | None:
        """The status of ``name`` in the log's directory (None: not there), for every look-up of
        the log's files (the sealed files' checks, a rotation's steps, finishing one at the
        start). Any other error (EACCES, EIO) is ``AuditUnavailable`` naming the file and the
        errno, as when such a file cannot be read: it escaped as a bare OSError, a traceback at
        the start, and the operator was not told which file."""
        try:
            return _lstat_in(self._dir_fd, name)
        except OSError as exc:
            raise _lookup_failed(self._path.parent / name, exc) from None

    def _stat_at_path(self) -> os.stat_result | None:
        """The status of the file at the log's path (None: not there), other errors as
        :meth:`_lstat`'s: the first look-up of every start, which met a directory that lost its
        search permission with a bare OSError."""
        try:
            return os.stat(self._path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _lookup_failed(self._path, exc) from None

    @staticmethod
    def _series_break(before_name: str, before: Head, name: str, base: int) -> str:
        """Why ``name``, starting at seq ``base``, does not follow the sealed log ``before``."""
        if base > before.count:
            return (
                f"audit records seq {before.count}..{base - 1} are missing between the sealed "
                f"log {before_name} and {name}: a sealed log in the middle was deleted"
            )
        return (
            f"{name} starts at seq {base}, inside the sealed log {before_name} (seq "
            f"{before.base}..{before.count - 1}): a file was copied or substituted"
        )

    def _count_sealed_bytes(self) -> None:
        """Re-counts the sealed logs and heads beside the log (only with a cap: they count against
        it, whether ``rotate_bytes`` or an operator's rotation made them)."""
        if not self._max_bytes:
            return
        total = 0
        for _, _, name in _sealed_logs(self._dir_fd, self._path):
            for member in (name, name + ".head"):
                found = self._lstat(member)
                total += found.st_size if found is not None else 0
        self._sealed_bytes = total

    @contextlib.contextmanager
    def _dir_locked(self) -> Iterator[None]:
        """The directory's ``flock``: renames and new chains of a rotation, one process at a time.
        Taken after the log's lock, never before it."""
        try:
            locked = self._dir_lock.acquire(DIR_LOCK_WAIT_SECONDS)  # in the kernel's queue: fair
        except OSError as exc:
            raise _call_failed("lock the audit directory", exc, self._path.parent) from None
        if not locked:
            raise AuditUnavailable(
                directory_locked(self._path.parent), public=audit_failure("lock")
            )
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(self._dir_fd, fcntl.LOCK_UN)

    def _open_in_dir(self, name: str) -> int:
        return open_regular(name, dir_fd=self._dir_fd)

    def _read_in_dir(self, name: str, limit: int) -> bytes:
        """The first ``limit`` bytes of ``name`` in the log's directory: FileNotFoundError when it
        is not there, AuditUnavailable naming it and the errno for any other error."""
        try:
            fd = self._open_in_dir(name)
            try:
                return os.pread(fd, limit, 0)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _call_failed("read the audit file", exc, self._path.parent / name) from None

    def _rename_in_dir(self, name: str, new_name: str) -> None:
        """A rotation's rename in the log's directory, made durable; AuditUnavailable naming both
        files (or the directory) and the errno if it fails: a bare OSError ended the start."""
        try:
            os.rename(name, new_name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            raise _call_failed_in("rename the audit file", exc, self._path.parent) from None
        self._sync_dir()

    def _sync_dir(self) -> None:
        """``fsync`` of the log's directory (a rotation's renames and new files); AuditUnavailable
        naming the directory and the errno if it fails."""
        try:
            os.fsync(self._dir_fd)
        except OSError as exc:
            raise _call_failed("sync the audit directory", exc, self._path.parent) from None

    def _at_path(self, opened: os.stat_result) -> bool:
        current = self._stat_at_path()
        if current is None:
            return False
        return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)

    def _check_same_file(self, opened: os.stat_result) -> None:
        """The file at the log's path must be the one this process writes through ``self._fd``:
        otherwise every later decision would be "made durable" in a file nobody reads."""
        current = self._stat_at_path()
        if current is None:
            raise self._tampered(
                f"the audit log {self._path} was removed or renamed while the broker runs"
            )
        if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            raise self._tampered(
                f"the audit log {self._path} was replaced by another file while the broker runs"
            )

    def _check_continues(self, head: Head | None, size: int) -> None:
        """Once this process holds a chain, the log must still hold it where it left it: the head
        present, the log at least as long, and the record ending at ``self._size`` (or, for a log
        that had none, the first record or the head) carrying ``self._last_hash``. A log emptied,
        or another log signed with the same key and its head copied over this one (however long),
        is then tampering, not a new or longer chain."""
        if head is None:
            raise self._tampered("the audit head was removed while the broker runs")
        if size < self._size:
            raise self._tampered(
                f"the audit log shrank from {self._size} to {size} bytes while the broker runs: "
                "records were removed"
            )
        if self._size > 0:
            end, tail = self._checked(_read_tail, self._fd, self._size, 1)
            ours = bool(tail) and end == self._size
            ours = ours and self._checked(_tail_record, tail[-1][1])["hash"] == self._last_hash
        elif size > 0:
            first = _first_line(self._fd, size)
            ours = first is None or self._checked(_tail_record, first)["prev"] == self._last_hash
            ours = ours and head.base == self._base
        else:
            ours = head.base == self._base and (
                head.count > head.base or head.last_hash == self._last_hash
            )
        if not ours:
            raise self._tampered(
                "the audit log no longer continues the chain this broker wrote (its last record "
                "or its anchor is gone): the log or its head was replaced, e.g. by another log's"
            )

    def _repair_unanchored(self, head: Head, count: int, size: int) -> tuple[Head, int | None]:
        """Deals with the records after the signed head: at most one batch, each chained on and
        signed by this broker, is what a crash between the fsync'd write and the head leaves; those
        are anchored, except that records this process cut back (and what follows them) are cut off
        again. Anything else is tampering. Returns the new head and, if the log was cut, its end."""
        mismatch = f"the audit log ({count} records) does not match its signed head ({head.count})"
        unanchored = count - head.count
        if unanchored > MAX_BATCH_RECORDS:
            raise self._tampered(
                f"{mismatch}: more records follow the head than one commit writes "
                f"({MAX_BATCH_RECORDS}), so no crash left them"
            )
        _, tail = self._checked(_read_tail, self._fd, size, unanchored)
        if len(tail) != unanchored:
            raise self._tampered(mismatch)
        prev = head.last_hash
        hashes: list[str] = []
        for index, (_, line) in enumerate(tail):
            record = self._checked(_tail_record, line)
            if record["seq"] != head.count + index or record["prev"] != prev:
                raise self._tampered(mismatch)
            if not record_signed_by(line, self._public):
                raise self._tampered(
                    f"audit record {head.count + index + 1} is chained after the signed head but "
                    "was not written by this broker (its signature is missing or invalid): "
                    "a forged record"
                )
            prev = record["hash"]
            hashes.append(prev)
        refused = self._first_refused(head.count, hashes)
        if refused is None:
            return self._anchor(head, unanchored, prev), None
        _log.warning(
            "cutting off %d audit record(s) whose decision was refused (from seq %d)",
            unanchored - refused,
            head.count + refused,
        )
        start = tail[refused][0]
        self._truncate(start)
        if refused:
            head = self._anchor(head, refused, hashes[refused - 1])
        return head, start

    def _anchor(self, head: Head, records: int, last_hash: str) -> Head:
        _log.warning(
            "anchoring %d audit record(s) left unanchored by a crash (seq %d..%d)",
            records,
            head.count,
            head.count + records - 1,
        )
        anchored = Head(head.count + records, last_hash, head.base)
        self._write_head_or_fail(anchored)
        self._void, self._void_all = (), False
        return anchored

    def _read_failed(self, exc: OSError) -> AuditUnavailable:
        """A commit's or a rotation's read of the files back from disk failed (the resync; a
        rotation's checks of the file it seals or follows): naming the file it read, or the log
        for a call on its descriptor (the other files' calls name theirs: :func:`_naming`)."""
        return _call_failed_in("read the audit file", exc, self._path.parent, self._path)

    def _truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:
            raise _call_failed("repair the audit log", exc, self._path) from None

    def _checked(self, read: Callable[..., T], *args: Any) -> T:
        """Runs a tail/head reader, latching any tamper verdict it raises."""
        try:
            return read(*args)
        except DataLoss as exc:
            raise self._tampered(exc.message) from None

    def _tampered(self, message: str) -> DataLoss:
        """Latches the tamper verdict, raises the alarm once, and returns the error to raise."""
        if self._tamper is None:
            self._tamper = message
            _log.critical(
                "audit log tampering detected: %s; refusing every decision until an operator "
                "restores the log and restarts the broker",
                message,
                extra={"alert": Reason.AUDIT_LOG_TAMPERED, "audit_log": str(self._path)},
            )
        return AuditTampered(message)

    def _write_head_or_fail(self, head: Head) -> None:
        try:
            self._write_head(head)
        except OSError as exc:
            raise _call_failed("write the audit head", exc, self._head_path) from None


def _sealed_logs(dir_fd: int, path: Path) -> list[tuple[int, int, str]]:
    """The sealed logs of the log ``path`` in its directory (``dir_fd``) whose log file is there
    (not only its head), as :func:`~strongroom.keybroker.audit_names.list_sealed` reads names:
    (first seq, last seq, name), in order."""
    listing = list_sealed(_listdir(dir_fd, path.parent), path.name)
    return [(found.first, found.last, found.name) for found in listing.files if found.has_log]


def _call_failed(doing: str, exc: OSError, path: Path | str) -> AuditUnavailable:
    """Why a system call on the audit file ``path`` failed, as :func:`_lookup_failed` says it:
    ``cannot DOING PATH: strerror (ERRNO)``."""
    return AuditUnavailable(
        f"cannot {doing} {path}: {os_error_cause(exc)}", public=audit_failure(doing, exc)
    )


def _call_failed_in(
    doing: str, exc: OSError, directory: Path, unnamed: Path | None = None
) -> AuditUnavailable:
    """:func:`_call_failed` for a call on names in the log's ``directory`` (through its
    descriptor): it names the file(s) the call named (``exc.filename``, and ``filename2``: ``A to
    B`` for a rename) in that directory; a call that named none was a call on a descriptor, the
    file ``unnamed`` (by default the directory)."""
    names = (exc.filename, exc.filename2)
    found = [directory / os.fsdecode(name) for name in names if isinstance(name, (str, bytes))]
    return _call_failed(doing, exc, " to ".join(map(str, found)) or unnamed or directory)


def _listdir(dir_fd: int, directory: Path) -> list[str]:
    """The names in the log's ``directory`` (``dir_fd``); AuditUnavailable naming it and the errno
    if it cannot be listed: a call on its descriptor names no file, and a catch-all would have
    taken it for the log's."""
    try:
        return os.listdir(dir_fd)
    except OSError as exc:
        raise _call_failed("list the audit directory", exc, directory) from None


@contextlib.contextmanager
def _naming(name: str) -> Iterator[None]:
    """Names the file ``name`` (in the log's directory) in an OSError of a call on its descriptor,
    which names none: the catch-alls of a commit, a rotation and the start take a call that names
    no file for one on the log's own descriptor (:func:`_call_failed_in`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = name
        raise


def _lookup_failed(path: Path, exc: OSError) -> AuditUnavailable:
    """Why the audit file ``path`` could not be looked up (not because it is not there)."""
    return _call_failed("look up the audit file", exc, path)


def _lstat_in(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _file_id(found: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells one file from another and from itself changed: a replacement (device, inode),
    a write or a truncation (size, modification and change times: the change time follows every
    write, and no call sets it back; only the system clock could)."""
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


@dataclass(frozen=True)
class _SealedRead:
    """A sealed log found whole by :func:`_precheck_sealed`: the :func:`_file_id` of its log and
    of its head as they were read, its sealed head, and its first record's ``prev``."""

    log_id: tuple[int, int, int, int, int]
    head_id: tuple[int, int, int, int, int]
    head: ParsedHead
    first_prev: str


def _read_sealed_head(
    dir_fd: int, name: str, public_key: Ed25519PublicKey
) -> tuple[ParsedHead, os.stat_result]:
    """The head of the sealed log ``name`` (signed by ``public_key`` and sealed, else DataLoss)
    and the head file's status before it was read; FileNotFoundError when there is none."""
    fd = open_regular(name + ".head", dir_fd=dir_fd)
    try:
        with _naming(name + ".head"):
            found = os.fstat(fd)
            raw = os.pread(fd, FILE_BYTES + 1, 0)
    finally:
        os.close(fd)
    parsed = _parse_own_head(raw, public_key, name + ".head")
    if not parsed.sealed:
        raise AuditTampered(f"the head of {name} does not seal it")
    return parsed, found


def _read_sealed_log(dir_fd: int, name: str, sealed: ParsedHead) -> tuple[str, os.stat_result]:
    """Checks that the log ``name`` is as long as its head ``sealed`` says (when it says: heads
    sealed before ``size`` was added do not), starts at the head's ``base`` and ends with the
    record it seals, and that the record after the first continues it (DataLoss otherwise);
    returns its first record's ``prev`` and the log's status before it was read. Reads the
    first two records and the last only."""
    head = sealed.head
    fd = open_regular(name, dir_fd=dir_fd)
    try:
        with _naming(name):
            found = os.fstat(fd)
            size = found.st_size
            # Named: a start's alarm must say which of the sealed files, and which end, is bad (it
            # said "the last audit record" for either end of any of them).
            last_record = f"the last record of the sealed audit log {name}"
            end, tail = _read_tail(fd, size, 1, last_record)
            last = _tail_record(tail[-1][1], last_record) if tail else None
            line = _first_line(fd, size)
            first_record = f"the first record of the sealed audit log {name}"
            first = _tail_record(line, first_record) if line is not None else None
            # Anyone can hash a record again: the first one edited at its length kept its seq, its
            # prev and the file's size. The next record's prev is what tells (the last one's hash
            # is the head's); what lies between is audit verify's to read.
            second = None
            if line is not None and head.count - head.base > 1:
                after = _line_at(fd, size, len(line) + 1)
                what = f"the second record of the sealed audit log {name}"
                second = _tail_record(after, what) if after is not None else None
    finally:
        os.close(fd)
    if sealed.size is not None and size != sealed.size:
        raise AuditTampered(
            f"the sealed audit log {name} is {size} bytes, not the {sealed.size} its head "
            "seals: records were removed, added or edited"
        )
    if (
        last is None
        or end != size
        or (last["seq"] + 1, last["hash"]) != (head.count, head.last_hash)
    ):
        raise AuditTampered(f"the sealed audit log {name} does not end where its head says")
    if first is None or first["seq"] != head.base:
        raise AuditTampered(f"the sealed audit log {name} does not start where its head says")
    if head.count - head.base > 1 and (second is None or second["prev"] != first["hash"]):
        raise AuditTampered(
            f"the first record of the sealed audit log {name} was edited: the record after it "
            "does not continue it"
        )
    return first["prev"], found


def _precheck_sealed(
    dir_fd: int, log_name: str, public_key: Ed25519PublicKey
) -> dict[str, _SealedRead]:
    """The sealed logs of ``log_name`` that are whole on their own (their head signed and
    sealed, named for what it seals, the log as :func:`_read_sealed_log` wants it), read before
    the start takes any lock: no sealed file changes once its rotation is done, so the check
    under the locks (:meth:`AuditLog._check_sealed_series`) reads again only a file not found
    here or no longer the file read. Nothing here is a verdict (no alarm, nothing latched): a
    file tampered with, or met half-way through a sibling's rotation or a shipper's deletion,
    is only left out, for that check to judge as it always did."""
    try:
        listing = list_sealed(os.listdir(dir_fd), log_name)
    except OSError:
        return {}
    found: dict[str, _SealedRead] = {}
    for sealed in listing.files:
        if not (sealed.has_log and sealed.has_head) or sealed.name in listing.shipping:
            continue
        try:
            parsed, head_found = _read_sealed_head(dir_fd, sealed.name, public_key)
            if (parsed.head.base, parsed.head.count) != (sealed.first, sealed.last + 1):
                continue
            first_prev, log_found = _read_sealed_log(dir_fd, sealed.name, parsed)
        except (DataLoss, OSError):
            continue
        found[sealed.name] = _SealedRead(
            _file_id(log_found), _file_id(head_found), parsed, first_prev
        )
    return found


def _parse_own_head(raw: bytes, public_key: Ed25519PublicKey, name: str) -> ParsedHead:
    """A head file's bytes verified with the broker's key; DataLoss if they do not verify."""
    try:
        return parse_head(raw, public_key)
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidSignature):
        raise AuditTampered(
            f"the audit head {name} is malformed or not signed by this broker's key"
        ) from None


def _read_tail(
    fd: int, size: int, lines: int, what: str = "the last audit record"
) -> tuple[int, list[tuple[int, bytes]]]:
    """The offset just after the last complete line, and the last ``lines`` complete lines (fewer
    if the file has fewer) as (offset where it starts, the line without its newline), oldest first;
    read from the end. DataLoss naming ``what`` when the last line is too long to be a record."""
    buf = b""
    pos = size
    limit = (lines + 1) * (MAX_RECORD_BYTES + 1) + 8192  # the lines, a torn one, slack
    while True:
        found = _split_tail(buf, lines, at_start=pos == 0)
        if found is not None:
            end, spans = found
            return pos + end, [(pos + start, buf[start:stop]) for start, stop in spans]
        if len(buf) > limit:
            raise AuditTampered(f"{what} is malformed")
        step = min(8192 if lines == 1 else 65536, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf


def _split_tail(
    buf: bytes, lines: int, *, at_start: bool
) -> tuple[int, list[tuple[int, int]]] | None:
    """Finds the last ``lines`` complete lines in ``buf`` (the end of a file; ``at_start`` if it
    is the whole file): (end of the last complete line, [(start, stop)] oldest first), or None if
    more of the file is needed."""
    last_nl = buf.rfind(b"\n")
    if last_nl < 0:
        return (0, []) if at_start else None  # empty, or one torn line and nothing else
    spans: list[tuple[int, int]] = []
    stop = last_nl
    while len(spans) < lines:
        prev_nl = buf.rfind(b"\n", 0, stop)
        if prev_nl < 0:
            if not at_start:
                return None
            spans.append((0, stop))
            break
        spans.append((prev_nl + 1, stop))
        stop = prev_nl
    spans.reverse()
    return last_nl + 1, spans


def _first_line(fd: int, size: int) -> bytes | None:
    """The log's first line without its newline (None if it has no complete line)."""
    return _line_at(fd, size, 0)


def _line_at(fd: int, size: int, offset: int) -> bytes | None:
    """The line starting at ``offset`` without its newline (None if it is not complete within
    a record's most bytes)."""
    chunk = os.pread(fd, max(min(size - offset, MAX_RECORD_BYTES + 1), 0), offset)
    line, newline, _ = chunk.partition(b"\n")
    return line if newline else None


def _tail_record(line: bytes, what: str = "the last audit record") -> dict[str, Any]:
    """The record ``line`` (``what``, for a tamper verdict's message), its hash checked."""
    try:
        record = jsonparse.loads(line)
    except ValueError:
        record = None
    if (
        not isinstance(record, dict)
        or isinstance(record.get("seq"), bool)
        or not isinstance(record.get("seq"), int)
        or not isinstance(record.get("hash"), str)
        or not isinstance(record.get("prev"), str)
    ):
        raise AuditTampered(f"{what} is malformed")
    # What the head is matched against must be a record, not a stub carrying the head's hash.
    claimed = record.pop("hash")
    try:
        intact = canonical_json({**record, "hash": claimed}) == line and (
            record_hash(record) == claimed
        )
    except (TypeError, ValueError, RecursionError):
        intact = False
    if not intact:
        raise AuditTampered(f"{what} was modified (its hash does not match its content)")
    record["hash"] = claimed
    return record


def _read_head(head_file: HeadFile, path: Path) -> ParsedHead | None:
    """The head (the file ``path``) verified with our own key; None if absent, DataLoss if
    invalid."""
    try:
        return head_file.read()
    except OSError as exc:
        raise _call_failed("read the audit head", exc, path) from None
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidSignature) as exc:
        raise AuditTampered(
            "the audit head is malformed or not signed by this broker's key"
            + (f" ({exc})" if isinstance(exc, ValueError) and str(exc) else "")
        ) from None
