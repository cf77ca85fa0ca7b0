"""Worker side: apply next-token bitmasks to a batch of logits, with tensor ops only.

A bitmask row is int32 words in xgrammar's layout: token ``t`` is allowed when bit
``t % 32`` of word ``t // 32`` is set. Token ids past the mask (a model whose logits are
wider than the vocabulary the grammar was compiled for) are never allowed.

The mask is applied as an addend (0 where allowed, -inf where refused) read from a
256 x 8 table, one row per possible byte of the words: one embedding lookup turns the
packed words into the addend, and one ``index_add_`` applies it. Measured on this
project's busy 2-core CPU (one torch thread) for 8 rows of SmolLM2's 49,152 tokens: about
0.7 ms per step, against 4.3 ms for unpacking bits with shifts and ``masked_fill``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_TABLES: dict[tuple, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [m, W] -> bool [m, vocab_size]: True where the token is allowed."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [m, W, 32], bit j of word w
    return _fit(bits.view(bitmask.shape[0], -1).bool(), vocab_size, False)


def bitmask_addend(bitmask: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 [m, W] -> [m, vocab_size] of ``dtype``: 0 where allowed, -inf where refused."""
    import torch

    if sys.byteorder != "little":  # the byte table reads words as little-endian bytes
        allowed = unpack_bitmask(bitmask, vocab_size)
        return torch.zeros(allowed.shape, dtype=dtype, device=bitmask.device).masked_fill_(
            ~allowed, float("-inf"))
    key = (bitmask.device, dtype)
    table = _TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # [byte, bit]
        table = torch.where(bits.bool(), 0.0, float("-inf")).to(dtype=dtype, device=bitmask.device)
        _TABLES[key] = table
    words = bitmask.to(torch.int32).contiguous()
    index = words.view(torch.uint8).to(torch.int64)  # [m, 4W], byte k of word w at 4w + k
    addend = torch.nn.functional.embedding(index, table).view(bitmask.shape[0], -1)
    return _fit(addend, vocab_size, float("-inf"))


def _fit(t: torch.Tensor, vocab_size: int, fill: object) -> torch.Tensor:
    """Columns cut or padded (with ``fill``) to ``vocab_size``."""
    import torch

    width = t.shape[1]
    if width >= vocab_size:
        return t[:, :vocab_size]
    pad = torch.full((t.shape[0], vocab_size - width), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


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

    addend = bitmask_addend(bitmask.to(logits.device), logits.shape[1], logits.dtype)
    out = logits.clone()
    out.index_add_(0, rows, addend)  # each row is listed once: x + 0 = x, x + -inf = -inf
    if raw is not None:
        dead = torch.isneginf(out.amax(dim=-1))
        if bool(dead.any()):
            for i, r in enumerate(rows.tolist()):  # rare: a handful of rows at most
                if dead[r]:
                    out[r] = raw[r] + addend[i]
    return out
