"""The vocabulary's layers under tensor parallelism: token embeddings and the LM head, with the
vocabulary padded to a multiple of the tensor-parallel size T and its rows split in T
contiguous parts (the same rows on both). The embedding all-reduces (each token's row lives
on one rank, the others add zeros); the head is a column-parallel linear layer (so it
quantizes like any other) that all-gathers its logits and trims the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.linear import (
    SINGLE_DEVICE,
    UNQUANTIZED,
    ColumnParallelLinear,
    LinearMethod,
    Loaded,
    ShardId,
    TPInfo,
    as_float,
    read_now,
)


class VocabParallelEmbedding(nn.Module):
    """Token embeddings with the vocabulary split across ranks (after padding it to a multiple
    of T); a token's row lives on one rank, the others contribute zeros to the all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPInfo = SINGLE_DEVICE) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.tp = vocab_size, hidden_size, tp
        self.padded_vocab = -(-vocab_size // tp.size) * tp.size
        self.rows = self.padded_vocab // tp.size
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: ShardId = None) -> int:
        if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"shape {tuple(loaded.shape)}, expected {(self.vocab_size, self.hidden_size)}"
            )
        kept = max(0, min(self.rows, self.vocab_size - self.start))
        param.data[:kept].copy_(as_float(loaded.narrow(0, self.start, kept)))
        param.data[kept:].zero_()  # padding rows: never looked up, zero logits (trimmed)
        return param.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.rows)
        out = F.embedding((ids - self.start) * mine, self.weight) * mine.unsqueeze(-1)
        return self.tp.all_reduce(out)


class ParallelLMHead(ColumnParallelLinear):
    """The output projection over a vocab-parallel split (same rows as the embedding's).

    ``tied``: the head is the embedding's matrix. Unquantized, it reads that matrix at call
    time; quantized, it builds its own packed copy from it once loading is done (the
    embedding keeps floats for its row lookups). ``forward`` returns fp32
    ``[n, vocab_size]`` logits, padding trimmed.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp: TPInfo = SINGLE_DEVICE,
        quant_method: LinearMethod | None = None,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.padded_vocab = -(-vocab_size // tp.size) * tp.size
        self.tied = [tied] if tied is not None else None  # a list: not a registered submodule
        super().__init__(hidden_size, self.padded_vocab, False, tp, quant_method)
        self.reads_embedding = tied is not None and self.quant_method is UNQUANTIZED
        if self.reads_embedding:
            del self.weight  # the embedding's matrix is used at call time

    @property
    def aux_params(self) -> tuple[str, ...]:
        if self.tied is not None:  # nothing comes from the checkpoint under this name
            return ("weight", *self.quant_method.aux_params)
        return self.quant_method.aux_params

    def process_after_loading(self) -> None:
        if self.reads_embedding:
            return
        if self.tied is not None:
            embed = self.tied[0]
            kept = max(0, min(embed.rows, embed.vocab_size - embed.start))
            self.quant_method.load_weight(self, embed.weight[:kept], slice(0, kept))
            if kept < self.out_features:
                pad = torch.zeros(self.out_features - kept, self.in_features)
                self.quant_method.load_weight(self, pad, slice(kept, self.out_features))
        self.quant_method.process_after_loading(self)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: ShardId = None) -> int:
        if tuple(loaded.shape) != (self.vocab_size, self.in_features):
            raise ValueError(
                f"shape {tuple(loaded.shape)}, expected {(self.vocab_size, self.in_features)}"
            )
        start = self.tp.rank * self.out_features
        kept = max(0, min(self.out_features, self.vocab_size - start))
        if kept:
            part = read_now(loaded.narrow(0, start, kept))
            self.quant_method.load_weight(self, part, slice(0, kept))
        if kept < self.out_features:
            pad = torch.zeros(self.out_features - kept, self.in_features)
            self.quant_method.load_weight(self, pad, slice(kept, self.out_features))
        return self.out_features * self.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.reads_embedding:
            logits = F.linear(hidden, self.tied[0].weight)  # type: ignore[index]
        else:
            logits = self.quant_method.apply(self, hidden, None).float()
            logits = self.quant_method.refine_logits(self, hidden, logits)
        logits = self.tp.all_gather(logits)
        return logits if self.padded_vocab == self.vocab_size else logits[..., : self.vocab_size]
