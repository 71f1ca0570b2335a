"""Typed values the storage layer returns: a stored model's record, a page of them, upload claims."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from strongroom.artifact.format import (
    MAX_HEAD_SIZE,
    MAX_PLAINTEXT_SIZE,
    check_content_type,
    check_key_id,
)
from strongroom.errors import InvalidArgument
from strongroom.identifiers import (
    is_sha256_hex,
    validate_key_version,
    validate_name,
    validate_version,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UINT64 = 2**64
_UINT32 = 2**32


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    """The timezone-aware UTC datetime ``micros`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=micros)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelRecord:
    """What the store knows about one stored artifact (the header fields come from its validator)."""

    name: str
    version: str
    artifact_sha256: str
    """Lower-case hex SHA-256 of the whole artifact as stored."""
    artifact_size: int
    plaintext_size: int
    plaintext_sha256: str
    content_type: str
    key_id: str
    key_version: int
    header_size: int
    created_at: datetime
    """When the publisher created the artifact (from its header), timezone-aware UTC."""
    stored_at: datetime
    """When the store committed it, timezone-aware UTC."""
    artifact_format: int = 0
    """The artifact's format version, from its header (1 and 2 do not bind the data key to the
    model; 3 does); 0: not known (an S3 index record written before the store recorded it)."""


MAX_PROBLEM_LENGTH = 200
"""The longest :attr:`CorruptEntry.problem` kept, in ASCII characters (so in bytes too: an
entry's size in a ListModels page stays bounded)."""


def problem_text(exc: ValueError) -> str:
    """``exc``'s message as a :attr:`CorruptEntry.problem`: ASCII (anything else escaped) and at
    most :data:`MAX_PROBLEM_LENGTH` characters."""
    return str(exc).encode("ascii", "backslashreplace").decode("ascii")[:MAX_PROBLEM_LENGTH]


MAX_UNREADABLE_LOGGED = 4096
"""How many distinct unreadable index entries one storage logs by name; past that, one line
says the rest are not logged (the listings and the start-up sweep still name every one)."""


class UnreadableEntries:
    """Logs each unreadable index entry at ERROR once per storage (a store process has one),
    not on every read that meets it.

    Every listing page logged an ERROR for each corrupt entry it covered, so a caller paging
    through the store again and again (any reader may) wrote the same lines without end. An
    entry is logged again only if what is wrong with it changes; at most
    :data:`MAX_UNREADABLE_LOGGED` entries are remembered, so that planting entries cannot grow
    the store's memory (or, by forgetting, flood the log again). Thread-safe.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._lock = threading.Lock()
        # Digests, not the texts: a filesystem row's name as a message names it is up to ~3 KB
        # (256 characters, each a 6-character escape), so 4,096 remembered texts held ~13 MB.
        self._seen: set[tuple[bytes, bytes]] = set()
        self._full = False

    @staticmethod
    def _digest(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()

    def report(self, what: str, problem: str) -> None:
        """Logs that ``what`` (the entry, as a message names it) is unreadable for ``problem``,
        unless that was logged already."""
        key = (self._digest(what), self._digest(problem))
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) >= MAX_UNREADABLE_LOGGED:
                first, self._full = not self._full, True
                if first:
                    self._log.error(
                        "more than %d index entries are unreadable: later ones are not logged "
                        "(ListModels corrupt_entries and the start-up sweep name them all)",
                        MAX_UNREADABLE_LOGGED,
                    )
                return
            self._seen.add(key)
        self._log.error("%s is unreadable: %s", what, problem)

    def forget(self, what: str) -> None:
        """Forgets ``what`` (an entry just deleted), so that an entry of that name made
        unreadable again, the same way, is logged again: remembered for good, a second edit of
        a model re-published after its corrupt entry was deleted went unlogged, and deleted
        entries filled the memory that later ones need to be logged at all."""
        forgotten = self._digest(what)
        with self._lock:
            if any(seen == forgotten for seen, _ in self._seen):
                self._seen = {(w, p) for w, p in self._seen if w != forgotten}
                self._full = False


@dataclasses.dataclass(frozen=True, slots=True)
class CorruptEntry:
    """An index entry in a listing that the store cannot read (edited or damaged): it is named,
    never served or judged by, and every read of it stays DATA_LOSS INDEX_CORRUPT."""

    name: str
    """The entry's model name as far as known (a filesystem row's name column, an S3 index
    object's key), possibly outside the name grammar."""
    version: str
    """The entry's version, likewise."""
    problem: str
    """What is wrong: the first field that breaks the rules (at most MAX_PROBLEM_LENGTH)."""


def listed_text(text: str) -> str:
    """``text`` (a corrupt entry's name or version) as a listing names it: a byte a filesystem
    index row holds that is not UTF-8 (read as a surrogate escape) written as ``\\xff``, so that
    a protobuf string can carry it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x[89a-f][0-9a-f]")


def listed_prefix(listed: str) -> str:
    """The part of ``listed`` (a name or version as :func:`listed_text` writes it) before its
    first ``\\xHH`` (HH 80 to ff, the only escapes it writes): every stored text listed as
    ``listed`` starts with exactly these characters. After it, each such escape may stand for a
    byte or for those four characters held as text, in any mixture (2^n stored texts for n of
    them), so a lookup compares candidates' listed text instead of enumerating them."""
    found = _ESCAPED_BYTE.search(listed)
    return listed if found is None else listed[: found.start()]


MAX_HELD_LENGTH = 2048
"""The longest :func:`held_text` kept, in ASCII characters (a record the store writes is about
1 KB; an edited one may hold megabytes)."""


def held_text(stored: object) -> str:
    """``stored`` (a deleted index entry as it was stored: a filesystem row's columns by name, an
    S3 index object's bytes) as one bounded ASCII log field: what DeleteModel with
    ``corrupt_entry`` removed, so that an operator can find the blob it named (in
    ``quarantine/`` once swept) and put the entry back by hand."""
    if isinstance(stored, bytes):
        stored = stored.decode("utf-8", "backslashreplace")
    text = stored if isinstance(stored, str) else repr(stored)
    return text.encode("ascii", "backslashreplace").decode("ascii")[:MAX_HELD_LENGTH]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelPage:
    """One page of a listing; ``next_page_token`` is empty on the last page.

    ``corrupt`` holds the unreadable index entries among the page's keys: one damaged or edited
    entry failed every page that covered it (DATA_LOSS), which stopped every walk of the store,
    ``keys rewrap-models`` and ``keys disable``'s check among them. An entry of either tuple
    counts towards the page size, and the page token resumes after the last of both."""

    models: tuple[ModelRecord, ...]
    next_page_token: str
    corrupt: tuple[CorruptEntry, ...] = ()


@dataclasses.dataclass(slots=True)
class UploadClaims:
    """What the client says about the artifact it is uploading; both fields are optional.

    The storage reads ``size`` after every chunk (to fail fast) and both fields once more after the
    last chunk, so a transport adapter may fill them in while the chunk iterator is consumed (a
    digest that arrives with the last message is still checked).
    """

    size: int | None = None
    sha256: str | None = None


STORED_FIELDS = (
    "name",
    "version",
    "artifact_sha256",
    "artifact_size",
    "plaintext_size",
    "plaintext_sha256",
    "content_type",
    "key_id",
    "key_version",
    "header_size",
    "created_at_us",
    "stored_at_us",
    "artifact_format",
)
"""The fields of a stored index entry (a filesystem index row's columns, an S3 index object's
keys besides its ``format`` and ``blob``)."""


def _text(fields: Mapping[str, object], field: str) -> str:
    value = fields.get(field)
    if type(value) is not str:
        raise ValueError(f"{field} is not text")
    return value


def _integer(fields: Mapping[str, object], field: str, low: int, high: int) -> int:
    """``fields[field]``: an int (not a bool, nor text SQLite kept in an INTEGER column) in
    ``low``..``high - 1``."""
    value = fields.get(field)
    if type(value) is not int:
        raise ValueError(f"{field} is not an integer")
    if not low <= value < high:
        raise ValueError(f"{field} is out of range")
    return value


def _time(fields: Mapping[str, object], field: str) -> datetime:
    micros = _integer(fields, field, -(2**63), 2**63)
    try:
        return from_micros(micros)
    except OverflowError:  # past what a datetime holds (not a ValueError)
        raise ValueError(f"{field} is out of range") from None


T = TypeVar("T")


def _holds(rule: Callable[[Any], T], value: Any, problem: str) -> T:
    """``rule(value)``, its InvalidArgument (the rule a request is held to) as ``problem``: a
    stored entry that breaks it is corrupt, not the caller's mistake."""
    try:
        return rule(value)
    except InvalidArgument:
        raise ValueError(problem) from None


def stored_record(fields: Mapping[str, object]) -> ModelRecord:
    """The record of one stored index entry, every field held to the rules a record the store
    writes meets; ValueError naming the first field that breaks them.

    The one validator of both backends' indexes (a filesystem index row, an S3 index object):
    whoever can write the storage volume or the bucket can edit an entry, and a value the store
    cannot have written (a KEK version no broker numbers, a size ModelInfo's uint64 cannot hold,
    a header larger than its artifact, a content type no header may carry) surfaced later as an
    INTERNAL answer, a crash of the start-up sweep or a wrong answer. ``artifact_format`` may be
    absent (an S3 record written before the store recorded it): 0, not known.
    """
    for field in STORED_FIELDS[:-1]:
        if field not in fields:
            raise ValueError(f"{field} is missing")
    name, version = _text(fields, "name"), _text(fields, "version")
    _holds(validate_name, name, "name is outside the model-name grammar")
    _holds(validate_version, version, "version is outside the model-version grammar")
    for field in ("artifact_sha256", "plaintext_sha256"):
        if not is_sha256_hex(_text(fields, field)):
            raise ValueError(f"{field} is not a lower-case hex SHA-256")
    artifact_size = _integer(fields, "artifact_size", 1, _UINT64)
    content_type, key_id = _text(fields, "content_type"), _text(fields, "key_id")
    _holds(check_content_type, content_type, "content_type is not one a header may carry")
    _holds(check_key_id, key_id, "key_id is not one a header may carry")
    # The one rule for KEK versions (the broker's): the store records only versions its
    # artifacts' headers name, which the format holds to it.
    key_version = _holds(
        validate_key_version,
        fields.get("key_version"),
        "key_version is not a KEK version a broker numbers",
    )
    return ModelRecord(
        name=name,
        version=version,
        artifact_sha256=_text(fields, "artifact_sha256"),
        artifact_size=artifact_size,
        # What the format holds (ARTIFACT_FORMAT.md: at most 2^40 bytes, PLAINTEXT_TOO_LARGE),
        # and less than the artifact, whose body alone is the plaintext plus its digest, tags
        # and salt: a uint64 bound let an edited entry announce an exabyte model (a loader sizes
        # its buffers and its key wait by it) that no upload can store.
        plaintext_size=_integer(
            fields, "plaintext_size", 0, min(MAX_PLAINTEXT_SIZE + 1, artifact_size)
        ),
        plaintext_sha256=_text(fields, "plaintext_sha256"),
        content_type=content_type,
        key_id=key_id,
        key_version=key_version,
        # Every artifact has a header and a body after it, and no head is larger than the format
        # allows: a header size past the artifact's sent the sweep's header read (and a
        # re-wrap's) past the blob's end, and one up to the artifact's made the start-up sweep
        # (recording an older entry's format) and a re-wrap read that much into memory, an
        # artifact's whole size (gigabytes), to parse a head of at most MAX_HEAD_SIZE bytes.
        header_size=_integer(fields, "header_size", 1, min(artifact_size, MAX_HEAD_SIZE + 1)),
        created_at=_time(fields, "created_at_us"),
        stored_at=_time(fields, "stored_at_us"),
        artifact_format=(
            _integer(fields, "artifact_format", 0, _UINT32) if "artifact_format" in fields else 0
        ),
    )
