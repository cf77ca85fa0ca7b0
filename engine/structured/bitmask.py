"""Worker side: apply next-token bitmasks to a batch of logits, with tensor ops only.

A bitmask row is int32 words in xgrammar's layout: token ``t`` is allowed when bit
``t % 32`` of word ``t // 32`` is set. Token ids past the mask (a model whose logits are
wider than the vocabulary the grammar was compiled for) are never allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [m, W] -> bool [m, vocab_size]: True where the token is allowed."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [m, W, 32], bit j of word w
    allowed = bits.view(bitmask.shape[0], -1).bool()
    width = allowed.shape[1]
    if width >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - width, dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def apply_token_bitmask(
    logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor, raw: torch.Tensor | None = None
) -> torch.Tensor:
    """``logits`` [B, V] with -inf where row ``rows[i]`` is refused by ``bitmask[i]``; other
    rows unchanged. Returns a new tensor (``logits`` is not modified).

    A row whose every allowed token is already -inf (min_tokens forbids the EOS the grammar
    requires now) would leave nothing to sample; that row is masked from ``raw`` (the
    logits before any processing) instead: the grammar wins.
    """
    import torch

    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[1])
    out = logits.clone()
    sub = logits[rows].masked_fill(~allowed, float("-inf"))
    if raw is not None:
        dead = torch.isneginf(sub).all(dim=-1)
        if bool(dead.any()):
            sub[dead] = raw[rows][dead].masked_fill(~allowed[dead], float("-inf"))
    out[rows] = sub
    return out
