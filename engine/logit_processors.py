"""The logit processors of the batched sampler that need per-job state (worker side):
``logit_bias``, the ``min_tokens`` mask, and the repetition / frequency / presence penalties.

Each job that asks for one holds a :class:`JobProcessors`; :class:`BatchProcessors` applies
them to the rows of a batch that have one, each processor vectorised over its rows, and
counts the drawn tokens. A job that asks for none has no ``JobProcessors`` and costs
nothing; a batch where no row asks is not touched (not even copied). Order (vLLM's, and
``docs/serving.md``): bias, then the min_tokens mask, then repetition, frequency, presence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class JobProcessors:
    presence: float = 0.0  # minus once for every token already generated
    frequency: float = 0.0  # minus per occurrence among generated tokens
    repetition: float = 1.0  # prompt or generated: logit / r if > 0, else * r
    bias: list[list[Any]] | None = None  # [[token id, bias], ...]
    min_tokens: int = 0
    min_tokens_ids: list[int] | None = None  # masked while fewer than min_tokens are drawn
    prompt_ids: Any = None  # repetition penalty: the prompt, until the job has a counts row
    num_drawn: int = 0  # tokens drawn while min_tokens was pending
    slot: int | None = None  # the job's row in TokenCounts (penalised jobs, from first draw)
    device_tensors: dict[str, Any] = field(default_factory=dict)  # bias / min-token ids

    @classmethod
    def from_view(cls, view: dict, prompt_ids: Any = None) -> JobProcessors | None:
        """From ``SamplingParams.worker_view()``; None when the job asks for none."""
        p = cls(
            presence=float(view.get("presence_penalty", 0.0)),
            frequency=float(view.get("frequency_penalty", 0.0)),
            repetition=float(view.get("repetition_penalty", 1.0)),
            bias=view.get("logit_bias") or None,
            min_tokens=int(view.get("min_tokens", 0)),
            min_tokens_ids=view.get("min_tokens_ids") or None,
        )
        if not (p.penalised or p.bias or p.min_tokens_ids):
            return None
        if p.repetition != 1.0 and prompt_ids is not None:
            import numpy as np

            # A copy: the plan's array may be a read-only view of a socket frame.
            p.prompt_ids = np.array(prompt_ids, dtype=np.int64)
        return p

    @property
    def penalised(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0

    @property
    def masks_stops(self) -> bool:
        return self.min_tokens_ids is not None and self.num_drawn < self.min_tokens

    @property
    def active(self) -> bool:
        """Some processor applies to the job's next draw."""
        return self.penalised or self.bias is not None or self.masks_stops

    def tensors(self, name: str, device: torch.device) -> Any:
        """The job's constant index tensors ("bias": ids and values; "stops"), made once."""
        import torch

        t = self.device_tensors.get(name)
        if t is None or (t[0] if isinstance(t, tuple) else t).device != device:
            if name == "bias":
                assert self.bias is not None
                t = (torch.tensor([int(b[0]) for b in self.bias], device=device),
                     torch.tensor([float(b[1]) for b in self.bias], device=device))
            else:
                t = torch.tensor(self.min_tokens_ids, dtype=torch.int64, device=device)
            self.device_tensors[name] = t
        return t


class TokenCounts:
    """How often each penalised job generated each token id, and which ids its prompt holds.

    One row of a [capacity, vocab] table per job that asked for a penalty, on the logits'
    device. After each draw the rows of the batch are bumped in place (one scatter), and a
    step reads them with one gather: nothing is rebuilt from token lists. The row belongs to
    the job until the sampler forgets it, so preemption does not touch it: a swapped job
    keeps it, and a recomputed job re-feeds tokens that were counted when they were drawn
    (only its final position samples, a new token). A job that sits out a step is not in
    the batch and its row is not read or written.
    """

    INITIAL_ROWS = 8

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # [capacity, vocab] int32
        self.in_prompt: torch.Tensor | None = None  # [capacity, vocab] bool
        self._free: list[int] = []

    def assign(self, vocab: int, device: torch.device, prompt_ids: Any = None) -> int:
        import torch

        if self.counts is None or self.counts.shape[1] != vocab:
            if self.counts is not None and len(self._free) != self.counts.shape[0]:
                raise RuntimeError(f"logits of width {vocab} for counts of {self.counts.shape[1]}")
            self.counts = torch.zeros(self.INITIAL_ROWS, vocab, dtype=torch.int32, device=device)
            self.in_prompt = torch.zeros(self.INITIAL_ROWS, vocab, dtype=torch.bool, device=device)
            self._free = list(range(self.INITIAL_ROWS - 1, -1, -1))
        assert self.in_prompt is not None
        if self.counts.device != device:
            self.counts, self.in_prompt = self.counts.to(device), self.in_prompt.to(device)
        if not self._free:  # double the table; rows keep their index
            cap = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.in_prompt = torch.cat([self.in_prompt, torch.zeros_like(self.in_prompt)])
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        slot = self._free.pop()
        self.counts[slot].zero_()
        self.in_prompt[slot].zero_()
        if prompt_ids is not None and len(prompt_ids):
            ids = torch.as_tensor(prompt_ids, dtype=torch.int64).to(device)
            self.in_prompt[slot, ids[(ids >= 0) & (ids < vocab)]] = True
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more of ``tokens[k]`` in row ``slots[k]`` (each slot at most once)."""
        import torch

        assert self.counts is not None
        one = torch.ones(tokens.shape, dtype=self.counts.dtype, device=tokens.device)
        self.counts.index_put_((slots, tokens), one, accumulate=True)


class BatchProcessors:
    """Applies the jobs' processors to a batch of logits and keeps their token counts."""

    def __init__(self) -> None:
        self.counts = TokenCounts()

    def apply(self, logits: torch.Tensor, procs: list[JobProcessors | None]) -> torch.Tensor:
        """Row i of ``logits`` [B, V] through ``procs[i]``: a processed copy, or ``logits``
        itself when no row has an active processor."""
        import torch

        if not any(p is not None and p.active for p in procs):
            return logits
        dev = logits.device
        logits = logits.clone()
        bias_rows = [i for i, p in enumerate(procs) if p is not None and p.bias]
        if bias_rows:
            pairs = [procs[i].tensors("bias", dev) for i in bias_rows]  # type: ignore[union-attr]
            rows, ids = _row_index([t[0] for t in pairs], bias_rows, dev)
            vals = torch.cat([t[1] for t in pairs]).to(logits.dtype)
            logits.index_put_((rows, ids), vals, accumulate=True)
        stop_rows = [i for i, p in enumerate(procs) if p is not None and p.masks_stops]
        if stop_rows:
            rows, ids = _row_index(
                [procs[i].tensors("stops", dev) for i in stop_rows], stop_rows, dev)  # type: ignore[union-attr]
            keep = ids < logits.shape[1]
            logits.index_put_((rows[keep], ids[keep]),
                              torch.tensor(-math.inf, dtype=logits.dtype, device=dev))
        pen_rows = [i for i, p in enumerate(procs) if p is not None and p.penalised]
        if pen_rows:
            self._penalise(logits, [procs[i] for i in pen_rows], pen_rows)  # type: ignore[misc]
        return logits

    def _penalise(self, logits: torch.Tensor, procs: list[JobProcessors], rows: list[int]) -> None:
        import torch

        dev, vocab = logits.device, logits.shape[1]
        for p in procs:
            if p.slot is None:  # first draw: its counts row starts with the prompt
                p.slot = self.counts.assign(vocab, dev, p.prompt_ids)
                p.prompt_ids = None
        assert self.counts.counts is not None and self.counts.in_prompt is not None
        slots = torch.tensor([p.slot for p in procs], device=dev)
        r = torch.tensor(rows, device=dev)
        counts = self.counts.counts[slots]
        sub = logits[r]
        reps = [p.repetition for p in procs]
        if any(x != 1.0 for x in reps):
            seen = (counts > 0) | self.counts.in_prompt[slots]
            rep = torch.tensor(reps, dtype=sub.dtype, device=dev).unsqueeze(1)
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        # A row that did not ask for one of these subtracts exactly 0.0: its logits stay.
        if any(p.frequency != 0.0 for p in procs):
            freq = torch.tensor([p.frequency for p in procs], dtype=sub.dtype, device=dev)
            sub = sub - freq.unsqueeze(1) * counts.to(sub.dtype)
        if any(p.presence != 0.0 for p in procs):
            pres = torch.tensor([p.presence for p in procs], dtype=sub.dtype, device=dev)
            sub = sub - pres.unsqueeze(1) * (counts > 0).to(sub.dtype)
        logits[r] = sub

    def record(self, procs: list[JobProcessors | None], tokens: torch.Tensor) -> None:
        """Count the drawn ``tokens`` (row i drew ``tokens[i]``) for the jobs that track them."""
        import torch

        rows = [i for i, p in enumerate(procs) if p is not None and p.slot is not None]
        if rows:
            dev = tokens.device
            slots = torch.tensor([procs[i].slot for i in rows], device=dev)  # type: ignore[union-attr]
            self.counts.add(slots, tokens[torch.tensor(rows, device=dev)])
        for p in procs:
            if p is not None and p.masks_stops:
                p.num_drawn += 1

    def release(self, procs: JobProcessors | None) -> None:
        if procs is not None and procs.slot is not None:
            self.counts.release(procs.slot)
            procs.slot = None


def _row_index(
    ids: list[torch.Tensor], rows: list[int], dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) index pairs for ``index_put_``: row ``rows[k]`` with each of ``ids[k]``."""
    import torch

    lengths = torch.tensor([len(t) for t in ids], device=dev)
    return torch.tensor(rows, device=dev).repeat_interleave(lengths), torch.cat(ids)
