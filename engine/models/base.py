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
    head_dim: int
    vocab_size: int

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_new_tokens] int64
        positions: torch.Tensor,  # [num_new_tokens] int64
        kv_caches: list[KVCache],  # one per layer
        attn: AttentionMetadata,
    ) -> torch.Tensor:  # hidden states [num_new_tokens, hidden_size]
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab] float32
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes tensors named as in the Hugging Face checkpoint of this architecture."""
        ...
