"""The model store's failures, as branches of :mod:`strongroom.errors`.

Each class fixes the gRPC status; ``reason`` narrows it down (for instance ``SIZE_MISMATCH`` versus
``DIGEST_MISMATCH`` for an :class:`UploadMismatch`). Messages name models and sizes, never content.
"""

from __future__ import annotations

from strongroom.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StrongroomError,
    Unavailable,
)
from strongroom.reasons import Reason


class ModelNotFound(NotFound):
    """No model is stored under this name and version."""

    default_reason = Reason.MODEL_NOT_FOUND


class ModelExists(AlreadyExists):
    """The name and version are taken (``MODEL_EXISTS``) or being uploaded (``UPLOAD_IN_PROGRESS``).

    Stored models are immutable: publish a new version instead.
    """

    default_reason = Reason.MODEL_EXISTS


class EmptyUpload(InvalidArgument):
    """The upload carried no bytes."""

    default_reason = Reason.EMPTY_UPLOAD


class UploadMismatch(InvalidArgument):
    """The bytes received disagree with the size or digest the client (or the header) announced."""

    default_reason = Reason.UPLOAD_MISMATCH


class ArtifactTooLarge(ResourceExhausted):
    """The artifact is larger than the store accepts."""

    default_reason = Reason.ARTIFACT_TOO_LARGE


class StorageFull(ResourceExhausted):
    """The storage volume has no space left."""

    default_reason = Reason.STORAGE_FULL


class StorageUnavailable(Unavailable):
    """The storage volume or index failed with an I/O error; retrying may help."""

    default_reason = Reason.STORAGE_IO


class StorageReadOnly(FailedPrecondition):
    """The storage volume is mounted read-only (as a filesystem remounts itself after I/O errors):
    retrying does not help until the operator repairs and remounts it."""

    default_reason = Reason.STORAGE_READ_ONLY


class StorageLocked(FailedPrecondition):
    """Another process already serves this storage root."""

    default_reason = Reason.STORAGE_LOCKED


class StoredDataCorrupt(DataLoss):
    """A stored artifact is missing, truncated or no longer matches its recorded digest."""

    default_reason = Reason.STORED_DATA_CORRUPT


class OutOfRange(StrongroomError):
    """A read starts or ends past the end of the artifact (the runtime tree has no such branch)."""

    status_name = "OUT_OF_RANGE"
    default_reason = Reason.OUT_OF_RANGE


class KeySlotRejected(FailedPrecondition):
    """The stored artifact's key slot cannot be replaced as asked.

    Reasons: ``KEY_SLOT_CHANGED`` (the slot is no longer the expected one: another re-wrap won, or
    the caller's view is stale; re-read and retry), ``KEY_VERSION_NOT_NEWER`` (a re-wrap only moves
    forward, so the store cannot be used to roll a model back to an older KEK version),
    ``KEY_SLOT_NOT_REPLACEABLE`` (a format-1 artifact binds its wrapped key into the body).
    """

    default_reason = Reason.KEY_SLOT_CHANGED
