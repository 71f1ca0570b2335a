"""The S3 backend's own behaviour: multipart uploads, replicas on one bucket, faults, the sweep.

Everything runs against a real S3 server process (moto's, on loopback); faults are injected by a
real HTTP proxy between the store and the server, or by killing the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import StructureValidator
from strongroom.errors import FailedPrecondition, InvalidArgument
from strongroom.modelstore.config import MAX_S3_PREFIX_BYTES, ModelstoreConfig, StorageConfig
from strongroom.modelstore.errors import (
    ModelExists,
    ModelNotFound,
    StorageUnavailable,
    StoredDataCorrupt,
)
from strongroom.modelstore.publishers import PublisherScopes
from strongroom.modelstore.service import ModelStoreServicer
from strongroom.modelstore.storage import S3Storage, open_storage
from strongroom.runtime.config import ConfigError, build
from tests.modelstore import rewrap_case, s3server
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.backends import assert_clean, blob_count, overwrite_blob, point_at_blob_of
from tests.modelstore.conftest import S3_TEST_PART_SIZE, replica, serve
from tests.modelstore.shortreads import force_short_body_reads

BIG = 2 * S3_TEST_PART_SIZE + 12345  # three parts


def body(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"s3-{seed}".encode()).digest(n)


def read_all(storage: S3Storage, name: str, version: str) -> bytes:
    with storage.open(name, version) as reader:
        return b"".join(reader.chunks(1 << 20))


def test_multipart_round_trip_and_layout(s3_server: s3server.MotoServer, s3_bucket: str) -> None:
    store = replica(s3_server.endpoint, s3_bucket)
    art = make_artifact("acme/big", "1", body(BIG))
    record = store.put(chunked(art, 1 << 20), StructureValidator())
    assert read_all(store, "acme/big", "1") == art
    assert store.verify("acme/big", "1") == record
    with store.open("acme/big", "1", offset=S3_TEST_PART_SIZE - 3, length=10) as reader:
        assert b"".join(reader.chunks(4)) == art[S3_TEST_PART_SIZE - 3 : S3_TEST_PART_SIZE + 7]
    keys = [o["Key"] for o in store._client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "p/index/acme/big!1" in keys
    assert len([k for k in keys if k.startswith("p/blobs/")]) == 1
    index = json.loads(
        store._client.get_object(Bucket=s3_bucket, Key="p/index/acme/big!1")["Body"].read()
    )
    assert index["artifact_sha256"] == record.artifact_sha256
    assert_clean(store)


@pytest.mark.parametrize(
    "damage",
    [
        b"not json",
        b"{}",
        b"[" * 5_000 + b"]" * 5_000,
        b"time out of range",
        b"key_version=2147483648",
        b"key_version=4294967296",
        b"artifact_size=-1",
        b"plaintext_size=18446744073709551616",
        b"plaintext_size=1099511627777",
        b"header_size=1000000",
        b"plaintext_sha256=5",
    ],
    ids=[
        "garbage",
        "empty-object",
        "nested-past-the-recursion-limit",
        "time-out-of-range",
        "kek-version-no-broker-numbers",
        "kek-version-past-the-field",
        "negative-size",
        "size-past-the-field",
        "plaintext-past-the-format",
        "header-past-the-artifact",
        "plaintext-digest-not-a-digest",
    ],
)
def test_an_unreadable_index_record_is_stored_data_corrupt(
    s3_server: s3server.MotoServer, s3_bucket: str, damage: bytes
) -> None:
    """A record nested past json's recursion limit raised RecursionError (not a ValueError) and
    escaped as an untyped error instead of DATA_LOSS INDEX_CORRUPT. Its numbers were taken as
    they were: a KEK version no broker numbers (no header names one) was listed as the model's,
    and one or a size that ModelInfo cannot hold made every answer naming the record (GetModel,
    a ListModels page) INTERNAL."""
    store = replica(s3_server.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"x")], StructureValidator())
    key = "p/index/acme/m!1"
    record = json.loads(store._client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    field = ""  # the field the refusal names (a record that does not parse has none)
    if damage == b"time out of range":  # a date datetime cannot hold: OverflowError
        damage = json.dumps(record | {"stored_at_us": 10**20}).encode()
        field = "stored_at_us"
    elif b"=" in damage:  # one field out of its range, the rest of the record intact
        field, number = damage.decode().split("=")
        damage = json.dumps(record | {field: int(number)}).encode()
    store._client.put_object(Bucket=s3_bucket, Key="p/index/acme/m!1", Body=damage)
    with pytest.raises(StoredDataCorrupt) as info:
        store.stat("acme/m", "1")
    assert info.value.reason == "INDEX_CORRUPT"
    assert "acme/m" in info.value.message and field in info.value.message


def test_deleting_a_record_that_names_another_models_blob_keeps_that_blob(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """An index object names its blob by key: edited (by whoever can write the bucket) to name
    another model's blob, deleting its model deleted that other model's artifact; then such a
    delete was refused (DATA_LOSS BLOB_OF_ANOTHER_MODEL), and as a corrupt-entry delete refuses
    a readable record, nothing but an edit of the bucket removed it. The blob's own header names
    its model: the record is deleted and the blob kept (logged), as the filesystem backend keeps
    a blob another row names; the other model is still served, and its own delete removes it."""
    store = replica(s3_server.endpoint, s3_bucket)
    a = store.put([make_artifact("acme/a", "1", b"a" * 300)], StructureValidator())
    victim = make_artifact("acme/b", "1", b"b" * 300)
    b = store.put([victim], StructureValidator())
    point_at_blob_of(store, a, b)
    with pytest.raises(StoredDataCorrupt) as info:
        read_all(store, "acme/a", "1")
    assert info.value.reason == "BLOB_OF_ANOTHER_MODEL"
    store.delete("acme/a", "1")
    with pytest.raises(ModelNotFound):
        store.stat("acme/a", "1")
    assert read_all(store, "acme/b", "1") == victim
    store.delete("acme/b", "1")
    with pytest.raises(ModelNotFound):
        store.stat("acme/b", "1")
    assert store.referenced_blobs() == {}


@pytest.mark.parametrize("damage", ["unparseable", "emptied", "archived"])
def test_a_model_whose_blob_head_cannot_be_read_is_still_deletable(
    s3_server: s3server.MotoServer, s3_bucket: str, damage: str
) -> None:
    """When the blob's header cannot show whose it is, the model's record is deleted (an admin's
    way to get rid of a damaged model) but its blob is kept, reported later as unreferenced. The
    delete's read of the blob's head failed for good on a blob that exists but has no head to
    read: an empty one (416 to a range from byte 0) or one a lifecycle rule archived
    (InvalidObjectState); every DeleteModel answered UNAVAILABLE S3_ERROR or S3_ACCESS_DENIED, so
    the model could never be deleted: now those are as a head that does not parse."""
    store = replica(s3_server.endpoint, s3_bucket)
    art = make_artifact("acme/a", "1", b"a" * 300)
    record = store.put([art], StructureValidator())
    if damage == "unparseable":
        overwrite_blob(store, record, b"\0" * record.artifact_size)
    elif damage == "emptied":
        overwrite_blob(store, record, b"")
    else:
        (blob,) = store.referenced_blobs()
        store._client.put_object(
            Bucket=s3_bucket, Key=f"p/{blob}", Body=art, StorageClass="GLACIER"
        )
    store.delete("acme/a", "1")
    with pytest.raises(ModelNotFound):
        store.stat("acme/a", "1")
    assert blob_count(store) == 1


@pytest.mark.parametrize("damage", ["not-json", "kek-version-no-broker-numbers"])
def test_an_unreadable_index_record_can_be_deleted(
    s3_server: s3server.MotoServer, s3_bucket: str, damage: str
) -> None:
    """Every DeleteModel of a record that does not parse answered DATA_LOSS INDEX_CORRUPT, so on
    S3 (unlike the filesystem backend, which deletes such a row) only an edit of the bucket could
    remove it. It is deleted now; its blob goes too where the record still names one whose header
    names this model, and is kept otherwise (the sweep reports it)."""
    store = replica(s3_server.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"x")], StructureValidator())
    key = "p/index/acme/m!1"
    record = json.loads(store._client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    edited = b"not json" if damage == "not-json" else json.dumps(record | {"key_version": 0})
    store._client.put_object(Bucket=s3_bucket, Key=key, Body=edited)
    with pytest.raises(StoredDataCorrupt):
        store.stat("acme/m", "1")
    store.delete("acme/m", "1")
    with pytest.raises(ModelNotFound):
        store.stat("acme/m", "1")
    assert blob_count(store) == (1 if damage == "not-json" else 0)
    with pytest.raises(ModelNotFound):
        store.delete("acme/m", "1")


def test_an_unreadable_index_record_neither_stops_the_store_nor_frees_its_blob(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """One index object that does not parse (anyone who can write the bucket can put one) made
    the start-up sweep raise INDEX_CORRUPT: the store did not start at all. It starts now, and its
    sweep deletes no blob (a record it cannot read may point at one)."""
    store = replica(s3_server.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"x")], StructureValidator())
    store.put([make_artifact("acme/n", "1", b"y")], StructureValidator())
    store._client.put_object(Bucket=s3_bucket, Key="p/index/acme/m!1", Body=b"not json")
    store._client.put_object(Bucket=s3_bucket, Key="p/index/zz!1", Body=b"{}")
    later = datetime.now(UTC) + timedelta(days=2)  # every blob is past the grace period
    reopened = replica(s3_server.endpoint, s3_bucket, clock=lambda: later)
    assert reopened.last_sweep is not None
    assert reopened.last_sweep.unreadable_records == (("acme/m", "1"), ("zz", "1"))
    assert len(reopened.last_sweep.orphan_blobs) == 1  # acme/m's, reported
    assert (
        len(reopened.blob_sizes()) == 2
    )  # acme/m's blob stays, though no readable record names it
    assert read_all(reopened, "acme/n", "1") == make_artifact("acme/n", "1", b"y")


def test_a_lost_index_object_loses_no_blob(
    s3_server: s3server.MotoServer, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep deleted every blob older than the grace period that no index object named: an
    index object lost or rolled back (``index/`` restored from an older backup) lost its model for
    good a day later. Now the blob stays where it is, reported and logged; the store serves the
    records it has, restoring the index object brings the model back, and the same bytes can be
    published again."""
    store = replica(s3_server.endpoint, s3_bucket)
    kept_art, lost_art = (
        make_artifact("m", "1", body(3000, 1)),
        make_artifact("m", "2", body(3000, 2)),
    )
    store.put([kept_art], StructureValidator())
    store.put([lost_art], StructureValidator())
    key = "p/index/m!2"
    saved = store._client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    store._client.delete_object(Bucket=s3_bucket, Key=key)
    (lost_blob,) = set(store.blob_sizes()) - set(store.referenced_blobs())

    later = datetime.now(UTC) + timedelta(days=2)  # past the grace period
    with caplog.at_level(logging.WARNING):
        reopened = replica(s3_server.endpoint, s3_bucket, clock=lambda: later)
    assert reopened.last_sweep is not None and reopened.last_sweep.orphan_blobs == (lost_blob,)
    assert lost_blob in caplog.text
    assert lost_blob in reopened.blob_sizes()
    assert [(r.name, r.version) for r in reopened.records()] == [("m", "1")]
    assert read_all(reopened, "m", "1") == kept_art

    store._client.put_object(Bucket=s3_bucket, Key=key, Body=saved)  # the index object restored
    assert read_all(reopened, "m", "2") == lost_art
    store._client.delete_object(Bucket=s3_bucket, Key=key)
    assert reopened.put([lost_art], StructureValidator()).name == "m"  # or published again
    assert read_all(reopened, "m", "2") == lost_art


def test_records_from_before_the_format_field_get_it_from_their_header_at_start(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    store = replica(s3_server.endpoint, s3_bucket)
    store.put([make_artifact("legacy", "1", b"a", format_version=2)], StructureValidator())
    key = "p/index/legacy!1"
    record = json.loads(store._client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    assert record.pop("artifact_format") == 2
    store._client.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(record).encode())
    assert store.stat("legacy", "1").artifact_format == 0  # as an older store wrote it
    reopened = replica(s3_server.endpoint, s3_bucket)
    assert reopened.last_sweep is not None and reopened.last_sweep.formats_recorded == 1
    assert reopened.stat("legacy", "1").artifact_format == 2
    again = replica(s3_server.endpoint, s3_bucket)
    assert again.last_sweep is not None and again.last_sweep.formats_recorded == 0


def test_an_index_object_larger_than_any_record_is_not_read_whole(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    store = replica(s3_server.endpoint, s3_bucket)
    store.put([make_artifact("acme/m", "1", b"x")], StructureValidator())
    key = "p/index/acme/m!1"
    record = store._client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    store._client.put_object(Bucket=s3_bucket, Key=key, Body=record + b" " * (1 << 20))
    with pytest.raises(StoredDataCorrupt, match="over 65536 bytes") as info:
        store.stat("acme/m", "1")
    assert info.value.reason == "INDEX_CORRUPT"


def test_a_second_replica_sees_everything_without_local_state(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    a = replica(s3_server.endpoint, s3_bucket)
    for name in ("acme/a", "acme/a/deep", "acme-x", "beta"):
        a.put([make_artifact(name, "1", b"x")], StructureValidator())
    b = replica(s3_server.endpoint, s3_bucket)
    assert b.list(page_size=1000).models == a.list(page_size=1000).models
    assert [m.name for m in b.list(prefix="acme/").models] == ["acme/a", "acme/a/deep"]
    b.delete("beta", "1")
    with pytest.raises(ModelExists):
        b.put([make_artifact("acme/a", "1", b"y")], StructureValidator())
    assert [m.name for m in a.list().models] == ["acme-x", "acme/a", "acme/a/deep"]


def test_racing_uploads_to_two_replicas_have_exactly_one_winner(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    n = 4
    replicas = [replica(s3_server.endpoint, s3_bucket) for _ in range(n)]
    arts = [make_artifact("race", "1", body(S3_TEST_PART_SIZE + 1000, i)) for i in range(n)]
    all_sent = threading.Barrier(n)
    outcomes: list[object] = [None] * n

    # One upload per replica (a replica's own reservation would stop a second one early), each
    # holding its last step until every upload has sent all its bytes: every one reaches the
    # create-only publish, whatever the scheduling, and the bucket alone decides.
    def upload_late(i: int) -> None:
        def chunks() -> Iterator[bytes]:
            yield from chunked(arts[i], 1 << 20)
            all_sent.wait(60)

        try:
            outcomes[i] = replicas[i].put(chunks(), StructureValidator())
        except ModelExists as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=upload_late, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, ModelExists)]
    assert len(winners) == 1, outcomes
    losers = [o for o in outcomes if isinstance(o, ModelExists)]
    assert [e.reason for e in losers] == ["MODEL_EXISTS"] * (n - 1), "the bucket decided"
    for r in replicas:
        assert read_all(r, "race", "1") == arts[winners[0]]
        r.verify("race", "1")
    assert_clean(replicas[0])


def test_failed_multipart_upload_is_aborted(s3_server: s3server.MotoServer, s3_bucket: str) -> None:
    store = replica(s3_server.endpoint, s3_bucket)
    art = make_artifact("m", "1", body(BIG))
    with pytest.raises(InvalidArgument) as info:
        store.put(chunked(art[:-1], 1 << 20), StructureValidator())
    assert info.value.reason == "TRUNCATED"

    def broken() -> Iterator[bytes]:
        yield from chunked(art[: S3_TEST_PART_SIZE + 100], 1 << 20)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put(broken(), StructureValidator())
    assert store.records() == ()
    assert store.blob_sizes() == {}
    assert_clean(store)


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    reason = dict(err.trailing_metadata() or ()).get("strongroom-reason", "")  # type: ignore[attr-defined,arg-type]
    return err.code(), str(reason)  # type: ignore[attr-defined]


def _put_rpc(stub: pb_grpc.ModelStoreServiceStub, art: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.PutModel(iter([pb.PutModelRequest(data=c) for c in chunked(art, 1 << 20)]), timeout=60)
    return _status(info.value)


@pytest.fixture
def proxied(proxy: s3server.FaultProxy, s3_bucket: str) -> Iterator[Any]:
    store = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 2, "read_timeout": 1.0})
    host, channel = serve(store)
    try:
        yield store, pb_grpc.ModelStoreServiceStub(channel)
    finally:
        channel.close()
        host.stop(0)


def test_server_errors_are_unavailable_and_leave_nothing(
    proxy: s3server.FaultProxy, proxied: Any, s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    store, stub = proxied
    proxy.inject(s3server.Fault(lambda m, p: m == "PUT" and "partNumber=2" in p, status=503))
    art = make_artifact("m", "1", body(BIG))
    assert _put_rpc(stub, art) == (grpc.StatusCode.UNAVAILABLE, "S3_SERVER_ERROR")
    proxy.clear()
    assert store.records() == () and store.blob_sizes() == {}
    assert_clean(store)  # the multipart upload was aborted
    proxy.inject(s3server.Fault(lambda m, p: m == "GET", status=500))
    with pytest.raises(grpc.RpcError) as info:
        stub.StatModel(pb.StatModelRequest(name="m", version="1"), timeout=30)
    assert _status(info.value) == (grpc.StatusCode.UNAVAILABLE, "S3_SERVER_ERROR")
    proxy.clear()
    # A transient 503 is retried by the client and the upload succeeds whole.
    proxy.inject(
        s3server.Fault(lambda m, p: m == "PUT" and "partNumber=1" in p, status=503, times=1)
    )
    stub.PutModel(iter([pb.PutModelRequest(data=c) for c in chunked(art, 1 << 20)]), timeout=60)
    assert read_all(store, "m", "1") == art


def test_slow_server_is_a_timeout(proxy: s3server.FaultProxy, proxied: Any) -> None:
    store, stub = proxied
    store.put([make_artifact("m", "1", b"abc")], StructureValidator())
    proxy.inject(s3server.Fault(lambda m, p: m == "GET", delay=2.5))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetModel(pb.GetModelRequest(name="m", version="1"), timeout=30))
    assert _status(info.value) == (grpc.StatusCode.UNAVAILABLE, "S3_TIMEOUT")


def test_server_gone_mid_upload_leaves_nothing_visible(
    proxy: s3server.FaultProxy, proxied: Any, s3_bucket: str
) -> None:
    store, stub = proxied

    # Once the first part is in, every request dies with its connection (the abort too).
    def after_first_part(method: str, path: str) -> bool:
        return any("partNumber=1" in q for _, q in proxy.requests[:-1])

    proxy.inject(s3server.Fault(after_first_part, drop=True))
    art = make_artifact("m", "1", body(BIG))
    assert _put_rpc(stub, art) == (grpc.StatusCode.UNAVAILABLE, "S3_UNREACHABLE")
    proxy.clear()
    assert store.records() == () and store.blob_sizes() == {}
    assert len(store.pending_uploads()) == 1, "the abort could not reach the server"
    # The sweep leaves a young upload alone (another replica may own it), removes an old one.
    assert store.sweep().uploads_aborted == 0
    later = replica(proxy.endpoint, s3_bucket, clock=lambda: datetime.now(UTC) + timedelta(days=2))
    assert later.last_sweep is not None and later.last_sweep.uploads_aborted == 1
    assert_clean(store)


def test_killed_server_is_unavailable(tmp_path: Path) -> None:
    with s3server.moto_server(tmp_path) as server:
        s3 = s3server.client(server.endpoint)
        bucket = s3server.new_bucket(s3)
        store = replica(server.endpoint, bucket, client={"max_attempts": 1})
        chunks = iter(chunked(make_artifact("m", "1", body(BIG)), 1 << 20))
        first = [next(chunks) for _ in range(6)]  # one part sent
        server.stop()
        with pytest.raises(StorageUnavailable) as info:
            store.put(iter(first + list(chunks)), StructureValidator())
        assert info.value.reason == "S3_UNREACHABLE"
        with pytest.raises(StorageUnavailable) as info:
            store.stat("m", "1")
        assert info.value.reason == "S3_UNREACHABLE"


def test_rejected_credentials(tmp_path: Path) -> None:
    with s3server.moto_server(tmp_path, auth=True) as server:
        setup = s3server.client(server.endpoint)
        bucket = s3server.new_bucket(setup)
        iam = s3server.iam_client(server.endpoint)
        iam.create_user(UserName="store")
        iam.put_user_policy(
            UserName="store",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="store")["AccessKey"]
        good = {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
        # At start-up: the store refuses to open with credentials the bucket rejects.
        for bad in ({"access_key": "AKIAUNKNOWN000000000"}, {**good, "secret_key": "wrong"}):
            with pytest.raises(StorageUnavailable) as info:
                replica(server.endpoint, bucket, client={**good, **bad, "max_attempts": 1})
            assert info.value.reason == "S3_ACCESS_DENIED"
        # At run time: the store's secret stops being accepted (rotated on the server side). The
        # store opened with the good key; its client now signs with a stale secret. (In moto's
        # authenticated mode this user's requests on index keys were refused with 403 even when
        # signed with the good key -- we did not find out why -- so an authenticated upload that
        # succeeds is shown by the unauthenticated server's tests instead.)
        store = replica(server.endpoint, bucket, client={**good, "max_attempts": 1}, sweep=False)
        store._client = s3server.client(server.endpoint, **{**good, "secret_key": "rotated"})
        host, channel = serve(store)
        try:
            stub = pb_grpc.ModelStoreServiceStub(channel)
            assert _put_rpc(stub, make_artifact("m", "2", body(10))) == (
                grpc.StatusCode.UNAVAILABLE,
                "S3_ACCESS_DENIED",
            )
            with pytest.raises(grpc.RpcError) as rpc:
                stub.StatModel(pb.StatModelRequest(name="m", version="2"), timeout=30)
            assert _status(rpc.value) == (grpc.StatusCode.UNAVAILABLE, "S3_ACCESS_DENIED")
        finally:
            channel.close()
            host.stop(0)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://localhost.example.com:9000",
        "http://127.0.0.1.nip.io",
        "http://localhost:9000@s3.example.com",
        "http://[::1]@s3.example.com",
        "http://127.0.0.1:notaport",
        "ftp://127.0.0.1",
    ],
)
def test_plain_http_reaches_only_a_loopback_host(endpoint: str) -> None:
    """The loopback exception for plain http compared the URL's text: ``http://localhost`` or
    ``http://127.`` followed by anything passed, so a configuration could send every index record
    and artifact in the clear to another machine (a DNS name starting ``localhost.``/``127.``, or
    a user-info part before the real host). The parsed host decides now."""
    with pytest.raises(ConfigError, match="endpoint"):
        StorageConfig(backend="s3", endpoint=endpoint, bucket="b")


def test_a_prefix_too_long_for_s3_keys_is_refused() -> None:
    """Any prefix was taken: past 824 bytes, the index key of a model with the longest name and
    version passed S3's 1,024-byte key limit, and every such publish failed as S3_ERROR."""
    base = {"backend": "s3", "endpoint": "https://s3.example.com", "bucket": "b"}
    longest = "p" * (MAX_S3_PREFIX_BYTES - 1) + "/"
    assert StorageConfig(**base, prefix=longest).prefix == longest  # type: ignore[arg-type]
    assert len(f"{longest}index/{'n' * 128}!{'v' * 64}".encode()) <= 1024
    with pytest.raises(ConfigError, match="longer than 824 bytes"):
        StorageConfig(**base, prefix="p" * MAX_S3_PREFIX_BYTES + "/")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="longer than"):
        StorageConfig(**base, prefix="é" * 413 + "/")  # type: ignore[arg-type]  # bytes, not characters


@pytest.mark.parametrize(
    "endpoint",
    ["https://s3.example.com", "http://127.0.0.1:9000", "http://[::1]:9000", "http://localhost"],
)
def test_https_or_loopback_endpoints_are_accepted(endpoint: str) -> None:
    assert StorageConfig(backend="s3", endpoint=endpoint, bucket="b").endpoint == endpoint


def test_configuration(
    tmp_path: Path, s3_server: s3server.MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError):
        build(ModelstoreConfig, {"storage": {"backend": "s3", "bucket": "b"}})
    with pytest.raises(ConfigError):
        build(
            ModelstoreConfig,
            {"storage": {"backend": "s3", "endpoint": "http://s3.example", "bucket": "b"}},
        )
    with pytest.raises(ConfigError):
        build(ModelstoreConfig, {})  # the filesystem backend needs data_dir
    with pytest.raises(ConfigError):
        build(
            ModelstoreConfig,
            {
                "storage": {
                    "backend": "s3",
                    "endpoint": "https://s3",
                    "bucket": "b",
                    "access_key": "x",
                }
            },
        )
    secret = tmp_path / "secret"
    secret.write_text(s3server.SECRET_KEY + "\n")
    secret.chmod(0o600)
    monkeypatch.setenv("STRONGROOM_S3_ACCESS_KEY_ID", s3server.ACCESS_KEY)
    config = build(
        ModelstoreConfig,
        {
            "storage": {
                "backend": "s3",
                "endpoint": s3_server.endpoint,
                "bucket": s3_bucket,
                "prefix": "prod/",
                "secret_access_key_file": str(secret),
            }
        },
    )
    assert isinstance(config.storage, StorageConfig)
    store = open_storage(config)
    assert isinstance(store, S3Storage) and store.prefix == "prod/"
    store.put([make_artifact("m", "1", b"x")], StructureValidator())
    assert "secret" not in repr(config).lower() or s3server.SECRET_KEY not in repr(config)
    secret.chmod(0o644)
    with pytest.raises(Exception) as info:
        open_storage(config)
    assert getattr(info.value, "reason", "") == "SECRET_FILE_PERMISSIONS"
    secret.chmod(0o600)
    # In production a credential given both as a file and a variable is refused (the variable
    # silently replaced the file the operator provisioned); in development the variable wins.
    monkeypatch.setenv(config.storage.secret_access_key_env, "from-the-environment")
    with pytest.raises(Exception) as info:
        open_storage(config, single_secrets=True)
    assert getattr(info.value, "reason", "") == "SECRET_AMBIGUOUS"
    assert "from-the-environment" not in str(info.value)


def _index_write(method: str, path: str) -> bool:
    return method == "PUT" and "/p/index/" in path


def _lost_answer(how: str) -> s3server.Fault:
    """The next index write reaches the bucket and takes effect, but its answer is lost: the
    connection drops, or a 503 comes back (both retried by botocore; the retry gets 412)."""
    if how == "dropped":
        return s3server.Fault(_index_write, after_upstream=True, drop=True, times=1)
    return s3server.Fault(_index_write, after_upstream=True, status=503, times=1)


def _get_rpc(stub: pb_grpc.ModelStoreServiceStub, name: str, version: str) -> bytes:
    request = pb.GetModelRequest(name=name, version=version)
    return b"".join(r.data for r in stub.GetModel(request, timeout=60))


@pytest.mark.parametrize("how", ["dropped", "503"])
def test_a_lost_answer_to_the_key_slot_swap_does_not_lose_the_model(
    proxy: s3server.FaultProxy, proxied: Any, how: str
) -> None:
    """The index swap took effect but its answer was lost; botocore's retry then got 412 (the
    ETag had moved: to our own record). The store took that for a concurrent change, answered
    KEY_SLOT_CHANGED and deleted the new blob, which the index named: the model was lost
    (DATA_LOSS BLOB_MISSING on every read, and a re-run of the rotation cannot repair it)."""
    store, stub = proxied
    store.put(chunked(rewrap_case.artifact("acme/m", "1"), 7000), StructureValidator())
    proxy.inject(_lost_answer(how))
    answer = stub.ReplaceKeySlot(
        pb.ReplaceKeySlotRequest(
            name="acme/m",
            version="1",
            expected_key_version=1,
            key_version=2,
            wrapped_data_key=rewrap_case.wrapped("acme/m", "1", 2),
        ),
        timeout=60,
    )
    proxy.clear()
    assert answer.replaced and answer.model.key_version == 2
    stored = _get_rpc(stub, "acme/m", "1")
    assert rewrap_case.decrypt_stored(stored) == rewrap_case.plaintext_of("acme/m", "1", 100_000)
    assert store.verify("acme/m", "1").key_version == 2
    assert_clean(store)


@pytest.mark.parametrize("how", ["dropped", "503"])
def test_a_lost_answer_to_the_publish_does_not_lose_the_model(
    proxy: s3server.FaultProxy, proxied: Any, how: str
) -> None:
    """The index object was created but the answer was lost; the retry got 412 (the object
    exists: ours). The store answered ALREADY_EXISTS and deleted the blob the index named: the
    version existed, immutable, and every read of it was DATA_LOSS BLOB_MISSING."""
    store, stub = proxied
    art = make_artifact("m", "1", body(1000))
    proxy.inject(_lost_answer(how))
    answer = stub.PutModel(
        iter([pb.PutModelRequest(data=c) for c in chunked(art, 1 << 20)]), timeout=60
    )
    proxy.clear()
    assert (answer.model.name, answer.model.version) == ("m", "1")
    assert _get_rpc(stub, "m", "1") == art
    assert_clean(store)


def test_an_index_write_that_may_still_land_keeps_its_blob(
    proxy: s3server.FaultProxy, proxied: Any, s3_bucket: str
) -> None:
    """Every attempt of the publish failed without an answer that says it did not happen: the
    store cannot know whether the write will still land, so it keeps the blob (reported by a
    later sweep if nothing names it) instead of risking an index naming a deleted blob."""
    store, stub = proxied
    art = make_artifact("m", "1", body(1000))
    proxy.inject(s3server.Fault(_index_write, status=503))
    assert _put_rpc(stub, art) == (grpc.StatusCode.UNAVAILABLE, "S3_SERVER_ERROR")
    proxy.clear()
    assert store.records() == ()
    assert len(store.blob_sizes()) == 1
    later = replica(proxy.endpoint, s3_bucket, clock=lambda: datetime.now(UTC) + timedelta(days=2))
    assert later.last_sweep is not None
    assert later.last_sweep.orphan_blobs == tuple(store.blob_sizes())


def _list_rpc(stub: pb_grpc.ModelStoreServiceStub, page_size: int) -> list[tuple[str, str]]:
    listed: list[tuple[str, str]] = []
    token = ""
    while True:
        request = pb.ListModelsRequest(page_size=page_size, page_token=token)
        page = stub.ListModels(request, timeout=30)
        listed += [(m.name, m.version) for m in page.models]
        token = page.next_page_token
        if not token:
            return listed


@pytest.mark.parametrize("page_size", [1, 2, 3])
def test_objects_under_the_index_that_are_not_records_do_not_end_a_listing(
    s3_server: s3server.MotoServer, s3_bucket: str, page_size: int
) -> None:
    """A key under ``index/`` that is no record (a "folder" an S3 console creates, ``index/acme/``)
    counted against a page's size: a page that met one looked shorter than asked for, so the
    store answered it as the last page and every later model went unlisted. The rotation client
    and ``keys disable``'s check list the store this way: those models were neither re-wrapped
    nor seen as needing the old KEK version, which the check then let be disabled."""
    store = replica(s3_server.endpoint, s3_bucket)
    names = [f"acme/m{i}" for i in range(5)]
    for name in names:
        store.put([make_artifact(name, "1", b"x")], StructureValidator())
    for marker in ("p/index/", "p/index/acme/", "p/index/acme/m2/"):
        store._client.put_object(Bucket=s3_bucket, Key=marker, Body=b"")
    host, channel = serve(store)
    try:
        listed = _list_rpc(pb_grpc.ModelStoreServiceStub(channel), page_size)
    finally:
        channel.close()
        host.stop(0)
    assert listed == [(name, "1") for name in names]


@pytest.mark.parametrize("page_size", [1, 2, 3])
def test_index_keys_outside_the_name_grammar_are_not_records(
    s3_server: s3server.MotoServer, s3_bucket: str, page_size: int
) -> None:
    """Index keys this store cannot have written, since their name or version is outside the
    grammar: a "folder" whose name has a ``!`` (``index/acme/m1!old/``) was read as the record of
    version ``old/`` and failed every listing that met it with DATA_LOSS; a record copied under a
    name no client accepts (``acme/m b``) was listed, and the next page refused the token naming
    it (INVALID_PAGE_TOKEN). Both stopped the walk there (the rotation client's too)."""
    store = replica(s3_server.endpoint, s3_bucket)
    names = [f"acme/m{i}" for i in range(4)]
    for name in names:
        store.put([make_artifact(name, "1", b"x")], StructureValidator())
    store._client.put_object(Bucket=s3_bucket, Key="p/index/acme/m1!old/", Body=b"")
    record = json.loads(
        store._client.get_object(Bucket=s3_bucket, Key="p/index/acme/m1!1")["Body"].read()
    )
    record["name"] = "acme/m b"
    store._client.put_object(
        Bucket=s3_bucket, Key="p/index/acme/m b!1", Body=json.dumps(record).encode()
    )
    host, channel = serve(store)
    try:
        listed = _list_rpc(pb_grpc.ModelStoreServiceStub(channel), page_size)
    finally:
        channel.close()
        host.stop(0)
    assert listed == [(name, "1") for name in names]


def test_a_scoped_page_reads_the_records_it_needs_not_a_thousand(
    proxy: s3server.FaultProxy, s3_bucket: str
) -> None:
    """A publisher's page of its own models (a publisher whose reads ``modelstore.publishers``
    scopes) asked the backend for pages of 1,000 records whatever its size: on S3 each record
    is a GET, so a page of 2 read all 40 here (up to 1,000), and ``model ls``'s default page of
    100 ten times the records it showed. It reads what the page needs, in order, tokens as
    before; skipped models of others still count, and are read in growing pages."""
    store = replica(proxy.endpoint, s3_bucket)
    caller = "spiffe://t.test/publisher"
    scopes = PublisherScopes({caller: ("team-a/", "shared/m")})
    names = [f"team-a/m{i:02}" for i in range(40)]
    for name in (*names, "shared/m", "shared/m-other", "shared/n"):
        store.put([make_artifact(name, "1", b"x")], StructureValidator())
    servicer = ModelStoreServicer(store, publishers=scopes)

    def record_gets() -> int:
        return sum(1 for m, p in proxy.requests if m == "GET" and "/p/index/" in p)

    listed: list[str] = []
    token = ""
    while True:
        before = record_gets()
        page = servicer._scoped_page("", 2, token, scopes, caller)
        models, token = page.models, page.next_page_token
        assert record_gets() - before <= 4  # two records, and the one other skipped at most
        listed += [m.name for m in models]
        if not token:
            break
    assert listed == ["shared/m", *names]


def _blob_commit(method: str, path: str) -> bool:
    """The request that makes a blob exist: its PutObject, or CompleteMultipartUpload."""
    blob = "/p/blobs/" in path
    return blob and (
        (method == "PUT" and "uploadId=" not in path) or (method == "POST" and "uploadId=" in path)
    )


@pytest.mark.parametrize("size", [1000, BIG], ids=["one-put", "multipart"])
@pytest.mark.parametrize("how", ["dropped", "503"])
def test_a_lost_answer_to_a_blob_commit_is_not_an_internal_error(
    proxy: s3server.FaultProxy, proxied: Any, size: int, how: str
) -> None:
    """The blob was written but the answer was lost; botocore's retry was refused (412: the
    create-only key exists, ours; or the multipart upload is already completed). The store took
    that for a random key colliding and failed the upload with INTERNAL, leaving the blob behind
    until a sweep; it now finds its own blob there, whole, and carries on. (moto answers a
    repeated CompleteMultipartUpload with success, so only the one-PutObject cases failed here;
    a server that refuses the repeat takes the same path.)"""
    store, stub = proxied
    art = make_artifact("m", "1", body(size))
    fault = s3server.Fault(_blob_commit, after_upstream=True, times=1)
    fault.drop, fault.status = (True, None) if how == "dropped" else (False, 503)
    proxy.inject(fault)
    answer = stub.PutModel(
        iter([pb.PutModelRequest(data=c) for c in chunked(art, 1 << 20)]), timeout=60
    )
    proxy.clear()
    assert fault.hits == 1
    assert answer.model.artifact_size == len(art)
    assert _get_rpc(stub, "m", "1") == art
    assert_clean(store)


@pytest.mark.parametrize("how", ["dropped", "503"])
def test_a_lost_answer_to_a_delete_deletes_the_model_and_its_blob(
    proxy: s3server.FaultProxy, proxied: Any, how: str
) -> None:
    """The index object's conditional delete took effect but its answer was lost; the retry
    found no object. The store answered NOT_FOUND ("deleted meanwhile") for the delete it had
    just made, and kept the model's encrypted blob in the bucket until a restart's sweep."""
    store, stub = proxied
    store.put([make_artifact("m", "1", body(1000))], StructureValidator())
    fault = s3server.Fault(
        lambda m, p: m == "DELETE" and "/p/index/" in p, after_upstream=True, times=1
    )
    fault.drop, fault.status = (True, None) if how == "dropped" else (False, 503)
    proxy.inject(fault)
    stub.DeleteModel(pb.DeleteModelRequest(name="m", version="1"), timeout=60)
    proxy.clear()
    assert fault.hits == 1
    assert store.records() == ()
    assert store.blob_sizes() == {}


@pytest.mark.parametrize(
    "ignored", [("If-None-Match",), ("If-Match",), ("If-None-Match", "If-Match")]
)
def test_an_object_store_that_ignores_conditional_writes_is_refused_at_start(
    s3_server: s3server.MotoServer, s3_bucket: str, ignored: tuple[str, ...]
) -> None:
    """Immutability of a version across replicas is the bucket's create-only write, a re-wrap's
    safety its If-Match: a server that ignored either (here a proxy that drops the header)
    answered those writes with success, so racing uploads both "won" (the later replacing the
    earlier) and a re-wrap could overwrite a re-published artifact. The store started on it
    all the same; it now refuses to, naming what is ignored, and leaves nothing in the bucket."""
    proxy = s3server.FaultProxy(
        s3_server.port, ignored_headers=frozenset(h.lower() for h in ignored)
    )
    try:
        with pytest.raises(FailedPrecondition) as info:
            replica(proxy.endpoint, s3_bucket)
    finally:
        proxy.close()
    assert info.value.reason == "S3_CONDITIONAL_WRITES_IGNORED"
    assert all(h in str(info.value) for h in ignored)
    assert "Contents" not in s3server.client(s3_server.endpoint).list_objects_v2(Bucket=s3_bucket)
    # A conforming server passes the check, and its probe leaves nothing either.
    replica(s3_server.endpoint, s3_bucket)
    assert "Contents" not in s3server.client(s3_server.endpoint).list_objects_v2(Bucket=s3_bucket)


@pytest.mark.parametrize("answer", ["ignored", "501"])
def test_an_object_store_without_if_match_on_delete_is_named_and_still_deletes(
    proxy: s3server.FaultProxy,
    s3_server: s3server.MotoServer,
    s3_bucket: str,
    answer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delete removes the index object on the ETag it read (If-Match), then the blob that
    record named. The start-up check tried If-Match on PutObject only: a server that answers it
    501 on DeleteObject (AWS did until September 2025) started, and then every delete failed
    (UNAVAILABLE S3_SERVER_ERROR); one that ignores it there (MinIO) started without a word,
    though a delete racing a re-wrap then leaves the re-wrapped artifact behind. Both are
    named at start now (a WARNING: no model can be lost or replaced that way), and deletes are
    sent without the header, so they work."""
    if answer == "ignored":
        proxy.ignored_headers = frozenset({"if-match"})
        proxy.ignored_on = frozenset({"DELETE"})
    else:
        proxy.not_implemented = frozenset({("DELETE", "if-match")})
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore._s3"):
        store = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    store.put([make_artifact("m", "1", body(1000))], StructureValidator())
    store.delete("m", "1")
    assert "Contents" not in s3server.client(s3_server.endpoint).list_objects_v2(Bucket=s3_bucket)
    assert any("If-Match on DeleteObject" in r.getMessage() for r in caplog.records)
    assert store.conditional_deletes is False
    # A server that honours it is used as before, without a word.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore._s3"):
        assert replica(s3_server.endpoint, s3_bucket).conditional_deletes is True
    assert not any("DeleteObject" in r.getMessage() for r in caplog.records)


def test_probe_objects_left_by_interrupted_starts_are_removed(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """Each start writes a probe object and removes it; a start killed in between (or whose
    delete failed) left it in the bucket, and nothing ever removed it: one more per crash loop.
    The start-up sweep now deletes those older than a day; a younger one (another replica's
    check under way) and keys the store does not make stay."""
    client = s3server.client(s3_server.endpoint)
    old = f"p/probes/20200101T000000Z-{'a' * 32}"
    young = f"p/probes/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{'b' * 32}"
    foreign = "p/probes/20200101T000000Z-not-the-stores"
    for key in (old, young, foreign):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    sweep = replica(s3_server.endpoint, s3_bucket).last_sweep
    assert sweep is not None and sweep.probes_removed == 1
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(item["Key"] for item in listed) == sorted([young, foreign])


def test_a_bucket_that_requires_conditional_deletes_gets_only_conditional_deletes(
    proxy: s3server.FaultProxy, s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """A bucket policy may require If-Match on every DeleteObject (AWS's s3:if-match condition
    key). The store sent it only on index deletes: its deletes of a deleted model's blob, of a
    re-wrapped model's old blob and of its start-up probes were denied (each left behind, only
    logged). Every delete of the store is conditional now, on the object's own ETag (moto, the
    server here, refuses If-Match: *), and nothing is left."""
    proxy.conditional_deletes_required = True
    client = s3server.client(s3_server.endpoint)
    old_probe = f"p/probes/20200101T000000Z-{'a' * 32}"
    client.put_object(Bucket=s3_bucket, Key=old_probe, Body=b"")
    store = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    assert store.conditional_deletes is True
    assert store.last_sweep is not None and store.last_sweep.probes_removed == 1
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket)
    store.put([rewrap_case.artifact("acme/m", "1", 5000)], StructureValidator())
    store.replace_key_slot(
        "acme/m",
        "1",
        expected_key_version=1,
        key_version=2,
        wrapped_dek=rewrap_case.wrapped("acme/m", "1", 2),
    )
    assert blob_count(store) == 1
    store.delete("acme/m", "1")
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket)


def test_an_object_store_that_refuses_conditional_writes_outright_is_named(
    proxy: s3server.FaultProxy, s3_bucket: str
) -> None:
    """A server that answers a conditional write 501 NotImplemented says what one that ignores
    it hides: the start fails with the same reason, not as an unexplained S3_ERROR."""
    proxy.inject(
        s3server.Fault(
            lambda m, p: m == "PUT" and "/p/probes/" in p, status=501, code="NotImplemented"
        )
    )
    with pytest.raises(FailedPrecondition) as info:
        replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    assert info.value.reason == "S3_CONDITIONAL_WRITES_IGNORED"


@pytest.mark.parametrize("how", ["dropped", "503"])
def test_a_lost_answer_to_the_probes_create_does_not_stop_the_start(
    proxy: s3server.FaultProxy, s3_bucket: str, how: str
) -> None:
    """The start-up check's first write (a create-only PutObject of a fresh probe key) took
    effect but its answer was lost; botocore's retry got 412, made by that very write. The check
    re-raised it: a healthy store refused to start (UNAVAILABLE S3_ERROR, "the object store
    refused a request") on one dropped answer. The retry's refusal is the create it expects."""
    fault = proxy.inject(
        s3server.Fault(
            lambda m, p: m == "PUT" and "/p/probes/" in p,
            after_upstream=True,
            drop=how == "dropped",
            status=503 if how == "503" else None,
            times=1,
        )
    )
    replica(proxy.endpoint, s3_bucket)
    assert fault.hits == 1
    assert "Contents" not in s3server.client(proxy.endpoint).list_objects_v2(Bucket=s3_bucket)


def test_a_model_published_while_another_replica_sweeps_is_not_reported_missing(
    proxy: s3server.FaultProxy, s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """The start-up sweep lists the blobs, then reads the index: a model published in between
    (by another replica) has a record naming a blob the listing did not have, and was reported
    as a missing blob (logged as a damaged model) though nothing was lost. It is looked up on
    its own now; a blob that is really gone is still reported."""
    other = replica(s3_server.endpoint, s3_bucket)
    other.put([make_artifact("m", "1", b"x")], StructureValidator())

    def publish_between(method: str, path: str) -> bool:
        listing_the_index = method == "GET" and "list-type=2" in path and "index" in path
        if listing_the_index and all(r.name != "late" for r in other.records()):
            other.put([make_artifact("late", "1", b"y")], StructureValidator())
        return False

    proxy.inject(s3server.Fault(publish_between))
    sweep = replica(proxy.endpoint, s3_bucket).last_sweep
    assert sweep is not None
    assert (sweep.missing_blobs, sweep.damaged_blobs) == ((), ())
    assert [r.name for r in other.records()] == ["late", "m"]
    for blob, record in other.referenced_blobs().items():
        if record.name == "m":
            other._client.delete_object(Bucket=s3_bucket, Key=other.prefix + blob)
    assert replica(s3_server.endpoint, s3_bucket).last_sweep.missing_blobs == (("m", "1"),)  # type: ignore[union-attr]


def test_a_failed_lookup_of_a_blob_the_sweep_did_not_list_is_not_a_missing_model(
    proxy: s3server.FaultProxy, s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """A model published between the sweep's blob listing and its index read has its blob
    looked up on its own; a lookup that failed (throttled, a 5xx after the retries) was taken
    for a missing blob, and the model reported lost at start on one transient answer. It is
    reported as not checked now, and only a blob really gone is missing."""
    other = replica(s3_server.endpoint, s3_bucket)

    def publish_between(method: str, path: str) -> bool:
        listing_the_index = method == "GET" and "list-type=2" in path and "index" in path
        if listing_the_index and not other.records():
            other.put([make_artifact("late", "1", b"y")], StructureValidator())
        return False

    proxy.inject(s3server.Fault(publish_between))
    proxy.inject(s3server.Fault(lambda m, p: m == "HEAD" and "/p/blobs/" in p, status=503))
    sweep = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1}).last_sweep
    assert sweep is not None
    assert sweep.missing_blobs == ()
    assert sweep.unchecked_blobs == (("late", "1"),)


def test_a_server_that_answers_a_range_with_the_whole_object_is_not_data_loss(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """HTTP lets a server or proxy answer a byte range with the whole object (200, no
    Content-Range; here a proxy drops the Range header). The store read that as a size of -1:
    every download was DATA_LOSS "wrong size" though nothing was damaged. A download from the
    start is served from the whole object now; a range elsewhere is the server's failure,
    UNAVAILABLE S3_RANGE_IGNORED, never DATA_LOSS."""
    proxy = s3server.FaultProxy(s3_server.port, ignored_headers=frozenset({"range"}))
    try:
        store = replica(proxy.endpoint, s3_bucket)
        art = make_artifact("m", "1", body(3000))
        store.put([art], StructureValidator())
        assert read_all(store, "m", "1") == art
        with store.open("m", "1", length=100) as reader:
            assert b"".join(reader.chunks(64)) == art[:100]
        store.verify("m", "1")
        with pytest.raises(StorageUnavailable) as info:
            store.open("m", "1", offset=10)
        assert info.value.reason == "S3_RANGE_IGNORED"
    finally:
        proxy.close()


@pytest.mark.parametrize("ranges", ["honoured", "ignored"])
def test_a_chunked_answer_without_content_length_is_read_within_the_record(
    s3_server: s3server.MotoServer, s3_bucket: str, ranges: str
) -> None:
    """A 200 in the chunked transfer coding has no Content-Length (legitimate HTTP/1.1). The store
    read its absent length as a size of -1: every download through such a server or proxy was
    DATA_LOSS "wrong size", the models intact. It reads the body now, no further than the index
    record's size: more bytes than the record says are DATA_LOSS as before, fewer are truncated,
    and a range elsewhere answered with the whole object is S3_RANGE_IGNORED."""
    ignored = frozenset({"range"}) if ranges == "ignored" else frozenset()
    proxy = s3server.FaultProxy(s3_server.port, ignored_headers=ignored, chunked=True)
    try:
        store = replica(proxy.endpoint, s3_bucket)
        art = make_artifact(f"chunked-{ranges}", "1", body(5000))
        store.put([art], StructureValidator())
        name = f"chunked-{ranges}"
        assert read_all(store, name, "1") == art
        with store.open(name, "1", length=100) as reader:
            assert b"".join(reader.chunks(64)) == art[:100]
        assert store.verify(name, "1") == store.stat(name, "1")
        if ranges == "ignored":
            with pytest.raises(StorageUnavailable) as unavailable:
                store.open(name, "1", offset=10)
            assert unavailable.value.reason == "S3_RANGE_IGNORED"
        else:
            with store.open(name, "1", offset=10, length=90) as reader:
                assert b"".join(reader.chunks(64)) == art[10:100]
        record = store.stat(name, "1")
        # A 206 names the object's size in its Content-Range; a whole-object 200 has only its body.
        short = "BLOB_TRUNCATED" if ranges == "ignored" else "BLOB_SIZE_MISMATCH"
        for stored, reason in ((art + b"x", "BLOB_SIZE_MISMATCH"), (art[:-1], short)):
            overwrite_blob(store, record, stored)
            with pytest.raises(StoredDataCorrupt) as info:
                read_all(store, name, "1")
            assert info.value.reason == reason
            assert store.stat(name, "1") == record
    finally:
        proxy.close()


def test_a_head_answer_without_content_length_is_not_an_internal_error(
    s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """HTTP lets a HEAD answer leave out Content-Length (RFC 9110, 9.3.2; a server or proxy that
    streams its GETs chunked need not know the size). The store read it as
    ``response["ContentLength"]``: a KeyError, so a GetModel at the artifact's end (offset =
    size, which any reader of the model may send) was INTERNAL, and a start-up sweep that looked
    up a blob published during its listing crashed the store's start. The end of an artifact
    is read as nothing now (the blob is there, and nothing of it is served), and the sweep
    reports such a blob as not checked, as it does one whose lookup failed."""
    other = replica(s3_server.endpoint, s3_bucket)
    proxy = s3server.FaultProxy(s3_server.port, head_without_length=True)
    try:
        store = replica(proxy.endpoint, s3_bucket)
        art = make_artifact("headless", "1", body(3000))
        store.put([art], StructureValidator())
        with store.open("headless", "1", offset=len(art)) as reader:
            assert b"".join(reader.chunks(64)) == b""
        assert read_all(store, "headless", "1") == art

        published: list[bool] = []

        def publish_between(method: str, path: str) -> bool:
            listing_the_index = method == "GET" and "list-type=2" in path and "index" in path
            if listing_the_index and not published:
                published.append(True)
                other.put([make_artifact("late", "1", b"y")], StructureValidator())
            return False

        proxy.inject(s3server.Fault(publish_between))
        sweep = replica(proxy.endpoint, s3_bucket).last_sweep
        assert sweep is not None
        assert sweep.missing_blobs == ()
        assert sweep.damaged_blobs == ()
        assert sweep.unchecked_blobs == (("late", "1"),)
    finally:
        proxy.close()


def test_a_missing_bucket_at_start_up_is_named(s3_server: s3server.MotoServer) -> None:
    """The start-up check (HeadBucket) of a bucket that does not exist -- a typo in the
    configuration, or a bucket not created yet -- failed with S3_ERROR ("the object store refused
    a request"): a HEAD answer has no body, so no NoSuchBucket code, only its 404. It is
    S3_NO_SUCH_BUCKET, as every later request on a vanished bucket already was."""
    with pytest.raises(StorageUnavailable) as info:
        replica(s3_server.endpoint, "strongroom-never-created", client={"max_attempts": 1})
    assert info.value.reason == "S3_NO_SUCH_BUCKET"


def _stat_refused(
    proxy: s3server.FaultProxy, stub: Any, status: int, code: str, message: str = "injected"
) -> grpc.RpcError:
    """StatModel of the stored m/1 while S3 answers every GET with ``status``, ``code`` and
    ``message``."""
    proxy.clear()
    proxy.inject(s3server.Fault(lambda m, p: m == "GET", status=status, code=code, message=message))
    with pytest.raises(grpc.RpcError) as info:
        stub.StatModel(pb.StatModelRequest(name="m", version="1"), timeout=60)
    return info.value


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (503, "SlowDown"),
        (429, "TooManyRequests"),
        (400, "Throttling"),
        (400, "KMS.ThrottlingException"),
    ],
)
def test_throttling_is_named_as_such(
    proxy: s3server.FaultProxy, proxied: Any, status: int, code: str
) -> None:
    """S3's 503 SlowDown was S3_SERVER_ERROR, "the object store failed", and another store's 429
    or a 400 Throttling was S3_ERROR: an operator looked for a failing store when the request
    rate was the matter. All are S3_THROTTLED (UNAVAILABLE), after botocore's own retries; so
    is KMS throttling an SSE-KMS bucket's key, which was S3_KMS_ERROR, "check the key's state"."""
    store, stub = proxied
    store.put([make_artifact("m", "1", b"abc")], StructureValidator())
    error = _stat_refused(proxy, stub, status, code)
    assert _status(error) == (grpc.StatusCode.UNAVAILABLE, "S3_THROTTLED")
    assert "throttling" in error.details()  # type: ignore[attr-defined]
    error = _stat_refused(proxy, stub, 500, "InternalError")
    assert _status(error) == (grpc.StatusCode.UNAVAILABLE, "S3_SERVER_ERROR")


def test_a_skewed_clock_is_not_reported_as_rejected_credentials(
    proxy: s3server.FaultProxy, proxied: Any
) -> None:
    """S3 refuses a request signed at a time too far from its own with 403 RequestTimeTooSkewed.
    Every 403 was S3_ACCESS_DENIED, "the object store rejected the store's credentials": an
    operator whose store's clock drifted went after keys and policies that were fine. It is
    S3_CLOCK_SKEW, naming the clock."""
    store, stub = proxied
    store.put([make_artifact("m", "1", b"abc")], StructureValidator())
    error = _stat_refused(proxy, stub, 403, "RequestTimeTooSkewed")
    assert _status(error) == (grpc.StatusCode.UNAVAILABLE, "S3_CLOCK_SKEW")
    assert "clock" in error.details()  # type: ignore[attr-defined]
    # A plain refusal stays what it was.
    error = _stat_refused(proxy, stub, 403, "AccessDenied")
    assert _status(error) == (grpc.StatusCode.UNAVAILABLE, "S3_ACCESS_DENIED")


def test_an_archived_object_is_not_reported_as_rejected_credentials(
    proxy: s3server.FaultProxy, proxied: Any
) -> None:
    """S3 refuses a GET of an object a lifecycle rule moved to an archive storage class (Glacier,
    Deep Archive) with 403 InvalidObjectState. Every 403 was S3_ACCESS_DENIED, "the object store
    rejected the store's credentials": an operator went after keys and policies that were fine
    while the objects needed restoring. It is S3_ERROR now, naming the code and the archive."""
    store, stub = proxied
    store.put([make_artifact("m", "1", b"abc")], StructureValidator())
    error = _stat_refused(proxy, stub, 403, "InvalidObjectState")
    assert _status(error) == (grpc.StatusCode.UNAVAILABLE, "S3_ERROR")
    details = error.details()  # type: ignore[attr-defined]
    assert "InvalidObjectState" in details and "archive" in details
    assert "credentials" not in details


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://AKIAEXAMPLE:wJalrXUtnFEMI-endpoint-secret@s3.example.com",
        "http://AKIAEXAMPLE:wJalrXUtnFEMI-endpoint-secret@127.0.0.1:1",
        "https://wJalrXUtnFEMI-endpoint-secret@s3.example.com",
    ],
)
def test_credentials_in_the_endpoint_url_are_refused_without_echoing_them(
    endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint with a user-info part (``https://KEY:SECRET@host``) was accepted: botocore
    ignores it for signing but puts the whole URL into its connection errors, which the store
    logs ("Could not connect to the endpoint URL: https://KEY:SECRET@host/..."), so the secret
    went to the logs on the first network failure. The configuration refuses it now (credentials
    come from files or the environment only), without repeating it."""
    with pytest.raises(ConfigError) as info:
        build(
            ModelstoreConfig,
            {"storage": {"backend": "s3", "endpoint": endpoint, "bucket": "b"}},
        )
    assert "endpoint" in str(info.value)
    assert "endpoint-secret" not in str(info.value)
    assert "endpoint-secret" not in caplog.text


def test_a_blob_replaced_between_a_ranges_read_and_its_head_check_is_not_served(
    proxy: s3server.FaultProxy, s3_client: Any, s3_bucket: str
) -> None:
    """A range that does not hold the head is read by one GET and its head checked by another,
    and each read whatever the key held at that moment: whoever can write the bucket put another
    model's artifact (of the same size) in this model's blob for the range's GET and this model's
    own back for the head's, and the store streamed the other model's bytes under this name. The
    head is now read from the object the range's GET is reading (If-Match on its ETag): DATA_LOSS
    BLOB_REPLACED, nothing served; the blob untouched read from its own object is served."""
    store = replica(proxy.endpoint, s3_bucket)
    mine = make_artifact("acme/a", "1", body(3000, 1))
    other = make_artifact("acme/b", "1", body(3000, 2))
    assert len(mine) == len(other)
    record = store.put([mine], StructureValidator())
    store.put([other], StructureValidator())
    (key,) = ("p/" + b for b, r in store.referenced_blobs().items() if r.name == "acme/a")
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=other)
    gets = 0

    def put_mine_back_for_the_head_read(method: str, path: str) -> bool:
        nonlocal gets
        if method == "GET" and path.partition("?")[0].endswith(key):
            gets += 1
            if gets == 2:  # the head's GET, after the range's
                s3_client.put_object(Bucket=s3_bucket, Key=key, Body=mine)
        return False

    proxy.inject(s3server.Fault(put_mine_back_for_the_head_read))
    with pytest.raises(StoredDataCorrupt) as info:
        store.open("acme/a", "1", offset=1000)
    assert info.value.reason == "BLOB_REPLACED"
    assert info.value.status_name == "DATA_LOSS"
    assert gets == 2
    assert store.stat("acme/a", "1") == record
    with store.open("acme/a", "1", offset=1000) as reader:
        assert b"".join(reader.chunks(1 << 20)) == mine[1000:]


def test_a_range_read_while_a_rewrap_deletes_its_blob_follows_the_rewrap(
    proxy: s3server.FaultProxy, s3_server: s3server.MotoServer, s3_bucket: str
) -> None:
    """A re-wrap deletes the old blob once the index names the new one. A range that does not
    hold the head reads the head apart, by a second GET: a re-wrap between the range's GET and
    the head's found the old blob gone there, and the download was UNAVAILABLE S3_ERROR ("the
    object store refused a request") though nothing had failed. It is followed to the new blob,
    as a re-wrap between the lookup and the range's own GET always was."""
    store = replica(proxy.endpoint, s3_bucket)
    other = replica(s3_server.endpoint, s3_bucket)  # another replica, straight to the server
    art = rewrap_case.artifact("acme/m", "1", 5000)
    store.put([art], StructureValidator())
    (key,) = ("p/" + b for b in store.referenced_blobs())
    gets = 0

    def rewrap_before_the_head_read(method: str, path: str) -> bool:
        nonlocal gets
        if method == "GET" and path.partition("?")[0].endswith(key):
            gets += 1
            if gets == 2:  # the head's GET, after the range's
                other.replace_key_slot(
                    "acme/m",
                    "1",
                    expected_key_version=1,
                    key_version=2,
                    wrapped_dek=rewrap_case.wrapped("acme/m", "1", 2),
                )
        return False

    proxy.inject(s3server.Fault(rewrap_before_the_head_read))
    offset = len(art) - 1000
    with store.open("acme/m", "1", offset=offset) as reader:
        served = b"".join(reader.chunks(1 << 20))
    assert gets == 2
    assert store.stat("acme/m", "1").key_version == 2
    assert served == art[offset:]  # the body after the head is the re-wrap's too


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "KMS.DisabledException"),
        (403, "KMS.AccessDeniedException"),
        (400, "KMS.KMSInvalidStateException"),
    ],
)
def test_a_delete_whose_blob_head_cannot_be_read_deletes_the_record_and_keeps_the_blob(
    proxy: s3server.FaultProxy,
    proxied: Any,
    s3_bucket: str,
    status: int,
    code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delete reads the blob's head to know whether the blob is its model's before deleting
    it. A KMS refusal of that read (the bucket's key disabled, say after a compromise, or no
    kms:Decrypt) failed DeleteModel (UNAVAILABLE S3_ERROR, or S3_ACCESS_DENIED naming the
    store's credentials), and for as long as the key stayed disabled no model it protects could
    be deleted. The record is the truth: it is deleted (nothing serves the model after), and the
    blob, whose owner cannot be told, is kept and logged, never deleted on a guess; a later
    start's sweep reports it as unreferenced (by its key, the one the WARNING named), which is
    how an operator finds ciphertext a delete left behind."""
    store, stub = proxied
    store.put([make_artifact("m", "1", body(1000))], StructureValidator())
    fault = proxy.inject(
        s3server.Fault(lambda m, p: m == "GET" and "/p/blobs/" in p, status=status, code=code)
    )
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore._s3"):
        stub.DeleteModel(pb.DeleteModelRequest(name="m", version="1"), timeout=60)
    proxy.clear()
    assert fault.hits >= 1
    assert store.records() == ()
    assert len(store.blob_sizes()) == 1
    (kept,) = store.blob_sizes()
    assert any(
        code in r.getMessage() and kept in r.getMessage() and " kept (kms_key)" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.StatModel(pb.StatModelRequest(name="m", version="1"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    later = replica(proxy.endpoint, s3_bucket, clock=lambda: datetime.now(UTC) + timedelta(days=2))
    assert later.last_sweep is not None and later.last_sweep.orphan_blobs == (kept,)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (503, "SlowDown"),
        (500, "InternalError"),
        (400, "KMS.ThrottlingException"),
        (500, "KMS.KMSInternalException"),
        (None, "dropped"),
    ],
)
def test_a_delete_whose_blob_head_read_fails_for_now_deletes_nothing_and_a_retry_deletes_all(
    proxy: s3server.FaultProxy, proxied: Any, status: int | None, code: str
) -> None:
    """A failure of the head's read that a retry may not meet (the object store or KMS failing
    or throttling past botocore's retries, a dropped connection) deleted the record and kept
    the blob, as a refusal that lasts does: a retry of the delete then found no record
    (NOT_FOUND), so one transient 503 left the deleted model's ciphertext in the bucket for
    good (an operator had to purge it by hand; whoever could make the object store answer 503
    could have every delete leave its blob). Such a delete is UNAVAILABLE now with nothing
    deleted, and its retry removes the record and the blob."""
    store, stub = proxied
    store.put([make_artifact("m", "1", body(1000))], StructureValidator())
    fault = proxy.inject(
        s3server.Fault(
            lambda m, p: m == "GET" and "/p/blobs/" in p,
            status=status,
            code=None if status is None else code,
            drop=status is None,
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteModel(pb.DeleteModelRequest(name="m", version="1"), timeout=60)
    proxy.clear()
    assert fault.hits >= 1
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert [(r.name, r.version) for r in store.records()] == [("m", "1")]
    assert set(store.blob_sizes()) == set(store.referenced_blobs())
    stub.DeleteModel(pb.DeleteModelRequest(name="m", version="1"), timeout=60)
    assert store.records() == ()
    assert store.blob_sizes() == {}


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "KMS.DisabledException"), (403, "KMS.AccessDeniedException")],
)
def test_a_kms_refusal_is_named_as_such(
    proxy: s3server.FaultProxy, proxied: Any, status: int, code: str
) -> None:
    """S3 passes on an SSE-KMS failure with the KMS error's name: a 403 KMS.AccessDeniedException
    was S3_ACCESS_DENIED, "the object store rejected the store's credentials", and a disabled
    key's 400 the vague S3_ERROR, so an operator went after credentials that were fine. Both are
    S3_KMS_ERROR now, naming the code and the key."""
    store, stub = proxied
    store.put([make_artifact("m", "1", b"abc")], StructureValidator())
    error = _stat_refused(proxy, stub, status, code)
    assert _status(error) == (grpc.StatusCode.UNAVAILABLE, "S3_KMS_ERROR")
    assert code in error.details() and "KMS key" in error.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("status", "code"), [(400, "InvalidArgument"), (403, "AccessDenied")])
def test_an_object_store_refusing_if_match_on_delete_with_its_own_error_still_starts(
    proxy: s3server.FaultProxy,
    s3_server: s3server.MotoServer,
    s3_bucket: str,
    status: int,
    code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Servers that do not support If-Match on DeleteObject answer it 501, or ignore it, or
    refuse it with an error of their own: 400 InvalidArgument, 403 AccessDenied. The last two
    stopped the start (UNAVAILABLE S3_ERROR, or S3_ACCESS_DENIED blaming the store's
    credentials) on a server where a delete without the header works. The check now deletes
    the probe without it: done, the server lacks conditional deletes, and the store falls back
    to deleting without them, as on a 501 (a WARNING naming the answer)."""
    proxy.refused_headers = {("DELETE", "if-match"): (status, code)}
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore._s3"):
        store = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    assert store.conditional_deletes is False
    warning = next(r.getMessage() for r in caplog.records if "DeleteObject" in r.getMessage())
    assert f"HTTP {status} {code}" in warning
    store.put([make_artifact("m", "1", body(1000))], StructureValidator())
    store.delete("m", "1")
    assert "Contents" not in s3server.client(s3_server.endpoint).list_objects_v2(Bucket=s3_bucket)


def test_credentials_that_cannot_delete_at_all_stop_the_start_naming_the_permission(
    proxy: s3server.FaultProxy, s3_bucket: str
) -> None:
    """A store whose credentials may not delete (403 with If-Match and without) stops at start,
    as before, but says what it lacks (s3:DeleteObject), not only that a request was refused."""
    proxy.inject(s3server.Fault(lambda m, p: m == "DELETE", status=403, code="AccessDenied"))
    with pytest.raises(StorageUnavailable) as info:
        replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    assert info.value.reason == "S3_ACCESS_DENIED"
    assert "s3:DeleteObject" in str(info.value)


def test_a_bucket_gone_under_a_delete_or_a_rewrap_is_named_not_taken_for_a_missing_model(
    proxy: s3server.FaultProxy, proxied: Any
) -> None:
    """S3 answers a request on a bucket that no longer exists with 404 NoSuchBucket, as it
    answers a missing key. Reads told the two apart; a delete's and a re-wrap's index writes did
    not: a bucket deleted (or its name mistyped in a failover) under them answered NOT_FOUND
    "deleted meanwhile" (the model was not) and FAILED_PRECONDITION KEY_SLOT_CHANGED. Both are
    UNAVAILABLE S3_NO_SUCH_BUCKET now, and the model is untouched."""
    store, stub = proxied
    store.put(chunked(rewrap_case.artifact("acme/m", "1"), 7000), StructureValidator())
    proxy.inject(
        s3server.Fault(
            lambda m, p: m in ("DELETE", "PUT") and "/p/index/" in p,
            status=404,
            code="NoSuchBucket",
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteModel(pb.DeleteModelRequest(name="acme/m", version="1"), timeout=60)
    assert _status(info.value) == (grpc.StatusCode.UNAVAILABLE, "S3_NO_SUCH_BUCKET")
    request = pb.ReplaceKeySlotRequest(
        name="acme/m",
        version="1",
        expected_key_version=1,
        key_version=2,
        wrapped_data_key=rewrap_case.wrapped("acme/m", "1", 2),
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ReplaceKeySlot(request, timeout=60)
    assert _status(info.value) == (grpc.StatusCode.UNAVAILABLE, "S3_NO_SUCH_BUCKET")
    proxy.clear()
    assert store.stat("acme/m", "1").key_version == 1
    assert _get_rpc(stub, "acme/m", "1") == rewrap_case.artifact("acme/m", "1")


def test_s3_reads_that_return_fewer_bytes_than_asked_are_read_until_whole(
    s3_server: s3server.MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store took one read of an answer's body for an index record, a blob's head read apart
    (a range past it, a delete's check of whose blob it is) and a head read at start for its
    format, as the filesystem backend took one pread: a read that returned fewer bytes than
    asked (urllib3's streams may, by version and transfer coding) made a healthy record
    DATA_LOSS INDEX_CORRUPT, a healthy head HEADER_CORRUPT and a delete keep its own blob. Each
    reads until it has the bytes asked for or the body ends."""
    store = replica(s3_server.endpoint, s3_bucket)
    art = rewrap_case.artifact("acme/m", "1", 5000)
    record = store.put(chunked(art, 1000), StructureValidator())
    force_short_body_reads(monkeypatch)
    assert store.stat("acme/m", "1") == record
    offset = record.header_size + 3
    with store.open("acme/m", "1", offset=offset, length=100) as reader:
        assert b"".join(reader.chunks(50)) == art[offset : offset + 100]
    assert store.verify("acme/m", "1") == record
    (entry,) = store._all_entries()
    assert store._record_format(entry)
    store.delete("acme/m", "1")
    assert store.blob_sizes() == {}


_KMS_KEY_ARN = "arn:aws:kms:eu-west-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize(
    "code", ["KMS.DisabledException", f"KMS.DisabledException {_KMS_KEY_ARN}", "SlowDown " * 500]
)
def test_an_object_store_refusal_tells_callers_no_key_arn_nor_what_the_server_made_up(
    proxy: s3server.FaultProxy, proxied: Any, code: str
) -> None:
    """A KMS refusal's S3 message names the key's ARN, and with it the account: a caller of
    another tenant must not learn it, so only the error code is named (as S3_ACCESS_DENIED names
    neither the credentials nor the policy). The code came from the server and was passed on as
    it was: an object store (or a proxy before it) answering a code of its own making put any
    text in every caller's error message. A code that is no S3 or KMS error name is not passed
    on now."""
    store, stub = proxied
    store.put([make_artifact("m", "1", b"abc")], StructureValidator())
    message = f"{_KMS_KEY_ARN} is disabled."
    error = _stat_refused(proxy, stub, 400 if code.startswith("KMS") else 429, code, message)
    details = str(error.details())  # type: ignore[attr-defined]
    assert _status(error)[0] == grpc.StatusCode.UNAVAILABLE
    assert "210987654321" not in details and "arn:" not in details
    assert len(details) < 300
    if code == "KMS.DisabledException":
        assert _status(error)[1] == "S3_KMS_ERROR" and code in details


@pytest.mark.parametrize("meanwhile", ["rewrap", "republish"])
def test_an_unconditional_delete_racing_a_rewrap_or_republish_deletes_no_live_blob(
    proxy: s3server.FaultProxy, s3_server: s3server.MotoServer, s3_bucket: str, meanwhile: str
) -> None:
    """Where the object store lacks If-Match on DeleteObject, the delete of an index record is
    unconditional: a re-wrap (or a delete and re-publish) landing between the delete's read and
    its index delete has its new record deleted, and its new blob is left behind. What this
    reopens is bounded: the blob the delete removes is the one it read, which no record names
    by then (blob keys are fresh and never shared), so no live record is left naming a deleted
    blob, and the one left behind is reported by a later start's sweep. The other writer runs
    inside the proxy as the delete's index DELETE arrives, so the interleaving is exact."""
    proxy.ignored_headers = frozenset({"if-match"})
    proxy.ignored_on = frozenset({"DELETE"})
    store = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    assert store.conditional_deletes is False
    other = replica(s3_server.endpoint, s3_bucket)
    store.put([rewrap_case.artifact("acme/m", "1", 5000)], StructureValidator())
    (read_blob,) = store.referenced_blobs()

    raced: list[str] = []

    def race(method: str, path: str) -> bool:  # runs under the proxy's lock: no proxy calls
        if method == "DELETE" and "/p/index/" in path and not raced:
            raced.append(path)
            if meanwhile == "rewrap":
                other.replace_key_slot(
                    "acme/m",
                    "1",
                    expected_key_version=1,
                    key_version=2,
                    wrapped_dek=rewrap_case.wrapped("acme/m", "1", 2),
                )
            else:
                other.delete("acme/m", "1")
                other.put([rewrap_case.artifact("acme/m", "1", 6000)], StructureValidator())
        return False

    proxy.inject(s3server.Fault(race))
    store.delete("acme/m", "1")
    assert raced
    assert store.records() == ()
    (left,) = store.blob_sizes()
    assert left != read_blob
    later = replica(
        s3_server.endpoint, s3_bucket, clock=lambda: datetime.now(UTC) + timedelta(days=2)
    )
    assert later.last_sweep is not None and later.last_sweep.orphan_blobs == (left,)
    # Where If-Match is honoured the same race ends clean: the delete reads the record again.
    proxy.ignored_headers = frozenset()
    conditional = replica(proxy.endpoint, s3_bucket, client={"max_attempts": 1})
    assert conditional.conditional_deletes is True
    for blob in conditional.blob_sizes():
        s3server.client(s3_server.endpoint).delete_object(Bucket=s3_bucket, Key=f"p/{blob}")
    conditional.put([rewrap_case.artifact("acme/m", "1", 5000)], StructureValidator())
    proxy.clear()
    raced.clear()
    proxy.inject(s3server.Fault(race))
    conditional.delete("acme/m", "1")
    assert raced
    assert conditional.records() == () and conditional.blob_sizes() == {}
