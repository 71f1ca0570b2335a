"""OIP v2 tensors <-> numpy arrays: validation against the model, typed and raw contents.

Raw tensors are flattened row-major little-endian bytes; BYTES elements are each a 4-byte
little-endian length followed by the bytes (Triton's layout); BOOL is one byte, 0 or 1.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from strongroom.api.inference.v1 import attestation_pb2, model_control_pb2
from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.errors import InvalidArgument, ResourceExhausted
from strongroom.inference.models import (
    DATATYPES,
    STRING_SLOT_BYTES,
    DataType,
    LoadedModel,
    TensorSpec,
)
from strongroom.inference.oip._budget import response_memory
from strongroom.reasons import Reason
from strongroom.runtime.server import MessageLimits

_CONTENTS_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)
_LENGTH = struct.Struct("<I")
_SHARED_MEMORY_PARAMETERS = (
    "shared_memory_region",
    "shared_memory_byte_size",
    "shared_memory_offset",
)
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
# Narrow integer types travel in 32-bit typed fields: their range is checked before narrowing.
_NARROW = {"INT8": (-(1 << 7), (1 << 7) - 1), "INT16": (-(1 << 15), (1 << 15) - 1)}
_NARROW |= {"UINT8": (0, (1 << 8) - 1), "UINT16": (0, (1 << 16) - 1)}
# ...read at the width of their field (int_contents is int32, uint_contents uint32).
_NARROW_FIELD = {"INT8": np.int32, "INT16": np.int32, "UINT8": np.uint32, "UINT16": np.uint32}
TYPED_NARROW_WIDTH = 4
"""Bytes a typed INT8, INT16, UINT8 or UINT16 element counts against ``max_input_bytes``: the
width of the 32-bit field it travels in, which the protobuf runtime parses it to and the decode
reads it at before narrowing (charged at its own width, 60 MiB of INT8 zeros parsed to 0.5 GB)."""
# Typed outputs are filled this many values at a time (a Python list of 64 Ki values is ~2 MiB).
_TYPED_CHUNK = 1 << 16
# A typed BYTES element in the message's field, besides its data: a pointer and a size.
_BYTES_VIEW = 16


DEFAULT_MAX_TENSOR_BYTES = 64 << 20
"""Default bound on a request's (and a response's) tensor bytes."""
MAX_TENSOR_BYTES_CEILING = 1 << 30
"""Largest tensor bound one may configure (gRPC messages are limited to 2 GiB)."""
MESSAGE_OVERHEAD = 1 << 20
"""Room in a message for what is not tensor data: names, shapes, datatypes, parameters, the id."""
MAX_REQUEST_ID_BYTES = 1024
"""Longest request id (UTF-8 bytes). The response echoes the id, outside the tensor bound, so it
must fit ``MESSAGE_OVERHEAD``; the protocol sets no length, and ids in use (UUIDs, W3C trace ids,
a caller's key) are tens of bytes."""
BYTES_ELEMENT_COST = 128
"""Bytes each BYTES element counts against ``max_input_bytes`` beyond its own length: what one
element costs once decoded (its ``bytes`` object and slot, the UTF-8 ``str`` and slot ONNX Runtime
is handed, ORT's own string), so that many tiny elements cannot decode to ten times the limit."""

SMALL_REQUESTS: frozenset[str] = frozenset(
    f"/{service.full_name}/{method.name}"
    for service in (
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        attestation_pb2.DESCRIPTOR.services_by_name["InferenceAttestationService"],
        model_control_pb2.DESCRIPTOR.services_by_name["ModelControlService"],
    )
    for method in service.methods
    if method.input_type is not pb.ModelInferRequest.DESCRIPTOR
)
"""The inference server's methods whose requests carry no tensor (names, a nonce): each at most
``MESSAGE_OVERHEAD``, so that the wait for one's message is not a 64 MiB tensor's (17 minutes)."""


@dataclasses.dataclass(frozen=True)
class InferLimits:
    """Per-request limits; requests beyond them fail with RESOURCE_EXHAUSTED."""

    max_inputs: int = 64
    max_outputs: int = 64
    max_parameters: int = 64
    max_rank: int = 16
    max_tensor_elements: int = 1 << 27
    max_input_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_output_bytes: int = DEFAULT_MAX_TENSOR_BYTES

    def __post_init__(self) -> None:
        for name in ("max_input_bytes", "max_output_bytes"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_TENSOR_BYTES_CEILING:
                raise ValueError(
                    f"{name} must be between 1 byte and {MAX_TENSOR_BYTES_CEILING >> 20} MiB "
                    "(a gRPC message is at most 2 GiB)"
                )

    @property
    def message_limits(self) -> MessageLimits:
        """The server's message sizes, derived from the tensor limits: the one owner of both."""
        return MessageLimits(
            receive=self.max_input_bytes + MESSAGE_OVERHEAD,
            send=self.max_output_bytes + MESSAGE_OVERHEAD,
            requests=dict.fromkeys(SMALL_REQUESTS, MESSAGE_OVERHEAD),
        )

    def grpc_server_options(self) -> list[tuple[str, int]]:
        """gRPC server options matching these limits (for servers built without ServiceHost)."""
        return [
            ("grpc.max_receive_message_length", self.message_limits.receive),
            ("grpc.max_send_message_length", self.message_limits.send),
        ]


def check_request_parameters(request: pb.ModelInferRequest) -> None:
    """Rejects an over-long id and request-level parameters for features this server lacks."""
    # A character is 1 to 4 UTF-8 bytes: only an id short enough in characters is encoded.
    if len(request.id) > MAX_REQUEST_ID_BYTES or len(request.id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgument(
            f"the request id is longer than {MAX_REQUEST_ID_BYTES} bytes",
            reason=Reason.REQUEST_ID_TOO_LONG,
        )
    for key in request.parameters:
        if key in _SEQUENCE_PARAMETERS:
            raise InvalidArgument(
                f"parameter {key!r}: sequence batching is not supported",
                reason=Reason.SEQUENCE_UNSUPPORTED,
            )


def decode_inputs(
    request: pb.ModelInferRequest, model: LoadedModel, limits: InferLimits
) -> tuple[dict[str, np.ndarray], bool]:
    """The request's input tensors as arrays, validated; and whether they came as raw bytes."""
    inputs = request.inputs
    if len(inputs) > limits.max_inputs:
        raise ResourceExhausted(
            f"{len(inputs)} inputs exceed the limit of {limits.max_inputs}",
            reason=Reason.TOO_MANY_INPUTS,
        )
    raw = request.raw_input_contents
    use_raw = len(raw) > 0
    if use_raw and len(raw) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs",
            reason=Reason.RAW_INPUT_COUNT_MISMATCH,
        )
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for index, tensor in enumerate(inputs):
        spec = model.input_spec(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"model {model.name!r} has no input {tensor.name[:128]!r}",
                reason=Reason.INPUT_UNKNOWN,
            )
        if tensor.name in arrays:
            raise InvalidArgument(
                f"input {tensor.name!r} given twice", reason=Reason.INPUT_DUPLICATE
            )
        _reject_shared_memory(tensor.parameters, f"input {tensor.name!r}")
        datatype = _datatype(tensor.datatype, spec)
        shape = _shape(tensor.shape, spec, limits)
        count = math.prod(shape)
        if count > limits.max_tensor_elements:
            raise ResourceExhausted(
                f"input {spec.name!r} has {count} elements, more than {limits.max_tensor_elements}",
                reason=Reason.TENSOR_TOO_LARGE,
            )
        # BYTES elements are decoded one Python object each: the limit is checked before that.
        charge = count * BYTES_ELEMENT_COST if datatype.name == "BYTES" else 0
        if total + charge > limits.max_input_bytes:
            raise ResourceExhausted(
                f"inputs exceed {limits.max_input_bytes} bytes (input {spec.name!r}: {count} "
                f"BYTES elements count {BYTES_ELEMENT_COST} bytes each beyond their data)",
                reason=Reason.REQUEST_TOO_LARGE,
            )
        # A fixed-width tensor's size follows from its shape, and is checked before it is decoded:
        # typed integers are varints, so an INT64 zero is one byte on the wire and eight in its
        # array, and a request inside the limit used to decode to eight times it before the check.
        fixed = count * _width(datatype, typed=not use_raw)  # 0 for BYTES: counted as parsed
        if total + fixed > limits.max_input_bytes:
            raise ResourceExhausted(
                f"inputs exceed {limits.max_input_bytes} bytes (input {spec.name!r}: shape "
                f"{list(shape)} of {datatype.name} is {fixed} bytes)",
                reason=Reason.REQUEST_TOO_LARGE,
            )
        has_contents = tensor.HasField("contents") and _has_any(tensor.contents)
        if use_raw:
            if has_contents:
                raise InvalidArgument(
                    f"input {spec.name!r} sets contents while raw_input_contents is used",
                    reason=Reason.CONTENTS_MIXED,
                )
            array, size = _from_raw(raw[index], datatype, shape, count, spec.name)
        else:
            array, size = _from_contents(tensor.contents, datatype, shape, count, spec.name)
        total += size + charge
        if total > limits.max_input_bytes:
            raise ResourceExhausted(
                f"inputs exceed {limits.max_input_bytes} bytes (BYTES elements count the size of "
                "their decoded text: up to 4 bytes a character)",
                reason=Reason.REQUEST_TOO_LARGE,
            )
        arrays[spec.name] = array
    missing = [s.name for s in model.inputs if s.name not in arrays]
    if missing:
        raise InvalidArgument(
            f"missing input(s): {', '.join(repr(m) for m in missing)}", reason=Reason.INPUT_MISSING
        )
    return arrays, use_raw


def requested_outputs(
    request: pb.ModelInferRequest, model: LoadedModel, limits: InferLimits
) -> list[str]:
    """The outputs to return, in request order (all of the model's when none are named)."""
    if not request.outputs:
        return [s.name for s in model.outputs]
    if len(request.outputs) > limits.max_outputs:
        raise ResourceExhausted(
            f"{len(request.outputs)} outputs exceed the limit of {limits.max_outputs}",
            reason=Reason.TOO_MANY_OUTPUTS,
        )
    names: list[str] = []
    for wanted in request.outputs:
        if model.output_spec(wanted.name) is None:
            raise InvalidArgument(
                f"model {model.name!r} has no output {wanted.name[:128]!r}",
                reason=Reason.OUTPUT_UNKNOWN,
            )
        if wanted.name in names:
            raise InvalidArgument(
                f"output {wanted.name!r} requested twice", reason=Reason.OUTPUT_DUPLICATE
            )
        _reject_shared_memory(wanted.parameters, f"output {wanted.name!r}")
        if "classification" in wanted.parameters:
            raise InvalidArgument(
                "the classification extension is not supported",
                reason=Reason.CLASSIFICATION_UNSUPPORTED,
            )
        names.append(wanted.name)
    return names


class ReserveMemory(Protocol):
    """Reserves (at least) ``size`` bytes of the response memory budget for the response being
    built (:mod:`strongroom.inference.oip._budget`), or raises; ``arena``: what the request's run
    holds in ONNX Runtime's arena while it waits for them (its outputs not yet copied out)."""

    def __call__(self, size: int, *, arena: int = 0) -> None: ...


def output_shapes_check(
    model: LoadedModel,
    names: Sequence[str],
    *,
    raw: bool,
    limits: InferLimits,
    reserve: ReserveMemory | None = None,
) -> Callable[[Mapping[str, tuple[int, ...]]], None]:
    """The check :meth:`LoadedModel.infer` makes of the outputs' shapes before it copies any out
    of ONNX Runtime: ResourceExhausted if the least they can cost (:func:`_least_cost`, which
    :func:`encode_outputs` charges at least) already passes ``max_output_bytes``; then
    ``reserve`` is given the least memory the response will hold (:func:`response_memory`), so
    that nothing is copied out before the response has room, and what the outputs hold in the
    arena meanwhile (:func:`_arena_size`: a request waiting for that room keeps them there)."""
    specs = [_output_spec(model, n) for n in names]
    use_raw = _responds_raw(specs, raw)

    def check(shapes: Mapping[str, tuple[int, ...]]) -> None:
        total = 0
        held = 0
        arena = 0
        for spec in specs:
            count = math.prod(shapes[spec.name])
            total += _least_cost(count, spec.type, raw=use_raw)
            held += _held_size(count, spec.type, raw=use_raw)
            arena += _arena_size(count, spec.type)
        if total > limits.max_output_bytes:
            raise ResourceExhausted(
                f"outputs exceed {limits.max_output_bytes} bytes (their shapes alone: BYTES "
                f"elements count {BYTES_ELEMENT_COST} bytes each beyond their data)",
                reason=Reason.RESPONSE_TOO_LARGE,
            )
        if reserve is not None:
            reserve(response_memory(max(total, held), raw=use_raw), arena=arena)

    return check


def _arena_size(count: int, datatype: DataType) -> int:
    """What an output of ``count`` elements of ``datatype`` takes in ONNX Runtime's arena: its
    elements at their width, a ``BYTES`` element's ``std::string`` slot."""
    return count * (datatype.itemsize or STRING_SLOT_BYTES)


def _responds_raw(specs: Sequence[TensorSpec], raw: bool) -> bool:
    # FP16 has no typed field, and one response cannot mix raw and typed outputs.
    return raw or any(not s.type.contents_field for s in specs)


def _held_size(count: int, datatype: DataType, *, raw: bool) -> int:
    """What ``count`` elements of ``datatype`` take in memory besides the wire (the budget counts
    the larger, :func:`response_memory`): their array, and for typed contents their message
    field, whose narrow integers are 32 bits (an INT8 output of 16 MiB is 64 MiB there) and whose
    ``BYTES`` elements are a 16-byte view each besides their data. Counted by the wire and the
    arrays alone, a typed INT8 response held 13 times its count at its peak."""
    arrays = count * datatype.itemsize
    if raw:
        return arrays
    if datatype.name == "BYTES":
        return count * _BYTES_VIEW
    return count * TYPED_NARROW_WIDTH if datatype.name in _NARROW else arrays


def _least_cost(count: int, datatype: DataType, *, raw: bool) -> int:
    """The least :func:`_output_cost` of ``count`` elements of ``datatype``: exact for a fixed
    width, and for BYTES their charge and an empty element's bytes on the wire."""
    if datatype.name == "BYTES":
        return count * (BYTES_ELEMENT_COST + (_LENGTH.size if raw else _length_delimited(0)))
    if raw or datatype.name in ("BOOL", "FP32", "FP64"):
        return count * int(datatype.itemsize)
    return count  # a varint is one byte at least


def encode_outputs(
    response: pb.ModelInferResponse,
    model: LoadedModel,
    names: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    *,
    raw: bool,
    limits: InferLimits,
    reserve: ReserveMemory | None = None,
) -> int:
    """Adds the outputs to ``response``: raw bytes, or typed contents when asked and possible;
    returns their size as counted against ``max_output_bytes`` (their size in the message).

    Every output's cost is checked before any is converted: a small request can make a model
    return many times the bound, and converting that first (into bytes, or Python objects for
    typed contents) would cost several times its size only to refuse it. ``reserve`` is then
    given the memory the response will hold, now that its size is known (a ``BYTES`` output's
    only once its elements are out of ONNX Runtime: more than its shape's least).
    """
    specs = [_output_spec(model, n) for n in names]
    use_raw = _responds_raw(specs, raw)
    total = 0
    for spec in specs:
        total += _output_cost(arrays[spec.name], spec.type, raw=use_raw)
        if total > limits.max_output_bytes:
            raise ResourceExhausted(
                f"outputs exceed {limits.max_output_bytes} bytes", reason=Reason.RESPONSE_TOO_LARGE
            )
    if reserve is not None:
        held = sum(_held_size(arrays[spec.name].size, spec.type, raw=use_raw) for spec in specs)
        reserve(response_memory(max(total, held), raw=use_raw))
    for spec in specs:
        array = arrays[spec.name]
        out = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if use_raw:
            response.raw_output_contents.append(_to_raw(array, spec.type))
        else:
            _to_contents(out.contents, array, spec.type)
    return total


def _output_cost(array: np.ndarray, datatype: DataType, *, raw: bool) -> int:
    """What an output counts against ``max_output_bytes``: its size in the response message,
    computed without converting it (the send limit is the output bound plus MESSAGE_OVERHEAD),
    and for BYTES :data:`BYTES_ELEMENT_COST` an element beyond it, as in a request: each element
    is Python objects on its way out (ORT's ``str``, its ``bytes``, the raw or typed field's),
    ~100 bytes for an empty one, so a response of short strings inside the bound held more than
    ten times it (and one refused past it had cost that before it was refused)."""
    flat = array.reshape(-1)
    if datatype.name == "BYTES":
        # Raw: a 4-byte length before each element; typed: each element is a length-delimited
        # field (a tag byte and a varint length), so even empty elements cost bytes.
        charge = flat.size * BYTES_ELEMENT_COST
        if raw:
            return charge + sum(_LENGTH.size + len(_as_bytes(item)) for item in flat)
        return charge + sum(_length_delimited(len(_as_bytes(item))) for item in flat)
    if raw or datatype.name in ("BOOL", "FP32", "FP64"):
        return int(array.nbytes)
    return _varints_size(flat)


def _length_delimited(length: int) -> int:
    return 1 + _varint_size(length) + length


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _varints_size(flat: np.ndarray) -> int:
    """The packed varint size of integer values: 1 byte per 7 bits, and 10 for any negative
    (protobuf sign-extends int32 to 64 bits), so a typed INT8 of -1 is 10 bytes, not 1."""
    size = flat.size
    top = int(np.iinfo(flat.dtype).max)
    shift = 7
    while shift < 64 and (1 << shift) <= top:
        size += int(np.count_nonzero(flat >= (1 << shift)))
        shift += 7
    if flat.dtype.kind == "i":
        size += 9 * int(np.count_nonzero(flat < 0))
    return size


def _output_spec(model: LoadedModel, name: str) -> TensorSpec:
    spec = model.output_spec(name)
    assert spec is not None  # requested_outputs() checked the names
    return spec


def _datatype(name: str, spec: TensorSpec) -> DataType:
    datatype = DATATYPES.get(name)
    if datatype is None:
        raise InvalidArgument(
            f"input {spec.name!r}: unknown datatype {name[:32]!r}", reason=Reason.DATATYPE_UNKNOWN
        )
    if name != spec.datatype:
        raise InvalidArgument(
            f"input {spec.name!r} is {spec.datatype}, not {name}", reason=Reason.DATATYPE_MISMATCH
        )
    return datatype


def _shape(dims: Sequence[int], spec: TensorSpec, limits: InferLimits) -> tuple[int, ...]:
    # The rank is read off the field before any dimension becomes a Python int: a packed shape
    # of zeros is one byte a dimension, so a request inside the size limit carried 60 million of
    # them, and building their tuple took seconds of CPU under the GIL (and half a gigabyte) only
    # to refuse the rank.
    if len(dims) > limits.max_rank:
        raise InvalidArgument(
            f"input {spec.name!r} has rank {len(dims)}, above {limits.max_rank}",
            reason=Reason.SHAPE_INVALID,
        )
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {spec.name!r} shape {list(shape)} has a negative dimension",
            reason=Reason.SHAPE_INVALID,
        )
    # An empty tensor passes the element limit whatever its other dimensions, but no array (numpy's
    # or ONNX Runtime's) can describe one whose other dimensions multiply past any memory.
    if 0 in shape and math.prod(d for d in shape if d) > limits.max_tensor_elements:
        raise InvalidArgument(
            f"input {spec.name!r} shape {list(shape)} is empty but its other dimensions exceed "
            f"{limits.max_tensor_elements} elements",
            reason=Reason.SHAPE_INVALID,
        )
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise InvalidArgument(
            f"input {spec.name!r} shape {list(shape)} does not match the model's "
            f"{list(spec.shape)}",
            reason=Reason.SHAPE_MISMATCH,
        )
    return shape


def _has_any(contents: pb.InferTensorContents) -> bool:
    return any(len(getattr(contents, f)) for f in _CONTENTS_FIELDS)


def _reject_shared_memory(parameters: Mapping[str, Any], what: str) -> None:
    for key in _SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise InvalidArgument(
                f"{what}: shared memory is not supported", reason=Reason.SHARED_MEMORY_UNSUPPORTED
            )


def _from_raw(
    blob: bytes, datatype: DataType, shape: tuple[int, ...], count: int, name: str
) -> tuple[np.ndarray, int]:
    if datatype.name == "BYTES":
        elements = _parse_bytes(blob, count, name)
        return elements.reshape(shape), count * _LENGTH.size + _text_cost(elements)
    expected = count * datatype.itemsize
    if len(blob) != expected:
        raise InvalidArgument(
            f"input {name!r}: {len(blob)} raw bytes, but shape {list(shape)} of {datatype.name} "
            f"needs {expected}",
            reason=Reason.RAW_SIZE_MISMATCH,
        )
    if datatype.name == "BOOL":
        octets = np.frombuffer(blob, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            raise InvalidArgument(
                f"input {name!r}: BOOL bytes must be 0 or 1", reason=Reason.BOOL_INVALID
            )
        return octets.view(np.bool_).reshape(shape), expected
    array = np.frombuffer(blob, dtype=datatype.dtype.newbyteorder("<"))
    if array.dtype != datatype.dtype:  # a big-endian host: convert to native order
        array = array.astype(datatype.dtype)
    return array.reshape(shape), expected


def _parse_bytes(blob: bytes, count: int, name: str) -> np.ndarray:
    # Every element carries at least its 4-byte length: a shape that cannot fit is refused before
    # anything is allocated for it.
    if len(blob) < count * _LENGTH.size:
        raise InvalidArgument(
            f"input {name!r}: {len(blob)} raw bytes cannot hold {count} BYTES elements "
            f"({_LENGTH.size} bytes of length each at least)",
            reason=Reason.RAW_SIZE_MISMATCH,
        )
    out = np.empty(count, dtype=object)
    view = memoryview(blob)
    pos = 0
    for i in range(count):
        if pos + _LENGTH.size > len(blob):
            raise InvalidArgument(
                f"input {name!r}: raw BYTES ends before element {i} of {count}",
                reason=Reason.RAW_SIZE_MISMATCH,
            )
        (length,) = _LENGTH.unpack_from(blob, pos)
        pos += _LENGTH.size
        if pos + length > len(blob):
            raise InvalidArgument(
                f"input {name!r}: raw BYTES element {i} overruns the buffer",
                reason=Reason.RAW_SIZE_MISMATCH,
            )
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != len(blob):
        raise InvalidArgument(
            f"input {name!r}: {len(blob) - pos} bytes after the last BYTES element",
            reason=Reason.RAW_SIZE_MISMATCH,
        )
    return out


def _text_cost(elements: np.ndarray) -> int:
    """What BYTES elements' data counts against ``max_input_bytes``: each element's UTF-8 length,
    or the size of the Python ``str`` it becomes for ONNX Runtime when that is larger."""
    return sum(_decoded_size(value) for value in elements)


def _decoded_size(value: bytes) -> int:
    # CPython stores every character of a str at the width of its widest one (1, 2 or 4 bytes):
    # one character beyond U+FFFF makes a 4 MB ASCII element a 16 MB str, in the input and again
    # in the output. Charging only the length let such an element cost ~4 times the bound.
    if value.isascii():
        return len(value)
    octets = np.frombuffer(value, dtype=np.uint8)
    characters = int(np.count_nonzero((octets & 0xC0) != 0x80))  # all but continuation bytes
    lead = int(octets.max())  # lead bytes: 0xF0 on starts U+10000 and up, 0xC4 on U+0100 and up
    width = 4 if lead >= 0xF0 else 2 if lead >= 0xC4 else 1
    return max(len(value), width * characters)


def _from_contents(
    contents: pb.InferTensorContents,
    datatype: DataType,
    shape: tuple[int, ...],
    count: int,
    name: str,
) -> tuple[np.ndarray, int]:
    field = datatype.contents_field
    if not field:
        raise InvalidArgument(
            f"input {name!r}: {datatype.name} can only be sent in raw_input_contents",
            reason=Reason.DATATYPE_NEEDS_RAW,
        )
    for other in _CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidArgument(
                f"input {name!r}: {datatype.name} goes in {field}, not {other}",
                reason=Reason.CONTENTS_WRONG_FIELD,
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: {len(values)} values for shape {list(shape)} ({count} elements)",
            reason=Reason.CONTENTS_SIZE_MISMATCH,
        )
    if datatype.name == "BYTES":
        array = np.empty(count, dtype=object)
        for i, value in enumerate(values):
            array[i] = bytes(value)
        return array.reshape(shape), _text_cost(array)
    # np.fromiter fills the array straight from the field; np.array would first build a list of
    # Python numbers (~9x the wire size for FP32).
    if datatype.name in _NARROW and count:
        wide = np.fromiter(values, dtype=_NARROW_FIELD[datatype.name], count=count)
        low, high = _NARROW[datatype.name]
        if wide.min() < low or wide.max() > high:
            raise InvalidArgument(
                f"input {name!r}: a value is out of range for {datatype.name}",
                reason=Reason.VALUE_OUT_OF_RANGE,
            )
        return wide.astype(datatype.dtype).reshape(shape), wide.nbytes
    array = np.fromiter(values, dtype=datatype.dtype, count=count)
    return array.reshape(shape), array.nbytes


def _width(datatype: DataType, *, typed: bool) -> int:
    """Bytes one element of ``datatype`` counts against ``max_input_bytes``, sent typed or raw."""
    if typed and datatype.name in _NARROW:
        return TYPED_NARROW_WIDTH
    return int(datatype.itemsize)


def _to_contents(contents: pb.InferTensorContents, array: np.ndarray, datatype: DataType) -> None:
    # A slice at a time: ``tolist()`` makes a Python object of every value (a float is 24 bytes and
    # its list slot 8 for 4 bytes of FP32), so a whole output at once would cost ~8x its size.
    field = getattr(contents, datatype.contents_field)
    flat = array.reshape(-1)
    for start in range(0, flat.size, _TYPED_CHUNK):
        field.extend(flat[start : start + _TYPED_CHUNK].tolist())


def _as_bytes(item: bytes | bytearray | memoryview) -> bytes:
    return item if isinstance(item, bytes) else bytes(item)


def _to_raw(array: np.ndarray, datatype: DataType) -> bytes:
    if datatype.name == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            value = _as_bytes(item)
            parts.append(_LENGTH.pack(len(value)))
            parts.append(value)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=datatype.dtype.newbyteorder("<")).tobytes()
