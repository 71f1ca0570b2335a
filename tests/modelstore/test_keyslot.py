"""Replacing a stored artifact's key slot (re-wrap): atomic, compare-and-swap, forward only."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.artifact import InvalidArtifact, StructureValidator, parse_header
from strongroom.errors import InvalidArgument
from strongroom.identifiers import MAX_KEY_VERSION
from strongroom.modelstore.errors import KeySlotRejected, ModelNotFound, StoredDataCorrupt
from strongroom.modelstore.service import METHOD_ROLES, ROLE_ADMIN, SERVICE_NAME, model_info
from strongroom.modelstore.storage import FilesystemStorage
from tests.modelstore.artifacts import chunked
from tests.modelstore.backends import (
    AnyStorage,
    assert_clean,
    blob_count,
    overwrite_blob,
    point_at_blob_of,
)
from tests.modelstore.conftest import Served, serve
from tests.modelstore.rewrap_case import (
    artifact,
    decrypt_stored,
    plaintext_of,
    wrapped,
)

SIZE = 100_000


def _store(storage: AnyStorage, name: str = "acme/m", version: str = "1", **kw: int) -> bytes:
    data = artifact(name, version, SIZE, **kw)
    storage.put(chunked(data, 7000), StructureValidator())
    return data


def _read(storage: AnyStorage, name: str = "acme/m", version: str = "1") -> bytes:
    with storage.open(name, version) as reader:
        return b"".join(reader.chunks(1 << 16))


def _replace(storage: AnyStorage, expected: int, new: int, **kw: bytes) -> object:
    return storage.replace_key_slot(
        "acme/m",
        "1",
        expected_key_version=expected,
        key_version=new,
        wrapped_dek=kw.get("wrapped_dek", wrapped("acme/m", "1", new)),
    )


def test_replace_moves_only_the_slot(storage: AnyStorage) -> None:
    original = _store(storage)
    before = storage.stat("acme/m", "1")
    after = _replace(storage, 1, 2)
    assert after == storage.stat("acme/m", "1")
    assert after.key_version == 2 and after.artifact_sha256 != before.artifact_sha256
    assert (after.artifact_size, after.header_size) == (before.artifact_size, before.header_size)
    data = _read(storage)
    # Context, body and footer untouched; only the slot differs; the model decrypts through it.
    head = len(data) - len(original[before.header_size :])
    assert data[before.header_size :] == original[before.header_size :]
    assert data[:head] != original[:head]
    assert decrypt_stored(data) == plaintext_of("acme/m", "1", SIZE)
    assert storage.verify("acme/m", "1") == after
    # The old blob is gone; nothing left behind.
    assert blob_count(storage) == 1
    assert_clean(storage)


def test_a_record_pointing_at_another_models_blob_is_not_re_wrapped(storage: AnyStorage) -> None:
    """An index entry edited (by whoever can write the storage) to name another model's blob was
    re-wrapped as if it were its own: the other model's artifact was copied under this record
    and, on S3, the other model's blob deleted. The blob's header names its model; a re-wrap of a
    record whose blob names another is DATA_LOSS BLOB_OF_ANOTHER_MODEL, and nothing changes."""
    _store(storage)
    other = _store(storage, "acme/o")
    point_at_blob_of(storage, storage.stat("acme/m", "1"), storage.stat("acme/o", "1"))
    edited = storage.stat("acme/m", "1")
    with pytest.raises(StoredDataCorrupt) as info:
        _replace(storage, 1, 2)
    assert info.value.reason == "BLOB_OF_ANOTHER_MODEL"
    assert info.value.status_name == "DATA_LOSS"
    assert _read(storage, "acme/o") == other
    assert storage.stat("acme/m", "1") == edited
    assert blob_count(storage) == 2


def test_replaying_a_replacement_is_a_no_op(storage: AnyStorage) -> None:
    _store(storage)
    first = _replace(storage, 1, 2)
    assert _replace(storage, 1, 2) == first
    assert _replace(storage, 2, 3).key_version == 3  # type: ignore[attr-defined]
    assert decrypt_stored(_read(storage)) == plaintext_of("acme/m", "1", SIZE)


@pytest.mark.parametrize(
    ("expected", "new", "reason"),
    [
        (2, 3, "KEY_SLOT_CHANGED"),  # the caller's view is stale
        (1, 1, "KEY_VERSION_NOT_NEWER"),  # same version, another wrapped key
    ],
)
def test_refused_replacements_leave_the_model_intact(
    storage: AnyStorage, expected: int, new: int, reason: str
) -> None:
    original = _store(storage)
    record = storage.stat("acme/m", "1")
    with pytest.raises(KeySlotRejected) as info:
        _replace(storage, expected, new, wrapped_dek=wrapped("acme/m", "1", 7))
    assert info.value.reason == reason
    assert storage.stat("acme/m", "1") == record
    assert _read(storage) == original


def test_no_rollback_to_an_older_kek_version(storage: AnyStorage) -> None:
    _store(storage)
    _replace(storage, 1, 3)
    with pytest.raises(KeySlotRejected) as info:
        _replace(storage, 3, 2)
    assert info.value.reason == "KEY_VERSION_NOT_NEWER"


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        (0, "KEY_VERSION_INVALID"),  # versions start at 1
        (MAX_KEY_VERSION + 1, "KEY_VERSION_INVALID"),  # the wire field is 32 bits unsigned
        (2**32 - 1, "KEY_VERSION_INVALID"),
        (2, "KEY_SLOT_NOT_REWRAPPED"),  # the stored wrapped key again, as a "new" version
    ],
)
def test_a_version_no_broker_numbers_or_a_key_not_rewrapped_is_refused(
    storage: AnyStorage, new: int, reason: str
) -> None:
    """A KEK version up to 2**32-1 was accepted (the broker numbers 1..2**31-1: the model could
    not be released under it, nor re-wrapped forward past it), and so was the stored wrapped key
    offered again under a newer version (it is not wrapped under that KEK: the model would not
    load). Both are INVALID_ARGUMENT now, the stored model untouched."""
    original = _store(storage)
    record = storage.stat("acme/m", "1")
    stored = parse_header(original).wrapped_dek
    offered = wrapped("acme/m", "1", new) if reason == "KEY_VERSION_INVALID" else stored
    with pytest.raises(InvalidArgument) as info:
        _replace(storage, 1, new, wrapped_dek=offered)
    assert info.value.reason == reason
    assert storage.stat("acme/m", "1") == record
    assert _read(storage) == original
    assert_clean(storage)
    assert _replace(storage, 1, MAX_KEY_VERSION).key_version == MAX_KEY_VERSION  # type: ignore[attr-defined]


def test_format_1_is_not_replaceable(storage: AnyStorage) -> None:
    original = _store(storage, format_version=1)
    with pytest.raises(KeySlotRejected) as info:
        _replace(storage, 1, 2)
    assert info.value.reason == "KEY_SLOT_NOT_REPLACEABLE"
    assert _read(storage) == original


@pytest.mark.parametrize(
    ("wrapped_dek", "reason"),
    [
        (b"", "INVALID_WRAPPED_DEK"),
        (bytes(41), "INVALID_WRAPPED_DEK"),
        (bytes(2000), "INVALID_WRAPPED_DEK"),
    ],
)
def test_malformed_slots_are_refused(storage: AnyStorage, wrapped_dek: bytes, reason: str) -> None:
    original = _store(storage)
    with pytest.raises(InvalidArtifact) as info:
        _replace(storage, 1, 2, wrapped_dek=wrapped_dek)
    assert info.value.reason == reason
    assert _read(storage) == original
    assert_clean(storage)


def test_missing_model(storage: AnyStorage) -> None:
    with pytest.raises(ModelNotFound):
        _replace(storage, 1, 2)


def test_an_open_reader_keeps_reading_the_old_artifact(storage: AnyStorage) -> None:
    original = _store(storage)
    with storage.open("acme/m", "1") as reader:
        _replace(storage, 1, 2)
        assert b"".join(reader.chunks(4096)) == original


def _rewrap_before_the_first_get(storage: AnyStorage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """On S3, makes the next GET of a blob come after a re-wrap that replaced (and deleted) the
    blob the reader had just looked up; returns the list the race appends to once it ran."""
    client = storage._client  # type: ignore[union-attr]
    real_get = client.get_object
    raced: list[int] = []

    def get_object(**kwargs: object) -> object:
        if not raced and "/index/" not in str(kwargs["Key"]):  # a blob, after its index lookup
            raced.append(1)
            _replace(storage, 1, 2)  # its own GETs go through: ``raced`` is already set
        return real_get(**kwargs)

    monkeypatch.setattr(client, "get_object", get_object)
    return raced


# The filesystem backend looks the blob up and opens it under its commit lock: no such window.
@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_a_read_that_races_a_rewrap_reads_the_new_artifact(
    storage: AnyStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-wrap between a read's index lookup and its GET read as NOT_FOUND for a model that
    exists: an inference server loading while ``rewrap-models`` ran kept the model not ready."""
    _store(storage)
    raced = _rewrap_before_the_first_get(storage, monkeypatch)
    data = _read(storage)
    assert raced
    assert parse_header(data).key_version == 2
    assert decrypt_stored(data) == plaintext_of("acme/m", "1", SIZE)


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_a_verify_or_rewrap_that_races_a_rewrap_follows_it(
    storage: AnyStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store(storage)
    _rewrap_before_the_first_get(storage, monkeypatch)
    assert storage.verify("acme/m", "1").key_version == 2
    monkeypatch.undo()
    _rewrap_before_the_first_get(storage, monkeypatch)  # a no-op replay of 1 -> 2 races this one
    assert _replace(storage, 2, 3).key_version == 3
    assert_clean(storage)


# The filesystem backend deletes the row and its blob under its commit lock: no such window.
@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_a_delete_that_races_a_rewrap_deletes_the_model(
    storage: AnyStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-wrap between a delete's index read and its conditional delete made the delete answer
    NOT_FOUND (MODEL_NOT_FOUND, which callers take for "already gone") while the model stayed
    stored and served: an admin withdrawing a model while ``rewrap-models`` ran was told it was
    gone. The delete now reads the record again and removes the model."""
    _store(storage)
    client = storage._client  # type: ignore[union-attr]
    real_delete = client.delete_object
    raced: list[int] = []

    def delete_object(**kwargs: object) -> object:
        if not raced and "/index/" in str(kwargs["Key"]):  # the delete's index read is done
            raced.append(1)
            _replace(storage, 1, 2)  # its own deletes (the old blob) go through
        return real_delete(**kwargs)

    monkeypatch.setattr(client, "delete_object", delete_object)
    storage.delete("acme/m", "1")
    assert raced
    with pytest.raises(ModelNotFound):
        storage.stat("acme/m", "1")
    assert blob_count(storage) == 0
    assert_clean(storage)


def test_concurrent_replacements_have_one_winner(storage: AnyStorage) -> None:
    _store(storage)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def race(i: int) -> None:
        barrier.wait()
        try:
            # Four different wrappings to version 2 (only one can be the slot afterwards).
            _replace(storage, 1, 2, wrapped_dek=wrapped("acme/m", "1", 2 + 10 * i))
            outcomes.append("won")
        except KeySlotRejected as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("won") == 1
    assert sorted(set(outcomes) - {"won"}) == ["KEY_SLOT_CHANGED"]
    assert blob_count(storage) == 1
    assert_clean(storage)


def test_replace_over_grpc(storage: AnyStorage) -> None:
    assert METHOD_ROLES[f"/{SERVICE_NAME}/ReplaceKeySlot"] == ROLE_ADMIN
    _store(storage)
    host, channel = serve(storage)
    try:
        from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc

        served = Served(storage, pb_grpc.ModelStoreServiceStub(channel), channel)
        request = pb.ReplaceKeySlotRequest(
            name="acme/m",
            version="1",
            expected_key_version=1,
            key_version=2,
            wrapped_data_key=wrapped("acme/m", "1", 2),
        )
        response = served.stub.ReplaceKeySlot(request, timeout=30)
        assert response.replaced and response.model.key_version == 2
        again = served.stub.ReplaceKeySlot(request, timeout=30)
        assert not again.replaced and again.model == response.model
        request.expected_key_version, request.key_version = 1, 3
        with pytest.raises(grpc.RpcError) as info:
            served.stub.ReplaceKeySlot(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("strongroom-reason", "KEY_SLOT_CHANGED") in tuple(info.value.trailing_metadata())  # type: ignore[attr-defined]
        request.expected_key_version, request.key_version = 2, 2**31
        with pytest.raises(grpc.RpcError) as info:
            served.stub.ReplaceKeySlot(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("strongroom-reason", "KEY_VERSION_INVALID") in tuple(info.value.trailing_metadata())  # type: ignore[attr-defined]
        assert storage.stat("acme/m", "1").key_version == 2  # untouched
        request.name = "acme/missing"
        with pytest.raises(grpc.RpcError) as info:
            served.stub.ReplaceKeySlot(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        host.stop(0)


def test_survives_reopen(store_root: Path) -> None:
    with FilesystemStorage(store_root) as storage:
        _store(storage)
        _replace(storage, 1, 2)
    with FilesystemStorage(store_root) as storage:
        assert storage.last_sweep.orphan_blobs_quarantined == ()
        assert storage.stat("acme/m", "1").key_version == 2
        assert decrypt_stored(_read(storage)) == plaintext_of("acme/m", "1", SIZE)


def test_a_damaged_body_is_not_rewrapped_into_a_valid_one(served: Served) -> None:
    """The filesystem backend copied the stored body into the new artifact without checking it
    against the recorded digest, and recorded the copy's digest: a re-wrap turned a damaged
    artifact (a flipped bit on disk) into one that verifies, so ``verify``, the sweep and the
    store's integrity check no longer saw the damage. Both backends now refuse (DATA_LOSS
    DIGEST_MISMATCH) and leave the model as it was."""
    storage = served.storage
    original = _store(storage)
    record = storage.stat("acme/m", "1")
    damaged = bytearray(original)
    damaged[-1000] ^= 1
    overwrite_blob(storage, record, bytes(damaged))
    request = pb.ReplaceKeySlotRequest(
        name="acme/m",
        version="1",
        expected_key_version=1,
        key_version=2,
        wrapped_data_key=wrapped("acme/m", "1", 2),
    )
    with pytest.raises(grpc.RpcError) as info:
        served.stub.ReplaceKeySlot(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
    assert ("strongroom-reason", "DIGEST_MISMATCH") in tuple(info.value.trailing_metadata())  # type: ignore[attr-defined]
    assert storage.stat("acme/m", "1") == record
    with pytest.raises(StoredDataCorrupt) as verified:
        storage.verify("acme/m", "1")
    assert verified.value.reason == "DIGEST_MISMATCH"
    assert _read(storage) == bytes(damaged)
    assert_clean(storage)


def test_the_slot_must_still_hold_the_wrapped_key_that_was_rewrapped(storage: AnyStorage) -> None:
    """A compare-and-swap on the KEK version alone let a re-wrap of one artifact's data key land
    on another artifact stored under the same name, version and KEK version (deleted and
    published again meanwhile): that model could never be decrypted again."""
    original = _store(storage)
    stale = wrapped("acme/m", "0", 1)  # what a previous artifact of acme/m 1 held
    with pytest.raises(KeySlotRejected) as info:
        storage.replace_key_slot(
            "acme/m",
            "1",
            expected_key_version=1,
            key_version=2,
            wrapped_dek=wrapped("acme/m", "0", 2),
            expected_wrapped_dek=stale,
        )
    assert info.value.reason == "KEY_SLOT_CHANGED"
    assert _read(storage) == original
    own = wrapped("acme/m", "1", 1)

    def rewrap() -> object:
        return storage.replace_key_slot(
            "acme/m",
            "1",
            expected_key_version=1,
            key_version=2,
            wrapped_dek=wrapped("acme/m", "1", 2),
            expected_wrapped_dek=own,
        )

    first = rewrap()
    # A replay (the slot now holds the new key, not the expected one) is still a no-op.
    assert rewrap() == first
    assert decrypt_stored(_read(storage)) == plaintext_of("acme/m", "1", SIZE)
    assert_clean(storage)


def test_a_model_deleted_while_its_slot_is_replaced_is_not_found(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model deleted while the store copied it into its re-wrapped artifact (seconds for a
    large model) made ReplaceKeySlot answer FAILED_PRECONDITION KEY_SLOT_CHANGED, which the
    rotation client reports as ``failed`` (exit 1) instead of ``gone``. It is NOT_FOUND now, and
    nothing of the replacement is left behind."""
    storage = served.storage
    _store(storage)
    real_swap = storage._swap

    def delete_then_swap(*args: object, **kwargs: object) -> object:
        storage.delete("acme/m", "1")  # an admin's ``model rm`` lands during the copy
        return real_swap(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "_swap", delete_then_swap)
    request = pb.ReplaceKeySlotRequest(
        name="acme/m",
        version="1",
        expected_key_version=1,
        key_version=2,
        wrapped_data_key=wrapped("acme/m", "1", 2),
    )
    with pytest.raises(grpc.RpcError) as info:
        served.stub.ReplaceKeySlot(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert ("strongroom-reason", "MODEL_NOT_FOUND") in tuple(info.value.trailing_metadata())  # type: ignore[attr-defined]
    assert blob_count(storage) == 0
    assert_clean(storage)


def test_the_same_replacement_made_meanwhile_by_another_run_is_a_no_op(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rotation runs re-wrap the same model to the same slot (AES-KWP is deterministic: the
    broker re-wraps one data key to the same bytes). The run whose swap came second was refused
    KEY_SLOT_CHANGED -- reported ``failed``, exit 1 -- although the model held exactly the slot it
    asked for; a replay after the fact was already a no-op. It is a no-op during the copy too."""
    storage = served.storage
    _store(storage)
    real_swap = storage._swap
    request = pb.ReplaceKeySlotRequest(
        name="acme/m",
        version="1",
        expected_key_version=1,
        key_version=2,
        wrapped_data_key=wrapped("acme/m", "1", 2),
        expected_wrapped_data_key=wrapped("acme/m", "1", 1),
    )
    other: list[pb.ReplaceKeySlotResponse] = []

    def other_run_first(*args: object, **kwargs: object) -> object:
        if not other:  # the other run's whole replacement lands during this one's copy
            monkeypatch.setattr(storage, "_swap", real_swap)
            other.append(served.stub.ReplaceKeySlot(request, timeout=30))
        return real_swap(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "_swap", other_run_first)
    answer = served.stub.ReplaceKeySlot(request, timeout=30)
    assert other and other[0].replaced
    assert answer.model == other[0].model == model_info(storage.stat("acme/m", "1"))
    assert decrypt_stored(_read(storage)) == plaintext_of("acme/m", "1", SIZE)
    assert blob_count(storage) == 1
    assert_clean(storage)
