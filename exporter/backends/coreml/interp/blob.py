"""The weight file: MIL blob storage version 2.

Layout (little endian): a 64-byte header (uint32 count, uint32 version = 2, reserved);
each blob is a 64-byte metadata record (uint32 sentinel 0xDEADBEEF, uint32 data type,
uint64 size in bytes, uint64 offset of the data, uint64 unused padding bits, reserved)
that the spec's ``blobFileValue.offset`` points at, and the data at ``offset``. Sub-byte
types (int4, uint1..uint6) are packed low bits first.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from exporter.errors import ArtifactError

SENTINEL = 0xDEADBEEF
# BlobDataType (MILBlob/Blob/BlobDataType.hpp): numpy dtype or sub-byte width (signed, bits).
BLOB_TYPES = {
    1: np.float16, 2: np.float32, 3: np.uint8, 4: np.int8, 6: np.int16, 7: np.uint16,
    14: np.int32, 15: np.uint32,
    8: (True, 4), 9: (False, 1), 10: (False, 2), 11: (False, 4), 12: (False, 3), 13: (False, 6),
}
BLOB_TYPE_NAMES = {5: "bfloat16", 16: "float8_e4m3fn", 17: "float8_e5m2"}


class BlobFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        count, version = struct.unpack_from("<II", self._map, 0)
        if version != 2:
            raise ArtifactError(f"{self.path}: blob storage version {version}, expected 2")
        self.count = count

    def read(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        sentinel, dtype_code, size, data_offset, padding_bits = struct.unpack_from("<IIQQQ", self._map, offset)
        if sentinel != SENTINEL:
            raise ArtifactError(f"{self.path}: no blob at offset {offset} (bad sentinel)")
        kind = BLOB_TYPES.get(dtype_code)
        if kind is None:
            name = BLOB_TYPE_NAMES.get(dtype_code, f"type code {dtype_code}")
            raise ArtifactError(f"{self.path}: blob at offset {offset} holds {name}, "
                                "which the interpreter does not read")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=data_offset)
        count = int(np.prod(shape)) if shape else 1
        if isinstance(kind, tuple):
            signed, bits = kind
            values = unpack_bits(raw, bits, count, signed)
        else:
            values = raw.view(kind)[:count].copy()
        if values.size != count:
            raise ArtifactError(f"{self.path}: blob at offset {offset} has {values.size} values, "
                                f"the spec says {count}")
        return values.reshape(shape)


def unpack_bits(raw: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Values of ``bits`` bits packed from the lowest bit of each byte upwards."""
    if bits == 4:  # the common case (int4 weights, 16-entry palettes): two nibbles per byte
        values = np.empty(raw.size * 2, dtype=np.uint8)
        values[0::2] = raw & 0x0F
        values[1::2] = raw >> 4
        values = values[:count]
        if signed:
            return (values.astype(np.int8) << 4) >> 4  # sign-extend the nibble
        return values
    allbits = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits)).astype(np.int16)
    values = (allbits.astype(np.int16) * weights).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values.astype(np.int8 if signed else np.uint8)
