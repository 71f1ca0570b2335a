"""Durable storage of model artifacts: the backend interface and the embedded filesystem backend.

:class:`Storage` is what the gRPC servicer needs; :class:`FilesystemStorage` implements it on a
local directory (one process), :class:`S3Storage` in a bucket of an S3-compatible object store
(any number of replicas; see ``_s3`` for the protocol); :func:`open_storage` picks one from the
configuration.
Every implementation must guarantee:

* an upload becomes visible all at once, after its bytes, size and digest are checked, or never;
* (name, version) is immutable: a second put fails with ModelExists, and of concurrent puts of one
  version exactly one wins;
* reads return exactly the bytes that were checked at upload (or, after a key-slot replacement,
  those bytes with only the slot changed), or fail with DATA_LOSS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Protocol, Self

from strongroom.artifact import StructureValidator
from strongroom.modelstore._filesystem import FileRangeReader, FilesystemStorage, SweepReport
from strongroom.modelstore._ranges import Frame
from strongroom.modelstore._s3 import S3RangeReader, S3Storage, S3SweepReport
from strongroom.modelstore._upload import Authorize
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.modelstore.errors import ModelNotFound, StoredDataCorrupt
from strongroom.modelstore.limits import DEFAULT_MAX_ARTIFACT_SIZE, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from strongroom.modelstore.records import CorruptEntry, ModelPage, ModelRecord, UploadClaims
from strongroom.reasons import Reason

__all__ = [
    "DEFAULT_MAX_ARTIFACT_SIZE",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "CorruptEntry",
    "FileRangeReader",
    "FilesystemStorage",
    "IntegrityProblem",
    "ModelPage",
    "ModelRecord",
    "RangeReader",
    "S3RangeReader",
    "S3Storage",
    "S3SweepReport",
    "Storage",
    "SweepReport",
    "UploadClaims",
    "open_storage",
    "verify_all",
]


class RangeReader(Protocol):
    """An open byte range of one stored artifact."""

    @property
    def record(self) -> ModelRecord:
        """The artifact's record, as of the open."""
        ...

    @property
    def offset(self) -> int:
        """First byte of the range."""
        ...

    @property
    def length(self) -> int:
        """Number of bytes in the range (0 for an empty range at the end)."""
        ...

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        """Yields the range in order, ``chunk_size`` bytes at a time (the last may be shorter).

        Raises StoredDataCorrupt if the stored bytes turn out shorter than recorded.
        """
        ...

    def chunks_into(self, chunk_size: int, frame: Frame) -> Iterator[memoryview]:
        """:meth:`chunks`, each piece of ``n`` bytes read into ``frame(n)`` (a writable view the
        caller made, inside the message that will carry it) and that view yielded: a download's
        message is built with one copy of its data where the backend can read into it."""
        ...

    def close(self) -> None:
        """Releases the underlying resources (idempotent)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Storage(Protocol):
    """A durable, immutable store of validated artifacts keyed by (name, version). Thread-safe."""

    max_artifact_size: int
    """The largest artifact accepted, in bytes."""

    def put(
        self,
        chunks: Iterable[bytes | memoryview],
        validator: StructureValidator,
        claims: UploadClaims | None = None,
        *,
        authorize: Authorize | None = None,
    ) -> ModelRecord:
        """Stores the artifact streamed as ``chunks``, every byte of which is fed to ``validator``.

        ``authorize`` (None: any name) is called with the header's name and version as soon as the
        validator has parsed them, before the version is reserved and the body received; what it
        raises (PermissionDenied) ends the upload with nothing stored.

        Name and version come from the header: the version is reserved as soon as the validator
        has parsed it, so a concurrent or repeated upload of it fails after its header. ``claims`` (client-announced size and
        digest) are read while and after ``chunks`` is consumed. Raises InvalidArgument subclasses
        (malformed artifact, EmptyUpload, UploadMismatch), ModelExists, ArtifactTooLarge,
        StorageFull or StorageUnavailable; on failure nothing is stored.
        """
        ...

    def open(
        self, name: str, version: str, *, offset: int = 0, length: int | None = None
    ) -> RangeReader:
        """Opens a byte range (``length`` None: to the end). ModelNotFound, OutOfRange, DATA_LOSS."""
        ...

    def stat(self, name: str, version: str) -> ModelRecord:
        """The stored model's record; ModelNotFound if absent."""
        ...

    def list(
        self, *, prefix: str = "", page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> ModelPage:
        """A page of models whose name starts with ``prefix``, in (name, version) order.

        ``page_size`` is 1..MAX_PAGE_SIZE; ``page_token`` is opaque (from the previous page with
        the same prefix); an unusable one is InvalidArgument(INVALID_PAGE_TOKEN). An index entry
        that cannot be read is in the page's ``corrupt`` (counted in ``page_size``), never in
        its models, and the listing goes on past it.
        """
        ...

    def delete(self, name: str, version: str) -> None:
        """Removes the model (its bytes go once nothing else shares them); ModelNotFound if absent."""
        ...

    def delete_corrupt(self, listed_name: str, listed_version: str) -> str:
        """Removes the one index entry the store cannot read that a listing names
        ``listed_name`` ``listed_version`` (a corrupt entry's name as listed, possibly outside the
        name grammar); its blob is never deleted here. Returns what the entry held
        (:func:`~strongroom.modelstore.records.held_text`) for the caller's log. ModelNotFound if no entry has that name,
        FailedPrecondition INDEX_ENTRY_NOT_CORRUPT if the entry is readable (delete it with
        :meth:`delete`), INDEX_ENTRY_AMBIGUOUS if several unreadable entries are listed so."""
        ...

    def verify(self, name: str, version: str) -> ModelRecord:
        """Recomputes the stored artifact's digest; StoredDataCorrupt (DATA_LOSS) on mismatch."""
        ...

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
        """Atomically replaces a format-2 artifact's key slot (rules: ``_keyslot``).

        ``expected_wrapped_dek`` (empty: not checked) is the wrapped data key the caller read
        from the slot and re-wrapped; the slot must still hold it (KEY_SLOT_CHANGED otherwise).
        Returns the record after the call (unchanged if the slot was already this one). The
        artifact is visible whole under the old slot or the new one, never anything else, even if
        the process dies mid-way. ModelNotFound, KeySlotRejected, InvalidArtifact.
        """
        ...

    def close(self) -> None:
        """Releases the backend (idempotent)."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class IntegrityProblem:
    """A stored model whose bytes failed verification."""

    name: str
    version: str
    reason: str
    """The StoredDataCorrupt reason: BLOB_MISSING, DIGEST_MISMATCH, ..."""


def verify_all(storage: Storage, *, prefix: str = "") -> tuple[IntegrityProblem, ...]:
    """Recomputes the digest of every stored model (under ``prefix``); returns those that fail,
    and every index entry the listing found unreadable (INDEX_CORRUPT).

    Reads every stored byte once; an empty result means everything verified. Other errors (I/O,
    a model deleted meanwhile) propagate or are skipped as noted.
    """
    problems: list[IntegrityProblem] = []
    token = ""
    while True:
        page = storage.list(prefix=prefix, page_size=MAX_PAGE_SIZE, page_token=token)
        problems.extend(
            IntegrityProblem(e.name, e.version, Reason.INDEX_CORRUPT) for e in page.corrupt
        )
        for record in page.models:
            try:
                storage.verify(record.name, record.version)
            except StoredDataCorrupt as exc:
                problems.append(IntegrityProblem(record.name, record.version, exc.reason))
            except ModelNotFound:
                continue  # deleted while we were checking
        token = page.next_page_token
        if not token:
            return tuple(problems)


def open_storage(
    config: ModelstoreConfig, *, single_secrets: bool = False
) -> FilesystemStorage | S3Storage:
    """Opens the configured backend (sweeping what interrupted uploads left behind);
    ``single_secrets`` (production) refuses S3 credentials given both as a file and a variable."""
    if config.storage.backend == "s3":
        return S3Storage.from_config(
            config.storage,
            max_artifact_size=config.max_artifact_bytes,
            single_secrets=single_secrets,
        )
    assert config.data_dir is not None  # the configuration requires it for this backend
    return FilesystemStorage(config.data_dir, max_artifact_size=config.max_artifact_bytes)
