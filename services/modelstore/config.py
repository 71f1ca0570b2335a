"""The model store's own configuration section (``modelstore:``).

``storage.backend`` chooses where artifacts live: ``filesystem`` (``data_dir``, one process) or
``s3`` (a bucket of an S3-compatible object store, shared by any number of store replicas). The S3
credentials are never configuration values: the configuration names the files or environment
variables that hold them (never argv).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Literal

from strongroom.modelstore.limits import DEFAULT_MAX_ARTIFACT_SIZE
from strongroom.modelstore.publishers import PublisherScopes
from strongroom.runtime.config import ConfigError, EnvLocks, ModelNameRules

MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest multipart part (every part but the last)."""
MAX_PARTS = 10_000
"""S3's largest number of parts in one multipart upload."""


def _has_user_info(endpoint: str) -> bool:
    """True if the URL has a user-info part (``user[:password]@`` before the host)."""
    try:
        return "@" in urllib.parse.urlsplit(endpoint).netloc
    except ValueError:
        return False  # malformed: refused by _endpoint_allowed


def _endpoint_allowed(endpoint: str) -> bool:
    """True for an ``https://`` URL, or an ``http://`` one whose host is loopback (a test server).

    The host is the URL's parsed host, not its text: ``http://localhost.example.com``,
    ``http://127.0.0.1.nip.io`` and ``http://localhost:9000@s3.example.com`` all start like a
    loopback URL but reach another machine, in the clear.
    """
    try:
        parts = urllib.parse.urlsplit(endpoint)
        host = parts.hostname
        _ = parts.port  # a malformed port is a ValueError here, not a surprise in botocore
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name other than localhost
        return False


# S3 keys are at most 1,024 bytes; the longest this store writes under its prefix is an index
# key: "index/" + a 128-character name + "!" + a 64-character version (199 bytes). A longer prefix
# made every publish fail as S3_ERROR.
MAX_S3_PREFIX_BYTES = 1024 - 200


@dataclass(frozen=True)
class StorageConfig:
    """Which storage backend holds the artifacts, and how to reach an S3-compatible one."""

    backend: Literal["filesystem", "s3"] = "filesystem"
    endpoint: str | None = None
    """``https://host[:port]`` of the S3 API (``http://`` only for loopback test servers)."""
    bucket: str | None = None
    region: str = "us-east-1"
    prefix: str = ""
    """Key prefix inside the bucket (``strongroom/``), so one bucket can hold several stores."""
    path_style: bool = True
    """Path-style addressing (``endpoint/bucket/key``): what MinIO, Ceph RGW and most on-premises
    object stores expect; virtual-hosted style needs wildcard DNS and certificates."""
    ca_bundle_file: Path | None = None
    """PEM bundle that verifies the endpoint's TLS certificate (default: the system's)."""
    access_key_id_file: Path | None = None
    access_key_id_env: str = "STRONGROOM_S3_ACCESS_KEY_ID"
    secret_access_key_file: Path | None = None
    secret_access_key_env: str = "STRONGROOM_S3_SECRET_ACCESS_KEY"  # noqa: S105 - a variable name
    part_size: int = 16 * 1024 * 1024
    """Bytes per multipart part (and the threshold below which one PutObject is used)."""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3
    """Attempts per S3 request (botocore's standard retry mode: 5xx, throttling, timeouts)."""
    orphan_grace_seconds: int = 86_400
    """Age after which the start-up sweep aborts an unfinished multipart upload and reports an
    unreferenced blob (kept, never deleted); must exceed the longest upload, since another replica
    may be running it."""

    def __post_init__(self) -> None:
        if self.backend != "s3":
            return
        if not self.endpoint or not self.bucket:
            raise ConfigError("modelstore.storage: backend s3 needs endpoint and bucket")
        if _has_user_info(self.endpoint):
            # botocore does not sign with it but repeats the whole URL in its connection errors,
            # which the store logs: a secret here would go to the logs. Not echoed here either.
            raise ConfigError(
                "modelstore.storage.endpoint must not carry credentials (user@ or user:secret@): "
                "give them as access_key_id_file / secret_access_key_file or their environment "
                "variables"
            )
        if not _endpoint_allowed(self.endpoint):
            raise ConfigError(
                "modelstore.storage.endpoint must be https:// (plain http only on loopback)"
            )
        if self.prefix and (self.prefix.startswith("/") or not self.prefix.endswith("/")):
            raise ConfigError(
                "modelstore.storage.prefix must not start with '/' and must end with '/'"
            )
        if len(self.prefix.encode()) > MAX_S3_PREFIX_BYTES:
            raise ConfigError(
                f"modelstore.storage.prefix is longer than {MAX_S3_PREFIX_BYTES} bytes: with the "
                "longest model name and version, its object keys would pass S3's 1,024 bytes"
            )
        if not MIN_PART_SIZE <= self.part_size <= 5 * 1024**3:
            raise ConfigError("modelstore.storage.part_size must be between 5 MiB and 5 GiB")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("modelstore.storage timeouts must be positive")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigError("modelstore.storage.max_attempts must be between 1 and 10")
        if self.orphan_grace_seconds < 60:
            raise ConfigError("modelstore.storage.orphan_grace_seconds must be at least 60")


@dataclass(frozen=True)
class PublisherScope(ModelNameRules):
    """One publisher identity and the model names it may store (the key broker's ``publishers``
    rules); an identity left out of the list is refused PUBLISHER_NOT_ALLOWED."""

    where: ClassVar[str] = "modelstore.publishers"


@dataclass(frozen=True)
class ModelstoreConfig:
    """Where artifacts are stored, how large one may be, and who may store which model names."""

    # Which publisher may store which names decides whose model a name is: in production it comes
    # from the configuration file, never from an environment override (strongroom.runtime.config).
    # Accepting unbound uploads lets a holder of a pre-format-3 data key publish under any name:
    # in production only the configuration file may switch it on, never an environment override.
    ENV_LOCKED_IN_PRODUCTION: ClassVar[EnvLocks] = {
        "publishers": (),
        "accept_unbound_uploads": (False,),
    }

    data_dir: Path | None = None
    """The filesystem backend's root (required with ``storage.backend: filesystem``)."""
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_SIZE
    storage: StorageConfig = field(default_factory=StorageConfig)
    publishers: tuple[PublisherScope, ...] | None = None
    """Which model names each publisher identity may store (PutModel). Absent (None): any
    identity with the publisher role may store any name, as before the list existed; a list
    (even an empty one) admits only the identities it names, each for its names."""
    accept_unbound_uploads: bool = False
    """Whether PutModel takes artifacts in formats 1 and 2, whose body key is not bound to the
    model (ARTIFACT_FORMAT.md, section 10): whoever ever held such a data key could publish a
    loadable model under another tenant's name. Off: new uploads must be format 3
    (``FAILED_PRECONDITION`` ``ARTIFACT_KEY_UNBOUND``); on only for a migration window. Stored
    artifacts of every format are served either way."""

    def __post_init__(self) -> None:
        if self.publishers is not None:
            seen: set[str] = set()
            for scope in self.publishers:
                if scope.spiffe_id in seen:
                    raise ConfigError(f"modelstore.publishers: {scope.spiffe_id!r} is listed twice")
                seen.add(scope.spiffe_id)
        if self.max_artifact_bytes < 1024:
            raise ConfigError("modelstore.max_artifact_bytes must be at least 1024")
        if self.storage.backend == "filesystem" and self.data_dir is None:
            raise ConfigError("modelstore.data_dir: required with the filesystem backend")
        if self.storage.backend == "s3" and self.data_dir is not None:
            raise ConfigError("modelstore.data_dir: not used with the s3 backend; remove it")
        if (
            self.storage.backend == "s3"
            and self.max_artifact_bytes > self.storage.part_size * MAX_PARTS
        ):
            raise ConfigError(
                "modelstore.max_artifact_bytes exceeds storage.part_size x 10000 (S3's part limit)"
            )

    @property
    def publisher_scopes(self) -> PublisherScopes | None:
        """``publishers`` as the servicer checks them (None: no list, any name)."""
        if self.publishers is None:
            return None
        return PublisherScopes(
            MappingProxyType({p.spiffe_id: p.model_names for p in self.publishers})
        )
