"""The header's own WrapMechanism: wire-compatible with the broker's enum it replaced, mapped once.

Until the header had its own enum, fields ArtifactHeader.wrap_mechanism (7) and
ArtifactKeySlot.wrap_mechanism (3) were typed ``strongroom.api.keybroker.v1.WrapMechanism``. The
old schema is rebuilt here from the current descriptors (same file, fields retyped to the broker's
enum), so "an artifact written then" is encoded by the old types, not assumed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import cache

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

from strongroom.api.artifact.v1 import header_pb2
from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.artifact import (
    HEADER_WRAP_MECHANISMS,
    InvalidArtifact,
    WrapMechanism,
    parse_header,
)
from strongroom.artifact.format import PREFIX_SIZE, SLOT_LENGTH_SIZE
from strongroom.client.mechanisms import TO_HEADER, header_mechanism
from strongroom.errors import FailedPrecondition

from .conftest import header_for
from .golden import DATA, GOLDENS

_BROKER_ENUM = ".strongroom.api.keybroker.v1.WrapMechanism"


def _files(fd: FileDescriptor) -> Iterator[FileDescriptor]:
    for dep in fd.dependencies:
        yield from _files(dep)
    yield fd


@cache
def _old_types() -> tuple[type[Message], type[Message]]:
    """ArtifactHeader and ArtifactKeySlot as they were: wrap_mechanism typed by the broker's enum."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for fd in _files(kb_pb.DESCRIPTOR):
        if fd.name not in added:
            added.add(fd.name)
            proto = descriptor_pb2.FileDescriptorProto()
            fd.CopyToProto(proto)
            pool.Add(proto)
    old = descriptor_pb2.FileDescriptorProto()
    header_pb2.DESCRIPTOR.CopyToProto(old)
    old.dependency.append(kb_pb.DESCRIPTOR.name)
    del old.enum_type[[e.name for e in old.enum_type].index("WrapMechanism")]
    retyped = 0
    for message in old.message_type:
        for field in message.field:
            if field.name == "wrap_mechanism":
                field.type_name = _BROKER_ENUM
                retyped += 1
    assert retyped == 2
    pool.Add(old)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("strongroom.api.artifact.v1.ArtifactHeader")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("strongroom.api.artifact.v1.ArtifactKeySlot")
        ),
    )


def _reencode_with_old_types(artifact_head: bytes, *, slot: bool) -> bytes:
    """The head as the old schema writes it: every field copied, wrap_mechanism set by its old enum."""
    old_header, old_slot = _old_types()
    (length,) = struct.unpack_from(">I", artifact_head, 12)
    new = header_pb2.ArtifactHeader.FromString(artifact_head[PREFIX_SIZE : PREFIX_SIZE + length])
    msg = old_header()
    for field, value in new.ListFields():
        if field.message_type is not None:
            getattr(msg, field.name).MergeFromString(value.SerializeToString())
        elif field.name != "wrap_mechanism":
            setattr(msg, field.name, value)
    if not slot:
        msg.wrap_mechanism = kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD  # type: ignore[attr-defined]
    raw = msg.SerializeToString(deterministic=True)
    out = artifact_head[:12] + struct.pack(">I", len(raw)) + raw
    if slot:
        rest = artifact_head[PREFIX_SIZE + length :]
        new_slot = header_pb2.ArtifactKeySlot.FromString(rest[SLOT_LENGTH_SIZE:])
        s = old_slot(
            key_id=new_slot.key_id,
            key_version=new_slot.key_version,
            wrap_mechanism=kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD,
            wrapped_data_key=new_slot.wrapped_data_key,
        )
        raw_slot = s.SerializeToString(deterministic=True)
        out += struct.pack(">I", len(raw_slot)) + raw_slot
    return out


def test_header_enum_has_the_broker_enums_numbers_and_names() -> None:
    header = {v.name: v.number for v in header_pb2.WrapMechanism.DESCRIPTOR.values}
    broker = {v.name: v.number for v in kb_pb.WrapMechanism.DESCRIPTOR.values}
    assert header == broker
    assert {m.name: int(m) for m in WrapMechanism} == {
        name.removeprefix("WRAP_MECHANISM_"): number for name, number in header.items()
    }


def test_the_format_imports_no_rpc_api() -> None:
    assert [d.name for d in header_pb2.DESCRIPTOR.dependencies] == [
        "google/protobuf/timestamp.proto"
    ]


def test_headers_encoded_with_the_old_enum_parse_unchanged(artifact_format: int) -> None:
    header = header_for(1000)
    old = _reencode_with_old_types(header.head, slot=artifact_format != 1)
    assert old == header.head, "same bytes on the wire"
    parsed = parse_header(old)
    assert parsed == header
    assert parsed.wrap_mechanism is WrapMechanism.AES_KEY_WRAP_PAD


def test_old_types_read_new_headers(artifact_format: int) -> None:
    old_header, old_slot = _old_types()
    header = header_for(10)
    raw = header.encoded[PREFIX_SIZE:]
    decoded = old_header.FromString(raw)
    if artifact_format == 1:
        assert decoded.wrap_mechanism == kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD  # type: ignore[attr-defined]
    else:
        slot = old_slot.FromString(header.slot_encoded[SLOT_LENGTH_SIZE:])
        assert slot.wrap_mechanism == kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD  # type: ignore[attr-defined]
    assert decoded.SerializeToString(deterministic=True) == raw


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_golden_artifacts_written_before_the_change_parse_and_are_reproduced(name: str) -> None:
    stored = (DATA / name).read_bytes()  # written by the code that typed the field by the broker
    assert parse_header(stored).wrap_mechanism is WrapMechanism.AES_KEY_WRAP_PAD
    assert GOLDENS[name]() == stored


@pytest.mark.parametrize("mechanism", [WrapMechanism.RSA_OAEP_SHA1, WrapMechanism.UNSPECIFIED])
def test_readers_accept_only_the_kek_wrap(artifact_format: int, mechanism: WrapMechanism) -> None:
    with pytest.raises(InvalidArtifact) as info:
        header_for(10, wrap_mechanism=mechanism)
    assert info.value.reason == "UNSUPPORTED_WRAP_MECHANISM"


def test_mapping_covers_every_named_broker_mechanism() -> None:
    named = {v.number for v in kb_pb.WrapMechanism.DESCRIPTOR.values} - {
        kb_pb.WRAP_MECHANISM_UNSPECIFIED
    }
    assert set(TO_HEADER) == named
    for broker, header in TO_HEADER.items():
        assert kb_pb.WrapMechanism.Name(broker) == f"WRAP_MECHANISM_{header.name}"


def test_the_broker_kek_wrap_maps_to_the_header_value() -> None:
    assert header_mechanism(kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD) is WrapMechanism.AES_KEY_WRAP_PAD
    assert header_mechanism(kb_pb.WRAP_MECHANISM_AES_KEY_WRAP_PAD) in HEADER_WRAP_MECHANISMS


@pytest.mark.parametrize(
    ("mechanism", "named"),
    [
        (kb_pb.WRAP_MECHANISM_UNSPECIFIED, "WRAP_MECHANISM_UNSPECIFIED"),
        (kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA1, "WRAP_MECHANISM_RSA_OAEP_SHA1"),
        (kb_pb.WRAP_MECHANISM_RSA_OAEP_SHA256, "WRAP_MECHANISM_RSA_OAEP_SHA256"),
        (77, "77"),  # a mechanism from a newer broker
    ],
)
def test_a_mechanism_the_header_cannot_carry_is_a_failed_precondition(
    mechanism: int, named: str
) -> None:
    with pytest.raises(FailedPrecondition) as info:
        header_mechanism(mechanism)
    assert info.value.reason == "UNSUPPORTED_WRAP_MECHANISM"
    assert named in str(info.value)
    assert "WRAP_MECHANISM_AES_KEY_WRAP_PAD" in str(info.value)
