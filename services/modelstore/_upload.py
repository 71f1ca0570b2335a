"""The upload path every storage backend shares: the checks, the version reservation, the record.

A backend passes the client's chunks through :meth:`Upload.accept` into wherever it keeps bytes
in progress, then :meth:`Upload.finish` checks the whole and returns the record to publish. How the
bytes are made durable and visible (rename and index row, or multipart upload and index object)
stays the backend's.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from strongroom.artifact import StructureValidator
from strongroom.closing import Closing
from strongroom.errors import Internal
from strongroom.identifiers import validate_name, validate_sha256_hex, validate_version
from strongroom.modelstore.errors import ArtifactTooLarge, EmptyUpload, ModelExists, UploadMismatch
from strongroom.modelstore.records import ModelRecord, UploadClaims
from strongroom.reasons import Reason

Authorize = Callable[[str, str], None]
"""Asked with the (name, version) an artifact's header names, before the version is reserved or
the body received; raises (PermissionDenied) to refuse the upload."""


def utcnow() -> datetime:
    """The current time in UTC (the backends' default clock)."""
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class Uploads:
    """What one backend's uploads share: the size limit, the question whether a version is stored,
    and the versions this process is uploading (so that a second upload of one fails fast).

    The reservation is only a fast path: what makes (name, version) immutable is the backend's
    own create-only commit (a primary key, a conditional PUT).
    """

    def __init__(self, max_artifact_size: int, exists: Callable[[str, str], bool]) -> None:
        self.max_artifact_size = max_artifact_size
        self._exists = exists
        self._held: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def begin(
        self,
        validator: StructureValidator,
        claims: UploadClaims | None,
        authorize: Authorize | None = None,
    ) -> Upload:
        """A new upload checked by ``validator`` against ``claims`` (None: nothing announced) and,
        once its header names the model, by ``authorize`` (None: any name)."""
        return Upload(self, validator, claims, authorize)

    def hold(self, name: str, version: str) -> tuple[str, str]:
        """Reserves (name, version) and returns it; release it with :meth:`release`.

        ModelExists with UPLOAD_IN_PROGRESS if this process is uploading it already, plain
        ModelExists if it is stored.
        """
        key = (validate_name(name), validate_version(version))
        with self._lock:
            if key in self._held:
                raise ModelExists(
                    f"model {name} version {version} is being uploaded by another request",
                    reason=Reason.UPLOAD_IN_PROGRESS,
                )
            self._held.add(key)
        try:
            if self._exists(*key):
                raise ModelExists(f"model {name} version {version} already exists")
        except BaseException:
            self.release(key)
            raise
        return key

    def release(self, key: tuple[str, str]) -> None:
        """Ends the reservation of ``key`` (idempotent)."""
        with self._lock:
            self._held.discard(key)


class Upload(Closing):
    """One upload's checks: size limits, structure, SHA-256, claims and the version reservation.

    Made by :meth:`Uploads.begin`; use it as a context manager: leaving it releases the
    reservation, whatever happened.
    """

    def __init__(
        self,
        uploads: Uploads,
        validator: StructureValidator,
        claims: UploadClaims | None,
        authorize: Authorize | None = None,
    ) -> None:
        self._uploads = uploads
        self._validator = validator
        self._authorize = authorize
        self._claims = claims if claims is not None else UploadClaims()
        self._max = uploads.max_artifact_size
        self._hasher = hashlib.sha256()
        self._reserved: tuple[str, str] | None = None
        self.size = 0
        """Bytes accepted so far."""

    def accept(self, chunks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        """Yields each non-empty chunk once it has been checked, validated and hashed (a
        memoryview as a view of its bytes; TypeError for one that is not C-contiguous)."""
        for given in chunks:
            # len() of a view of another format (array('I')) counts items: the size limits, the
            # record's size and the backends' counts are in bytes, as the hash and the validator
            # (and the bytes written) are.
            chunk = given.cast("B") if isinstance(given, memoryview) else given
            if not chunk:
                continue
            self._check_growth(self.size + len(chunk))
            self._validator.feed(chunk)
            self._hasher.update(chunk)
            self.size += len(chunk)
            if self._reserved is None and (identity := self._validator.identity()) is not None:
                # The name asked about is the header's, the one the record will carry (finish()
                # checks the summary names the reserved one): no request field can differ from it.
                # Asked before the reservation, so a refused caller cannot hold a version either.
                if self._authorize is not None:
                    self._authorize(*identity)
                # Reserve as soon as the header names the model: a losing concurrent upload
                # (or a re-upload of a stored version) fails here, not after its last byte.
                self._reserved = self._uploads.hold(*identity)
            yield chunk

    def finish(self, stored_at: datetime) -> ModelRecord:
        """Checks the complete artifact against its header and the claims; returns its record.

        Raises EmptyUpload, UploadMismatch, ArtifactTooLarge or the validator's InvalidArgument.
        """
        self._check_growth(self.size)
        if self.size == 0:
            raise EmptyUpload("the upload carried no artifact bytes")
        summary = self._validator.finish()
        # finish() succeeded, so the header was parsed and the version reserved in accept().
        if self._reserved is None or self._reserved != (summary.name, summary.version):
            raise Internal("the validator reported two identities for one artifact")
        name, version = self._reserved
        digest = self._hasher.hexdigest()
        self._check_final(digest, summary.artifact_size)
        return ModelRecord(
            name=name,
            version=version,
            artifact_sha256=digest,
            artifact_size=self.size,
            plaintext_size=summary.plaintext_size,
            plaintext_sha256=summary.plaintext_sha256,
            content_type=summary.content_type,
            key_id=summary.key_id,
            key_version=summary.key_version,
            header_size=summary.header_size,
            created_at=aware(summary.created_at),
            stored_at=aware(stored_at),
            artifact_format=summary.format_version,
        )

    def _check_growth(self, size: int) -> None:
        claimed = self._claims.size
        if claimed is not None and claimed > self._max:
            raise ArtifactTooLarge(
                f"announced artifact size {claimed} exceeds the limit of {self._max} bytes"
            )
        if size > self._max:
            raise ArtifactTooLarge(f"artifact exceeds the limit of {self._max} bytes")
        if claimed is not None and size > claimed:
            raise UploadMismatch(
                f"received more than the announced {claimed} bytes", reason=Reason.SIZE_MISMATCH
            )

    def _check_final(self, digest: str, header_size: int) -> None:
        if header_size != self.size:
            raise UploadMismatch(
                f"artifact is {self.size} bytes but its header implies {header_size}",
                reason=Reason.SIZE_MISMATCH,
            )
        if self._claims.size is not None and self._claims.size != self.size:
            raise UploadMismatch(
                f"received {self.size} bytes, announced {self._claims.size}",
                reason=Reason.SIZE_MISMATCH,
            )
        if self._claims.sha256 is not None and validate_sha256_hex(self._claims.sha256) != digest:
            raise UploadMismatch(
                "artifact SHA-256 differs from the announced artifact_sha256",
                reason=Reason.DIGEST_MISMATCH,
            )

    def close(self) -> None:
        """Releases the version reservation, if one was made (idempotent)."""
        if self._reserved is not None:
            self._uploads.release(self._reserved)
            self._reserved = None
