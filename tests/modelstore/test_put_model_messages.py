"""PutModel's messages are read without protobuf's copy of each chunk, and read as protobuf reads
them: the store's own reading of a data-only message, and protobuf's of everything else; the
publishing client sends them without protobuf's copies, in protobuf's bytes."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import time
from array import array
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.artifact import StructureValidator
from strongroom.client.publish import (
    UPLOAD_MESSAGE_BYTES,
    UploadMessage,
    _serialize_upload,
    put_model,
    upload_artifact,
    upload_pieces,
)
from strongroom.errors import FailedPrecondition
from strongroom.modelstore.service import (
    DEFAULT_MAX_CHUNK,
    SERVICE_NAME,
    _put_model_request,
    message_limits,
)
from strongroom.reasons import Reason
from strongroom.wire import append_bytes_field, encode_varint
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.backends import AnyStorage, assert_clean
from tests.modelstore.conftest import Served

_DATA = 1
_UNKNOWN_VARINT = encode_varint(15 << 3) + encode_varint(7)

MESSAGES = [
    pb.PutModelRequest(data=b"x" * 300).SerializeToString(),  # data only: a view
    pb.PutModelRequest(data=b"x" * 300, artifact_size=301).SerializeToString(),
    pb.PutModelRequest(data=b"y", artifact_sha256="ab" * 32).SerializeToString(),
    pb.PutModelRequest(artifact_size=5).SerializeToString(),
    b"",  # an empty message: no data
    b"\x0a\x00",  # an empty data field (protobuf itself sends no field for empty data)
    append_bytes_field(append_bytes_field(b"", _DATA, b"first"), _DATA, b"second"),  # last wins
    append_bytes_field(_UNKNOWN_VARINT, _DATA, b"after an unknown field"),
    append_bytes_field(b"", _DATA, b"before an unknown field") + _UNKNOWN_VARINT,
    b"\x0a\x81\x00" + b"z",  # a length in a non-minimal varint: protobuf accepts it
]

MALFORMED = [
    b"\x0a\x05abc",  # the data field runs past the end
    b"\x0a",  # no length
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a length over 10 bytes
    b"\x0a\x01ab",  # one byte more than the field: the rest is not a field
]


@pytest.mark.parametrize("message", MESSAGES)
def test_every_message_reads_as_protobuf_reads_it(message: bytes) -> None:
    expected = pb.PutModelRequest.FromString(message)
    read = _put_model_request(message)
    assert bytes(read.data) == expected.data
    assert read.artifact_size == expected.artifact_size
    assert read.artifact_sha256 == expected.artifact_sha256


@pytest.mark.parametrize("message", MALFORMED)
def test_a_malformed_message_is_refused_as_protobuf_refuses_it(message: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.PutModelRequest.FromString(message)
    with pytest.raises(DecodeError):
        _put_model_request(message)


def test_a_data_only_message_is_read_without_a_copy() -> None:
    message = pb.PutModelRequest(data=bytes(range(256)) * 4096).SerializeToString()
    data = _put_model_request(message).data
    assert isinstance(data, memoryview) and data.obj is message  # a view into gRPC's bytes
    assert data == pb.PutModelRequest.FromString(message).data


def test_an_upload_of_mixed_messages_stores_what_protobuf_reads(fs_served: Served) -> None:
    """Messages in every form a client may send, through gRPC: the artifact stored is the one
    protobuf's reading of them gives, and its announced size and digest are checked; a
    malformed message is refused as before, and nothing of that upload is stored."""
    artifact = make_artifact("m", "1", hashlib.shake_256(b"mixed").digest(300_000))
    pieces = chunked(artifact, 50_000)
    messages = [
        pb.PutModelRequest(data=pieces[0], artifact_size=len(artifact)).SerializeToString(),
        append_bytes_field(b"", _DATA, pieces[1]),
        append_bytes_field(append_bytes_field(b"", _DATA, b"replaced"), _DATA, pieces[2]),
        append_bytes_field(_UNKNOWN_VARINT, _DATA, pieces[3]),
        *(append_bytes_field(b"", _DATA, piece) for piece in pieces[4:]),
        pb.PutModelRequest(
            artifact_sha256=hashlib.sha256(artifact).hexdigest()
        ).SerializeToString(),
    ]
    upload = fs_served.channel.stream_unary(
        f"/{SERVICE_NAME}/PutModel",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.PutModelResponse.FromString,
    )
    response = upload(iter(messages), timeout=30)
    assert response.model.artifact_size == len(artifact)
    with fs_served.storage.open("m", "1") as reader:
        assert b"".join(reader.chunks(65536)) == artifact

    other = make_artifact("m", "2", b"other")
    bad = [pb.PutModelRequest(data=other[:100]).SerializeToString(), b"\x0a\x05abc"]
    with pytest.raises(grpc.RpcError) as info:
        upload(iter(bad), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("MALFORMED_REQUEST: ")
    assert [r.version for r in fs_served.storage.records()] == ["1"]


def test_the_publishers_messages_are_views_sent_as_protobuf_would() -> None:
    """The publishing client sends each chunk as a view of the artifact's piece, framed as
    protobuf frames PutModelRequest(data=...), without protobuf's copies in and out."""
    piece = hashlib.shake_256(b"piece").digest(2 * UPLOAD_MESSAGE_BYTES + 12345)
    views = list(upload_pieces(piece))
    assert [len(v) for v in views] == [UPLOAD_MESSAGE_BYTES, UPLOAD_MESSAGE_BYTES, 12345]
    assert all(isinstance(v, memoryview) and v.obj is piece for v in views)
    for view in views:
        assert _serialize_upload(view) == pb.PutModelRequest(data=bytes(view)).SerializeToString()
    claims = pb.PutModelRequest(data=b"head", artifact_size=9, artifact_sha256="ab" * 32)
    assert _serialize_upload(claims) == claims.SerializeToString()


def test_an_artifact_file_uploads_through_the_views(fs_served: Served, tmp_path: Path) -> None:
    artifact = make_artifact("m", "1", hashlib.shake_256(b"file").digest(3 * UPLOAD_MESSAGE_BYTES))
    path = tmp_path / "m.artifact"
    path.write_bytes(artifact)
    published = upload_artifact(path, store=fs_served.channel, timeout=30)
    assert published.model.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    with fs_served.storage.open("m", "1") as reader:
        assert b"".join(reader.chunks(65536)) == artifact


def _artifact_file(tmp_path: Path, version: str, *, settled: bool = False) -> tuple[Path, bytes]:
    artifact = make_artifact("m", version, hashlib.shake_256(version.encode()).digest(3 << 20))
    path = tmp_path / f"m-{version}.artifact"
    path.write_bytes(artifact)
    if settled:
        # Past the clock tick of its last change, so that its times show any further one (the
        # upload reads a file changed within the tick of its check a second time).
        changed = path.stat().st_ctime_ns
        while time.clock_gettime_ns(5) <= changed:  # CLOCK_REALTIME_COARSE
            time.sleep(0.001)
    return path, artifact


def test_an_artifact_file_is_read_once_and_its_digest_checked_at_the_end(
    fs_served: Served, tmp_path: Path
) -> None:
    """upload_artifact hashes the file as it sends it: the size goes with the first message, the
    digest with the last, and each byte is read from the file once."""
    path, artifact = _artifact_file(tmp_path, "1")
    published = upload_artifact(path, store=fs_served.channel, timeout=30)
    assert published.model.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    # Every byte once: the file's own reads (header and footer checks, then the upload) against
    # its size, counted by the kernel for this thread and the one gRPC consumes requests on.
    seen: list[int] = []

    def count(sent: int, total: int) -> None:
        seen.append(sent)

    path2, artifact2 = _artifact_file(tmp_path, "2", settled=True)
    reads_before = _file_reads()
    upload_artifact(path2, store=fs_served.channel, timeout=30, progress=count)
    read = _file_reads() - reads_before
    assert seen[-1] == len(artifact2)
    assert read < 1.5 * len(artifact2), f"{read} bytes read for a {len(artifact2)}-byte file"


def test_an_artifact_file_of_one_message_carries_size_and_digest_in_it(
    fs_served: Served, tmp_path: Path
) -> None:
    artifact = make_artifact("m", "small", b"tiny model")
    assert len(artifact) < UPLOAD_MESSAGE_BYTES
    path = tmp_path / "small.artifact"
    path.write_bytes(artifact)
    published = upload_artifact(path, store=fs_served.channel, timeout=30)
    assert published.model.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    assert published.model.artifact_size == len(artifact)


def _file_reads() -> int:
    # read()/pread() bytes of this process, from /proc: gRPC receives with recvmsg, not counted.
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("change", ["rewritten", "grown", "shrunk"])
def test_an_artifact_file_that_changes_during_its_upload_is_not_stored(
    fs_served: Served, tmp_path: Path, change: str
) -> None:
    path, artifact = _artifact_file(tmp_path, "1")
    changed: list[int] = []

    def change_file(sent: int, total: int) -> None:
        if changed:
            return
        changed.append(sent)
        with path.open("r+b") as f:
            if change == "rewritten":  # bytes not yet sent, same size
                f.seek(len(artifact) // 2)
                f.write(b"\0" * 4096)
            elif change == "grown":
                f.seek(0, 2)
                f.write(b"more")
            else:
                f.truncate(len(artifact) - 4096)

    with pytest.raises(FailedPrecondition) as raised:
        upload_artifact(path, store=fs_served.channel, timeout=30, progress=change_file)
    assert raised.value.reason == Reason.MODEL_FILE_CHANGED
    assert str(path) in str(raised.value)
    assert list(fs_served.storage.records()) == []
    assert_clean(fs_served.storage)


@pytest.mark.parametrize("written", [True, False])
def test_an_artifact_file_mapped_by_a_writer_is_read_again_before_its_last_bytes(
    fs_served: Served, tmp_path: Path, written: bool
) -> None:
    """A write through a shared mapping to a page already dirty changes no time of the file:
    such a file, rewritten in bytes not yet sent, was stored as uploaded, torn (the digest, taken
    as it was sent, was the torn bytes'). Open for writing (a mapping holds it open), its content
    is now read again before the last message; unchanged, it is stored."""
    path, artifact = _artifact_file(tmp_path, "1", settled=True)
    # One update of two places: one in the first message (sent), one in the last (not yet).
    places = (UPLOAD_MESSAGE_BYTES // 2, len(artifact) - UPLOAD_MESSAGE_BYTES // 2)
    with path.open("r+b") as writer:
        mapping = mmap.mmap(writer.fileno(), 0)
    try:
        for place in places:  # dirties the pages (and updates the times) before the check
            mapping[place] = artifact[place]
        changed: list[int] = []

        def change_file(sent: int, total: int) -> None:
            if written and not changed:
                changed.append(sent)
                for place in places:
                    mapping[place] = artifact[place] ^ 0xFF  # no fault, no time update

        if not written:
            reads_before = _file_reads()
            published = upload_artifact(path, store=fs_served.channel, timeout=30)
            assert published.model.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
            assert _file_reads() - reads_before >= 2 * len(artifact)  # sent, then read again
            return
        before = os.stat(path)
        with pytest.raises(FailedPrecondition) as raised:
            upload_artifact(path, store=fs_served.channel, timeout=30, progress=change_file)
        assert changed
        after = os.stat(path)
        # What made the times useless here: the file changed, its times did not.
        assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
        assert raised.value.reason == Reason.MODEL_FILE_CHANGED
        assert list(fs_served.storage.records()) == []
        assert_clean(fs_served.storage)
    finally:
        mapping.close()


def test_a_digest_sent_last_that_differs_is_refused_and_nothing_kept(fs_served: Served) -> None:
    artifact = make_artifact("m", "1", hashlib.shake_256(b"last").digest(300_000))
    pieces = chunked(artifact, 100_000)
    messages: list[UploadMessage] = [
        pb.PutModelRequest(data=pieces[0], artifact_size=len(artifact)),
        *pieces[1:-1],
        pb.PutModelRequest(data=pieces[-1], artifact_sha256=hashlib.sha256(b"other").hexdigest()),
    ]
    with pytest.raises(grpc.RpcError) as info:
        put_model(fs_served.channel, iter(messages), name="m", version="1", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("DIGEST_MISMATCH: ")
    assert list(fs_served.storage.records()) == []
    assert_clean(fs_served.storage)


def _padded_varint(value: int, extra: int) -> bytes:
    """``value`` as a varint with ``extra`` redundant continuation bytes (protobuf reads up to
    10 bytes in all)."""
    encoded = bytearray(encode_varint(value))
    for _ in range(extra):
        encoded[-1] |= 0x80
        encoded.append(0)
    return bytes(encoded)


def _crafted() -> Iterator[bytes]:
    """Messages that a hand-written reader of ``tag, length, data`` could read unlike protobuf."""
    data = b"chunk bytes"
    for extra in range(11):  # 10 bytes in all is the most protobuf reads
        yield b"\x0a" + _padded_varint(len(data), extra) + data
    for last in range(128):  # a 10-byte length whose last byte sets bits past 2**64 (dropped)
        yield b"\x0a\x8b" + b"\x80" * 8 + bytes((last,)) + data
    for length in (len(data) + 1, len(data) - 1, 2**31, 2**32 + len(data), 2**63, 2**64 - 1):
        yield b"\x0a" + encode_varint(length) + data  # past the end, short of it, overflowing
    for tag_bytes in range(1, 7):  # the tag itself in a non-minimal varint
        tag = _padded_varint(_DATA << 3 | 2, tag_bytes - 1)
        yield tag + encode_varint(len(data)) + data
    for wire_type in (0, 1, 3, 4, 5, 6, 7):  # field 1 with another wire type
        yield bytes((_DATA << 3 | wire_type,)) + encode_varint(len(data)) + data
    yield b""  # a zero-length message
    yield b"\x0a\x00"
    yield b"\x0a\x00" + append_bytes_field(b"", _DATA, data)  # repeated: the last one is read
    yield append_bytes_field(b"", _DATA, data) + b"\x0a\x00"
    yield _UNKNOWN_VARINT + append_bytes_field(b"", _DATA, data)
    yield append_bytes_field(b"", _DATA, data) + _UNKNOWN_VARINT
    yield b"\x0b" + append_bytes_field(b"", _DATA, data) + b"\x0c"  # inside a group of field 1
    yield b"\x7b" + b"\x0c" + append_bytes_field(b"", _DATA, data)  # unmatched end of group
    yield b"\x12\x01\x05" + append_bytes_field(b"", _DATA, data)  # artifact_size as packed
    yield b"\x10\x85\x80\x80\x80\x80\x80\x80\x80\x80\x00" + append_bytes_field(b"", _DATA, data)


def _random(rng: random.Random) -> bytes:
    data = rng.randbytes(rng.choice((0, 1, 127, 128, 300)))
    valid = pb.PutModelRequest(
        data=data,
        artifact_size=rng.choice((0, 0, 1, 2**64 - 1)),
        artifact_sha256=rng.choice(("", "ab" * 32)),
    ).SerializeToString()
    kind = rng.randrange(4)
    if kind == 0:  # a data-only message with a mangled length
        length = rng.choice((len(data), len(data) + rng.randint(-3, 3), rng.getrandbits(64)))
        return b"\x0a" + _padded_varint(max(length, 0), rng.randrange(12)) + data
    if kind == 1:  # a valid message, cut or extended
        return valid[: rng.randrange(len(valid) + 1)] + rng.randbytes(rng.randrange(3))
    if kind == 2:  # a valid message with one byte changed
        if not valid:
            return valid
        mutated = bytearray(valid)
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        return bytes(mutated)
    return b"\x0a" + rng.randbytes(rng.randrange(16))


def test_the_reader_agrees_with_protobuf_on_crafted_and_random_messages() -> None:
    """Differential: for every message, the store's reader gives the data bytes and other fields
    protobuf gives, or refuses it as protobuf does (DecodeError: MALFORMED_REQUEST either way)."""
    rng = random.Random(20261206)
    messages = [*_crafted(), *(_random(rng) for _ in range(5000))]
    fast = 0
    for message in messages:
        try:
            expected: pb.PutModelRequest | None = pb.PutModelRequest.FromString(message)
        except DecodeError:
            expected = None
        if expected is None:
            with pytest.raises(DecodeError):
                _put_model_request(message)
            continue
        read = _put_model_request(message)
        assert (bytes(read.data), read.artifact_size, read.artifact_sha256) == (
            expected.data,
            expected.artifact_size,
            expected.artifact_sha256,
        ), message
        fast += isinstance(read.data, memoryview)
    assert fast > 100  # the view path was exercised, not only protobuf's


FRAMED_SIZES = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, DEFAULT_MAX_CHUNK]
"""Around each varint length boundary (1, 2, 3, 4 bytes), and the largest data the store takes."""


@pytest.fixture
def wire_capture() -> Iterator[tuple[grpc.Channel, list[bytes]]]:
    """A real gRPC server whose PutModel keeps each message's bytes as they arrived, answering
    with the size protobuf reads from them (so that the publisher's answer check passes)."""
    received: list[bytes] = []

    def put(requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.PutModelResponse:
        received.extend(requests)
        size = sum(len(pb.PutModelRequest.FromString(raw).data) for raw in received)
        return pb.PutModelResponse(model=pb.ModelInfo(name="m", version="1", artifact_size=size))

    handler = grpc.stream_unary_rpc_method_handler(
        put, response_serializer=pb.PutModelResponse.SerializeToString
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[("grpc.max_receive_message_length", message_limits().receive)],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"PutModel": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, received
    finally:
        channel.close()
        server.stop(None)


def test_the_publisher_sends_protobufs_bytes_for_every_chunk_size(
    wire_capture: tuple[grpc.Channel, list[bytes]],
) -> None:
    """What arrives on the wire for chunks around every length boundary is what protobuf
    serialises for PutModelRequest(data=chunk): an empty chunk too (protobuf sends no field for
    it; the hand framing sent an empty data field)."""
    channel, received = wire_capture
    payload = hashlib.shake_256(b"sizes").digest(DEFAULT_MAX_CHUNK)
    chunks = [memoryview(payload)[:size] for size in FRAMED_SIZES]
    expected = [pb.PutModelRequest(data=bytes(chunk)).SerializeToString() for chunk in chunks]
    assert [_serialize_upload(chunk) for chunk in chunks] == expected
    assert [_serialize_upload(bytes(chunk)) for chunk in chunks] == expected
    put_model(channel, iter(chunks), name="m", version="1", timeout=30)
    assert received == expected


def test_a_view_of_another_format_is_framed_and_counted_in_bytes(
    wire_capture: tuple[grpc.Channel, list[bytes]],
) -> None:
    """put_model takes memoryviews: one of 4-byte items was framed with its item count as the
    length (the store read a quarter of it as data and the rest as other fields) and counted
    in items; upload_pieces cut it in items. Bytes now, everywhere."""
    channel, received = wire_capture
    items = array("I", range(3000))  # 12000 bytes, 3000 items
    expected = pb.PutModelRequest(data=items.tobytes()).SerializeToString()
    assert append_bytes_field(b"", _DATA, memoryview(items)) == expected
    answer = put_model(channel, iter([memoryview(items)]), name="m", version="1", timeout=30)
    assert received == [expected]
    assert answer.model.artifact_size == len(items.tobytes())
    doubles = array("d", bytes(UPLOAD_MESSAGE_BYTES + 80))  # items of 8 bytes
    assert [len(v) for v in upload_pieces(memoryview(doubles))] == [UPLOAD_MESSAGE_BYTES, 80]


def test_a_view_that_is_not_contiguous_is_refused_before_it_is_sent(
    wire_capture: tuple[grpc.Channel, list[bytes]],
) -> None:
    """gRPC's serialisation met it as INTERNAL 'Exception serializing request!' (a traceback in
    the log); the publisher now raises TypeError and sends none of it."""
    channel, received = wire_capture
    with pytest.raises(TypeError):
        put_model(channel, iter([memoryview(b"abcdef")[::2]]), name="m", version="1", timeout=30)
    assert received == []


def test_the_storage_counts_a_view_of_another_format_in_bytes(storage: AnyStorage) -> None:
    """Storage.put takes memoryviews since the store reads upload messages as views; one of
    2-byte items was counted in items (limits, the record's size) while its bytes were hashed,
    validated and written, so a whole artifact was refused SIZE_MISMATCH."""
    artifact = make_artifact("m", "1", b"e" * 120_000)
    assert len(artifact) % 2 == 0  # whole 2-byte items
    items = [memoryview(array("H", piece)) for piece in chunked(artifact, 50_000)]
    record = storage.put(items, StructureValidator())
    assert record.artifact_size == len(artifact)
    assert record.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    with storage.open("m", "1") as reader:
        assert b"".join(reader.chunks(65536)) == artifact


def test_the_validator_reads_a_view_of_another_format_as_its_bytes() -> None:
    """StructureValidator.feed took any memoryview but stepped through the head in bytes while
    slicing the view in items: fed a view of 2-byte items it never finished the head (the
    upload's thread spun for ever)."""
    artifact = make_artifact("m", "1", b"e" * 120_000)
    validator = StructureValidator()
    validator.feed(memoryview(array("H", artifact)))
    assert validator.finish().artifact_size == len(artifact)
