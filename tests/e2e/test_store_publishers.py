"""``modelstore.publishers``: which model names each publisher may store, over real mTLS.

Without it any identity with the publisher role could store any name and version: its artifact
cannot be loaded (its data key is not that model's), but it occupies the version, and the rightful
publisher gets ALREADY_EXISTS until an admin deletes it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.client.remote import peer_reason
from strongroom.dev.devstack import DevStack
from strongroom.errors import PermissionDenied
from strongroom.modelstore.config import ModelstoreConfig, PublisherScope
from strongroom.modelstore.server import ModelStore, build
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.config import AuthzConfig, ConfigError
from strongroom.runtime.config import build as build_config
from tests.conftest import stack_root
from tests.e2e.svc import enrolled_svc
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.backends import assert_clean


@pytest.fixture(scope="module")
def stack(
    step_ca_binary: Path, tmp_path_factory: pytest.TempPathFactory, simulated_tee_dir: Path
) -> Iterator[DevStack]:
    """Only the CA: the store under test is built here, with its own configuration."""
    root = stack_root(tmp_path_factory, "publishers", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        yield dev


@pytest.fixture(scope="module")
def store(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelStore]:
    """The store as ``strongroom serve modelstore`` builds it: two identities with the publisher
    role, one of them listed for ``team-a/`` and ``shared/m``."""
    identity, common = enrolled_svc(stack)
    common = dataclasses.replace(
        common,
        authz=AuthzConfig(
            publisher=(stack.spiffe_id("publisher"), stack.spiffe_id("publisher-b")),
            admin=(stack.spiffe_id("admin"),),
        ),
    )
    config = ModelstoreConfig(
        data_dir=tmp_path_factory.mktemp("store"),
        publishers=(PublisherScope(stack.spiffe_id("publisher"), ("team-a/", "shared/m")),),
    )
    running = build(common, config, identity=identity)
    running.host.start()
    try:
        yield running
    finally:
        running.close()
        identity.close()


def put(stack: DevStack, store: ModelStore, caller: WorkloadIdentity, name: str) -> pb.ModelInfo:
    artifact = make_artifact(name, "1", b"weights of " + name.encode())
    with caller.channel(f"localhost:{store.host.port}") as channel:
        stub = pb_grpc.ModelStoreServiceStub(channel)
        messages = (pb.PutModelRequest(data=c) for c in chunked(artifact, 64))
        return stub.PutModel(messages, timeout=30).model


@pytest.mark.parametrize("name", ["team-a/m", "team-a/x/y", "shared/m"])
def test_a_listed_publisher_stores_the_names_its_rules_cover(
    stack: DevStack, store: ModelStore, name: str
) -> None:
    assert put(stack, store, stack.identity("publisher"), name).name == name


@pytest.mark.parametrize(
    ("who", "name", "reason"),
    [
        ("publisher", "team-b/m", "MODEL_NAME_NOT_ALLOWED"),
        ("publisher", "team-a", "MODEL_NAME_NOT_ALLOWED"),  # team-a/ covers what is under it
        ("publisher", "shared/m2", "MODEL_NAME_NOT_ALLOWED"),
        ("publisher-b", "team-a/squatted", "PUBLISHER_NOT_ALLOWED"),
    ],
)
def test_an_upload_outside_the_callers_rules_is_refused_and_stores_nothing(
    stack: DevStack,
    store: ModelStore,
    caplog: pytest.LogCaptureFixture,
    who: str,
    name: str,
    reason: str,
) -> None:
    caller = stack.foreign_identity(stack.spiffe_id(who)) if who != "publisher" else None
    caller = caller or stack.identity("publisher")
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as info:
        put(stack, store, caller, name)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert peer_reason(info.value) == reason
    refusals = [r.getMessage() for r in caplog.records if "refused upload" in r.getMessage()]
    assert refusals and stack.spiffe_id(who) in refusals[-1] and name in refusals[-1]
    # Neither the version nor any byte of it is kept: the rightful publisher can still take it.
    assert all(r.name != name for r in store.storage.records())
    assert_clean(store.storage)


def test_a_refused_squat_leaves_the_version_to_its_publisher(
    stack: DevStack, store: ModelStore
) -> None:
    squatter = stack.foreign_identity(stack.spiffe_id("publisher-b"))
    with pytest.raises(grpc.RpcError):
        put(stack, store, squatter, "team-a/contested")
    assert put(stack, store, stack.identity("publisher"), "team-a/contested").version == "1"


@pytest.mark.parametrize(
    ("publishers", "message"),
    [
        ([{"spiffe_id": "not-an-id", "model_names": ["a/"]}], "not a SPIFFE ID"),
        ([{"spiffe_id": "spiffe://t.test/p", "model_names": []}], "lists no model_names"),
        ([{"spiffe_id": "spiffe://t.test/p", "model_names": ["a//"]}], "is not a model name"),
        ([{"spiffe_id": "spiffe://t.test/p", "model_names": ["*"]}], "is not a model name"),
        (
            [
                {"spiffe_id": "spiffe://t.test/p", "model_names": ["a/"]},
                {"spiffe_id": "spiffe://t.test/p", "model_names": ["b/"]},
            ],
            "listed twice",
        ),
    ],
)
def test_a_malformed_publishers_list_is_refused_at_load(
    tmp_path: Path, publishers: object, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            ModelstoreConfig, {"data_dir": str(tmp_path), "publishers": publishers}, "modelstore"
        )
    assert message in info.value.message


def test_without_a_publishers_list_any_name_and_with_an_empty_one_none() -> None:
    assert ModelstoreConfig(data_dir=Path("/x")).publisher_scopes is None
    scopes = ModelstoreConfig(data_dir=Path("/x"), publishers=()).publisher_scopes
    assert scopes is not None
    with pytest.raises(PermissionDenied):
        scopes.check("spiffe://t.test/p", "m")
