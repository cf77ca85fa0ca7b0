"""A minimal GGUF (v2/v3) reader: metadata, tensor directory, raw blocks, dequantized tensors.

``gguf.GGUFReader`` turns every string of the embedded tokenizer into numpy views; for
SmolLM2's ~100k tokens and merges that takes ~3 s before a single weight is read. This
reader walks string arrays without materialising them (their lengths are all the engine
needs) and maps tensor data lazily; dequantization is still ``gguf.quants.dequantize``.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands, or it is truncated."""


@dataclass(frozen=True)
class GGUFArray:
    """An array-valued metadata entry; string items are counted, not decoded."""

    item_type: GGUFValueType
    length: int
    values: tuple | None  # numeric items; None for strings and nested arrays


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (ggml's dims reversed)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """Parses the header eagerly and keeps the file mapped for :meth:`read`."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file cannot be mapped
                raise GGUFFormatError(f"empty file ({exc})") from None
        self._pos = 0
        try:
            self.metadata, self.tensors = self._parse()
        except struct.error:
            raise GGUFFormatError("file ends inside its header (truncated?)") from None

    def get(self, key: str, default: object = None) -> object:
        return self.metadata.get(key, default)

    def read(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor dequantized to a fresh, writable fp32 array."""
        # F32/F16 come back as views of the read-only map; copy so torch may own them.
        return np.array(dequantize(self.read_raw(info), info.qtype), dtype=np.float32)

    def read_raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's stored bytes, ``uint8 [*shape[:-1], blocks_per_row * type_size]``: a
        read-only view of the map (``engine.models.gguf_blocks`` decodes the blocks)."""
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        return raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)

    def read_part(
        self,
        info: GGUFTensorInfo,
        rows: tuple[int, int] | None,
        byte_cols: tuple[int, int] | None,
    ) -> np.ndarray:
        """A copy of rows ``[a, b)`` and bytes ``[c, d)`` of each of them of a 2-D tensor's
        stored bytes (``None``: all); a 1-D tensor is read whole. Only those bytes are read
        from the file (the map pages them in on demand)."""
        raw = self.read_raw(info)
        if raw.ndim == 2:
            if rows is not None:
                raw = raw[rows[0] : rows[1]]
            if byte_cols is not None:
                raw = raw[:, byte_cols[0] : byte_cols[1]]
        return np.ascontiguousarray(raw)

    # ----------------------------------------------------------------------- parsing

    def _unpack(self, fmt: str) -> object:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        raw = self._map[self._pos : self._pos + n]
        if len(raw) != n:
            raise struct.error("string past end of file")
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> object:
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            return self._array()
        if vtype not in _SCALARS:
            raise GGUFFormatError(f"unknown metadata value type {vtype}")
        return self._unpack(_SCALARS[GGUFValueType(vtype)])

    def _array(self) -> GGUFArray:
        item_type = GGUFValueType(self._unpack("<I"))
        length = self._unpack("<Q")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            end = self._pos + length * dtype.itemsize
            if end > len(self._map):
                raise struct.error("array past end of file")
            values = np.frombuffer(self._map, dtype, count=length, offset=self._pos)
            self._pos = end
            return GGUFArray(item_type, length, tuple(values.tolist()))
        if item_type == GGUFValueType.STRING:
            for _ in range(length):  # skip: only the length of each string is read
                self._pos += 8 + struct.unpack_from("<Q", self._map, self._pos)[0]
        else:
            for _ in range(length):
                self._value(item_type)
        return GGUFArray(item_type, length, None)

    def _parse(self) -> tuple[dict[str, object], dict[str, GGUFTensorInfo]]:
        if self._map[:4] != _MAGIC:
            raise GGUFFormatError("bad magic (not a GGUF file)")
        self._pos = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(self._unpack("<I"))
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            entries.append((name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q")))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))  # type: ignore[arg-type]
        data_start = -(-self._pos // alignment) * alignment
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, qtype_id, offset in entries:
            try:
                qtype = GGMLQuantizationType(qtype_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name}: unknown ggml type {qtype_id}") from None
            nbytes = int(np.prod(shape)) // block * type_size
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise GGUFFormatError(f"tensor {name} runs past the end of the file (truncated?)")
            tensors[name] = GGUFTensorInfo(name, shape, qtype, start, nbytes)
        return metadata, tensors
