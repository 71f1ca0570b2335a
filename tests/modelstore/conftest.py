"""Fixtures for the model store: a real storage per test, on each backend, and a real gRPC server.

``storage`` is parametrised: every test that takes it runs on the filesystem backend (its own
root) and on the S3 backend (its own bucket on a real S3-compatible server process, moto's, started
once per session on loopback; see ``s3server``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from botocore.retries.standard import ExponentialBackoff

from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.modelstore.service import (
    SERVICE_NAME,
    ModelStoreServicer,
    add_to_server,
    message_limits,
)
from strongroom.modelstore.storage import FilesystemStorage, S3Storage
from strongroom.runtime.config import ServerConfig
from strongroom.runtime.server import ServiceHost, ServiceSpec
from tests.modelstore import s3server
from tests.modelstore.backends import AnyStorage

S3_TEST_PART_SIZE = 5 * 1024 * 1024
"""S3's minimum part size: the smallest artifacts that exercise multipart uploads."""


@pytest.fixture(scope="module", autouse=True)
def _no_retry_backoff() -> Iterator[None]:
    """botocore's retries without its sleeps between them, for every S3 client these tests make
    (the store's own included). The store's retry behaviour is the number of attempts
    (``max_attempts``) and what a retry's answer means (``RetryAttempts``), both kept; the sleep
    before a retry is botocore's jitter, up to 1 s after every throttling answer, which the fault
    tests inject by the dozen and no test measures. Per module: the patch ends with the module, not
    leaking into other directories' tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.MotoServer]:
    with s3server.moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_client(s3_server: s3server.MotoServer) -> Any:
    return s3server.client(s3_server.endpoint)


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    return s3server.new_bucket(s3_client)


@pytest.fixture
def proxy(s3_server: s3server.MotoServer) -> Iterator[s3server.FaultProxy]:
    """The fault-injecting HTTP proxy in front of the S3 server."""
    p = s3server.FaultProxy(s3_server.port)
    try:
        yield p
    finally:
        p.close()


def replica(endpoint: str, bucket: str, **kw: Any) -> S3Storage:
    """An S3 store on ``bucket`` under prefix ``p/`` (every replica of a test shares it), its
    client's settings in ``client`` (:func:`s3server.client`'s), the rest the store's."""
    client = s3server.client(endpoint, **kw.pop("client", {}))
    return S3Storage(client, bucket, prefix="p/", part_size=S3_TEST_PART_SIZE, **kw)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage(backend: str, request: pytest.FixtureRequest) -> Iterator[AnyStorage]:
    s: AnyStorage
    if backend == "filesystem":
        s = FilesystemStorage(request.getfixturevalue("store_root"))
    else:
        s = S3Storage(
            request.getfixturevalue("s3_client"),
            request.getfixturevalue("s3_bucket"),
            prefix="store/",
            part_size=S3_TEST_PART_SIZE,
        )
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fs_storage(store_root: Path) -> Iterator[FilesystemStorage]:
    s = FilesystemStorage(store_root)
    try:
        yield s
    finally:
        s.close()


@dataclass
class Served:
    storage: AnyStorage
    stub: pb_grpc.ModelStoreServiceStub
    channel: grpc.Channel


def serve(
    storage: AnyStorage,
    *,
    config: ServerConfig | None = None,
    **servicer_options: Any,
) -> tuple[ServiceHost, grpc.Channel]:
    """Starts the servicer behind the runtime's real host (error mapping included), insecure."""
    servicer = ModelStoreServicer(storage, **servicer_options)
    host = ServiceHost(
        config=config,
        message_limits=message_limits(),
        listen="127.0.0.1:0",
        credentials=None,
        services=[
            ServiceSpec(
                name=SERVICE_NAME,
                register=lambda server: add_to_server(servicer, server),
            )
        ],
    )
    host.start()
    return host, grpc.insecure_channel(f"127.0.0.1:{host.port}")


@pytest.fixture
def served(storage: AnyStorage) -> Iterator[Served]:
    # A small download chunk so that multi-message streams are exercised with small artifacts.
    host, channel = serve(storage, download_chunk=64 * 1024)
    try:
        yield Served(storage, pb_grpc.ModelStoreServiceStub(channel), channel)
    finally:
        channel.close()
        host.stop(0)


@pytest.fixture
def fs_served(fs_storage: FilesystemStorage) -> Iterator[Served]:
    host, channel = serve(fs_storage, download_chunk=64 * 1024)
    try:
        yield Served(fs_storage, pb_grpc.ModelStoreServiceStub(channel), channel)
    finally:
        channel.close()
        host.stop(0)
