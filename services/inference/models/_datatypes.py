"""Open Inference Protocol tensor datatypes and their numpy / ONNX Runtime equivalents."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataType:
    """One OIP datatype.

    ``itemsize`` is 0 for BYTES (variable length); ``contents_field`` names the
    ``InferTensorContents`` field that carries it typed, or is empty when only raw bytes can (FP16).
    """

    name: str
    dtype: np.dtype[np.generic]
    ort_type: str
    itemsize: int
    contents_field: str

    def __repr__(self) -> str:
        return f"DataType({self.name})"


def _dt(name: str, dtype: str | type, ort: str, field: str) -> DataType:
    np_dtype = np.dtype(dtype)
    size = 0 if np_dtype == np.dtype(object) else np_dtype.itemsize
    return DataType(name, np_dtype, f"tensor({ort})", size, field)


DATATYPES: dict[str, DataType] = {
    d.name: d
    for d in (
        _dt("BOOL", np.bool_, "bool", "bool_contents"),
        _dt("UINT8", np.uint8, "uint8", "uint_contents"),
        _dt("UINT16", np.uint16, "uint16", "uint_contents"),
        _dt("UINT32", np.uint32, "uint32", "uint_contents"),
        _dt("UINT64", np.uint64, "uint64", "uint64_contents"),
        _dt("INT8", np.int8, "int8", "int_contents"),
        _dt("INT16", np.int16, "int16", "int_contents"),
        _dt("INT32", np.int32, "int32", "int_contents"),
        _dt("INT64", np.int64, "int64", "int64_contents"),
        _dt("FP16", np.float16, "float16", ""),
        _dt("FP32", np.float32, "float", "fp32_contents"),
        _dt("FP64", np.float64, "double", "fp64_contents"),
        _dt("BYTES", object, "string", "bytes_contents"),
    )
}
"""Every OIP datatype this server accepts, by OIP name."""

BY_ORT_TYPE: dict[str, DataType] = {d.ort_type: d for d in DATATYPES.values()}


def datatype_of_array(array: np.ndarray) -> DataType:
    """The OIP datatype of a numpy array (object arrays are BYTES)."""
    if array.dtype == np.dtype(object) or array.dtype.kind in "SU":
        return DATATYPES["BYTES"]
    for d in DATATYPES.values():
        if d.itemsize and array.dtype == d.dtype:
            return d
    raise TypeError(f"no OIP datatype for numpy dtype {array.dtype}")
