"""Building blocks shared by the model implementations: norms, RoPE, MLP, paged attention.

Everything here is plain PyTorch so the same code runs on CPU and CUDA. Attention follows the
contract in ``engine.models.base``: each layer writes the step's new K/V into its paged cache
and then attends over every sequence's whole context, read back through its block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
        if x.dtype == torch.float32:  # one fused op; the same result as the order below
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Half precision: normalise in fp32 and scale in the input dtype, as Llama's reference
        # does. The fused kernel on bf16 input is not good enough: SmolLM2-135M in bf16
        # answered the Paris prompt with nonsense through it (measured), and right this way.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype).mul_(self.weight)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's residual add and norm in one call: ``residual += x``, then
        ``(norm(residual), residual)``. ``residual`` None (the first layer): ``x`` is the
        stream itself and becomes the residual (it is added to in place from then on, so the
        caller hands over a tensor it owns). The sum is the reference's ``residual + x``
        exactly; doing it in place saves an allocation per layer."""
        if residual is None:
            residual = x
        else:
            residual.add_(x)
        return self(residual), residual


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
        """(cos, signed sin), each [n, 1, head_dim], for :func:`apply_rotary_`.

        The sin table's first half is negated, so that rotating is ``x * cos + roll(x) * sin``
        (one roll instead of HF's slice-negate-concatenate).
        """
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device[positions.device] = self._inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [n, 1, head_dim]
        sin = torch.cat((-freqs, freqs), dim=-1).sin()[:, None, :]
        return angles.cos().to(dtype), sin.to(dtype)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [n, heads, head_dim] in place, half-split (GPT-NeoX / HF Llama) layout.

    ``x`` may be a view into a larger tensor (the fused q/k/v output, so that q and k turn
    in one pass and the rotated k lands where the cache write reads it). HF's
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` is
    ``x * cos + roll(x, half) * signed_sin``.
    """
    rolled = x.roll(x.shape[-1] // 2, dims=-1)
    return x.mul_(cos).addcmul_(rolled, signed_sin)


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
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.intermediate_size))


def silu_and_mul(gate_up: torch.Tensor, size: int) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` (last dimension ``2 * size``): the
    product is written over the SiLU's own (contiguous) output, so one new tensor instead
    of two and no split; the values are those of ``F.silu(gate) * up``."""
    return F.silu(gate_up[..., :size]).mul_(gate_up[..., size:])


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

    Decode sequences (one new token) are attended together in one batched call. Their K/V
    is read with one gather of their blocks (K and V together), trimmed to the longest
    context; a lone decode sequence whose blocks are consecutive in the pool (the usual
    case at batch size one: the block manager hands out ascending ids) is read as a view,
    without any copy. Prefills loop per sequence.
    """

    slot_mapping: torch.Tensor
    prefills: list[_Prefill]
    decode_rows: torch.Tensor | None  # flat token index of each decode sequence; None: all
    # Gathered: [num_decode * max_blocks] block ids. None when ``decode_span`` applies.
    decode_blocks: torch.Tensor | None
    decode_span: tuple[int, int] | None  # (first block, number of blocks): read as a view
    decode_keys: int  # keys per decode sequence: the longest decode context
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, decode_keys] bool; None: no padding
    num_decode: int

    @classmethod
    def build(cls, attn: AttentionMetadata, device: torch.device) -> AttentionPlan:
        bs = attn.block_size
        tables = attn.block_tables.to(device)
        host_tables = attn.host_block_tables
        if host_tables is None and tables.device.type == "cpu":
            host_tables = tables.numpy()
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
        plan = cls(attn.slot_mapping.to(device), prefills, None, None, None, 0, None,
                   len(decode_seqs))
        if not decode_seqs:
            return plan
        ctx_lens = [attn.context_lens[i] for i in decode_seqs]
        keys = plan.decode_keys = max(ctx_lens)
        num_blocks = -(-keys // bs)
        everyone = len(decode_seqs) == attn.num_seqs
        if not everyone:
            plan.decode_rows = torch.tensor(decode_rows, device=device)
        if len(decode_seqs) == 1 and host_tables is not None:
            row = host_tables[decode_seqs[0], :num_blocks]
            if num_blocks == 1 or bool((np.diff(row) == 1).all()):
                plan.decode_span = (int(row[0]), num_blocks)
        if plan.decode_span is None:
            chosen = tables if everyone else tables[decode_seqs]
            plan.decode_blocks = chosen[:, :num_blocks].reshape(-1)
        if min(ctx_lens) < keys:  # padded keys exist: mask them
            pad = np.arange(keys)[None, :] >= np.asarray(ctx_lens)[:, None]
            plan.decode_mask = torch.from_numpy(~pad[:, None, None, :]).to(device)
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
    kv: torch.Tensor,  # [2, n, num_kv_heads, head_dim]: K then V (a strided view is fine)
    kv_cache: KVCache,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    """Write the new K/V into ``kv_cache`` at the plan's slots, then attend causally.

    K and V travel as one tensor so that writing them, and reading them back, is one op
    each rather than two: a model whose fused projection puts k next to v passes a view.
    """
    n, num_kv, head_dim = q.shape[0], kv.shape[2], kv.shape[3]
    if kv.dtype != kv_cache.dtype:
        kv = kv.to(kv_cache.dtype)
    # [2, num_blocks, block_size, kv, d] viewed as [2, slots, kv, d].
    kv_cache.view(2, -1, num_kv, head_dim).index_copy_(1, plan.slot_mapping, kv)

    if plan.num_decode == n:  # pure decode step, the common case: no scatter needed
        return _decode(q, kv_cache, plan, scale)
    out = torch.empty_like(q)
    for p in plan.prefills:
        if p.blocks is None:
            keys, values = kv[0, p.start : p.end], kv[1, p.start : p.end]
        else:
            # index_select: several times faster than advanced indexing on CPU.
            both = kv_cache.index_select(1, p.blocks).flatten(1, 2)[:, : p.context_len]
            keys, values = both[0], both[1]
        out[p.start : p.end] = _attend_one(q[p.start : p.end], keys, values, p.mask, scale)
    if plan.num_decode:
        assert plan.decode_rows is not None
        out[plan.decode_rows] = _decode(q[plan.decode_rows], kv_cache, plan, scale)
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
    kv_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    b, num_heads, head_dim = q.shape
    num_kv = kv_cache.shape[3]
    if plan.decode_span is not None:
        first, count = plan.decode_span
        kv = kv_cache[:, first : first + count]  # a view: no copy
    else:
        assert plan.decode_blocks is not None
        # Padded slots (past a context, within its last block or a shorter table) are
        # masked; the pool zero-fills its memory so they hold finite values (0 * NaN would
        # leak through the mask).
        kv = kv_cache.index_select(1, plan.decode_blocks)
    # [2, b * blocks, block_size, kv, d] -> [2, b, keys, kv, d] -> K, V as [b, kv, keys, d].
    kv = kv.reshape(2, b, -1, num_kv, head_dim)
    if kv.shape[2] != plan.decode_keys:
        kv = kv[:, :, : plan.decode_keys]
    keys, values = kv.transpose(2, 3).unbind(0)  # each [b, kv, keys, d]
    # One query token per sequence, so the query heads sharing a KV head can stand in for the
    # query-length axis: GQA without repeating K/V.
    grouped = q.reshape(b, num_kv, num_heads // num_kv, head_dim)
    out = F.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=plan.decode_mask, scale=scale
    )
    return out.reshape(b, num_heads, head_dim)
