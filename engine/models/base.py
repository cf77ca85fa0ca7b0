"""The contract between the worker's model runner and model implementations.

A step feeds a *flat* batch of new tokens from several sequences (no padding, no
prefill/decode phases): sequence i contributes ``query_lens[i]`` consecutive tokens whose
positions are ``context_lens[i] - query_lens[i] ... context_lens[i] - 1``. Every layer
first writes the new tokens' K/V into the paged cache at ``slot_mapping`` and then attends,
causally, over the sequence's whole context read back through its block table. So a
prefill is a sequence with ``query_len == context_len``, a decode step one with
``query_len == 1``, and a resumed or chunked prefill anything in between.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence, in batch order
    context_lens: list[int]  # tokens in the cache per sequence after this step's writes
    # [num_seqs, max_blocks] int64, padded with 0 beyond each sequence's table.
    block_tables: torch.Tensor
    # [num_new_tokens] int64: block_id * block_size + offset, where each new token's K/V goes.
    slot_mapping: torch.Tensor
    block_size: int
    # The same tables on the host, when the caller has them (the runner builds them there):
    # lets the plan inspect a table without copying it back from the device. Optional.
    host_block_tables: np.ndarray | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


# One layer's paged KV cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
KVCache = torch.Tensor


class CausalLM(Protocol):
    """What the model runner needs from a model implementation (an ``nn.Module``)."""

    num_layers: int
    num_kv_heads: int
    stage: PipelineStage  # the layers this instance holds
    head_dim: int
    vocab_size: int

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_new_tokens] int64
        positions: torch.Tensor,  # [num_new_tokens] int64
        kv_caches: list[KVCache],  # one per layer of this pipeline stage
        attn: AttentionMetadata,
        hidden: torch.Tensor | None = None,  # the previous stage's output (not on stage 0)
    ) -> torch.Tensor:
        """Hidden states [num_new_tokens, hidden_size]: final (normed) on the last stage,
        the residual stream handed to the next stage otherwise."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab] float32
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes tensors named as in the Hugging Face checkpoint of this architecture."""
        ...


@dataclass(frozen=True)
class PipelineStage:
    """The contiguous range of decoder layers one pipeline stage owns.

    The first stage also embeds tokens, the last applies the final norm and the head (and,
    when the head is tied, holds the embedding matrix too). Stage ``i`` of ``n`` gets
    ``num_layers // n`` layers, the first ``num_layers % n`` stages one more.
    """

    start_layer: int
    end_layer: int
    is_first: bool = True
    is_last: bool = True

    @classmethod
    def split(cls, num_layers: int, num_stages: int, index: int) -> PipelineStage:
        if not 0 < num_stages <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {num_stages} pipeline stages")
        base, extra = divmod(num_layers, num_stages)
        start = index * base + min(index, extra)
        end = start + base + (1 if index < extra else 0)
        return cls(start, end, index == 0, index == num_stages - 1)

    @classmethod
    def whole(cls, num_layers: int) -> PipelineStage:
        return cls(0, num_layers)

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer

    def owns_layer(self, index: int) -> bool:
        return self.start_layer <= index < self.end_layer


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Decoder layer index of a checkpoint tensor name (``model.layers.3.mlp...`` -> 3)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


class MissingLayer(torch.nn.Module):
    """Stands in for a decoder layer another pipeline stage owns (keeps parameter names)."""
