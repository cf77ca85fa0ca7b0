"""Building blocks shared by the model implementations: norms, RoPE, MLP, paged attention.

Everything here is plain PyTorch so the same code runs on CPU and CUDA. Attention follows the
contract in ``engine.models.base``: each layer writes the step's new K/V into its paged cache
and then attends over every sequence's whole context, read back through its block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.base import AttentionMetadata, KVCache
from engine.models.linear import (
    SINGLE_DEVICE,
    LinearMethodFor,
    MergedColumnParallelLinear,
    RowParallelLinear,
    TPInfo,
    no_quant,
)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as Llama's reference does: bf16
        # variance would lose too much precision, and the order decides the rounding.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


# --------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32, CPU) for the config's rope scaling.

    ``scaling`` is the HF ``rope_scaling`` / ``rope_parameters`` dict (``rope_type`` or the
    legacy ``type`` key) or ``None``.
    """
    # Created on CPU explicitly: models are built under a meta-device context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return 1.0 / theta**exponents
    if kind == "linear":
        return 1.0 / theta**exponents / float(scaling["factor"])
    if kind == "dynamic":
        # HF rescales per forward from the current length, which a KV cache cannot follow
        # (cached keys keep their old rotation). Like vLLM we fix the base once, for the
        # longest context the factor is meant to reach (HF's formula at factor x its max length).
        factor = float(scaling["factor"])
        base = theta * (factor * factor - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base**exponents
    if kind == "llama3":
        return _llama3_inv_freq(1.0 / theta**exponents, scaling)
    if kind == "freq_factors":
        # GGUF stores Llama 3 style scaling as precomputed per-frequency divisors.
        return 1.0 / theta**exponents / torch.tensor(scaling["factors"], device="cpu")
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables for the step's positions, computed once per forward for all layers.

    Not an ``nn.Module``: it has no weights, and keeping ``inv_freq`` off the module keeps it
    in fp32 when the model is cast to bf16/fp16 (the angles need the precision).
    """

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self._inv_freq = inv_freq
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device[positions.device] = self._inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [n, 1, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [n, heads, head_dim] in the half-split (GPT-NeoX / HF Llama) layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- MLP


class SwiGLUMLP(nn.Module):
    """Llama's gated MLP with gate and up fused into one matmul (fewer kernel launches).

    Under tensor parallelism each rank holds its own gate and up rows (merged column
    parallel) and its slice of down's columns (row parallel, one all-reduce per MLP).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        tp: TPInfo = SINGLE_DEVICE,
        quant: LinearMethodFor | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        method = quant or no_quant
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias, tp, method(f"{prefix}gate_up_proj")
        )
        self.intermediate_size = self.gate_up_proj.local_sizes[0]  # this rank's
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias, tp, method(f"{prefix}down_proj")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# --------------------------------------------------------------------------- paged attention


@dataclass
class _Prefill:
    """A sequence with more than one new token: attended on its own."""

    start: int  # first of its tokens in the flat batch
    end: int
    # Context blocks to read back, or None when the whole context is this step's tokens
    # (a plain prefill) and the fresh K/V can be used directly.
    blocks: torch.Tensor | None
    context_len: int
    mask: torch.Tensor | None  # [query_len, context_len] bool, None: plain causal


@dataclass
class AttentionPlan:
    """Indexing for one step, shared by every layer; build it once per forward.

    Decode sequences (one new token) are attended together in one batched call over their
    block tables padded to the longest context; the rest loop per sequence.
    """

    slot_mapping: torch.Tensor
    prefills: list[_Prefill]
    decode_rows: torch.Tensor | None  # flat token index of each decode sequence; None: all
    decode_blocks: torch.Tensor | None  # [num_decode, max_blocks] block ids
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] bool
    num_decode: int

    @classmethod
    def build(cls, attn: AttentionMetadata, device: torch.device) -> AttentionPlan:
        bs = attn.block_size
        tables = attn.block_tables.to(device)
        prefills: list[_Prefill] = []
        decode_seqs: list[int] = []
        decode_rows: list[int] = []
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(attn.query_lens, attn.context_lens)):
            if q_len == 1:
                decode_seqs.append(i)
                decode_rows.append(start)
            else:
                prefills.append(_prefill(start, q_len, ctx_len, tables[i], bs, device))
            start += q_len
        plan = cls(attn.slot_mapping.to(device), prefills, None, None, None, len(decode_seqs))
        if decode_seqs:
            ctx_lens = [attn.context_lens[i] for i in decode_seqs]
            max_blocks = -(-max(ctx_lens) // bs)
            everyone = len(decode_seqs) == attn.num_seqs
            chosen = tables if everyone else tables[decode_seqs]
            plan.decode_blocks = chosen[:, :max_blocks].contiguous()
            plan.decode_rows = None if everyone else torch.tensor(decode_rows, device=device)
            key_pos = torch.arange(max_blocks * bs, device=device)
            ctx = torch.tensor(ctx_lens, device=device)
            plan.decode_mask = (key_pos[None, :] < ctx[:, None])[:, None, None, :]
        return plan


def _prefill(
    start: int, q_len: int, ctx_len: int, table: torch.Tensor, bs: int, device: torch.device
) -> _Prefill:
    if q_len == ctx_len:
        return _Prefill(start, start + q_len, None, ctx_len, None)
    # Query i sits at position ctx_len - q_len + i and sees keys up to and including itself.
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
    mask = torch.arange(ctx_len, device=device)[None, :] <= q_pos[:, None]
    return _Prefill(start, start + q_len, table[: -(-ctx_len // bs)], ctx_len, mask)


def paged_attention(
    q: torch.Tensor,  # [n, num_heads, head_dim], rotary already applied
    k: torch.Tensor,  # [n, num_kv_heads, head_dim]
    v: torch.Tensor,  # [n, num_kv_heads, head_dim]
    kv_cache: KVCache,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    """Write the new K/V into ``kv_cache`` at the plan's slots, then attend causally."""
    n, num_kv, head_dim = q.shape[0], k.shape[1], k.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, num_kv, head_dim]
    k_cache.view(-1, num_kv, head_dim).index_copy_(0, plan.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv, head_dim).index_copy_(0, plan.slot_mapping, v.to(v_cache.dtype))

    if plan.num_decode == n:  # pure decode step, the common case: no scatter needed
        return _decode(q, k_cache, v_cache, plan, scale)
    out = torch.empty_like(q)
    for p in plan.prefills:
        if p.blocks is None:
            keys, values = k[p.start : p.end], v[p.start : p.end]
        else:
            # index_select: several times faster than advanced indexing on CPU.
            keys = k_cache.index_select(0, p.blocks).flatten(0, 1)[: p.context_len]
            values = v_cache.index_select(0, p.blocks).flatten(0, 1)[: p.context_len]
        out[p.start : p.end] = _attend_one(q[p.start : p.end], keys, values, p.mask, scale)
    if plan.num_decode:
        assert plan.decode_rows is not None
        out[plan.decode_rows] = _decode(q[plan.decode_rows], k_cache, v_cache, plan, scale)
    return out


def _attend_one(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]
    k: torch.Tensor,  # [ctx_len, num_kv_heads, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    # Query head h reads KV head h // group (HF's repeat_kv order).
    k = k.transpose(0, 1).repeat_interleave(group, dim=0)
    v = v.transpose(0, 1).repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k, v, attn_mask=mask, is_causal=mask is None, scale=scale
    )
    return out.transpose(0, 1)


def _decode(
    q: torch.Tensor,  # [num_decode, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    b, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    # [b, max_blocks, block_size, kv, d] -> [b, kv, keys, d]. Slots past a context are masked;
    # the pool zero-fills its memory so they hold finite values (0 * NaN would leak through).
    assert plan.decode_blocks is not None
    keys = _gather(k_cache, plan.decode_blocks)
    values = _gather(v_cache, plan.decode_blocks)
    # One query token per sequence, so the query heads sharing a KV head can stand in for the
    # query-length axis: GQA without repeating K/V.
    grouped = q.reshape(b, num_kv, num_heads // num_kv, head_dim)
    out = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=plan.decode_mask, scale=scale
    )
    return out.reshape(b, num_heads, head_dim)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[b, max_blocks] block ids -> [b, kv_heads, max_blocks * block_size, head_dim]."""
    b, n = blocks.shape
    rows = cache.index_select(0, blocks.reshape(-1))
    return rows.view(b, n * cache.shape[1], *cache.shape[2:]).transpose(1, 2)
