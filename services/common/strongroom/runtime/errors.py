"""The one exception tree every Strongroom component raises, and its mapping to gRPC status codes.

Domain code raises these; a single server interceptor turns them into a gRPC status whose message is
``REASON: text`` plus a ``strongroom-reason`` trailing-metadata entry. Nothing else reaches the wire:
any other exception becomes INTERNAL with a generic message (the details go to the log only).
"""

from __future__ import annotations

import grpc


class StrongroomError(Exception):
    """Base of every expected failure. ``reason`` is a stable, machine-readable UPPER_SNAKE code."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class InvalidArgument(StrongroomError):
    """The request is malformed: the caller must change it before retrying."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(StrongroomError):
    """The named object does not exist."""

    status = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(StrongroomError):
    """The object exists and is immutable."""

    status = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Unauthenticated(StrongroomError):
    """The caller presented no usable identity."""

    status = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(StrongroomError):
    """The caller is known but not allowed to do this (including failed attestation or policy)."""

    status = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class FailedPrecondition(StrongroomError):
    """The system is not in a state that allows this (disabled key, stale nonce, model not ready)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(StrongroomError):
    """A size or rate limit was exceeded."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(StrongroomError):
    """A dependency (HSM, storage, collateral service, peer) is unavailable; retrying may help."""

    status = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(StrongroomError):
    """Stored data failed an integrity check."""

    status = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Internal(StrongroomError):
    """A bug or an impossible state; details are logged, never returned."""

    status = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
