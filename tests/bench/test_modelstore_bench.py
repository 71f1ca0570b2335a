"""The model store benchmark measures what users run: the production host and the product client.

Its store used to be the servicer on a bare ``grpc.server`` with two interceptors (no
authorisation, no stream or unary-call guards, 64 MiB message limits) fed by protobuf requests the
benchmark built itself and read by a client of its own. It now serves on
:func:`strongroom.modelstore.server.serving_host` (what ``strongroom serve modelstore`` serves on)
and moves bytes with the publishing client's ``put_model`` / ``upload_artifact`` and the loader's
``grpc_source``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from strongroom.client.publish import put_model
from strongroom.dev.devstack import DevStack
from strongroom.modelstore.storage import FilesystemStorage
from strongroom.pki import WorkloadIdentity
from tests.bench import modelstore_bench, mtls_bench
from tests.bench.modelstore_bench import MiB

SIZE = 2 * MiB


@pytest.fixture(scope="module")
def stack(step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with DevStack(tmp_path_factory.mktemp("bench-store"), step_ca_binary=step_ca_binary) as dev:
        yield dev


def _enrol(stack: DevStack, name: str, dns: list[str] | None = None) -> WorkloadIdentity:
    return WorkloadIdentity.enrol(stack.start_ca().client(), stack.token(name, dns or []))


def test_the_mtls_store_is_the_production_host_and_the_client_the_products(
    stack: DevStack, tmp_path: Path
) -> None:
    server, client = _enrol(stack, "server", ["localhost"]), _enrol(stack, "client")
    outsider = _enrol(stack, "outsider")  # a certificate of the same CA, with no role
    with contextlib.ExitStack() as exits:
        for identity in (server, client, outsider):
            exits.callback(identity.close)
        storage = FilesystemStorage(tmp_path / "store", max_artifact_size=SIZE)
        exits.callback(storage.close)
        tls = modelstore_bench.StoreTls(
            server,
            mtls_bench._store_config(stack, stack.start_ca()),
            client.channel,
        )
        harness = modelstore_bench._Harness(exits, storage, tls)
        real = tmp_path / "real.artifact"
        modelstore_bench._write_real_artifact(real, SIZE)
        assert harness.put_real(real) == real.stat().st_size
        size = harness.put(SIZE)
        assert size == storage.records()[0].artifact_size
        assert harness.get(modelstore_bench.DEFAULT_DOWNLOAD_CHUNK) == size
        # The authoriser runs: a caller without the publisher role is refused before any byte
        # is stored (the old bench's bare server took an upload from any certificate).
        port = harness.store_ports[modelstore_bench.UPLOAD_CHUNK]
        with outsider.channel(f"localhost:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            put_model(
                channel,
                modelstore_bench._upload_messages(SIZE, modelstore_bench.UPLOAD_CHUNK, "x"),
                name="bench/model",
                version="x",
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert [(r.name, r.version) for r in storage.records()] == [("bench/model", "0")]


def test_downloads_have_a_baseline_streaming_the_stored_bytes(tmp_path: Path) -> None:
    """The bare download sends one cached chunk over and over; the store reads every byte from
    memory. The second baseline streams the stored artifact itself, read as the storage reads it."""
    with contextlib.ExitStack() as exits:
        storage = FilesystemStorage(tmp_path / "store", max_artifact_size=SIZE)
        exits.callback(storage.close)
        harness = modelstore_bench._Harness(exits, storage, None)
        size = harness.put(SIZE)
        for chunk in modelstore_bench.DOWNLOAD_CHUNKS:
            assert harness.bare_download_stored(chunk) == size == harness.get(chunk)
