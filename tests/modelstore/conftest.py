"""Fixtures for the model store: a real storage root per test and a real gRPC server around it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.modelstore.service import SERVICE_NAME, ModelStoreServicer, message_limits
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.modelstore.validator import ValidatorFactory
from strongroom.runtime.server import ServiceHost, ServiceSpec
from tests.modelstore.fake_artifact import FakeValidator


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def storage(store_root: Path) -> Iterator[FilesystemStorage]:
    s = FilesystemStorage(store_root)
    try:
        yield s
    finally:
        s.close()


@dataclass
class Served:
    storage: FilesystemStorage
    stub: pb_grpc.ModelStoreServiceStub
    channel: grpc.Channel


def serve(
    storage: FilesystemStorage,
    validator_factory: ValidatorFactory = FakeValidator,
    **servicer_options: int,
) -> tuple[ServiceHost, grpc.Channel]:
    """Starts the servicer behind the runtime's real host (error mapping included), insecure."""
    servicer = ModelStoreServicer(storage, validator_factory, **servicer_options)
    host = ServiceHost(
        message_limits=message_limits(),
        listen="127.0.0.1:0",
        credentials=None,
        services=[
            ServiceSpec(
                name=SERVICE_NAME,
                register=lambda server: pb_grpc.add_ModelStoreServiceServicer_to_server(
                    servicer, server
                ),
            )
        ],
    )
    host.start()
    return host, grpc.insecure_channel(f"127.0.0.1:{host.port}")


@pytest.fixture
def served(storage: FilesystemStorage) -> Iterator[Served]:
    # A small download chunk so that multi-message streams are exercised with small artifacts.
    host, channel = serve(storage, download_chunk=64 * 1024)
    try:
        yield Served(storage, pb_grpc.ModelStoreServiceStub(channel), channel)
    finally:
        channel.close()
        host.stop(0)
