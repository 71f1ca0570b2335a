"""PutModel's messages are read without protobuf's copy of each chunk, and read as protobuf reads
them: the store's own reading of a data-only message, and protobuf's of everything else; the
publishing client sends them without protobuf's copies, in protobuf's bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.client.publish import (
    UPLOAD_MESSAGE_BYTES,
    _serialize_upload,
    upload_artifact,
    upload_pieces,
)
from strongroom.modelstore.service import SERVICE_NAME, _put_model_request
from strongroom.wire import append_bytes_field, encode_varint
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.conftest import Served

_DATA = 1
_UNKNOWN_VARINT = encode_varint(15 << 3) + encode_varint(7)

MESSAGES = [
    pb.PutModelRequest(data=b"x" * 300).SerializeToString(),  # data only: a view
    pb.PutModelRequest(data=b"x" * 300, artifact_size=301).SerializeToString(),
    pb.PutModelRequest(data=b"y", artifact_sha256="ab" * 32).SerializeToString(),
    pb.PutModelRequest(artifact_size=5).SerializeToString(),
    b"",  # an empty message: no data
    append_bytes_field(b"", _DATA, b""),  # an empty data field
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
