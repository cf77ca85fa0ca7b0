"""GGUF quantized blocks decoded into codes + per-group scales, without dequantizing.

Each converter takes a tensor's raw blocks (``uint8 [rows, blocks_per_row * type_size]``,
from :meth:`GGUFFile.read_raw`) and returns ``(bits, group_size, codes, scales, zeros)`` in
the forms ``engine.models.quant.QuantizedWeight`` documents:

- Q4_0 (``w = d * (q - 8)``): 4-bit, group 32, scale ``d``, zero 0. Exact.
- Q4_1 (``w = d * q + m``): 4-bit, group 32, scale ``d``, zero ``m + 8 d``. Exact up to the
  fp32 rounding of that sum.
- Q4_K (super-blocks of 256 = 8 groups of 32, 6-bit group scales and mins:
  ``w = d * sc * q - dmin * m``): 4-bit, group 32, scale ``d * sc``, zero
  ``8 d sc - dmin m``. Exact up to fp32 rounding.
- Q8_0 (``w = d * q``): 8-bit, group 32, scale ``d`` (int8 methods re-quantize it per
  channel; the int8 kernel takes one scale per output row).

Other types (Q5_K, Q6_K, Q5_0, ...) have no 4-bit or group-wise 8-bit form a torch kernel
consumes; they are dequantized and the layer's method re-quantizes them.
Block layouts: ggml-common.h / ggml-quants.c in llama.cpp, and gguf-py's quants.py.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Decoded = tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]


def _blocks(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, int]:
    rows = raw.shape[0]
    _, type_size = GGML_QUANT_SIZES[qtype]
    return raw.reshape(-1, type_size), rows


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte ``start`` of every block, as fp32 ``[n_blocks, 1]``."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_q4_0(raw: np.ndarray) -> Decoded:
    blocks, rows = _blocks(raw, GGMLQuantizationType.Q4_0)
    d = _f16(blocks, 0)
    codes = _nibbles(blocks[:, 2:18])
    return 4, 32, codes.reshape(rows, -1), d.reshape(rows, -1), np.zeros_like(d).reshape(rows, -1)


def decode_q4_1(raw: np.ndarray) -> Decoded:
    blocks, rows = _blocks(raw, GGMLQuantizationType.Q4_1)
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    codes = _nibbles(blocks[:, 4:20])
    return 4, 32, codes.reshape(rows, -1), d.reshape(rows, -1), (m + 8 * d).reshape(rows, -1)


def decode_q8_0(raw: np.ndarray) -> Decoded:
    blocks, rows = _blocks(raw, GGMLQuantizationType.Q8_0)
    d = _f16(blocks, 0)
    codes = blocks[:, 2:34].copy().view(np.int8)
    return 8, 32, codes.reshape(rows, -1), d.reshape(rows, -1), None


def decode_q4_k(raw: np.ndarray) -> Decoded:
    blocks, rows = _blocks(raw, GGMLQuantizationType.Q4_K)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    s = blocks[:, 4:16].astype(np.uint8)  # 8 six-bit scales and 8 six-bit mins, packed
    sc = np.empty((len(blocks), 8), np.uint8)
    mn = np.empty((len(blocks), 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    qs = blocks[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 64 values: 2 groups each
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(len(blocks), 256)
    scales = d * sc.astype(np.float32)
    zeros = 8 * scales - dmin * mn.astype(np.float32)
    return 4, 32, codes.reshape(rows, -1), scales.reshape(rows, -1), zeros.reshape(rows, -1)


DECODERS = {
    GGMLQuantizationType.Q4_0: decode_q4_0,
    GGMLQuantizationType.Q4_1: decode_q4_1,
    GGMLQuantizationType.Q8_0: decode_q8_0,
    GGMLQuantizationType.Q4_K: decode_q4_k,
}


def dequantize_decoded(decoded: Decoded) -> np.ndarray:
    """The float values a decoded tensor stands for (the inverse of the converters)."""
    bits, group, codes, scales, zeros = decoded
    s = np.repeat(scales, group, axis=1)
    if bits == 8:
        return codes.astype(np.float32) * s
    assert zeros is not None
    return (codes.astype(np.float32) - 8) * s + np.repeat(zeros, group, axis=1)
