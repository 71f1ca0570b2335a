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
from strongroom.artifact import StructureValidator
from strongroom.client.remote import peer_reason
from strongroom.dev.devstack import DevStack
from strongroom.errors import PermissionDenied
from strongroom.modelstore import _pagetoken
from strongroom.modelstore import service as service_module
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
    """The store as ``strongroom serve modelstore`` builds it: three identities with the
    publisher role, one listed for ``team-a/`` and ``shared/m``, one for ``team-b/``, one not."""
    identity, common = enrolled_svc(stack)
    common = dataclasses.replace(
        common,
        authz=AuthzConfig(
            publisher=(
                stack.spiffe_id("publisher"),
                stack.spiffe_id("publisher-b"),
                stack.spiffe_id("publisher-c"),
            ),
            admin=(stack.spiffe_id("admin"),),
        ),
    )
    config = ModelstoreConfig(
        data_dir=tmp_path_factory.mktemp("store"),
        publishers=(
            PublisherScope(stack.spiffe_id("publisher"), ("team-a/", "shared/m")),
            PublisherScope(stack.spiffe_id("publisher-c"), ("team-b/",)),
        ),
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


def _list_all(caller: WorkloadIdentity, store: ModelStore, page_size: int) -> list[str]:
    """Every name a caller's listing shows, page by page; each page token must name a model the
    caller was shown (a token is readable: it would leak the name it carries)."""
    names: list[str] = []
    token = ""
    with caller.channel(f"localhost:{store.host.port}") as channel:
        stub = pb_grpc.ModelStoreServiceStub(channel)
        while True:
            page = stub.ListModels(
                pb.ListModelsRequest(page_size=page_size, page_token=token), timeout=30
            )
            names += [m.name for m in page.models]
            token = page.next_page_token
            if not token:
                return names
            assert _pagetoken.decode(token, "")[0] in names


@pytest.mark.parametrize("page_size", [1, 2, 1000])
def test_a_scoped_publisher_lists_only_the_names_its_rules_cover(
    stack: DevStack, store: ModelStore, page_size: int
) -> None:
    """One tenant's publisher listed every other tenant's models (names, versions, sizes, key
    ids): a listing shows a scoped reader only its own, its tokens name only those, and
    inference servers and admins still see everything."""
    other_tenant = stack.foreign_identity(stack.spiffe_id("publisher-c"))
    stored = {m.name for m in store.storage.records()}
    for caller, name in [
        (other_tenant, "team-b/a"),
        (stack.identity("publisher"), "team-a/listed"),
        (other_tenant, "team-b/z"),
        (stack.identity("publisher"), "shared/m"),
    ]:
        if name not in stored:
            put(stack, store, caller, name)
    everything = {m.name for m in store.storage.records()}
    listed = _list_all(stack.identity("publisher"), store, page_size)
    assert {"team-a/listed", "shared/m"} <= set(listed)
    assert all(n.startswith("team-a/") or n == "shared/m" for n in listed)
    assert set(_list_all(other_tenant, store, page_size)) == {
        n for n in everything if n.startswith("team-b/")
    }
    unlisted = stack.foreign_identity(stack.spiffe_id("publisher-b"))
    assert _list_all(unlisted, store, page_size) == []
    assert set(_list_all(stack.identity("admin"), store, page_size)) == everything


@pytest.mark.parametrize("name", ["team-b/a", "team-b/never-stored"])
def test_a_scoped_publisher_cannot_stat_or_download_another_tenants_model(
    stack: DevStack, store: ModelStore, name: str
) -> None:
    """The same refusal whether or not the model exists: another tenant's names cannot be
    probed."""
    if name == "team-b/a" and all(m.name != name for m in store.storage.records()):
        put(stack, store, stack.foreign_identity(stack.spiffe_id("publisher-c")), name)
    with stack.identity("publisher").channel(f"localhost:{store.host.port}") as channel:
        stub = pb_grpc.ModelStoreServiceStub(channel)
        for call in (
            lambda: stub.StatModel(pb.StatModelRequest(name=name, version="1"), timeout=30),
            lambda: list(stub.GetModel(pb.GetModelRequest(name=name, version="1"), timeout=30)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            assert peer_reason(info.value) == "MODEL_NAME_NOT_ALLOWED"


def _store_unscoped(store: ModelStore, *names: str) -> None:
    """Models stored outside any publisher's rules (before the list existed, say)."""
    for name in names:
        if all(m.name != name for m in store.storage.records()):
            store.storage.put(chunked(make_artifact(name, "1", b"w")), StructureValidator())


def test_a_listing_past_an_exact_rules_own_models_ends_without_naming_others(
    stack: DevStack, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exact-name rule's range (``shared/m``) also holds others' longer names, all after the
    caller's own versions: past the skip bound of them, the page after its own was
    LISTING_TOO_SPARSE, so every walk of its listing ended there (its ``team-a/`` models never
    listed). Nothing after the rule's last name is the caller's: the range ends there, naming
    none of them (the bound on others between its own names: test_service)."""
    if all(m.name != "shared/m" for m in store.storage.records()):
        put(stack, store, stack.identity("publisher"), "shared/m")
    if all(m.name != "team-a/listed" for m in store.storage.records()):
        put(stack, store, stack.identity("publisher"), "team-a/listed")
    _store_unscoped(store, "shared/m1", "shared/m2", "shared/m3")
    monkeypatch.setattr(service_module, "MAX_SKIPPED_PER_PAGE", 2)
    with stack.identity("publisher").channel(f"localhost:{store.host.port}") as channel:
        stub = pb_grpc.ModelStoreServiceStub(channel)
        after_own = _pagetoken.encode("shared/", "shared/m", "1")
        page = stub.ListModels(
            pb.ListModelsRequest(name_prefix="shared/", page_token=after_own), timeout=30
        )
        assert (list(page.models), page.next_page_token) == ([], "")
    listed = _list_all(stack.identity("publisher"), store, 1)
    assert {"shared/m", "team-a/listed"} <= set(listed)
    assert all(n.startswith("team-a/") or n == "shared/m" for n in listed)


def test_a_scoped_listing_reads_only_the_ranges_the_callers_rules_name(
    stack: DevStack, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scoped listing read every model under the prefix and filtered others' out: a
    publisher whose names had more than the skip bound of others' between them (here
    ``shared/n*`` between ``shared/m`` and ``team-a/``) saw its listing stop with
    LISTING_TOO_SPARSE, and each page made the store read all of them. Now only the ranges its
    rules name are read, in order, with tokens as before."""
    for name in ("shared/m", "team-a/listed"):
        if all(m.name != name for m in store.storage.records()):
            put(stack, store, stack.identity("publisher"), name)
    # (An exact rule's range holds longer names: shared/m1-3, if an earlier test stored them.)
    _store_unscoped(store, "shared/n1", "shared/n2", "shared/n3", "shared/n4", "other/x")
    monkeypatch.setattr(service_module, "MAX_SKIPPED_PER_PAGE", 3)
    own = sorted(
        (m.name, m.version)
        for m in store.storage.records()
        if m.name == "shared/m" or m.name.startswith("team-a/")
    )
    for page_size in (1, 1000):
        listed = _list_all(stack.identity("publisher"), store, page_size)
        assert listed == [name for name, _ in own]


def test_a_scoped_listing_does_not_tell_how_many_models_another_tenant_has_under_a_prefix(
    stack: DevStack, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher listing a prefix of another tenant's got LISTING_TOO_SPARSE where more than
    the bound of that tenant's models lay under it, and an empty page where fewer did; prefix
    by prefix (or with forged page tokens placed anywhere) it spelt the other tenant's names.
    Now a prefix none of the caller's names can have is an empty page whatever lies under it,
    and a token naming a name outside the caller's rules is INVALID_PAGE_TOKEN."""
    other_tenant = stack.foreign_identity(stack.spiffe_id("publisher-c"))
    for name in ("team-b/s1", "team-b/s2", "team-b/s3"):
        if all(m.name != name for m in store.storage.records()):
            put(stack, store, other_tenant, name)
    monkeypatch.setattr(service_module, "MAX_SKIPPED_PER_PAGE", 2)
    with stack.identity("publisher").channel(f"localhost:{store.host.port}") as channel:
        stub = pb_grpc.ModelStoreServiceStub(channel)
        for prefix in ("team-b/", "team-b/s", "team-b/nothing-here"):
            page = stub.ListModels(pb.ListModelsRequest(name_prefix=prefix), timeout=30)
            assert (list(page.models), page.next_page_token) == ([], "")
        forged = _pagetoken.encode("team-", "team-b/a", "1")
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(
                pb.ListModelsRequest(name_prefix="team-", page_token=forged), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert peer_reason(info.value) == "INVALID_PAGE_TOKEN"
        # Its own listings are unchanged, tokens included.
        assert all(n.startswith("team-a/") for n in _list_all_prefix(stub, "team-a/"))


def _list_all_prefix(stub: pb_grpc.ModelStoreServiceStub, prefix: str) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page = stub.ListModels(
            pb.ListModelsRequest(name_prefix=prefix, page_size=1, page_token=token), timeout=30
        )
        names += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            return names
