"""ModelInfer requests counted on the wire, before the protobuf runtime builds them.

gRPC hands a request to its deserialiser once it is within the message limit (the tensor bytes
plus 1 MiB), and the protobuf runtime then builds every element the bytes describe, however
little of the request the servicer would accept: an empty ``inputs`` entry is two bytes on the
wire and a message object in memory (32 MiB of them parsed to 1.4 GB), a ``parameters`` entry of
a few bytes a hash-table entry with its key and value (60 MiB of them took 6 s of CPU under the
interpreter lock), a packed shape dimension of 0 one byte and then eight. The servicer refused
such a request, as it refuses 65 inputs, only after all of that had been built.

So the fields a request repeats by design are counted here first, walking only the request's
fields and those of each input and requested output (at most the limits' worth of them): more
inputs, outputs or raw contents than ``max_inputs``/``max_outputs``, more parameters in one map
than ``max_parameters``, more shape dimensions than ``max_rank`` are refused with the servicer's
own reasons, and a message with more than :data:`MAX_OTHER_FIELDS` other fields (its name, its
datatype, unknown fields: each given once by every client) with ``TOO_MANY_FIELDS``, before
anything is parsed.

Typed contents are counted too, all of a request's, once together they could parse to more than
the byte limit (their parsed form is up to eight times their wire size: an INT64 zero is one byte
on the wire and eight parsed, an empty BYTES element two and a 16-byte slot): each value counts the least the servicer would
charge for it (its field's narrowest datatype: one byte for ``bool_contents``, four for
``int_contents``, whose INT8 is charged its 32-bit field's width as the protobuf runtime parses it;
``BYTES_ELEMENT_COST`` and its data for a BYTES element), so a request refused here is one the
servicer would refuse, ``REQUEST_TOO_LARGE``, after parsing and decoding it. A packed array is one
field, counted without a loop; values written one field each (protobuf's unpacked form, which no
proto3 encoder emits for numbers) and any other field are walked at most ``max_input_bytes /
BYTES_ELEMENT_COST`` (524,288 for 64 MiB) in all the request's counted contents together, beyond
which they are ``TOO_MANY_FIELDS``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from strongroom.api.oip.v2 import grpc_service_pb2 as pb
from strongroom.errors import InvalidArgument, ResourceExhausted
from strongroom.inference.oip._codec import BYTES_ELEMENT_COST, TYPED_NARROW_WIDTH, InferLimits
from strongroom.reasons import Reason
from strongroom.wire import Field, fields

MAX_OTHER_FIELDS = 64
"""Fields of one message (the request, an input, a requested output) beyond those it repeats by
design; a client writes each of them once."""

_REQUEST = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
_INPUTS = _REQUEST["inputs"].number
_OUTPUTS = _REQUEST["outputs"].number
_RAW = _REQUEST["raw_input_contents"].number
_REQUEST_PARAMETERS = _REQUEST["parameters"].number
_INPUT = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name
_SHAPE = _INPUT["shape"].number
_INPUT_PARAMETERS = _INPUT["parameters"].number
_CONTENTS = _INPUT["contents"].number
_TYPED = pb.InferTensorContents.DESCRIPTOR.fields_by_name
_BYTES = _TYPED["bytes_contents"].number
# The least one value of each numeric field counts against max_input_bytes once decoded: the
# width of the narrowest datatype the field carries. int_contents carries INT8 and INT16 too, but
# the servicer charges them the field's 32 bits (what the parse holds): counted at one byte, 62 MiB
# of zeros in it passed here and parsed to 0.5 GB.
_LEAST_COST = {
    _TYPED["bool_contents"].number: 1,
    _TYPED["int_contents"].number: TYPED_NARROW_WIDTH,
    _TYPED["int64_contents"].number: 8,
    _TYPED["uint_contents"].number: TYPED_NARROW_WIDTH,
    _TYPED["uint64_contents"].number: 8,
    _TYPED["fp32_contents"].number: 4,
    _TYPED["fp64_contents"].number: 8,
}
# Packed floats are fixed-width; every other packed number is a varint.
_FIXED_WIDTH = {_TYPED["fp32_contents"].number: 4, _TYPED["fp64_contents"].number: 8}
# How much larger than its wire size typed contents can parse (an INT64 zero: one byte, then 8).
_PARSED_PER_WIRE_BYTE = 8
_OUTPUT_PARAMETERS = pb.ModelInferRequest.InferRequestedOutputTensor.DESCRIPTOR.fields_by_name[
    "parameters"
].number
_MAX_VARINT_BYTES = 10


def parse_infer_request(data: bytes, limits: InferLimits) -> pb.ModelInferRequest:
    """``data`` as a ModelInferRequest, once :func:`check_infer_request` has passed it.

    Bytes that are not one raise :class:`WireError` (a ValueError) or the protobuf runtime's
    DecodeError, as any deserialiser does: the service runtime answers them InvalidArgument
    ``MALFORMED_REQUEST`` naming the method, the message and its size, and logs the peer that
    sent them (answered here, the log line named neither the method nor the peer)."""
    check_infer_request(data, limits)
    return pb.ModelInferRequest.FromString(data)


def check_infer_request(data: bytes | memoryview, limits: InferLimits) -> None:
    """Refuses a serialised request that repeats a field beyond its limit (module docstring).

    Raises ResourceExhausted or InvalidArgument as the servicer would for the parsed request, and
    WireError (a ValueError: MALFORMED_REQUEST) for bytes that are not a message; reads no
    further than the first limit passed.
    """
    inputs = outputs = raw = parameters = other = 0
    contents = _Contents(limits)
    for field in fields(data):
        number = field.number if not field.depth else 0
        if number == _INPUTS:
            inputs += 1
            if inputs > limits.max_inputs:
                raise ResourceExhausted(
                    f"more than {limits.max_inputs} inputs", reason=Reason.TOO_MANY_INPUTS
                )
            _check_input(field, limits, contents)
        elif number == _OUTPUTS:
            outputs += 1
            if outputs > limits.max_outputs:
                raise ResourceExhausted(
                    f"more than {limits.max_outputs} outputs requested",
                    reason=Reason.TOO_MANY_OUTPUTS,
                )
            _check_output(field, limits)
        elif number == _RAW:
            raw += 1
            if raw > limits.max_inputs:
                raise ResourceExhausted(
                    f"raw_input_contents has more than {limits.max_inputs} entries (one for each "
                    "input)",
                    reason=Reason.TOO_MANY_INPUTS,
                )
        elif number == _REQUEST_PARAMETERS:
            parameters = _count_parameter(parameters, limits, "the request")
        else:
            other = _count_other(other, "the request")


@dataclasses.dataclass
class _Contents:
    """The typed contents of one request: what their values count at least (bytes), and, until
    they are counted, those not yet counted (small enough together that parsing them cannot
    matter: every one is counted once the request's contents together could)."""

    limits: InferLimits
    counted: int = 0
    uncounted: int = 0  # the wire size of every contents seen while none is counted
    # The contents not counted yet (None once they are counted, and every later one with them).
    # Counting only those past the threshold left up to an eighth of the limit on the wire
    # uncounted beside a full limit counted: 16 MiB of INT64 zeros in two tensors passed the
    # count and parsed to ~250 MiB, twice the values the servicer would allow.
    pending: list[memoryview] | None = dataclasses.field(default_factory=list)
    # Fields walked so far, in every counted ``contents`` of the request together: a tensor may
    # repeat its contents (protobuf merges them) and a request holds 64 tensors, so a bound on
    # one occurrence let 60 MiB of fields that count nothing (unknown ones, empty packed arrays)
    # be walked whole, a minute of CPU under the interpreter lock.
    walked: int = 0

    def add(self, payload: memoryview) -> None:
        """Counts one ``contents`` field (a tensor's contents, or part of them)."""
        if self.pending is not None:
            self.uncounted += len(payload)
            if self.uncounted * _PARSED_PER_WIRE_BYTE <= self.limits.max_input_bytes:
                self.pending.append(payload)
                return
            earlier, self.pending = self.pending, None  # from now on every contents is counted
            for one in earlier:
                self._count(one)
        self._count(payload)

    def _count(self, payload: memoryview) -> None:
        budget = self.limits.max_input_bytes
        most = budget // BYTES_ELEMENT_COST + MAX_OTHER_FIELDS
        for field in fields(payload):
            self.walked += 1
            if self.walked > most:
                raise ResourceExhausted(
                    f"the inputs' contents have more than {most} fields (numbers are expected "
                    "packed)",
                    reason=Reason.TOO_MANY_FIELDS,
                )
            self.counted += _least_cost(field)
            if self.counted > budget:
                raise ResourceExhausted(
                    f"inputs exceed {budget} bytes: their typed contents hold more values than "
                    "that decodes to",
                    reason=Reason.REQUEST_TOO_LARGE,
                )


def _least_cost(field: Field) -> int:
    """What the values of one field of typed contents count at least once decoded."""
    if field.depth:
        return 0  # inside an unknown group: kept as it is, not decoded
    if field.number == _BYTES:
        return BYTES_ELEMENT_COST + (len(field.payload) if field.payload is not None else 0)
    least = _LEAST_COST.get(field.number)
    if least is None:
        return 0  # an unknown field: kept as it is, not decoded
    if field.payload is None:
        return least  # one value, unpacked
    width = _FIXED_WIDTH.get(field.number)
    if width is not None:
        return len(field.payload) // width * least
    octets = np.frombuffer(field.payload, dtype=np.uint8)
    return int(np.count_nonzero(octets < 0x80)) * least  # each varint ends with such a byte


def _check_input(tensor: Field, limits: InferLimits, contents: _Contents) -> None:
    if tensor.payload is None:
        return  # not a message: the protobuf runtime refuses it
    dimensions = parameters = other = 0
    for field in fields(tensor.payload):
        number = field.number if not field.depth else 0
        if number == _CONTENTS and field.payload is not None:
            contents.add(field.payload)
            other = _count_other(other, "an input")
        elif number == _SHAPE:
            dimensions += _dimensions(field, limits)
            if dimensions > limits.max_rank:
                raise InvalidArgument(
                    f"an input's shape has more than {limits.max_rank} dimensions (each "
                    "occurrence of the field counts one at least)",
                    reason=Reason.SHAPE_INVALID,
                )
        elif number == _INPUT_PARAMETERS:
            parameters = _count_parameter(parameters, limits, "an input")
        else:
            other = _count_other(other, "an input")


def _check_output(output: Field, limits: InferLimits) -> None:
    if output.payload is None:
        return  # not a message: the protobuf runtime refuses it
    parameters = other = 0
    for field in fields(output.payload):
        number = field.number if not field.depth else 0
        if number == _OUTPUT_PARAMETERS:
            parameters = _count_parameter(parameters, limits, "a requested output")
        else:
            other = _count_other(other, "a requested output")


def _dimensions(field: Field, limits: InferLimits) -> int:
    """The dimensions one occurrence of ``shape`` counts: one, or a packed array's varints (each
    ends with a byte below 0x80); beyond the rank's worth of bytes, more than the limit at once.

    An occurrence counts one at least: an empty packed array (two bytes, which no encoder writes:
    an empty shape is left out) holds no dimension, and counting it as none let a request of them
    walk tens of millions of fields here (60 MiB took 30 s of CPU under the interpreter lock)
    that the protobuf runtime then skips in a fraction of a second.
    """
    if field.payload is None:
        return 1
    if len(field.payload) > limits.max_rank * _MAX_VARINT_BYTES:
        return limits.max_rank + 1
    return max(1, sum(1 for byte in field.payload if byte < 0x80))


def _count_parameter(count: int, limits: InferLimits, where: str) -> int:
    count += 1
    if count > limits.max_parameters:
        raise ResourceExhausted(
            f"{where} has more than {limits.max_parameters} parameters",
            reason=Reason.TOO_MANY_PARAMETERS,
        )
    return count


def _count_other(count: int, where: str) -> int:
    count += 1
    if count > MAX_OTHER_FIELDS:
        raise ResourceExhausted(
            f"{where} has more than {MAX_OTHER_FIELDS} fields besides its tensors, shape and "
            "parameters",
            reason=Reason.TOO_MANY_FIELDS,
        )
    return count
