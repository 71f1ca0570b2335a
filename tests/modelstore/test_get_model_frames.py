"""GetModel's self-serialised responses are exactly what protobuf would have sent."""

from __future__ import annotations

import grpc
import pytest

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.artifact import StructureValidator
from strongroom.modelstore.service import SERVICE_NAME
from tests.modelstore.artifacts import chunked, make_artifact
from tests.modelstore.conftest import Served


def _raw_messages(channel: grpc.Channel, **request: object) -> list[bytes]:
    call = channel.unary_stream(
        f"/{SERVICE_NAME}/GetModel",
        request_serializer=pb.GetModelRequest.SerializeToString,
        response_deserializer=lambda raw: raw,
    )
    return list(call(pb.GetModelRequest(**request), timeout=30))  # type: ignore[arg-type]


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (1000, 100_000), (100_001, 0)])
def test_frames_are_canonical_protobuf(fs_served: Served, offset: int, length: int) -> None:
    artifact = make_artifact("m", "1", bytes(range(256)) * 1000)
    fs_served.storage.put(chunked(artifact, 64 * 1024), StructureValidator())
    info = fs_served.stub.StatModel(pb.StatModelRequest(name="m", version="1"), timeout=30).model

    raw = _raw_messages(fs_served.channel, name="m", version="1", offset=offset, length=length)
    parsed = [pb.GetModelResponse.FromString(m) for m in raw]
    # Field order and encoding equal protobuf's own serialisation, byte for byte.
    assert [p.SerializeToString() for p in parsed] == raw
    assert len(raw) > 1
    assert parsed[0].model == info and not any(p.HasField("model") for p in parsed[1:])
    end = offset + length if length else len(artifact)
    assert b"".join(p.data for p in parsed) == artifact[offset:end]
    expected_offset = offset
    for p in parsed:
        assert p.offset == expected_offset
        expected_offset += len(p.data)
