"""Meta's OPT: learned positions (offset by 2), LayerNorm before or after each block
(``do_layer_norm_before``), a ReLU FFN and a head tied to the token embeddings, with
``project_in``/``project_out`` when ``word_embed_proj_dim`` differs from ``hidden_size``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.base import AttentionMetadata, KVCache, MissingLayer, PipelineStage, layer_of
from engine.models.layers import AttentionPlan, paged_attention
from engine.models.linear import (
    SINGLE_DEVICE,
    ColumnParallelLinear,
    LinearMethodFor,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    TPInfo,
    WeightTarget,
    load_named_weights,
    no_quant,
)
from engine.models.vocab import ParallelLMHead, VocabParallelEmbedding

# OPT's position table has two extra leading rows (a fairseq padding convention).
POSITION_OFFSET = 2

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class OPTArgs:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool
    final_layer_norm: bool
    elementwise_affine: bool
    bias: bool
    activation: str

    @classmethod
    def from_hf(cls, cfg: dict) -> OPTArgs:
        activation = cfg.get("activation_function", "relu")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported OPT activation_function {activation!r}")
        before = bool(cfg.get("do_layer_norm_before", True))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            max_position_embeddings=cfg["max_position_embeddings"],
            word_embed_proj_dim=cfg.get("word_embed_proj_dim") or cfg["hidden_size"],
            do_layer_norm_before=before,
            # Checkpoints fine-tuned before transformers 4.20 lack the final norm.
            final_layer_norm=before and not cfg.get("_remove_final_layer_norm", False),
            elementwise_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
            bias=bool(cfg.get("enable_bias", True)),
            activation=activation,
        )


class OPTAttention(nn.Module):
    def __init__(self, args: OPTArgs, tp: TPInfo, quant: LinearMethodFor, prefix: str) -> None:
        super().__init__()
        self.head_dim = args.hidden_size // args.num_heads
        heads, hidden = args.num_heads, args.hidden_size
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, heads, heads, args.bias, tp, quant(f"{prefix}qkv_proj")
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.out_proj = RowParallelLinear(hidden, hidden, args.bias, tp, quant(f"{prefix}out_proj"))
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, kv_cache: KVCache, plan: AttentionPlan) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim)
        out = paged_attention(qkv[:, 0], qkv[:, 1:].transpose(0, 1), kv_cache, plan, self.scale)
        return self.out_proj(out.reshape(n, -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, args: OPTArgs, tp: TPInfo, quant: LinearMethodFor, prefix: str) -> None:
        super().__init__()
        self.pre_norm = args.do_layer_norm_before
        self.activation = _ACTIVATIONS[args.activation]
        self.self_attn = OPTAttention(args, tp, quant, f"{prefix}self_attn.")
        norm = (args.hidden_size,)
        self.self_attn_layer_norm = nn.LayerNorm(norm, elementwise_affine=args.elementwise_affine)
        self.fc1 = ColumnParallelLinear(
            args.hidden_size, args.ffn_dim, args.bias, tp, quant(f"{prefix}fc1")
        )
        self.fc2 = RowParallelLinear(
            args.ffn_dim, args.hidden_size, args.bias, tp, quant(f"{prefix}fc2")
        )
        self.final_layer_norm = nn.LayerNorm(norm, elementwise_affine=args.elementwise_affine)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, plan: AttentionPlan) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, kv_cache, plan)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.activation(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, args: OPTArgs, tp: TPInfo, quant: LinearMethodFor, stage: PipelineStage) -> None:
        super().__init__()
        hidden, proj = args.hidden_size, args.word_embed_proj_dim
        first, last = stage.is_first, stage.is_last
        # The head is tied to the token embedding: the last stage holds it too.
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, proj, tp) if first or last else None
        self.embed_positions = (
            nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, hidden) if first else None
        )
        # Small square-ish projections, used once per step: replicated, not split.
        self.project_in = (
            ReplicatedLinear(proj, hidden, False, tp, quant("model.decoder.project_in"))
            if proj != hidden and first
            else None
        )
        self.project_out = (
            ReplicatedLinear(hidden, proj, False, tp, quant("model.decoder.project_out"))
            if proj != hidden and last
            else None
        )
        self.layers = nn.ModuleList(
            OPTDecoderLayer(args, tp, quant, f"model.decoder.layers.{i}.") if stage.owns_layer(i)
            else MissingLayer()
            for i in range(args.num_layers)
        )
        self.final_layer_norm = (
            nn.LayerNorm((hidden,), elementwise_affine=args.elementwise_affine)
            if args.final_layer_norm and last
            else None
        )


class OPTModel(nn.Module):
    """Only a holder, so parameter names carry HF's ``model.decoder.`` prefix."""

    def __init__(self, args: OPTArgs, tp: TPInfo, quant: LinearMethodFor, stage: PipelineStage) -> None:
        super().__init__()
        self.decoder = OPTDecoder(args, tp, quant, stage)


class OPTForCausalLM(nn.Module):
    """Implements ``engine.models.base.CausalLM``; parameter names follow the HF checkpoint
    except for the fused ``qkv_proj``."""

    def __init__(
        self,
        config: dict,
        tp: TPInfo = SINGLE_DEVICE,
        quant: LinearMethodFor | None = None,
        stage: PipelineStage | None = None,
    ) -> None:
        super().__init__()
        args = OPTArgs.from_hf(config)
        self.args = args
        self.stage = stage or PipelineStage.whole(args.num_layers)
        self.model = OPTModel(args, tp, quant or no_quant, self.stage)
        self.num_layers = args.num_layers
        self.num_kv_heads = args.num_heads // tp.size  # this rank's (all heads are KV heads)
        self.head_dim = args.hidden_size // args.num_heads
        self.vocab_size = args.vocab_size
        self.lm_head = (
            ParallelLMHead(args.vocab_size, args.word_embed_proj_dim, tp, tied=self.model.decoder.embed_tokens)
            if self.stage.is_last
            else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionMetadata,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dec, stage = self.model.decoder, self.stage
        if stage.is_first:
            x = dec.embed_tokens(input_ids)
            if dec.project_in is not None:
                x = dec.project_in(x)
            x = x + dec.embed_positions(positions + POSITION_OFFSET)
        else:
            x = hidden
        plan = AttentionPlan.build(attn, x.device)
        for layer, cache in zip(dec.layers[stage.start_layer : stage.end_layer], kv_caches, strict=True):
            x = layer(x, cache, plan)
        if not stage.is_last:
            return x
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        return x if dec.project_out is None else dec.project_out(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, weights, self._target)

    def owns(self, name: str) -> bool:
        """Whether this pipeline stage keeps checkpoint tensor ``name``."""
        layer = layer_of(name)
        if layer is not None:
            return self.stage.owns_layer(layer)
        leaf = name.removeprefix("model.").removeprefix("decoder.")
        if leaf.startswith("embed_tokens."):
            return self.stage.is_first or self.stage.is_last
        if leaf.startswith(("embed_positions.", "project_in.")):
            return self.stage.is_first
        if leaf.startswith(("final_layer_norm.", "project_out.")):
            return self.stage.is_last
        return True

    def _target(self, name: str) -> WeightTarget | None:
        if name == "lm_head.weight":  # always tied to embed_tokens
            return None
        if name.startswith("decoder."):  # early OPT checkpoints have no "model." prefix
            name = "model." + name
        if not self.owns(name):
            return None
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("q_proj", "k_proj", "v_proj"):
            return ".".join([*parts[:-2], "qkv_proj", parts[-1]]), parts[-2][0]
        return name, None
