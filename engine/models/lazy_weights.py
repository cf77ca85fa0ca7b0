"""Checkpoint tensors read lazily, only the part a rank keeps.

The loader yields these instead of whole tensors (``iter_weights(..., lazy=True)``); a
layer's weight loader narrows one to its rank's rows or columns and then reads it
(``engine.models.linear.LazyWeight``), so a tensor-parallel rank reads no more of the file
than its shard:

- safetensors: ``safe_open(...).get_slice(name)[rows, cols]`` copies just that box out of the
  memory-mapped file.
- GGUF: a 2-D tensor is ``rows x blocks`` of packed bytes, row-major, so a slice of rows is
  one contiguous byte range, and a slice of columns is a byte range within each row when it
  starts and ends on a block boundary (32 values for Q4_0/Q4_1/Q8_0, 256 for K-quants, 1 for
  floats). A column slice that cuts through blocks (e.g. a row-parallel shard of 192 columns
  of a Q4_K tensor) reads whole rows and drops the other columns after decoding. llama.cpp's
  q/k row permutation is per head, and shards are whole heads, so a row slice is unpermuted
  on its own. 1-D tensors (norms, biases: a few KB) are read whole.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from engine.models.gguf_blocks import DECODERS
from engine.models.gguf_file import GGUFFile, GGUFTensorInfo
from engine.models.linear import LazyWeight
from engine.models.quant import QuantizedWeight

Box = tuple[tuple[int, int], ...]  # per dimension: [start, stop) of the whole tensor


class _Boxed(LazyWeight):
    """Narrowing arithmetic shared by the sources: a box within the tensor's full shape."""

    def __init__(self, full_shape: tuple[int, ...], box: Box | None = None) -> None:
        self.full_shape = tuple(full_shape)
        self.box: Box = box if box is not None else tuple((0, n) for n in full_shape)
        self.shape = torch.Size(b - a for a, b in self.box)

    def narrow(self, dim: int, start: int, length: int) -> _Boxed:
        dim = dim % len(self.shape)
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise ValueError(
                f"narrow({dim}, {start}, {length}) outside a tensor of shape {tuple(self.shape)}"
            )
        lo = self.box[dim][0] + start
        box = (*self.box[:dim], (lo, lo + length), *self.box[dim + 1 :])
        return self._with_box(box)

    @abstractmethod
    def _with_box(self, box: Box) -> _Boxed:
        """The same source, narrowed to ``box``."""


class SafetensorsSlice(_Boxed):
    """One tensor of an open safetensors file (``safe_open(...).get_slice(name)``)."""

    def __init__(self, source: object, full_shape: tuple[int, ...], box: Box | None = None) -> None:
        super().__init__(full_shape, box)
        self._source = source

    def _with_box(self, box: Box) -> SafetensorsSlice:
        return SafetensorsSlice(self._source, self.full_shape, box)

    def read(self) -> torch.Tensor:
        if not self.full_shape:  # a scalar: nothing to slice
            return self._source[...]  # type: ignore[index]
        return self._source[tuple(slice(a, b) for a, b in self.box)]  # type: ignore[index]


class GGUFSlice(_Boxed):
    """One tensor of a GGUF file. ``packed``: read as ``QuantizedWeight`` (codes and scales,
    not dequantized); ``heads``: the q/k rows are in llama.cpp's permuted order for that
    many heads."""

    def __init__(
        self,
        gguf: GGUFFile,
        info: GGUFTensorInfo,
        packed: bool = False,
        heads: int | None = None,
        box: Box | None = None,
    ) -> None:
        super().__init__(info.shape, box)
        self._gguf, self._info, self._packed, self._heads = gguf, info, packed, heads

    def _with_box(self, box: Box) -> GGUFSlice:
        return GGUFSlice(self._gguf, self._info, self._packed, self._heads, box)

    def read(self) -> torch.Tensor | QuantizedWeight:
        info = self._info
        if len(info.shape) != 2:
            whole = _float_rows(self._gguf.read_part(info, None, None), info.qtype)
            if self._heads is not None:
                whole = unpermute_qk(whole, self._heads)
            part = torch.from_numpy(whole)
            for dim, (a, b) in enumerate(self.box):
                part = part.narrow(dim, a, b - a)
            return part.contiguous()
        (r0, r1), (c0, c1) = self.box
        # Rows: whole heads when the rows are permuted per head (a TP shard always is).
        ra, rb = r0, r1
        if self._heads is not None:
            per_head = info.shape[0] // self._heads
            ra, rb = r0 // per_head * per_head, -(-r1 // per_head) * per_head
        # Columns: a byte range when the slice starts and ends on block boundaries.
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        ca, cb = (c0, c1) if c0 % block == 0 and c1 % block == 0 else (0, info.shape[1])
        raw = self._gguf.read_part(info, (ra, rb), (ca // block * type_size, cb // block * type_size))
        heads = None if self._heads is None else (rb - ra) // (info.shape[0] // self._heads)
        if self._packed:
            weight = decode_quantized(raw, info.qtype)
            if heads is not None:
                weight = weight.index_rows(torch.from_numpy(unpermute_qk(np.arange(rb - ra), heads)))
            if (ra, rb) != (r0, r1):
                weight = weight.narrow(0, r0 - ra, r1 - r0)
            if (ca, cb) != (c0, c1):
                weight = weight.narrow(1, c0 - ca, c1 - c0)
            return weight
        values = _float_rows(raw, info.qtype)
        if heads is not None:
            values = unpermute_qk(values, heads)
        values = values[r0 - ra : r1 - ra, c0 - ca : c1 - ca]
        return torch.from_numpy(np.ascontiguousarray(values))


def _float_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    # F32/F16 come back as views of the bytes read; copy so torch may own them.
    try:
        return np.array(dequantize(raw, qtype), dtype=np.float32)
    except NotImplementedError as exc:  # the loader reports ValueErrors by tensor name
        raise ValueError(f"cannot dequantize {qtype.name}: {exc}") from exc


def decode_quantized(raw: np.ndarray, qtype: GGMLQuantizationType) -> QuantizedWeight:
    """Packed GGUF blocks (``uint8 [rows, bytes]``) as codes and scales, not dequantized."""
    bits, group, codes, scales, zeros = DECODERS[qtype](raw)
    return QuantizedWeight(
        bits,
        group,
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(np.ascontiguousarray(scales)),
        None if zeros is None else torch.from_numpy(np.ascontiguousarray(zeros)),
        source=qtype.name,
    )


def unpermute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's ``permute``: per head, rows (pair, half) -> (half, pair)."""
    half = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(weights.shape)
