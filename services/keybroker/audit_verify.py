"""Checking an audit log, or a series of rotated ones, as an auditor does: every record, the
chain, the signed head and, in a series, that each file continues the one before it.

The log's format and the guarantees these checks rest on are in :mod:`strongroom.keybroker.audit`;
``strongroom audit verify`` is the command over these functions.
"""

from __future__ import annotations

import binascii
import collections
import contextlib
import dataclasses
import io
import itertools
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from strongroom import jsonparse
from strongroom.errors import InvalidArgument, NotFound
from strongroom.files import LockFailed, LockHeld, os_error_cause, shared_flock
from strongroom.keybroker import audit
from strongroom.keybroker.audit import (
    DIR_LOCK_WAIT_SECONDS,
    MAX_BATCH_RECORDS,
    MAX_RECORD_BYTES,
    directory_locked,
    head_path,
    log_locked,
    record_hash,
    record_signed_by,
)
from strongroom.keybroker.audit_head import (
    FILE_BYTES,
    GENESIS_HASH,
    HEX64_RE,
    canonical_json,
    key_fingerprint,
)
from strongroom.keybroker.audit_head import parse as parse_head
from strongroom.keybroker.audit_names import (
    HEAD_SUFFIX,
    SealedListing,
    has_sealed_shape,
    list_sealed,
    open_regular,
    sealed_log_name,
    sealed_owner,
    sealed_range,
)
from strongroom.keybroker.errors import AuditUnavailable
from strongroom.reasons import Reason


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of :func:`verify_audit_log`.

    ``bad_record`` is the 1-based number of the first record (= line) found wrong, ``problem`` a
    stable code: RECORD_MALFORMED, RECORD_TRUNCATED, RECORD_MODIFIED, SEQUENCE_BROKEN,
    CHAIN_BROKEN, HEAD_MISSING, HEAD_MALFORMED, HEAD_SIGNATURE_INVALID, TAIL_TRUNCATED,
    HEAD_MISMATCH (also: more records after the head than one commit writes), UNANCHORED_RECORDS
    (the broker's own records left by a crash, at most one batch: it anchors them on its next
    write), VOIDED_RECORDS (records of a batch the broker refused, which its head names: it cuts
    them off on its next write) or RECORD_FORGED (an unanchored record not signed by the broker's key; ``bad_record``
    is the first such). Forged records and over-long unanchored tails are told apart only when a
    public key is given.

    ``records`` counts the file's records; ``first_seq`` is the ``seq`` of its first (0 unless
    the log continues a sealed one), ``anchor`` the hash its chain starts from (the first
    record's ``prev``; for a file without records, its head's hash) and ``sealed`` whether its
    head seals it (rotation). :func:`verify_audit_series` links files by these.

    ``release_signing_keys`` counts the granted key releases by the release-signing key their
    record names (``release_signing_key_id``, in hex), in order of first appearance; ``""``
    counts those that name none (recorded before records carried it). Across a rotation of that
    key it tells the auditor which key vouched for how many releases.

    ``rotation_cut`` names the sealed log judged in the place of the log (the rest of the verdict
    is that file's) when a rotation was cut between its two renames (:func:`_rotation_cut`).

    ``head_key`` is the fingerprint of the signing key the head names (None: it names none). It
    is proved only with ``public_key`` (the signature checked); without it, it is what the head
    claims, which :func:`verify_audit_series` compares across files. ``head_public`` is the raw
    public key the head carries (None in heads written before they carried it), and
    ``head_raw`` the head file's bytes judged: without ``public_key``, the series checks every
    head with the key the first of them to carry one carries.
    """

    intact: bool
    records: int
    last_hash: str
    signature_checked: bool
    problem: str | None = None
    bad_record: int | None = None
    message: str = ""
    first_seq: int = 0
    anchor: str = GENESIS_HASH
    sealed: bool = False
    release_signing_keys: tuple[tuple[str, int], ...] = ()
    rotation_cut: str = ""
    head_key: str | None = None
    head_public: bytes | None = None
    head_raw: bytes = dataclasses.field(default=b"", repr=False, compare=False)


def _is_granted_release(record: dict[str, object]) -> bool:
    return record.get("action") == "key_release" and record.get("decision") == "allowed"


def signing_key_summary(counts: Mapping[str, int]) -> str:
    """``counts`` (release-signing key id -> granted releases, as in
    :attr:`AuditVerification.release_signing_keys`) as text for a verdict's message: each key
    by the first 16 hex digits of its id, which is how the inference side's errors name it."""
    if not counts:
        return ""
    named = [
        f"{key_id[:16]}: {count}" if key_id else f"not named: {count}"
        for key_id, count in counts.items()
    ]
    return "; granted releases by release-signing key: " + ", ".join(named)


def _snapshot(fd: int | None, path: Path, hpath: Path) -> tuple[bytes | None, int]:
    """The head's bytes (None if there is no head file) and the length of the log ``path`` open
    as ``fd`` (None: there is no log file), read between two commits: under a shared ``flock``
    of the log, which every commit holds exclusively.

    A commit in progress is waited for, at most :data:`~strongroom.keybroker.audit.LOG_LOCK_WAIT_SECONDS`
    (anyone who can open the log can hold its lock for ever; a writer stuck inside a commit, on
    a hung disk, too): then ``AuditUnavailable``, the check not made.
    """
    if fd is None:
        return _read_snapshot(fd, hpath)
    waited = audit.LOG_LOCK_WAIT_SECONDS  # read now: tests shorten it
    with _shared_lock(fd, f"the audit log {path}", waited, log_locked(path, waited)):
        return _read_snapshot(fd, hpath)


@contextlib.contextmanager
def _shared_lock(fd: int, what: str, waited: float, held: str) -> Iterator[None]:
    """Holds a shared ``flock`` of ``fd`` (the file ``what`` names) for the block, its holders
    waited for at most ``waited`` s. The one rule of the checks' locks (the log's, between two
    commits; the directory's, after a rotation): ``AuditUnavailable`` when another process held
    it all that time (``held`` says so) or when ``flock`` itself fails (ENOLCK: a file system
    without it), the check not made. The directory's wait went on without its lock, judging
    files a rotation might be renaming, while the log's refused."""
    try:
        with shared_flock(fd, seconds=waited):
            yield
    except LockHeld:
        raise AuditUnavailable(held) from None
    except LockFailed as exc:
        raise AuditUnavailable(f"cannot lock {what}: {exc}") from None


def _read_snapshot(fd: int | None, hpath: Path) -> tuple[bytes | None, int]:
    """:func:`_snapshot`'s reads, under its lock."""
    try:
        head = open_regular(hpath)
    except FileNotFoundError:
        return None, 0 if fd is None else os.fstat(fd).st_size
    try:
        # Bounded: the writer waits while this lock is held, whatever sits in the file.
        raw_head = os.pread(head, FILE_BYTES + 1, 0)
    finally:
        os.close(head)
    return raw_head, 0 if fd is None else os.fstat(fd).st_size


def verify_audit_log(
    path: Path | str, *, public_key: Ed25519PublicKey | None = None
) -> AuditVerification:
    """Checks every record, the chain, and the head (its signature only with ``public_key``).

    Raises NotFound(AUDIT_LOG_NOT_FOUND) when neither the log nor its head exists, and
    ``AuditUnavailable`` naming the file when one cannot be read (permissions, a directory, I/O)
    or is not a regular file (a FIFO, socket or device: checked before reading, never waited on).

    A log that does not verify, or is not there, is checked once more after any rotation under
    way has ended (the broker renames and creates the files under the directory's ``flock``):
    for a moment during one, the path holds the sealed log, or no log, or a log without its head.
    A rotation cut between its two renames (:func:`_rotation_cut`, still there once no rotation
    holds the directory) is judged as the broker's next start finishes it: the verdict of the
    renamed log checked with the sealed head at ``path``'s, naming it in ``rotation_cut``.
    """
    path = Path(path)
    try:
        if _rotation_cut(path, public_key) is not None:
            # A rotation under way holds the directory: only a cut one is still there after it.
            _waited_for_rotation(path)
            cut = _rotation_cut(path, public_key)
            if cut is not None:
                return _verify_cut(path, *cut, public_key)
        try:
            result = _verify_audit_log(path, public_key)
        except NotFound:
            if not _waited_for_rotation(path):
                raise
            return _verify_audit_log(path, public_key)
        if result.intact or not _waited_for_rotation(path):
            return result
        return _verify_audit_log(path, public_key)
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot read {exc.filename or path}: {os_error_cause(exc)}"
        ) from None


def _rotation_cut(path: Path, public_key: Ed25519PublicKey | None) -> tuple[Path, bytes] | None:
    """The sealed log a rotation cut between its two renames left in the place of the log at
    ``path``, and the bytes of the sealed head found at ``path``'s head; None for any other state
    of the files. Exactly this state, which the broker's next
    commit or start finishes (it renames the head after the log and starts a new log): no log at
    ``path``, or an empty one (another replica's start creates it), its head sealed (and signed
    by ``public_key``, when given), and beside it a regular file under the name that head seals,
    without a head of its own. Read only: the rotation is the broker's to finish."""
    if has_sealed_shape(path.name):
        return None
    try:
        log = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    else:
        if not stat.S_ISREG(log.st_mode) or log.st_size:
            return None
    try:
        fd = open_regular(head_path(path))
    except OSError:
        return None
    try:
        raw = os.pread(fd, FILE_BYTES + 1, 0)
    finally:
        os.close(fd)
    try:
        parsed = parse_head(raw, public_key)
    except (InvalidSignature, ValueError, KeyError, TypeError, binascii.Error):
        return None
    head = parsed.head
    if not parsed.sealed or head.count <= head.base:
        return None
    sealed = path.with_name(sealed_log_name(path.name, head.base, head.count - 1))
    try:
        if not stat.S_ISREG(os.lstat(sealed).st_mode) or os.path.lexists(head_path(sealed)):
            return None
    except OSError:
        return None
    return sealed, raw


def _verify_cut(
    path: Path, sealed: Path, raw_head: bytes, public_key: Ed25519PublicKey | None
) -> AuditVerification:
    """The sealed log a rotation cut between its renames left (:func:`_rotation_cut`) checked with
    the sealed head found at ``path``'s head (``raw_head``), as the broker judges it when it
    finishes the rotation: then it is ``sealed`` with its head, and a new, empty log continues
    it. Those bytes, not the path read again: a broker's start finishing the rotation meanwhile
    puts the new log's head there, which the sealed log does not match (a false tamper alarm);
    the sealed log's records are the same before and after."""
    verdict = _verify_audit_log(sealed, public_key, raw_head)
    return dataclasses.replace(
        verdict, message=f"{verdict.message}; {_cut_note(path, sealed)}", rotation_cut=sealed.name
    )


def _cut_note(path: Path, sealed: Path) -> str:
    """What a verdict says of a rotation cut between its renames (:func:`_rotation_cut`)."""
    return (
        f"a rotation was interrupted between its renames: {path.name} is already {sealed.name}, "
        f"its sealed head still {head_path(path).name}; checked as the broker's next start "
        "finishes it (the head renamed after the log, a new log continuing it)"
    )


def _waited_for_rotation(path: Path) -> bool:
    """Waits until no rotation holds the directory of ``path``; False if there is none."""
    return _waited_for_directory(path.parent)


def _waited_for_directory(directory: Path) -> bool:
    """Waits until no rotation holds ``directory`` (a shared ``flock``, held by nothing else:
    nothing waits for it in turn); False if there is no such directory (nothing in it rotates).
    ``AuditUnavailable`` when another process holds it past
    :data:`~strongroom.keybroker.audit.DIR_LOCK_WAIT_SECONDS` (anyone who can open the directory
    can hold it for ever), ``flock`` fails on it (:func:`_shared_lock`), or it cannot be opened
    (EACCES: searchable, so its files are read, but not readable; EMFILE): what the files would
    say then is not known. A directory that could not be opened skipped the wait, and the verdict
    was given as if no rotation could be under way."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise AuditUnavailable(
            f"cannot open the audit directory {directory}: {os_error_cause(exc)}"
        ) from None
    try:
        # In the kernel's queue (BoundedFlock): a rotation that queued after it does not starve it.
        with _shared_lock(
            fd,
            f"the audit directory {directory}",
            DIR_LOCK_WAIT_SECONDS,
            directory_locked(directory),
        ):
            pass
    finally:
        os.close(fd)
    return True


def _verify_audit_log(
    path: Path, public_key: Ed25519PublicKey | None, given_head: bytes | None = None
) -> AuditVerification:
    """The verdict of the log at ``path`` with its head, or with the head bytes ``given_head``
    (a rotation cut's sealed head, already read: :func:`_verify_cut`)."""
    hpath = head_path(path)
    stream: BinaryIO
    log_missing = False
    try:
        # A regular file before it is locked or read (see open_regular).
        stream = os.fdopen(open_regular(path), "rb")
    except FileNotFoundError:
        if given_head is None and not os.path.lexists(hpath):
            raise NotFound(f"no audit log at {path}", reason=Reason.AUDIT_LOG_NOT_FOUND) from None
        stream, log_missing = io.BytesIO(), True
    checked = public_key is not None
    prev = anchor = GENESIS_HASH
    count = 0  # records read (lines)
    base = 0  # the seq of the first record: where the file says it starts, checked on its head
    sealed = False
    tail: collections.deque[bytes] = collections.deque(maxlen=MAX_BATCH_RECORDS)
    signing_keys: collections.Counter[str] = collections.Counter()

    def fail(problem: str, number: int | None, message: str) -> AuditVerification:
        return AuditVerification(
            intact=False,
            records=count,
            last_hash=prev,
            signature_checked=checked,
            problem=problem,
            bad_record=number,
            message=message,
            first_seq=base,
            anchor=anchor,
            sealed=sealed,
        )

    with stream:
        if given_head is None:
            raw_head, remaining = _snapshot(None if log_missing else stream.fileno(), path, hpath)
        else:  # a sealed log: no commit writes it
            raw_head, remaining = (
                given_head,
                0 if log_missing else os.fstat(stream.fileno()).st_size,
            )
        while remaining > 0 and (raw := stream.readline(min(MAX_RECORD_BYTES + 1, remaining))):
            remaining -= len(raw)
            number = count + 1
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_RECORD_BYTES:
                    return fail("RECORD_MALFORMED", number, f"record {number} is too long")
                return fail("RECORD_TRUNCATED", number, f"record {number} is cut off mid-line")
            line = raw[:-1]
            try:
                record = jsonparse.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                claimed = record.pop("hash")
                seq, back = record["seq"], record["prev"]
            except (ValueError, KeyError, TypeError):
                return fail("RECORD_MALFORMED", number, f"record {number} is not a valid record")
            if (
                canonical_json({**record, "hash": claimed}) != line
                or record_hash(record) != claimed
            ):
                return fail("RECORD_MODIFIED", number, f"record {number} was modified")
            if count == 0 and isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                base = seq  # checked against the head below
            if seq != base + count:
                return fail(
                    "SEQUENCE_BROKEN",
                    number,
                    # Not the value found: it is the file's to choose (any JSON, any text).
                    f"record {number} does not have sequence number {base + count}: "
                    "records were inserted, deleted or reordered",
                )
            if count == 0 and isinstance(back, str) and HEX64_RE.fullmatch(back):
                prev = anchor = back  # the log's own start (zeros, random, or a sealed log's end)
            if back != prev:
                return fail(
                    "CHAIN_BROKEN", number, f"record {number} does not follow record {count}"
                )
            signer = record.get("release_signing_key_id")
            if signer is not None and not (isinstance(signer, str) and HEX64_RE.fullmatch(signer)):
                return fail(
                    "RECORD_MALFORMED",
                    number,
                    f"record {number} does not name its release-signing key by a SHA-256",
                )
            if signer is not None or _is_granted_release(record):
                signing_keys[signer or ""] += 1
            prev = claimed
            count += 1
            tail.append(line)
    if raw_head is None:
        return fail("HEAD_MISSING", None, f"the signed head {hpath.name} is missing")
    try:
        parsed = parse_head(raw_head, public_key)
    except InvalidSignature:
        return fail("HEAD_SIGNATURE_INVALID", None, "the head's signature is not valid")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        detail = f": {exc}" if isinstance(exc, ValueError) and str(exc) else ""
        return fail("HEAD_MALFORMED", None, f"the head is malformed{detail}")
    head, sealed = parsed.head, parsed.sealed
    if count == 0:
        base = head.base
        prev = anchor = head.last_hash  # an empty log starts where its head says
    elif base != head.base:
        return fail(
            "SEQUENCE_BROKEN",
            1,
            f"record 1 is not the first record of this file: its head says the file starts at "
            f"seq {head.base} (records were removed from its start, or another file's put here)",
        )
    end = base + count
    if end < head.count:
        return fail(
            "TAIL_TRUNCATED",
            count + 1,
            f"the head anchors {head.count - base} records but the log has {count}: "
            "records were removed from the end",
        )
    if end > head.count:
        extra = end - head.count
        first_extra = head.count - base + 1  # its line number
        if sealed or (public_key is not None and extra > MAX_BATCH_RECORDS):
            return fail(
                "HEAD_MISMATCH",
                first_extra,
                f"records {first_extra}..{count} are not covered by the signed head: "
                + (
                    "the head seals the file, so no commit added them"
                    if sealed
                    else f"more than one commit writes ({MAX_BATCH_RECORDS}), so no crash left "
                    "them (a head rolled back, or records added)"
                ),
            )
        unanchored = list(tail)[-extra:] if extra <= len(tail) else []
        if unanchored and jsonparse.loads(unanchored[0])["prev"] != head.last_hash:
            return fail(
                "HEAD_MISMATCH",
                (first_extra - 1) or None,
                f"record {first_extra - 1} does not match the head",
            )
        if public_key is not None:
            foreign = next(
                (i for i, line in enumerate(unanchored) if not record_signed_by(line, public_key)),
                None,
            )
            if foreign is not None:
                return fail(
                    "RECORD_FORGED",
                    first_extra + foreign,
                    f"records {first_extra}..{count} are not covered by the signed head and "
                    f"record {first_extra + foreign} is not one the broker wrote (missing or "
                    "invalid signature)",
                )
        if unanchored and parsed.voids(jsonparse.loads(unanchored[0])["hash"]):
            return fail(
                "VOIDED_RECORDS",
                first_extra,
                f"records {first_extra}..{count} are not covered by the signed head, which says "
                "the broker refused them (their decisions never took effect): it cuts them off "
                "on its next write",
            )
        return fail(
            "UNANCHORED_RECORDS",
            first_extra,
            f"records {first_extra}..{count} are not covered by the signed head"
            + (
                " (signed by the broker: a crash before the head update; the broker anchors them "
                "on its next write)"
                if public_key is not None
                else ""
            ),
        )
    if prev != head.last_hash:
        return fail("HEAD_MISMATCH", count or None, "the last record does not match the head")
    span = f" (seq {base}..{end - 1})" if base and count else ""
    return AuditVerification(
        intact=True,
        records=count,
        last_hash=prev,
        signature_checked=checked,
        message=f"{count} records{span}, chain intact, "
        + ("sealed, " if sealed else "")
        + "head "
        + (
            "signature valid"
            if checked
            else f"signature NOT checked (no public key given; {_named_key_text([parsed.key])})"
        )
        + signing_key_summary(signing_keys),
        first_seq=base,
        anchor=anchor,
        sealed=sealed,
        release_signing_keys=tuple(signing_keys.items()),
        head_key=parsed.key,
        head_public=parsed.public,
        head_raw=raw_head,
    )


def _named_key_text(keys: list[str | None]) -> str:
    """What an unchecked verdict says of the key the heads name (``keys``, all the same: a
    series whose heads name several is broken, SERIES_KEY_CHANGED): for the operator to compare
    with the broker's key, since nothing but a signature checked with it proves the name."""
    named = keys[0] if keys else None
    every = "every head names" if len(keys) > 1 else "the head names"
    if named is None:
        return f"{every.replace('names', 'names no')} signing key"
    return f"{every} key {named}, which only --public-key proves"


@dataclass(frozen=True)
class SeriesVerification:
    """The outcome of :func:`verify_audit_series`: each file's verdict in chain order, and for the
    series ``first_seq``/``end`` (seq of its first record, and one past its last), ``problem``
    (a file's own, or SERIES_GAP, SERIES_OVERLAP, SERIES_LINK_BROKEN, SERIES_NOT_SEALED,
    SERIES_KEY_CHANGED, SERIES_NAME_MISMATCH) and ``bad_file`` (the file where the series
    breaks)."""

    intact: bool
    files: tuple[tuple[Path, AuditVerification], ...]
    first_seq: int
    end: int
    problem: str | None = None
    bad_file: Path | None = None
    bad_record: int | None = None
    message: str = ""


def infer_log_name(paths: list[Path]) -> str | None:
    """The log whose files :func:`verify_audit_paths` checks in the directories among ``paths``
    when it is not told (the broker's is the file name of its ``keybroker.audit_log``, which has
    no default; the deployments name it ``audit.log``): the one log whose files (:func:`_log_of`)
    they hold or that is given as a path; None when they hold no log. ``InvalidArgument`` naming
    them when there are several (the caller then names one: ``--log-name``): whoever can write
    the directory can add another log's files, so no log may be preferred to another (a pair
    planted as ``x`` and ``x.head`` beside an archive's sealed files would have made them all
    another log's, left out, and a file deleted from their middle unseen)."""
    logs: set[str] = set()
    for path in paths:
        if not path.is_dir():
            logs.add(sealed_owner(path.name) or path.name)
            continue
        names = _names(path)
        logs.update(log for name in names if (log := _log_of(name, names)) is not None)
    found = sorted(logs)
    if len(found) > 1:
        raise InvalidArgument(
            f"{', '.join(map(str, paths))} hold{'s' if len(paths) == 1 else ''} files of several "
            f"audit logs ({_shown(found)}): name the one to check with --log-name NAME"
        )
    return found[0] if found else None


def _log_of(name: str, names: set[str]) -> str | None:
    """The log whose file ``name`` (of the listing ``names``) is: the one its sealed name (a log's
    or a head's) is of, the one it is the head of, or itself beside its head; None for any other
    name (a log without its head is told from another file only by a given log name)."""
    log = name.removesuffix(HEAD_SUFFIX)
    owner = sealed_owner(log)
    if owner is not None:
        return owner
    return log if log != name or name + HEAD_SUFFIX in names else None


def audit_files(directory: Path | str, log_name: str | None = None) -> list[Path]:
    """The files of the log ``log_name`` (by default :func:`infer_log_name`'s for the directory)
    in ``directory``: the log itself, if it or its head is there, and each of its sealed files
    (:func:`~strongroom.keybroker.audit_names.list_sealed`: log or head, so that a log gone from
    beside its head is reported), but not the sealed files being shipped (:func:`being_shipped`)
    nor names that are tampering (:func:`verify_audit_paths` reports those). Other logs' files
    (:func:`other_logs`) and hidden files (a head's temporary) are not among them."""
    directory = Path(directory)
    names = _names(directory)
    if log_name is None:
        log_name = infer_log_name([directory])
        if log_name is None:
            return []
    listing = list_sealed(names, log_name)
    found = {sealed.name for sealed in listing.files} - set(listing.shipping)
    if log_name in names or log_name + HEAD_SUFFIX in names:
        found.add(log_name)
    return [directory / name for name in sorted(found)]


def other_logs(directory: Path | str, log_name: str) -> list[str]:
    """The names in ``directory`` of other logs' files than ``log_name``'s (:func:`_log_of`),
    which the broker whose log that is never reads nor writes (so neither does
    :func:`verify_audit_paths`): sealed names of another log (logs or heads, whatever their
    numbers) and unsealed logs beside their heads."""
    names = _names(Path(directory))
    return sorted(name for name in names if _log_of(name, names) not in (None, log_name))


def being_shipped(directory: Path | str, log_name: str | None = None) -> list[str]:
    """The sealed files of the log ``log_name`` (by default :func:`infer_log_name`'s) in
    ``directory`` at the start of its series that have lost their log or their head
    (:mod:`~strongroom.keybroker.audit_names`, *Being shipped*): retention, as the broker's check
    at start reads them, so they are left out of the series rather than reported as a truncated
    log or a missing head."""
    directory = Path(directory)
    if log_name is None:
        log_name = infer_log_name([directory])
        if log_name is None:
            return []
    return list(list_sealed(_names(directory), log_name).shipping)


def _names(directory: Path) -> set[str]:
    """The names in ``directory`` but hidden ones (a head's temporary)."""
    return {p.name for p in directory.iterdir() if not p.name.startswith(".")}


def _shown(names: list[str]) -> str:
    """``names`` for a one-line message: all of up to three, else the first and last of them."""
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]}"


def _misnamed(directories: list[Path], log_name: str) -> SeriesVerification | None:
    """SERIES_NAME_MISMATCH for the first directory holding sealed names of ``log_name`` that are
    not canonical (tampering, as the broker's start says: :mod:`~strongroom.keybroker.audit_names`)."""
    for directory in directories:
        listing: SealedListing = list_sealed(_names(directory), log_name)
        problem = listing.not_canonical_problem()
        if problem is not None:
            return SeriesVerification(
                intact=False,
                files=(),
                first_seq=0,
                end=0,
                problem="SERIES_NAME_MISMATCH",
                bad_file=directory / listing.not_canonical[0],
                message=problem,
            )
    return None


_RELISTINGS = 3
"""How many times a broken series of listed directories is listed and checked again (each after
the rotation under way, if any, has ended) while the listing keeps changing; and a series one of
whose listed files was gone whole when opened (a shipper deleting the oldest pair)."""


def verify_audit_paths(
    paths: list[Path],
    *,
    public_key: Ed25519PublicKey | None = None,
    log_name: str | None = None,
) -> SeriesVerification:
    """Verifies the logs at ``paths`` (a directory stands for :func:`audit_files` in it) as one
    series (:func:`verify_audit_series`).

    In a directory, only the files of the log ``log_name`` are read, as the broker whose log it
    is reads only them (by default :func:`infer_log_name`'s: ``InvalidArgument`` when that is
    ambiguous); the message names the files of other logs left out (:func:`other_logs`).

    A directory is listed before its files are checked, and a running broker may rotate in
    between (SIGHUP's rotation runs in a thread of its own, so ``kill -HUP`` then ``audit verify``
    races it): its active log is then under a sealed name the listing lacks, which read as a file
    deleted from the middle of the chain. So a broken series of listed directories is checked
    again, once any rotation under way has ended, if listing them again finds other files; so is
    one of whose listed files a shipper deleted the log and head before they were opened (as the
    broker's start reads them: the oldest then, being shipped; a file in the middle, tampering).
    Sealed files being shipped (:func:`being_shipped`) are left out, and the message names them.

    Raises NotFound(AUDIT_LOG_NOT_FOUND) when the directories hold no log, and like
    :func:`verify_audit_log`.
    """
    directories = [path for path in paths if path.is_dir()]
    if log_name is None and directories:
        log_name = infer_log_name(paths)
    if log_name is None:
        if directories:
            raise NotFound(
                f"no audit logs in {', '.join(map(str, paths))}", reason=Reason.AUDIT_LOG_NOT_FOUND
            )
        log_name = ""  # no directory to list: the paths are the files
    others = [name for directory in directories for name in other_logs(directory, log_name)]
    note = f"; left out, not of {log_name}: {len(others)}: {_shown(others)}" if others else ""
    misnamed = _misnamed(directories, log_name)
    if misnamed is not None:
        return dataclasses.replace(misnamed, message=misnamed.message + note)

    def listed() -> list[Path]:
        files: list[Path] = []
        for path in paths:
            files.extend(audit_files(path, log_name) if path in directories else [path])
        if not files:
            raise NotFound(
                f"no audit logs of {log_name} in {', '.join(map(str, paths))}{note}",
                reason=Reason.AUDIT_LOG_NOT_FOUND,
            )
        return files

    files = listed()
    for attempt in range(_RELISTINGS + 1):
        gone: NotFound | None = None
        try:
            result = verify_audit_series(files, public_key=public_key)
        except NotFound as exc:
            # Listed, then deleted whole (log and head) before its open: a shipper going on.
            if not directories or attempt == _RELISTINGS:
                raise
            gone = exc
        if gone is None and (result.intact or not directories or attempt == _RELISTINGS):
            break
        for directory in directories:
            _waited_for_directory(directory)
        again = listed()
        if again == files:
            if gone is not None:
                raise gone
            break
        files = again
    judged = {verdict.rotation_cut for _, verdict in result.files}
    shipped = [
        name
        for directory in directories
        for name in being_shipped(directory, log_name)
        if name not in judged  # a rotation cut between its renames: judged with the log
    ]
    if result.intact and shipped:
        # Named, so that nobody takes them for checked (the first and last of many).
        note = (
            f"; left out, being shipped (log or head already deleted): {len(shipped)}: "
            f"{_shown(shipped)}{note}"
        )
    return dataclasses.replace(result, message=result.message + note) if note else result


def verify_audit_series(
    paths: list[Path], *, public_key: Ed25519PublicKey | None = None
) -> SeriesVerification:
    """Verifies each log (:func:`verify_audit_log`), then that together they are one chain:
    ordered by their first ``seq``, each continues the one before (its first record's ``prev`` is
    that file's last hash, its first ``seq`` that file's end), every file but the last is
    sealed and each head names the signing key the file before's names (the broker never changes
    its key within a chain: it opens no head another key signed; SERIES_KEY_CHANGED). Without
    ``public_key``, every head is checked with the key the first head carrying one carries
    (:func:`_heads_signed_by_carried_key`), else names alone are compared, which a forger may
    write as they please: only ``public_key`` proves the heads the broker's. A missing file in the middle, two files covering the same records, a file from
    another chain, a file continued though not sealed, or a sealed file renamed to another range
    breaks the series; a series that starts after seq 0 (older sealed files deleted: retention)
    does not, and the message says where it starts.

    Raises like :func:`verify_audit_log`, and NotFound(AUDIT_LOG_NOT_FOUND) for no paths.
    """
    if not paths:
        raise NotFound("no audit logs to verify", reason=Reason.AUDIT_LOG_NOT_FOUND)
    verdicts = [(Path(path), verify_audit_log(path, public_key=public_key)) for path in paths]
    # A rotation cut between its renames: the log's verdict is its sealed file's, judged with the
    # sealed head; that file's own (no head) is left out, as the broker reads them once finished.
    cut = {
        path.with_name(verdict.rotation_cut) for path, verdict in verdicts if verdict.rotation_cut
    }
    notes = [
        _cut_note(path, path.with_name(verdict.rotation_cut))
        for path, verdict in verdicts
        if verdict.rotation_cut
    ]
    verdicts = [item for item in verdicts if item[0] not in cut]
    unwritten = [path for path, verdict in verdicts if _head_unwritten(path, verdict)]
    if len(unwritten) < len(verdicts):
        verdicts = [item for item in verdicts if item[0] not in unwritten]
    else:
        unwritten = []  # nothing else to check: HEAD_MISSING, as for the log alone
    # The earliest broken file in the chain's order (names sort 10-12 before 3-5).
    for path, verdict in sorted(verdicts, key=lambda item: item[1].first_seq):
        if not verdict.intact:
            return SeriesVerification(
                intact=False,
                files=tuple(verdicts),
                first_seq=verdict.first_seq,
                end=verdict.first_seq + verdict.records,
                problem=verdict.problem,
                bad_file=path,
                bad_record=verdict.bad_record,
                message=verdict.message,
            )
    ordered = sorted(verdicts, key=lambda item: (item[1].first_seq, item[1].records))
    first = ordered[0][1].first_seq
    end = ordered[-1][1].first_seq + ordered[-1][1].records

    def broken(problem: str, path: Path, message: str) -> SeriesVerification:
        return SeriesVerification(
            intact=False,
            files=tuple(ordered),
            first_seq=first,
            end=end,
            problem=problem,
            bad_file=path,
            message=message,
        )

    for (before_path, before), (path, verdict) in itertools.pairwise(ordered):
        before_end = before.first_seq + before.records
        between = f"{before_path.name} (seq ..{before_end - 1}) and {path.name}"
        if verdict.first_seq > before_end:
            return broken(
                "SERIES_GAP",
                path,
                f"records seq {before_end}..{verdict.first_seq - 1} are missing between "
                f"{between}: a file in the middle was deleted",
            )
        if verdict.first_seq < before_end:
            return broken(
                "SERIES_OVERLAP",
                path,
                f"{between} both hold records from seq {verdict.first_seq}: a file was copied "
                "or substituted",
            )
        if verdict.anchor != before.last_hash:
            return broken(
                "SERIES_LINK_BROKEN",
                path,
                f"{path.name} does not continue {before_path.name}: a file of another chain "
                "was substituted",
            )
        if not before.sealed:
            return broken(
                "SERIES_NOT_SEALED",
                before_path,
                f"{before_path.name} is not sealed, yet {path.name} continues it",
            )
        if verdict.head_key != before.head_key:
            return broken(
                "SERIES_KEY_CHANGED",
                path,
                f"{path.name}'s head names signing key {verdict.head_key or 'none'} but "
                f"{before_path.name}'s names {before.head_key or 'none'}: the broker never "
                "changes its audit key within a chain (it does not start beside another key's "
                f"heads), so {path.name} and the files after it were written by another key's "
                "holder"
                + (
                    "; only --public-key (the broker's) tells which files are the broker's"
                    if not verdict.signature_checked
                    else ""
                ),
            )
    carried = None if public_key is not None else _heads_signed_by_carried_key(ordered)
    if isinstance(carried, tuple):
        return broken(*carried)
    for path, verdict in ordered:
        span = (verdict.first_seq, verdict.first_seq + verdict.records - 1)
        if has_sealed_shape(path.name) and sealed_range(path.name) != span:
            return broken(
                "SERIES_NAME_MISMATCH",
                path,
                f"{path.name} holds seq {span[0]}..{span[1]}: its name was changed",
            )
    checked = all(verdict.signature_checked for _, verdict in ordered)
    signing_keys: collections.Counter[str] = collections.Counter()
    for _, verdict in ordered:
        signing_keys.update(dict(verdict.release_signing_keys))
    return SeriesVerification(
        intact=True,
        files=tuple(ordered),
        first_seq=first,
        end=end,
        message=f"{len(ordered)} files, "
        + (f"records seq {first}..{end - 1}" if end > first else "no records")
        + ", chain intact across them"
        + (f"; starts at seq {first} (earlier files deleted)" if first else "")
        + ("; the last file is sealed (no active log among them)" if ordered[-1][1].sealed else "")
        + (
            "; head signatures valid"
            if checked
            else f"; head signatures valid with the key a head carries, {carried}, which only "
            "--public-key proves the broker's"
            if carried
            else "; head signatures NOT checked ("
            + _named_key_text([verdict.head_key for _, verdict in ordered])
            + ")"
        )
        + signing_key_summary(signing_keys)
        + (
            f"; left out, empty and without its head: {_shown([p.name for p in unwritten])} (a "
            "crash before its first head was written: the broker writes it when it next starts)"
            if unwritten
            else ""
        )
        + "".join(f"; {note}" for note in notes),
    )


def _heads_signed_by_carried_key(
    ordered: list[tuple[Path, AuditVerification]],
) -> str | tuple[str, Path, str] | None:
    """Without a pinned key, checks every head of a series (``ordered``, whose heads all name one
    key) with the public key the first head to carry one carries (``pub``, checked when parsed
    to be the key the heads name): the broker signs every head of a chain with one key, so a
    forger who keeps older files of it cannot continue them with heads naming its key without
    its private key. Returns that key's fingerprint when every head verifies, None when no head
    carries a key (written before heads did: names alone are compared), or what
    :func:`verify_audit_series` reports at the first head it did not sign."""
    carriers = [(path, v.head_public) for path, v in ordered if v.head_public is not None]
    if not carriers:
        return None
    source_path, public = carriers[0]
    key = Ed25519PublicKey.from_public_bytes(public)
    for path, verdict in ordered:
        try:
            parse_head(verdict.head_raw, key)
        except InvalidSignature:
            return (
                "HEAD_SIGNATURE_INVALID",
                path,
                f"{path.name}'s head names signing key {verdict.head_key} but is not signed by "
                f"it: {source_path.name}'s head carries that key, and the broker signs every head "
                f"of a chain with one key, so {path.name} and the files after it were written by "
                "another key's holder; only --public-key (the broker's) tells which files are "
                "the broker's",
            )
    return key_fingerprint(public)


def _head_unwritten(path: Path, verdict: AuditVerification) -> bool:
    """Whether ``path`` is an active log (not a sealed name) that is empty and has no head: a
    crash between creating it (a rotation's new log) and writing its first head, which the
    broker's next start writes, continuing the last sealed file. No records are missing from
    it: it is left out of a series, as the broker reads it (a new log), rather than called
    HEAD_MISSING, tampering."""
    return (
        verdict.problem == "HEAD_MISSING"
        and verdict.records == 0
        and not has_sealed_shape(path.name)
    )
