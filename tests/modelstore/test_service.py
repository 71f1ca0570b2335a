"""ModelStoreServicer over real gRPC, behind the runtime's real error-mapping interceptor."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import StructureValidator
from strongroom.errors import InvalidArgument, ResourceExhausted
from strongroom.modelstore import _pagetoken
from strongroom.modelstore import service as service_module
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.modelstore.errors import StoredDataCorrupt
from strongroom.modelstore.limits import MAX_PAGE_SIZE
from strongroom.modelstore.publishers import PublisherScopes
from strongroom.modelstore.service import (
    MAX_MODEL_INFO_BYTES,
    METHOD_ROLES,
    ROLE_ADMIN,
    ROLE_PUBLISHER,
    ROLE_READER,
    SERVICE_NAME,
    ModelStoreServicer,
)
from strongroom.modelstore.storage import FilesystemStorage, IntegrityProblem, verify_all
from strongroom.reasons import METADATA_KEY as REASON_TRAILER
from strongroom.runtime.config import ConfigError, ServerConfig, build
from tests.modelstore.artifacts import chunked, make_artifact, with_header
from tests.modelstore.backends import (
    AnyStorage,
    assert_clean,
    blob_count,
    edit_index_entry,
    overwrite_blob,
    point_at_blob_of,
    read_blob,
)
from tests.modelstore.conftest import Served, serve
from tests.modelstore.shortreads import force_short_reads


def body(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"svc{seed}".encode()).digest(n)


def requests(
    data: bytes, *, size: int = 0, sha256: str = "", chunk: int = 32 * 1024
) -> Iterator[pb.PutModelRequest]:
    parts = chunked(data, chunk)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        yield pb.PutModelRequest(
            data=part, artifact_size=size if i == 0 else 0, artifact_sha256=sha256 if last else ""
        )


def put(served: Served, data: bytes, **kw: object) -> pb.ModelInfo:
    response = served.stub.PutModel(requests(data, **kw), timeout=30)  # type: ignore[arg-type]
    return response.model


def get(served: Served, name: str, version: str, **kw: int) -> list[pb.GetModelResponse]:
    return list(served.stub.GetModel(pb.GetModelRequest(name=name, version=version, **kw)))


def rpc_error(fn: object, *args: object, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, timeout=30, **kw)  # type: ignore[operator]
        if isinstance(result, Iterable):
            list(result)
    return info.value


def assert_status(err: Any, code: grpc.StatusCode, reason: str) -> None:
    assert err.code() == code, err
    assert err.details().startswith(f"{reason}: "), err.details()
    assert (REASON_TRAILER, reason) in tuple(err.trailing_metadata())


def test_put_then_get_stat_list_delete(served: Served) -> None:
    art = make_artifact("acme/model", "2.1.0", body(300_000))
    digest = hashlib.sha256(art).hexdigest()
    info = put(served, art, size=len(art), sha256=digest)
    assert (info.name, info.version) == ("acme/model", "2.1.0")
    assert info.artifact_sha256 == digest and info.artifact_size == len(art)
    assert info.plaintext_size == 300_000
    assert info.key_id == "kek-test" and info.key_version == 3
    assert info.content_type == "application/onnx"
    assert info.created_at.ToDatetime().year == 2026
    assert info.stored_at.seconds > 0
    assert info.artifact_format == 3

    messages = get(served, "acme/model", "2.1.0")
    assert messages[0].model == info
    assert all(not m.HasField("model") for m in messages[1:])
    assert all(len(m.data) <= 64 * 1024 for m in messages)
    assert len(messages) == -(-len(art) // (64 * 1024))
    offset = 0
    for m in messages:
        assert m.offset == offset
        offset += len(m.data)
    assert b"".join(m.data for m in messages) == art

    stat = served.stub.StatModel(pb.StatModelRequest(name="acme/model", version="2.1.0"))
    assert stat.model == info
    listing = served.stub.ListModels(pb.ListModelsRequest(name_prefix="acme/"))
    assert list(listing.models) == [info] and listing.next_page_token == ""

    served.stub.DeleteModel(pb.DeleteModelRequest(name="acme/model", version="2.1.0"))
    err = rpc_error(served.stub.StatModel, pb.StatModelRequest(name="acme/model", version="2.1.0"))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    err = rpc_error(
        served.stub.DeleteModel, pb.DeleteModelRequest(name="acme/model", version="2.1.0")
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


@pytest.mark.parametrize("fmt", [1, 2])
def test_new_unbound_uploads_are_refused_unless_accepted_for_a_migration(
    served: Served, fmt: int
) -> None:
    """PutModel took format-1 and -2 artifacts, whose body is under the slot key itself: with no
    ``publishers`` list, anyone who held a data key from before format 3 could publish a
    loadable model (for readers accepting unbound artifacts) under another tenant's name. New
    uploads must be format 3 now, refused on the header before the version is reserved or the
    body received; ``accept_unbound`` (modelstore.accept_unbound_uploads) opens a migration
    window."""
    art = make_artifact("tenant-b/m", "1", body(50_000), format_version=fmt)
    err = rpc_error(served.stub.PutModel, requests(art))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "ARTIFACT_KEY_UNBOUND")
    assert "modelstore.accept_unbound_uploads" in err.details()  # type: ignore[attr-defined]
    assert served.storage.records() == ()
    assert_clean(served.storage)
    assert put(served, make_artifact("tenant-b/m", "1", b"bound")).artifact_format == 3
    host, channel = serve(served.storage, accept_unbound=True)
    try:
        stub = pb_grpc.ModelStoreServiceStub(channel)
        art = make_artifact("tenant-b/m", "2", body(5000), format_version=fmt)
        info = stub.PutModel(requests(art), timeout=30).model
        assert (info.version, info.artifact_format) == ("2", fmt)
    finally:
        channel.close()
        host.stop(0)


def test_unbound_uploads_are_off_unless_configured() -> None:
    """The migration window is a validated boolean, off by default."""
    assert ModelstoreConfig(data_dir=Path("/x")).accept_unbound_uploads is False
    config = build(ModelstoreConfig, {"data_dir": "/x", "accept_unbound_uploads": True})
    assert config.accept_unbound_uploads is True
    with pytest.raises(ConfigError, match="accept_unbound_uploads"):
        build(ModelstoreConfig, {"data_dir": "/x", "accept_unbound_uploads": "yes"})


def test_model_info_says_which_models_are_in_an_unbound_format(served: Served) -> None:
    # Stored before format 3 (new unbound uploads are refused): served as they are.
    for name, fmt in (("old/a", 1), ("old/b", 2)):
        art = make_artifact(name, "1", fmt.to_bytes() * 3, format_version=fmt)
        served.storage.put([art], StructureValidator())
        assert b"".join(r.data for r in get(served, name, "1")) == art
    put(served, make_artifact("old/c", "1", b"c"))
    listing = served.stub.ListModels(pb.ListModelsRequest(name_prefix="old/"))
    assert [(m.name, m.artifact_format) for m in listing.models] == [
        ("old/a", 1),
        ("old/b", 2),
        ("old/c", 3),
    ]
    stat = served.stub.StatModel(pb.StatModelRequest(name="old/a", version="1"))
    assert stat.model.artifact_format == 1


def test_range_reads_and_resume(served: Served) -> None:
    art = make_artifact("m", "1", body(500_000))
    put(served, art)
    messages = get(served, "m", "1", offset=1000, length=100_000)
    assert messages[0].HasField("model") and messages[0].offset == 1000
    assert b"".join(m.data for m in messages) == art[1000:101_000]

    # Resume: read part of the stream, drop it, continue from the last offset received.
    stream = served.stub.GetModel(pb.GetModelRequest(name="m", version="1"))
    received = bytearray()
    for m in stream:
        received += m.data
        if len(received) >= 200_000:
            stream.cancel()  # type: ignore[no-untyped-call]
            break
    rest = get(served, "m", "1", offset=len(received))
    assert rest[0].offset == len(received)
    assert bytes(received) + b"".join(m.data for m in rest) == art

    at_end = get(served, "m", "1", offset=len(art))
    assert len(at_end) == 1 and at_end[0].HasField("model") and at_end[0].data == b""
    err = rpc_error(
        served.stub.GetModel, pb.GetModelRequest(name="m", version="1", offset=len(art) + 1)
    )
    assert_status(err, grpc.StatusCode.OUT_OF_RANGE, "OUT_OF_RANGE")
    err = rpc_error(
        served.stub.GetModel, pb.GetModelRequest(name="m", version="1", offset=10, length=len(art))
    )
    assert_status(err, grpc.StatusCode.OUT_OF_RANGE, "OUT_OF_RANGE")
    err = rpc_error(served.stub.GetModel, pb.GetModelRequest(name="m", version="2"))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


def test_second_put_is_already_exists_and_first_intact(served: Served) -> None:
    first = make_artifact("m", "1", body(100_000, 1))
    info = put(served, first)
    err = rpc_error(served.stub.PutModel, requests(make_artifact("m", "1", body(100_000, 2))))
    assert_status(err, grpc.StatusCode.ALREADY_EXISTS, "MODEL_EXISTS")
    assert b"".join(m.data for m in get(served, "m", "1")) == first
    assert get(served, "m", "1")[0].model == info
    served.storage.verify("m", "1")


def test_concurrent_puts_over_grpc_have_one_winner(served: Served) -> None:
    n = 6
    arts = [make_artifact("race", "7", body(400_000, i)) for i in range(n)]
    barrier = threading.Barrier(n)
    outcomes: list[object] = [None] * n

    def upload(i: int) -> None:
        def gen() -> Iterator[pb.PutModelRequest]:
            barrier.wait()
            yield from requests(arts[i], chunk=16 * 1024)

        try:
            outcomes[i] = served.stub.PutModel(gen(), timeout=30).model
        except grpc.RpcError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, o in enumerate(outcomes) if isinstance(o, pb.ModelInfo)]
    assert len(winners) == 1, outcomes
    for i, o in enumerate(outcomes):
        if i != winners[0]:
            assert isinstance(o, grpc.RpcError)
            assert o.code() == grpc.StatusCode.ALREADY_EXISTS
    assert b"".join(m.data for m in get(served, "race", "7")) == arts[winners[0]]
    assert_clean(served.storage)


@pytest.mark.parametrize(
    ("messages", "code", "reason"),
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_UPLOAD"),
        ([pb.PutModelRequest(artifact_size=10)], grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_UPLOAD"),
        (
            [pb.PutModelRequest(data=b"NOTANARTIFACT" * 10)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "BAD_MAGIC",
        ),
        (
            [
                pb.PutModelRequest(data=make_artifact("m", "1", b"abc")[:20]),
                pb.PutModelRequest(data=make_artifact("m", "1", b"abc")[20:], artifact_size=5),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "ARTIFACT_SIZE_NOT_FIRST",
        ),
        (
            [pb.PutModelRequest(data=make_artifact("m", "1", b"abc"), artifact_sha256="XYZ")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SHA256",
        ),
        (
            [
                pb.PutModelRequest(
                    data=make_artifact("m", "1", b"abc")[:20], artifact_sha256="a" * 64
                ),
                pb.PutModelRequest(
                    data=make_artifact("m", "1", b"abc")[20:], artifact_sha256="b" * 64
                ),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "CONFLICTING_SHA256",
        ),
        (
            [pb.PutModelRequest(data=make_artifact("m", "1", b"abc"), artifact_sha256="a" * 64)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "DIGEST_MISMATCH",
        ),
        (
            [pb.PutModelRequest(data=make_artifact("m", "1", b"abc"), artifact_size=1000)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "SIZE_MISMATCH",
        ),
        (
            [pb.PutModelRequest(data=make_artifact("m", "1", b"abc"), artifact_size=2**63)],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "ARTIFACT_TOO_LARGE",
        ),
        (
            # Over max_chunk, within the message limit's room for the other fields.
            [pb.PutModelRequest(data=make_artifact("m", "1", b"a" * (4 * 1024 * 1024)))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "CHUNK_TOO_LARGE",
        ),
        (
            [
                pb.PutModelRequest(
                    data=with_header(make_artifact("m", "1", b"abc"), model_name="bad name")
                )
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_MODEL_NAME",
        ),
    ],
)
def test_bad_uploads_are_rejected_and_nothing_is_stored(
    served: Served, messages: list[pb.PutModelRequest], code: grpc.StatusCode, reason: str
) -> None:
    err = rpc_error(served.stub.PutModel, iter(messages))
    assert_status(err, code, reason)
    assert served.storage.records() == ()
    assert blob_count(served.storage) == 0
    assert_clean(served.storage)


def test_a_message_beyond_the_store_limit_is_refused_by_grpc_before_any_handler(
    served: Served,
) -> None:
    err = rpc_error(
        served.stub.PutModel,
        iter([pb.PutModelRequest(data=make_artifact("m", "1", b"a" * (5 * 1024 * 1024)))]),
    )
    # gRPC itself refuses it (no handler ran, so there is no reason trailer).
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()
    assert served.storage.records() == ()


def test_trickled_upload_is_ended_and_leaves_nothing(fs_storage: FilesystemStorage) -> None:
    """A publisher that sends the header, then a byte every quarter of the idle timeout, is ended
    below the default minimum rate (64 KiB/s) and its partial upload removed; the same artifact
    sent at full speed is stored."""
    host, channel = serve(fs_storage, config=ServerConfig(stream_idle_timeout_seconds=1))
    served = Served(fs_storage, pb_grpc.ModelStoreServiceStub(channel), channel)
    art = make_artifact("m", "1", body(200_000))
    try:

        def trickle() -> Iterator[pb.PutModelRequest]:
            yield pb.PutModelRequest(data=art[:4096])
            for i in range(4096, 4096 + 24):  # 6 s in all
                time.sleep(0.25)
                yield pb.PutModelRequest(data=art[i : i + 1])

        with pytest.raises(grpc.RpcError) as info:
            served.stub.PutModel(trickle(), timeout=30)
        assert_status(info.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_TOO_SLOW")
        tmp = fs_storage.root / "tmp"
        deadline = time.monotonic() + 10
        while list(tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(tmp.iterdir()) == []
        assert fs_storage.records() == ()
        assert host.streams.open_streams() == 0
        assert put(served, art).name == "m"
    finally:
        channel.close()
        host.stop(0)


def test_cancelled_upload_leaves_nothing(fs_served: Served) -> None:
    # The S3 backend's version (an unfinished multipart upload aborted) is in test_s3.py.
    served = fs_served
    sent = threading.Event()
    stop = threading.Event()
    art = make_artifact("m", "1", body(1_000_000))

    def gen() -> Iterator[pb.PutModelRequest]:
        parts = chunked(art, 64 * 1024)
        yield pb.PutModelRequest(data=parts[0])
        yield pb.PutModelRequest(data=parts[1])
        sent.set()
        stop.wait(10)

    future = served.stub.PutModel.future(gen(), timeout=30)
    assert sent.wait(10)
    tmp = served.storage.root / "tmp"
    deadline = time.monotonic() + 10
    while not list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp.iterdir()), "the upload is in progress"
    future.cancel()  # type: ignore[no-untyped-call]
    stop.set()
    deadline = time.monotonic() + 10
    while list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp.iterdir()) == []
    assert served.storage.records() == ()
    # The reservation is gone too: the same version can be uploaded now.
    assert put(served, art).name == "m"


@pytest.mark.parametrize(
    ("name", "version", "reason"),
    [
        ("", "1", "INVALID_MODEL_NAME"),
        ("m", "", "INVALID_MODEL_VERSION"),
        ("a b", "1", "INVALID_MODEL_NAME"),
        ("m", "1 2", "INVALID_MODEL_VERSION"),
        ("x" * 200, "1", "INVALID_MODEL_NAME"),
        ("../etc", "1", "INVALID_MODEL_NAME"),
    ],
)
def test_names_are_validated(served: Served, name: str, version: str, reason: str) -> None:
    for fn, request in (
        (served.stub.GetModel, pb.GetModelRequest(name=name, version=version)),
        (served.stub.StatModel, pb.StatModelRequest(name=name, version=version)),
        (served.stub.DeleteModel, pb.DeleteModelRequest(name=name, version=version)),
    ):
        assert_status(rpc_error(fn, request), grpc.StatusCode.INVALID_ARGUMENT, reason)


def test_list_pagination_and_bounds(served: Served) -> None:
    for i in range(25):
        put(served, make_artifact(f"team/m{i:02d}", "1", b"x"))
    put(served, make_artifact("other", "1", b"x"))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = served.stub.ListModels(
            pb.ListModelsRequest(name_prefix="team/", page_size=10, page_token=token)
        )
        pages += 1
        seen += [m.name for m in resp.models]
        token = resp.next_page_token
        if not token:
            break
    assert seen == [f"team/m{i:02d}" for i in range(25)] and pages == 3
    assert len(served.stub.ListModels(pb.ListModelsRequest()).models) == 26  # default page size
    assert len(served.stub.ListModels(pb.ListModelsRequest(page_size=10**6)).models) == 26

    err = rpc_error(served.stub.ListModels, pb.ListModelsRequest(page_size=-1))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")
    err = rpc_error(served.stub.ListModels, pb.ListModelsRequest(page_token="not-a-token"))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    first = served.stub.ListModels(pb.ListModelsRequest(name_prefix="team/", page_size=1))
    err = rpc_error(
        served.stub.ListModels,
        pb.ListModelsRequest(name_prefix="other", page_token=first.next_page_token),
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    err = rpc_error(served.stub.ListModels, pb.ListModelsRequest(name_prefix="bad prefix"))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME_PREFIX")


def test_a_full_page_of_the_longest_records_is_sent(fs_served: Served) -> None:
    """Every string of a ModelInfo comes from the publisher's header, each up to its format limit
    (name 128, version 64, content type and key id 128 characters): a record is up to ~650 bytes,
    so a page of MAX_PAGE_SIZE of them is ~640 KB, past the store's 576 KiB send limit. Any
    publisher could upload ~900 such models and every page_size=1000 listing of them failed
    (RESOURCE_EXHAUSTED from gRPC's send limit, not the store). The largest page is now sent."""
    key_id = "k" * 128
    content_type = "a" * 63 + "/" + "b" * 64
    for i in range(MAX_PAGE_SIZE + 1):
        art = make_artifact(
            "n" * 124 + f"{i:04d}", "v" * 64, b"x", key_id=key_id, content_type=content_type
        )
        fs_served.storage.put([art], StructureValidator())
    page = fs_served.stub.ListModels(pb.ListModelsRequest(page_size=MAX_PAGE_SIZE), timeout=60)
    assert len(page.models) == MAX_PAGE_SIZE and page.next_page_token
    assert {(m.key_id, m.content_type) for m in page.models} == {(key_id, content_type)}
    rest = fs_served.stub.ListModels(
        pb.ListModelsRequest(page_size=MAX_PAGE_SIZE, page_token=page.next_page_token), timeout=60
    )
    assert [m.name for m in rest.models] == ["n" * 124 + f"{MAX_PAGE_SIZE:04d}"]
    # The bound holds for every field at its largest too (times, sizes, KEK version).
    latest = Timestamp(seconds=253402300799, nanos=999_999_000)
    longest = pb.ModelInfo(
        name="n" * 128,
        version="v" * 64,
        artifact_sha256="f" * 64,
        artifact_size=2**64 - 1,
        plaintext_size=2**64 - 1,
        content_type=content_type,
        key_id=key_id,
        key_version=2**32 - 1,
        created_at=latest,
        stored_at=latest,
        plaintext_sha256="f" * 64,
    )
    assert pb.ListModelsResponse(models=[longest]).ByteSize() <= MAX_MODEL_INFO_BYTES


def test_a_listing_names_a_corrupt_index_entry_and_answers_the_pages_around_it(
    served: Served,
) -> None:
    """ListModels failed with DATA_LOSS for every page covering one corrupt index entry, for
    every caller. It answers now, naming the entry in ``corrupt_entries`` (never in ``models``),
    for a publisher too when its rules cover the name; GetModel of it stays DATA_LOSS."""
    for i in range(3):
        put(served, make_artifact(f"team-a/m{i}", "1", body(100, i)))
    put(served, make_artifact("team-b/m", "1", body(100)))
    edit_index_entry(served.storage, served.storage.stat("team-a/m1", "1"), key_version=0)
    seen: list[tuple[list[str], list[tuple[str, str, str]]]] = []
    token = ""
    while True:
        page = served.stub.ListModels(pb.ListModelsRequest(page_size=2, page_token=token))
        corrupt = [(e.name, e.reason, e.problem) for e in page.corrupt_entries]
        seen.append(([m.name for m in page.models], corrupt))
        if not (token := page.next_page_token):
            break
    problem = "key_version is not a KEK version a broker numbers"
    assert seen == [
        (["team-a/m0"], [("team-a/m1", "INDEX_CORRUPT", problem)]),
        (["team-a/m2", "team-b/m"], []),
    ]
    err = rpc_error(served.stub.GetModel, pb.GetModelRequest(name="team-a/m1", version="1"))
    assert_status(err, grpc.StatusCode.DATA_LOSS, "INDEX_CORRUPT")
    caller = "spiffe://t.test/publisher"
    scopes = PublisherScopes({caller: ("team-a/",)})
    servicer = ModelStoreServicer(served.storage, publishers=scopes)
    first = servicer._scoped_page("", 2, "", scopes, caller)
    rest = servicer._scoped_page("", 2, first.next_page_token, scopes, caller)
    assert [m.name for m in first.models] == ["team-a/m0"]
    assert [e.name for e in first.corrupt] == ["team-a/m1"]
    assert ([m.name for m in rest.models], rest.corrupt, rest.next_page_token) == (
        ["team-a/m2"],
        (),
        "",
    )
    other = servicer._scoped_page("", 10, "", PublisherScopes({caller: ("team-b/",)}), caller)
    assert (len(other.models), other.corrupt) == (1, ())
    # A corrupt entry at its largest fits a page's per-record bound as a ModelInfo does.
    largest = pb.CorruptEntry(
        name="\u00e9" * 64, version="v" * 64, reason="INDEX_CORRUPT", problem="p" * 200
    )
    assert pb.ListModelsResponse(corrupt_entries=[largest]).ByteSize() <= MAX_MODEL_INFO_BYTES


def test_the_demo_reports_the_corrupt_entries_a_listing_names(
    fs_served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's store step read ListModels' first page of ``models`` and nothing else: an index
    entry the store lists as corrupt went unmentioned (and any model past the first page). It
    walks every page now and prints each corrupt entry as a warning naming it and its field."""
    from strongroom.dev import lifecycle
    from strongroom.dev.demo import Narrator

    for name in ("acme/a", "acme/b"):
        put(fs_served, make_artifact(name, "1", body(100)))
    edit_index_entry(fs_served.storage, fs_served.storage.stat("acme/b", "1"), key_version=0)
    say = Narrator()
    assert lifecycle.show_listing(say, fs_served.stub) == 1
    out = capsys.readouterr().out
    assert say.checks == 1 and "stored acme/a/1" in out
    (warning,) = [line for line in out.splitlines() if "acme/b" in line]
    assert warning.startswith("  ! ") and "INDEX_CORRUPT" in warning and "key_version" in warning


def test_a_corrupt_entry_whose_name_is_not_utf8_is_listed_escaped(fs_served: Served) -> None:
    """A filesystem index row whose name holds a byte that is not UTF-8 cannot go in a protobuf
    string as it is: it is named with the byte escaped, and the walk goes on past it."""
    for name in ("acme/a", "acme/b", "acme/c"):
        put(fs_served, make_artifact(name, "1", body(100)))
    root = fs_served.storage.root  # type: ignore[union-attr]
    with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db, db:
        db.execute("UPDATE models SET name = CAST(X'61636d652f62ff' AS TEXT) WHERE name = 'acme/b'")
    names: list[str] = []
    corrupt: list[str] = []
    token = ""
    while True:
        page = fs_served.stub.ListModels(pb.ListModelsRequest(page_size=1, page_token=token))
        names += [m.name for m in page.models]
        corrupt += [e.name for e in page.corrupt_entries]
        if not (token := page.next_page_token):
            break
    assert (names, corrupt) == (["acme/a", "acme/c"], ["acme/b\\xff"])


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 0), (0, 1), (5, 0), (1000, 10)],
    ids=["whole", "inside-the-head", "past-the-first-bytes", "a-range-past-the-head"],
)
def test_a_record_naming_another_models_blob_is_never_served(
    served: Served, offset: int, length: int, caplog: pytest.LogCaptureFixture
) -> None:
    """GetModel served whatever blob a record named: an index entry edited (by whoever can write
    the volume or the bucket) to name another model's blob, with its digest and sizes, streamed
    that model's ciphertext under this model's name (a client refused it only after the whole
    download). The blob's header names its model: GetModel of such a record (any range) is
    DATA_LOSS BLOB_OF_ANOTHER_MODEL before its first message, the head checked from the bytes the
    download reads anyway, and verify reports it; both models' stored data stay as they were.
    Which model's blob it is goes to the store's log only: the answer named it to any reader of
    this name, a publisher scoped to its own tenant included."""
    put(served, make_artifact("acme/a", "1", body(200_000, 1)))
    victim = make_artifact("acme/b", "1", body(200_000, 2))
    put(served, victim)
    b = served.storage.stat("acme/b", "1")
    point_at_blob_of(served.storage, served.storage.stat("acme/a", "1"), b)
    edited = served.storage.stat("acme/a", "1")
    request = pb.GetModelRequest(name="acme/a", version="1", offset=offset, length=length)
    received: list[pb.GetModelResponse] = []
    with pytest.raises(grpc.RpcError) as info:
        received.extend(served.stub.GetModel(request, timeout=30))
    assert received == []
    assert_status(info.value, grpc.StatusCode.DATA_LOSS, "BLOB_OF_ANOTHER_MODEL")
    assert "acme/b" not in info.value.details()
    assert any("acme/b" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    with pytest.raises(StoredDataCorrupt) as refused:
        served.storage.verify("acme/a", "1")
    assert refused.value.reason == "BLOB_OF_ANOTHER_MODEL"
    assert verify_all(served.storage) == (IntegrityProblem("acme/a", "1", "BLOB_OF_ANOTHER_MODEL"),)
    assert served.storage.stat("acme/a", "1") == edited
    assert read_blob(served.storage, b) == victim
    assert b"".join(r.data for r in get(served, "acme/b", "1")) == victim


def test_a_corrupt_entry_outside_the_name_grammar_is_deleted_as_listed(
    fs_served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A filesystem index row whose name lies outside the name grammar was listed as corrupt,
    but DeleteModel of the name as listed failed its validation (INVALID_ARGUMENT), so only an
    edit of the index could remove it. DeleteModel with ``corrupt_entry`` deletes exactly the
    entry as listed (a byte that is not UTF-8 escaped too), logged with the caller; its blob is
    kept for the sweep (it may be another model's); a readable entry is not deleted this way."""
    for name in ("acme/a", "acme/b", "acme/c"):
        put(fs_served, make_artifact(name, "1", body(100)))
    b = fs_served.storage.stat("acme/b", "1")
    root = fs_served.storage.root  # type: ignore[union-attr]
    with contextlib.closing(sqlite3.connect(root / "index.sqlite3")) as db, db:
        db.execute("UPDATE models SET name = CAST(X'61636d652f62ff' AS TEXT) WHERE name = 'acme/b'")
        db.execute("UPDATE models SET name = 'acme/c c' WHERE name = 'acme/c'")
    listed = fs_served.stub.ListModels(pb.ListModelsRequest()).corrupt_entries
    assert [(e.name, e.version) for e in listed] == [("acme/b\\xff", "1"), ("acme/c c", "1")]
    err = rpc_error(fs_served.stub.DeleteModel, pb.DeleteModelRequest(name="acme/c c", version="1"))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME")
    for asked, code, reason in [
        ("acme/a", grpc.StatusCode.FAILED_PRECONDITION, "INDEX_ENTRY_NOT_CORRUPT"),
        ("acme/d d", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL_NAME"),
    ]:
        request = pb.DeleteModelRequest(name=asked, version="1", corrupt_entry=True)
        assert_status(rpc_error(fs_served.stub.DeleteModel, request), code, reason)
    with caplog.at_level(logging.WARNING):
        for e in listed:
            fs_served.stub.DeleteModel(
                pb.DeleteModelRequest(name=e.name, version=e.version, corrupt_entry=True),
                timeout=30,
            )
    page = fs_served.stub.ListModels(pb.ListModelsRequest())
    assert ([m.name for m in page.models], list(page.corrupt_entries)) == (["acme/a"], [])
    assert "unreadable index entry" in caplog.text and "acme/c c" in caplog.text
    assert b.artifact_sha256 in fs_served.storage.blob_digests()  # type: ignore[union-attr]
    assert get(fs_served, "acme/a", "1")


def test_a_corrupt_entry_in_the_grammar_is_deleted_as_listed_and_its_blob_kept(
    served: Served,
) -> None:
    """The same call on either backend: on S3 every listed corrupt entry is in the grammar."""
    put(served, make_artifact("acme/a", "1", body(100)))
    put(served, make_artifact("acme/b", "1", body(100, 1)))
    blobs = blob_count(served.storage)
    edit_index_entry(served.storage, served.storage.stat("acme/b", "1"), key_version=0)
    (entry,) = served.stub.ListModels(pb.ListModelsRequest()).corrupt_entries
    served.stub.DeleteModel(
        pb.DeleteModelRequest(name=entry.name, version=entry.version, corrupt_entry=True),
        timeout=30,
    )
    page = served.stub.ListModels(pb.ListModelsRequest())
    assert ([m.name for m in page.models], list(page.corrupt_entries)) == (["acme/a"], [])
    assert blob_count(served.storage) == blobs
    request = pb.DeleteModelRequest(name="acme/b", version="1", corrupt_entry=True)
    assert_status(
        rpc_error(served.stub.DeleteModel, request), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )


def test_a_deleted_corrupt_entry_is_logged_with_what_it_held(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """DeleteModel with ``corrupt_entry`` logged only the name as asked and the caller: nothing
    of what the entry held, so the blob it named (kept, and on the filesystem quarantined among
    others at the next start) could not be told apart, nor the entry put back. The line now
    carries its stored fields (bounded, escaped), the blob's digest among them."""
    put(served, make_artifact("acme/a", "1", body(100)))
    put(served, make_artifact("acme/b", "1", body(100, 1)))
    b = served.storage.stat("acme/b", "1")
    edit_index_entry(served.storage, b, key_version=0)
    with caplog.at_level(logging.WARNING, logger="strongroom.modelstore.service"):
        served.stub.DeleteModel(
            pb.DeleteModelRequest(name="acme/b", version="1", corrupt_entry=True), timeout=30
        )
    (line,) = [r.getMessage() for r in caplog.records if "unreadable index entry" in r.getMessage()]
    assert "'acme/b' '1'" in line
    assert b.artifact_sha256 in line and "key_version" in line
    assert len(line) < 4096


def test_corrupt_blob_is_data_loss(served: Served) -> None:
    art = make_artifact("m", "1", body(10_000))
    put(served, art)
    overwrite_blob(served.storage, served.storage.stat("m", "1"), art[:-1])
    err = rpc_error(served.stub.GetModel, pb.GetModelRequest(name="m", version="1"))
    assert_status(err, grpc.StatusCode.DATA_LOSS, "BLOB_SIZE_MISMATCH")


def test_a_rule_no_name_fits_under_does_not_fail_the_publishers_listing(
    fs_storage: FilesystemStorage,
) -> None:
    """A publishers rule of a 128-character name and "/" (accepted: the name is valid) covers no
    name, but its range was a 129-character prefix, which the storage's listing refuses: every
    listing of that publisher failed with INVALID_NAME_PREFIX, its own models unlisted."""
    caller = "spiffe://t.test/publisher"
    scopes = PublisherScopes({caller: ("team-a/", "x" * 128 + "/")})
    servicer = ModelStoreServicer(fs_storage, publishers=scopes)
    fs_storage.put([make_artifact("team-a/m", "1", b"w")], StructureValidator())
    for prefix in ("", "x" * 128):
        page = servicer._scoped_page(prefix, 10, "", scopes, caller)
        assert ([m.name for m in page.models], page.next_page_token) == (
            ["team-a/m"] if not prefix else [],
            "",
        )


def test_a_forged_page_token_with_a_lone_surrogate_is_invalid_not_internal(
    served: Served,
) -> None:
    """A token's JSON can escape a lone surrogate, which no stored key holds: the storage's
    encoding of it raised UnicodeEncodeError, so any reader's forged token was INTERNAL, with a
    traceback logged outside every budget; a scoped publisher's too, naming its own prefix."""
    served.storage.put([make_artifact("team-a/m", "1", b"w")], StructureValidator())
    forged = _pagetoken.encode("", "team-a/\ud800", "1")
    err = rpc_error(served.stub.ListModels, pb.ListModelsRequest(page_token=forged))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    caller = "spiffe://t.test/publisher"
    scopes = PublisherScopes({caller: ("team-a/",)})
    servicer = ModelStoreServicer(served.storage, publishers=scopes)
    with pytest.raises(InvalidArgument) as info:
        servicer._scoped_page("", 10, forged, scopes, caller)
    assert info.value.reason == "INVALID_PAGE_TOKEN"


def _scoped_listing(servicer: ModelStoreServicer, caller: str, page_size: int) -> list[str]:
    """Every name a scoped caller's listing walk shows, page by page."""
    scopes = servicer._publishers
    assert scopes is not None
    names: list[str] = []
    token = ""
    while True:
        page = servicer._scoped_page("", page_size, token, scopes, caller)
        names += [m.name for m in page.models]
        if not (token := page.next_page_token):
            return names


@pytest.mark.parametrize("page_size", [1, 1000])
def test_other_tenants_models_after_an_exact_rules_own_do_not_end_the_listing(
    storage: AnyStorage, monkeypatch: pytest.MonkeyPatch, page_size: int
) -> None:
    """An exact-name rule's range (``shared/m``) also holds longer names, another tenant's
    (``shared/m-b/...``, under a rule of its own), all after the caller's own versions: more than
    MAX_SKIPPED_PER_PAGE of them ended every listing walk of the caller with LISTING_TOO_SPARSE
    after its first page, whatever the name_prefix, and its models in later ranges
    (``team-a/``) were never listed; each page read that many of the other tenant's records.
    Past the last name a rule of the range covers, nothing more is the caller's: the range ends
    there. Others' models between names its rules cover still count towards the bound."""
    caller = "spiffe://t.test/publisher"
    for name in ("shared/m", "shared/m-b/1", "shared/m-b/2", "shared/m-b/3", "team-a/x"):
        storage.put([make_artifact(name, "1", b"w")], StructureValidator())
    monkeypatch.setattr(service_module, "MAX_SKIPPED_PER_PAGE", 2)
    scopes = PublisherScopes({caller: ("shared/m", "team-a/")})
    servicer = ModelStoreServicer(storage, publishers=scopes)
    assert _scoped_listing(servicer, caller, page_size) == ["shared/m", "team-a/x"]
    # The bound still holds where the others lie between the caller's own names.
    between = PublisherScopes({caller: ("shared/m", "shared/m-c", "team-a/")})
    servicer = ModelStoreServicer(storage, publishers=between)
    with pytest.raises(ResourceExhausted) as info:
        _scoped_listing(servicer, caller, page_size)
    assert info.value.reason == "LISTING_TOO_SPARSE"


def test_method_roles_cover_every_rpc() -> None:
    service = pb.DESCRIPTOR.services_by_name["ModelStoreService"]
    assert set(METHOD_ROLES) == {f"/{SERVICE_NAME}/{m.name}" for m in service.methods}
    assert METHOD_ROLES[f"/{SERVICE_NAME}/PutModel"] == ROLE_PUBLISHER
    assert METHOD_ROLES[f"/{SERVICE_NAME}/DeleteModel"] == ROLE_ADMIN
    for method in ("GetModel", "StatModel", "ListModels"):
        assert METHOD_ROLES[f"/{SERVICE_NAME}/{method}"] == ROLE_READER
    assert SERVICE_NAME == "strongroom.api.modelstore.v1.ModelStoreService"


def test_a_range_read_on_a_filesystem_that_returns_short_reads_is_served(
    fs_served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range past the head is checked against the head, read by one pread: on FUSE or NFS,
    which may return fewer bytes than asked, GetModel answered a healthy model DATA_LOSS
    HEADER_CORRUPT. The head is read until it is whole now."""
    art = make_artifact("acme/m", "1", body(5000))
    info = put(fs_served, art)
    force_short_reads(monkeypatch)
    offset = info.artifact_size - 100
    messages = get(fs_served, "acme/m", "1", offset=offset, length=50)
    assert b"".join(m.data for m in messages) == art[offset : offset + 50]
