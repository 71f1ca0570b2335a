"""The S3-compatible storage backend: artifacts and their index live in one bucket, no local state.

Layout under the configured key prefix::

    index/<name>!<version>     a small JSON record per model (the index; see below)
    blobs/<yyyymmddThhmmssZ>-<random>   one artifact's bytes, written once, never modified
    probes/<yyyymmddThhmmssZ>-<random>  the start-up check of conditional writes (removed again;
                                        the sweep deletes one a killed start left, once a day old)

``!`` sorts below every character a model name may contain, so the bucket's own key order is the
(name, version) order the API lists in, and a name prefix is a key prefix: a listing is one
ListObjectsV2 with ``StartAfter`` (keyset pagination), whichever replica serves it.

Upload protocol (each step is invisible to readers until the last one):

1. stream the chunks through the validator and SHA-256 into a multipart upload at a fresh blob key
   (parts of ``part_size`` bytes, each with Content-MD5 so the server rejects a damaged part); an
   artifact smaller than one part is sent with one PutObject after step 2 instead;
2. check size and digest against the validator's summary and the client's claims; on any failure
   abort the multipart upload (nothing was ever an object);
3. complete the multipart upload (create-only: ``If-None-Match: *``), so the blob exists whole;
4. publish: PutObject ``index/<name>!<version>`` with ``If-None-Match: *``. The bucket decides: of
   any number of concurrent uploads of one version, on any number of replicas, exactly one
   creates the index object; the others get 412 (ModelExists) and delete their blob.

An index write (step 4, or a re-wrap's swap below) whose answer is not a first-attempt refusal
may have taken effect: its answer was lost, or botocore retried it and the retry was refused
*because the first attempt had landed* (412 against our own object). The store then reads the
index again: naming the new blob, the write took effect and the call succeeds; naming something
the condition can no longer match, the blob is deleted; otherwise (the write may still land, or
the index cannot be read) the blob is kept, since deleting a blob an index object may come to
name loses the model.

Key-slot replacement writes a new blob the same way, then replaces the index object with
``If-Match: <the ETag it read>`` (compare-and-swap), and only then deletes the old blob (a read
that looked the model up just before, and so finds that blob gone, looks again and reads the new
one: the model was re-wrapped, not lost). A crash
at any point leaves the index pointing at one whole blob; what it leaves behind (an unreferenced
blob, an unfinished multipart upload) carries its creation time in its key. :meth:`S3Storage.sweep`
aborts such an upload once older than a grace period (any replica may run it; it is idempotent),
but never deletes a blob: one no index record names after the grace period is reported and logged
and stays where it is (nothing serves a blob no record names). It may be a crash's leftover, but
it may as well be a model whose index object was lost or rolled back (a bucket restored from an
older backup of ``index/``), and deleting it would lose that model for good; README, "Operating
it", says how an operator re-publishes or purges it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import enum
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import botocore.exceptions
from botocore.config import Config

from strongroom import jsonparse
from strongroom.artifact import InvalidArtifact, StructureValidator, parse_header
from strongroom.artifact.format import MAX_HEAD_SIZE
from strongroom.closing import Closing
from strongroom.errors import FailedPrecondition, Internal, InvalidArgument, StrongroomError
from strongroom.identifiers import (
    validate_name,
    validate_version,
)
from strongroom.modelstore import _keyslot, _pagetoken, _ranges
from strongroom.modelstore._heads import head_checked, stored_header
from strongroom.modelstore._ranges import Frame, copied_into
from strongroom.modelstore._upload import Authorize, Uploads, utcnow
from strongroom.modelstore.config import StorageConfig
from strongroom.modelstore.errors import (
    KeySlotRejected,
    ModelExists,
    ModelNotFound,
    StorageUnavailable,
    StoredDataCorrupt,
)
from strongroom.modelstore.limits import DEFAULT_MAX_ARTIFACT_SIZE, DEFAULT_PAGE_SIZE
from strongroom.modelstore.records import (
    CorruptEntry,
    ModelPage,
    ModelRecord,
    UnreadableEntries,
    UploadClaims,
    held_text,
    problem_text,
    stored_record,
    to_micros,
)
from strongroom.reasons import Reason
from strongroom.runtime.metrics import BLOBS_KEPT
from strongroom.runtime.secrets import Secret

S3Client = Any
"""A boto3 S3 client (boto3 ships no type information)."""

log = logging.getLogger(__name__)

INDEX_DIR = "index/"
BLOB_DIR = "blobs/"
PROBE_DIR = "probes/"
"""Where the start-up check of conditional writes puts (and removes) its one empty object."""
_NO_SUCH_ETAG = '"00000000000000000000000000000000"'
_PROBE_NAME = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{32}")
PROBE_MAX_AGE = timedelta(days=1)
"""Age past which a sweep deletes a probe object: far longer than any start-up check takes, so
another replica's check under way never loses its probe (with it gone, its next create-only
write would succeed and a healthy store would be refused), whatever ``orphan_grace`` is."""
_SEPARATOR = "!"  # sorts below every model-name character ('-' is the lowest)
_RECORD_FORMAT = 1
_STAMP = "%Y%m%dT%H%M%SZ"
T = TypeVar("T")
_LIST_WORKERS = 8
MAX_INDEX_RECORD_BYTES = 64 * 1024
"""The largest index object read; a record is about 1 KB, a bigger object is corrupt."""
_READ_BLOCK = 1 << 20
# How many times a read follows a re-wrap that replaced the blob it had just looked up, or a
# delete retries a record changed since it read it (each re-wrap rewrites the whole artifact, so
# a second one in that window is already unlikely).
_OPEN_ATTEMPTS = 3
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# A GET of an object in an archive storage class (Glacier, Deep Archive): a 403, but no refusal
# of the store's credentials.
_ARCHIVED_CODE = "InvalidObjectState"


@dataclasses.dataclass(frozen=True, slots=True)
class S3SweepReport:
    """What a sweep of the bucket found, and the unfinished uploads it aborted."""

    uploads_aborted: int
    """Unfinished multipart uploads older than the grace period (a crashed or killed replica)."""
    orphan_blobs: tuple[str, ...]
    """Blobs (keys under the prefix) older than the grace period that no index record points at:
    left in place (never served, never deleted by the store) and logged."""
    missing_blobs: tuple[tuple[str, str], ...]
    """(name, version) of records whose blob is gone: reads of them fail with DATA_LOSS."""
    damaged_blobs: tuple[tuple[str, str], ...]
    """(name, version) of records whose blob has the wrong size: reads fail with DATA_LOSS."""
    unreadable_records: tuple[tuple[str, str], ...] = ()
    """(name, version) of index records that do not parse (reads of them fail with DATA_LOSS
    INDEX_CORRUPT); an orphan blob may be one of theirs."""
    formats_recorded: int = 0
    """Records written before they carried an artifact format, given their blob's header format."""
    unchecked_blobs: tuple[tuple[str, str], ...] = ()
    """(name, version) of records whose blob the listing lacked (made since, or gone) and whose
    own lookup failed (logged): neither reported missing nor known intact by this sweep."""
    probes_removed: int = 0
    """Probe objects of the start-up check older than :data:`PROBE_MAX_AGE`, deleted: a start
    that crashed (or could not delete) between writing and removing its probe left them."""


def make_client(config: StorageConfig, *, single_secrets: bool = False) -> S3Client:
    """A boto3 S3 client for ``config``; credentials come from files or the environment only
    (with ``single_secrets``, the production rule: never both, see ``Secret.load``)."""
    import boto3  # deferred: only the S3 backend needs it

    access_key = Secret.load(
        file=config.access_key_id_file,
        env=config.access_key_id_env,
        what="modelstore.storage access key id",
        single=single_secrets,
    )
    secret_key = Secret.load(
        file=config.secret_access_key_file,
        env=config.secret_access_key_env,
        what="modelstore.storage secret access key",
        single=single_secrets,
    )
    client_config = Config(
        region_name=config.region,
        s3={"addressing_style": "path" if config.path_style else "virtual"},
        signature_version="s3v4",
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        retries={"max_attempts": config.max_attempts, "mode": "standard"},
        max_pool_connections=32,
        # Integrity is ours: Content-MD5 per part on the way in, SHA-256 of the whole artifact
        # on verify. Not every S3-compatible server speaks the newer flexible checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
    )
    session = boto3.session.Session()
    client: S3Client = session.client(
        "s3",
        endpoint_url=config.endpoint,
        aws_access_key_id=access_key.reveal_text(),
        aws_secret_access_key=secret_key.reveal_text(),
        verify=str(config.ca_bundle_file) if config.ca_bundle_file else True,
        config=client_config,
    )
    return client


# S3 passes on an SSE-KMS failure as the KMS error's name: KMS.DisabledException,
# KMS.KMSInvalidStateException, KMS.AccessDeniedException, KMS.ThrottlingException, ...
_KMS_CODE_PREFIX = "KMS."
# What S3 and S3-compatible stores answer when they throttle (AWS: SlowDown with 503; others 429).
_THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
    }
)
# KMS errors that say "not now" rather than "no": KMS throttling or failing, a key whose custom
# key store cannot be reached for the moment (AWS: "you can retry the request").
_KMS_PASSING_CODES = frozenset(
    {
        "KMS.DependencyTimeoutException",
        "KMS.KMSInternalException",
        "KMS.KeyUnavailableException",
        "KMS.ThrottlingException",
    }
)


_ERROR_NAME = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")


def _shown(code: str) -> str:
    """``code`` as a caller may be told it: an error name (``SlowDown``,
    ``KMS.DisabledException``), else "" (the object store, or a proxy before it, answers what it
    likes, and a code of its making went into every caller's message as it was)."""
    return code if _ERROR_NAME.fullmatch(code) else ""


def _failure(exc: BaseException) -> str:
    """What a log line says of a failed S3 call: an answer's error code, HTTP status and
    operation, else the error's class. Never botocore's text: an answer's message is the object
    store's (a KMS key's ARN and with it the account, request ids, the bucket's name), and a
    timeout's or a dropped connection's names the endpoint URL with the bucket and the key; the
    repr of each went into operators' logs (and whatever collects them) as it was."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = _shown(_code(exc)) or "no error code"
        return f"{code} (HTTP {_status(exc)}) from {exc.operation_name}"
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return type(exc).__name__
    if isinstance(exc, OSError):
        return f"{type(exc).__name__} ({exc.strerror or exc.errno})"
    return f"{type(exc).__name__}: {exc}"  # this store's own (a header that does not parse)


def _throttled(code: str, status: int) -> bool:
    return code in _THROTTLE_CODES or status == 429


def _server_failed(code: str, status: int) -> bool:
    return status >= 500 or code in ("ServiceUnavailable", "InternalError")


def _passing(exc: botocore.exceptions.ClientError) -> bool:
    """True if the object store's refusal may well not be met again: throttling, a 5xx past
    botocore's retries, a KMS error of those kinds. False for a refusal that holds until someone
    changes something (a disabled KMS key, a denied permission, an archived object)."""
    code, status = _code(exc), _status(exc)
    return (
        code in _KMS_PASSING_CODES
        or _throttled(code.removeprefix(_KMS_CODE_PREFIX), status)
        or _server_failed(code, status)
    )


def s3_error(exc: Exception, what: str) -> StorageUnavailable | ModelNotFound:
    """The domain error for a failed S3 call while doing ``what`` (details go to the log).

    Every failure of the object store is UNAVAILABLE with a reason that says which kind it was:
    ``S3_ACCESS_DENIED`` (credentials rejected or no permission: an operator must fix it),
    ``S3_CLOCK_SKEW`` (the request's signing time is too far from the server's: fix the clock),
    ``S3_KMS_ERROR`` (the bucket's KMS key refused or failed the object's encryption: a
    ``KMS.*`` code, such as a disabled key or no ``kms:Decrypt`` for the store; one of KMS's
    passing failures, an internal error or a key store out of reach, says so, not "check the
    key"), ``S3_NO_SUCH_BUCKET``, ``S3_THROTTLED`` (SlowDown, 429 and the like, after botocore's
    retries, and KMS's own ``KMS.ThrottlingException``: the request rate), ``S3_SERVER_ERROR``
    (5xx after botocore's retries), ``S3_TIMEOUT``, ``S3_UNREACHABLE`` (connection refused or
    dropped), ``S3_ERROR`` (anything else, an archived object's ``InvalidObjectState`` among
    them, saying so: a 403 that is no refusal of the credentials).
    """
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        # The code as _failure shows it, as every other line about a failed call does: an object
        # store's or a proxy's code that is no error name (a URL, an ARN) went into the log as it
        # was, up to 200 characters.
        log.error("S3 request failed while %s: %s", what, _failure(exc))
        # A 403, but not about the credentials: said to be, an operator would chase keys and
        # policies that are fine instead of the store's clock.
        if code == "RequestTimeTooSkewed":
            return StorageUnavailable(
                f"the object store refused a request while {what}: its signing time is too far "
                "from the server's clock (check the store host's clock)",
                reason=Reason.S3_CLOCK_SKEW,
            )
        if code.startswith(_KMS_CODE_PREFIX):
            # SSE-KMS: the object's key (not the store's credentials, nor the object store) said
            # no, or failed: a 403 of them was S3_ACCESS_DENIED, a 400 the vague S3_ERROR. KMS
            # throttling, or failing for the moment, is not the key's state: told to check it, an
            # operator went after a key that was fine while the retry would have done.
            # The same rule as _passing's: a delete takes what is called throttling here as
            # passing (it fails, nothing deleted), not as a refusal that keeps the blob for good.
            if _throttled(code.removeprefix(_KMS_CODE_PREFIX), status):
                return StorageUnavailable(
                    f"KMS is throttling the requests for the bucket's key while {what} "
                    f"({_shown(code) or 'a KMS error'}): transient, retry later, or lower the "
                    "request rate (or raise the account's KMS request quota)",
                    reason=Reason.S3_THROTTLED,
                )
            if code in _KMS_PASSING_CODES:
                return StorageUnavailable(
                    f"KMS could not use the bucket's key for the moment while {what} "
                    f"({_shown(code)}): transient, retry later",
                    reason=Reason.S3_KMS_ERROR,
                )
            return StorageUnavailable(
                f"the object store could not use the bucket's KMS key while {what} "
                f"({_shown(code) or 'a KMS error'}): "
                "check the key's state and the store's kms:Decrypt and kms:GenerateDataKey "
                "permissions on it",
                reason=Reason.S3_KMS_ERROR,
            )
        if code == _ARCHIVED_CODE:
            # A 403 too, but about the object, not the caller: said to be the credentials, an
            # operator went after keys and policies that were fine while objects sat archived.
            return StorageUnavailable(
                f"the object store refused a request while {what}: the object is archived "
                f"({_ARCHIVED_CODE}: a lifecycle rule moved it to an archive storage class; "
                "restore it, and keep the store's prefix out of such rules)",
                reason=Reason.S3_ERROR,
            )
        if code in _ACCESS_CODES or status == 403:
            return StorageUnavailable(
                f"the object store rejected the store's credentials while {what}",
                reason=Reason.S3_ACCESS_DENIED,
            )
        if code == "NoSuchBucket":
            return StorageUnavailable(
                f"the storage bucket does not exist ({what})", reason=Reason.S3_NO_SUCH_BUCKET
            )
        if _throttled(code, status):
            # Not a failing store: too many requests for the bucket (or the account). The fix is
            # the request rate or the provider's limits, not the provider's health.
            return StorageUnavailable(
                f"the object store is throttling requests while {what} ({_shown(code) or status}): "
                "retry later, or lower the request rate",
                reason=Reason.S3_THROTTLED,
            )
        if _server_failed(code, status):
            return StorageUnavailable(
                f"the object store failed while {what} (HTTP {status})",
                reason=Reason.S3_SERVER_ERROR,
            )
        return StorageUnavailable(
            f"the object store refused a request while {what}", reason=Reason.S3_ERROR
        )
    if isinstance(
        exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectTimeoutError
    ):
        log.error("S3 request timed out while %s: %s", what, _failure(exc))
        return StorageUnavailable(
            f"the object store timed out while {what}", reason=Reason.S3_TIMEOUT
        )
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ResponseStreamingError
        | botocore.exceptions.IncompleteReadError,
    ):
        log.error("S3 connection failed while %s: %s", what, _failure(exc))
        return StorageUnavailable(
            f"the object store is unreachable while {what}", reason=Reason.S3_UNREACHABLE
        )
    log.error("S3 client error while %s: %s", what, _failure(exc))
    return StorageUnavailable(f"the object store failed while {what}", reason=Reason.S3_ERROR)


_S3_FAILURES = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_missing(exc: botocore.exceptions.ClientError) -> bool:
    """True if the object asked for does not exist; never for a missing bucket (also a 404),
    which taken so made a delete NOT_FOUND and a re-wrap KEY_SLOT_CHANGED. A HEAD answer has no
    body, so its 404 cannot tell the two apart."""
    code = _code(exc)
    return code != "NoSuchBucket" and (
        code in ("NoSuchKey", "404", "NotFound") or _status(exc) == 404
    )


def _is_conflict(exc: botocore.exceptions.ClientError) -> bool:
    return _code(exc) in _CONFLICT_CODES or _status(exc) in (409, 412)


def _refused_at_once(exc: botocore.exceptions.ClientError) -> bool:
    """True if the request certainly did not take effect: a 4xx answer to its first attempt.

    A 4xx answer to a retry says nothing about an earlier attempt whose answer was lost (that
    attempt may be why a conditional retry is refused), nor does a 5xx about the request."""
    retries = int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
    return retries == 0 and 400 <= _status(exc) < 500


def _read_up_to(body: Any, size: int) -> bytes:
    """``size`` bytes of an answer's ``body``, fewer only where it ends.

    One read may return fewer bytes than asked before the end (how many depends on urllib3's
    version and the transfer coding): taken as the whole, a healthy index record was
    INDEX_CORRUPT, a healthy head HEADER_CORRUPT, as on the filesystem (``_blobs.pread_full``)."""
    data = bytearray()
    while len(data) < size and (piece := body.read(size - len(data))):
        data += piece
    return bytes(data)


def index_key_part(name: str, version: str) -> str:
    """The part of an index key after ``index/`` (its order is the (name, version) order)."""
    return f"{name}{_SEPARATOR}{version}"


def _md5(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _record_json(record: ModelRecord, blob: str) -> bytes:
    return json.dumps(
        {
            "format": _RECORD_FORMAT,
            "blob": blob,
            "name": record.name,
            "version": record.version,
            "artifact_sha256": record.artifact_sha256,
            "artifact_size": record.artifact_size,
            "plaintext_size": record.plaintext_size,
            "plaintext_sha256": record.plaintext_sha256,
            "content_type": record.content_type,
            "key_id": record.key_id,
            "key_version": record.key_version,
            "header_size": record.header_size,
            "created_at_us": to_micros(record.created_at),
            "stored_at_us": to_micros(record.stored_at),
            # Added without a new record format: a store older than it ignores the key, and a
            # record written before it (or by such a store) reads as 0, not known.
            "artifact_format": record.artifact_format,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _parse_record(
    data: bytes, name: str, version: str, unreadable: UnreadableEntries
) -> tuple[ModelRecord, str] | CorruptEntry:
    """The record and blob key of an index object, or, for one this store cannot have written
    (every field held to :func:`~strongroom.modelstore.records.stored_record`, which the
    filesystem index shares), the entry naming the model and what is wrong (logged once,
    ``unreadable``, not on every page that covers it)."""
    try:
        if len(data) > MAX_INDEX_RECORD_BYTES:
            raise ValueError(f"over {MAX_INDEX_RECORD_BYTES} bytes")
        value = jsonparse.loads(data)
        if not isinstance(value, dict) or value.get("format") != _RECORD_FORMAT:
            raise ValueError("unknown record format")
        record = stored_record(value)
        blob = value.get("blob")
        if not isinstance(blob, str) or not blob.startswith(BLOB_DIR):
            raise ValueError("blob is not a blob key")
        if (record.name, record.version) != (name, version):
            raise ValueError("name and version are not its key's")
    except ValueError as exc:
        problem = problem_text(exc)
        unreadable.report(_logged_as(name, version), problem)
        return CorruptEntry(name, version, problem)
    return record, blob


def _entry(
    data: bytes, etag: str, name: str, version: str, unreadable: UnreadableEntries
) -> _Indexed | CorruptEntry:
    """The entry of index object bytes ``data`` (read by :meth:`S3Storage._read_index`, at most
    one byte past any record's size), or the :class:`CorruptEntry` of one that does not parse."""
    parsed = _parse_record(data, name, version, unreadable)
    if isinstance(parsed, CorruptEntry):
        return parsed
    return _Indexed(*parsed, etag)


def _corrupt(entry: CorruptEntry) -> StoredDataCorrupt:
    """The answer to a read of an unreadable index record: DATA_LOSS INDEX_CORRUPT, naming it."""
    return StoredDataCorrupt(
        f"the index record of {entry.name} {entry.version} is unreadable: {entry.problem}",
        reason=Reason.INDEX_CORRUPT,
    )


def _indexed(
    data: bytes, etag: str, name: str, version: str, unreadable: UnreadableEntries
) -> _Indexed:
    """The entry of index object bytes ``data``; ``StoredDataCorrupt(INDEX_CORRUPT)`` if it is
    larger than any record or does not parse."""
    entry = _entry(data, etag, name, version, unreadable)
    if isinstance(entry, CorruptEntry):
        raise _corrupt(entry)
    return entry


def _logged_as(name: str, version: str) -> str:
    """How :class:`~strongroom.modelstore.records.UnreadableEntries` names an index record."""
    return f"index record of {name} {version}"


def _blob_of_unreadable(data: bytes) -> str | None:
    """The blob key an index object that does not parse as a record still names, if any."""
    try:
        value = jsonparse.loads(data)
    except ValueError:
        return None
    blob = value.get("blob") if isinstance(value, dict) else None
    # Any key under blobs/, as a readable record's (whose is decided by the blob's header).
    return blob if isinstance(blob, str) and blob.startswith(BLOB_DIR) else None


def _each(keys: list[tuple[str, str]], read: Callable[[tuple[str, str]], T]) -> list[T]:
    """``read`` of every key, in order; up to :data:`_LIST_WORKERS` at a time (one GET each)."""
    if len(keys) <= 1:
        return [read(k) for k in keys]
    with concurrent.futures.ThreadPoolExecutor(min(_LIST_WORKERS, len(keys))) as pool:
        return list(pool.map(read, keys))


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def _answered_total(response: dict[str, Any], offset: int, length: int, size: int) -> int | None:
    """The object's total size from the answer to a GET of ``length`` bytes at ``offset`` of an
    object recorded as ``size`` bytes, or None when the answer is the whole object of a size it
    does not state; StorageUnavailable(S3_RANGE_IGNORED) if the answer holds other bytes than
    those asked for of an object of that size (one of another size is cut short, or damaged:
    the caller's DATA_LOSS).

    An HTTP server or proxy may answer a range with the whole object (200, no Content-Range:
    RFC 9110, 14.2). That was read as a size of -1, so every download through such a server was
    DATA_LOSS "wrong size" (an operator would re-publish or delete models that were intact), and
    a 206 of another range than asked was served as if it were the one asked. The whole object
    serves a read from offset 0 (the reader stops after ``length``); any other mismatch is the
    server's failure, not the stored data's.

    A whole object sent in the chunked transfer coding has no Content-Length either (RFC 9112,
    6.1: legitimate HTTP/1.1), and its absence read as a size of -1 was DATA_LOSS too. Its size
    is then known only by reading it: None, and the reader checks that the body ends where the
    record says (:class:`S3RangeReader`).
    """
    content_range = response.get("ContentRange")
    if content_range is None:
        stated = response.get("ContentLength")
        if stated is None and offset == 0:
            return None
        whole = -1 if stated is None else int(stated)
        if offset == 0 or (stated is not None and whole != size):
            return whole
        log.error("the object store answered a ranged read with the whole object")
        raise StorageUnavailable(
            "the object store (or a proxy before it) ignored the byte range asked for",
            reason=Reason.S3_RANGE_IGNORED,
        )
    match = _CONTENT_RANGE.fullmatch(str(content_range))
    if match is not None and int(match[3]) != size:
        return int(match[3])  # the stored object's size is wrong: the caller's DATA_LOSS
    if match is None or (int(match[1]), int(match[2])) != (offset, offset + length - 1):
        log.error(
            "the object store answered range %r for bytes %d+%d", content_range, offset, length
        )
        raise StorageUnavailable(
            "the object store answered another byte range than the one asked for",
            reason=Reason.S3_RANGE_IGNORED,
        )
    return int(match[3])


class _Unknown(enum.Enum):
    UNKNOWN = enum.auto()


_UNKNOWN = _Unknown.UNKNOWN
"""What a lookup that failed (rather than found nothing) answers."""


def _key_time(rest: str) -> datetime | None:
    """The creation time a blob or probe key carries (the part after its directory:
    ``<yyyymmddThhmmssZ>-<random>``), None if it carries none."""
    try:
        return datetime.strptime(rest.split("-", 1)[0], _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def _deleted_during_rewrap(name: str, version: str) -> ModelNotFound:
    # Not KEY_SLOT_CHANGED: the rotation client reports a model deleted meanwhile as gone, not
    # as a failure (a delete during the copy of a large model is an ordinary race).
    return ModelNotFound(f"model {name} version {version} was deleted during the re-wrap")


@dataclasses.dataclass(frozen=True, slots=True)
class _KeptBlob:
    """Why a deleted record's blob is kept, not deleted with it (:meth:`S3Storage._owns_blob`)."""

    cause: str
    """The class of cause, the ``cause`` of :data:`BLOBS_KEPT` and of the log line: ``kms_key``,
    ``access_denied``, ``archived``, ``no_head``, ``refused`` (the head cannot be read),
    ``header_unparseable``, ``another_model``."""
    detail: str
    """What the log line says of it: an error code, HTTP status and operation, never the
    object store's message (it names the KMS key's ARN), or the header's problem."""


def _unreadable_head_cause(exc: botocore.exceptions.ClientError) -> str:
    """The class of a lasting refusal of a blob's head (:attr:`_KeptBlob.cause`)."""
    code, status = _code(exc), _status(exc)
    if code.startswith(_KMS_CODE_PREFIX):
        return "kms_key"
    if code == _ARCHIVED_CODE:  # a 403, but about the object, not the caller
        return "archived"
    if code in _ACCESS_CODES or status == 403:
        return "access_denied"
    if code == "InvalidRange" or status == 416:
        return "no_head"  # an empty object: no byte 0 to start a range at
    return "refused"


class _Superseded(Exception):
    """The blob looked up is gone because a re-wrap replaced it: look the model up again."""


class _NotIndexed(Exception):
    """An index write failed; ``error`` is what the caller hears.

    ``may_land``: the write's outcome is not known (it may still take effect), so the blob it
    names must not be deleted; an unreferenced blob is only wasted space (the sweep reports it),
    an index naming a deleted one is a lost model.
    """

    def __init__(self, error: StrongroomError, *, may_land: bool) -> None:
        super().__init__(error)
        self.error = error
        self.may_land = may_land


@dataclasses.dataclass(frozen=True, slots=True)
class _Indexed:
    record: ModelRecord
    blob: str
    """The blob's key relative to the prefix."""
    etag: str
    """The index object's ETag, for compare-and-swap."""


class _BlobWriter:
    """Writes one new blob: buffered into parts of a multipart upload, or one PutObject if small.

    Nothing is visible until :meth:`commit`; :meth:`abort` (idempotent) removes every trace it can.
    """

    def __init__(self, client: S3Client, bucket: str, key: str, part_size: int) -> None:
        self._client = client
        self._bucket = bucket
        self.key = key
        self._part_size = part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._size = 0
        self.committed = False
        """True once :meth:`commit` succeeded: the blob exists."""

    def write(self, data: bytes | memoryview) -> None:
        self._buffer += data
        self._size += len(data)
        while len(self._buffer) >= self._part_size:
            part = memoryview(self._buffer)[: self._part_size]
            try:
                self._send_part(part)
            finally:
                part.release()
            del self._buffer[: self._part_size]

    def _send_part(self, data: bytes | bytearray | memoryview) -> None:
        try:
            if self._upload_id is None:
                self._upload_id = self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self.key, ContentType="application/octet-stream"
                )["UploadId"]
            number = len(self._parts) + 1
            response = self._client.upload_part(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(data),
                ContentMD5=_md5(data),
            )
        except _S3_FAILURES as exc:
            raise s3_error(exc, "uploading an artifact part") from None
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def commit(self) -> None:
        """Makes the blob exist, whole, under its key (create-only)."""
        try:
            if self._upload_id is None:
                self._client.put_object(
                    Bucket=self._bucket,
                    Key=self.key,
                    Body=bytes(self._buffer),
                    ContentMD5=_md5(self._buffer),
                    ContentType="application/octet-stream",
                    IfNoneMatch="*",
                )
            else:
                if self._buffer:
                    self._send_part(self._buffer)
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                    IfNoneMatch="*",
                )
        except botocore.exceptions.ClientError as exc:
            # An earlier attempt whose answer was lost may have made the blob, so that botocore's
            # retry was refused (412 on the create-only key, or the upload already completed).
            if _refused_at_once(exc) or not self._exists_whole():
                if _is_conflict(exc):
                    # Blob keys are fresh random names: a conflict is not a lost race on a model.
                    raise Internal("a fresh blob key already exists") from None
                raise s3_error(exc, "committing an artifact") from None
        except _S3_FAILURES as exc:
            if not self._exists_whole():
                raise s3_error(exc, "committing an artifact") from None
        self.committed = True
        self._buffer = bytearray()

    def _exists_whole(self) -> bool:
        """True if the blob exists with every byte written: a commit whose answer was lost took
        effect (the key is fresh and random, so nothing else made it)."""
        try:
            response = self._client.head_object(Bucket=self._bucket, Key=self.key)
        except _S3_FAILURES:
            return False
        if int(response.get("ContentLength", -1)) != self._size:
            return False
        log.warning("a blob commit answered with an error had taken effect: %s", self.key)
        return True

    def abort(self) -> None:
        """Discards the upload (best effort; a sweep removes whatever this cannot)."""
        self._buffer = bytearray()
        if self.committed or self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self.key, UploadId=upload_id
            )
        except _S3_FAILURES as exc:
            log.warning(
                "cannot abort multipart upload of %s now (swept later): %s", self.key, _failure(exc)
            )


class S3RangeReader(Closing):
    """An open byte range of one stored artifact, streamed from one ranged GET.

    ``check_end``: the answer did not state the object's size (a whole object in the chunked
    transfer coding), so the reader checks it itself: a body that goes on past the record's size
    is DATA_LOSS (BLOB_SIZE_MISMATCH), found before the range's last piece is handed out. It is
    set when the range ends where the record does; a shorter range from the start reads no
    further than it needs.
    """

    def __init__(
        self,
        body: Any,
        record: ModelRecord,
        offset: int,
        length: int,
        *,
        check_end: bool = False,
        check_head: bool = False,
    ) -> None:
        self._body = body
        self.record = record
        self.offset = offset
        self.length = length
        self._check_end = check_end
        self._check_head = check_head

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        """Yields the range in pieces of ``chunk_size`` bytes (the last may be shorter).

        ``check_head`` (a range from the first byte that holds the head): nothing is yielded
        before the head has arrived and names the record's model (``_heads.head_checked``)."""
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if self._check_head:
            return head_checked(self.record, self._chunks(chunk_size))
        return self._chunks(chunk_size)

    def chunks_into(self, chunk_size: int, frame: Frame) -> Iterator[memoryview]:
        """:meth:`chunks`, each piece copied into ``frame(n)`` (a response body reads into no
        buffer of ours)."""
        return copied_into(self.chunks(chunk_size), frame)

    def _chunks(self, chunk_size: int) -> Iterator[bytes]:
        remaining = self.length
        while remaining > 0:
            if self._body is None:
                raise FailedPrecondition("the reader is closed", reason=Reason.READER_CLOSED)
            data = self._read(min(chunk_size, remaining))
            if not data:
                raise StoredDataCorrupt(
                    f"stored artifact {self.record.name} {self.record.version} is truncated",
                    reason=Reason.BLOB_TRUNCATED,
                )
            remaining -= len(data)
            if remaining == 0 and self._check_end and self._read(1):
                raise S3Storage._size_mismatch(self.record)
            yield data

    def _read(self, size: int) -> bytes:
        """Up to ``size`` more bytes of the body; StorageUnavailable if the connection fails."""
        try:
            data: bytes = self._body.read(size)
            return data
        except _S3_FAILURES as exc:
            raise s3_error(exc, "reading an artifact") from None
        except OSError as exc:
            log.error("S3 read failed: %s", _failure(exc))
            raise StorageUnavailable(
                "the object store connection broke while reading an artifact",
                reason=Reason.S3_UNREACHABLE,
            ) from None

    def close(self) -> None:
        """Releases the connection (idempotent)."""
        if self._body is not None:
            body, self._body = self._body, None
            try:
                body.close()
            except Exception as exc:  # closing a broken stream must not mask the real error
                log.debug("closing an S3 stream failed: %s", _failure(exc))


class S3Storage(Closing):
    """Model storage in a bucket of an S3-compatible object store (module docstring: protocol).

    Thread-safe, and safe to run in any number of processes on the same bucket and prefix: every
    decision (create, compare-and-swap) is a conditional request the bucket arbitrates. The only
    local state is the set of uploads this process is running, so that a second upload of the same
    version on the same replica fails fast with UPLOAD_IN_PROGRESS.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        *,
        prefix: str = "",
        max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE,
        part_size: int = 16 * 1024 * 1024,
        orphan_grace: timedelta = timedelta(days=1),
        clock: Callable[[], datetime] = utcnow,
        sweep: bool = True,
        check_conditional_writes: bool = True,
    ) -> None:
        if max_artifact_size <= 0 or part_size <= 0:
            raise ValueError("max_artifact_size and part_size must be positive")
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self.max_artifact_size = max_artifact_size
        self.part_size = part_size
        self.orphan_grace = orphan_grace
        self._clock = clock
        self._uploads = Uploads(max_artifact_size, self._exists)
        self._unreadable = UnreadableEntries(log)
        self._closed = False
        self.conditional_deletes = True
        """Whether deletes carry ``If-Match`` (False when the start-up check found the object
        store ignores it on DeleteObject, or does not implement it: see
        :meth:`_check_conditional_writes`)."""
        try:
            self._client.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            # A HEAD answer has no body, so no NoSuchBucket code: its 404 is the only sign.
            if _status(exc) == 404:
                log.error("S3 bucket %s does not exist", bucket)
                raise StorageUnavailable(
                    "the storage bucket does not exist (opening the storage bucket)",
                    reason=Reason.S3_NO_SUCH_BUCKET,
                ) from None
            raise s3_error(exc, "opening the storage bucket") from None
        except _S3_FAILURES as exc:
            raise s3_error(exc, "opening the storage bucket") from None
        if check_conditional_writes:
            self._check_conditional_writes()
        self.last_sweep: S3SweepReport | None = self.sweep() if sweep else None

    def _check_conditional_writes(self) -> None:
        """FailedPrecondition(S3_CONDITIONAL_WRITES_IGNORED) unless the bucket refuses a
        create-only write (``If-None-Match: *``) of an existing object and a write conditioned on
        an ETag it does not have (``If-Match``), as every model's immutability and every re-wrap's
        compare-and-swap assume; then whether it refuses a delete so conditioned, as deletes
        assume (:attr:`conditional_deletes`, a WARNING if not).

        A server that ignores either header (an older or partial S3 implementation, a gateway
        that drops them) answered every such write with success: two uploads of one version on
        two replicas both succeeded and the later silently replaced the earlier, and a re-wrap
        that raced a delete and re-publish put the old artifact back under that version. The
        deployment guide required the support; nothing checked it. One empty object under
        ``probes/`` is written and removed (a store needs PutObject and DeleteObject anyway).

        If-Match on DeleteObject came later than on PutObject (AWS: September 2025; it answered
        501 before, MinIO ignores it, other servers refuse it with 400 or 403, which a delete of
        the probe without it then tells from credentials that may not delete at all): on a
        server that answers it 501 every delete failed,
        and on one that ignores it a delete that raced a re-wrap removed the re-wrapped record
        and then the blob it had read, leaving the re-wrapped copy of the deleted model's
        artifact in the bucket (an unreferenced blob, which the store never deletes), and nothing
        said so. The probe's removal checks it first. Neither stops the start (no model can be
        lost or replaced that way, and such servers are common): the store logs a WARNING and
        deletes without the header (:attr:`conditional_deletes`).
        """
        key = f"{self._full(PROBE_DIR)}{self._clock().astimezone(UTC).strftime(_STAMP)}-" + (
            secrets.token_hex(16)
        )
        ignored: list[str] = []
        delete_failure: str | None = "was not checked"

        def not_implemented(exc: botocore.exceptions.ClientError) -> bool:
            return _code(exc) == "NotImplemented" or _status(exc) == 501

        def put(condition: dict[str, str], header: str, *, refused: bool) -> None:
            """One conditional write; ``refused``: the condition does not hold."""
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=b"", **condition)
            except botocore.exceptions.ClientError as exc:
                if not_implemented(exc):
                    ignored.append(header)  # said outright: the same for the store
                elif not refused and _is_conflict(exc) and not _refused_at_once(exc):
                    # botocore's retry of the create was refused because an earlier attempt,
                    # whose answer was lost, made the object (its key is fresh and random):
                    # the condition was honoured. Raised, a healthy store failed its start.
                    pass
                elif not (refused and (_is_conflict(exc) or _is_missing(exc))):
                    raise  # (a 404: the If-Match on an object the refused create never made)
            else:
                if refused:
                    ignored.append(header)

        def delete_refused() -> str | None:
            """A delete of the probe (which exists) on an ETag it does not have: refused (None),
            else how the server failed the condition."""
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key, IfMatch=_NO_SUCH_ETAG)
            except botocore.exceptions.ClientError as exc:
                if not_implemented(exc):
                    return "does not implement"
                if _is_conflict(exc):
                    return None
                if _status(exc) not in (400, 403) or _code(exc) == "RequestTimeTooSkewed":
                    raise
                refusal = exc
            else:
                return "ignores"
            # Some servers refuse a header they do not support with an error of their own (400
            # InvalidArgument, 403 AccessDenied), which stopped the start as S3_ERROR or as
            # rejected credentials. A delete without it tells the two apart: done, the server
            # lacks conditional deletes (the same fallback as a 501); refused too, the
            # credentials may not delete at all, which the store needs.
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except _S3_FAILURES as exc:
                raise s3_error(
                    exc,
                    "deleting the start-up probe object, with If-Match and without (the store's "
                    "credentials need s3:DeleteObject on the bucket's prefix)",
                ) from None
            return f"refuses (HTTP {_status(refusal)} {_shown(_code(refusal)) or 'no error code'})"

        try:
            put({"IfNoneMatch": "*"}, "If-None-Match on PutObject", refused=False)
            created = not ignored
            if created:
                put({"IfNoneMatch": "*"}, "If-None-Match on PutObject", refused=True)
            put({"IfMatch": _NO_SUCH_ETAG}, "If-Match on PutObject", refused=True)
            delete_failure = delete_refused() if created and not ignored else None
        except _S3_FAILURES as exc:
            raise s3_error(exc, "checking the bucket's conditional writes") from None
        finally:
            try:
                self._delete_object(key, conditional=delete_failure is None and not ignored)
            except _S3_FAILURES as exc:
                log.warning("cannot delete the probe object %s: %s", key, _failure(exc))
        if ignored:
            log.error("the object store does not honour conditional writes: %s", ", ".join(ignored))
            raise FailedPrecondition(
                f"the object store does not honour {' and '.join(ignored)}: without conditional "
                "writes two uploads of one version could both succeed (the later replacing the "
                "earlier) and a re-wrap could overwrite a newer artifact; use an object store "
                "that supports them (deploy/README.md, Why replicas are safe)",
                reason=Reason.S3_CONDITIONAL_WRITES_IGNORED,
            )
        if delete_failure is not None:
            self.conditional_deletes = False
            log.warning(
                "the object store %s If-Match on DeleteObject: deletes are sent without it, so a "
                "delete that races a re-wrap of the same model can leave the re-wrapped artifact "
                "in the bucket (reported by the sweep as an unreferenced blob once past the "
                "grace period)",
                delete_failure,
            )

    @classmethod
    def from_config(
        cls,
        config: StorageConfig,
        *,
        max_artifact_size: int = DEFAULT_MAX_ARTIFACT_SIZE,
        single_secrets: bool = False,
    ) -> S3Storage:
        """Connects to the configured bucket (checking that the credentials work) and sweeps it."""
        assert config.bucket is not None
        return cls(
            make_client(config, single_secrets=single_secrets),
            config.bucket,
            prefix=config.prefix,
            max_artifact_size=max_artifact_size,
            part_size=config.part_size,
            orphan_grace=timedelta(seconds=config.orphan_grace_seconds),
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Marks the storage closed (idempotent); the client's connections are dropped with it."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the storage is closed", reason=Reason.STORAGE_CLOSED)

    # -- keys ----------------------------------------------------------------------------------

    def _index_key(self, name: str, version: str) -> str:
        return f"{self.prefix}{INDEX_DIR}{index_key_part(name, version)}"

    def _new_blob(self) -> str:
        # The creation time in the key lets a sweep judge age without trusting server metadata.
        return f"{BLOB_DIR}{self._clock().astimezone(UTC).strftime(_STAMP)}-{secrets.token_hex(16)}"

    def _full(self, key: str) -> str:
        return f"{self.prefix}{key}"

    # -- index ---------------------------------------------------------------------------------

    def _read_index(self, name: str, version: str) -> tuple[bytes, str] | None:
        """The index object's bytes (at most one past :data:`MAX_INDEX_RECORD_BYTES`) and its
        ETag, None if there is none."""
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._index_key(name, version)
            )
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return None
            raise s3_error(exc, "reading the model index") from None
        except _S3_FAILURES as exc:
            raise s3_error(exc, "reading the model index") from None
        body = response["Body"]
        try:
            # A record is about 1 KB; whoever can write the bucket could put gigabytes here.
            data = _read_up_to(body, MAX_INDEX_RECORD_BYTES + 1)
        except _S3_FAILURES as exc:
            raise s3_error(exc, "reading the model index") from None
        finally:
            body.close()
        return data, str(response["ETag"])

    def _get_index(self, name: str, version: str) -> _Indexed | None:
        read = self._read_index(name, version)
        return None if read is None else _indexed(*read, name, version, self._unreadable)

    def _require(self, name: str, version: str) -> _Indexed:
        self._check_open()
        entry = self._get_index(validate_name(name), validate_version(version))
        if entry is None:
            raise ModelNotFound(f"model {name} version {version} does not exist")
        return entry

    def _exists(self, name: str, version: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._index_key(name, version))
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return False
            raise s3_error(exc, "reading the model index") from None
        except _S3_FAILURES as exc:
            raise s3_error(exc, "reading the model index") from None
        return True

    def _discard(self, writer: _BlobWriter, blob: str) -> None:
        """Undoes ``writer``'s blob ``blob`` at whatever stage it reached (best effort)."""
        if writer.committed:
            self._delete_blob(blob)
        else:
            writer.abort()

    def _delete_object(
        self, key: str, *, etag: str | None = None, conditional: bool | None = None
    ) -> None:
        """DeleteObject of ``key`` (a full key), with ``If-Match`` on its ETag while the bucket
        honours conditional deletes (``conditional`` None: :attr:`conditional_deletes`).

        A bucket policy may require every delete to be conditional (AWS's ``s3:if-match``
        condition key), and it denied the store's own unconditional deletes of blobs and probes
        (each left behind, logged). AWS documents ``If-Match: *`` (any ETag) on DeleteObject, but
        moto, the S3 server the tests run, compares ``*`` as an ETag and refuses it (412), so the
        object's own ETag is sent: ``etag`` when the caller has it (a listing), else read by a
        HEAD (a blob or probe is never modified, so it cannot change in between). Raises the
        client's errors; an object already gone is not one.
        """
        condition: dict[str, str] = {}
        if self.conditional_deletes if conditional is None else conditional:
            if etag is None:
                try:
                    etag = str(self._client.head_object(Bucket=self.bucket, Key=key)["ETag"])
                except botocore.exceptions.ClientError as exc:
                    if _is_missing(exc):
                        return
                    raise
            condition = {"IfMatch": etag}
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key, **condition)
        except botocore.exceptions.ClientError as exc:
            # Deleted meanwhile (a 404 to If-Match on a missing object): what was asked for.
            if not (condition and _is_missing(exc)):
                raise

    def _delete_blob(self, blob: str) -> None:
        try:
            self._delete_object(self._full(blob))
        except _S3_FAILURES as exc:
            log.warning("cannot delete blob %s now (a sweep reports it): %s", blob, _failure(exc))

    # -- uploads -------------------------------------------------------------------------------

    def put(
        self,
        chunks: Iterable[bytes | memoryview],
        validator: StructureValidator,
        claims: UploadClaims | None = None,
        *,
        authorize: Authorize | None = None,
    ) -> ModelRecord:
        """Stores the artifact streamed as ``chunks`` (see the module docstring for the protocol);
        ``authorize`` (if given) is asked about its name and version once the header names them.

        Raises InvalidArgument subclasses, ModelExists, ArtifactTooLarge or StorageUnavailable
        (with an ``S3_*`` reason); on any failure nothing becomes visible.
        """
        self._check_open()
        blob = self._new_blob()
        writer = _BlobWriter(self._client, self.bucket, self._full(blob), self.part_size)
        with self._uploads.begin(validator, claims, authorize) as upload:
            try:
                for chunk in upload.accept(chunks):
                    writer.write(chunk)
                record = upload.finish(self._clock())
                writer.commit()
                self._publish(record, blob)
            except _NotIndexed as failed:
                if not failed.may_land:
                    self._discard(writer, blob)
                raise failed.error from None
            except BaseException:
                self._discard(writer, blob)
                raise
        log.info(
            "stored model",
            extra={"model": record.name, "version": record.version, "size": record.artifact_size},
        )
        return record

    def _publish(self, record: ModelRecord, blob: str) -> None:
        """Creates the index object; the bucket's create-only condition makes (name, version) immutable.

        Raises _NotIndexed unless the index object names ``blob`` (see :meth:`_settle`).
        """
        error: StrongroomError
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._index_key(record.name, record.version),
                Body=_record_json(record, blob),
                ContentType="application/json",
                IfNoneMatch="*",
            )
            return
        except botocore.exceptions.ClientError as exc:
            if _is_conflict(exc):
                error = ModelExists(f"model {record.name} version {record.version} already exists")
            else:
                error = s3_error(exc, "publishing a model")
            if _refused_at_once(exc):
                raise _NotIndexed(error, may_land=False) from None
        except _S3_FAILURES as exc:
            error = s3_error(exc, "publishing a model")
        self._settle(record.name, record.version, blob, error, conditioned_on=None)

    def _settle(
        self,
        name: str,
        version: str,
        blob: str,
        error: StrongroomError,
        *,
        conditioned_on: str | None,
        identical: str | None = None,
    ) -> bool:
        """After an index write naming ``blob`` that failed or whose outcome is unknown: True if
        the index object names ``blob`` (the write took effect, only its answer was lost); False
        if it names an artifact whose digest is ``identical`` (the same bytes, written by another
        call: ``blob`` is redundant); else raises _NotIndexed(``error``).

        ``conditioned_on`` is the ETag the write required (If-Match), None for create-only: once
        the object is something else, the write can no longer take effect and ``blob`` may go.
        """
        try:
            current = self._get_index(name, version)
        except StrongroomError:
            raise _NotIndexed(error, may_land=True) from None
        if current is not None and current.blob == blob:
            log.warning(
                "an index write answered with an error had taken effect",
                extra={"model": name, "version": version},
            )
            return True
        if current is not None and current.record.artifact_sha256 == identical:
            return False
        if conditioned_on is None:
            may_land = current is None
        else:
            may_land = current is not None and current.etag == conditioned_on
            if current is None and isinstance(error, KeySlotRejected):
                error = _deleted_during_rewrap(name, version)
        if may_land:
            log.warning("kept blob %s of an index write that may still land (swept later)", blob)
        raise _NotIndexed(error, may_land=may_land)

    # -- key slots -----------------------------------------------------------------------------

    def replace_key_slot(
        self,
        name: str,
        version: str,
        *,
        expected_key_version: int,
        key_version: int,
        wrapped_dek: bytes,
        expected_wrapped_dek: bytes = b"",
    ) -> ModelRecord:
        """Replaces a format-2 artifact's key slot; returns the new record (rules: ``_keyslot``).

        Writes the new artifact (new head, the stored body read back and checked against the
        recorded digest) as a new blob, swaps the index object with ``If-Match`` on the ETag read
        at the start (KEY_SLOT_CHANGED if anything changed it meanwhile), then deletes the old blob.
        """
        entry, reader = self._open_current(name, version)
        record = entry.record
        with reader:
            stream = reader.chunks(_READ_BLOCK)
            old_hash = hashlib.sha256()
            head = bytearray()
            for data in stream:
                old_hash.update(data)
                head += data
                if len(head) >= record.header_size:
                    break
            rest = bytes(head[record.header_size :])
            new_head = _keyslot.plan(
                record,
                bytes(head[: record.header_size]),
                expected_key_version=expected_key_version,
                new_key_version=key_version,
                new_wrapped_dek=wrapped_dek,
                expected_wrapped_dek=expected_wrapped_dek,
            )
            if new_head is None:
                return record
            blob = self._new_blob()
            writer = _BlobWriter(self._client, self.bucket, self._full(blob), self.part_size)
            try:
                new_hash = hashlib.sha256(new_head.head)
                writer.write(new_head.head)
                new_hash.update(rest)
                writer.write(rest)
                size = len(new_head.head) + len(rest)
                for data in stream:
                    old_hash.update(data)
                    new_hash.update(data)
                    writer.write(data)
                    size += len(data)
                if old_hash.hexdigest() != record.artifact_sha256:
                    raise StoredDataCorrupt(
                        f"stored artifact {name} {version} does not match its recorded digest",
                        reason=Reason.DIGEST_MISMATCH,
                    )
                new_record = dataclasses.replace(
                    record,
                    artifact_sha256=new_hash.hexdigest(),
                    artifact_size=size,
                    key_version=key_version,
                    header_size=new_head.header_size,
                )
                writer.commit()
                if not self._swap(entry, new_record, blob):
                    self._discard(writer, blob)  # another call indexed the same artifact
            except _NotIndexed as failed:
                if not failed.may_land:
                    self._discard(writer, blob)
                raise failed.error from None
            except BaseException:
                self._discard(writer, blob)
                raise
        self._delete_blob(entry.blob)
        _keyslot.log_replaced(log, name, version, record, key_version)
        return new_record

    def _swap(self, old: _Indexed, new: ModelRecord, blob: str) -> bool:
        """Points the index object at ``blob`` if it is still ``old`` (If-Match on its ETag).

        True if it now names ``blob``; False if another call made the same replacement meanwhile
        (the same artifact under another blob: a concurrent rotation run; ``blob`` is redundant).
        Raises _NotIndexed otherwise (see :meth:`_settle`).
        """
        error: StrongroomError
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._index_key(new.name, new.version),
                Body=_record_json(new, blob),
                ContentType="application/json",
                IfMatch=old.etag,
            )
            return True
        except botocore.exceptions.ClientError as exc:
            if _is_conflict(exc) or _is_missing(exc):
                error = KeySlotRejected(
                    f"model {new.name} {new.version} changed during the re-wrap",
                    reason=Reason.KEY_SLOT_CHANGED,
                )
            elif _refused_at_once(exc):
                raise _NotIndexed(s3_error(exc, "replacing a key slot"), may_land=False) from None
            else:
                error = s3_error(exc, "replacing a key slot")
        except _S3_FAILURES as exc:
            error = s3_error(exc, "replacing a key slot")
        # A refused swap is read again too: the model may be gone (NOT_FOUND), or hold the very
        # artifact this call was writing (another run's identical re-wrap: done, not refused).
        return self._settle(
            new.name,
            new.version,
            blob,
            error,
            conditioned_on=old.etag,
            identical=new.artifact_sha256,
        )

    # -- deletes -------------------------------------------------------------------------------

    def _owns_blob(self, blob: str, name: str, version: str, header_size: int) -> bool | _KeptBlob:
        """Whether ``blob`` (the blob key an index entry of ``name`` ``version`` names, whose
        head is ``header_size`` bytes) is its model's own, so that deleting the model may
        delete it.

        An index object names its blob by key, and whoever can write the bucket can point one at
        another model's blob: deleting (or re-wrapping) the edited model then deleted that other
        model's artifact. The blob's own header names its model, which the upload checked and
        recorded, so the binding is read there (one ranged GET of the head). True: the header
        names this model. False: the blob is gone (nothing to delete or keep). A
        :class:`_KeptBlob`: it cannot be told (its head cannot be read or does not parse), or it
        names another model: the blob is kept, as a crash's leftover is (the sweep reports it,
        or it is that other model's own), and the record is deleted. Refusing the delete of a
        record naming another model's blob (BLOB_OF_ANOTHER_MODEL) left it with no way out: a
        plain delete refused, a corrupt-entry delete refused a readable record, so only an edit
        of the bucket removed it, where the filesystem backend deletes such a row and keeps the
        blob another row names. Nothing is logged here: the record may yet not be deleted (it
        changed meanwhile), so :meth:`_delete_owned_blob` says what was kept, once, after.
        """
        # A head is at most a prefix, a 64 KiB header and a 2 KiB slot.
        size = min(header_size, MAX_HEAD_SIZE)
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._full(blob), Range=f"bytes=0-{size - 1}"
            )
            body = response["Body"]
            try:
                head = _read_up_to(body, size)  # a server may ignore the range, send everything
            finally:
                body.close()
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return False
            if _code(exc) == "NoSuchBucket" or _passing(exc):
                raise s3_error(exc, "reading an artifact's header") from None
            # The head will not come until someone acts: the object holds none to read (an
            # empty blob answers a range from byte 0 with 416, an archived one
            # InvalidObjectState), or its KMS key refuses it (disabled, pending deletion, no
            # kms:Decrypt). Raised, the delete failed (a KMS key disabled after a compromise kept
            # every model it protects from being deleted until it was enabled again); the record
            # is the truth, so it is deleted, and the blob, whose owner cannot be told, is kept
            # (a later start's sweep reports it; README, Operating it). A failure a retry may not
            # meet (5xx, throttling) fails the delete instead, above.
            return _KeptBlob(
                _unreadable_head_cause(exc), f"its head cannot be read: {_failure(exc)}"
            )
        except (*_S3_FAILURES, OSError) as exc:
            # Nothing is deleted yet, so the delete fails and its retry deletes both. Taken as a
            # refusal that lasts, one 503 (or a dropped connection) deleted the record and kept
            # the blob, which no retry could find again: ciphertext left for good.
            raise s3_error(exc, "reading an artifact's header") from None
        try:
            header = parse_header(head)
        except InvalidArtifact as exc:
            return _KeptBlob("header_unparseable", f"its header does not parse ({exc.reason})")
        if (header.model_name, header.model_version) != (name, version):
            return _KeptBlob(
                "another_model",
                f"it is an artifact of {header.model_name} {header.model_version} (the index "
                "record named another model's blob)",
            )
        return True

    def _delete_owned_blob(
        self, blob: str | None, name: str, version: str, owned: bool | _KeptBlob
    ) -> None:
        """After the record of ``name`` ``version`` was deleted: deletes its blob if
        :meth:`_owns_blob` said it is its own; else says, once, that it was kept and why
        (WARNING, or ERROR for another model's blob, and :data:`BLOBS_KEPT` by cause).

        A blob kept is referenced by no record from then on (unless it is another model's), so a
        start's sweep reports it as unreferenced only once past ``orphan_grace``: a day, by
        default, in which nothing said that a delete had left a whole artifact behind."""
        if blob is None or owned is False:
            return
        if owned is True:
            self._delete_blob(blob)
            return
        BLOBS_KEPT.add(1, {"cause": owned.cause})
        log.log(
            logging.ERROR if owned.cause == "another_model" else logging.WARNING,
            "blob %s%s of deleted model %s %s kept (%s): %s; %s",
            self.prefix,
            blob,
            name,
            version,
            owned.cause,
            owned.detail,
            "it stays that model's"
            if owned.cause == "another_model"
            else "no record names it now: a start's sweep reports it as unreferenced once past "
            "orphan_grace; delete it by hand once accounted for (README, Operating it)",
            extra={"model": name, "version": version, "blob": blob, "cause": owned.cause},
        )

    def delete(self, name: str, version: str) -> None:
        """Removes the model, then its blob; ModelNotFound if absent.

        The index object is deleted with ``If-Match`` on the ETag just read, so the blob deleted
        next is the one the deleted record named (unless the object store does not honour it:
        :attr:`conditional_deletes`). A record changed in between by another replica
        (a re-wrap, or a delete and re-publish) is read again and the delete retried: the call
        removes the version as it then is, like the filesystem backend's atomic delete, and
        never answers NOT_FOUND for a version still stored. A blob left by a crash between the two
        deletes is swept.

        A record that does not parse (INDEX_CORRUPT) is deleted too, as the filesystem backend
        deletes such a row: it is how an operator gets rid of it (before, every delete of it
        answered INDEX_CORRUPT, so only an edit of the bucket could). The blob it still names is
        deleted only if that blob's header names this model; else it is kept (the sweep reports
        it).
        """
        self._check_open()
        validate_name(name)
        validate_version(version)
        for _ in range(_OPEN_ATTEMPTS):
            read = self._read_index(name, version)
            if read is None:
                raise ModelNotFound(f"model {name} version {version} does not exist")
            data, etag = read
            blob: str | None
            try:
                entry = _indexed(data, etag, name, version, self._unreadable)
            except StoredDataCorrupt:  # logged; deleted all the same
                blob, header_size = _blob_of_unreadable(data), MAX_HEAD_SIZE
            else:
                blob, header_size = entry.blob, entry.record.header_size
            owned = blob is not None and self._owns_blob(blob, name, version, header_size)
            try:
                # Without If-Match (a server that does not implement it answers 501 to every
                # delete), the record deleted may be one changed since it was read.
                condition = {"IfMatch": etag} if self.conditional_deletes else {}
                self._client.delete_object(
                    Bucket=self.bucket, Key=self._index_key(name, version), **condition
                )
            except botocore.exceptions.ClientError as exc:
                if _is_conflict(exc):
                    continue  # changed since it was read: read it again
                if _is_missing(exc):
                    if _refused_at_once(exc):
                        # Another delete removed the record meanwhile, and says what it kept: said
                        # here too, one blob was two WARNINGs and counted twice in BLOBS_KEPT.
                        # An owned blob is deleted all the same (blobs are never shared).
                        if blob is not None and owned is True:
                            self._delete_blob(blob)
                        raise ModelNotFound(
                            f"model {name} version {version} was deleted meanwhile"
                        ) from None
                    self._delete_owned_blob(blob, name, version, owned)
                    # Only a retry found it gone: an earlier attempt whose answer was lost (a
                    # dropped connection, a 503 after the fact) deleted it. That is this call's
                    # delete, not a NOT_FOUND.
                    self._unreadable.forget(_logged_as(name, version))
                    log.info("deleted model", extra={"model": name, "version": version})
                    return
                raise s3_error(exc, "deleting a model") from None
            except _S3_FAILURES as exc:
                raise s3_error(exc, "deleting a model") from None
            self._delete_owned_blob(blob, name, version, owned)
            self._unreadable.forget(_logged_as(name, version))
            log.info("deleted model", extra={"model": name, "version": version})
            return
        raise StorageUnavailable(
            f"model {name} {version} changed each of the {_OPEN_ATTEMPTS} times it was deleted; "
            "it is still stored: retry",
            reason=Reason.KEY_SLOT_CHANGED,
        )

    def delete_corrupt(self, listed_name: str, listed_version: str) -> str:
        """Removes the index record a listing names as corrupt ``listed_name``
        ``listed_version`` (If-Match on the ETag read); its blob is kept (the sweep reports it).
        Returns what it held (the object's bytes, bounded) for the caller's log.

        Every record a listing names here is under a key in the name grammar (keys outside it
        are no record of this store, and skipped), so a name outside it is ModelNotFound."""
        self._check_open()
        try:
            name, version = validate_name(listed_name), validate_version(listed_version)
        except InvalidArgument:
            raise ModelNotFound(
                f"no index record is listed as {listed_name[:256]!r} {listed_version[:256]!r}"
            ) from None
        read = self._read_index(name, version)
        if read is None:
            raise ModelNotFound(f"model {name} version {version} does not exist")
        data, etag = read
        if not isinstance(_parse_record(data, name, version, self._unreadable), CorruptEntry):
            raise FailedPrecondition(
                f"the index record of {name} {version} is readable: delete the model without "
                "corrupt_entry (strongroom model rm without --corrupt)",
                reason=Reason.INDEX_ENTRY_NOT_CORRUPT,
            )
        try:
            self._delete_object(self._index_key(name, version), etag=etag)
        except botocore.exceptions.ClientError as exc:
            if _is_conflict(exc):
                raise StorageUnavailable(
                    f"the index record of {name} {version} changed while it was deleted: retry",
                    reason=Reason.KEY_SLOT_CHANGED,
                ) from None
            raise s3_error(exc, "deleting an index record") from None
        except _S3_FAILURES as exc:
            raise s3_error(exc, "deleting an index record") from None
        self._unreadable.forget(_logged_as(name, version))
        return held_text(data)

    # -- reads ---------------------------------------------------------------------------------

    def stat(self, name: str, version: str) -> ModelRecord:
        """The model's record; ModelNotFound if absent."""
        return self._require(name, version).record

    def _open_blob(
        self, entry: _Indexed, offset: int, length: int, *, check_head: bool = True
    ) -> S3RangeReader:
        """A reader of ``length`` bytes from ``offset`` of ``entry``'s blob; unless not
        ``check_head`` (a caller that checks it itself), one whose head does not name the
        entry's model (``_heads.stored_header``) is refused before a byte is handed out."""
        record = entry.record
        total: int | None
        try:
            if length == 0:
                response = self._client.head_object(Bucket=self.bucket, Key=self._full(entry.blob))
                # A HEAD answer may leave the size out (RFC 9110, 9.3.2: a server that streams
                # its GETs chunked need not know it); read as response["ContentLength"], that was
                # a KeyError, INTERNAL. The blob is there and none of it is served: nothing to
                # check (None), as for a chunked 200 that ends nowhere near the range.
                stated = response.get("ContentLength")
                total = None if stated is None else int(stated)
                body = None
            else:
                response = self._client.get_object(
                    Bucket=self.bucket,
                    Key=self._full(entry.blob),
                    Range=f"bytes={offset}-{offset + length - 1}",
                )
                body = response["Body"]
                try:
                    total = _answered_total(response, offset, length, record.artifact_size)
                except StorageUnavailable:
                    body.close()
                    raise
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "InvalidRange" or _status(exc) == 416:
                raise self._size_mismatch(record) from None
            if _is_missing(exc):
                raise self._blob_gone(entry) from None
            raise s3_error(exc, "opening an artifact") from None
        except _S3_FAILURES as exc:
            raise s3_error(exc, "opening an artifact") from None
        # A range that holds the head is checked from its own bytes as they stream (no read of
        # its own); any other range with bytes to serve reads the head apart first.
        covers_head = check_head and offset == 0 and length >= record.header_size
        if total is None:  # size unstated (chunked 200, sizeless HEAD): the reader checks its end
            end = offset + length == record.artifact_size
            reader = S3RangeReader(
                body, record, offset, length, check_end=end, check_head=covers_head
            )
        else:
            reader = S3RangeReader(body, record, offset, length, check_head=covers_head)
            if total != record.artifact_size:
                reader.close()
                raise self._size_mismatch(record)
        if check_head and length and not covers_head:
            try:
                self._check_head_apart(entry, response.get("ETag"))
            except BaseException:
                reader.close()
                raise
        return reader

    def _check_head_apart(self, entry: _Indexed, etag: str | None) -> None:
        """Reads the head of ``entry``'s blob (one ranged GET) and checks that it names the
        entry's model (``_heads.stored_header``): for a read whose range does not hold it.

        ``etag`` is the ETag of the object the range's own GET is reading: the head is read from
        that object only (``If-Match``, and its answer's ETag compared, for a server that ignores
        the condition). Two GETs are two reads of whatever the key holds at each moment: a blob
        overwritten between them (by whoever can write the bucket: another model's artifact for
        the range, this model's back for the head) passed the check while the range streamed the
        other model's bytes. A store never rewrites a blob key, so a changed object is DATA_LOSS
        BLOB_REPLACED, nothing served."""
        record = entry.record
        condition = {} if etag is None else {"IfMatch": etag}
        try:
            response = self._client.get_object(
                Bucket=self.bucket,
                Key=self._full(entry.blob),
                Range=f"bytes=0-{record.header_size - 1}",
                **condition,
            )
            body = response["Body"]
            try:
                head = _read_up_to(body, record.header_size)  # a server may ignore the range
            finally:
                body.close()
        except botocore.exceptions.ClientError as exc:
            if _is_conflict(exc):
                raise self._replaced(entry) from None
            if _is_missing(exc):
                # A re-wrap deletes the old blob once the index names the new one: between the
                # range's GET and this one it is followed, as between the lookup and the GET.
                raise self._blob_gone(entry) from None
            raise s3_error(exc, "reading an artifact's header") from None
        except (*_S3_FAILURES, OSError) as exc:
            raise s3_error(exc, "reading an artifact's header") from None
        if etag is not None and response.get("ETag") not in (None, etag):
            raise self._replaced(entry)
        stored_header(record, head)

    def _blob_gone(self, entry: _Indexed) -> ModelNotFound | StoredDataCorrupt | _Superseded:
        """What a read of ``entry``'s blob that found it gone means, from the index read again:
        the model deleted (ModelNotFound) or re-wrapped (_Superseded: read it again) since its
        entry was read, neither data loss; else the blob is missing (DATA_LOSS BLOB_MISSING)."""
        record = entry.record
        current = self._get_index(record.name, record.version)
        if current is None:
            return ModelNotFound(f"model {record.name} version {record.version} does not exist")
        if current.blob != entry.blob:
            return _Superseded()
        log.error("blob %s of %s %s is missing", entry.blob, record.name, record.version)
        return StoredDataCorrupt(
            f"stored artifact {record.name} {record.version} is missing",
            reason=Reason.BLOB_MISSING,
        )

    @staticmethod
    def _replaced(entry: _Indexed) -> StoredDataCorrupt:
        record = entry.record
        log.error(
            "blob %s of %s %s changed while it was read: not served",
            entry.blob,
            record.name,
            record.version,
        )
        return StoredDataCorrupt(
            f"stored artifact {record.name} {record.version} changed while it was read "
            "(a blob is never rewritten): nothing was served",
            reason=Reason.BLOB_REPLACED,
        )

    @staticmethod
    def _size_mismatch(record: ModelRecord) -> StoredDataCorrupt:
        log.error("blob of %s %s has the wrong size", record.name, record.version)
        return StoredDataCorrupt(
            f"stored artifact {record.name} {record.version} has the wrong size",
            reason=Reason.BLOB_SIZE_MISMATCH,
        )

    def open(
        self, name: str, version: str, *, offset: int = 0, length: int | None = None
    ) -> S3RangeReader:
        """Opens ``length`` bytes (None: to the end) from ``offset``: one ranged GET.

        OutOfRange if the range ends past the artifact; StoredDataCorrupt if the blob is missing or
        has the wrong size. The GET starts here, so a reader keeps its bytes if the model is deleted
        while it streams.
        """
        _ranges.check_bounds(offset, length)
        return self._open_current(name, version, offset, length)[1]

    def _open_current(
        self,
        name: str,
        version: str,
        offset: int = 0,
        length: int | None = None,
        *,
        check_head: bool = True,
    ) -> tuple[_Indexed, S3RangeReader]:
        """The model's index entry and a reader of ``length`` bytes (None: to the end) from
        ``offset`` of its blob. A re-wrap that replaced the blob between the lookup and the GET
        is followed to the new blob; the model being gone is ModelNotFound."""
        for _ in range(_OPEN_ATTEMPTS):
            entry = self._require(name, version)
            size = _ranges.range_length(offset, length, entry.record.artifact_size)
            try:
                return entry, self._open_blob(entry, offset, size, check_head=check_head)
            except _Superseded:
                continue
        raise StorageUnavailable(
            f"model {name} {version} was re-wrapped again each of the {_OPEN_ATTEMPTS} times it "
            "was opened; retry",
            reason=Reason.KEY_SLOT_CHANGED,
        )

    def verify(self, name: str, version: str) -> ModelRecord:
        """Recomputes the stored artifact's SHA-256; StoredDataCorrupt (DATA_LOSS) on any mismatch."""
        # The head is kept as it streams and checked once the bytes are known to be the
        # recorded ones: an edited record naming another model's blob, with its digest and
        # size, verified (damaged bytes stay DIGEST_MISMATCH).
        entry, reader = self._open_current(name, version, check_head=False)
        record = entry.record
        hasher = hashlib.sha256()
        head = bytearray()
        size = 0
        with reader:
            for data in reader.chunks(_READ_BLOCK):
                hasher.update(data)
                if len(head) < record.header_size:
                    head += data[: record.header_size - len(head)]
                size += len(data)
        if size != record.artifact_size or hasher.hexdigest() != record.artifact_sha256:
            log.error("blob %s of %s %s fails verification", entry.blob, name, version)
            raise StoredDataCorrupt(
                f"stored artifact {name} {version} does not match its recorded digest",
                reason=Reason.DIGEST_MISMATCH,
            )
        stored_header(record, head)
        return record

    # -- listings ------------------------------------------------------------------------------

    def _list_keys(
        self, prefix: str, start_after: str | None, limit: int | None
    ) -> Iterator[dict[str, Any]]:
        """Objects under ``prefix`` (full keys), in key order, after ``start_after``."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        produced = 0
        while True:
            if limit is not None:
                kwargs["MaxKeys"] = min(1000, limit - produced)
            try:
                response = self._client.list_objects_v2(**kwargs)
            except _S3_FAILURES as exc:
                raise s3_error(exc, "listing the bucket") from None
            for item in response.get("Contents", ()):
                yield item
                produced += 1
            if not response.get("IsTruncated") or (limit is not None and produced >= limit):
                return
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = response["NextContinuationToken"]

    def _split_index_key(self, key: str) -> tuple[str, str] | None:
        """The (name, version) an index key names, or None for a key that is no record of this
        store: no separator (a "folder" an S3 console made), or a name or version outside the
        grammar (``index/acme/m!old/``, ``index/acme/m b!1``), which no call of this store can
        write or look up. Read as records, the first failed every listing that met it with
        DATA_LOSS, and the second was listed under a name clients refuse, with a page token
        naming it that the next page refused (INVALID_PAGE_TOKEN): either stopped the rotation
        client's walk, and ``keys disable``'s check, at that key."""
        rest = key[len(self.prefix) + len(INDEX_DIR) :]
        name, sep, version = rest.rpartition(_SEPARATOR)
        if not sep:
            return None
        try:
            return validate_name(name), validate_version(version)
        except InvalidArgument:
            return None

    def _listed_entries(self, keys: list[tuple[str, str]]) -> list[ModelRecord | CorruptEntry]:
        """The record of each key that still has one, or the :class:`CorruptEntry` of one that
        does not parse (it failed the whole page: one edited record stopped every walk of the
        store at it), in key order."""

        def read(key: tuple[str, str]) -> ModelRecord | CorruptEntry | None:
            found = self._read_index(*key)
            if found is None:
                return None
            entry = _entry(*found, *key, self._unreadable)
            return entry if isinstance(entry, CorruptEntry) else entry.record

        return [e for e in _each(keys, read) if e is not None]

    def _fetch_records(self, keys: list[tuple[str, str]]) -> list[_Indexed | None]:
        return _each(keys, lambda k: self._get_index(*k))

    def _index_keys(self) -> list[tuple[str, str]]:
        return [
            split
            for item in self._list_keys(f"{self.prefix}{INDEX_DIR}", None, None)
            if (split := self._split_index_key(str(item["Key"]))) is not None
        ]

    def _all_entries(self) -> list[_Indexed]:
        return [e for e in self._fetch_records(self._index_keys()) if e is not None]

    def _readable_entries(self) -> tuple[list[_Indexed], list[tuple[str, str]]]:
        """Every record that parses, and the (name, version) of those that do not."""

        def read(key: tuple[str, str]) -> _Indexed | StoredDataCorrupt | None:
            try:
                return self._get_index(*key)
            except StoredDataCorrupt as exc:
                return exc

        keys = self._index_keys()
        found = _each(keys, read)
        readable = [e for e in found if isinstance(e, _Indexed)]
        unreadable = [
            k for k, e in zip(keys, found, strict=True) if isinstance(e, StoredDataCorrupt)
        ]
        return readable, unreadable

    def records(self) -> tuple[ModelRecord, ...]:
        """Every stored record, in (name, version) order (for checks and tests; unpaginated)."""
        self._check_open()
        return tuple(e.record for e in self._all_entries())

    def blob_sizes(self) -> dict[str, int]:
        """Every blob present (key relative to the prefix) and its size (for checks and tests)."""
        self._check_open()
        return {
            str(item["Key"])[len(self.prefix) :]: int(item["Size"])
            for item in self._list_keys(f"{self.prefix}{BLOB_DIR}", None, None)
        }

    def referenced_blobs(self) -> dict[str, ModelRecord]:
        """Blob key (relative to the prefix) → the record pointing at it (for checks and tests)."""
        self._check_open()
        return {e.blob: e.record for e in self._all_entries()}

    def pending_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every unfinished multipart upload under the prefix."""
        found: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.prefix}{BLOB_DIR}"}
        for _ in range(100_000):
            try:
                response = self._client.list_multipart_uploads(**kwargs)
            except _S3_FAILURES as exc:
                raise s3_error(exc, "listing unfinished uploads") from None
            found += [(str(u["Key"]), str(u["UploadId"])) for u in response.get("Uploads", ())]
            if not response.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = response["NextKeyMarker"]
            kwargs["UploadIdMarker"] = response["NextUploadIdMarker"]
        return found

    def _blob_time(self, blob: str) -> datetime | None:
        return _key_time(blob[len(BLOB_DIR) :])

    def _remove_old_probes(self, now: datetime) -> int:
        """Deletes the start-up check's probe objects older than :data:`PROBE_MAX_AGE`; returns
        how many. Each start writes one and removes it; a start killed in between (or whose
        delete failed, logged) left it, and nothing else ever removed it. Keys under ``probes/``
        that this store does not make are left alone."""
        directory = self._full(PROBE_DIR)
        removed = 0
        for item in self._list_keys(directory, None, None):
            key = str(item["Key"])
            name = key[len(directory) :]
            born = _key_time(name) if _PROBE_NAME.fullmatch(name) else None
            if born is None or now - born <= PROBE_MAX_AGE:
                continue
            try:
                self._delete_object(key, etag=str(item["ETag"]) if item.get("ETag") else None)
            except _S3_FAILURES as exc:
                log.warning("cannot delete the old probe object %s: %s", key, _failure(exc))
                continue
            removed += 1
        if removed:
            log.info("removed probe objects left by interrupted starts", extra={"probes": removed})
        return removed

    def _expired(self, blob: str, now: datetime) -> bool:
        born = self._blob_time(blob)
        return born is not None and now - born > self.orphan_grace

    def sweep(self) -> S3SweepReport:
        """Aborts the multipart uploads crashes left, once older than the grace period; reports
        (and logs) the blobs no record names, and the records whose blob is missing or damaged;
        deletes the probe objects killed starts left (:meth:`_remove_old_probes`).

        Any replica may run it at any time: an upload is aborted only if its key says it was
        created more than ``orphan_grace`` ago (so one still running on another replica goes on).
        No blob is deleted: an unreferenced one may be a model whose index object was lost or
        rolled back, and deleting it would lose that model (see the module docstring).
        """
        now = self._clock()
        blobs = self.blob_sizes()  # listed before the index: a blob published meanwhile is young
        # One unreadable record (anyone who can write the bucket can put one) must not stop the
        # store from starting.
        entries, unreadable = self._readable_entries()
        referenced = {e.blob: e.record for e in entries}
        aborted = 0
        for key, upload_id in self.pending_uploads():
            if self._expired(key[len(self.prefix) :], now):
                try:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                    aborted += 1
                except _S3_FAILURES as exc:
                    log.warning("cannot abort upload %s: %s", key, _failure(exc))
        # A record read after the blob listing may name a blob made since (an upload, or a
        # re-wrap, on another replica meanwhile): each such blob is looked up on its own before
        # its model is called missing. Reported from the listing alone, every start during an
        # upload or a rotation run logged a model as lost that was not.
        # A lookup that failed (throttled, a 5xx after botocore's retries) says nothing: such a
        # model was reported missing, a lost model, on one transient answer at start.
        unchecked: set[str] = set()
        for blob in referenced.keys() - blobs.keys():
            size = self._blob_size(blob)
            if size is _UNKNOWN:
                unchecked.add(blob)
            elif size is not None:
                blobs[blob] = size
        orphans = sorted(b for b in blobs.keys() - referenced.keys() if self._expired(b, now))
        for blob in orphans:
            log.warning(
                "blob %s%s (%d bytes) is referenced by no index record: left in place, not "
                "served (a crash's leftover, a model whose index object was lost, or a deleted "
                "model's blob its delete kept, logged then with its cause)",
                self.prefix,
                blob,
                blobs[blob],
            )
        missing = sorted(
            (r.name, r.version)
            for b, r in referenced.items()
            if b not in blobs and b not in unchecked
        )
        damaged = sorted(
            (r.name, r.version)
            for b, r in referenced.items()
            if b in blobs and blobs[b] != r.artifact_size
        )
        formats = sum(
            self._record_format(e)
            for e in entries
            if e.record.artifact_format == 0 and blobs.get(e.blob) == e.record.artifact_size
        )
        report = S3SweepReport(
            aborted,
            tuple(orphans),
            tuple(missing),
            tuple(damaged),
            tuple(unreadable),
            formats_recorded=formats,
            probes_removed=self._remove_old_probes(now),
            unchecked_blobs=tuple(
                sorted((r.name, r.version) for b, r in referenced.items() if b in unchecked)
            ),
        )
        if missing or damaged or unreadable:
            log.error("storage sweep found damaged models: %s", report)
        return report

    def _blob_size(self, blob: str) -> int | _Unknown | None:
        """The size of ``blob`` (key relative to the prefix), None if it does not exist,
        :data:`_UNKNOWN` if it cannot be looked up (logged)."""
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self._full(blob))
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return None
            log.warning("cannot look up blob %s: %s", blob, _failure(exc))
            return _UNKNOWN
        except _S3_FAILURES as exc:
            log.warning("cannot look up blob %s: %s", blob, _failure(exc))
            return _UNKNOWN
        stated = response.get("ContentLength")
        if stated is None:
            # A HEAD answer may leave the size out (RFC 9110, 9.3.2): the blob is there, its size
            # unknown, so the model is neither missing nor known intact (a KeyError here stopped
            # the store's start).
            log.warning("cannot look up blob %s: the object store did not state its size", blob)
            return _UNKNOWN
        return int(stated)

    def _record_format(self, entry: _Indexed) -> bool:
        """Rewrites a record written before records carried ``artifact_format`` with the format
        its blob's header names (If-Match on the record read, so a record changed meanwhile, by a
        re-wrap or another replica's sweep, is left alone); False, logged, if that fails."""
        record = entry.record
        where = f"{record.name} {record.version}"
        try:
            response = self._client.get_object(
                Bucket=self.bucket,
                Key=self._full(entry.blob),
                Range=f"bytes=0-{record.header_size - 1}",
            )
            body = response["Body"]
            try:
                head = _read_up_to(body, record.header_size)
            finally:
                body.close()
            header = parse_header(head)
            if header.header_size != record.header_size:
                raise ValueError("the header disagrees with its record")
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._index_key(record.name, record.version),
                Body=_record_json(
                    dataclasses.replace(record, artifact_format=header.format_version), entry.blob
                ),
                ContentType="application/json",
                IfMatch=entry.etag,
            )
        except (*_S3_FAILURES, InvalidArtifact, ValueError) as exc:
            log.warning("cannot record the artifact format of %s: %s", where, _failure(exc))
            return False
        return True

    # Last in the class: below this definition, ``list`` in an annotation would mean this method.
    def list(
        self, *, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> ModelPage:
        """One page of models whose name starts with ``prefix``, ordered by (name, version).

        One ListObjectsV2 (the bucket's key order is the API's order) plus one GET per record,
        eight at a time. A model deleted between the two is left out of the page; a record that
        does not parse is in the page's ``corrupt``, not its models (reads of it stay DATA_LOSS).
        """
        self._check_open()
        # Every key this backend lists is in the grammar (_split_index_key), so is every token's.
        after = _pagetoken.start(prefix, page_size, page_token, grammar=True)
        start = self._index_key(*after) if after else None
        keys: list[tuple[str, str]] = []
        # page_size + 1 records tell whether another page follows. Objects under index/ that are
        # no record (a "folder" an S3 console made) are skipped, so they must not count: a page
        # that met one looked short and was answered as the last one, hiding every later model
        # (from the rotation client and the disable check too). Ask again after the last key seen
        # until enough records are found or the bucket has no more keys.
        while len(keys) <= page_size:
            wanted = page_size + 1 - len(keys)
            items = list(self._list_keys(f"{self.prefix}{INDEX_DIR}{prefix}", start, wanted))
            for item in items:
                split = self._split_index_key(str(item["Key"]))
                if split is not None:
                    keys.append(split)
            if len(items) < wanted:
                break
            start = str(items[-1]["Key"])
        more = len(keys) > page_size
        keys = keys[:page_size]
        entries = self._listed_entries(keys)
        page = _pagetoken.page_of(prefix, entries, more=more)
        if more:  # the token names the last key, even if its record was deleted meanwhile
            return dataclasses.replace(page, next_page_token=_pagetoken.encode(prefix, *keys[-1]))
        return page
