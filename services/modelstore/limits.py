"""Default limits shared by the storage backends and the gRPC servicer."""

from __future__ import annotations

DEFAULT_MAX_ARTIFACT_SIZE = 64 * 1024**3
"""Largest artifact a store accepts unless configured otherwise (64 GiB)."""

DEFAULT_PAGE_SIZE = 100
"""Page size of a listing when the caller does not choose one."""

MAX_PAGE_SIZE = 1000
"""Largest page a listing returns; larger requests are coerced down to it."""
