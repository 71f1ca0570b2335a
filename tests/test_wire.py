"""strongroom.wire against the protobuf runtime: same bytes in, same data out, both directions."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.wire import (
    WireError,
    append_bytes_field,
    bytes_field_view,
    encode_varint,
)
from strongroom.wire import fields as wire_fields

DATA = pb.GetModelResponse.DESCRIPTOR.fields_by_name["data"].number

infos = st.builds(
    pb.ModelInfo,
    name=st.text(max_size=20),
    version=st.text(max_size=8),
    artifact_size=st.integers(0, 2**64 - 1),
    key_version=st.integers(0, 2**32 - 1),
)
responses = st.builds(
    pb.GetModelResponse,
    model=st.none() | infos,
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=300),
)


@given(responses)
def test_the_view_is_the_data_protobuf_parses(message: pb.GetModelResponse) -> None:
    assert bytes(bytes_field_view(message.SerializeToString(), DATA)) == message.data


@given(responses)
def test_appended_data_parses_as_the_same_message(message: pb.GetModelResponse) -> None:
    head = pb.GetModelResponse()
    head.CopyFrom(message)
    head.ClearField("data")
    encoded = append_bytes_field(head.SerializeToString(), DATA, message.data)
    assert pb.GetModelResponse.FromString(encoded) == message


@given(responses, st.data())
def test_a_cut_message_is_refused_exactly_when_protobuf_refuses_it(
    message: pb.GetModelResponse, data: st.DataObject
) -> None:
    raw = message.SerializeToString()
    cut = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        expected = pb.GetModelResponse.FromString(cut).data
    except DecodeError:
        with pytest.raises(WireError):
            bytes_field_view(cut, DATA)
    else:
        assert bytes(bytes_field_view(cut, DATA)) == expected


fields = st.sampled_from(
    [b"\x1a\x03abc", b"\x1a\x00", b"\x10\x81\x01", b"\x0b", b"\x0c", b"\x3b", b"\x3c",
     b"\x1b", b"\x1c", b"\x09" + bytes(8), b"\x0d" + bytes(4), b"\x1a\x02"]
)  # fmt: skip


@given(st.binary(max_size=64) | st.lists(fields, max_size=12).map(b"".join))
def test_whatever_protobuf_accepts_yields_its_data(raw: bytes) -> None:
    try:
        expected = pb.GetModelResponse.FromString(raw).data
    except DecodeError:
        return
    assert bytes(bytes_field_view(raw, DATA)) == expected


def test_the_last_occurrence_wins_and_unknown_fields_are_skipped() -> None:
    group = encode_varint(10 << 3 | 3) + b"\x1a\x01z" + encode_varint(10 << 3 | 4)
    unknown = group + (
        encode_varint(7 << 3 | 0) + encode_varint(300)  # varint
        + encode_varint(8 << 3 | 1) + b"\x00" * 8  # 64-bit
        + encode_varint(9 << 3 | 5) + b"\x00" * 4  # 32-bit
    )  # fmt: skip
    raw = append_bytes_field(append_bytes_field(unknown, DATA, b"first"), DATA, b"second")
    assert pb.GetModelResponse.FromString(raw).data == b"second"
    assert bytes(bytes_field_view(raw, DATA)) == b"second"


def test_fields_are_walked_with_the_groups_they_sit_in() -> None:
    """``fields`` yields every field protobuf reads, those inside groups with their depth (a
    caller that counts fields counts them too), and parses no payload."""
    group = encode_varint(10 << 3 | 3) + b"\x1a\x01z" + encode_varint(10 << 3 | 4)
    raw = append_bytes_field(group + encode_varint(7 << 3) + b"\x01", DATA, b"data")
    walked = [
        (f.number, f.wire_type, None if f.payload is None else bytes(f.payload), f.depth)
        for f in wire_fields(raw)
    ]
    assert walked == [
        (10, 3, None, 0),
        (3, 2, b"z", 1),
        (10, 4, None, 0),
        (7, 0, None, 0),
        (DATA, 2, b"data", 0),
    ]
    walk = wire_fields(b"\x08\x01\x1a\x05abc")  # a varint, then a field cut short
    assert next(walk).number == 1  # what lies before a fault is read before the fault is found
    with pytest.raises(WireError, match="runs past"):
        next(walk)


def test_no_copy_is_made() -> None:
    raw = append_bytes_field(b"", DATA, b"x" * 1000)
    assert bytes_field_view(raw, DATA).obj is raw


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x1a\x05abc", "runs past"),
        (b"\x1a", "inside a varint"),
        (b"\xff" * 11, "longer than 10"),
        (b"\x00\x00", "field number 0"),
        (b"\x1b", "inside a group"),
        (b"\x1c", "unmatched end"),
        (b"\x0b\x14", "unmatched end"),
        (b"\x0b" * 101, "too deeply"),
        (b"\x1e", "invalid wire type 6"),
        (b"\x09\x00", "ends inside a field"),
    ],
)
def test_malformed_messages_are_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        bytes_field_view(raw, DATA)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**63, 2**64 - 1])
def test_varints_round_trip_through_protobuf(value: int) -> None:
    raw = encode_varint(2 << 3 | 0) + encode_varint(value)
    assert pb.GetModelResponse.FromString(raw).offset == value
    with pytest.raises(ValueError):
        encode_varint(2**64)
