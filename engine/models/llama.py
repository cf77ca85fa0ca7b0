"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2.

They differ only in config: GQA head counts, RoPE theta and scaling, q/k/v biases (Qwen2
always, Llama when ``attention_bias``) and tied embeddings. Sliding-window attention (Mistral
v0.1, some Qwen2 configs) is not implemented: attention always sees the whole context, which
matches those models up to their window length.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from engine.models.base import AttentionMetadata, KVCache, MissingLayer, PipelineStage, layer_of
from engine.models.layers import (
    AttentionPlan,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary_,
    paged_attention,
    rope_inv_freq,
)
from engine.models.linear import (
    SINGLE_DEVICE,
    LinearMethodFor,
    QKVParallelLinear,
    RowParallelLinear,
    TPInfo,
    WeightTarget,
    load_named_weights,
    no_quant,
)
from engine.models.vocab import ParallelLMHead, VocabParallelEmbedding


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaArgs:
        """Reads an HF ``config.json`` dict (transformers 4 or 5 spelling of RoPE settings)."""
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (expected silu)")
        heads = cfg["num_attention_heads"]
        is_qwen2 = cfg.get("model_type") == "qwen2"
        attention_bias = bool(cfg.get("attention_bias", False))
        theta, scaling = rope_settings(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=is_qwen2 or attention_bias,  # Qwen2's q/k/v always carry a bias
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling`` keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return float(theta), (None if kind == "default" else dict(scaling))


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TPInfo, quant: LinearMethodFor, prefix: str) -> None:
        super().__init__()
        # q, k and v in one matmul: one kernel instead of three per layer.
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size,
            args.head_dim,
            args.num_heads,
            args.num_kv_heads,
            args.qkv_bias,
            tp,
            quant(f"{prefix}qkv_proj"),
        )
        # This rank's heads (all of them on one device).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            args.num_heads * args.head_dim,
            args.hidden_size,
            args.o_bias,
            tp,
            quant(f"{prefix}o_proj"),
        )
        self.scale = args.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k rotate together, in place, so k ends up next to v for the cache write.
        qk = qkv[:, : self.q_size + self.kv_size].view(n, -1, self.head_dim)
        apply_rotary_(qk, cos, sin)
        q = qk[:, : self.num_heads]
        kv = qkv[:, self.q_size :].view(n, 2, self.num_kv_heads, self.head_dim).transpose(0, 1)
        out = paged_attention(q, kv, kv_cache, plan, self.scale)
        return self.o_proj(out.reshape(n, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TPInfo, quant: LinearMethodFor, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, tp, quant, f"{prefix}self_attn.")
        self.mlp = SwiGLUMLP(
            args.hidden_size, args.intermediate_size, args.mlp_bias, tp, quant, f"{prefix}mlp."
        )
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        plan: AttentionPlan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the add of that output
        is left to the next norm (``RMSNorm.add_norm``), which does add and norm together.
        ``residual`` None: ``x`` is the whole stream (the first layer of a stage)."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, plan)
        h, residual = self.post_attention_layernorm.add_norm(h, residual)
        return self.mlp(h), residual


class LlamaBackbone(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TPInfo, quant: LinearMethodFor, stage: PipelineStage) -> None:
        super().__init__()
        # A tied head reads the embedding matrix, so the last stage holds it too.
        wants_embedding = stage.is_first or (stage.is_last and args.tie_word_embeddings)
        self.embed_tokens = (
            VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp) if wants_embedding else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, tp, quant, f"model.layers.{i}.") if stage.owns_layer(i) else MissingLayer()
            for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if stage.is_last else None


class LlamaForCausalLM(nn.Module):
    """Implements ``engine.models.base.CausalLM``; parameter names follow the HF checkpoint
    except for the fused ``qkv_proj`` and ``gate_up_proj``."""

    def __init__(
        self,
        config: dict,
        tp: TPInfo = SINGLE_DEVICE,
        quant: LinearMethodFor | None = None,
        stage: PipelineStage | None = None,
    ) -> None:
        super().__init__()
        args = LlamaArgs.from_hf(config)
        self.args = args
        quant = quant or no_quant
        self.stage = stage or PipelineStage.whole(args.num_layers)
        self.model = LlamaBackbone(args, tp, quant, self.stage)
        self.num_layers = args.num_layers
        # The KV heads this rank caches (all of them on one device).
        first = self.model.layers[self.stage.start_layer] if self.stage.num_layers else None
        self.num_kv_heads = first.self_attn.num_kv_heads if first is not None else args.num_kv_heads
        self.head_dim, self.vocab_size = args.head_dim, args.vocab_size
        # A tied head reads the embedding matrix at call time, so no second parameter has to
        # be kept tied through device moves.
        self.lm_head = (
            ParallelLMHead(
                args.vocab_size,
                args.hidden_size,
                tp,
                quant("lm_head"),
                tied=self.model.embed_tokens if args.tie_word_embeddings else None,
            )
            if self.stage.is_last
            else None
        )
        self.rotary = RotaryEmbedding(
            rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionMetadata,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.stage.is_first:
            x = self.model.embed_tokens(input_ids)
        else:  # the residual stream is added to in place: not the caller's tensor
            assert hidden is not None
            x = hidden.clone()
        plan = AttentionPlan.build(attn, x.device)
        cos, sin = self.rotary(positions, x.dtype)
        layers = self.model.layers[self.stage.start_layer : self.stage.end_layer]
        residual = None
        for layer, cache in zip(layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, cache, plan)
        if self.stage.is_last:
            return self.model.norm.add_norm(x, residual)[0]
        return x if residual is None else residual.add_(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, weights, self._target)

    def owns(self, name: str) -> bool:
        """Whether this pipeline stage keeps checkpoint tensor ``name`` (the loader skips
        reading the rest)."""
        layer = layer_of(name)
        if layer is not None:
            return self.stage.owns_layer(layer)
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None
        if name.startswith(("model.norm.", "lm_head.")):
            return self.stage.is_last
        return True

    def _target(self, name: str) -> WeightTarget | None:
        if "rotary_emb." in name or (name == "lm_head.weight" and self.args.tie_word_embeddings):
            return None
        if not self.owns(name):
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            return ".".join([*parts[:-2], fused, parts[-1]]), shard
        return name, None


# Checkpoint projection -> (our fused layer, its shard id).
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
