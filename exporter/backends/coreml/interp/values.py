"""Protobuf values and value types of a MIL program, as NumPy.

Floating-point tensors are held as float32 arrays whatever their Core ML type; an fp16
tensor is a float32 array whose values are all representable in fp16 (the executor rounds
every fp16 result), so NumPy's float32 BLAS does the arithmetic. Integers keep their width,
booleans are bool, strings are str.
"""

from __future__ import annotations

import numpy as np

from exporter.errors import ArtifactError

# MIL.proto DataType -> (name used by cast/dtype strings, NumPy storage dtype)
DTYPES = {
    1: ("bool", np.bool_), 2: ("string", object),
    10: ("fp16", np.float32), 11: ("fp32", np.float32), 12: ("fp64", np.float64),
    21: ("int8", np.int8), 22: ("int16", np.int16), 23: ("int32", np.int32), 24: ("int64", np.int64),
    25: ("int4", np.int8), 31: ("uint8", np.uint8), 32: ("uint16", np.uint16), 33: ("uint32", np.uint32),
    34: ("uint64", np.uint64), 35: ("uint4", np.uint8), 36: ("uint2", np.uint8), 37: ("uint1", np.uint8),
    38: ("uint6", np.uint8), 39: ("uint3", np.uint8),
}
# Raw little-endian layout of an immediate value stored as bytes.
_BYTES_DTYPES = {10: np.float16, 11: np.float32, 21: np.int8, 22: np.int16, 31: np.uint8, 32: np.uint16,
                 23: np.int32, 24: np.int64, 33: np.uint32}
FP16 = 10


def tensor_type(value_type):
    """(data type code, shape or None when a dimension is unknown) of a ValueType."""
    kind = value_type.WhichOneof("type")
    if kind == "tensorType":
        t = value_type.tensorType
    elif kind == "stateType":
        t = value_type.stateType.wrappedType.tensorType
    else:
        raise ArtifactError(f"value type {kind!r} is not a tensor")
    shape = []
    for dim in t.dimensions:
        if dim.WhichOneof("dimension") != "constant":
            shape = None
            break
        shape.append(dim.constant.size)
    return t.dataType, (tuple(shape) if shape is not None else None)


def dtype_name(code: int) -> str:
    return DTYPES[code][0] if code in DTYPES else f"type {code}"


def storage_dtype(code: int):
    if code not in DTYPES:
        raise ArtifactError(f"data type code {code} is not one the interpreter handles")
    return DTYPES[code][1]


def decode_value(value, blobs) -> object:
    """A MIL Value (immediate or in the weight file) as a NumPy array (a str for a string scalar)."""
    code, shape = tensor_type(value.type)
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        array = blobs(value.blobFileValue.fileName).read(value.blobFileValue.offset, shape or ())
        return as_storage(array, code)
    if kind != "immediateValue":
        raise ArtifactError(f"value kind {kind!r} is not supported")
    tensor = value.immediateValue.tensor
    field = tensor.WhichOneof("value")
    if field == "strings":
        items = list(tensor.strings.values)
        return items[0] if not shape and len(items) == 1 else np.array(items, dtype=object).reshape(shape or ())
    if field == "bytes":
        raw = tensor.bytes.values
        if code in (25, 35, 36, 37, 38, 39):
            from exporter.backends.coreml.interp.blob import unpack_bits

            bits = {25: 4, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3}[code]
            count = int(np.prod(shape)) if shape else 1
            array = unpack_bits(np.frombuffer(raw, dtype=np.uint8), bits, count, signed=code == 25)
        else:
            array = np.frombuffer(raw, dtype=_BYTES_DTYPES[code]).copy()
    elif field is None:
        array = np.zeros(0)
    else:
        array = np.array(list(getattr(tensor, field).values))
    return as_storage(array.reshape(shape or ()), code)


def as_storage(array: np.ndarray, code: int) -> np.ndarray:
    """Cast to the storage dtype; fp16 values become float32 holding fp16 values."""
    if code == FP16:
        with np.errstate(over="ignore"):  # beyond 65504 is inf in fp16, as on the device
            return np.asarray(array).astype(np.float16).astype(np.float32)
    return np.asarray(array).astype(storage_dtype(code))
